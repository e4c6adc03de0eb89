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


@pytest_twisted.ensureDeferred
async def test_a_worker_ahead_of_the_others_leaves_them_the_next_connection_for_a_bounded_pause():
    """Worker 1 holding more than ACCEPT_SLACK connections beyond worker 2's count takes none at
    its next wake-up: it stops watching the socket for ACCEPT_PAUSE (on its clock), then takes the
    next connection whatever the counts (a stalled worker 2 holds nothing back longer). Every
    connection it accepts is counted in its slot while open."""
    supervisor, handle = ConnectionBoard.create(2)
    board = ConnectionBoard(os.dup(handle.fileno()), 2, 1)
    other = ConnectionBoard(os.dup(handle.fileno()), 2, 2)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    factory = Counting()
    port = await AdoptedEndpoint(reactor, listener.detach(), board).listen(factory)
    port.clock = clock = task.Clock()
    clients = []
    try:
        assert port.board is board
        for _ in range(2):
            clients.append(socket.create_connection(address))
        port.doRead()  # even: takes it
        assert len(factory.built) == 1 and supervisor.counts() == [1, 0]
        for _ in range(ACCEPT_SLACK):
            board.add(1)  # (as if it held more)
        port.doRead()  # ahead by ACCEPT_SLACK + 1: leaves this one
        assert len(factory.built) == 1 and port not in reactor.getReaders()
        clock.advance(ACCEPT_PAUSE)
        assert port in reactor.getReaders()
        port.doRead()  # still ahead, but it left the last one: takes this one
        assert len(factory.built) == 2 and supervisor.counts() == [2 + ACCEPT_SLACK, 0]
        other.add(ACCEPT_SLACK + 1)  # worker 2 caught up: no pause
        clients.append(socket.create_connection(address))
        port.doRead()
        assert len(factory.built) == 3
        for built in factory.built:
            built.transport.abortConnection()
        await deferLater(reactor, 0.05, lambda: None)
        assert supervisor.counts() == [ACCEPT_SLACK, ACCEPT_SLACK + 1]  # the three closed, uncounted
    finally:
        for client in clients:
            client.close()
        await port.stopListening()
        for b in (board, other, supervisor):
            b.close()
        handle.close()
