"""Bytes written to a TCP connection leave on its socket at once, not on the next reactor turn.

twisted's TCP transport buffers every write: the reactor is asked to watch the socket for
writable (an ``epoll_ctl``), sends on the next turn of its loop, then stops watching (another
``epoll_ctl``). For a proxy that writes once per relayed event, per response and per upstream
request, that was most of each write's cost.
"""

from typing import Callable

from twisted.internet import tcp


def write_through(transport) -> Callable[[bytes], None]:
    """``transport.write``, except that when nothing is waiting in the transport's buffer the
    bytes are sent on the socket at once; only what the socket does not take is buffered (and
    counts for backpressure as before). A buffered write costs two epoll updates and a reactor
    turn before the send: per relayed event, that was most of the write's cost."""
    write = transport.write
    # a TCP connection itself: a TLS transport wraps one and forwards unknown attributes (its
    # socket among them) to it, so only the type tells that writing to the socket would skip TLS
    sock = getattr(transport, "socket", None) if isinstance(transport, tcp.Connection) else None
    if sock is None or not all(hasattr(transport, name) for name in
                               ("dataBuffer", "offset", "_tempDataBuffer", "connected", "_writeDisconnected",
                                "_aborting")):
        return write  # not a plain TCP transport (TLS, a test's): its own write
    send = sock.send

    def write_now(data: bytes) -> None:
        if (not transport._tempDataBuffer and len(transport.dataBuffer) == transport.offset
                and transport.connected and not transport._writeDisconnected and not transport.disconnecting
                # abortConnection() closes only on the next reactor turn; twisted drops writes meanwhile
                and not transport._aborting):
            try:
                sent = send(data)
            except OSError:  # would block, or the connection is failing: the transport finds out
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        write(data)

    return write_now
