"""Writes sent on the socket at once (clproxy.sendnow.write_through, ProxyChannel's transport).

Real loopback connections on the reactor pytest-twisted runs; what "at once" means is checked on
the transport itself: after the write returns, nothing waits in twisted's buffers.
"""

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.protocols import tls
from twisted.web import resource, server

from clproxy.http import site as site_module
from clproxy.http.site import ProxyChannel, ProxySite
from clproxy.sendnow import write_through


class Collect(protocol.Protocol):
    """Keeps what it receives; ``until(n)`` fires once it has n bytes."""

    def __init__(self):
        self.data = b""
        self.waiting = []
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        for n, d in list(self.waiting):
            if len(self.data) >= n:
                self.waiting.remove((n, d))
                d.callback(self.data)

    def until(self, n):
        d = defer.Deferred()
        self.waiting.append((n, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.lost.callback(None)


async def pair():
    """(server-side protocol, client-side protocol) of a fresh loopback connection."""
    accepted = defer.Deferred()

    class Server(protocol.Protocol):
        def connectionMade(self):
            accepted.callback(self)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    client = Collect()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
    server_side = await accepted
    await port.stopListening()
    return server_side, client


def buffered(transport) -> int:
    """Bytes waiting in a twisted TCP transport's buffers."""
    return len(transport.dataBuffer) - transport.offset + sum(map(len, transport._tempDataBuffer))


@pytest_twisted.ensureDeferred
async def test_a_write_leaves_at_once_and_what_the_socket_refuses_is_buffered_in_order():
    """A small write is on the socket when the call returns (nothing buffered); a write larger
    than the socket takes leaves its remainder in twisted's buffer, which pauses a registered
    producer as before, and the peer gets every byte in order."""
    server_side, client = await pair()
    transport = server_side.transport
    write = write_through(transport)
    write(b"hello")
    assert buffered(transport) == 0
    assert await client.until(5) == b"hello"

    class Producer:
        paused = 0

        def pauseProducing(self):
            self.paused += 1

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    producer = Producer()
    transport.registerProducer(producer, True)
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than a loopback socket takes at once
    write(big)
    assert buffered(transport) > 0 and producer.paused == 1
    write(b"after")  # behind the buffered bytes, never before them
    assert buffered(transport) > 0
    received = await client.until(5 + len(big) + 5)
    assert received == b"hello" + big + b"after"
    transport.unregisterProducer()
    transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_a_tls_transport_keeps_its_own_write():
    """A TLS transport forwards unknown attributes (its socket) to the TCP connection under it:
    writing there would skip TLS, so it keeps its own write. A test transport does too."""
    server_side, client = await pair()
    wrapper = tls.TLSMemoryBIOProtocol(None, protocol.Protocol(), _connectWrapped=False)
    wrapper.transport = server_side.transport
    assert wrapper.socket is server_side.transport.socket  # forwarded: the trap
    assert write_through(wrapper) == wrapper.write
    string = StringTransport()
    assert write_through(string) == string.write
    server_side.transport.loseConnection()
    await client.lost


class Answer(resource.Resource):
    """Answers with "hello" and notes what twisted's buffers held right after the write."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"5")
        request.write(b"hello")
        self.channel_buffered = buffered(request.channel.transport)
        request.finish()
        return server.NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_the_channel_sends_a_response_at_once_and_lets_go_of_its_transport(monkeypatch):
    """Through ProxySite over loopback: the response's head and body are on the socket when the
    first write returns, gathered into one send, the client reads the usual response, and the
    connection's end takes the channel's writes off its transport (no cycle left behind)."""
    sends = []

    def recording_write_through(transport):
        real = write_through(transport)

        def send(data):
            sends.append(data)
            real(data)
        return send

    monkeypatch.setattr(site_module, "write_through", recording_write_through)
    answer = Answer()
    site = ProxySite(answer)
    channels = []

    class Recording(ProxyChannel):
        def connectionMade(self):
            super().connectionMade()
            channels.append(self)

    site.protocol = Recording
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client = Collect()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
    client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await client.lost
    await port.stopListening()
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head.lower() and body == b"hello"
    assert answer.channel_buffered == 0
    assert len(sends) == 1 and sends[0] == client.data  # head and body: one send
    (channel,) = channels
    assert "write" not in vars(channel.transport) and "writeSequence" not in vars(channel.transport)


class CountingTransport(StringTransport):
    """A StringTransport that counts how often it is asked for its local address."""

    asked = 0

    def getHost(self):
        self.asked += 1
        return super().getHost()


def test_the_channel_asks_the_socket_for_its_address_once():
    """twisted's Request asks for the local address on every request: the channel asks its
    transport (a getsockname call on TCP) once per connection and answers the same address."""
    class Hello(resource.Resource):
        """Answers with the local address its request was given."""

        isLeaf = True

        def render_GET(self, request):
            return b"%s:%d" % (request.getHost().host.encode(), request.getHost().port)

    site = ProxySite(Hello(), max_body_bytes=1000)
    channel = site.buildProtocol(None)
    transport = CountingTransport()
    channel.makeConnection(transport)
    for _ in range(3):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.asked == 1
    address = StringTransport().getHost()
    assert transport.value().count(b"%s:%d" % (address.host.encode(), address.port)) == 3
    assert channel.getHost() == address and transport.asked == 1
    channel.connectionLost(None)
