"""An in-memory HTTP agent: a real ``twisted.web`` resource served to a real ``Agent`` without a socket.

treq's ``RequestTraversalAgent`` does the same (and this one is built the way it is), but pumps
its connections on its own reactor; here the pumps advance the caller's ``task.Clock`` as they
move bytes, so the upstream client's timeouts, the stream relay's idle watchdog and the fake
upstream's pacing all run on one clock the test controls. The bytes are real HTTP/1.1 (status
line, chunked bodies, a connection closed mid-body), so the client code under test cannot tell.

Use it as the ``agent`` of :class:`clproxy.proxy.upstream.UpstreamClient`; after starting work,
call :meth:`MemoryAgent.flush` (or ``clock.advance(seconds)`` then ``flush``) to let it happen.
"""

from typing import Set

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

__all__ = ["MemoryAgent"]


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Every URL "connects" to the memory reactor, where :class:`MemoryAgent` picks the connection up."""

    def __init__(self, reactor: MemoryReactorClock):
        self._reactor = reactor

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port)


@implementer(IAgent)
class MemoryAgent:
    """An ``IAgent`` whose every request is served by ``root`` (any host, any port) in memory.

    ``clock`` is advanced by 0 on every pump, so calls scheduled "now" (``callLater(0, ...)``) run
    as bytes move; tests advance it further themselves. Connections are not reused (each request
    gets a fresh one, like a pool that never keeps a connection).
    """

    def __init__(self, root, clock: IReactorTime):
        self._clock = clock
        # the client side's reactor only ever records connection attempts (never a socket)
        self._memory = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(self._memory, _Endpoints(self._memory),
                                                 pool=HTTPConnectionPool(self._memory, persistent=False))
        # the server side's timeouts (twisted.web's idle timeout) stay off the test's clock
        self._site = Site(root, reactor=MemoryReactorClock())
        self._site.displayTracebacks = False
        self._pumps: Set[iosim.IOPump] = set()
        #: how many requests were made (each over its own in-memory connection)
        self.requests = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        """``IAgent.request``: the response fires once :meth:`flush` moved the answer's headers."""
        before = len(self._memory.tcpClients)
        d = self._agent.request(method, uri, headers, bodyProducer)
        if len(self._memory.tcpClients) == before:
            return d  # failed before connecting (a bad URL): nothing to serve
        self.requests += 1
        _host, port, factory, _timeout, _bind = self._memory.tcpClients[-1]
        server_address = IPv4Address("TCP", "127.0.0.1", port)
        client_address = IPv4Address("TCP", "127.0.0.1", 40000 + self.requests)
        server = self._site.buildProtocol(client_address)
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_address,
                                        peerAddress=client_address)
        client = factory.buildProtocol(None)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=client_address,
                                        peerAddress=server_address)
        self._pumps.add(iosim.connect(server, server_io, client, client_io, greet=False, clock=self._clock))
        return d

    def flush(self) -> bool:
        """Move every pending byte both ways (and run what is due now) until nothing moves.

        :return: True when anything moved.
        """
        moved_any = False
        while True:
            moved = False
            for pump in list(self._pumps):
                if pump.flush():
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.discard(pump)
            if not moved:
                return moved_any
            moved_any = True

    @property
    def open_connections(self) -> int:
        """Connections not yet closed on both sides."""
        return sum(1 for p in self._pumps if not (p.clientIO.disconnected and p.serverIO.disconnected))
