"""Hostile and unusual client bytes against the one-pass request head (clproxy.http.head).

tests/test_head_parsing.py compares a table of heads with the fast path on and forced off. This
file adds what that table does not reach: stock twisted.web (its own Site and channel, not our
subclass) as the reference for what is refused; reads cut in three around every CR and LF;
seeded random mutations of real requests; the state a client cannot see but the daemon's health
depends on (the transport paused for backpressure and resumed, the idle timeout, a connection
lost mid-head); and the guard that keeps the fast path off for channels it does not fit.
"""

import random
import re

import pytest
from twisted.internet import error, task
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.web import resource, server

from clproxy.http.site import ProxyChannel, ProxySite
from test_head_parsing import CLAUDE, MAX_HEADERS, MAX_SIZE, Echo, chunked, get, many, post, sized_head
from test_head_parsing import fixed_date  # noqa: F401  (fixture)


class Ok(resource.Resource):
    """Answers every request with ``ok`` at once."""

    isLeaf = True

    def render(self, request):
        return b"ok"


def statuses(out: bytes):
    """The status codes written, in order (100 Continue and a 400 included)."""
    return re.findall(rb"HTTP/1\.[01] (\d{3}) ", out)


def answers(chunks, stock: bool):
    """The status codes a client gets for ``chunks``, whether the server closes and any exception
    raised to the reactor: from stock twisted.web (its Site, its channel), or from the daemon's
    ProxySite with the fast path on."""
    clock = task.Clock()
    if stock:
        site = server.Site(Ok(), reactor=clock)
        channel = site.buildProtocol(None)
    else:
        site = ProxySite(Ok())
        channel = site.buildProtocol(None)
        channel.callLater = clock.callLater
        assert channel.fast_head
    transport = StringTransport()
    channel.makeConnection(transport)
    raised = []
    for chunk in chunks:
        try:
            channel.dataReceived(chunk)
        except Exception as e:  # twisted's own: a blank line read after its 400 for a bad request
            # line raises AttributeError (_version); a TCP transport reads nothing after a 400
            raised.append(type(e).__name__)
    return statuses(transport.value()), bool(transport.disconnecting), raised


def drive(chunks, fast, later: bool = False, then=None, channel_class=ProxyChannel):
    """What a ProxyChannel (fast path forced on or off, or as the class has it: None) did with
    ``chunks``, read by read: what it wrote, whether the transport is closing or paused
    (backpressure), its parsing state, the idle timeout, the requests; then ``then(channel, clock)``
    if given, the answers (``later``: after all reads) and the final state. Also the number of
    heads taken in one pass."""
    echo = Echo(later)
    site = ProxySite(echo, max_body_bytes=1000)
    site.protocol = channel_class
    clock = task.Clock()
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    if fast is not None:
        channel.fast_head = fast
    seen = []
    original = channel.requestFactory

    def factory(*args):
        seen.append(original(*args))
        return seen[-1]

    channel.requestFactory = factory
    transport = StringTransport()
    channel.makeConnection(transport)
    trace = []

    def snapshot(what):
        trace.append((what, transport.value(), transport.disconnecting, transport.producerState,
                      channel.line_mode, channel._buffer, list(channel._dataBuffer), channel.persistent,
                      channel._handlingRequest, len(channel.requests),
                      [d.getTime() for d in clock.getDelayedCalls()],
                      [(r.method, r.uri, list(r.requestHeaders.getAllRawHeaders()), r.finished,
                        r._disconnected, _body(r)) for r in seen]))

    for chunk in chunks:
        try:
            channel.dataReceived(chunk)
        except Exception as e:  # an escaping exception is part of what is compared
            trace.append(("raised", repr(e)))
        snapshot("read")
    if then is not None:
        then(channel, clock)
        snapshot("then")
    while echo.pending:
        request, answer = echo.pending.pop(0)
        if not request.finished and not request._disconnected:
            request.write(answer)
            try:
                request.finish()
            except Exception as e:
                trace.append(("raised", repr(e)))
    snapshot("answered")
    return trace, channel.heads_in_one_pass


def _body(request):
    content = request.content
    if content is None or content.closed:
        return "closed" if content else None
    return content.getvalue()


def same(chunks, later=False, then=None):
    """Runs ``chunks`` with the fast path on and forced off, asserts every step the same, and
    returns the heads parsed in one pass."""
    fast, taken = drive(chunks, True, later, then)
    slow, not_taken = drive(chunks, False, later, then)
    assert fast == slow
    assert not_taken == 0
    return taken


def cut_inside_crlf(data):
    """``data`` in reads cut between every CR and the LF after it."""
    cuts = [i + 1 for i in range(len(data) - 1) if data[i:i + 2] == b"\r\n"]
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


#: hostile heads (name, bytes): what stock twisted answers them is the reference
HOSTILE = [
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: a\n\n"),
    ("bare LF after the request line only", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
    ("lone CR line ends", b"GET / HTTP/1.1\rHost: a\r\r"),
    ("lone CR before the blank line", b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n"),
    ("LF CR instead of CR LF", b"GET / HTTP/1.1\n\rHost: a\n\r\n\r"),
    ("obs-fold", get(headers=b"X-A: a\r\n  b\r\n")),
    ("obs-fold on the first header", b"GET / HTTP/1.1\r\n\tX-A: a\r\n\r\n"),
    ("space before colon", get(headers=b"Content-Length : 3\r\n")),
    ("empty name", get(headers=b":x\r\n")),
    ("colon only", get(headers=b":\r\n")),
    ("non-ascii name", get(headers=b"\xc3\xa9: x\r\n")),
    ("NUL in value", get(headers=b"X-A: \x00\r\n")),
    ("NUL in target", get(path=b"/\x00")),
    ("NUL first", b"\x00" + get()),
    ("two blank lines first", b"\r\n\r\n" + get()),
    ("one blank line first", b"\r\n" + get()),
    ("HTTP/0.9 request", b"GET /\r\n\r\n"),
    ("lower-case method", b"post / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"),
    ("absolute-form target", get(path=b"http://evil.example/x")),
    ("content-length twice, equal", post(headers=b"Content-Length: 5\r\n")),
    ("content-length twice, different", post(headers=b"Content-Length: 4\r\n")),
    ("content-length signed", b"POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\nok"),
    ("content-length with inner space", b"POST / HTTP/1.1\r\nContent-Length: 1 1\r\n\r\nok"),
    ("content-length hex", b"POST / HTTP/1.1\r\nContent-Length: 0x2\r\n\r\nok"),
    ("content-length 30 digits", b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\nok"),
    ("content-length then chunked", chunked(headers=b"Content-Length: 3\r\n")),
    ("chunked twice", chunked(headers=b"Transfer-Encoding: chunked\r\n")),
    ("chunked, list", chunked(te=b"chunked, chunked")),
    ("chunked, bad size", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n"),
    ("chunked, size overflow", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n"),
    ("chunked on HTTP/1.0", chunked().replace(b"HTTP/1.1", b"HTTP/1.0") + get()),
    ("expect 100-continue with a refused length", post(headers=b"Expect: 100-continue\r\nContent-Length: 1\r\n")),
    ("head at the size limit", sized_head(MAX_SIZE)),
    ("head one byte over the size limit", sized_head(MAX_SIZE + 1)),
    ("header count at the limit", get(headers=many(MAX_HEADERS))),
    ("header count over the limit", get(headers=many(MAX_HEADERS + 1))),
    ("HTTP/1.0 keep-alive then another", get(version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n") + get()),
    ("pipelined, the second cut short", get() + post() + b"GET /c HTTP/1.1\r\nHo"),
    ("pipelined, the second refused", get() + get(headers=b"X-A: \x00\r\n") + get()),
]


@pytest.mark.parametrize("reads", ["one read", "cut inside every CRLF", "byte by byte"])
@pytest.mark.parametrize("name, data", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_answers_as_stock_twisted(name, data, reads):
    """The daemon's channel (fast path on) answers each hostile head with the statuses stock
    twisted.web gives (200, 400, none...) and closes the connection when stock twisted does,
    whether the head comes in one read, cut between each CR and its LF, or byte by byte."""
    chunks = {"one read": [data], "cut inside every CRLF": cut_inside_crlf(data),
              "byte by byte": [data[i:i + 1] for i in range(len(data))]}[reads]
    assert answers(chunks, stock=False) == answers(chunks, stock=True)


#: inputs whose line ends are cut three ways below (lone CR and LF among them)
LINE_ENDS = [
    get(path=b"/a") + post(b"xy") + b"\r\n" + get(path=b"/b"),
    b"GET / HTTP/1.1\r\nX-A: a\r\rGET / HTTP/1.1\n\n" + get(),
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: t\r\n\r\n" + get(),
]


@pytest.mark.parametrize("later", [False, True], ids=["answered at once", "answered later"])
@pytest.mark.parametrize("data", LINE_ENDS, ids=range(len(LINE_ENDS)))
def test_three_reads_cut_around_every_line_end(data, later):
    """In three reads, each cut just before or just after any CR or LF (inside CRLFs, around a
    lone CR or LF, at a head's end): every step the same with the fast path on and off."""
    cuts = sorted({i + d for i, c in enumerate(data) if c in b"\r\n" for d in (0, 1)} - {0, len(data)})
    for n, first in enumerate(cuts):
        for second in cuts[n + 1:]:
            same([data[:first], data[first:second], data[second:]], later)


MUTATION_SEEDS = [CLAUDE, get() + post(), chunked() + get(), post(headers=b"Expect: 100-continue\r\n"),
                  get(version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n") + get()]
INSERTS = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\r\n ", b"\x00", b" ", b"\t", b":", b"\xff", b"0", b"-"]


@pytest.mark.parametrize("seed", range(4))
def test_random_mutations(seed):
    """Real requests with bytes inserted (CR, LF, NUL, spaces, colons...), deleted or replaced at
    random (a fixed seed), in one read or two: every step the same with the fast path on and off;
    and the fast path was taken for some of them (else this proves nothing)."""
    rng = random.Random(seed)
    taken = 0
    for _ in range(60):
        data = bytearray(rng.choice(MUTATION_SEEDS))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            how = rng.random()
            if how < 0.5:
                data[at:at] = rng.choice(INSERTS)
            elif how < 0.8:
                del data[at:at + rng.randrange(1, 4)]
            else:
                data[at] = rng.randrange(256)
        cut = rng.randrange(1, len(data))
        chunks = [bytes(data)] if rng.random() < 0.5 else [bytes(data[:cut]), bytes(data[cut:])]
        taken += same(chunks, later=rng.random() < 0.5)
    assert taken > 0


def test_backpressure_the_same():
    """Many pipelined requests in one read, answered later: the transport is paused (twisted stops
    reading past its eager-read size) after the read and producing again once all are answered,
    exactly as twisted does it; the fast path took the first head."""
    chunks = [(get() + post(b"x" * 100)) * 150]
    fast, taken = drive(chunks, True, later=True)
    assert fast == drive(chunks, False, later=True)[0]
    assert taken >= 1
    assert fast[0][3] == "paused" and fast[-1][3] == "producing"
    assert fast[-1][1].count(b"HTTP/1.1 200 ") == 300


def test_values_with_other_line_breaks_are_kept():
    """Value bytes that str.splitlines would break at (VT, FF, FS, GS, RS, NEL, U+2028) are not
    line ends for twisted's bytes values: the fast path, which skips twisted's line-end folding
    of values, stores them unchanged, as twisted does."""
    value = b"a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\xe2\x80\xa8h"
    assert same([get(headers=b"X-A: " + value + b"\r\n")]) == 1
    trace, _ = drive([get(headers=b"X-A: " + value + b"\r\n")], True)
    assert (b"X-A", [value]) in trace[-1][-1][0][2]


def _lose(channel, clock):
    channel.connectionLost(failure.Failure(error.ConnectionLost()))


CUT_SHORT = [
    ("mid request line", [b"GET / HT"]),
    ("mid head", [b"GET / HTTP/1.1\r\nHost: a\r\n"]),
    ("inside the last CRLF", [b"GET / HTTP/1.1\r\nHost: a\r\n\r"]),
    ("head whole, body pending", [post(b"hello")[:-3]]),
    ("head whole, chunk pending", [chunked()[:-8]]),
    ("a request, then mid head", [get() + b"POST / HTTP/1.1\r\nContent-Le"]),
]


@pytest.mark.parametrize("later", [False, True], ids=["answered at once", "answered later"])
@pytest.mark.parametrize("name, chunks", CUT_SHORT, ids=[c[0] for c in CUT_SHORT])
def test_connection_lost_mid_request(name, chunks, later):
    """The client goes away mid-head or mid-body: the same steps with the fast path on and off,
    and nothing left behind (no timer, no request still waiting to be answered)."""
    same(chunks, later, then=_lose)
    trace, _ = drive(chunks, True, later, then=_lose)
    assert trace[-1][10] == []  # no delayed call left
    assert all(r[3] or r[4] for r in trace[-1][-1])  # each request finished or disconnected


def test_idle_client_mid_head_times_out():
    """A client that sends a request, then half a head and nothing more (slowloris) is cut off
    by the idle timeout as twisted does it, after the fast path took the first head."""
    def idle(channel, clock):
        clock.advance(channel.timeOut)

    chunks = [get() + b"GET /b HTTP/1.1\r\nHost: a"]
    assert same(chunks, then=idle) == 1
    trace, _ = drive(chunks, True, then=idle)
    assert trace[-1][2]  # the connection is being closed


class NoChunked(ProxyChannel):
    """A channel that refuses chunked request bodies (twisted's way: a 400 from its decoder choice)."""

    def _maybeChooseTransferDecoder(self, header, data):
        if header == b"Transfer-Encoding":
            return self._failChooseTransferDecoder()
        return super()._maybeChooseTransferDecoder(header, data)


class BareLF(ProxyChannel):
    """A channel whose lines end with a bare LF."""

    delimiter = b"\n"


@pytest.mark.parametrize("channel_class, data", [
    (NoChunked, chunked(headers=b"Expect: 100-continue\r\n")),
    (BareLF, get()),
], ids=["its own transfer decoder choice", "another line delimiter"])
def test_a_subclass_the_fast_path_does_not_fit_parses_the_twisted_way(channel_class, data):
    """A channel whose decoder choice can refuse what parse_head accepts, or whose lines end
    otherwise, must not get the fast path: it would go on with a head twisted refused (a 100
    Continue after the 400) or accept one twisted refuses."""
    assert not channel_class.fast_head
    own, taken = drive([data], None, channel_class=channel_class)
    assert taken == 0
    assert own == drive([data], False, channel_class=channel_class)[0]
