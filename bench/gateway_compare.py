#!/usr/bin/env python3
"""Compare `linedancer serve gateway` with HAProxy as a TCP relay, in one run.

Both relay to the same upstream, the hand-written tokio echo (`baseline_echo`), and
are loaded by the same client (`linedancer bench`). The relay under test runs on one
thread pinned to CPU 0 (`serve gateway --threads 1`; HAProxy with `nbthread 1`, in
`mode tcp`, once without and once with `option splice-auto`); the upstream and the
client share CPU 1. The three relays are started at the beginning of a round and stay
up through it (all on CPU 0; those not under load sleep); in each scenario they take
turns, the order rotating from round to round, because this machine drifts by tens of
percent for minutes at a time: a scenario's runs in a round are seconds apart, and
ratios are the median (and range) of each round's ratio. `--a-a` puts a second HAProxy
(without splice-auto) in the gateway's place, to show how far apart this machine
measures two identical relays.

Scenarios: `small-50` (50 connections, 32-byte messages, one at a time),
`pipelined-50x16` (16 in flight per connection), `64k-50` (64 KiB messages) and
`churn-50` (50 workers each connecting, echoing one message and closing, again and
again). CPU is the relay's (utime + stime, all threads, from /proc/PID/stat), per
request; per byte it is the same ratio, as both relays move the same bytes.
`idle-5000` opens 5,000 connections through each relay, freshly started, and leaves
them idle: the growth of the relay's resident memory (VmRSS) divided by 5,000 is what
an idle relayed connection costs it (both of its sockets, its buffers, its state).

    python3 bench/gateway_compare.py                         # 4 rounds of 3 s
    python3 bench/gateway_compare.py --rounds 6 --scenarios 64k-50,small-50
    python3 bench/gateway_compare.py --a-a --rounds 6        # the machine's noise

Needs haproxy (Debian's package `haproxy`, 2.6 here).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import (BASELINE, LINEDANCER, ROOT, paired, pinned, spread,  # noqa: E402
                     start_server, stop_server)

SCENARIOS = {
    "small-50": ["echo", "--conns", "50", "--size", "32"],
    "pipelined-50x16": ["echo", "--conns", "50", "--size", "32", "--pipeline", "16"],
    "64k-50": ["echo", "--conns", "50", "--size", "65536"],
    "churn-50": ["connect", "--conns", "50"],
    "idle-5000": ["hold", "--conns", "5000"],
}
# Scenarios measured on freshly started relays, for the memory their connections take.
FRESH = {"idle-5000"}
RELAYS = ["linedancer", "haproxy", "haproxy-splice"]

HAPROXY_CONFIG = """
global
    nbthread 1
    maxconn 6000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    {splice}
frontend relay
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server echo {upstream}
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port, process):
    for _ in range(500):
        if process.poll() is not None:
            raise RuntimeError("the relay ended at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port}")


def start_relay(relay, upstream, workdir):
    """Starts `relay` in front of `upstream`; returns (process, address)."""
    env = dict(os.environ, RUST_LOG="warn")
    if relay == "linedancer":
        return start_server([LINEDANCER, "serve", "gateway", "--port", "0", "--threads", "1",
                             "--upstream", upstream], env)
    port = free_port()
    config = os.path.join(workdir, f"{relay}.cfg")
    splice = "option splice-auto" if relay == "haproxy-splice" else ""
    with open(config, "w") as out:
        out.write(HAPROXY_CONFIG.format(splice=splice, port=port, upstream=upstream))
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    process = subprocess.Popen(pinned(0, [haproxy, "-db", "-f", config]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, process)
    return process, f"127.0.0.1:{port}"


def run_once(process, addr, scenario, args):
    """One run of `scenario` through the relay `process` listening on `addr`."""
    bench = [LINEDANCER, "bench", *SCENARIOS[scenario], "--addr", addr, "--json",
             "--pid", str(process.pid), "--duration", args.duration,
             "--warmup", args.warmup]
    out = subprocess.run(pinned(1, bench), capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, RUST_LOG="warn"))
    if out.returncode != 0:
        raise RuntimeError(f"bench failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def kind_of(relay, args):
    """What runs as `relay`: a second HAProxy in the gateway's place with --a-a."""
    return "haproxy" if args.a_a and relay == "linedancer" else relay


def run_fresh(relay, kind, upstream, scenario, args, workdir):
    """A hold scenario through a relay started for it alone; adds the memory each
    connection took (the relay's VmRSS growth over the connections opened)."""
    process, addr = start_relay(kind, upstream, workdir)
    try:
        result = run_once(process, addr, scenario, args)
    finally:
        stop_server(process)
    if result.get("errors_total") or not result.get("server_rss_after_bytes"):
        raise RuntimeError(f"{relay}: {scenario} did not hold every connection: {result}")
    grown = result["server_rss_after_bytes"] - result["server_rss_before_bytes"]
    result["rss_per_conn"] = grown / result["connections_opened"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", default="3s")
    parser.add_argument("--warmup", default="1s")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--a-a", action="store_true",
                        help="run HAProxy (without splice-auto) in the gateway's place too: "
                             "an A/A comparison, to see this machine's noise")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        sys.exit(f"error: unknown scenario '{unknown[0]}' (known: {', '.join(SCENARIOS)})")
    if not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")):
        sys.exit("error: haproxy is not installed (Debian: apt-get install haproxy)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "linedancer-cli",
                    "--bin", "linedancer", "--example", "baseline_echo"],
                   cwd=ROOT, check=True)
    workdir = tempfile.mkdtemp(prefix="linedancer-gateway-")
    # start_server pins to CPU 0; the inner taskset moves the upstream to CPU 1.
    upstream_process, upstream = start_server(pinned(1, [BASELINE, "--port", "0"]),
                                              dict(os.environ))
    runs = {s: {relay: [] for relay in RELAYS} for s in scenarios}
    labels = dict(zip(RELAYS, RELAYS))
    if args.a_a:
        labels["linedancer"] = "haproxy (A/A)"
    try:
        for round_number in range(args.rounds):
            order = RELAYS[round_number % 3:] + RELAYS[:round_number % 3]
            started = {}
            try:
                for relay in order:
                    started[relay] = start_relay(kind_of(relay, args), upstream, workdir)
                for scenario in scenarios:
                    for relay in order:
                        if scenario in FRESH:
                            result = run_fresh(relay, kind_of(relay, args), upstream,
                                               scenario, args, workdir)
                            runs[scenario][relay].append(result)
                            print(f"round {round_number + 1} {scenario:<16} "
                                  f"{labels[relay]:<15} {result['rss_per_conn'] / 1e3:>9.2f} "
                                  "kB per connection", flush=True)
                            continue
                        result = run_once(*started[relay], scenario, args)
                        runs[scenario][relay].append(result)
                        print(f"round {round_number + 1} {scenario:<16} {labels[relay]:<15} "
                              f"{result['requests_per_sec']:>12,.0f} req/s "
                              f"{result['echoed_bytes_per_sec'] / 1e6:>9.1f} MB/s  "
                              f"errors {result['errors_total']}", flush=True)
            finally:
                for process, _ in started.values():
                    stop_server(process)
    finally:
        stop_server(upstream_process)

    first = labels["linedancer"]
    print(f"\n{args.rounds} rounds, {args.duration} each; ratios are {first} / HAProxy "
          "(without, with splice-auto)\n")
    print(f"| scenario | {first} req/s | HAProxy req/s | HAProxy splice req/s | ratio | "
          f"ratio vs splice | {first} CPU µs/req | HAProxy CPU µs/req | HAProxy splice "
          "CPU µs/req | CPU ratio | CPU ratio vs splice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario in (s for s in scenarios if s not in FRESH):
        per = runs[scenario]
        rate = [spread([r["requests_per_sec"] for r in per[relay]], lambda v: f"{v:,.0f}")[0]
                for relay in RELAYS]
        cpu = [spread([r["server_cpu_us_per_request"] for r in per[relay]],
                      lambda v: f"{v:.2f}")[0] for relay in RELAYS]
        ours = per["linedancer"]
        print(f"| {scenario} | {rate[0]} | {rate[1]} | {rate[2]} | "
              f"{paired(ours, per['haproxy'], 'requests_per_sec')} | "
              f"{paired(ours, per['haproxy-splice'], 'requests_per_sec')} | "
              f"{cpu[0]} | {cpu[1]} | {cpu[2]} | "
              f"{paired(ours, per['haproxy'], 'server_cpu_us_per_request')} | "
              f"{paired(ours, per['haproxy-splice'], 'server_cpu_us_per_request')} |")

    fresh = [s for s in scenarios if s in FRESH]
    if fresh:
        print(f"\n| scenario | {first} kB per connection | HAProxy kB | HAProxy splice kB "
              "| ratio | ratio vs splice |")
        print("| --- | --- | --- | --- | --- | --- |")
    for scenario in fresh:
        per = runs[scenario]
        memory = [spread([r["rss_per_conn"] / 1e3 for r in per[relay]],
                         lambda v: f"{v:.2f}")[0] for relay in RELAYS]
        ours = per["linedancer"]
        print(f"| {scenario} | {memory[0]} | {memory[1]} | {memory[2]} | "
              f"{paired(ours, per['haproxy'], 'rss_per_conn')} | "
              f"{paired(ours, per['haproxy-splice'], 'rss_per_conn')} |")


if __name__ == "__main__":
    main()
