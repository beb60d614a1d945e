#!/usr/bin/env python3
"""Connection storms against a live `linedancer serve chat`: how many survive, in what
time, at what cost to the server.

Each storm connects `--clients` clients at once to the chat's lobby; each reads
everything it gets. Once every client has its welcome, one more client says a line,
and every client waits for it; then all leave. For each storm it prints how many
clients heard the line (the survivors: a client closed by the server, for a mailbox or
output overflow, does not), the time to join, the time for the line to reach everyone,
and, with `--pid`, the server's CPU time over the storm and its resident memory before
and after (read from /proc once it has closed every connection of the storm).

    linedancer serve chat --port 7000 &
    python3 bench/storm.py --addr 127.0.0.1:7000 --pid $! --clients 5000 --storms 3

Needs a file descriptor limit above the number of clients (`ulimit -n`).
"""

import argparse
import asyncio
import os
import sys
import time


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def client(host, port, joined, heard, line):
    """One storm client: joins, reads eagerly until `line` arrives; True if it did."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        joined.release()
        return False
    try:
        welcome = await reader.readline()
        joined.release()
        if not welcome.startswith(b"* welcome"):
            return False
        await heard.wait()
        while True:
            got = await reader.readline()
            if not got:
                return False  # closed by the server
            if got.rstrip(b"\n").endswith(b"> " + line):
                return True
    finally:
        writer.close()


async def storm(args, host, port, number):
    pid = args.pid
    fds_before = open_fds(pid) if pid else None
    cpu_before = cpu_seconds(pid) if pid else None
    rss_before = rss_mib(pid) if pid else None
    line = f"storm {number} has passed".encode()
    joined = asyncio.Semaphore(0)
    heard = asyncio.Event()
    started = time.monotonic()
    tasks = [asyncio.create_task(client(host, port, joined, heard, line))
             for _ in range(args.clients)]
    for _ in range(args.clients):
        await joined.acquire()
    joined_in = time.monotonic() - started
    heard.set()
    _, speaker = await asyncio.open_connection(host, port)
    speaker.write(line + b"\n")
    await speaker.drain()
    said = time.monotonic()
    survivors = sum(await asyncio.gather(*tasks))
    reached_in = time.monotonic() - said
    speaker.close()
    report = (f"storm {number}: {survivors} of {args.clients} survived and heard the line; "
              f"joined in {joined_in:.2f} s, the line reached them in {reached_in:.2f} s")
    if pid:
        deadline = time.monotonic() + 30
        while open_fds(pid) > fds_before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        report += (f"; server CPU {cpu_seconds(pid) - cpu_before:.2f} s, "
                   f"RSS {rss_before:.1f} -> {rss_mib(pid):.1f} MiB")
    print(report, flush=True)
    return survivors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:7000", help="the chat server")
    parser.add_argument("--pid", type=int, help="the server's process, for CPU and memory")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--storms", type=int, default=3)
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    host = host.strip("[]")
    lost = 0
    for number in range(1, args.storms + 1):
        survivors = asyncio.run(storm(args, host, int(port), number))
        lost += args.clients - survivors
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
