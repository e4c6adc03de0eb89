"""Hostile clients against the HTTP face (clproxy.http.site) and the write-through sends
(clproxy.sendnow): aborted and reset connections, partial sends, bodies at the size limit,
bodies with no body status codes.

Socket behaviour is checked over real loopback connections; request handling over
twisted.internet.testing's StringTransport, where every byte is in view.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python import failure
from twisted.internet.testing import StringTransport

from clproxy.errors import ProxyError
from clproxy.http.site import ClientResponse, MessagesResource, Node, ProxySite
from clproxy.sendnow import write_through
from test_sendnow import buffered, pair


class HeldDispatcher:
    """A dispatcher whose ``forward`` keeps each request and its ClientResponse until the test
    fires the Deferred it waits on."""

    def __init__(self):
        self.calls = []

    async def forward(self, request, out):
        waiting = defer.Deferred()
        self.calls.append((request, out, waiting))
        await waiting


def connect(limit=100):
    """(dispatcher, channel, transport) of a ProxySite serving /v1/messages on a StringTransport."""
    dispatcher = HeldDispatcher()
    root, v1 = Node(), Node()
    root.putChild(b"v1", v1)
    v1.putChild(b"messages", MessagesResource(dispatcher))
    channel = ProxySite(root, max_body_bytes=limit).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return dispatcher, channel, transport


def body_of(size):
    """A valid Messages request body of exactly ``size`` bytes."""
    start = b'{"model":"m","x":"'
    return start + b"a" * (size - len(start) - 2) + b'"}'


def framed(body, chunked):
    head = b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_exactly_at_the_limit_is_forwarded_and_one_byte_over_is_a_413(chunked):
    """server.maxBodyBytes is inclusive: a body of exactly the limit reaches the dispatcher whole;
    one byte more (announced by its length, or only found out while chunks arrive) is an
    Anthropic-shaped 413 request_too_large and nothing is forwarded."""
    dispatcher, channel, transport = connect(limit=100)
    channel.dataReceived(framed(body_of(100), chunked))
    assert len(dispatcher.calls) == 1 and dispatcher.calls[0][0].body == body_of(100)
    assert transport.value() == b""

    dispatcher, channel, transport = connect(limit=100)
    channel.dataReceived(framed(body_of(101), chunked))
    assert dispatcher.calls == []
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b'"type":"request_too_large"' in body and b"server.maxBodyBytes" in body


def test_an_empty_answer_with_a_no_body_status_announces_no_length():
    """A 204 (an upstream's, relayed by ClientResponse.send) has no body and, per RFC 9110, no
    Content-Length: announcing one (even a hostile upstream's non-empty body, which twisted drops)
    would tell the client of bytes that never come. The answer still ends and the connection
    serves the next request."""
    dispatcher, channel, transport = connect()
    channel.dataReceived(framed(body_of(30), False))
    _, out, waiting = dispatcher.calls[0]
    out.send(204, [(b"request-id", [b"req_1"])], b"stray")
    waiting.callback(None)
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 ") and b"req_1" in head
    assert b"content-length" not in head.lower() and rest == b""
    transport.clear()
    channel.dataReceived(framed(body_of(30), False))
    assert len(dispatcher.calls) == 2


@pytest.mark.parametrize("status, phrase", [(429, b"Too Many Requests"), (529, b"Overloaded"),
                                            (422, b"Unprocessable Content"), (503, b"Service Unavailable")])
def test_statuses_twisted_does_not_name_get_their_reason_phrase(status, phrase):
    """twisted.web has no phrase for 429 (nor 529, Anthropic's overloaded_error) and would send
    "429 Unknown Status": every cooled-down pool's answer looked broken in a client's log."""
    dispatcher, channel, transport = connect()
    channel.dataReceived(framed(body_of(30), False))
    _, out, waiting = dispatcher.calls[0]
    out.send(status, [], b"{}")
    waiting.callback(None)
    assert transport.value().startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))


def test_writes_after_the_end_or_after_the_client_left_are_dropped_without_an_error():
    """After finish() every write, start, send and error is a no-op (twisted would raise on a
    write after finish); after the client left, the cancel callback runs once and nothing is
    written."""
    dispatcher, channel, transport = connect()
    channel.dataReceived(framed(body_of(30), False))
    _, out, waiting = dispatcher.calls[0]
    out.send(200, [(b"content-type", [b"application/json"])], b"{}")
    sent = transport.value()
    out.write(b"more")
    out.start(500, [])
    out.finish()
    out.send(500, [], b"x")
    out.send_error(ProxyError(500, "late"))
    assert transport.value() == sent

    dispatcher, channel, transport = connect()
    channel.dataReceived(framed(body_of(30), False))
    _, out, waiting = dispatcher.calls[0]
    cancelled = []
    out.on_disconnect(lambda: cancelled.append(True))
    out.start(200, [(b"content-type", [b"text/event-stream"])])
    out.write(b"event: a\n\n")
    sent = transport.value()
    channel.connectionLost(failure.Failure(ConnectionDone()))
    assert cancelled == [True] and out.disconnected
    out.write(b"event: b\n\n")
    out.send_error(ProxyError(500, "late"))
    out.finish()
    assert transport.value() == sent


@pytest_twisted.ensureDeferred
async def test_nothing_is_sent_after_the_connection_was_aborted():
    """abortConnection() closes at the next reactor turn and twisted's own write drops what is
    written meanwhile; a write-through write must not send it on the socket in that gap (a
    timed-out or aborted client would get bytes after the abort)."""
    server_side, client = await pair()
    transport = server_side.transport
    write = write_through(transport)
    transport.abortConnection()
    write(b"after the abort")
    await client.lost
    assert client.data == b""


@pytest_twisted.ensureDeferred
async def test_partial_sends_to_a_client_that_does_not_read_keep_every_byte_in_order():
    """With tiny socket buffers on both sides and a client that is not reading, a write is taken
    in part and the rest buffered; many later writes (small, each of which the socket would take
    alone) go behind it, never ahead, and every byte arrives in order once the client reads."""
    server_side, client = await pair()
    transport = server_side.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.transport.pauseProducing()
    write = write_through(transport)
    expected = []
    for i in range(400):
        piece = b"%05d:" % i + bytes([65 + i % 26]) * (i * 7 % 900)
        expected.append(piece)
        write(piece)
    assert buffered(transport) > 0  # the socket refused some: the rest waits in twisted's buffer
    client.transport.resumeProducing()
    whole = b"".join(expected)
    assert await client.until(len(whole)) == whole
    transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_a_reset_connection_takes_writes_without_an_exception():
    """A peer that resets the connection (SO_LINGER 0) makes the socket's send fail (ECONNRESET or
    EPIPE): the write raises nothing, the bytes go to twisted's buffer and the transport finds
    out and ends the connection as usual."""
    server_side, client = await pair()
    transport = server_side.transport
    lost = defer.Deferred()
    server_side.connectionLost = lambda reason: lost.callback([reason])
    client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.transport.loseConnection()
    await client.lost
    write = write_through(transport)
    for _ in range(50):
        write(b"x" * 10000)  # none of these may raise
    (reason,) = await lost
    assert reason.check(ConnectionDone, ConnectionLost)


@pytest.mark.parametrize("fast_head", [True, False], ids=["one-pass head", "twisted's lines"])
def test_an_expected_body_over_the_limit_is_refused_before_it_is_sent(fast_head):
    """``Expect: 100-continue`` with a Content-Length over server.maxBodyBytes: no 100 Continue
    (the client would send megabytes to be refused) but the 413 at once, and the connection
    closes after it; within the limit the client is told to go on and the request is served."""
    dispatcher, channel, transport = connect(limit=100)
    channel.fast_head = fast_head
    head = (b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n")
    channel.dataReceived(head % 5_000_000)
    out = transport.value()
    assert not out.startswith(b"HTTP/1.1 100") and out.startswith(b"HTTP/1.1 413 ")
    response_head, _, body = out.partition(b"\r\n\r\n")
    assert b"connection: close" in response_head.lower()
    assert b'"type":"request_too_large"' in body and dispatcher.calls == []
    assert transport.disconnecting
    channel.dataReceived(b"POST / HTTP/1.1\r\n" + b"a" * 1000)  # the body sent anyway: not a request
    assert transport.value() == out and dispatcher.calls == []

    dispatcher, channel, transport = connect(limit=100)
    channel.fast_head = fast_head
    channel.dataReceived(head % 100)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(body_of(100))
    assert len(dispatcher.calls) == 1 and dispatcher.calls[0][0].body == body_of(100)
