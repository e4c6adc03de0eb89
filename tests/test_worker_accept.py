"""A worker's share of new connections: one accept per wake-up on the socket all workers share.

Real sockets on the reactor pytest-twisted runs; the port's ``doRead`` (what the reactor calls
when the socket is ready) is called by hand while three connections wait in the backlog.
"""

import socket

import pytest_twisted
from twisted.internet import protocol, reactor, tcp

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
