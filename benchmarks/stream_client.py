"""Paced-SSE load client for the clproxy benchmark (asyncio, stdlib only).

N workers each hold one keep-alive connection and send streaming ``POST /v1/messages`` requests
back to back (a closed loop), so about N streams are open at any moment. Worker start times are
spread over ``--ramp`` seconds (about one stream's lifetime) so the streams' phases are spread as
they would be in real traffic; after ``--duration`` seconds no new stream starts and the open
ones are drained (bounded by ``--drain-timeout``).

Per stream it records the time to first byte (request written -> first response byte) and, for
every text delta, ``arrival - sent``: the fake upstream writes its ``time.monotonic_ns()`` at the
start of each delta's text, the client takes ``time.monotonic_ns()`` when the bytes completing the
event arrive. A stream is complete when ``message_stop`` arrived on a 200 response.

The response is parsed incrementally: status line and headers, then chunked transfer encoding (or
Content-Length / close-delimited), then SSE events split on blank lines.

Prints one JSON object on stdout (with ``--json``) or a short summary.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
from array import array
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import payload  # noqa: E402

TS_RE = re.compile(rb'"text_delta","text":"(\d+)\|')
STOP = b"event: message_stop"
NS = 1_000_000


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(need, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        sys.stderr.write(f"stream_client: RLIMIT_NOFILE is {soft}, below the {need} needed\n")


class Results:
    def __init__(self):
        self.started = 0
        self.completed = 0
        self.failed = {}  # reason -> count
        self.ttfb = array("q")  # ns
        self.delays = array("q")  # ns
        self.deltas = 0
        self.status = {}

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


# One receive buffer shared by every connection: asyncio's plain Protocol allocates a fresh 256 KiB
# bytes object per read, which glibc may serve with mmap/munmap (page faults on every read) and
# makes the client itself slow and bimodal; BufferedProtocol reads into this buffer instead, and
# data_received copies out only what arrived (the loop is single-threaded, so sharing is safe).
RECV_BUFFER = bytearray(256 * 1024)
RECV_VIEW = memoryview(RECV_BUFFER)


class StreamProtocol(asyncio.BufferedProtocol):
    """One connection; one streaming request at a time."""

    def __init__(self, results: Results, record: bool):
        self.results = results
        self.record = record
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()
        self.done = None  # future of the current request: True complete / str failure reason
        self._reset()

    def _reset(self):
        self.raw = b""  # undecoded bytes
        self.sse = b""  # decoded body not yet split into events
        self.state = "head"
        self.chunk_left = 0
        self.length = None
        self.chunked = False
        self.keep_alive = True
        self.status = 0
        self.t_sent = 0
        self.first = False
        self.stopped = False
        self.count = 0

    # -- request ---------------------------------------------------------------------------
    def send(self, request: bytes):
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.t_sent = time.monotonic_ns()
        self.transport.write(request)
        return self.done

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)
        done = self.done
        if done is not None and not done.done():
            if self.state == "body" and self.length is None and not self.chunked:
                self._body(b"", time.monotonic_ns(), final=True)  # close-delimited body ended
            if not done.done():
                done.set_result("connection closed before message_stop")
        self.transport = None

    def get_buffer(self, sizehint):
        return RECV_VIEW

    def buffer_updated(self, nbytes):
        self.data_received(bytes(RECV_VIEW[:nbytes]))

    def data_received(self, data):
        now = time.monotonic_ns()
        if self.done is None or self.done.done():
            return  # nothing asked: ignore
        if not self.first:
            self.first = True
            if self.record:
                self.results.ttfb.append(now - self.t_sent)
        raw = self.raw + data if self.raw else data
        if self.state == "head":
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                if len(raw) > 65536:
                    self._finish("response headers too large")
                return
            self._head(raw[:end])
            raw = raw[end + 4:]
            self.state = "body"
        if self.chunked:
            self.raw = self._dechunk(raw, now)
        else:
            self.raw = b""
            self._body(raw, now, final=False)

    # -- parsing ---------------------------------------------------------------------------
    def _head(self, head: bytes):
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.status = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value)
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
        status = self.results.status
        status[self.status] = status.get(self.status, 0) + 1

    def _dechunk(self, raw: bytes, now: int) -> bytes:
        pos = 0
        size = len(raw)
        out = []
        while pos < size:
            if self.state == "body":  # expecting a chunk-size line
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    n = int(raw[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self._finish("bad chunk size")
                    return b""
                pos = eol + 2
                if n == 0:
                    self.state = "trailer"
                    continue
                self.chunk_left = n
                self.state = "data"
            elif self.state == "data":
                take = min(self.chunk_left, size - pos)
                out.append(raw[pos:pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if size - pos < 2:
                    break
                pos += 2
                self.state = "body"
            elif self.state == "trailer":
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:  # end of the (empty) trailer: the response is over
                    pos += 2
                    if out:
                        self._body(b"".join(out), now, final=True)
                        out = []
                    else:
                        self._body(b"", now, final=True)
                    return raw[pos:]
                pos = eol + 2
            else:
                break
        if out:
            self._body(b"".join(out), now, final=False)
        return raw[pos:]

    def _body(self, data: bytes, now: int, final: bool):
        sse = self.sse + data if self.sse else data
        if self.length is not None and not self.chunked:
            if len(sse) >= self.length:
                final = True
        cut = sse.rfind(b"\n\n")
        if cut >= 0:
            complete, self.sse = sse[:cut + 2], sse[cut + 2:]
            stamps = TS_RE.findall(complete)
            if stamps:
                self.count += len(stamps)
                if self.record:
                    delays = self.results.delays
                    for stamp in stamps:
                        delays.append(now - int(stamp))
            if STOP in complete:
                self.stopped = True
        else:
            self.sse = sse
        if final:
            self._finish(None)

    def _finish(self, reason):
        done = self.done
        if done is None or done.done():
            return
        if reason is None:
            if self.status != 200:
                reason = f"HTTP {self.status}"
            elif not self.stopped:
                reason = "ended without message_stop"
        if reason is not None:
            self.keep_alive = False
        done.set_result(True if reason is None else reason)


async def worker(index, host, port, request, results, start_at, stop_at, hard_stop, stream_timeout,
                 expect_deltas, record=True, once=False):
    loop = asyncio.get_running_loop()
    delay = start_at - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    proto = None
    try:
        while loop.time() < stop_at:
            if proto is None or proto.transport is None or not proto.keep_alive:
                if proto is not None and proto.transport is not None:
                    proto.transport.close()
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: StreamProtocol(results, record), host, port),
                        timeout=max(0.1, min(10.0, hard_stop - loop.time())))
                except (OSError, asyncio.TimeoutError) as e:
                    if record:
                        results.fail(f"connect: {type(e).__name__}")
                    await asyncio.sleep(0.05)
                    continue
            if record:
                results.started += 1
            done = proto.send(request)
            timeout = max(0.1, min(stream_timeout, hard_stop - loop.time()))
            try:
                outcome = await asyncio.wait_for(asyncio.shield(done), timeout=timeout)
            except asyncio.TimeoutError:
                outcome = "timed out"
                proto.keep_alive = False
            if not record:
                continue
            if outcome is True:
                results.completed += 1
                results.deltas += proto.count
                if proto.count != expect_deltas:
                    results.fail(f"complete with {proto.count} deltas instead of {expect_deltas}")
            else:
                results.fail(outcome)
            if once:
                break
    finally:
        if proto is not None and proto.transport is not None:
            proto.transport.close()


def percentiles(values, points=(50, 90, 99, 99.9)):
    """Nearest-rank percentiles of ``values`` (ns) in milliseconds, plus count, mean and max."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    out = {"count": n, "mean": round(sum(ordered) / n / NS, 3), "min": round(ordered[0] / NS, 3),
           "max": round(ordered[-1] / NS, 3)}
    for p in points:
        rank = max(1, min(n, int(-(-p * n // 100))))  # ceil(p/100 * n)
        out[f"p{p:g}"] = round(ordered[rank - 1] / NS, 3)
    return out


async def run(args):
    url = urlsplit(args.url)
    host, port = url.hostname, url.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("stream_client only talks to the loopback interface")
    path = url.path or "/v1/messages"
    if url.query:
        path += "?" + url.query
    body = payload.build_body(stream=True)
    request = payload.request_bytes(f"{host}:{port}", path, body, stream=True)
    loop = asyncio.get_running_loop()
    results = Results()

    # warm-up: a few streams, not recorded (connections, code paths, the proxy's upstream pool)
    if args.warmup > 0:
        t = loop.time()
        await asyncio.gather(*(worker(i, host, port, request, Results(), t, t + 0.001,
                                      t + args.stream_timeout, args.stream_timeout, args.deltas,
                                      record=False) for i in range(args.warmup)))

    cpu0 = time.process_time()
    t0 = loop.time()
    stop_at = t0 + args.duration
    hard_stop = stop_at + args.drain_timeout
    n = args.concurrency
    if args.once:  # one wave: every worker starts exactly one stream, within the ramp
        stop_at = t0 + args.ramp + 1.0
        hard_stop = stop_at + args.drain_timeout
    tasks = [asyncio.ensure_future(worker(
        i, host, port, request, results, t0 + args.ramp * i / n, stop_at, hard_stop,
        args.stream_timeout, args.deltas, once=args.once)) for i in range(n)]
    pending = set(tasks)
    while pending and loop.time() < hard_stop + 1.0:
        _, pending = await asyncio.wait(pending, timeout=max(0.05, hard_stop + 1.0 - loop.time()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        results.fail("worker cancelled at the hard stop")
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            results.fail(f"worker error: {task.exception()!r}")
    elapsed = loop.time() - t0
    cpu = time.process_time() - cpu0
    return {
        "url": args.url,
        "mode": "wave" if args.once else "sustained",
        "concurrency": n,
        # time.monotonic() seconds (the loop's clock): streams started in [window_start, window_stop)
        "window_start": round(t0, 6),
        "window_stop": round(min(stop_at, t0 + elapsed), 6),
        "ramp_s": args.ramp,
        "streams_per_s": round(results.started / max(1e-9, min(args.duration, elapsed)), 1)
        if not args.once else None,
        "duration_s": round(elapsed, 3),
        "started": results.started,
        "completed": results.completed,
        "incomplete": results.started - results.completed,
        "failures": results.failed,
        "status": {str(k): v for k, v in results.status.items()},
        "deltas_received": results.deltas,
        "deltas_expected_per_stream": args.deltas,
        "ttfb_ms": percentiles(results.ttfb),
        "event_delay_ms": percentiles(results.delays),
        "client_cpu_s": round(cpu, 3),
        "client_cpu_pct": round(100.0 * cpu / elapsed, 1) if elapsed > 0 else None,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:55669/v1/messages")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds during which streams start")
    parser.add_argument("--ramp", type=float, default=1.0, help="spread the workers' first starts")
    parser.add_argument("--warmup", type=int, default=10, help="unrecorded streams first")
    parser.add_argument("--drain-timeout", type=float, default=20.0)
    parser.add_argument("--stream-timeout", type=float, default=30.0)
    parser.add_argument("--deltas", type=int, default=40, help="text deltas the upstream sends")
    parser.add_argument("--once", action="store_true",
                        help="one wave: each worker sends exactly one stream (started within --ramp)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0:
        parser.error("--concurrency and --duration must be positive")
    raise_nofile(args.concurrency + args.warmup + 64)
    out = asyncio.run(run(args))
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        d, t = out["event_delay_ms"], out["ttfb_ms"]
        print(f"{out['completed']}/{out['started']} complete; ttfb p50 {t.get('p50')} ms p99 {t.get('p99')} ms; "
              f"delay p50 {d.get('p50')} ms p99 {d.get('p99')} ms; client cpu {out['client_cpu_pct']}%")
        if out["failures"]:
            print("failures:", out["failures"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
