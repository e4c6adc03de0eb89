#!/usr/bin/env python3
"""What the dashboard's live feed costs: the daemon at c=32 with no page open and with 20 open.

Each round starts a fresh daemon per variant and measures, in the same run and with the same fake
upstream and load as ``benchmarks/run.py`` (non-stream ~20 KB POSTs, wrk, c=32):

* ``direct``: the load straight at the fake upstream (the ratio's denominator);
* ``before`` (with ``--baseline TREE``): the daemon of another checkout, e.g. the commit before the
  dashboard, with no page (what recording the activity ring costs when nobody looks);
* ``0 pages`` and ``N pages`` (``--pages``, default 20): this tree's daemon with that many live
  feeds (``GET /dashboard/events``) open and read for the whole run.

For each it reports req/s (and its ratio to direct), the daemon's CPU % and peak RSS during the
load, and its CPU % over an idle stretch with the pages open (the feed alone). Rounds alternate
the variants; the table shows medians with their spread (min-max). The proxy is pinned to core 0,
the load generator and the fake upstream to core 1, as in ``run.py``.

Usage: ``.venv/bin/python benchmarks/dashboard_cost.py [--rounds 3] [--pages 20] [--seconds 6]
[--baseline /path/to/older/checkout]``
"""

import argparse
import os
import select
import socket
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402

BASELINE_CMD = ("sh -c 'cd {tree} && exec {{python}} -m clproxy proxy start --port {{port}} "
                "--config {{config}} --quiet --claude-settings off --no-guard'")


class Pages(threading.Thread):
    """``count`` open dashboard pages: each an SSE connection to /dashboard/events, read as it comes."""

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        self.sockets = []
        self.received = 0
        self.frames = 0
        self._stop_event = threading.Event()
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
            sock.setblocking(False)
            self.sockets.append(sock)

    def run(self):
        while not self._stop_event.is_set() and self.sockets:
            ready, _, _ = select.select(self.sockets, [], [], 0.2)
            for sock in ready:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                self.received += len(data)
                self.frames += data.count(b"event: update")

    def close(self):
        self._stop_event.set()
        self.join(2.0)
        for sock in self.sockets:
            sock.close()


def measure(bench, pages: int, seconds: float, idle: float) -> dict:
    """One daemon (already started), ``pages`` open: idle CPU, then c=32 for ``seconds``."""
    pid = bench.proxy.pid
    reader = Pages(bench.proxy_port, pages) if pages else None
    if reader is not None:
        reader.start()
    try:
        time.sleep(1.0)
        before = run.proc_cpu(pid)
        time.sleep(idle)
        idle_cpu = round(100.0 * (run.proc_cpu(pid) - before) / idle, 2)
        bench.wrk("proxy", 32, 1, record=False)
        sampler = run.RssSampler(pid)
        sampler.start()
        result = bench.wrk("proxy", 32, seconds)
        sampler.stop()
        result.update(idle_cpu_pct=idle_cpu, peak_rss_mib=round(sampler.max_rss_kib / 1024, 1),
                      proxy_cpu_pct=(result.get("cpu") or {}).get("proxy_cpu_pct"))
        if reader is not None:
            result.update(page_bytes=reader.received, page_frames=reader.frames)
        return result
    finally:
        if reader is not None:
            reader.close()


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pages", type=int, default=20)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds of c=32 load per measurement")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU reading per measurement")
    p.add_argument("--baseline", help="another checkout whose daemon runs as the 'before' variant")
    own = p.parse_args(argv)
    args = run.parse_args(["--only", "nonstream", "--output", os.path.join(HERE, "results", "dashboard.json")])
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    run.raise_nofile(4096)
    bench = run.Bench(args)
    variants = [("0 pages", None, 0), (f"{own.pages} pages", None, own.pages)]
    if own.baseline:
        variants.insert(0, ("before", BASELINE_CMD.format(tree=os.path.abspath(own.baseline)), 0))
    rows = {name: [] for name, _, _ in variants}
    direct = []
    try:
        bench.start_upstream()
        for round_no in range(own.rounds):
            bench.wrk("direct", 32, 1, record=False)
            direct.append(bench.wrk("direct", 32, own.seconds)["rps"])
            order = variants if round_no % 2 == 0 else list(reversed(variants))
            for name, command, pages in order:
                args.proxy_cmd = command
                bench.start_proxy()
                try:
                    run.progress(f"round {round_no + 1}: {name}")
                    rows[name].append(measure(bench, pages, own.seconds, own.idle))
                finally:
                    bench.stop_proxy()
    finally:
        bench.cleanup()
    print(f"\nc=32 non-stream, {own.rounds} rounds, medians (min-max); direct req/s {spread(direct)}")
    print(f"{'variant':<10} {'req/s':>22} {'ratio':>8} {'proxy CPU %':>20} {'peak RSS MiB':>20} "
          f"{'idle CPU %':>18} {'page KiB/s':>12}")
    for name, _, _ in variants:
        got = rows[name]
        ratios = [r["rps"] / d for r, d in zip(got, direct) if d]
        rate = [r["page_bytes"] / 1024 / (own.seconds + own.idle + 2) for r in got if "page_bytes" in r]
        print(f"{name:<10} {spread([r['rps'] for r in got]):>22} {statistics.median(ratios):>8.3f} "
              f"{spread([r['proxy_cpu_pct'] for r in got]):>20} {spread([r['peak_rss_mib'] for r in got]):>20} "
              f"{spread([r['idle_cpu_pct'] for r in got]):>18} {spread(rate) if rate else '-':>12}")


if __name__ == "__main__":
    main()
