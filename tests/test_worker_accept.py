"""A worker's share of new connections: one accept per wake-up on the socket all workers share.

Real sockets on the reactor pytest-twisted runs; the port's ``doRead`` (what the reactor calls
when the socket is ready) is called by hand while three connections wait in the backlog.
"""

import os
import socket

import pytest_twisted
from twisted.internet import protocol, reactor, task, tcp
from twisted.internet.task import deferLater

from clproxy.daemon.shares import ACCEPT_PAUSE, ACCEPT_SLACK, ConnectionBoard
from clproxy.daemon.worker import AdoptedEndpoint, OneAcceptPort


class Counting(protocol.Factory):
    """Builds plain protocols and keeps them."""

    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        built = protocol.Protocol()
        self.built.append(built)
        return built


@pytest_twisted.ensureDeferred
async def test_an_adopted_tcp_socket_accepts_one_connection_per_wake_up():
    """Three connections waiting: each doRead takes exactly one, where twisted's port would take
    all three (and more next time), leaving the other workers' wake-ups empty."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    factory = Counting()
    port = await AdoptedEndpoint(reactor, listener.detach()).listen(factory)
    clients = []
    try:
        assert isinstance(port, OneAcceptPort) and isinstance(port, tcp.Port)
        for _ in range(3):
            clients.append(socket.create_connection(address))
        port.doRead()
        assert len(factory.built) == 1
        port.doRead()
        port.doRead()
        assert len(factory.built) == 3
        assert port.numberAccepts == 1  # twisted's scaling after a full wake-up did not stick
    finally:
        for client in clients:
            client.close()
        for built in factory.built:
            built.transport.abortConnection()
        await port.stopListening()


class TwoWorkers:
    """Worker 1's port (its pause on a task.Clock) and worker 2's board, serving, on one board and
    one listening socket; ``second`` is worker 2's copy of that socket (non-blocking)."""

    async def start(self):
        self.supervisor, self.handle = ConnectionBoard.create(2)
        self.board = ConnectionBoard(os.dup(self.handle.fileno()), 2, 1)
        self.other = ConnectionBoard(os.dup(self.handle.fileno()), 2, 2)
        self.other.serve()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.address = listener.getsockname()
        self.second = socket.socket(fileno=os.dup(listener.fileno()))
        self.second.setblocking(False)
        self.factory = Counting()
        self.port = await AdoptedEndpoint(reactor, listener.detach(), self.board).listen(self.factory)
        self.port.clock = self.clock = task.Clock()
        self.sockets = []
        return self

    def connect(self):
        """A client connection to the shared socket (closed at the end)."""
        self.sockets.append(socket.create_connection(self.address))

    async def stop(self):
        for s in self.sockets + [self.second]:
            s.close()
        for built in self.factory.built:
            if built.transport is not None:
                built.transport.abortConnection()
        await self.port.stopListening()
        for b in (self.board, self.other, self.supervisor):
            b.close()
        self.handle.close()


@pytest_twisted.ensureDeferred
async def test_a_worker_ahead_of_the_others_leaves_them_the_next_connection_for_a_bounded_pause():
    """Worker 1 holding more than ACCEPT_SLACK connections beyond worker 2's count takes none at
    its next wake-up: it stops watching the socket for ACCEPT_PAUSE (on its clock), then takes the
    connection if it is still waiting, whatever the counts (a stalled worker 2 holds nothing back
    longer). Every connection it accepts is counted in its slot while open."""
    w = await TwoWorkers().start()
    port, built, counts = w.port, w.factory.built, w.supervisor.counts
    try:
        assert port.board is w.board and counts() == [0, 0]  # serving once it listens
        w.connect()
        w.connect()
        port.doRead()  # even: takes it
        assert len(built) == 1 and counts() == [1, 0]
        w.board.add(ACCEPT_SLACK)  # (as if it held more)
        port.doRead()  # ahead by ACCEPT_SLACK + 1: leaves this one
        assert len(built) == 1 and port not in reactor.getReaders()
        w.clock.advance(ACCEPT_PAUSE)  # no one took it: taken as the pause ends
        assert port in reactor.getReaders()
        assert len(built) == 2 and counts() == [2 + ACCEPT_SLACK, 0]
        w.other.add(ACCEPT_SLACK + 1)  # worker 2 caught up: no pause
        w.connect()
        port.doRead()
        assert len(built) == 3
        for protocol_ in built:
            protocol_.transport.abortConnection()
        await deferLater(reactor, 0.05, lambda: None)
        assert counts() == [ACCEPT_SLACK, ACCEPT_SLACK + 1]  # the three closed, uncounted
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_worker_still_ahead_after_its_pause_leaves_a_later_connection_too():
    """When the other worker took the connection left to it, the pause ends with nothing to take,
    and a connection arriving any time later is weighed against the counts again: worker 1, still
    far ahead of an idle worker 2, leaves that one too (it used to take it unconditionally)."""
    w = await TwoWorkers().start()
    try:
        w.board.add(ACCEPT_SLACK + 5)
        w.connect()
        w.port.doRead()  # ahead: leaves it
        w.sockets.append(w.second.accept()[0])  # worker 2 takes it
        w.clock.advance(ACCEPT_PAUSE)  # nothing left to take
        assert w.factory.built == [] and w.port in reactor.getReaders()
        w.clock.advance(60)
        w.connect()
        w.port.doRead()
        assert w.factory.built == [] and w.port not in reactor.getReaders()
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_a_connection_the_reactor_could_not_watch_is_not_counted():
    """A connection whose transport fails to start (epoll refusing one more descriptor: ENOSPC,
    ENOMEM) is gone; it must not stay counted in the worker's slot for ever."""
    supervisor, handle = ConnectionBoard.create(2)
    board = ConnectionBoard(os.dup(handle.fileno()), 2, 1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    port = await AdoptedEndpoint(reactor, listener.detach(), board).listen(
        protocol.Factory.forProtocol(protocol.Protocol))
    client = socket.create_connection(address)
    real = reactor.addReader

    def refuse(reader):
        if reader is not port:
            raise OSError(28, "No space left on device")
        return real(reader)

    reactor.addReader = refuse
    try:
        port.doRead()  # twisted's port logs the error and drops the connection
    finally:
        del reactor.addReader
    try:
        await deferLater(reactor, 0.05, lambda: None)
        assert supervisor.counts()[0] == 0
    finally:
        client.close()
        await port.stopListening()
        board.close()
        supervisor.close()
        handle.close()
