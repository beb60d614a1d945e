#!/usr/bin/env bash
# Fuzzes linedancer's PROXY protocol header parser (ProxyHeader::parse) with cargo-fuzz
# and libFuzzer, checking the invariants in fuzz/fuzz_targets/proxy_header.rs (prefix
# consistency, lengths, what the header holds), for SECONDS seconds (default 30).
#
#   bash fuzz/run.sh [SECONDS]                    # from any directory
#   FUZZ_SANITIZER=address bash fuzz/run.sh 600   # with AddressSanitizer
#
# Works on stable Rust: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags
# (-Zsanitizer=..., -Cpasses=sancov-module). No sanitizer by default: the parser and
# ppp are safe Rust, and AddressSanitizer runs about 4 times slower here; `address`
# works on stable too (switching rebuilds). Installs cargo-fuzz if it is missing.
# Honours CARGO_TARGET_DIR (default fuzz/target). The corpus grows in
# fuzz/corpus/proxy_header (git-ignored), started from the tracked seeds in
# fuzz/seeds/proxy_header. Exits non-zero if the fuzzer finds a crash, a failed
# invariant or a hang; the input is then in fuzz/artifacts/proxy_header/.
set -euo pipefail

seconds="${1:-30}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS]" >&2
  exit 2
fi
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

corpus="$fuzz_dir/corpus/proxy_header"
mkdir -p "$corpus"
cd "$fuzz_dir/.."
# New inputs go to the first corpus directory; the seeds are only read.
if ! cargo fuzz run --sanitizer "$sanitizer" proxy_header \
  "$corpus" "$fuzz_dir/seeds/proxy_header" -- \
  -max_total_time="$seconds" -max_len=4200 -timeout=10 \
  -dict="$fuzz_dir/proxy_header.dict" -print_final_stats=1; then
  echo "fuzz/run.sh: the fuzzer failed; the input is in $fuzz_dir/artifacts/proxy_header/" >&2
  exit 1
fi
