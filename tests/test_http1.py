"""The lean HTTP/1.1 upstream client (clproxy.proxy.http1): its parser on an in-memory transport
(every split of a response, chunked extensions and trailers, 1xx, bodiless statuses, malformed
answers as typed errors, cut bodies, connection: close, backpressure, cancellation), and its pool
over a real loopback server (reuse, concurrency, a connection the server closed)."""

import gc

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers, InvalidHeaderName
from twisted.web.iweb import UNKNOWN_LENGTH

from clproxy.proxy.http1 import HTTP1Pool, MalformedResponse, _Target, split_url
from clproxy.proxy.upstream import UpstreamClient, UpstreamError, read_body


class Endpoints:
    """Every URL "connects" at once to a fresh in-memory transport."""

    def __init__(self):
        self.connections = []

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        connection = factory.buildProtocol(None)
        connection.makeConnection(StringTransport())
        self.connections.append(connection)
        return defer.succeed(connection)


class Body(protocol.Protocol):
    """Keeps the body and how it ended."""

    def __init__(self):
        self.data = b""
        self.reason = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason


def exchange(raw_parts, method=b"POST", body=b"{}"):
    """Send one request over a fresh in-memory connection, feed the answer in ``raw_parts``;
    returns (pool, connection, the request's Deferred)."""
    endpoints = Endpoints()
    pool = HTTP1Pool(task.Clock(), endpoints)
    d = pool.request(method, b"http://up.example:8080/v1/messages?beta=true", Headers({b"x-a": [b"1"]}), body)
    connection = endpoints.connections[0]
    for part in raw_parts:
        connection.dataReceived(part)
    return pool, connection, d


def answer_of(raw_parts, **kwargs):
    """(response, Body, connection, pool) once ``raw_parts`` were fed."""
    pool, connection, d = exchange(raw_parts, **kwargs)
    results = []
    d.addBoth(results.append)
    response = results[0]
    if isinstance(response, Failure):
        response.raiseException()
    body = Body()
    response.deliverBody(body)
    return response, body, connection, pool


SIMPLE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
          b"X-Multi: a\r\nx-multi: b\r\n\r\n{\"ok\":true}")
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-One: x\r\n\r\n")


def test_request_is_one_write_with_host_and_length():
    """The request head and body leave in one write: Host, the caller's headers, Content-Length."""
    _pool, connection, _d = exchange([])
    sent = connection.transport.value()
    assert sent == (b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: up.example:8080\r\nX-A: 1\r\n"
                    b"Content-Length: 2\r\n\r\n{}")


def test_the_callers_framing_headers_are_not_sent():
    """Content-Length and Transfer-Encoding come from the client itself, never twice."""
    endpoints = Endpoints()
    HTTP1Pool(task.Clock(), endpoints).request(
        b"POST", b"https://h/p", Headers({b"content-length": [b"99"], b"host": [b"h2"]}), b"abc")
    assert endpoints.connections[0].transport.value() == (
        b"POST /p HTTP/1.1\r\nHost: h2\r\nContent-Length: 3\r\n\r\nabc")


def sent_with_pairs(pairs, body=b"abc", url=b"https://h/p"):
    """What the client writes for a request whose headers are ``(name, value)`` pairs."""
    endpoints = Endpoints()
    HTTP1Pool(task.Clock(), endpoints).request(b"POST", url, pairs, body)
    return endpoints.connections[0].transport.value()


def test_pairs_are_written_in_their_order_and_case():
    """Pairs (what shaping gives) go out as they are, after Host, before Content-Length."""
    assert sent_with_pairs([(b"x-b", b"2"), (b"X-A", b"1"), (b"x-b", b"3")]) == (
        b"POST /p HTTP/1.1\r\nHost: h\r\nx-b: 2\r\nX-A: 1\r\nx-b: 3\r\nContent-Length: 3\r\n\r\nabc")


def test_pairs_framing_dropped_and_the_callers_host_kept_in_place():
    """As with Headers: the caller's framing headers are not sent, its Host replaces the URL's."""
    assert sent_with_pairs([(b"x-a", b"1"), (b"Content-Length", b"99"), (b"transfer-encoding", b"chunked"),
                            (b"connection", b"close"), (b"HOST", b"h2"), (b"host", b"h3")]) == (
        b"POST /p HTTP/1.1\r\nx-a: 1\r\nHOST: h2\r\nhost: h3\r\nContent-Length: 3\r\n\r\nabc")
    assert sent_with_pairs([], body=None) == b"POST /p HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize("pairs", [
    [(b"x-a", b"1\r\nx-injected: yes")],
    [(b"x-a", b"1\nx-injected: yes")],
    [(b"x-a", b"1\rx-injected: yes")],
    [("x-a", "1\r\nx-injected: yes")],
    [("x-text", "caf\u00e9"), (b"x-a", b"1")],
])
def test_pairs_with_line_breaks_or_text_cannot_add_a_header(pairs):
    """A CR or LF in a name or value, or text in place of bytes, goes through Headers: encoded,
    line breaks folded into spaces, so the head has exactly its own lines."""
    sent = sent_with_pairs(pairs)
    head, _, body = sent.partition(b"\r\n\r\n")
    assert body == b"abc"
    lines = head.split(b"\r\n")
    assert not any(line.lower().startswith(b"x-injected") for line in lines)
    assert b"\n" not in head.replace(b"\r\n", b"") and b"\r" not in head.replace(b"\r\n", b"")
    assert lines[1] == b"Host: h" and lines[-1] == b"Content-Length: 3"
    assert len(lines) == 2 + len(pairs) + 1


@pytest.mark.parametrize("name", [b"x-a\r\nx-injected", b"x a", b"x-a:", b"", b"x-\xe9"])
def test_a_pair_whose_name_is_not_a_token_is_refused_as_headers_refuses_it(name):
    """A name that is not a token (a plugin's mistake: a line break, a space, a colon, nothing)
    is never written: Headers refuses it, as it did before pairs were written directly."""
    with pytest.raises(InvalidHeaderName):
        sent_with_pairs([(b"x-ok", b"1"), (name, b"yes")])


def test_split_url():
    """Scheme, host, port, Host header and path; userinfo is never kept."""
    assert split_url(b"https://user:pw@api.example.com/v1/x?y=1") == (
        b"https", b"api.example.com", 443, b"api.example.com", b"/v1/x?y=1")
    assert split_url(b"http://[::1]:8080") == (b"http", b"::1", 8080, b"[::1]:8080", b"/")
    with pytest.raises(ValueError):
        split_url(b"ftp://x/")


def test_a_url_is_split_once_and_a_refused_one_every_time(monkeypatch):
    """The pool splits a URL it has seen before from its memory (the same parts), refuses a bad
    one on every request (never remembered), and remembers at most _MAX_URLS of them."""
    from clproxy.proxy import http1
    calls = []

    def counting(url):
        calls.append(url)
        return split_url(url)

    monkeypatch.setattr(http1, "split_url", counting)
    monkeypatch.setattr(http1, "_split_urls", {})
    monkeypatch.setattr(http1, "_MAX_URLS", 3)
    endpoints = Endpoints()
    pool = HTTP1Pool(task.Clock(), endpoints)
    url = b"http://user:pw@up.example:8080/v1/messages?beta=true"
    for _ in range(3):
        pool.request(b"POST", url, [(b"x-a", b"1")], b"{}")
    assert calls == [url]
    sent = [c.transport.value() for c in endpoints.connections]
    assert len(sent) == 3 and all(s == sent[0] for s in sent)
    assert sent[0].startswith(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: up.example:8080\r\n")
    for _ in range(2):
        with pytest.raises(ValueError):
            pool.request(b"POST", b"ftp://up.example/", [], b"{}")
    assert calls == [url, b"ftp://up.example/", b"ftp://up.example/"]
    for n in range(5):
        pool.request(b"GET", b"http://up.example:8080/?q=%d" % n, [], None)
    assert len(http1._split_urls) == 3  # bounded: a client varying its query string adds nothing


@pytest.mark.parametrize("raw", [SIMPLE, CHUNKED], ids=["content-length", "chunked"])
def test_every_split_of_a_response_reads_the_same(raw):
    """Whatever byte the response is split at, the code, headers and body are the same."""
    for at in range(len(raw) + 1):
        response, body, connection, pool = answer_of([raw[:at], raw[at:]])
        assert response.code == 200 and response.phrase == b"OK", at
        assert body.reason.check(ResponseDone), at
        assert connection.state == "IDLE" and pool._idle[connection.key] == [connection], at
        if raw is SIMPLE:
            assert body.data == b'{"ok":true}' and response.length == 11
            assert response.headers.getRawHeaders(b"x-multi") == [b"a", b"b"]
        else:
            assert body.data == b"hello world" and response.length is UNKNOWN_LENGTH


def test_every_byte_alone():
    """A response arriving one byte per read is read whole."""
    response, body, _connection, _pool = answer_of([CHUNKED[i:i + 1] for i in range(len(CHUNKED))])
    assert body.data == b"hello world" and body.reason.check(ResponseDone)


def test_informational_answers_are_skipped():
    """100 Continue and 103 Early Hints (with headers) come before the answer that counts."""
    response, body, _c, _p = answer_of([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                                        b"Link: </a>\r\n\r\n" + SIMPLE])
    assert response.code == 200 and body.data == b'{"ok":true}'
    assert response.headers.getRawHeaders(b"link") is None


@pytest.mark.parametrize("status,method", [(b"204 No Content", b"POST"), (b"304 Not Modified", b"GET"),
                                           (b"200 OK", b"HEAD")])
def test_no_body_statuses(status, method):
    """204, 304 and any answer to HEAD have no body, whatever Content-Length says; the connection
    is free at once."""
    response, body, connection, pool = answer_of(
        [b"HTTP/1.1 " + status + b"\r\nContent-Length: 20\r\n\r\n"], method=method)
    assert body.data == b"" and body.reason.check(ResponseDone) and response.length == 0
    assert pool._idle[connection.key] == [connection]


def test_headers_folded_and_bare_lf():
    """A folded header continues the one before; lines ending in LF alone are read too."""
    response, body, _c, _p = answer_of([b"HTTP/1.1 200 OK\nX-Long: a\n  b\nContent-Length: 2\n\nok"])
    assert response.headers.getRawHeaders(b"x-long") == [b"a b"] and body.data == b"ok"


@pytest.mark.parametrize("raw,what", [
    (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
    (b"ICY 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting Content-Length headers"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101 Switching Protocols"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, "response head too long"),
])
def test_malformed_heads_are_typed_errors(raw, what):
    """A head that cannot be read fails the request with MalformedResponse and drops the connection."""
    _pool, connection, d = exchange([raw])
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(MalformedResponse) and str(failure[0].value) == what
    assert connection.transport.disconnecting and connection.state == "CLOSED"


def test_malformed_chunk_size_breaks_the_body():
    """A bad chunk-size line ends the body with an error (not ResponseDone) and drops the connection."""
    response, body, connection, _p = answer_of([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                b"5\r\nhello\r\nzz\r\n"])
    assert body.data == b"hello" and not body.reason.check(ResponseDone, PotentialDataLoss)
    assert connection.transport.disconnecting


@pytest.mark.parametrize("raw", [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"])
def test_a_body_cut_short_is_an_upstream_error(raw):
    """The connection closing before the Content-Length or the last chunk: read_body fails in words."""
    pool, connection, d = exchange([raw])
    response = []
    d.addCallback(response.append)
    reading = read_body(response[0], 1000, "up.example:8080")
    connection.connectionLost(Failure(error.ConnectionDone()))
    failure = []
    reading.addErrback(failure.append)
    assert failure[0].check(UpstreamError)
    assert failure[0].value.what == ("up.example:8080 closed the connection after 10 bytes of the "
                                     "answer's body, before its end")
    assert not pool._idle


def test_connection_close_is_not_kept():
    """``Connection: close`` (or HTTP/1.0 without keep-alive) ends the connection after the body."""
    for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", b"HTTP/1.0 200 OK\r\n"):
        response, body, connection, pool = answer_of([head + b"Content-Length: 2\r\n\r\nok"])
        assert body.data == b"ok" and body.reason.check(ResponseDone)
        assert connection.transport.disconnecting and not pool._idle


def test_a_body_without_length_ends_with_the_connection():
    """No Content-Length nor chunked: the body is what comes until the close (PotentialDataLoss)."""
    response, body, connection, pool = answer_of([b"HTTP/1.1 200 OK\r\n\r\nsome", b" more"])
    connection.connectionLost(Failure(error.ConnectionDone()))
    assert body.data == b"some more" and body.reason.check(PotentialDataLoss)
    assert not pool._idle


def test_bytes_after_the_body_drop_the_connection():
    """An answer longer than it said: the body is as framed, the connection is not reused."""
    response, body, connection, pool = answer_of([SIMPLE + b"HTTP/1.1 200 OK\r\n"])
    assert body.data == b'{"ok":true}' and connection.transport.disconnecting and not pool._idle


def test_backpressure_pauses_and_an_end_while_paused_resumes():
    """The body's reader pauses and resumes the connection; a body that ends while paused leaves
    the connection resumed for its next request."""
    response, body, connection, pool = answer_of([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"])
    response.pauseProducing()
    assert connection.transport.producerState == "paused"
    response.resumeProducing()
    assert connection.transport.producerState == "producing"
    response.pauseProducing()
    connection.dataReceived(b"cd")
    assert body.data == b"abcd" and connection.transport.producerState == "producing"
    response.stopProducing()  # after the end: the pooled connection is not the reader's any more
    assert not connection.transport.disconnecting and pool._idle[connection.key] == [connection]


@pytest.mark.parametrize("head", [b"Transfer-Encoding: chunked", b"Content-Length: 12"])
def test_the_read_end_callback_follows_each_read_until_the_body_ends(head):
    """on_read_end's callback runs once after each read has been delivered, however many chunks
    the read held, and is let go of when the body ends (the connection serves other requests)."""
    chunked = head.startswith(b"Transfer")
    response, body, connection, pool = answer_of([b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n"])
    seen = []
    assert response.on_read_end(lambda: seen.append(body.data))
    connection.dataReceived(b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n" if chunked else b"abcdef")
    assert seen == [b"abcdef"]  # once, after all three chunks
    connection.dataReceived(b"6\r\nghijkl\r\n0\r\n\r\n" if chunked else b"ghijkl")
    assert body.data == b"abcdefghijkl" and body.reason.check(ResponseDone)
    assert connection.read_done is None and pool._idle[connection.key] == [connection]
    assert not response.on_read_end(seen.clear)  # ended: nothing to follow


def test_the_read_end_callback_is_let_go_of_when_the_body_breaks():
    """A broken body drops the connection and its read end callback with it."""
    response, body, connection, _p = answer_of([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"])
    calls = []
    response.on_read_end(lambda: calls.append(1))
    connection.dataReceived(b"2\r\nab\r\nzz\r\n")
    assert body.data == b"ab" and not body.reason.check(ResponseDone)
    assert connection.read_done is None and calls == []


def test_stop_producing_aborts_the_connection():
    """The body's reader giving up (client gone, idle stream) drops the upstream connection."""
    response, body, connection, _p = answer_of([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"])
    response.stopProducing()
    assert connection.transport.disconnecting


def test_cancel_aborts_the_connection():
    """Cancelling a request waiting for its head drops its connection and fails with CancelledError."""
    _pool, connection, d = exchange([b"HTTP/1.1 200"])
    failure = []
    d.addErrback(failure.append)
    d.cancel()
    assert failure[0].check(defer.CancelledError) and connection.transport.disconnecting
    connection.connectionLost(Failure(error.ConnectionAborted()))  # nothing more happens


def test_a_body_delivered_after_it_ended():
    """deliverBody after the whole body arrived gives the bytes, then the end."""
    pool, connection, d = exchange([SIMPLE])
    response = []
    d.addCallback(response.append)
    body = Body()
    response[0].deliverBody(body)
    assert body.data == b'{"ok":true}' and body.reason.check(ResponseDone)


def test_a_reused_connection_closed_before_answering_is_retried_once_on_a_fresh_one():
    """A kept-alive connection the server had closed: the request goes once more, on a new
    connection; not when the connection was fresh, nor after an answer byte."""
    response, body, first, pool = answer_of([SIMPLE])
    d = pool.request(b"POST", b"http://up.example:8080/v1/messages", Headers(), b"{}")
    assert first.reused
    first.connectionLost(Failure(error.ConnectionDone()))
    second = pool._endpoints.connections[1]
    assert second.transport.value().startswith(b"POST /v1/messages")
    got = []
    d.addBoth(got.append)
    second.connectionLost(Failure(error.ConnectionDone()))  # a fresh connection: no more tries
    assert got[0].check(error.ConnectionDone)


def test_no_retry_after_an_answer_byte():
    """A reused connection closed after the first byte of the answer: the request fails."""
    _response, _body, first, pool = answer_of([SIMPLE])
    d = pool.request(b"POST", b"http://up.example:8080/v1/messages", Headers(), b"{}")
    first.dataReceived(b"HTTP/1.1 2")
    first.connectionLost(Failure(error.ConnectionLost()))
    got = []
    d.addBoth(got.append)
    assert got[0].check(error.ConnectionLost) and len(pool._endpoints.connections) == 1


def test_idle_connections_close_after_the_idle_timeout():
    """An idle connection is closed once it has been idle for idle_timeout (one timer per pool)."""
    endpoints = Endpoints()
    clock = task.Clock()
    pool = HTTP1Pool(clock, endpoints, idle_timeout=120)
    pool.request(b"GET", b"http://h/", Headers(), None)
    connection = endpoints.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(60)
    assert not connection.transport.disconnecting
    clock.advance(60)
    assert connection.transport.disconnecting
    connection.connectionLost(Failure(error.ConnectionDone()))
    assert not pool._idle and not clock.getDelayedCalls()


# -- over a real loopback server -----------------------------------------------------------
class RawServer(protocol.Protocol):
    """Answers each request with a small JSON body; ``factory.close_after`` closes the connection
    after that many answers (as a server's idle timeout would), without saying so."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""
        self.answered = 0

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
                         .get(b"Content-Length", b"0"))
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append(self.transport.getPeer().port)
            if self.factory.hold is not None:
                self.factory.hold.append(self)
                continue
            self.answer()

    def answer(self):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.answered += 1
        if self.factory.close_after and self.answered >= self.factory.close_after:
            self.transport.loseConnection()


@pytest.fixture
def server():
    factory = protocol.Factory.forProtocol(RawServer)
    factory.connections, factory.requests, factory.hold, factory.close_after = [], [], None, 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}/v1/messages".encode()
    yield factory
    for connection in factory.connections:
        connection.transport.loseConnection()
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def upstream():
    client = UpstreamClient(reactor, max_connections_per_host=2)
    yield client
    pytest_twisted.blockon(client.close())


async def post(client, url):
    response = await client.send(b"POST", url, Headers(), b"{}", 10, reactor)
    return response.code, await read_body(response, 1000)


@pytest_twisted.ensureDeferred
async def test_sequential_requests_share_one_connection(server, upstream):
    """Requests one after the other go over the same kept-alive connection."""
    for _ in range(3):
        assert await post(upstream, server.url) == (200, b"{}")
    assert len(set(server.requests)) == 1 and len(server.requests) == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_open_connections_and_keep_up_to_the_max(server, upstream):
    """Four requests at once take four connections; two (the per-host maximum) are kept, and
    serve the next requests."""
    server.hold = []
    sending = [defer.ensureDeferred(post(upstream, server.url)) for _ in range(4)]
    while len(server.hold) < 4:
        await task.deferLater(reactor, 0.01, lambda: None)
    held, server.hold = server.hold, None
    for connection in held:
        connection.answer()
    assert await defer.gatherResults(sending) == [(200, b"{}")] * 4
    assert len(set(server.requests)) == 4
    assert sum(len(idle) for idle in upstream.http1._idle.values()) == 2
    await post(upstream, server.url)
    await post(upstream, server.url)
    assert len(set(server.requests)) == 4  # no new connection


def pooled_connections(client):
    """The idle HTTP1Connections of ``client``'s pool."""
    return [connection for idle in client.http1._idle.values() for connection in idle]


@pytest_twisted.ensureDeferred
async def test_the_tcp_connection_calls_the_protocol_without_the_endpoints_wrapper(server, upstream):
    """Once connected, the TCP connection delivers reads to the HTTP1Connection itself, not through
    the endpoint's _WrappingProtocol (a Python call per read); the connection still works, is
    kept, and its close still reaches the pool."""
    from twisted.internet import endpoints
    assert await post(upstream, server.url) == (200, b"{}")
    [connection] = pooled_connections(upstream)
    assert connection.transport.protocol is connection
    assert not isinstance(connection.transport.protocol, endpoints._WrappingProtocol)
    assert await post(upstream, server.url) == (200, b"{}")
    assert len(set(server.requests)) == 1
    for each in server.connections:
        each.transport.loseConnection()
    for _ in range(100):
        if not pooled_connections(upstream):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert pooled_connections(upstream) == []  # connectionLost reached it without the wrapper


@pytest_twisted.ensureDeferred
async def test_a_connection_the_server_closed_is_replaced(server, upstream):
    """The server closes each connection after its answer: every request still succeeds."""
    server.close_after = 1
    for _ in range(3):
        assert await post(upstream, server.url) == (200, b"{}")
        await task.deferLater(reactor, 0.05, lambda: None)  # the close reaches the client
    assert len(set(server.requests)) == 3


@pytest_twisted.ensureDeferred
async def test_a_request_racing_the_servers_close_is_sent_again(server, upstream):
    """The server closes a kept-alive connection as the request arrives (unanswered): the client
    sends it once more on a fresh connection, and the caller sees only the answer."""
    assert await post(upstream, server.url) == (200, b"{}")
    first = server.connections[0]
    server.hold = []
    sending = defer.ensureDeferred(post(upstream, server.url))
    while not server.hold:
        await task.deferLater(reactor, 0.01, lambda: None)
    server.hold = None
    first.transport.loseConnection()  # unanswered
    assert await sending == (200, b"{}")
    assert len(set(server.requests)) == 2 and len(server.requests) == 3


def _cyclic_garbage_names():
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return {type(o).__qualname__ for o in gc.garbage}
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


@pytest_twisted.ensureDeferred
async def test_no_cycle_left_by_a_request_or_a_closed_connection(server, upstream):
    """A request, its response and a connection the server closed are freed by reference counting
    (twisted's TCP connector of a new connection is in a cycle of its own, Agent or not)."""
    await post(upstream, server.url)  # warm-up
    gc.collect()
    gc.disable()
    try:
        server.close_after = 1
        await post(upstream, server.url)
        await task.deferLater(reactor, 0.05, lambda: None)
        await post(upstream, server.url)
        names = _cyclic_garbage_names()
    finally:
        gc.enable()
    assert names & {"HTTP1Connection", "Response", "_Exchange", "_BodyCollector", "Headers"} == set()


# -- TLS over loopback ---------------------------------------------------------------------
def self_signed(name: str):
    """A key and a self-signed certificate for DNS name ``name`` (in its subjectAltName, which
    service_identity checks), as twisted ``PrivateCertificate``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(pem)


@pytest.fixture
def tls_server():
    """Starts the raw server over TLS with a certificate made for a given name."""
    ports = []

    def listen(name: str):
        certificate = self_signed(name)
        factory = protocol.Factory.forProtocol(RawServer)
        factory.connections, factory.requests, factory.hold, factory.close_after = [], [], None, 0
        port = reactor.listenSSL(0, factory, certificate.options(), interface="127.0.0.1")
        ports.append((port, factory))
        factory.port = port.getHost().port
        factory.certificate = certificate
        return factory

    yield listen
    for port, factory in ports:
        for connection in factory.connections:
            connection.transport.loseConnection()
        pytest_twisted.blockon(port.stopListening())


def trusting(client: UpstreamClient, certificate) -> UpstreamClient:
    """``client`` trusting ``certificate`` as its only root (the endpoints' TLS policy, else as
    shipped: optionsForClientTLS with the hostname check)."""
    from twisted.web import client as webclient
    policy = webclient.BrowserLikePolicyForHTTPS(trustRoot=certificate)
    client._endpoints._standard = webclient._StandardEndpointFactory(reactor, policy, 5, None)
    return client


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # twisted hands pyOpenSSL the certificate
@pytest_twisted.ensureDeferred
async def test_tls_with_the_right_hostname_is_accepted(tls_server, upstream):
    """https to a trusted certificate for the host asked for: answered, and kept alive."""
    server = tls_server("localhost")
    trusting(upstream, server.certificate)
    url = f"https://localhost:{server.port}/v1/messages".encode()
    assert await post(upstream, url) == (200, b"{}")
    assert await post(upstream, url) == (200, b"{}")
    assert len(set(server.requests)) == 1
    # the TCP connection calls the TLS protocol directly, not through the endpoint's wrapper
    [connection] = pooled_connections(upstream)
    tls = connection.transport
    assert tls.wrappedProtocol is connection and tls.transport.protocol is tls


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_with_the_wrong_hostname_is_refused(tls_server, upstream):
    """A trusted certificate made for another name than the URL's: the request fails as a TLS
    failure, in words, and nothing reaches the server."""
    server = tls_server("other.example")
    trusting(upstream, server.certificate)
    url = f"https://localhost:{server.port}/v1/messages".encode()
    with pytest.raises(UpstreamError) as caught:
        await post(upstream, url)
    assert caught.value.kind == "network"
    assert caught.value.what == f"TLS with localhost:{server.port} failed"
    assert "VerificationError" in caught.value.message  # the name, not the trust, was refused
    assert not server.requests


def test_reconfigure_reaches_the_new_client():
    """A reload's limits reach the HTTP/1.1 client: the idle maximum at once, the connect timeout
    for the next connection (the endpoints are shared)."""
    client = UpstreamClient(task.Clock(), connect_timeout=10, max_connections_per_host=4)
    client.reconfigure(connect_timeout=3, max_connections_per_host=9)
    assert client.http1.max_idle_per_host == 9 and client.pool.maxPersistentPerHost == 9
    endpoint = client.http1._endpoints.endpointForURI(_Target(b"http", b"127.0.0.1", 80))
    assert endpoint._timeout == 3


@pytest_twisted.ensureDeferred
async def test_a_silent_stream_is_aborted_by_the_idle_sweeper(server, upstream):
    """A stream that sends its head and then nothing: the relay's idle watchdog aborts it, which
    drops the upstream connection (not returned to the pool)."""
    from clproxy.proxy.upstream import FirstEventFailed, StreamRelay

    class Silent(RawServer):
        def answer(self):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")

    server.protocol = Silent
    response = await upstream.send(b"POST", server.url, Headers(), b"{}", 10, reactor)
    relay = StreamRelay(reactor, 0.2, "upstream")
    response.deliverBody(relay)
    with pytest.raises(FirstEventFailed, match="timed out before its first event"):
        await relay.first_event
    assert not upstream.http1._idle
    while server.connections[0].transport.connected:
        await task.deferLater(reactor, 0.01, lambda: None)  # the server sees the connection go


def test_a_connection_aborted_by_the_reader_is_not_pooled_even_if_the_body_completes():
    """The body's reader gives up inside the last bytes' delivery: the connection, on its way
    out, is not handed to the next request."""

    class GiveUp(Body):
        def dataReceived(self, data):
            super().dataReceived(data)
            self.transport.stopProducing()

    pool, connection, d = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"])
    got = []
    d.addCallback(got.append)
    got[0].deliverBody(GiveUp())
    connection.dataReceived(b"ok")
    assert not pool._idle and connection.transport.disconnecting
