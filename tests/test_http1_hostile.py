"""The HTTP/1.1 upstream client (clproxy.proxy.http1) against hostile and broken upstreams, over
real loopback TCP: odd status lines, interim answers, bodiless statuses with a body, ambiguous or
broken framing, cut connections, oversized heads, a response before the request left, a kept-alive
connection closed under the client. An answer that is not what it claims fails with a typed error,
a connection whose answer was not read exactly to its end never serves another request, and the
next request is answered right."""

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from clproxy.proxy.http1 import HTTP1Pool, MalformedResponse
from clproxy.proxy.upstream import UpstreamClient, UpstreamError, _EndpointFactory, read_body
from test_http1 import self_signed, trusting
from test_http1 import Endpoints

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- the hostile server ---------------------------------------------------------------------
class Scripted(protocol.Protocol):
    """One connection of a loopback server that reads each request whole (head, then its
    Content-Length body) and answers it with the next step of ``factory.script``: bytes written
    as they are, or a callable given this protocol (to close, reset, write in parts)."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if self.factory.on_head is not None:  # answers before the body arrived
                self.buffer = b""
                self.factory.on_head(self)
                return
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append((self, head.split(b"\r\n")[0]))
            step = self.factory.script.pop(0)
            if callable(step):
                step(self)
            else:
                self.transport.write(step)


def then_close(raw):
    """A step: write ``raw``, then close the connection (FIN)."""
    def step(server):
        server.transport.write(raw)
        server.transport.loseConnection()
    return step


def then_reset(raw):
    """A step: send ``raw`` on the socket (twisted would drop a buffered write on abort), then
    reset the connection (RST)."""
    def step(server):
        assert server.transport.socket.send(raw) == len(raw)
        server.transport.abortConnection()
    return step


def _listen(tls=None):
    """A Scripted server on a free loopback port (over TLS with certificate ``tls``)."""
    factory = protocol.Factory.forProtocol(Scripted)
    factory.connections, factory.requests, factory.script, factory.on_head = [], [], [], None
    if tls is None:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        factory.url = f"http://127.0.0.1:{port.getHost().port}/v1/messages".encode()
    else:
        port = reactor.listenSSL(0, factory, tls.options(), interface="127.0.0.1")
        factory.url = f"https://localhost:{port.getHost().port}/v1/messages".encode()
    return port, factory


def _stop(port, factory):
    """Reset the server's connections and stop listening."""
    for connection in factory.connections:
        connection.transport.abortConnection()
    return port.stopListening()


@pytest.fixture
def hostile(pool):
    """A scripted loopback server (``script``, ``requests``, ``connections``, ``url``); its
    connections are reset before the client's pool is closed (a test that failed may have left
    one the client waits on)."""
    port, factory = _listen()
    yield factory
    pytest_twisted.blockon(_stop(port, factory))


@pytest.fixture
def pool():
    """The client as the daemon builds it (its endpoints), on the real reactor."""
    http1 = HTTP1Pool(reactor, _EndpointFactory(reactor, 5))
    yield http1
    pytest_twisted.blockon(http1.close())


class Collect(protocol.Protocol):
    """Keeps the body and how it ended (``reason``); ``done`` fires at the end."""

    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason
        self.done.callback(None)


def ask(pool, url, method=b"POST", body=b"{}"):
    """Send one request through ``pool``; fires with the Response."""
    return pool.request(method, url, [(b"content-type", b"application/json")], body)


async def read(response):
    """(body bytes, the Failure it ended with)."""
    body = Collect()
    response.deliverBody(body)
    await body.done
    return body.data, body.reason


async def whole(pool, url, method=b"POST", body=b"{}"):
    """(code, body, end reason) of one request."""
    response = await ask(pool, url, method, body)
    data, reason = await read(response)
    return response.code, data, reason


async def refused(pool, url, method=b"POST"):
    """The Failure the request's Deferred fails with (the test fails if it succeeds)."""
    try:
        response = await ask(pool, url, method)
    except Exception:
        return Failure()
    raise AssertionError(f"answered {response.code}, expected a failure")


async def answered_right_next(pool, hostile, fresh: bool):
    """The next request gets its own answer (on a new connection when ``fresh``), proving the
    connection before it was not left in a state that could poison it."""
    before = len(hostile.connections)
    hostile.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    code, data, reason = await whole(pool, hostile.url)
    assert (code, data) == (200, b"next") and reason.check(ResponseDone)
    assert len(hostile.connections) == before + (1 if fresh else 0)


async def outcome(pool, url):
    """How one request ended: ``(code, body)`` when answered whole, else the Failure of the
    request or of its body (which of the two a reset hits depends on when it arrives)."""
    try:
        response = await ask(pool, url)
    except Exception:
        return Failure()
    data, reason = await read(response)
    return (response.code, data) if reason.check(ResponseDone) else reason


# -- status lines ------------------------------------------------------------------------------
@pytest.mark.parametrize("status,code,phrase", [
    (b"HTTP/1.1 200 OK", 200, b"OK"),
    (b"HTTP/1.1 200", 200, b""),
    (b"HTTP/1.1 200 ", 200, b""),
    (b"HTTP/1.1 529 Site Overloaded", 529, b"Site Overloaded"),
    (b"HTTP/1.1 404 Not  Found ", 404, b"Not  Found "),
])
@pytest_twisted.ensureDeferred
async def test_status_line_variants_are_read(hostile, pool, status, code, phrase):
    """A status line without a reason phrase, or with spaces in it, is read with its code and
    phrase, and the connection serves the next request."""
    hostile.script.append(status + b"\r\nContent-Length: 2\r\n\r\nok")
    response = await ask(pool, hostile.url)
    assert (response.code, response.phrase) == (code, phrase)
    data, reason = await read(response)
    assert data == b"ok" and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=False)


@pytest.mark.parametrize("status", [
    b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 2x0 OK", b"HTTP/1.1 -20 OK", b"HTTP/1.1 +20 OK",
    b"HTTP/1.1  200 OK", b"HTTP/1.1\t200 OK", b"http/1.1 200 OK", b"HTTP/2 200 OK", b"HTTP/1.2 200 OK",
    b"HTTP/1.1", b"", b"200 OK", b" HTTP/1.1 200 OK", b"HTTP/1.1 200\x00 OK", b"\x00\x01\x02",
    b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Below", b"HTTP/1.1 600 Beyond", b"HTTP/1.1 999 Beyond",
])
@pytest_twisted.ensureDeferred
async def test_garbage_status_lines_are_typed_errors(hostile, pool, status):
    """A status line that is not ``HTTP/1.x NNN`` with a code from 100 to 599 fails the request
    with MalformedResponse (a code below 100 is not an interim answer to skip), the connection is
    dropped and the next request is answered on a fresh one."""
    hostile.script.append(status + b"\r\n\r\n" + OK)
    failure = await refused(pool, hostile.url)
    assert failure.check(MalformedResponse) and str(failure.value) == "bad status line"
    await answered_right_next(pool, hostile, fresh=True)


# -- interim answers -----------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_interim_answers_in_separate_writes_then_the_answer(hostile, pool):
    """100 Continue, 102 and 103 Early Hints (with headers, one claiming a body) arriving in
    writes of their own are skipped; the final answer and its body are read, and the connection
    is kept for the next request."""
    def step(server):
        server.transport.write(b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n")
        server.transport.write(b"HTTP/1.1 102 Processing\r\n\r\n")
        server.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        server.transport.write(b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 5\r\n\r\nhello")

    hostile.script.append(step)
    response = await ask(pool, hostile.url)
    assert response.code == 201 and response.headers.getRawHeaders(b"x-final") == [b"yes"]
    assert response.headers.getRawHeaders(b"link") is None
    data, reason = await read(response)
    assert data == b"hello" and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=False)


@pytest_twisted.ensureDeferred
async def test_an_interim_answer_then_close_is_not_an_answer_nor_retried(hostile, pool):
    """A 100 Continue and then the connection closing: the request fails (closed before its
    answer), and, the server having spoken, it is not sent again even on a reused connection."""
    hostile.script += [OK, then_close(b"HTTP/1.1 100 Continue\r\n\r\n")]
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    failure = await refused(pool, hostile.url)
    assert failure.check(error.ConnectionDone)
    assert len(hostile.requests) == 2 and len(hostile.connections) == 1


# -- bodiless answers --------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
])
@pytest_twisted.ensureDeferred
async def test_a_body_after_a_bodiless_status_is_not_read_as_the_next_answer(hostile, pool, raw):
    """204 and 304 have no body whatever they say; bytes after their head drop the connection, so
    they never become the answer to the next request."""
    hostile.script.append(raw)
    code, data, reason = await whole(pool, hostile.url)
    assert data == b"" and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_head_answer_with_a_length_and_no_body_keeps_the_connection(hostile, pool):
    """The answer to HEAD says Content-Length: 20 and sends no body: the body is empty and the
    connection serves the next request at once."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
    response = await ask(pool, hostile.url, method=b"HEAD", body=None)
    assert response.length == 0
    data, reason = await read(response)
    assert data == b"" and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=False)


@pytest_twisted.ensureDeferred
async def test_head_answer_with_a_body_drops_the_connection(hostile, pool):
    """An answer to HEAD that sends a body anyway: the body is not read as the next answer."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    response = await ask(pool, hostile.url, method=b"HEAD", body=None)
    data, reason = await read(response)
    assert data == b"" and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=True)


# -- Content-Length ------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths,body", [
    ([b"5", b"5"], b"hello"),
    ([b"5, 5"], b"hello"),
    ([b"0005"], b"hello"),
    ([b" 5 "], b"hello"),
])
@pytest_twisted.ensureDeferred
async def test_repeated_equal_content_lengths_are_one(hostile, pool, lengths, body):
    """The same Content-Length repeated (in headers or a list) or with leading zeros is that length."""
    head = b"".join(b"Content-Length: " + value + b"\r\n" for value in lengths)
    hostile.script.append(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body)
    code, data, reason = await whole(pool, hostile.url)
    assert (code, data) == (200, body) and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=False)


@pytest.mark.parametrize("head,what", [
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", "conflicting Content-Length headers"),
    (b"Content-Length: 5, 6\r\n", "conflicting Content-Length headers"),
    (b"Content-Length: 5,\r\n", "conflicting Content-Length headers"),
    (b"Content-Length: \r\n", "bad Content-Length"),
    (b"Content-Length: 0x5\r\n", "bad Content-Length"),
    (b"Content-Length: +5\r\n", "bad Content-Length"),
    (b"Content-Length: 5.0\r\n", "bad Content-Length"),
    (b"Content-Length: 1e3\r\n", "bad Content-Length"),
    (b"Content-Length: 9999999999999999999\r\n", "bad Content-Length"),
])
@pytest_twisted.ensureDeferred
async def test_bad_or_conflicting_content_lengths_are_typed_errors(hostile, pool, head, what):
    """A Content-Length that is not one decimal number fails the request, drops the connection,
    and the next request is answered right."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nhello")
    failure = await refused(pool, hostile.url)
    assert failure.check(MalformedResponse) and str(failure.value) == what
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_a_body_longer_than_its_length_does_not_poison_the_next_answer(hostile, pool):
    """A body with more bytes than its Content-Length (here a whole forged answer): the body is
    what was framed and the extra never answers the next request."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_an_answer_on_an_idle_connection_drops_it(hostile, pool):
    """Bytes arriving on an idle kept-alive connection (an unasked 408, a late tail) drop it: the
    next request is answered on a fresh connection, not with those bytes."""
    hostile.script.append(OK)
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    [idle] = [c for conns in pool._idle.values() for c in conns]
    hostile.connections[0].transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
    await idle.closed()
    assert not pool._idle
    await answered_right_next(pool, hostile, fresh=True)


# -- Transfer-Encoding -------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    b"Content-Length: 100\r\nTransfer-Encoding: chunked\r\n",
])
@pytest_twisted.ensureDeferred
async def test_chunked_with_a_content_length_is_read_chunked_and_not_reused(hostile, pool, head):
    """Transfer-Encoding and Content-Length both (a smuggling shape): the body is read as chunked
    (Transfer-Encoding wins), and the connection, whose framing the two disagree on, is not reused."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    code, data, reason = await whole(pool, hostile.url)
    assert (code, data) == (200, b"hello") and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_chunked_in_an_http10_answer_is_not_reused(hostile, pool):
    """HTTP/1.0 has no chunked coding: a 1.0 answer that says it (even with keep-alive) is read
    as chunked, but its connection is not trusted again."""
    hostile.script.append(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n0\r\n\r\n")
    code, data, reason = await whole(pool, hostile.url)
    assert (code, data) == (200, b"hello") and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_with_a_length_is_reused(hostile, pool):
    """An HTTP/1.0 answer with ``Connection: keep-alive`` and a length keeps its connection."""
    hostile.script.append(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    await answered_right_next(pool, hostile, fresh=False)


@pytest_twisted.ensureDeferred
async def test_an_unknown_transfer_coding_is_read_until_the_close(hostile, pool):
    """A last transfer coding other than chunked: the body is what comes until the close, which
    may have lost data (PotentialDataLoss), and the connection is not kept."""
    hostile.script.append(then_close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef"))
    code, data, reason = await whole(pool, hostile.url)
    assert data == b"abcdef" and reason.check(PotentialDataLoss)
    await answered_right_next(pool, hostile, fresh=True)


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("chunks,body", [
    (b"5;name=value;quoted=\"a;b\"\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n", b"0123456789abcdefghij"),
    (b"0000000005\r\nhello\r\n000\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n0\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n", b"hello"),
    (b"5 ;ext\r\nhello\r\n0\r\n\r\n", None),
])
@pytest_twisted.ensureDeferred
async def test_chunked_variants_are_read(hostile, pool, chunks, body):
    """Chunk extensions, upper-case hex, leading zeros and trailers are read and the connection is
    kept (None: twisted refuses the chunk-size line, which is a failure, never a short success)."""
    hostile.script.append(CHUNKED + chunks)
    code, data, reason = await whole(pool, hostile.url)
    if body is None:
        assert not reason.check(ResponseDone, PotentialDataLoss)
        await answered_right_next(pool, hostile, fresh=True)
        return
    assert data == body and reason.check(ResponseDone)
    await answered_right_next(pool, hostile, fresh=False)


@pytest.mark.parametrize("chunks", [
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\r\nhello\r\n5;" + b"e" * 2000 + b"\r\nworld\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 70000 + b"\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
    b"3\r\nhello\r\n0\r\n\r\n",
])
@pytest_twisted.ensureDeferred
async def test_broken_chunked_framing_fails_the_body_and_the_connection(hostile, pool, chunks):
    """A bad chunk size (negative, prefixed, empty), chunk data not followed by CRLF, an oversized
    chunk-size line or trailers, a chunk longer than its size, or bytes after the last chunk: the
    body never ends as complete with something else than what was sent whole, and the connection
    never serves another request."""
    hostile.script.append(CHUNKED + chunks)
    code, data, reason = await whole(pool, hostile.url)
    if reason.check(ResponseDone):  # complete only when the extra came after a whole body
        assert data == b"hello" and chunks.startswith(b"5\r\nhello\r\n0\r\n\r\n")
    else:
        assert not reason.check(PotentialDataLoss)
        assert data in (b"", b"hel", b"hello")
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("chunks,seen", [
    (b"", 0),                               # right after the head
    (b"5\r\nhel", 3),                       # inside a chunk's data
    (b"5\r\nhello", 5),                     # before the CRLF after the data
    (b"5\r\nhello\r\n", 5),                 # between chunks
    (b"5\r\nhello\r\n1", 5),                # inside a chunk-size line
    (b"5\r\nhello\r\n0\r\n", 5),            # after the last chunk, before its blank line
    (b"5\r\nhello\r\n0\r\nX-T: 1\r\n", 5),  # inside the trailers
    (b"5\r\nhello\r\n0\r\n\r", 5),          # one byte short
])
@pytest_twisted.ensureDeferred
async def test_a_chunked_body_cut_anywhere_is_a_failure(hostile, pool, chunks, seen):
    """The connection closing anywhere before the last chunk's blank line: the body ends with a
    failure (never ResponseDone nor PotentialDataLoss), read_body says so in words with the bytes
    seen, and the next request is answered on a fresh connection."""
    hostile.script.append(then_close(CHUNKED + chunks))
    response = await ask(pool, hostile.url)
    with pytest.raises(UpstreamError) as caught:
        await read_body(response, 1000, "up")
    assert caught.value.what == f"up closed the connection after {seen} bytes of the answer's body, before its end"
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("raw", [
    CHUNKED, CHUNKED + b"5\r\nhel", CHUNKED + b"5\r\nhello\r\n0\r\n\r",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n123456789",
    b"HTTP/1.1 200 OK\r\n\r\nno length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r",
])
@pytest_twisted.ensureDeferred
async def test_a_reset_anywhere_is_a_failure(hostile, pool, raw):
    """The connection reset (RST) in the head or the body, whatever the framing (a body without
    length included): the request or its body fails, never a whole answer; the next request is
    answered on a fresh connection."""
    hostile.script.append(then_reset(raw))
    ended = await outcome(pool, hostile.url)
    assert isinstance(ended, Failure) and ended.check(error.ConnectionLost)
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("cut", [0, 1, 9])
@pytest_twisted.ensureDeferred
async def test_a_content_length_body_cut_short_is_a_failure(hostile, pool, cut):
    """Fewer body bytes than Content-Length, then a close: read_body fails with the bytes seen."""
    hostile.script.append(then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * cut))
    response = await ask(pool, hostile.url)
    with pytest.raises(UpstreamError) as caught:
        await read_body(response, 1000, "up")
    assert caught.value.what == f"up closed the connection after {cut} bytes of the answer's body, before its end"
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("raw", [b"H", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK\r\n",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r"])
@pytest_twisted.ensureDeferred
async def test_a_head_cut_short_is_a_failure(hostile, pool, raw):
    """The connection closing inside the head: the request fails, the next is answered."""
    hostile.script.append(then_close(raw))
    failure = await refused(pool, hostile.url)
    assert failure.check(error.ConnectionDone)
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_a_body_without_length_ends_with_the_close(hostile, pool):
    """No Content-Length nor chunked, even with keep-alive: the body is everything until the
    close, which may have lost data (PotentialDataLoss), and the connection is not kept."""
    hostile.script.append(then_close(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nall of it"))
    code, data, reason = await whole(pool, hostile.url)
    assert reason.check(PotentialDataLoss) and data == b"all of it"
    await answered_right_next(pool, hostile, fresh=True)


# -- heads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,header,value", [
    (b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok", b"x-a", [b"1"]),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\nok", b"x-a", [b"1"]),
    (b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\r\nok", b"x-a", [b"1"]),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\t2\r\n  3\r\nContent-Length: 2\r\n\r\nok", b"x-a", [b"1 2 3"]),
    (b"HTTP/1.1 200 OK\r\nX-A:1\r\nx-a:   2  \r\nContent-Length: 2\r\n\r\nok", b"x-a", [b"1", b"2"]),
    (b"HTTP/1.1 200 OK\r\nX-A: \r\nContent-Length: 2\r\n\r\nok", b"x-a", [b""]),
])
@pytest_twisted.ensureDeferred
async def test_tolerated_head_shapes_are_read(hostile, pool, raw, header, value):
    """Lines ending in LF alone (also just before a CRLF blank line), folded lines, no space after
    the colon, empty values: the head is read, its body exactly (the server closes after it, so a
    head never seen complete fails the test instead of hanging it)."""
    hostile.script.append(then_close(raw))
    response = await ask(pool, hostile.url)
    assert response.code == 200 and response.headers.getRawHeaders(header) == value
    data, reason = await read(response)
    assert data == b"ok" and reason.check(ResponseDone)


@pytest.mark.parametrize("line", [
    b"X-A: a\x00b", b"X-\x00A: 1", b"X A: 1", b"X-A : 1", b": 1", b"X-A", b"\x00",
    b"Content-Type: text/event-stream\x00",
])
@pytest_twisted.ensureDeferred
async def test_bad_header_lines_are_typed_errors(hostile, pool, line):
    """A header line that is not ``token: value`` or holds a NUL (which a client parser refuses
    and RFC 9110 calls dangerous) fails the request with MalformedResponse."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n\r\nok")
    failure = await refused(pool, hostile.url)
    assert failure.check(MalformedResponse) and str(failure.value) == "bad header line"
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("size", [65 * 1024, 100 * 1024, 1024 * 1024])
@pytest_twisted.ensureDeferred
async def test_an_oversized_head_is_refused_even_when_complete(hostile, pool, size):
    """A head longer than MAX_HEAD fails the request whether or not its end arrived in the same
    read as the bytes that took it past the limit."""
    hostile.script.append(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 2\r\n\r\nok")
    failure = await refused(pool, hostile.url)
    assert failure.check(MalformedResponse) and str(failure.value) == "response head too long"
    await answered_right_next(pool, hostile, fresh=True)


@pytest_twisted.ensureDeferred
async def test_many_small_headers_within_the_limit_are_read(hostile, pool):
    """Thousands of headers that fit in MAX_HEAD are read (the limit is on bytes)."""
    headers = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(4000))
    hostile.script.append(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")
    response = await ask(pool, hostile.url)
    assert response.headers.getRawHeaders(b"x-3999") == [b"3999"]
    assert (await read(response))[0] == b"ok"
    await answered_right_next(pool, hostile, fresh=False)


@pytest_twisted.ensureDeferred
async def test_thousands_of_interim_answers_in_one_read_are_all_skipped(hostile, pool):
    """Interim answers by the thousand, arriving together with the answer: each is skipped as it
    is read, and the final answer is the one returned."""
    def step(server):
        server.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 20000)
        server.transport.write(OK)

    hostile.script.append(step)
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")


# -- the request and the connection's life ------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_an_answer_before_the_request_was_all_sent_drops_the_connection(hostile, pool):
    """The server answers (413) once it has the head and reads no more: the answer is read whole,
    but the connection, with the rest of the request body still waiting to leave, never serves the
    next request (it would queue behind megabytes the server does not read, or be read by it as a
    request), as twisted's client and curl do."""
    def early(server):
        server.transport.pauseProducing()  # never reads the body
        server.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")

    hostile.on_head = early
    response = await ask(pool, hostile.url, body=b"x" * (16 * 1024 * 1024))
    data, reason = await read(response)
    assert (response.code, data) == (413, b"too big!") and reason.check(ResponseDone)
    assert not pool._idle  # (else the next request would wait behind the unsent body for ever)
    hostile.on_head = None
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # twisted hands pyOpenSSL the certificate
@pytest_twisted.ensureDeferred
async def test_an_answer_before_the_request_was_all_sent_over_tls_drops_the_connection():
    """As over TCP, over TLS (the unsent bytes wait in the TCP connection under the TLS one)."""
    certificate = self_signed("localhost")
    port, hostile = _listen(certificate)
    client = trusting(UpstreamClient(reactor), certificate)
    pool = client.http1
    try:
        def early(server):
            server.transport.pauseProducing()
            server.transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")

        hostile.on_head = early
        response = await ask(pool, hostile.url, body=b"x" * (16 * 1024 * 1024))
        data, reason = await read(response)
        assert (response.code, data) == (413, b"too big!") and reason.check(ResponseDone)
        assert not pool._idle
        hostile.on_head = None
        await answered_right_next(pool, hostile, fresh=True)
    finally:
        await _stop(port, hostile)
        await client.close()


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_the_server_closed_is_not_used(hostile, pool):
    """The server closes a kept-alive connection while it is idle: the client forgets it, and the
    next request goes on a fresh connection, sent once."""
    hostile.script.append(OK)
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    [idle] = [c for conns in pool._idle.values() for c in conns]
    hostile.connections[0].transport.loseConnection()
    await idle.closed()
    assert not pool._idle
    await answered_right_next(pool, hostile, fresh=True)
    assert len(hostile.requests) == 2


def close_unanswered(server):
    """A step: close the connection without a byte of answer (a server's keep-alive timeout
    racing the request)."""
    server.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_post_on_a_reused_connection_closed_unanswered_is_sent_once_more(hostile, pool):
    """What the module promises: a request on a reused connection that closes before any byte of
    answer goes once more on a fresh connection (POST included), and only once: the second
    silent close fails the request."""
    hostile.script += [OK, close_unanswered, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain"]
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    assert (await whole(pool, hostile.url))[:2] == (200, b"again")
    assert [line for _, line in hostile.requests] == [b"POST /v1/messages HTTP/1.1"] * 3
    assert len(hostile.connections) == 2

    hostile.script += [close_unanswered, close_unanswered]
    failure = await refused(pool, hostile.url)
    assert failure.check(error.ConnectionDone)
    assert len(hostile.requests) == 5 and len(hostile.connections) == 3


@pytest.mark.parametrize("close", [then_close, then_reset], ids=["fin", "rst"])
@pytest_twisted.ensureDeferred
async def test_a_reused_connection_cut_after_an_answer_byte_is_not_resent(hostile, pool, close):
    """A reused connection closed or reset after the first bytes of the answer: the request fails
    and is not sent again (the server had started answering it)."""
    hostile.script += [OK, close(b"HTTP/1.1 5")]
    assert (await whole(pool, hostile.url))[:2] == (200, b"ok")
    failure = await refused(pool, hostile.url)
    assert failure.check(error.ConnectionDone, error.ConnectionLost)
    assert len(hostile.requests) == 2
    await answered_right_next(pool, hostile, fresh=True)


@pytest.mark.parametrize("raw", [b"HTTP/1.1 099 No\r\n\r\n" + OK, b"ok\r\n\r\n", b"\r\n\r\n\r\n" + OK])
@pytest_twisted.ensureDeferred
async def test_the_upstream_client_names_a_broken_answer(hostile, raw):
    """Through UpstreamClient: bytes that are not an HTTP/1.1 answer fail in words (the host, not
    the bytes), as the kind ``network``."""
    client = UpstreamClient(reactor)
    try:
        hostile.script.append(raw)
        with pytest.raises(UpstreamError) as caught:
            await client.send(b"POST", hostile.url, Headers(), b"{}", 30, reactor)
        host = hostile.url.split(b"://")[1].split(b"/")[0].decode()
        assert caught.value.kind == "network"
        assert caught.value.what == f"{host} sent an answer that is not valid HTTP/1.1 (bad status line)"
    finally:
        await client.close()


# -- every split of hostile heads (in memory: each split exactly where it is asked for) ----------


SHAPES = [
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\nLink: </a>\n\n"
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n00A\r\n0123456789\r\n0\r\nX-T: t\r\n\r\n",
    b"HTTP/1.1 200 OK\nX-A: 1\n 2\nContent-Length: 15\n\r\nhello0123456789",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\t2\nContent-Length: 15\r\n\nhello0123456789",
]


@pytest.mark.parametrize("raw", SHAPES, ids=["interim-chunked", "lf-then-crlf-end", "crlf-then-lf-end"])
def test_every_split_of_a_tolerated_shape_reads_the_same(raw):
    """Interim answers, bare LF, folding, a blank line of a different ending than the lines before
    it, chunk extensions, upper-case hex with leading zeros, trailers: whatever byte the answer is
    split at, the code, the header and the body are the same, and the connection goes back to the
    pool."""
    for at in range(len(raw) + 1):
        endpoints = Endpoints()
        pool = HTTP1Pool(task.Clock(), endpoints)
        got = []
        pool.request(b"POST", b"http://up/v1/messages", [], b"{}").addBoth(got.append)
        connection = endpoints.connections[0]
        connection.dataReceived(raw[:at])
        connection.dataReceived(raw[at:])
        assert got and not isinstance(got[0], Failure), at
        response = got[0]
        assert response.code == 200 and response.headers.getRawHeaders(b"x-a") == [b"1 2"], at
        body = Collect()
        response.deliverBody(body)
        assert body.data == b"hello0123456789" and body.reason.check(ResponseDone), at
        assert pool._idle[connection.key] == [connection], at
