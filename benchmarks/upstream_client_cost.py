"""What the upstream HTTP client costs per request: twisted's Agent against clproxy.proxy.http1.

Both go through ``UpstreamClient`` (``send`` then ``read_body``) to the benchmark's fake upstream
(``upstream.py``, its own process, so only the client side is counted) on loopback: the ~20 KB
Claude-Code-like POST (``payload.py``) answered by a ~600-byte JSON message, sequentially and
``--concurrency`` at a time, and a 40-event SSE stream (chunked), ``--concurrency`` at a time.

The main figure is CPU instructions per request, counted by valgrind's callgrind: repeatable on a
shared, noisy machine where wall-clock time is not. Each case runs twice under callgrind, with
``N`` and ``2N`` requests after the same warm-up; the difference divided by N is the cost of one
request without start-up. The secondary figure is wall-clock µs per request, median (min-max)
over ``--rounds`` rounds, without valgrind.

Run: ``.venv/bin/python benchmarks/upstream_client_cost.py`` (needs ``valgrind``; ``--no-callgrind``
for the timings only). ``--worker`` is the measured process, started by the script itself.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CLIENTS = ("agent", "http1")
CASES = ("sequential", "concurrent", "stream")
WARM_UP = 20


# -- the measured process ------------------------------------------------------------------
def worker(args) -> None:
    """Send the warm-up, then ``--count`` requests of ``--case``; print the seconds they took."""
    from twisted.internet import defer, reactor, task
    from twisted.web.http_headers import Headers

    from clproxy.proxy.upstream import UpstreamClient, read_body, twisted_agent
    from payload import HEADERS, build_body

    client = UpstreamClient(reactor)
    if args.client == "agent":
        client.agent = twisted_agent(client)
    url = f"http://127.0.0.1:{args.port}/v1/messages".encode()
    stream = args.case == "stream"
    body = build_body(stream=stream)
    header_pairs = [(k.encode(), v.encode()) for k, v in HEADERS if k not in ("connection", "accept-encoding")]

    async def one() -> None:
        headers = Headers()
        for name, value in header_pairs:  # a fresh Headers per request, as the shaping pipeline makes
            headers.addRawHeader(name, value)
        response = await client.send(b"POST", url, headers, body, 60, reactor)
        got = await read_body(response, 1 << 24)
        assert response.code == 200 and got, (response.code, got[:200])

    async def run(count: int, concurrency: int) -> None:
        done = 0
        while done < count:
            batch = min(concurrency, count - done)
            await defer.gatherResults([defer.ensureDeferred(one()) for _ in range(batch)])
            done += batch

    concurrency = 1 if args.case == "sequential" else args.concurrency

    async def main(_reactor) -> None:
        await run(WARM_UP, concurrency)
        start = time.perf_counter()
        await run(args.count, concurrency)
        print(f"SECONDS {time.perf_counter() - start:.6f}", flush=True)
        await client.close()

    task.react(lambda r: defer.ensureDeferred(main(r)))


# -- the driver ----------------------------------------------------------------------------
def start_upstream(interval_ms: float):
    process = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", "0",
                                "--interval-ms", str(interval_ms)],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("READY"):
        process.kill()
        raise SystemExit(f"the fake upstream did not start: {line!r}")
    return process, int(line.split()[1])


def run_worker(args, client: str, case: str, count: int, callgrind: bool):
    """(instructions or None, seconds) of one worker run."""
    command = [sys.executable, __file__, "--worker", "--client", client, "--case", case,
               "--count", str(count), "--concurrency", str(args.concurrency), "--port", str(args.port)]
    if callgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"] + command
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    seconds = re.search(r"SECONDS ([0-9.]+)", done.stdout)
    if done.returncode != 0 or seconds is None:
        raise SystemExit(f"worker {client}/{case} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    collected = re.search(r"Collected\s*:\s*([0-9]+)", done.stderr) if callgrind else None
    return (int(collected.group(1)) if collected else None), float(seconds.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, default="http1")
    parser.add_argument("--case", choices=CASES, default="sequential")
    parser.add_argument("--count", type=int, default=200, help="requests counted (callgrind: N, then 2N)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds without valgrind")
    parser.add_argument("--timed-count", type=int, default=1000, help="requests per timed round")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="pause between stream events")
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    upstream, args.port = start_upstream(args.interval_ms)
    try:
        rows = []
        for case in args.cases.split(","):
            row = {"case": case}
            for client in CLIENTS:
                if not args.no_callgrind:
                    small, _ = run_worker(args, client, case, args.count, True)
                    large, _ = run_worker(args, client, case, 2 * args.count, True)
                    row[client + "_instr"] = (large - small) / args.count
                count = args.timed_count if case != "stream" else max(args.concurrency, args.timed_count // 10)
                times = [run_worker(args, client, case, count, False)[1] / count * 1e6
                         for _ in range(args.rounds)]
                row[client + "_us"] = (statistics.median(times), min(times), max(times))
            rows.append(row)
            report(row)
    finally:
        upstream.terminate()
        upstream.wait(10)
    return 0


def report(row) -> None:
    parts = [f"{row['case']:<11}"]
    for client in CLIENTS:
        if client + "_instr" in row:
            parts.append(f"{client}: {row[client + '_instr'] / 1e3:8.0f} k instr/req")
        median, low, high = row[client + "_us"]
        parts.append(f"{median:7.0f} µs ({low:.0f}-{high:.0f})")
    if "agent_instr" in row:
        parts.append(f"http1/agent instructions: {row['http1_instr'] / row['agent_instr']:.2f}")
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
