#!/usr/bin/env python3
"""What a scrape of the admin endpoint costs a server holding many connections.

Starts `linedancer serve echo --admin 127.0.0.1:PORT` (release build), opens
`--connections` idle connections (10,000 by default), then GETs `--path` (/metrics by
default) `--scrapes` times in a row and reads the server's CPU time (utime + stime from
/proc/PID/stat, all threads) before and after: the CPU per scrape. Then `linedancer bench
echo --conns 10` runs twice for 3 s, once quiet and once with a scrape every
`--interval` (0.1 s: 150 times Prometheus's usual rate), and the script prints both runs' requests per second and latencies: a
scrape must not stall serving.

    python3 bench/scrape.py
    python3 bench/scrape.py --connections 10000 --scrapes 100 --path /connections
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import LINEDANCER, ROOT, pinned, stop_server  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def bench(addr):
    """Three seconds of `linedancer bench echo --conns 10` against `addr`."""
    out = subprocess.run(pinned(1, [LINEDANCER, "bench", "echo", "--conns", "10", "--addr", addr,
                                    "--duration", "3s", "--warmup", "500ms", "--json"]),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class Scraping(threading.Thread):
    """GETs `url` every `interval` seconds until stopped."""

    def __init__(self, url, interval):
        super().__init__(daemon=True)
        self.url, self.interval, self.done, self.count = url, interval, threading.Event(), 0
        self.start()

    def run(self):
        while not self.done.wait(self.interval):
            with urllib.request.urlopen(self.url) as answer:
                answer.read()
            self.count += 1

    def stop(self):
        self.done.set()
        self.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--path", default="/metrics")
    parser.add_argument("--admin-port", type=int, default=9187)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between scrapes while the echo runs")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "linedancer-cli",
                    "--bin", "linedancer"], cwd=ROOT, check=True)
    admin = f"127.0.0.1:{args.admin_port}"
    command = [LINEDANCER, "serve", "echo", "--port", "0", "--admin", admin,
               "--max-connections", str(args.connections + 100)]
    server = subprocess.Popen(pinned(0, command), stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True,
                              env=dict(os.environ, RUST_LOG="warn"))
    addr = None
    for line in server.stderr:
        if line.startswith("listening on "):
            host, port = line.split()[-1].rsplit(":", 1)
            addr = (host, int(port))
        if line.startswith("admin on "):
            break
    idle = []
    try:
        for _ in range(args.connections):
            idle.append(socket.create_connection(addr))
        url = f"http://{admin}{args.path}"
        while True:
            with urllib.request.urlopen(f"http://{admin}/stats") as answer:
                if f'"open":{args.connections}' in answer.read().decode():
                    break
            time.sleep(0.05)

        size = 0
        before, started = cpu_seconds(server.pid), time.perf_counter()
        for _ in range(args.scrapes):
            with urllib.request.urlopen(url) as answer:
                size = len(answer.read())
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(server.pid) - before
        server_addr = f"{addr[0]}:{addr[1]}"
        quiet = bench(server_addr)
        scraping = Scraping(url, args.interval)
        busy = bench(server_addr)
        scraping.stop()
    finally:
        for client in idle:
            client.close()
        stop_server(server)

    print(f"{args.scrapes} scrapes of {args.path} with {args.connections:,} connections open "
          f"({size:,} bytes each): {cpu / args.scrapes * 1000:.1f} ms of server CPU per scrape, "
          f"{elapsed / args.scrapes * 1000:.1f} ms wall each")
    for name, run in [("quiet", quiet), (f"while scraping ({scraping.count} scrapes)", busy)]:
        print(f"bench echo --conns 10, {name}: {run['requests_per_sec']:,.0f} req/s, "
              f"p50 {run['latency_p50_us']} us, p99 {run['latency_p99_us']} us, "
              f"max {run['latency_max_us']} us, errors {run['errors_total']}")


if __name__ == "__main__":
    main()
