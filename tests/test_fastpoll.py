"""The epoll reactor's loop without a log context per event (clproxy.daemon.fastpoll).

Real sockets on a fresh ``EPollReactor`` that the tests turn by hand (``doIteration`` then
``runUntilCurrent``), so the reactor pytest-twisted runs is not the one changed; a stand-in poller
for what a socket cannot be made to do on demand (EINTR, an event for a descriptor removed by an
earlier event of the same poll).
"""

import errno
import select

import pytest
from twisted.internet import epollreactor, error, protocol, selectreactor, task, tcp
from twisted.python import log

from clproxy import mirrored
from clproxy.daemon import assemble, fastpoll


def turn(reactor, until, limit=500):
    """Turn ``reactor`` by hand until ``until()`` is true (at most ``limit`` turns)."""
    for _ in range(limit):
        if until():
            return
        reactor.doIteration(0.01)
        reactor.runUntilCurrent()
    raise AssertionError("the reactor never got there")


class Echo(protocol.Protocol):
    """Sends back what it gets; b"boom" makes it raise instead."""

    def dataReceived(self, data):
        if data == b"boom":
            raise ValueError("the protocol broke")
        self.transport.write(data)


class Client(protocol.Protocol):
    """Keeps what it receives and how its connection ended."""

    def __init__(self):
        self.received = b""
        self.lost = None

    def connectionLost(self, reason):
        self.lost = reason


@pytest.fixture
def reactor():
    """A fresh epoll reactor with the lean loop, closed after the test."""
    reactor = epollreactor.EPollReactor()
    assert fastpoll.install(reactor)
    yield reactor
    for selectable in reactor.removeAll() + list(reactor._selectables.values()):
        sock = getattr(selectable, "socket", None)
        if sock is not None:
            sock.close()
    reactor._poller.close()


def connect(reactor, server_protocol=Echo):
    """A loopback connection on ``reactor``: (client protocol, listening port)."""
    factory = protocol.Factory.forProtocol(server_protocol)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = Client()
    client.dataReceived = lambda data: setattr(client, "received", client.received + data)
    protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
    turn(reactor, lambda: client.transport is not None)
    return client, port


def test_this_twisted_is_a_checked_one():
    """The installed twisted's loop is the one the lean loop was checked against (else it would
    silently stay off: the digest must be added after checking the new release)."""
    assert mirrored.fingerprint(fastpoll.MIRRORED) in fastpoll.KNOWN_FINGERPRINTS
    assert fastpoll.ENABLED


def test_install_takes_only_a_checked_epoll_reactor(monkeypatch):
    """Only twisted's epoll reactor gets the loop, once; another reactor, a clock or a twisted
    whose code differs keep their own."""
    reactor = epollreactor.EPollReactor()
    try:
        assert fastpoll.install(reactor) and fastpoll.install(reactor)
        assert reactor.doIteration.__func__ is fastpoll.do_poll
        assert epollreactor.EPollReactor.doIteration is epollreactor.EPollReactor.doPoll  # the class is untouched
        other = selectreactor.SelectReactor()
        assert not fastpoll.install(other) and "doIteration" not in vars(other)
        assert not fastpoll.install(task.Clock())
        monkeypatch.setattr(fastpoll, "ENABLED", False)
        plain = epollreactor.EPollReactor()
        assert not fastpoll.install(plain) and "doIteration" not in vars(plain)
        plain._poller.close()
    finally:
        reactor._poller.close()


def test_bytes_go_both_ways_and_connections_end_cleanly(reactor):
    """Over loopback through the lean loop: what is written comes back whole, and a connection
    closed by its client ends with ConnectionDone."""
    client, _port = connect(reactor)
    payload = bytes(range(256)) * 1024
    client.transport.write(payload)
    turn(reactor, lambda: len(client.received) >= len(payload))
    assert client.received == payload
    client.transport.loseConnection()
    turn(reactor, lambda: client.lost is not None)
    assert client.lost.check(error.ConnectionDone)


def test_a_protocol_that_raises_is_disconnected_and_logged_and_others_go_on(reactor):
    """A protocol raising in dataReceived is logged and disconnected (twisted's own handling,
    which the lean loop keeps); another connection on the same reactor carries on."""
    errors = []
    log.addObserver(errors.append)
    try:
        broken, _ = connect(reactor)
        healthy, _ = connect(reactor)
        broken.transport.write(b"boom")
        turn(reactor, lambda: broken.lost is not None)
        healthy.transport.write(b"still here")
        turn(reactor, lambda: healthy.received == b"still here")
    finally:
        log.removeObserver(errors.append)
    assert [e for e in errors if e.get("isError") and e["failure"].check(ValueError)]
    assert healthy.lost is None


def test_an_outgoing_connections_reads_are_handled_inline_as_twisted_would(reactor, monkeypatch):
    """A read on an outgoing connection (tcp.Client) is handled without the dispatch call: the
    bytes arrive whole; a protocol that raises is logged and disconnected with its exception; the
    server's close ends the connection with ConnectionDone; the other events still go through
    the dispatch."""
    dispatched = []
    real_dispatch = fastpoll._dispatch

    def counting(dispatch, selectable, fd, event):
        dispatched.append((type(selectable), event))
        real_dispatch(dispatch, selectable, fd, event)

    monkeypatch.setattr(fastpoll, "_dispatch", counting)
    errors = []
    log.addObserver(errors.append)
    try:
        client, _ = connect(reactor)
        payload = bytes(range(256)) * 256
        client.transport.write(payload)
        turn(reactor, lambda: len(client.received) >= len(payload))
        assert client.received == payload
        # the server's reads went through the dispatch, the client's did not (its connecting
        # and writing, EPOLLOUT events, did)
        assert (tcp.Server, select.EPOLLIN) in dispatched
        assert (tcp.Client, select.EPOLLIN) not in dispatched

        raising, _ = connect(reactor)

        def broken(data):
            raise ValueError("the relay broke")

        raising.dataReceived = broken
        raising.transport.write(b"echo this")
        turn(reactor, lambda: raising.lost is not None)
        assert raising.lost.check(ValueError)

        closed, _ = connect(reactor, server_protocol=Closer)
        closed.transport.write(b"close now")
        turn(reactor, lambda: closed.lost is not None)
        assert closed.lost.check(error.ConnectionDone)
        assert closed.received == b"bye"
    finally:
        log.removeObserver(errors.append)
    assert [e for e in errors if e.get("isError") and e["failure"].check(ValueError)
            and e["failure"].getErrorMessage() == "the relay broke"]
    assert client.lost is None


class Closer(protocol.Protocol):
    """Answers "bye" and closes the connection."""

    def dataReceived(self, data):
        self.transport.write(b"bye")
        self.transport.loseConnection()


class FakePoller:
    """Stands in for the reactor's epoll object: hands out scripted results."""

    def __init__(self, *results):
        self.results = list(results)
        self.asked = []

    def poll(self, timeout, most):
        self.asked.append((timeout, most))
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


class Selectable:
    """A descriptor as the loop sees it (its prefix is what a log line would carry)."""

    def __init__(self, name):
        self.name = name

    def logPrefix(self):
        return self.name


def test_the_loop_skips_gone_descriptors_logs_escapes_and_handles_eintr(monkeypatch):
    """An event for a descriptor an earlier event removed is skipped; an exception escaping the
    dispatch is logged with the descriptor's prefix and the next event is still handled; EINTR
    ends the turn quietly, any other poll error is raised; no timeout means wait (-1)."""
    reactor = epollreactor.EPollReactor()
    reactor._poller.close()
    first, second, third = Selectable("first"), Selectable("second"), Selectable("third")
    reactor._selectables = {3: first, 4: second, 5: third}
    handled = []

    def dispatch(selectable, fd, event):
        handled.append(selectable.name)
        if selectable is first:
            del reactor._selectables[4]  # e.g. its connection was closed by this event
            raise RuntimeError("escaped")

    monkeypatch.setattr(reactor, "_doReadOrWrite", dispatch)
    reactor._poller = FakePoller([(3, 1), (4, 1), (5, 1)], OSError(errno.EINTR, "interrupted"),
                                 OSError(errno.EBADF, "bad"))
    logged = []
    log.addObserver(logged.append)
    try:
        fastpoll.do_poll(reactor, None)
    finally:
        log.removeObserver(logged.append)
    assert handled == ["first", "third"]
    assert [(e["system"], e["failure"].getErrorMessage()) for e in logged if e.get("isError")] == [
        ("first", "escaped")]
    assert reactor._poller.asked == [(-1, 3)]
    fastpoll.do_poll(reactor, 0.5)  # EINTR: nothing raised, nothing handled
    assert handled == ["first", "third"] and reactor._poller.asked[-1] == (0.5, 2)
    with pytest.raises(OSError):
        fastpoll.do_poll(reactor, 0)


def test_a_turn_serves_outgoing_connections_first_and_drops_events_of_closed_ones(monkeypatch):
    """In one poll's events, the outgoing connections' (the relays') are handled before those of
    client connections and the listening port, each group in epoll's order; a deferred event
    whose descriptor a relay's event closed, or closed and reused, is not handed to anyone; an
    exception escaping a deferred dispatch is logged and the turn goes on."""
    reactor = epollreactor.EPollReactor()
    reactor._poller.close()
    port, accepted, closed, reused = (Selectable(n) for n in ("port", "accepted", "closed", "reused"))
    relay_a, relay_b = tcp.Client.__new__(tcp.Client), tcp.Client.__new__(tcp.Client)  # no socket
    names = {id(relay_a): "relay-a", id(relay_b): "relay-b"}
    reactor._selectables = {3: port, 4: relay_a, 5: accepted, 6: closed, 7: relay_b, 8: reused}
    handled = []

    def dispatch(selectable, fd, event):
        handled.append(names.get(id(selectable)) or selectable.name)
        if selectable is relay_b:  # e.g. its stream failed: the client connections go
            del reactor._selectables[6]
            reactor._selectables[8] = Selectable("newcomer")  # closed and its fd taken again
        if selectable is accepted:
            raise RuntimeError("escaped")

    monkeypatch.setattr(reactor, "_doReadOrWrite", dispatch)
    reactor._poller = FakePoller([(3, 1), (4, 1), (5, 1), (6, 1), (8, 1), (7, 1)])
    logged = []
    log.addObserver(logged.append)
    try:
        fastpoll.do_poll(reactor, 0)
    finally:
        log.removeObserver(logged.append)
    assert handled == ["relay-a", "relay-b", "port", "accepted"]
    assert [(e["system"], e["failure"].getErrorMessage()) for e in logged if e.get("isError")] == [
        ("accepted", "escaped")]


def test_relays_first_over_real_sockets(reactor):
    """On a real reactor: when a client's request and an upstream's answer are ready in the same
    turn, the upstream's is read first."""
    order = []

    class Upstream(protocol.Protocol):
        """The upstream's side of the relay's connection: kept, to answer on."""

        def connectionMade(self):
            upstream_side.append(self.transport)

    class Recorder(protocol.Protocol):
        """Notes its name when it is given bytes."""

        def __init__(self, name):
            self.name = name

        def dataReceived(self, data):
            order.append(self.name)

    upstream_side = []
    upstream_port = reactor.listenTCP(0, protocol.Factory.forProtocol(Upstream), interface="127.0.0.1")
    relay = Recorder("relay")
    protocol.ClientCreator(reactor, lambda: relay).connectTCP("127.0.0.1", upstream_port.getHost().port)
    front_port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: Recorder("client")),
                                   interface="127.0.0.1")
    client = Client()
    client.dataReceived = lambda data: None
    protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", front_port.getHost().port)
    turn(reactor, lambda: upstream_side and client.transport is not None and relay.transport is not None
         and len(reactor._selectables) >= 6)
    assert isinstance(relay.transport, tcp.Client)
    # both written before the next turn: ready together
    client.transport.write(b"a request")
    upstream_side[0].write(b"an answer")
    turn(reactor, lambda: len(order) >= 2)
    assert order[:2] == ["relay", "client"]


def test_the_daemon_gives_its_reactor_the_loop_on_start(monkeypatch):
    """ProxyService.startService installs the loop on the reactor it was given."""
    monkeypatch.setattr(assemble, "tune_garbage_collector", lambda: None)  # not this process's gc
    reactor = epollreactor.EPollReactor()
    try:
        service = assemble.ProxyService(proxy=None, listener=None, reactor=reactor)
        service.startService()
        assert reactor.doIteration.__func__ is fastpoll.do_poll
        service.running = False
    finally:
        reactor._poller.close()
