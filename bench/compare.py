#!/usr/bin/env python3
"""Compare linedancer's echo servers with the hand-written tokio baseline, in one run.

Each scenario runs both servers in alternating rounds (A B, B A, A B, ...), because this
kind of machine drifts by tens of percent for minutes at a time: only runs interleaved
in time compare. Where `taskset` exists the server is pinned to CPU 0 and the load
generator (`linedancer bench`) to CPU 1. For every scenario it prints the medians, the
min-max, the server's CPU time per request, and the ratios linedancer / baseline: the
median (and range) of each round's ratio, as a round's two runs are next to each other
in time. Use an even number of rounds, so that each server goes first as often.

    python3 bench/compare.py                      # every scenario, 4 rounds of 3 s
    python3 bench/compare.py --rounds 6 --duration 5s --scenarios echo-50,lines-50
    python3 bench/compare.py --linedancer-args="--threading work-stealing"
    python3 bench/compare.py --a-a --scenarios echo-1,lines-50   # the machine's noise

The TLS scenarios (`tls-echo-50`: 50 established TLS connections; `tls-churn-50`: 50
workers that each connect, make a full TLS handshake, echo one message and close, again
and again) race `serve echo --tls-cert --tls-key` against `baseline_tls_echo`, a
hand-written tokio-rustls echo, with the same certificate (made for the run with
`openssl req`) and the same client (`linedancer bench --tls-ca`, which never resumes a
session).

With `--a-a` the baseline runs on both sides: two identical servers, whose ratios show
how far apart this machine measures the same thing from round to round.

Both servers log nothing per connection during the runs (linedancer with
RUST_LOG=warn), so that the comparison is of serving, not of logging.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEDANCER = os.path.join(ROOT, "target", "release", "linedancer")
BASELINE = os.path.join(ROOT, "target", "release", "examples", "baseline_echo")
BASELINE_TLS = os.path.join(ROOT, "target", "release", "examples", "baseline_tls_echo")

# name: (bench flags, linedancer protocol, baseline flags)
SCENARIOS = {
    "echo-1": (["echo", "--conns", "1"], "echo", []),
    "echo-50": (["echo", "--conns", "50"], "echo", []),
    "echo-1000": (["echo", "--conns", "1000"], "echo", []),
    "pipelined-50x16": (["echo", "--conns", "50", "--pipeline", "16"], "echo", []),
    "churn-50": (["connect", "--conns", "50"], "echo", []),
    "lines-50": (["echo", "--conns", "50", "--lines"], "line-echo", ["--lines"]),
    "hold-10000": (["hold", "--conns", "10000"], "echo", []),
    "tls-echo-50": (["echo", "--conns", "50"], "echo", []),
    "tls-churn-50": (["connect", "--conns", "50"], "echo", []),
}
TLS = {"tls-echo-50", "tls-churn-50"}


def make_certificate(directory):
    """A self-signed certificate for localhost (EC P-256), as (cert, key) PEM paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:FALSE"],
                   check=True, capture_output=True)
    return cert, key


def pinned(cpu, command):
    """`command` pinned to `cpu` when taskset is available."""
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)] + command
    return command


def start_server(command, env):
    """Starts a server and returns (process, address) once it says it listens."""
    process = subprocess.Popen(
        pinned(0, command), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env=env)
    for line in process.stderr:
        if line.startswith("listening on "):
            return process, line.split()[-1]
    raise RuntimeError(f"{command[0]} ended before listening")


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_once(server, scenario, args, certificate):
    """One run of `scenario` against `server` ("linedancer" or "baseline")."""
    bench_flags, protocol, baseline_flags = SCENARIOS[scenario]
    env = dict(os.environ, RUST_LOG="warn")
    tls = scenario in TLS
    tls_flags = ["--tls-cert", certificate[0], "--tls-key", certificate[1]] if tls else []
    if server == "linedancer" and not args.a_a:
        command = [LINEDANCER, "serve", protocol, "--port", "0"] + tls_flags
        command += shlex.split(args.linedancer_args)
    else:
        command = [BASELINE_TLS if tls else BASELINE, "--port", "0"] + baseline_flags
        command += tls_flags
    process, addr = start_server(command, env)
    scraping = None
    if args.scrape and server == "linedancer" and not args.a_a:
        scraping = Scraper(args.scrape)
    try:
        duration = args.hold if bench_flags[0] == "hold" else args.duration
        bench = [LINEDANCER, "bench", *bench_flags, "--addr", addr, "--json",
                 "--pid", str(process.pid), "--duration", duration,
                 "--warmup", args.warmup]
        if tls:
            bench += ["--tls-ca", certificate[0]]
        out = subprocess.run(pinned(1, bench), capture_output=True, text=True,
                             env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"bench failed: {out.stderr.strip()}")
        return json.loads(out.stdout)
    finally:
        if scraping:
            scraping.stop()
        stop_server(process)


class Scraper(threading.Thread):
    """GETs `url` once a second until stopped, as Prometheus would; fails the run if a
    scrape fails."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.done, self.scrapes, self.error = url, threading.Event(), 0, None
        self.start()

    def run(self):
        while not self.done.wait(1.0):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    answer.read()
                self.scrapes += 1
            except OSError as e:
                self.error = e

    def stop(self):
        self.done.set()
        self.join()
        if self.error or not self.scrapes:
            raise RuntimeError(f"scraping {self.url}: {self.error or 'no scrape'}")


def spread(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-", None
    median = statistics.median(values)
    return f"{fmt(median)} ({fmt(min(values))}-{fmt(max(values))})", median


def paired(ours, theirs, key):
    """The median and range of the per-round ratios ours / theirs: each round's two runs
    are next to each other in time, so drift between rounds cancels out of them."""
    ratios = [a[key] / b[key] for a, b in zip(ours, theirs)
              if a.get(key) is not None and b.get(key)]
    if not ratios:
        return "-"
    return (f"{statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds; an even number lets each server go first equally often")
    parser.add_argument("--duration", default="3s", help="measured time per run")
    parser.add_argument("--warmup", default="1s")
    parser.add_argument("--hold", default="3s", help="idle time in the hold scenario")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--linedancer-args", default="",
                        help="extra flags for `linedancer serve`")
    parser.add_argument("--scrape", metavar="URL",
                        help="GET this URL once a second during linedancer's runs, such as "
                             "http://127.0.0.1:9100/metrics with --linedancer-args "
                             "'--admin 127.0.0.1:9100'")
    parser.add_argument("--json", help="also write every run's numbers to this file")
    parser.add_argument("--a-a", action="store_true",
                        help="run the baseline in linedancer's place too (an A/A comparison)")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        sys.exit(f"error: unknown scenario '{unknown[0]}' (known: {', '.join(SCENARIOS)})")

    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "linedancer-cli",
                    "--bin", "linedancer", "--example", "baseline_echo",
                    "--example", "baseline_tls_echo"],
                   cwd=ROOT, check=True)
    certificate = make_certificate(tempfile.mkdtemp(prefix="linedancer-compare-"))
    runs = {s: {"linedancer": [], "baseline": []} for s in scenarios}
    labels = ({"linedancer": "baseline A", "baseline": "baseline B"} if args.a_a
              else {"linedancer": "linedancer", "baseline": "baseline"})
    for round_ in range(args.rounds):
        order = ["linedancer", "baseline"] if round_ % 2 == 0 else ["baseline", "linedancer"]
        for scenario in scenarios:
            for server in order:
                result = run_once(server, scenario, args, certificate)
                runs[scenario][server].append(result)
                print(f"round {round_ + 1} {scenario:16} {labels[server]:10} "
                      f"{result['requests_per_sec']:>12,.0f} req/s  "
                      f"errors {result['errors_total']}", file=sys.stderr, flush=True)
                time.sleep(0.5)  # let the sockets of the last run leave the port table

    a, b = labels["linedancer"], labels["baseline"]
    print(f"\n{args.rounds} rounds, {args.duration} each"
          f"{', linedancer ' + args.linedancer_args if args.linedancer_args else ''}"
          f"{', the baseline against itself' if args.a_a else ''}\n")
    print(f"| scenario | {a} req/s | {b} req/s | ratio "
          f"| {a} CPU µs/req | {b} CPU µs/req | CPU ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    memory = []
    for scenario in scenarios:
        ld, base = runs[scenario]["linedancer"], runs[scenario]["baseline"]
        errors = sum(r["errors_total"] for r in ld + base)
        if SCENARIOS[scenario][0][0] == "hold":
            kib = lambda v: f"{v / 1024:.2f}"
            ld_mem, ld_m = spread([r["server_rss_per_conn_bytes"] for r in ld], kib)
            base_mem, base_m = spread([r["server_rss_per_conn_bytes"] for r in base], kib)
            memory.append((scenario, ld_mem, base_mem, ld_m, base_m, errors))
            continue
        rate = lambda v: f"{v:,.0f}"
        cpu = lambda v: f"{v:.2f}"
        ld_rps, _ = spread([r["requests_per_sec"] for r in ld], rate)
        base_rps, _ = spread([r["requests_per_sec"] for r in base], rate)
        ld_cpu, _ = spread([r["server_cpu_us_per_request"] for r in ld], cpu)
        base_cpu, _ = spread([r["server_cpu_us_per_request"] for r in base], cpu)
        note = f" ({errors} errors)" if errors else ""
        print(f"| {scenario}{note} | {ld_rps} | {base_rps} "
              f"| {paired(ld, base, 'requests_per_sec')} "
              f"| {ld_cpu} | {base_cpu} | {paired(ld, base, 'server_cpu_us_per_request')} |")
    for scenario, ld_mem, base_mem, ld_m, base_m, errors in memory:
        note = f" ({errors} errors)" if errors else ""
        extra = f"{(ld_m - base_m) / 1024:+.2f}" if ld_m is not None and base_m is not None else "-"
        print(f"\n{scenario}{note}: server memory per idle connection, KiB: "
              f"{a} {ld_mem}, {b} {base_mem}, difference {extra} KiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
