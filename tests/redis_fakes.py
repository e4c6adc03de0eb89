"""In-memory doubles for the Redis link's clock tests: an endpoint that follows a script of
outcomes and a protocol that answers like a txredisapi connection, without a socket.

A closed fake connection is reported lost on the next turn of the test's ``task.Clock`` (as a real
transport reports it on a later reactor turn), so ``clock.advance(0)`` delivers it.
"""

import txredisapi
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure


class FakeTransport:
    """Records how the connection was closed; reports the loss on the next clock turn."""

    def __init__(self, clock, proto):
        self.clock = clock
        self.proto = proto
        self.closed = None

    def _close(self, how):
        if self.closed is None:
            self.closed = how
            self.clock.callLater(0, self.proto.connectionLost, Failure(ConnectionDone()))

    def loseConnection(self):
        self._close("lose")

    def abortConnection(self):
        self._close("abort")

    def write(self, data):
        pass


class FakeRedis(protocol.Protocol):
    """Answers PING with PONG (or ``ping_reply``); ``get`` fails as on a lost connection."""

    ping_reply = "PONG"

    def __init__(self):
        self.connected = 0
        self._lost = []

    def connectionMade(self):
        self.connected = 1

    def whenConnected(self):
        return defer.succeed(self)

    def whenDisconnected(self):
        d = defer.Deferred()
        self._lost.append(d)
        return d

    def connectionLost(self, reason):
        self.connected = 0
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(self)

    def ping(self):
        return defer.succeed(self.ping_reply)

    def get(self, key):
        return defer.fail(txredisapi.ConnectionError("Lost connection"))


class FakeRedisFactory(protocol.Factory):
    """Builds :class:`FakeRedis` connections (``ping_reply`` for the next ones)."""

    protocol = FakeRedis

    def __init__(self):
        self.built = []
        self.ping_reply = "PONG"

    def buildProtocol(self, addr):
        built = FakeRedis()
        built.ping_reply = self.ping_reply
        self.built.append(built)
        return built


class ScriptedEndpoint:
    """Each ``connect`` takes the next outcome: ``"ok"`` connects a fake, ``"refused"`` fails;
    ``attempts`` holds the clock time of every attempt."""

    def __init__(self, clock, outcomes):
        self.clock = clock
        self.outcomes = list(outcomes)
        self.attempts = []
        self.transports = []

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        outcome = self.outcomes.pop(0) if self.outcomes else "refused"
        if outcome != "ok":
            return defer.fail(ConnectionRefusedError("refused"))
        proto = factory.buildProtocol(None)
        transport = FakeTransport(self.clock, proto)
        self.transports.append(transport)
        proto.makeConnection(transport)
        return defer.succeed(proto)
