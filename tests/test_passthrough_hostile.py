"""The streaming relay against a hostile or unlucky upstream: chunked framing split at every byte,
odd but valid framing, malformed framing, cuts at every point of a chunk, a client that leaves,
silence, and the relay's end-of-stream judgement.

Most tests wire the real pieces in memory (the lean HTTP/1.1 client connection, StreamRelay,
ChunkedPassthrough, the daemon's twisted.web request and ClientResponse) so that each read the
upstream connection gets, and the reactor turn at which the relay switches to passing the framing
through, is chosen exactly; the ones that need the whole daemon run it over loopback.
"""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource, server

from clproxy.errors import error_event
from clproxy.http.site import ClientResponse, ProxySite
from clproxy.observe.recorder import usage_from_sse_tail
from clproxy.proxy.http1 import HTTP1Pool
from clproxy.proxy.sse import SSEParser, encode_event
from clproxy.proxy.upstream import TAIL_BYTES, StreamRelay, _IdleSweeper
from clproxy.testing import anthropic as testing
from conftest import accounts_config
from helpers import in_thread, request_body, sdk, until
from test_chunked_passthrough import RawClient, connect, response_of
from test_http1 import Endpoints

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")


def sse_stream(output_tokens=777):
    """A realistic Anthropic stream (thinking with its signature, a ping, many text deltas) as
    (events, bytes per event), longer than twice the tail kept; its message_delta carries
    ``output_tokens`` and cache usage."""
    events = testing.thinking_stream(thinking="x" * 300)
    deltas = [("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": {"type": "text_delta", "text": " word %d" % i}})
              for i in range(25)]
    events[-3:-3] = deltas
    events.insert(3, ("ping", {"type": "ping"}))
    for name, data in events:
        if name == "message_delta":
            data["usage"] = {"output_tokens": output_tokens, "cache_read_input_tokens": 4242}
    frames = [encode_event(name, data) for name, data in events]
    return events, frames


def chunked(frames, size_format=b"%x"):
    """One upstream chunk per frame (as Anthropic sends them), then the last chunk."""
    return b"".join(size_format % len(f) + b"\r\n" + f + b"\r\n" for f in frames) + b"0\r\n\r\n"


def dechunk_strictly(raw: bytes):
    """(status line, headers, body, complete) of a raw chunked HTTP/1.1 response, raising on any
    framing a strict client would refuse; ``complete``: it ended with its last chunk (nothing after)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, "no response head"
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers.get(b"transfer-encoding") == b"chunked"
    body = []
    while True:
        size_line, sep, after = rest.partition(b"\r\n")
        if not sep:
            assert len(size_line) < 64, "an unterminated chunk-size line"
            return lines[0], headers, b"".join(body), False
        digits = size_line.split(b";", 1)[0]
        assert digits and not digits.strip(b"0123456789abcdefABCDEF"), f"bad chunk size {size_line!r}"
        size = int(digits, 16)
        if size == 0:
            assert after == b"\r\n", f"the last chunk is not followed by exactly CRLF: {after[:40]!r}"
            return lines[0], headers, b"".join(body), True
        if len(after) < size + 2:
            assert len(after) <= size, "chunk data not followed by CRLF"
            body.append(after)
            return lines[0], headers, b"".join(body), False
        assert after[size:size + 2] == b"\r\n", "chunk data not followed by CRLF"
        body.append(after[:size])
        rest = after[size + 2:]


class _Capture(resource.Resource):
    isLeaf = True
    request = None

    def render_POST(self, request):
        self.request = request
        return server.NOT_DONE_YET


class Wired:
    """One streamed answer through the real pieces, in memory: the upstream side is the lean HTTP/1.1
    client's connection (fed with :meth:`feed`), the client side the daemon's request over a
    StringTransport. :meth:`commit` does what the dispatcher's relay step does (start, producer,
    commit with the client's chunked body; at the end the error event when truncated, then finish).
    Time is a ``task.Clock``: :meth:`tick` runs what was scheduled (the switch to passthrough)."""

    def __init__(self, head=HEAD, idle_timeout=20.0):
        self.clock = task.Clock()
        endpoints_ = Endpoints()
        self.pool = HTTP1Pool(self.clock, endpoints_)
        answered = []
        self.pool.request(b"POST", b"http://up.test/v1/messages", [(b"x-api-key", b"k")], b"{}").addBoth(
            answered.append)
        self.upstream = endpoints_.connections[0]
        self.upstream_transport = self.upstream.transport
        capture = _Capture()
        site = ProxySite(capture, max_body_bytes=1 << 20)
        self.channel = site.buildProtocol(None)
        self.channel.callLater = self.clock.callLater
        self.client_transport = StringTransport()
        self.channel.makeConnection(self.client_transport)
        self.channel.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                                  b"content-length: 2\r\n\r\n{}")
        self.out = ClientResponse(capture.request)
        self.upstream.dataReceived(head)
        [self.response] = answered
        self.relay = StreamRelay(self.clock, idle_timeout, "up.test")
        self.response.deliverBody(self.relay)
        self.out.on_disconnect(self.relay.abort)
        self.outcome = None
        self.reads = 0

    def commit(self):
        out = self.out
        out.start(200, [(b"content-type", [b"text/event-stream"])])
        out.register_producer(self.relay.producer())
        self.relay.commit(out.write, out.chunked_body)
        self.relay.done.addCallback(self._ended)

    def commit_on_first_event(self):
        """Commit once the first event arrived, in the same call (as the dispatcher does when
        recording the verdict does not wait): the non-passthrough mode's order."""
        self.relay.first_event.addCallback(lambda _: self.commit())

    def _ended(self, outcome):
        self.outcome = outcome
        self.out.unregister_producer()
        if outcome.truncated:
            self.out.write(error_event(outcome.reason))
        self.out.finish()

    def feed(self, data, tick=True):
        """One read of the upstream connection (then the reactor turn after it, unless told not)."""
        self.reads += 1
        self.upstream.dataReceived(data)
        if tick:
            self.tick()

    def tick(self):
        self.clock.advance(0)

    def lose_upstream(self, reason=None):
        """The upstream connection is lost (as the reactor reports it after a close or an abort)."""
        self.upstream.connectionLost(reason or Failure(error.ConnectionLost("cut")))
        self.tick()

    def client_gone(self):
        self.channel.connectionLost(Failure(error.ConnectionDone("client left")))

    @property
    def raw(self):
        return self.client_transport.value()

    def client_view(self):
        """(body, complete) as a strict HTTP client decodes what was written to it."""
        status, _headers, body, complete = dechunk_strictly(self.raw)
        assert status.startswith(b"HTTP/1.1 200")
        return body, complete


def events_of(body: bytes):
    return SSEParser().feed(body)


# -- every split of a real stream ---------------------------------------------------------------

EVENTS, FRAMES = sse_stream()
PAYLOAD = b"".join(FRAMES)
BODY = chunked(FRAMES)
#: where the first event ends in BODY (the dispatcher commits a stream once it has arrived)
FIRST_EVENT_END = BODY.index(b"\n\n") + 2


def chunk_at(i):
    """Where the i-th chunk (its size line) begins in BODY."""
    return BODY.index(b"%x\r\n" % len(FRAMES[i]) + FRAMES[i])


def _check_whole(wired, payload=PAYLOAD):
    body, complete = wired.client_view()
    assert complete and body == payload
    assert wired.outcome is not None and not wired.outcome.truncated, wired.outcome and wired.outcome.reason
    assert wired.relay.tail == payload[-TAIL_BYTES:]
    assert usage_from_sse_tail(wired.relay.tail).get("output_tokens") == 777
    assert wired.upstream.state == "IDLE"  # the connection went back to the pool


def test_the_stream_is_longer_than_the_tail_and_its_usage_straddles_nothing_by_accident():
    """The fixture itself: longer than the tail kept, and its message_delta is in the tail."""
    assert len(PAYLOAD) > 2 * TAIL_BYTES
    assert len(FRAMES[-1]) + len(FRAMES[-2]) < TAIL_BYTES


@pytest.mark.parametrize("commit_first", [True, False],
                         ids=["committed-before-data (passthrough mode)", "committed-on-the-first-event"])
def test_a_stream_split_in_two_reads_at_every_byte_with_the_switch_there(commit_first):
    """Two reads split at every byte of the chunked body (inside size lines, data, CRLFs, the last
    chunk), the switch to passthrough happening right at the split, whatever state twisted's
    decoder is in then: the client gets the payload byte for byte in well-formed chunks, ended
    once, the stream is complete, its tail and usage are right and the connection is pooled."""
    taken = 0
    states = set()  # twisted's decoder at the switch: its state and how much it held
    for at in range(1, len(BODY)):
        wired = Wired()
        if commit_first:
            wired.commit()
        else:
            wired.commit_on_first_event()
        wired.feed(BODY[:at], tick=False)
        decoder = wired.upstream.bodyDecoder
        if wired.relay.first_event.called or commit_first:
            states.add((decoder.state, min(len(decoder._buffer), 2)))
        wired.tick()
        taken += wired.relay.passthrough is not None
        wired.feed(BODY[at:])
        _check_whole(wired)
    assert taken > len(BODY) * 0.9  # nearly every split did take the fast path
    assert {("CHUNK_LENGTH", 0), ("CHUNK_LENGTH", 1), ("CHUNK_LENGTH", 2), ("BODY", 0), ("CRLF", 0),
            ("CRLF", 1), ("TRAILER", 0), ("TRAILER", 1)} <= states, states


@pytest.mark.parametrize("commit_first", [True, False],
                         ids=["committed-before-data", "committed-on-the-first-event"])
def test_a_stream_read_one_byte_at_a_time_relays_the_same(commit_first):
    """One-byte reads from the first byte on (the switch then happens in a decoder that has just
    delivered one payload byte): same bytes, same tail, complete."""
    wired = Wired()
    wired.commit() if commit_first else wired.commit_on_first_event()
    for i in range(len(BODY)):
        wired.feed(BODY[i:i + 1])
    assert wired.relay.passthrough is not None
    _check_whole(wired)


def test_after_the_switch_at_every_byte_the_rest_arrives_one_byte_at_a_time():
    """The switch at each of the first two chunks' bytes, then the rest of the stream in one-byte
    reads."""
    for at in range(1, BODY.index(FRAMES[2])):
        wired = Wired()
        wired.commit()
        wired.feed(BODY[:at])
        for i in range(at, len(BODY)):
            wired.feed(BODY[i:i + 1], tick=False)
        wired.tick()
        _check_whole(wired)


# -- cut off anywhere ---------------------------------------------------------------------------

def _payload_in(prefix: bytes) -> bytes:
    """The payload bytes a chunked prefix carries (its complete and partial chunks' data)."""
    out, rest = [], prefix
    while True:
        line, sep, after = rest.partition(b"\r\n")
        if not sep:
            return b"".join(out)
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(after[:size])
        if len(after) < size + 2:
            return b"".join(out)
        rest = after[size + 2:]


def _check_cut(wired, prefix: bytes):
    """The client got the payload of ``prefix``, then an ``event: error`` as the last event its SSE
    parser dispatches, every event before it intact, all in well-formed chunks ended once."""
    body, complete = wired.client_view()
    assert complete, "the client's response did not end with a last chunk"
    relayed = _payload_in(prefix)
    assert body.startswith(relayed)
    assert wired.outcome is not None and wired.outcome.truncated
    events = events_of(body)
    assert events and events[-1].name == "error", (
        f"the last event the client's parser sees is {events[-1].name if events else None!r}, not error")
    last_line = events[-1].data.rsplit("\n", 1)[-1]
    assert json.loads(last_line)["type"] == "error"
    originals = [(n, json.dumps(d, separators=(",", ":"))) for n, d in EVENTS]
    for got, (name, data) in zip(events[:-1], originals):
        assert (got.name, got.data) == (name, data), "an event the client saw was garbled"
    assert len(events) - 1 >= relayed.count(b"\n\n")
    assert wired.relay.tail == relayed[-TAIL_BYTES:]


@pytest.mark.parametrize("switch", ["early", "at-the-cut"])
def test_an_upstream_cut_at_every_byte_ends_with_an_error_event_in_well_formed_chunks(switch):
    """The upstream connection lost after each byte of the chunked body from the first event on
    (inside a size line, inside data, between data and its CRLF, inside the last chunk and right
    after it without its final CRLF), on the fast path switched early or right at the cut: the
    client still parses well-formed chunks ending with a last chunk, and its SSE parser sees
    ``event: error`` as the last event (not glued to the event that was cut), with every event
    before it intact."""
    taken = 0
    for at in range(FIRST_EVENT_END, len(BODY)):
        wired = Wired()
        wired.commit_on_first_event()
        if switch == "early" and at > 12:
            wired.feed(BODY[:12])
            wired.feed(BODY[12:at])
        else:
            wired.feed(BODY[:at])
        taken += wired.relay.passthrough is not None
        wired.lose_upstream()
        _check_cut(wired, BODY[:at])
    assert taken > (len(BODY) - FIRST_EVENT_END) * 0.9


def test_a_cut_on_the_decoding_path_mid_event_also_ends_with_a_separate_error_event():
    """Without the fast path (a client that cannot take the framing as it is) the same holds: an
    event cut mid-line does not swallow the error event that follows it."""
    at = BODY.index(b'"text_delta"') + 3
    wired = Wired()
    wired.out.chunked_body = lambda: None
    wired.commit_on_first_event()
    wired.feed(BODY[:at])
    assert wired.relay.passthrough is None
    wired.lose_upstream()
    _check_cut(wired, BODY[:at])


def test_a_last_chunk_without_its_final_crlf_is_not_a_complete_stream():
    """The upstream closing right after ``0\\r\\n`` (or ``0\\r\\n\\r``): not success; the client gets
    the whole payload, then the error event, and a proper end."""
    for cut in (b"0\r\n", b"0\r\n\r"):
        body = BODY[:-5] + cut
        wired = Wired()
        wired.commit_on_first_event()
        wired.feed(body[:40])
        wired.feed(body[40:])
        wired.lose_upstream(Failure(error.ConnectionDone("closed")))
        assert wired.outcome.truncated and "broke off" in wired.outcome.reason
        client, complete = wired.client_view()
        assert complete and client.startswith(PAYLOAD) and events_of(client)[-1].name == "error"


# -- odd and malformed framing: the fast path judges it as twisted's decoder does ---------------

def _with_chunks(frames, sizes=None, ext=b"", last=b"0\r\n\r\n"):
    """The first chunk plain (the fast path takes over after it), every later one with ``sizes``
    (a format for its size) and ``ext`` after its size, then ``last``."""
    sizes = sizes or b"%x"
    first = b"%x\r\n" % len(frames[0]) + frames[0] + b"\r\n"
    return first + b"".join(sizes % len(f) + ext + b"\r\n" + f + b"\r\n" for f in frames[1:]) + last, len(first)


def _relay_through(body, first, path, reads):
    """(truncated, what the client decoded, wired) for ``body`` relayed on ``path`` ("fast":
    the framing passed through after the first chunk; "decoding": twisted's decoder throughout),
    the part after the first chunk arriving in ``reads`` ("chunks": as the upstream framed it;
    "whole": one read; "bytes": one byte per read). The upstream closes after the last read."""
    wired = Wired()
    if path == "decoding":
        wired.out.chunked_body = lambda: None
    wired.commit_on_first_event()
    wired.feed(body[:first])
    assert (wired.relay.passthrough is not None) == (path == "fast")
    rest = body[first:]
    if reads == "whole":
        pieces = [rest]
    elif reads == "bytes":
        pieces = [rest[i:i + 1] for i in range(len(rest))]
    else:
        pieces, at = [], 0
        while at < len(rest):
            end = rest.find(b"\r\n", rest.find(b"\r\n", at) + 2)
            end = len(rest) if end < 0 else end + 2
            pieces.append(rest[at:end])
            at = end
    for piece in pieces:
        if wired.outcome is not None:
            break
        wired.feed(piece, tick=False)
    wired.tick()
    if wired.outcome is None:
        wired.lose_upstream(Failure(error.ConnectionDone("closed")))
    body, complete = wired.client_view()
    assert complete
    return wired.outcome.truncated, body, wired


_LONG_EXT = b";" + b"e" * 1100
ODD_BUT_VALID = {
    "uppercase hex": _with_chunks(FRAMES, sizes=b"%X"),
    "leading zeros past 16 digits": _with_chunks(FRAMES, sizes=b"%024x"),
    "extensions": _with_chunks(FRAMES, ext=b';name=value;flag; q="a b"'),
    "a size line just under twisted's limit": _with_chunks(FRAMES, ext=b";" + b"e" * 1000),
    "trailers": _with_chunks(FRAMES, last=b"0\r\nX-Trailer: yes\r\nAnother: 1\r\n\r\n"),
    "a last chunk with an extension": _with_chunks(FRAMES, last=b"0;end=1\r\n\r\n"),
}
MALFORMED = {
    "a size line over twisted's limit": _with_chunks(FRAMES, ext=_LONG_EXT),
    "a NUL in an extension": _with_chunks(FRAMES, ext=b";a=\x00"),
    "a bare LF in an extension": _with_chunks(FRAMES, ext=b";a\nb"),
    "a DEL in an extension": _with_chunks(FRAMES, ext=b";\x7f"),
    "trailers over 64 KiB": _with_chunks(FRAMES, last=b"0\r\n" + (b"X-T: " + b"t" * 1000 + b"\r\n") * 70 + b"\r\n"),
    "data not followed by CRLF": _with_chunks(FRAMES[:3], last=b"5\r\nhelloXY0\r\n\r\n"),
    "a space after the size": _with_chunks(FRAMES, sizes=b"%x "),
}


@pytest.mark.parametrize("reads", ["chunks", "whole", "bytes"])
@pytest.mark.parametrize("case", sorted(ODD_BUT_VALID))
def test_odd_but_valid_framing_is_relayed_whole_on_the_fast_path(case, reads):
    """Uppercase hex, leading zeros, extensions, long size lines, trailers: valid framing, relayed on
    the fast path as a complete stream with the payload byte for byte, as the decoding path does."""
    body, first = ODD_BUT_VALID[case]
    truncated, client, wired = _relay_through(body, first, "fast", reads)
    assert not truncated, wired.outcome.reason
    assert client == PAYLOAD
    assert (truncated, client) == _relay_through(body, first, "decoding", reads)[:2]
    assert wired.upstream.state == "IDLE"


@pytest.mark.parametrize("reads", ["chunks", "whole", "bytes"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_framing_is_a_broken_stream_on_the_fast_path_as_when_decoding(case, reads):
    """Framing twisted's decoder refuses is refused on the fast path too, however it is split into
    reads: the stream counts as broken off (not a success), the client gets an error event in
    well-formed chunks, the upstream connection is dropped, and before the error event the client
    saw whole events, no more than the decoding path shows (which may add the data of a faulty
    chunk that arrived with its fault: the fast path holds that back)."""
    body, first = MALFORMED[case]
    truncated, client, wired = _relay_through(body, first, "fast", reads)
    assert truncated and "broke off" in wired.outcome.reason, wired.outcome.reason
    assert events_of(client)[-1].name == "error"
    assert wired.upstream_transport.disconnecting
    decoded_truncated, decoded, _ = _relay_through(body, first, "decoding", reads)
    assert decoded_truncated
    before = client[:client.rindex(b"event: error")]
    assert decoded.startswith(before)
    # the tail is what was relayed (before the line end a cut mid-line gets)
    assert before.rstrip(b"\n").endswith(wired.relay.tail.rstrip(b"\n"))


def test_data_after_the_last_chunk_ends_the_stream_whole_and_drops_the_connection():
    """Bytes after the last chunk (in the same read or the next): the stream is complete, the
    client's response ends once, and the connection is not pooled (it cannot be trusted)."""
    for split in (0, 3):
        body, first = _with_chunks(FRAMES, last=b"0\r\n\r\nHTTP/1.1 200 OK\r\n")
        wired = Wired()
        wired.commit_on_first_event()
        wired.feed(body[:first])
        cut = len(body) - split
        wired.feed(body[first:cut])
        if split:
            wired.feed(body[cut:])
        assert not wired.outcome.truncated
        client, complete = wired.client_view()
        assert complete and client == PAYLOAD
        assert wired.upstream_transport.disconnecting and wired.upstream.state == "CLOSED"
        assert not wired.pool._idle


@pytest.mark.parametrize("fault", [b"XY", b"\rX", b"\n"])
def test_a_read_that_turns_malformed_leaves_the_client_with_well_formed_chunks(fault):
    """One read holding whole chunks, then a chunk whose data is not followed by CRLF: the client
    gets the whole chunks before it (not the faulty chunk's data), then the error event, in chunks
    a strict client parses: the state the fast path closes is the one the client has, and the
    tail is what was relayed."""
    bad = b"%x\r\n" % len(FRAMES[3]) + FRAMES[3] + fault
    body = b"".join(b"%x\r\n" % len(f) + f + b"\r\n" for f in FRAMES[:3]) + bad
    first = len(b"%x\r\n" % len(FRAMES[0]) + FRAMES[0] + b"\r\n")
    truncated, client, wired = _relay_through(body + b"\r\n0\r\n\r\n", first, "fast", "whole")
    assert truncated and "broke off" in wired.outcome.reason
    assert client[:client.rindex(b"event: error")] == b"".join(FRAMES[:3])
    assert events_of(client)[-1].name == "error"
    assert wired.relay.tail == b"".join(FRAMES[:3])[-TAIL_BYTES:]


def test_a_chunk_that_began_in_an_earlier_read_and_turns_malformed_is_closed_as_the_client_has_it():
    """A chunk whose size line and first bytes went out in one read, and whose rest arrives with a
    bad CRLF: the client's open chunk is completed (padding), then the error event."""
    frame = FRAMES[3]
    body = b"".join(b"%x\r\n" % len(f) + f + b"\r\n" for f in FRAMES[:3])
    bad = b"%x\r\n" % len(frame) + frame + b"XY"
    wired = Wired()
    wired.commit_on_first_event()
    wired.feed(body)
    wired.feed(bad[:20])
    wired.feed(bad[20:])
    assert wired.outcome.truncated
    client, complete = wired.client_view()
    assert complete and client.startswith(b"".join(FRAMES[:3]) + frame[:20 - len(b"%x\r\n" % len(frame))])
    assert events_of(client)[-1].name == "error"


# -- big chunks ---------------------------------------------------------------------------------

BIG_TEXT = "y" * (1024 * 1024)
BIG_EVENT = encode_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                 "delta": {"type": "text_delta", "text": BIG_TEXT}})
BIG_FRAMES = FRAMES[:6] + [BIG_EVENT] + FRAMES[6:]


def test_a_one_megabyte_event_in_one_chunk_is_relayed_byte_for_byte():
    """A 1 MB event in a single upstream chunk, read 64 KiB at a time on the fast path: the client
    gets every byte, the stream is complete and its usage comes from the tail."""
    body = chunked(BIG_FRAMES)
    wired = Wired()
    wired.commit_on_first_event()
    wired.feed(body[:FIRST_EVENT_END + 2])
    assert wired.relay.passthrough is not None
    for at in range(FIRST_EVENT_END + 2, len(body), 65536):
        wired.feed(body[at:at + 65536])
    _check_whole(wired, b"".join(BIG_FRAMES))


@pytest.mark.parametrize("size_line", [b"%x" % len(BIG_EVENT), b"ffffffffffffffff"])
@pytest.mark.parametrize("switch", ["before the chunk", "inside the chunk"])
def test_a_cut_inside_a_huge_chunk_ends_promptly_with_an_error_event(size_line, switch):
    """The upstream announces a chunk of 1 MB or 2^64-1 bytes and breaks off 200 KB into it,
    the fast path having taken over before that chunk or in the middle of it: the client gets the
    data that came, then the error event, in well-formed chunks, without megabytes (or an
    impossible number) of padding to fill the announced size."""
    head = b"".join(b"%x\r\n" % len(f) + f + b"\r\n" for f in BIG_FRAMES[:6])
    sent_data = BIG_EVENT[:200_000]
    body = head + size_line + b"\r\n" + sent_data
    wired = Wired()
    wired.commit_on_first_event()
    if switch == "before the chunk":
        wired.feed(head)
        wired.feed(body[len(head):])
    else:
        wired.feed(body[:len(head) + 2000])
        wired.feed(body[len(head) + 2000:])
    assert wired.relay.passthrough is not None
    wired.lose_upstream()
    client, complete = wired.client_view()
    assert complete and client.startswith(b"".join(BIG_FRAMES[:6]) + sent_data)
    assert events_of(client)[-1].name == "error"
    assert len(wired.raw) < len(body) + 70_000


# -- silence, a client that leaves, how a stream ended ------------------------------------------

def test_on_the_fast_path_reads_keep_a_stream_alive_and_silence_inside_a_chunk_ends_it_well_formed():
    """The idle watchdog counts the fast path's reads: a stream whose bytes keep coming (one every
    half timeout, inside one big chunk and across chunks) is never cut; once it goes silent inside
    a chunk it is aborted within the bound, and the client gets the chunk completed, the error
    event saying it went silent, and a proper end."""
    wired = Wired(idle_timeout=20.0)
    wired.commit_on_first_event()
    wired.feed(BODY[:FIRST_EVENT_END + 2])
    assert wired.relay.passthrough is not None
    rest = BODY[FIRST_EVENT_END + 2:BODY.index(FRAMES[5]) + 40]
    for i in range(0, len(rest), 7):
        wired.clock.advance(10.0)
        wired.feed(rest[i:i + 7])
        assert not wired.upstream_transport.disconnecting
    silent_since = wired.clock.seconds()
    while not wired.upstream_transport.disconnecting:
        wired.clock.advance(1.0)
        assert wired.clock.seconds() - silent_since <= 20.0 * 1.25
    assert wired.clock.seconds() - silent_since >= 20.0
    wired.lose_upstream(Failure(error.ConnectionAborted()))
    assert wired.outcome.truncated and "went silent" in wired.outcome.reason
    client, complete = wired.client_view()
    assert complete and events_of(client)[-1].name == "error"
    assert wired.clock not in _IdleSweeper._by_clock  # the sweeper let go of it


class _DeadAfterClose(StringTransport):
    """A client transport that, like a TCP one, takes no bytes once the connection is lost."""

    def __init__(self):
        super().__init__()
        self.after_loss = b""
        self.lost = False

    def write(self, data):
        if self.lost:
            self.after_loss += data
            return
        super().write(data)


def test_a_client_that_leaves_mid_chunk_aborts_the_upstream_and_ends_the_relay():
    """The client's connection lost in the middle of a relayed chunk: the upstream connection is
    aborted at once, the relay ends (as the client's going, not an answer), the dispatcher's end
    of the answer raises nothing, and the upstream connection is never pooled."""
    wired = Wired()
    wired.client_transport = _DeadAfterClose()
    wired.channel.transport = wired.client_transport
    wired.commit_on_first_event()
    wired.feed(BODY[:BODY.index(FRAMES[4]) + 30])
    assert wired.relay.passthrough is not None and wired.relay.passthrough._left
    wired.client_transport.lost = True
    wired.client_gone()
    assert wired.upstream_transport.disconnected  # aborted, not closed gracefully
    wired.lose_upstream(Failure(error.ConnectionAborted()))
    assert wired.outcome.truncated and wired.out.disconnected
    assert wired.upstream.state == "CLOSED" and not wired.pool._idle


def _clean_end_after(last_frames):
    """A stream whose upstream ends its body cleanly (the last chunk) after ``last_frames``."""
    frames = FRAMES[:8] + last_frames
    wired = Wired()
    wired.commit_on_first_event()
    wired.feed(chunked(frames))
    return wired


@pytest.mark.parametrize("text", ["message_stop", "event: message_stop", "event: error"])
def test_a_clean_end_after_a_delta_that_mentions_message_stop_is_still_a_truncation(text):
    """The stream is complete only when its last event is message_stop (or an error event), not
    when those words appear in the model's text: a body that ends cleanly right after a delta
    quoting them is a truncation, and the client gets the error event."""
    delta = encode_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                 "delta": {"type": "text_delta", "text": text}})
    wired = _clean_end_after([delta])
    assert wired.outcome.truncated and "before message_stop" in wired.outcome.reason
    client, complete = wired.client_view()
    assert complete and events_of(client)[-1].name == "error"


def test_a_clean_end_after_message_stop_or_an_error_event_is_complete():
    """The two ways a stream really ends: message_stop, or Anthropic's own error event."""
    overloaded = encode_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})
    # SSE lets the space after "event:" out
    terse = FRAMES[-1].replace(b"event: message_stop", b"event:message_stop")
    assert terse != FRAMES[-1]
    for last in ([FRAMES[-2], FRAMES[-1]], [overloaded], [FRAMES[-2], terse]):
        wired = _clean_end_after(last)
        assert not wired.outcome.truncated, wired.outcome.reason


def test_a_tail_window_that_begins_inside_a_quoting_line_is_not_an_end():
    """A stream whose kept tail (the last TAIL_BYTES) begins exactly at the words "event:
    message_stop" inside a delta's text, and that ends cleanly two events later: the words do not
    start a line there, so it is a truncation, not a complete stream."""
    text = "x" * 50 + "event: message_stop"
    delta = encode_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                 "delta": {"type": "text_delta", "text": text}})
    quoted = len(delta) - delta.index(b"event: message_stop")  # bytes from the words to the end
    bare = len(encode_event("ping", {"type": "ping", "fill": ""}))
    filler = encode_event("ping", {"type": "ping", "fill": "f" * (TAIL_BYTES - quoted - bare)})
    assert quoted + len(filler) == TAIL_BYTES
    wired = _clean_end_after([delta, filler])
    assert wired.outcome.truncated and "before message_stop" in wired.outcome.reason


def test_usage_of_a_message_delta_straddling_the_tail_window_and_the_switch_is_recorded():
    """A message_delta that starts outside the tail kept (a long stop sequence) but whose usage is
    inside it, with the switch to the fast path at each of its bytes (part decoded, part passed
    through): the usage read from the relay's tail is the message_delta's, not message_start's."""
    events = [list(e) for e in EVENTS]
    for event in events:
        if event[0] == "message_delta":
            event[1] = {"type": "message_delta",
                        "delta": {"stop_reason": "stop_sequence", "stop_sequence": "#" * 2100},
                        "usage": {"output_tokens": 31337, "cache_read_input_tokens": 99}}
    frames = [encode_event(name, data) for name, data in events]
    body = chunked(frames)
    start = body.index(frames[-2])
    assert len(frames[-2]) + len(frames[-1]) > TAIL_BYTES
    for at in range(start - 4, start + len(frames[-2]) + 4):
        wired = Wired()
        wired.commit_on_first_event()
        wired.feed(body[:at])
        wired.feed(body[at:])
        assert not wired.outcome.truncated
        assert usage_from_sse_tail(wired.relay.tail) == {"output_tokens": 31337, "cache_read_input_tokens": 99}


# -- the whole daemon over loopback -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_in_passthrough_mode_a_stream_ends_and_the_client_gets_its_end(fake, start_proxy):
    """``--passthrough`` commits a stream before its first event: the stream still ends (the
    client's response gets its last chunk, the same connection answers again), complete, with
    every byte; it used to wait for a first event that nobody would ever parse."""
    proxy = start_proxy(accounts_config(fake, "one"), passthrough=True)
    events = testing.text_stream(parts=["a", "b", "c"])
    fake.script(events=events, times=1)
    client = await connect(proxy)
    client.post(request_body(stream=True))
    await until(lambda: b"0\r\n\r\n" in client.data, timeout=5)
    _status, _headers, chunks, rest = await response_of(client)
    assert b"".join(chunks) == b"".join(encode_event(n, d) for n, d in events) and rest == b""
    await until(lambda: not proxy.dispatcher.streams)
    client.transport.loseConnection()


class RawUpstream(protocol.Protocol):
    """One upstream connection whose answer the test writes byte by byte."""

    def __init__(self, server):
        self.server = server
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and self not in self.server.connections:
            self.server.connections.append(self)


class RawServer(protocol.Factory):
    """A loopback upstream that answers nothing by itself."""

    def __init__(self):
        self.connections = []
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def buildProtocol(self, addr):
        return RawUpstream(self)


@pytest.fixture
def raw_server():
    server = RawServer()
    yield server
    pytest_twisted.blockon(defer.maybeDeferred(server.port.stopListening))


async def _streaming_through(raw_server, start_proxy, client):
    """The daemon in front of ``raw_server``; ``client`` has posted a stream; returns (upstream
    connection, relay) once the upstream's head and first two chunks went through."""
    proxy = start_proxy({"accounts": {"anthropic": [{"name": "a", "apiKey": "k", "baseUrl": raw_server.url}]}})
    await connect(proxy, client)
    client.post(request_body(stream=True))
    await until(lambda: raw_server.connections)
    upstream = raw_server.connections[0]
    upstream.transport.write(HEAD + BODY[:chunk_at(2)])
    await until(lambda: FRAMES[1] in client.data)
    [relay] = proxy.dispatcher.streams
    await until(lambda: relay.passthrough is not None)
    return upstream, relay


@pytest_twisted.ensureDeferred
async def test_an_upstream_announcing_an_endless_chunk_then_breaking_off_gets_the_client_an_error(
        raw_server, start_proxy):
    """Over loopback: after the fast path took over, the upstream announces a chunk of 2^64-1 bytes,
    sends 100 KB of it and closes: the client's response ends with the error event in well-formed
    chunks (not hung in the middle of an endless chunk, nor sent its padding)."""
    client = RawClient()
    upstream, relay = await _streaming_through(raw_server, start_proxy, client)
    upstream.transport.write(b"ffffffffffffffff\r\n" + b"data: " + b"z" * 100_000)
    upstream.transport.loseConnection()
    await until(lambda: bytes(client.data).endswith(b"\r\n0\r\n\r\n"), timeout=5)
    _status, _headers, body, complete = dechunk_strictly(bytes(client.data))
    assert complete and body.startswith(b"".join(FRAMES[:2]) + b"data: zzz")
    assert events_of(body)[-1].name == "error"
    assert len(client.data) < 200_000
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_the_sdk_sees_an_api_error_when_the_upstream_breaks_off_inside_an_event(raw_server, start_proxy):
    """Over loopback, with the anthropic SDK as the client: the upstream breaks off inside a
    content_block_delta's data line on the fast path; the SDK gets the events before it, then
    raises an API error (it saw the error event), not a JSON decoding error of a glued event."""
    import anthropic
    proxy = start_proxy({"accounts": {"anthropic": [{"name": "a", "apiKey": "k", "baseUrl": raw_server.url}]}})
    client = sdk(proxy, timeout=20)
    seen, raised = [], []

    def consume():
        try:
            for event in client.messages.create(model="claude-sonnet-4-5", max_tokens=64, stream=True,
                                                messages=[{"role": "user", "content": "hi"}]):
                seen.append(event.type)
        except Exception as e:  # what the SDK raises is what is asserted
            raised.append(e)

    running = in_thread(consume)
    await until(lambda: raw_server.connections)
    upstream = raw_server.connections[0]
    upstream.transport.write(HEAD + BODY[:chunk_at(2)])
    await until(lambda: proxy.dispatcher.streams)
    [relay] = proxy.dispatcher.streams
    await until(lambda: relay.passthrough is not None)
    cut = BODY.index(FRAMES[4]) + FRAMES[4].index(b"data: ") + 30
    upstream.transport.write(BODY[chunk_at(2):cut])
    upstream.transport.loseConnection()
    await running
    assert seen[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert raised and isinstance(raised[0], anthropic.APIError), repr(raised)


@pytest.mark.parametrize("fault", [[b"XY"], [b"\r", b"X"], [b"\rX"]])
def test_a_huge_chunk_whose_crlf_is_wrong_leaves_the_client_with_well_formed_chunks(fault):
    """A 1 MB chunk (relayed in chunks of the proxy's own) whose data is followed by something
    else than CRLF, in one read or two: the stream is broken off and the client's chunks stay
    well formed (nothing of the upstream's CRLF, nor a stray line end, is added)."""
    head = b"".join(b"%x\r\n" % len(f) + f + b"\r\n" for f in BIG_FRAMES[:6])
    body = head + b"%x\r\n" % len(BIG_EVENT) + BIG_EVENT
    wired = Wired()
    wired.commit_on_first_event()
    wired.feed(head)
    wired.feed(body[len(head):])
    for piece in fault:
        wired.feed(piece)
    assert wired.outcome.truncated and "broke off" in wired.outcome.reason
    client, complete = wired.client_view()
    assert complete and client.startswith(b"".join(BIG_FRAMES[:7]))
    assert events_of(client)[-1].name == "error"


def _with_start_usage(usage):
    """The frames of the realistic stream, its message_start carrying ``usage``."""
    events, _ = sse_stream()
    name, data = events[0]
    data = json.loads(json.dumps(data))
    data["message"]["usage"] = usage
    return [encode_event(name, data)] + [encode_event(n, d) for n, d in events[1:]]


@pytest.mark.parametrize("when", ["before-commit", "after-commit-in-pieces"])
@pytest_twisted.ensureDeferred
async def test_in_passthrough_mode_a_long_streams_input_and_cache_tokens_are_recorded(
        raw_server, start_proxy, tmp_path, when):
    """``--passthrough`` commits a stream before its first event, and nothing waited for that
    event: the input and cache counts, which only message_start holds, were lost once it fell out
    of the tail. Its first event is now read as it passes (also when it arrives after the commit,
    split over reads), the upstream's framing is relayed as it came only after it, and the usage
    ledger's row has message_start's counts merged with message_delta's."""
    from clproxy.team import usage as usage_ledger
    start_usage = {"input_tokens": 1234, "output_tokens": 1, "cache_creation_input_tokens": 3000,
                   "cache_read_input_tokens": 0}
    frames = _with_start_usage(start_usage)
    body = chunked(frames)
    assert len(b"".join(frames[1:])) > 2 * TAIL_BYTES  # message_start is far outside the tail
    proxy = start_proxy({"accounts": {"anthropic": [{"name": "a", "apiKey": "k", "baseUrl": raw_server.url}]}},
                        passthrough=True)
    client = RawClient()
    await connect(proxy, client)
    client.post(request_body(stream=True))
    await until(lambda: raw_server.connections)
    upstream = raw_server.connections[0]
    third = body.index(b"%x\r\n" % len(frames[2]) + frames[2])
    if when == "before-commit":
        upstream.transport.write(HEAD + body[:third])
    else:
        upstream.transport.write(HEAD)
        await until(lambda: proxy.dispatcher.streams)  # committed with no event yet
        first_end = body.index(b"\n\n") + 2
        for start, end in ((0, 7), (7, first_end - 20), (first_end - 20, third)):
            upstream.transport.write(body[start:end])
            await until(lambda: b"\r\n\r\n" in client.data)
    await until(lambda: proxy.dispatcher.streams)
    [relay] = proxy.dispatcher.streams
    await until(lambda: relay.passthrough is not None)  # the fast path took over after the first event
    upstream.transport.write(body[third:])
    await until(lambda: bytes(client.data).endswith(b"\r\n0\r\n\r\n"), timeout=5)
    _status, _headers, payload, complete = dechunk_strictly(bytes(client.data))
    assert complete and payload == b"".join(frames)
    await until(lambda: not proxy.dispatcher.streams)
    client.transport.loseConnection()
    await proxy.service.stopService()
    connection = usage_ledger.connect(usage_ledger.ledger_path(str(tmp_path / "home")), create=False)
    try:
        rows = connection.execute("SELECT input_tokens, output_tokens, cache_creation_5m, "
                                  "cache_read_input_tokens FROM usage").fetchall()
    finally:
        connection.close()
    assert rows == [(1234, 777, 3000, 4242)]
