#!/usr/bin/env python3
"""Instructions per request: the daemon's CPU cost counted by valgrind, not timed.

These machines are shared and noisy (CPU steal, other jobs, a 2x swing in speed between days), so
wall-clock throughput only compares two builds inside one run. ``valgrind --tool=callgrind`` counts
the instructions the daemon executes instead: the same code on the same requests gives nearly the same
count whatever else the machine is doing, so a lever worth 3% shows up as 3%.

For each ``--variant NAME=DIR`` (a source tree of clproxy; ``.`` is this one), per round: start the
fake upstream (``benchmarks/upstream.py``, no pacing), start that tree's daemon under callgrind,
send ``--warmup`` requests, zero the counters (``callgrind_control -z``), send ``--requests``
requests over ``--connections`` keep-alive connections, dump (``callgrind_control -d``) and read
the total. Variants alternate within each round. It prints, per variant, the median (min-max) of
instructions per request over the rounds and the ratio to the first variant.

``--mode nonstream`` sends the ~20 KB Claude-Code-like body of ``benchmarks/payload.py``;
``--mode stream`` the streaming one (the fake answers 40 text deltas, unpaced: they reach the
daemon in a few reads; ``--interval-ms 5`` paces them so that each is a read and a write of its
own, as in the paced benchmark, and the per-event cost counts).

``--redis URL`` runs the daemons on the Redis state store at URL (a running redis-server); ``--keep
DIR`` keeps each variant's last dump, for ``callgrind_annotate`` (which C functions: the interpreter,
the regex engine, msgspec, the UTF-8 decoder, sqlite...).

Usage: ``python benchmarks/instructions.py --variant base=/tmp/old --variant new=. [--mode stream]``.
Needs ``valgrind`` (Debian package ``valgrind``). Each measurement takes a minute or more: the
daemon runs ~50x slower under callgrind.
"""

import argparse
import glob
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import payload  # noqa: E402

TOTALS_RE = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)


class BenchError(Exception):
    """A process did not start or a request failed: the count would mean nothing."""


def first_line(proc, prefix: bytes) -> bytes:
    """The first stdout line of ``proc``, which must start with ``prefix``."""
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        raise BenchError(f"expected a {prefix!r} line, got {line!r}")
    return line


def start_upstream(workdir: str, deltas: int, interval_ms: float = 0.0):
    """The fake upstream on a free loopback port, unpaced; returns (process, port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py"), "--port", "0",
                             "--deltas", str(deltas), "--interval-ms", str(interval_ms)],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "upstream.log"), "wb"))
    port = int(first_line(proc, b"READY ").split()[1])
    return proc, port


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_once(conn, body: bytes, stream: bool) -> None:
    """One POST /v1/messages on ``conn``; the whole answer read; a non-200 stops the benchmark."""
    headers = dict(line.split(": ", 1) for line in payload.header_lines(stream))
    headers["x-api-key"] = "bench-client"
    conn.request("POST", "/v1/messages", body=body, headers=headers)
    response = conn.getresponse()
    answer = response.read()
    if response.status != 200 or not answer:
        raise BenchError(f"the proxy answered {response.status}: {answer[:200]!r}")


def send(port: int, count: int, connections: int, body: bytes, stream: bool) -> None:
    """``count`` requests spread over ``connections`` keep-alive connections, in threads."""
    errors = []

    def worker(share):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            for _ in range(share):
                request_once(conn, body, stream)
        except Exception as error:  # noqa: BLE001 - reported below, the run is void
            errors.append(error)
        finally:
            conn.close()

    shares = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{len(errors)} connection(s) failed: {errors[0]}")


def callgrind_control(*args) -> None:
    """Run ``callgrind_control`` (zero or dump the counters of a running callgrind)."""
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def measure(tree: str, upstream_port: int, args, workdir: str, label: str) -> float:
    """Instructions per request of the daemon from ``tree``."""
    home = os.path.join(workdir, f"home-{label}")
    os.makedirs(os.path.join(home, ".clproxy"), exist_ok=True)
    config = os.path.join(workdir, "config.json")
    with open(config, "w") as f:
        json.dump({"version": 1, "accounts": {"anthropic": [
            {"name": "bench", "apiKey": "bench-key", "baseUrl": f"http://127.0.0.1:{upstream_port}"}]},
            **({"state": {"backend": "redis", "url": args.redis}} if args.redis else {})}, f)
    env = dict(os.environ, HOME=home, CLPROXY_HOME=os.path.join(home, ".clproxy"),
               CLPROXY_CLAUDE_SETTINGS=os.path.join(home, ".claude", "settings.json"),
               PYTHONPATH=os.path.abspath(tree), PYTHONHASHSEED="0")
    env.pop("ANTHROPIC_API_KEY", None)
    port = free_port()
    out = os.path.join(workdir, f"callgrind-{label}.out")
    for old in glob.glob(out + "*"):
        os.remove(old)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            sys.executable, "-m", "clproxy", "proxy", "start", "--port", str(port), "--config", config,
            "--quiet", "--claude-settings", "off", "--no-guard"]
    log = open(os.path.join(workdir, f"daemon-{label}.log"), "wb")
    daemon = subprocess.Popen(argv, cwd=os.path.abspath(tree), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the daemon from {tree} did not start (see {log.name})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                time.sleep(1.0)
        body = payload.build_body(stream=args.mode == "stream")
        send(port, args.warmup, args.connections, body, args.mode == "stream")
        callgrind_control("-z", str(daemon.pid))
        send(port, args.requests, args.connections, body, args.mode == "stream")
        callgrind_control("-d", str(daemon.pid))
        dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
        if not dumps:
            raise BenchError("callgrind wrote no dump")
        if args.keep:  # for callgrind_annotate: where the instructions went, by function
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(dumps[-1], os.path.join(args.keep, f"callgrind-{label}.out"))
        with open(dumps[-1], "rb") as f:
            match = TOTALS_RE.search(f.read())
        if not match:
            raise BenchError(f"no totals in {dumps[-1]}")
        return int(match.group(1)) / args.requests
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=DIR",
                        help="a clproxy source tree to measure; give two or more to compare")
    parser.add_argument("--mode", choices=("nonstream", "stream"), default="nonstream")
    parser.add_argument("--requests", type=int, default=400, help="measured requests per round")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests first")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deltas", type=int, default=40, help="text deltas per streamed answer")
    parser.add_argument("--interval-ms", type=float, default=0.0,
                        help="pace the streamed deltas this far apart (0: unpaced)")
    parser.add_argument("--redis", metavar="URL",
                        help="run the daemons on the Redis state store at URL (a running redis-server)")
    parser.add_argument("--keep", metavar="DIR",
                        help="copy each variant's last callgrind dump to DIR (read it with callgrind_annotate)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("instructions.py needs valgrind (Debian package valgrind)")
    variants = []
    for spec in args.variant:
        name, _, tree = spec.partition("=")
        if not tree or not os.path.isdir(os.path.join(tree, "clproxy")):
            sys.exit(f"--variant {spec}: expected NAME=DIR, DIR a clproxy source tree")
        variants.append((name, tree))
    workdir = tempfile.mkdtemp(prefix="clproxy-instr-")
    upstream, upstream_port = start_upstream(workdir, args.deltas, args.interval_ms)
    counts = {name: [] for name, _ in variants}
    try:
        for round_number in range(args.rounds):
            for name, tree in variants:
                per_request = measure(tree, upstream_port, args, workdir, name)
                counts[name].append(per_request)
                print(f"round {round_number + 1} {name}: {per_request:,.0f} instructions/request", flush=True)
    finally:
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    first = statistics.median(counts[variants[0][0]])
    print(f"\n{args.mode}, {args.requests} requests over {args.connections} connections, "
          f"{args.rounds} round(s): instructions per request, median (min-max)")
    for name, _ in variants:
        values = counts[name]
        median = statistics.median(values)
        print(f"  {name:12s} {median:12,.0f} ({min(values):,.0f}-{max(values):,.0f})  "
              f"ratio {median / first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
