"""A fast fake Anthropic upstream for the load benchmark (asyncio, stdlib only).

HTTP/1.1 with keep-alive and pipelining, minimal parsing (request line, headers, a Content-Length
body). ``POST /v1/messages`` answers with a fixed ~600-byte JSON message, or, when the body says
``"stream": true``, with a paced SSE stream over chunked transfer encoding: message_start,
content_block_start and ping at once, then ``--deltas`` text deltas ``--interval-ms`` apart, then
content_block_stop, message_delta and message_stop (in the same write as the last delta) and the
terminal chunk; the connection stays open for the next request.

Each delta's text starts with the upstream's ``time.monotonic_ns()`` at the moment of the write and
a ``|``; ``CLOCK_MONOTONIC`` is system-wide on Linux, so a client on the same machine measures the
per-event delay as its arrival time minus that number.

``GET /health`` answers 200; anything else 404. Run: ``python benchmarks/upstream.py --port 0``;
it prints ``READY <port>`` once listening and runs until SIGTERM/SIGINT.
"""

import argparse
import asyncio
import json
import re
import resource
import signal
import sys
import time

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": (
        "The weight table is rebuilt on every call of compute_value; I moved it to module level and "
        "cached it with functools.lru_cache, which removes the quadratic step the benchmark was "
        "hitting. The three callers keep their signatures, and the existing tests pass unchanged.")}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 5123, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 4870, "output_tokens": 78,
              "service_tier": "standard"},
}


def _response(status: bytes, headers, body: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status] + [k + b": " + v for k, v in headers]
    lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_COMMON = [(b"request-id", b"req_011CTbenchFakeUpstream00001"),
           (b"anthropic-organization-id", b"00000000-0000-4000-8000-000000000000"),
           (b"via", b"1.1 google"), (b"cf-cache-status", b"DYNAMIC")]
MESSAGE_BODY = json.dumps(MESSAGE, separators=(",", ":")).encode()
MESSAGE_RESPONSE = _response(b"200 OK", [(b"content-type", b"application/json")] + _COMMON,
                             MESSAGE_BODY)
MESSAGE_RESPONSE_CLOSE = MESSAGE_RESPONSE.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
HEALTH_RESPONSE = _response(b"200 OK", [(b"content-type", b"application/json")], b'{"status":"ok"}')
NOT_FOUND = _response(b"404 Not Found", [(b"content-type", b"application/json")],
                      b'{"type":"error","error":{"type":"not_found_error","message":"not found"}}')
BAD_REQUEST = _response(b"400 Bad Request", [(b"content-type", b"application/json"),
                                             (b"connection", b"close")],
                        b'{"type":"error","error":{"type":"invalid_request_error","message":"bad request"}}')

STREAM_HEAD = b"\r\n".join(
    [b"HTTP/1.1 200 OK", b"content-type: text/event-stream; charset=utf-8",
     b"cache-control: no-cache", b"transfer-encoding: chunked"]
    + [k + b": " + v for k, v in _COMMON]) + b"\r\n\r\n"


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


START = _event("message_start", {"type": "message_start", "message": {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "content": [],
    "model": "claude-sonnet-4-5-20250929", "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 5123, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4870,
              "output_tokens": 1, "service_tier": "standard"}}}) + _event(
    "content_block_start", {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}) + _event("ping", {"type": "ping"})
DELTA_PREFIX = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'
DELTA_SUFFIX = b'| cached the weight table"}}\n\n'
END = _event("content_block_stop", {"type": "content_block_stop", "index": 0}) + _event(
    "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"output_tokens": 78}}) + _event("message_stop", {"type": "message_stop"})
END_CHUNKS = _chunk(END) + b"0\r\n\r\n"


# One receive buffer shared by every connection (the loop is single-threaded): asyncio's plain
# Protocol allocates a fresh 256 KiB bytes object per read, which glibc may serve with mmap/munmap,
# a page-fault storm that made the fake upstream slow and erratic under load.
RECV_BUFFER = bytearray(256 * 1024)
RECV_VIEW = memoryview(RECV_BUFFER)


class Upstream(asyncio.BufferedProtocol):
    """One client connection: parse requests, answer each in order."""

    deltas = 40
    interval = 0.020

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.buffer = b""
        self.streaming = False  # a stream is being paced; later (pipelined) requests wait
        self.close_after = False
        self.timer = None
        self.sent = 0
        self.t0 = 0.0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections += 1

    def connection_lost(self, exc):
        self.server.connections -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def get_buffer(self, sizehint):
        return RECV_VIEW

    def buffer_updated(self, nbytes):
        self.data_received(bytes(RECV_VIEW[:nbytes]))

    def data_received(self, data):
        self.buffer = self.buffer + data if self.buffer else data
        if not self.streaming:
            self._process()

    def _process(self):
        while self.transport is not None and not self.streaming:
            buffer = self.buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    self._fail()
                return
            head = buffer[:end]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self._fail()
                return
            method, target = parts[0], parts[1]
            length = 0
            close = parts[2] == b"HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lower = name.strip().lower()
                if lower == b"content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        self._fail()
                        return
                elif lower == b"connection":
                    value = value.strip().lower()
                    close = value == b"close" or (close and value != b"keep-alive")
                elif lower == b"transfer-encoding":
                    self._fail()  # chunked requests are not needed here
                    return
            if length > MAX_BODY_BYTES:
                self._fail()
                return
            start = end + 4
            if len(buffer) - start < length:
                return  # wait for the rest of the body
            body = buffer[start:start + length]
            self.buffer = buffer[start + length:]
            self.close_after = close
            self.server.requests += 1
            path = target.split(b"?", 1)[0]
            if method == b"POST" and path == b"/v1/messages":
                if STREAM_RE.search(body):
                    self._start_stream()
                    return
                self.transport.write(MESSAGE_RESPONSE_CLOSE if close else MESSAGE_RESPONSE)
            elif method == b"GET" and path == b"/health":
                self.transport.write(HEALTH_RESPONSE)
            else:
                self.transport.write(NOT_FOUND)
            if close:
                self.transport.close()
                return

    def _fail(self):
        self.transport.write(BAD_REQUEST)
        self.transport.close()

    # -- the paced stream: one timer per stream, absolute deadlines (no drift) ---------------
    def _start_stream(self):
        self.streaming = True
        self.server.streams += 1
        self.sent = 0
        self.t0 = self.loop.time()
        self.transport.write(STREAM_HEAD + _chunk(START))
        self.timer = self.loop.call_at(self.t0 + self.interval, self._tick)

    def _tick(self):
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        self.sent += 1
        payload = DELTA_PREFIX + str(time.monotonic_ns()).encode() + DELTA_SUFFIX
        if self.sent < self.deltas:
            transport.write(_chunk(payload))
            self.timer = self.loop.call_at(self.t0 + (self.sent + 1) * self.interval, self._tick)
            return
        transport.write(_chunk(payload) + END_CHUNKS)
        self.streaming = False
        self.server.streams_done += 1
        if self.close_after:
            transport.close()
            return
        if self.buffer:
            self._process()


class Server:
    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.streams = 0
        self.streams_done = 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def serve(host: str, port: int, deltas: int, interval_ms: float):
    Upstream.deltas = max(1, deltas)
    Upstream.interval = interval_ms / 1000.0
    loop = asyncio.get_running_loop()
    state = Server()
    server = await loop.create_server(lambda: Upstream(state), host, port, backlog=4096,
                                      reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        await stop
    finally:
        server.close()
        sys.stderr.write(f"upstream: {state.requests} requests, {state.streams} streams started, "
                         f"{state.streams_done} finished\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--deltas", type=int, default=40, help="text deltas per stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="pause between deltas")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake upstream only listens on the loopback interface")
    raise_nofile()
    try:
        asyncio.run(serve(args.host, args.port, args.deltas, args.interval_ms))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
