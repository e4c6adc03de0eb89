"""The streaming fast path: after the first event, an upstream's chunked framing is relayed to an
HTTP/1.1 client as it came (no decoding and re-encoding per event). These tests run the real daemon
over loopback with raw-socket clients, and check that the path was taken, and that it keeps every
guarantee of the decoding path: the same bytes, truncation as an error event in well-formed chunks
and a truncated record, backpressure, a client connection that serves its next request, usage
from the stream's tail, and the upstream connection going back to the pool."""

import json
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task

from clproxy.proxy import upstream as upstream_module
from clproxy.proxy.sse import encode_event
from clproxy.proxy.upstream import ChunkedPassthrough
from clproxy.testing import anthropic as testing
from conftest import accounts_config
from helpers import request_body, until


@pytest.fixture
def passthroughs(monkeypatch):
    """Every ChunkedPassthrough that took over a stream, in order."""
    taken = []
    original = ChunkedPassthrough.replacing.__func__

    def spy(cls, parser, relay, chunked_body):
        made = original(cls, parser, relay, chunked_body)
        if made is not None:
            taken.append(made)
        return made

    monkeypatch.setattr(upstream_module.ChunkedPassthrough, "replacing", classmethod(spy))
    return taken


class RawClient(protocol.Protocol):
    """A raw HTTP/1.1 client on one keep-alive connection: sends requests, keeps every byte."""

    def __init__(self):
        self.data = bytearray()
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed.callback(None)

    def post(self, body: bytes, path: bytes = b"/v1/messages") -> None:
        self.transport.write(b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                             b"x-api-key: c\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


async def connect(proxy, client=None):
    host, port = proxy.service.address()
    client = client or RawClient()
    await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, host, port), client)
    return client


def parse_response(raw: bytes):
    """(status, headers, chunks, rest) of the first chunked response in ``raw``, or None while it
    is incomplete; ``chunks`` is each chunk's payload as the client saw it framed."""
    head, sep, rest = bytes(raw).partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers.get(b"transfer-encoding") == b"chunked"
    chunks = []
    while True:
        size_line, sep, after = rest.partition(b"\r\n")
        if not sep:
            return None
        size = int(size_line.split(b";")[0], 16)  # raises on a malformed size line
        if size == 0:
            if not after.startswith(b"\r\n"):
                return None
            return status, headers, chunks, after[2:]
        if len(after) < size + 2:
            return None
        assert after[size:size + 2] == b"\r\n", "a chunk's data is not followed by CRLF"
        chunks.append(after[:size])
        rest = after[size + 2:]


def error_event_after(chunks, sent: bytes) -> bytes:
    """The client's body is ``sent``, then an SSE error event and nothing else: that event's bytes."""
    body = b"".join(chunks)
    assert body.startswith(sent)
    after = body[len(sent):]
    assert after.startswith(b"event: error\ndata: ") and after.endswith(b"\n\n")
    return after


async def response_of(client):
    await until(lambda: parse_response(client.data) is not None)
    return parse_response(client.data)


@pytest_twisted.ensureDeferred
async def test_paced_stream_is_relayed_with_the_upstreams_framing_byte_for_byte(fake, start_proxy,
                                                                               passthroughs):
    """After the first event each upstream chunk reaches a raw client as it was framed; the body is
    the upstream's events byte for byte, and the same connection then serves a second request."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.text_stream(parts=["a", "b", "c", "d", "e", "f"])
    frames = [encode_event(name, data) for name, data in events]
    fake.script(events=events, pace=0.02, times=1)
    client = await connect(proxy)
    client.post(request_body(stream=True))
    status, headers, chunks, rest = await response_of(client)
    assert status == 200 and headers[b"content-type"].startswith(b"text/event-stream")
    assert len(passthroughs) == 1, "the stream was not relayed on the fast path"
    assert passthroughs[0]._write.__name__ == "write_now"  # sent on the socket when nothing is queued
    assert b"".join(chunks) == b"".join(frames)
    # the fake writes one chunk per event: every event after the first few arrived in its own
    # upstream chunk, relayed with that framing
    assert chunks[-3:] == frames[-3:]
    assert rest == b""
    # keep-alive: the next request on the same client connection is answered in full
    del client.data[:]
    client.post(request_body())
    await until(lambda: b"\r\n\r\n" in client.data and client.data.endswith(b"}"))
    assert client.data.startswith(b"HTTP/1.1 200")
    assert json.loads(bytes(client.data).partition(b"\r\n\r\n")[2])["type"] == "message"
    await until(lambda: not proxy.dispatcher.streams)
    # the upstream connection went back to the pool: one connection served both requests
    assert len({r.client_port for r in fake.requests}) == 1
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_usage_is_recorded_from_the_tail_of_a_relayed_stream(fake, start_proxy, passthroughs, tmp_path):
    """Output tokens of the final message_delta, which only the fast path saw, reach the summary."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.text_stream(parts=["x"] * 5)
    for name, data in events:
        if name == "message_delta":
            data["usage"] = {"output_tokens": 4321}
    fake.script(events=events, pace=0.02, times=1)
    client = await connect(proxy)
    client.post(request_body(stream=True))
    await response_of(client)
    assert len(passthroughs) == 1
    await until(lambda: not proxy.dispatcher.streams)
    [summary] = summaries(proxy, tmp_path)
    assert summary["outputTokens"] == 4321 and summary["truncated"] is False
    client.transport.loseConnection()


def summaries(proxy, tmp_path):
    """The proxy's request summaries (JSONL) so far."""
    obs = getattr(proxy.service, "observability", None)
    if obs is not None:
        obs.flush()
    folder = tmp_path / "home" / "logs"
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("proxy-2") and name.endswith(".jsonl"):
            with open(folder / name, "rb") as f:
                rows.extend(json.loads(line) for line in f)
    return rows


@pytest.mark.parametrize("cut_after", [3, 5])
@pytest_twisted.ensureDeferred
async def test_an_upstream_cut_mid_stream_ends_with_an_error_event_in_well_formed_chunks(
        fake, start_proxy, passthroughs, cut_after, tmp_path):
    """The upstream's connection dropping after the fast path took over: the client gets the events
    so far, then an ``event: error`` and a proper last chunk; the stream counts as truncated."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.text_stream(parts=["p"] * 8)
    frames = [encode_event(name, data) for name, data in events]
    fake.script(events=events, pace=0.02, cut_after=cut_after, times=1)
    client = await connect(proxy)
    client.post(request_body(stream=True))
    status, _headers, chunks, rest = await response_of(client)
    assert status == 200 and rest == b""
    assert len(passthroughs) == 1
    after = error_event_after(chunks, b"".join(frames[:cut_after]))
    assert json.loads(after.split(b"data: ", 1)[1])["type"] == "error"
    await until(lambda: not proxy.dispatcher.streams)
    [summary] = summaries(proxy, tmp_path)
    assert summary["truncated"] is True
    client.transport.loseConnection()


@pytest.mark.parametrize("open_left", [0, 7, 40, 500])
def test_close_completes_the_open_chunk_with_the_error_event(open_left):
    """Mid-chunk, the error event's first bytes (then blank lines) complete the open chunk; what is
    left of it goes through the request's own framing: decoded, the client sees partial + event."""
    written, released = [], []

    class Body:
        write = staticmethod(written.append)

        @staticmethod
        def release():
            released.append(True)

    passthrough = ChunkedPassthrough(None, Body.write, Body.release, lambda rest: None)
    passthrough._left = open_left
    event = b"event: error\ndata: {\"type\":\"error\"}\n\n"
    rest = passthrough.close(event)
    assert released == [True]
    closing = b"".join(written)
    if open_left == 0:
        assert closing == b"" and rest == event
        return
    assert closing.endswith(b"\r\n") and len(closing) == open_left + 2
    filled = closing[:-2]
    assert filled + rest == event + b"\n" * max(0, open_left - len(event))


def test_a_partial_chunk_size_line_is_held_until_its_end():
    """A chunk-size line split across reads is not sent in part; the last chunk is not relayed and
    ends the body (the parser is told, with what followed it)."""
    written, finished, released = [], [], []

    class Relay:
        _chunks = 0
        bytes_relayed = 0
        tail = b""  # the relayed payload's tail, as StreamRelay.tail: no message_stop in it

    passthrough = ChunkedPassthrough(Relay(), written.append, lambda: released.append(True), finished.append)
    passthrough.dataReceived(b"5\r\nhello\r\n1")
    assert b"".join(written) == b"5\r\nhello\r\n"
    passthrough.dataReceived(b"0\r\n0123456789abcdef\r\n0\r")
    assert b"".join(written) == b"5\r\nhello\r\n10\r\n0123456789abcdef\r\n"
    assert finished == [] and released == []
    passthrough.dataReceived(b"\n\r\nNEXT")
    assert finished == [b"NEXT"] and released == [True] and passthrough.done
    assert passthrough.tail() == b"hello0123456789abcdef"
    passthrough.noMoreData()  # complete: no data loss


@pytest.mark.parametrize("whole", [True, False], ids=["message_stop in the tail", "no message_stop"])
def test_the_last_chunk_of_a_whole_stream_leaves_with_its_last_events(whole):
    """A stream whose tail holds its message_stop: the last events and the client's last chunk
    (without the upstream's trailers) in one write, and the framing is not given back (the request
    writes no last chunk of its own). Without it: the events alone, and the framing given back for
    the error event the relay's end adds. The counted bytes are the upstream's relayed data."""
    written, finished, released = [], [], []
    relay = _relay_stub()
    events = b"event: message_stop\ndata: {}\n\n" if whole else b"event: ping\ndata: {}\n\n"
    relay.tail = b"event: message_delta\ndata: {}\n\n" + events
    passthrough = ChunkedPassthrough(relay, written.append, lambda: released.append(True), finished.append)
    data = b"%x\r\n%s\r\n" % (len(events), events)
    passthrough.dataReceived(data + b"0\r\nTrailer: x\r\n\r\n")
    assert passthrough.done and finished == [b""]
    if whole:
        assert written == [data + b"0\r\n\r\n"] and released == []
    else:
        assert written == [data] and released == [True]
    assert relay.bytes_relayed == len(data)


def test_a_body_cut_before_its_last_chunk_is_data_loss():
    """noMoreData before the last chunk raises, so the relay sees the stream as broken off."""
    from twisted.web.http import _DataLoss

    class Relay:
        _chunks = 0
        bytes_relayed = 0
        tail = b""  # the relayed payload's tail, as StreamRelay.tail: no message_stop in it

    passthrough = ChunkedPassthrough(Relay(), lambda data: None, lambda: None, lambda rest: None)
    passthrough.dataReceived(b"5\r\nhel")
    with pytest.raises(_DataLoss):
        passthrough.noMoreData()


@pytest.mark.parametrize("line", [b"zz", b"0x10", b"+5", b" 5", b""])
def test_a_malformed_chunk_size_line_breaks_the_stream(line):
    """A chunk-size line twisted's decoder would refuse is refused here too."""

    class Relay:
        _chunks = 0
        bytes_relayed = 0
        tail = b""  # the relayed payload's tail, as StreamRelay.tail: no message_stop in it

    passthrough = ChunkedPassthrough(Relay(), lambda data: None, lambda: None, lambda rest: None)
    with pytest.raises(ValueError):
        passthrough.dataReceived(line + b"\r\nhello\r\n")


def _relay_stub():
    class Relay:
        _chunks = 0
        bytes_relayed = 0
        tail = b""  # the relayed payload's tail, as StreamRelay.tail: no message_stop in it
    return Relay()


@pytest.mark.parametrize("reads", ["one chunk per read", "two per read", "split at every third byte"])
def test_whole_chunk_reads_and_other_reads_relay_the_same(reads):
    """A stream of 60 events (up to ~2 KB each, a size line with an extension) relays the same
    bytes, keeps the same tail and counts the same bytes whether each read is one whole chunk
    (the usual paced read), two, or pieces that split size lines, data and CRLFs."""
    chunks = []
    for i in range(60):
        payload = (b"data: {\"i\": %d}\n\n" % i) * (1 + (i * 37) % 90)
        size = b"%x" % len(payload) + (b";ext=1" if i == 7 else b"")
        chunks.append(size + b"\r\n" + payload + b"\r\n")
    stream = b"".join(chunks)
    if reads == "one chunk per read":
        pieces = chunks
    elif reads == "two per read":
        pieces = [b"".join(chunks[i:i + 2]) for i in range(0, len(chunks), 2)]
    else:
        pieces = [stream[i:i + 3] for i in range(0, len(stream), 3)]
    written = []
    relay = _relay_stub()
    passthrough = ChunkedPassthrough(relay, written.append, lambda: None, lambda rest: None)
    for piece in pieces:
        passthrough.dataReceived(piece)
    payloads = b"".join(c.split(b"\r\n", 1)[1][:-2] for c in chunks)
    assert b"".join(written) == stream and relay.bytes_relayed == len(stream)
    assert passthrough.tail() == payloads[-2048:]
    assert relay._chunks == len(pieces)
    passthrough.dataReceived(b"0\r\n\r\n")
    assert passthrough.done


def test_whole_chunk_reads_take_the_short_path_and_keep_the_tail(monkeypatch):
    """The usual paced read, one whole chunk or a few (the daemon behind), is relayed without
    the general loop (its size-line parser is never called); the tail still holds the last 2048
    payload bytes, however many reads came, and a read of another shape after it still goes
    through the general loop."""
    from clproxy.proxy import upstream as upstream_module

    general = []
    real = upstream_module._chunk_size
    monkeypatch.setattr(upstream_module, "_chunk_size", lambda line: general.append(line) or real(line))
    written = []
    relay = _relay_stub()
    passthrough = ChunkedPassthrough(relay, written.append, lambda: None, lambda rest: None)
    payloads, read = [], b""
    for i in range(500):
        payload = b"data: {\"i\": %d}\n\n" % i * (1 + i % 7)
        payloads.append(payload)
        read += b"%X\r\n%s\r\n" % (len(payload), payload)
        if i % 4 != 1:  # reads of one chunk, and of two
            passthrough.dataReceived(read)
            read = b""
    assert general == []
    assert passthrough.tail() == b"".join(payloads)[-2048:]
    assert sum(len(piece) for piece in passthrough._tail) <= 4096  # let go of as it goes
    assert relay.bytes_relayed == sum(len(w) for w in written)
    passthrough.dataReceived(b"3;x=1\r\nabc\r\n")  # an extension: the general loop
    assert general == [b"3;x=1"] and passthrough.tail().endswith(b"abc")


@pytest.mark.parametrize("seed", range(20))
def test_reads_of_whole_chunks_relay_as_reads_a_byte_at_a_time(seed):
    """Random streams (sizes in either case, leading zeros, extensions, chunks of 1 byte to 3 KB,
    with or without their last chunk) read in groups of whole chunks (the short path), and the
    same stream read a byte at a time (the general loop only): the same bytes relayed, the same
    tail, the same count, the same end."""
    import random

    rng = random.Random(seed)

    def relay(reads):
        written, finished, relay_ = [], [], _relay_stub()
        passthrough = ChunkedPassthrough(relay_, written.append, lambda: written.append(b"|"), finished.append)
        for read in reads:
            passthrough.dataReceived(read)
        return b"".join(written), passthrough.tail(), relay_.bytes_relayed, passthrough.done, finished

    for _ in range(10):
        chunks = []
        for _ in range(rng.randint(1, 12)):
            n = rng.choice([1, 5, 40, 150, 700, 3000])
            payload = bytes(rng.choice(b"data: {}\n\r") for _ in range(n))
            size = rng.choice([b"%x" % n, b"%X" % n, b"00%x" % n, b"%x;e=1" % n])
            chunks.append(size + b"\r\n" + payload + b"\r\n")
        if rng.random() < 0.5:
            chunks.append(b"0\r\n\r\n")
        grouped, i = [], 0
        while i < len(chunks):
            k = rng.randint(1, 4)
            grouped.append(b"".join(chunks[i:i + k]))
            i += k
        stream = b"".join(chunks)
        assert relay(grouped) == relay([stream[i:i + 1] for i in range(len(stream))])


def test_a_size_line_is_read_once_and_the_memory_is_bounded(monkeypatch):
    """A chunk-size line seen before is not matched and converted again (the usual event sizes
    repeat); a remembered line before broken framing is still refused; at most _MAX_SIZES lines
    are remembered, and a line not remembered is read as before."""
    from clproxy.proxy import upstream as upstream_module

    matched = []
    real = upstream_module._PLAIN_SIZE
    monkeypatch.setattr(upstream_module, "_PLAIN_SIZE", lambda line: matched.append(line) or real(line))
    monkeypatch.setattr(upstream_module, "_SIZES", {})
    monkeypatch.setattr(upstream_module, "_MAX_SIZES", 3)
    written = []
    passthrough = ChunkedPassthrough(_relay_stub(), written.append, lambda: None, lambda rest: None)
    for _ in range(3):
        passthrough.dataReceived(b"5\r\nhello\r\n")
    assert matched == [b"5"] and b"".join(written) == b"5\r\nhello\r\n" * 3
    with pytest.raises(ValueError):
        ChunkedPassthrough(_relay_stub(), written.append, lambda: None, lambda rest: None).dataReceived(
            b"5\r\nhelloXY")
    for n in range(1, 8):
        passthrough.dataReceived(b"%x\r\n%s\r\n" % (n, b"a" * n))
    assert len(upstream_module._SIZES) == 3 and passthrough.tail().endswith(b"a" * 7)


@pytest.mark.parametrize("read", [b"5\r\nhelloXY", b"5\r\nhello\n\n", b"g\r\nhello\r\n"])
def test_a_whole_read_with_broken_framing_is_refused(read):
    """A read shaped like one chunk whose CRLF after the data, or whose size, is wrong is refused
    (its data is not relayed)."""
    written = []
    passthrough = ChunkedPassthrough(_relay_stub(), written.append, lambda: None, lambda rest: None)
    with pytest.raises(ValueError):
        passthrough.dataReceived(read)
    assert b"hello" not in b"".join(written)


class SlowReader(RawClient):
    """A raw client that stops reading once its request is sent, until told to resume."""

    def connectionMade(self):
        # a fixed small receive buffer (no autotuning up to tens of MB) so the stall shows quickly
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.post(request_body(stream=True))
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_pauses_the_upstream_on_the_fast_path(fake, start_proxy,
                                                                                passthroughs):
    """Backpressure on the fast path: a stalled client stops the upstream being read, then the
    whole stream arrives once it reads again."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.text_stream(parts=["z" * 10_000] * 1200)  # ~12 MB
    total = sum(len(encode_event(n, d)) for n, d in events)
    fake.script(events=events, times=1)
    client = await connect(proxy, SlowReader())
    await until(lambda: proxy.dispatcher.streams)
    relay = next(iter(proxy.dispatcher.streams))
    await until(lambda: relay.passthrough is not None)
    last, still = -1, 0
    while still < 15:  # until the relay stalls (no progress across many polls)
        await task.deferLater(reactor, 0.02, lambda: None)
        still = still + 1 if relay.bytes_relayed == last else 0
        last = relay.bytes_relayed
    assert relay.bytes_relayed < total // 2, "the upstream was read although the client was not"
    client.transport.resumeProducing()
    status, _headers, chunks, _rest = await response_of(client)
    body = b"".join(chunks)
    assert status == 200 and len(passthroughs) == 1
    # in order although some writes went straight to the socket and others waited in the buffer
    assert body == b"".join(encode_event(n, d) for n, d in events)
    client.transport.loseConnection()


class ScriptedUpstream(protocol.Protocol):
    """An upstream that answers each whole request with ``reads``: each piece in one write, the
    next after ``gap`` seconds (so that each reaches the proxy as one read of its own)."""

    reads: list = []
    gap = 0.15  # long enough that a busy machine still reads each piece on its own

    def connectionMade(self):
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        if len(body) < length:
            return
        self.buffer = b""
        for i, piece in enumerate(self.reads):
            reactor.callLater(self.gap * i, self.transport.write, piece)


@pytest.fixture
def scripted():
    """A ScriptedUpstream server on a free loopback port (``.url``, ``.script(reads)``)."""

    class Server:
        url = None

        def script(self, reads):
            Answer.reads = list(reads)

    class Answer(ScriptedUpstream):
        pass

    factory = protocol.Factory.forProtocol(Answer)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = Server()
    server.url = f"http://127.0.0.1:{port.getHost().port}"
    yield server
    pytest_twisted.blockon(port.stopListening())


def chunk(frame: bytes) -> bytes:
    """``frame`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture
def client_writes(monkeypatch):
    """How many writes each client connection of the daemon made (each one send on the socket
    when nothing waits in its buffer), counted where clproxy.http.site makes its writers."""
    from clproxy.http import site

    counts = []
    real = site.write_through

    def counting(transport):
        write = real(transport)
        counts.append(0)
        at = len(counts) - 1

        def counted(data):
            counts[at] += 1
            write(data)

        return counted

    monkeypatch.setattr(site, "write_through", counting)
    return counts


def stream_frames(deltas: int):
    """The SSE frames of a whole text stream with ``deltas`` text deltas, message_stop last."""
    events = testing.text_stream(parts=["w%d" % i for i in range(deltas)])
    return [encode_event(name, data) for name, data in events]


@pytest_twisted.ensureDeferred
async def test_the_events_of_one_upstream_read_leave_in_one_send(scripted, start_proxy, passthroughs,
                                                                 client_writes, tmp_path):
    """The read that brings the first event brings several more (the daemon fell behind): they go
    to the client in one write, not one each; then the fast path writes each read whole, and the
    last events leave with the client's last chunk. Same bytes, stream complete."""
    frames = stream_frames(6)  # message_start, block start, 6 deltas, block stop, delta, stop
    first, rest = frames[:6], frames[6:]
    scripted.script([STREAM_HEAD + b"".join(chunk(f) for f in first),
                     b"".join(chunk(f) for f in rest) + b"0\r\n\r\n"])
    proxy = start_proxy(accounts_config(scripted, "one"))
    client = await connect(proxy)
    before = sum(client_writes)
    client.post(request_body(stream=True))
    status, _headers, chunks, tail = await response_of(client)
    assert status == 200 and tail == b""
    assert b"".join(chunks) == b"".join(frames)
    assert len(passthroughs) == 1
    # head and first event; the other five of the first read; the second read with the last chunk
    # (fewer if a stalled machine let both upstream writes into one read; one a chunk was 8)
    assert sum(client_writes) - before <= 3
    await until(lambda: not proxy.dispatcher.streams)
    [summary] = summaries(proxy, tmp_path)
    assert summary["truncated"] is False
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_clean_end_without_message_stop_still_ends_with_an_error_event(scripted, start_proxy,
                                                                                passthroughs, tmp_path):
    """The last chunk arriving with the last events of a stream that never sent message_stop: the
    client's last chunk is not sent with them; the error event comes first, in well-formed chunks."""
    frames = stream_frames(4)[:-1]  # no message_stop
    scripted.script([STREAM_HEAD + chunk(frames[0]),
                     b"".join(chunk(f) for f in frames[1:]) + b"0\r\n\r\n"])
    proxy = start_proxy(accounts_config(scripted, "one"))
    client = await connect(proxy)
    client.post(request_body(stream=True))
    status, _headers, chunks, tail = await response_of(client)
    assert status == 200 and tail == b""
    assert len(passthroughs) == 1
    error_event_after(chunks, b"".join(frames))
    await until(lambda: not proxy.dispatcher.streams)
    [summary] = summaries(proxy, tmp_path)
    assert summary["truncated"] is True
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_events_before_broken_framing_in_the_same_read_reach_the_client_first(
        scripted, start_proxy, passthroughs, tmp_path):
    """A read holding the first events and then a malformed chunk-size line: the events gathered
    from it are written before the error event that ends the stream (well-formed chunks)."""
    frames = stream_frames(4)
    scripted.script([STREAM_HEAD + b"".join(chunk(f) for f in frames[:4]) + b"zz\r\nbroken\r\n"])
    proxy = start_proxy(accounts_config(scripted, "one"))
    client = await connect(proxy)
    client.post(request_body(stream=True))
    status, _headers, chunks, tail = await response_of(client)
    assert status == 200 and tail == b""
    assert b"broken" not in error_event_after(chunks, b"".join(frames[:4]))
    assert not passthroughs  # it broke in the read that committed it, before any switch
    await until(lambda: not proxy.dispatcher.streams)
    [summary] = summaries(proxy, tmp_path)
    assert summary["truncated"] is True
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_an_http10_client_gets_each_upstream_read_in_one_write(scripted, start_proxy, client_writes):
    """Without the fast path (an HTTP/1.0 client: no chunked framing on its side) every upstream
    read is still written in one go however many events it holds, and the body is whole."""
    frames = stream_frames(9)
    reads = [STREAM_HEAD + chunk(frames[0])]
    for start in range(1, len(frames), 4):
        reads.append(b"".join(chunk(f) for f in frames[start:start + 4]))
    reads[-1] += b"0\r\n\r\n"
    scripted.script(reads)
    proxy = start_proxy(accounts_config(scripted, "one"))
    client = await connect(proxy)
    before = sum(client_writes)
    body = request_body(stream=True)
    client.transport.write(b"POST /v1/messages HTTP/1.0\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                           b"x-api-key: c\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await client.closed
    head, _sep, received = bytes(client.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert received == b"".join(frames)
    # one write a read (the first with the head), whatever the number of events in it (fewer if
    # a stalled machine joined reads; one a chunk was 15)
    assert sum(client_writes) - before <= len(reads), client_writes
