#!/usr/bin/env python3
"""Compare `linedancer serve kv` with redis-server under redis-benchmark, in one run.

The load is `redis-benchmark -t set,get,incr -c 50` with `-P 1` and with `-P 16`, against
`linedancer serve kv --threads 1` and against redis-server (Debian's 7.0, started with
`--save '' --appendonly no`). As in compare.py, both servers run in alternating rounds
(A B, B A, A B, ...), because this kind of machine drifts by tens of percent for minutes
at a time: only runs interleaved in time compare. Where `taskset` exists the server is
pinned to CPU 0 and redis-benchmark to CPU 1. Use an even number of rounds, so that each
server goes first as often.

In a round, for each pipeline depth, both servers are started (both on CPU 0: the one
not under load sleeps) and stay up while redis-benchmark runs one invocation per test
(`-t set`, then `-t get`, then `-t incr`) against one and then the other, so that a
test's two runs are seconds apart, and so that each server's CPU time (utime + stime
from /proc/PID/stat, all threads) can be read before and after each test and divided by
its requests. Before the measured tests a short unmeasured pass of every test warms the
fresh servers up (`--warmup`).

For every test and pipeline depth it prints the medians, the min-max, the server's CPU
time per request, and the ratios linedancer / redis: the median (and range) of each
round's ratio, as a round's two runs are next to each other in time. The target is
≥ 1.00x in requests per second and ≤ 1.00x in CPU per request (the CPU ratio is
linedancer's CPU per request over redis's, so lower is better for linedancer).

    python3 bench/redis_compare.py                          # 4 rounds, P1 and P16
    python3 bench/redis_compare.py --rounds 6 --tests set,get --pipelines 16
    python3 bench/redis_compare.py --linedancer-args="--threads 2"
    python3 bench/redis_compare.py --a-a --rounds 2         # the machine's noise

With `--a-a` redis-server runs on both sides: two identical servers, whose ratios show
how far apart this machine measures the same thing from round to round (linedancer is
then neither built nor run).

redis-benchmark runs without `-r` by default, as in its own default: every SET and GET
hits one key (`key:__rand_int__`) and every INCR one counter, so the comparison is of
the serving path (reading, parsing, dispatch, replies), not of a hash table under a
large keyspace; `--keyspace N` passes `-r N` for random keys among N. The number of
requests per test (`--requests-p1`, `--requests-p16`) is meant for about 2 s a test.

Needs redis-server (Debian package `redis-server`) and redis-benchmark (`redis-tools`).
linedancer logs nothing per connection during the runs (RUST_LOG=warn), redis-server
logs to /dev/null.
"""

import argparse
import csv
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import LINEDANCER, ROOT, paired, pinned, spread, start_server, stop_server  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid):
    """utime + stime of process `pid` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # the command name is in parentheses and may hold spaces: fields count from after it
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ping(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(timeout=10.0):
    """Starts redis-server on a free port; returns (process, "127.0.0.1:PORT") once it
    answers PING. Retries on another port if it ends early (the port taken meanwhile)."""
    for _ in range(3):
        port = free_port()
        command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                   "--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no"]
        process = subprocess.Popen(pinned(0, command), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if answers_ping(port):
                return process, f"127.0.0.1:{port}"
            time.sleep(0.05)
        if process.poll() is None:
            stop_server(process)
            raise RuntimeError(f"redis-server did not answer PING on port {port} "
                               f"within {timeout:.0f} s")
    raise RuntimeError(f"redis-server ended before answering (exit code {process.returncode})")


def start(server, args):
    """Starts `server` ("linedancer" or "redis"); returns (process, address)."""
    if server == "linedancer" and not args.a_a:
        command = [LINEDANCER, "serve", "kv", "--port", "0", "--threads", "1"]
        command += shlex.split(args.linedancer_args)
        return start_server(command, dict(os.environ, RUST_LOG="warn"))
    return start_redis()


def parse_csv(text):
    """redis-benchmark --csv output: {test name: {column: value}}. 7.0 prints a header
    ("test","rps","avg_latency_ms",...); older versions print only "TEST","RPS" rows."""
    rows = {}
    header = None
    for row in csv.reader(line for line in text.splitlines() if line.strip()):
        if not row:
            continue
        if row[0].strip().lower() == "test":
            header = [c.strip().lower() for c in row]
            continue
        names = header or ["test", "rps"]
        values = {}
        for name, value in zip(names[1:], row[1:]):
            try:
                values[name] = float(value)
            except ValueError:
                pass
        if "rps" in values:
            rows[row[0].strip()] = values
    return rows


def benchmark(addr, test, pipeline, requests, args):
    """One redis-benchmark invocation of one test; returns its CSV row."""
    host, port = addr.rsplit(":", 1)
    command = ["redis-benchmark", "-h", host, "-p", port, "-t", test,
               "-c", str(args.clients), "-P", str(pipeline), "-n", str(requests),
               "--csv", "-q"]
    if args.keyspace:
        command += ["-r", str(args.keyspace)]
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark -t {test} -P {pipeline} against {addr} failed "
                           f"({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
    rows = parse_csv(out.stdout)
    if len(rows) != 1:
        raise RuntimeError(f"redis-benchmark -t {test}: expected one CSV result, got "
                           f"{sorted(rows) or 'none'}: {out.stdout.strip()[-500:]}")
    return rows.popitem()[1]


def requests_for(pipeline, args):
    return args.requests_p1 if pipeline == 1 else args.requests_p16


def measure(process, addr, test, pipeline, args):
    """One measured redis-benchmark run of `test` against the server `process`."""
    requests = requests_for(pipeline, args)
    cpu_before = server_cpu_seconds(process.pid)
    wall_before = time.monotonic()
    row = benchmark(addr, test, pipeline, requests, args)
    wall = time.monotonic() - wall_before
    cpu = server_cpu_seconds(process.pid) - cpu_before
    return {
        "requests": requests,
        "requests_per_sec": row["rps"],
        "server_cpu_seconds": cpu,
        "server_cpu_us_per_request": cpu * 1e6 / requests,
        "wall_seconds": wall,
        **{k: v for k, v in row.items() if k.endswith("_ms")},
    }


def run_pipeline(order, pipeline, args):
    """Starts both servers (both on CPU 0; the one not under load sleeps) and runs every
    test at `pipeline` against one, then the other, in `order`: a test's two runs are
    seconds apart. Returns {server: {test: result}}."""
    started = {}
    try:
        for server in order:
            started[server] = start(server, args)
        if args.warmup:
            for test in args.tests:
                for server in order:
                    benchmark(started[server][1], test, pipeline, args.warmup, args)
        results = {server: {} for server in order}
        for test in args.tests:
            for server in order:
                process, addr = started[server]
                results[server][test] = measure(process, addr, test, pipeline, args)
        return results
    finally:
        for process, _ in started.values():
            stop_server(process)


def row_name(test, pipeline):
    return f"{test.upper()} P{pipeline}"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds; an even number lets each server go first equally often")
    parser.add_argument("--tests", default="set,get,incr",
                        help="redis-benchmark tests (-t), one invocation each")
    parser.add_argument("--pipelines", default="1,16", help="pipeline depths (-P)")
    parser.add_argument("--clients", type=int, default=50, help="connections (-c)")
    parser.add_argument("--requests-p1", type=int, default=150_000,
                        help="requests per test without pipelining (-n)")
    parser.add_argument("--requests-p16", type=int, default=3_000_000,
                        help="requests per test with pipelining, any -P above 1 (-n)")
    parser.add_argument("--warmup", type=int, default=20_000,
                        help="unmeasured requests per test after each start; 0: none")
    parser.add_argument("--keyspace", type=int, default=0,
                        help="random keys among this many (-r); 0: one key, as by default")
    parser.add_argument("--linedancer-args", default="",
                        help="extra flags for `linedancer serve kv`")
    parser.add_argument("--json", help="also write every run's numbers to this file")
    parser.add_argument("--a-a", action="store_true",
                        help="run redis-server in linedancer's place too (an A/A comparison)")
    parser.add_argument("--no-build", action="store_true",
                        help="use target/release/linedancer as it is")
    args = parser.parse_args()
    args.tests = [t.strip().lower() for t in args.tests.split(",") if t.strip()]
    try:
        pipelines = [int(p) for p in args.pipelines.split(",") if p.strip()]
    except ValueError:
        sys.exit(f"error: --pipelines takes numbers, as 1,16 (got '{args.pipelines}')")
    if not args.tests or not pipelines or min(pipelines) < 1 or args.rounds < 1:
        sys.exit("error: needs at least one test, one pipeline depth of 1 or more, one round")
    if args.rounds % 2:
        print("warning: an odd number of rounds lets one server go first more often",
              file=sys.stderr)
    missing = [tool for tool, package in (("redis-server", "redis-server"),
                                           ("redis-benchmark", "redis-tools"))
               if not shutil.which(tool)]
    if missing:
        sys.exit(f"error: {' and '.join(missing)} not found on PATH; install them with "
                 "`apt-get install redis-server redis-tools` (redis-server: the server, "
                 "redis-tools: redis-benchmark)")

    if not args.a_a:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "linedancer-cli",
                            "--bin", "linedancer"], cwd=ROOT, check=True)
        if not os.access(LINEDANCER, os.X_OK):
            sys.exit(f"error: {LINEDANCER} not found; build it (cargo build --release) "
                     "or run without --no-build")
    version = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True).stdout.split()
    version = next((w[2:] for w in version if w.startswith("v=")), "?")

    names = [row_name(t, p) for p in pipelines for t in args.tests]
    runs = {name: {"linedancer": [], "redis": []} for name in names}
    labels = ({"linedancer": "redis A", "redis": "redis B"} if args.a_a
              else {"linedancer": "linedancer", "redis": "redis"})
    for round_ in range(args.rounds):
        order = ["linedancer", "redis"] if round_ % 2 == 0 else ["redis", "linedancer"]
        for pipeline in pipelines:
            try:
                results = run_pipeline(order, pipeline, args)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                sys.exit(f"error: {e}")
            for test in args.tests:
                for server in order:
                    result = results[server][test]
                    runs[row_name(test, pipeline)][server].append(result)
                    print(f"round {round_ + 1} {row_name(test, pipeline):10} "
                          f"{labels[server]:10} {result['requests_per_sec']:>12,.0f} req/s "
                          f"{result['server_cpu_us_per_request']:>7.2f} CPU µs/req",
                          file=sys.stderr, flush=True)
            time.sleep(0.5)  # let the sockets of the last runs leave the port table

    a, b = labels["linedancer"], labels["redis"]
    requests = ", ".join(f"P{p} {requests_for(p, args):,}" for p in pipelines)
    print(f"\n{args.rounds} rounds, redis-benchmark -c {args.clients}"
          f"{f' -r {args.keyspace}' if args.keyspace else ''}, requests per test: "
          f"{requests}; redis-server {version}"
          f"{', linedancer ' + args.linedancer_args if args.linedancer_args and not args.a_a else ''}"
          f"{', redis-server against itself' if args.a_a else ''}\n")
    print(f"| test | {a} req/s | {b} req/s | ratio "
          f"| {a} CPU µs/req | {b} CPU µs/req | CPU ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rate = lambda v: f"{v:,.0f}"
    cpu = lambda v: f"{v:.2f}"
    for name in names:
        ld, redis = runs[name]["linedancer"], runs[name]["redis"]
        ld_rps, _ = spread([r["requests_per_sec"] for r in ld], rate)
        redis_rps, _ = spread([r["requests_per_sec"] for r in redis], rate)
        ld_cpu, _ = spread([r["server_cpu_us_per_request"] for r in ld], cpu)
        redis_cpu, _ = spread([r["server_cpu_us_per_request"] for r in redis], cpu)
        print(f"| {name} | {ld_rps} | {redis_rps} "
              f"| {paired(ld, redis, 'requests_per_sec')} "
              f"| {ld_cpu} | {redis_cpu} | {paired(ld, redis, 'server_cpu_us_per_request')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
