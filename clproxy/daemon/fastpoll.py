"""The epoll reactor's event loop without a log context built around every I/O event.

twisted's ``EPollReactor.doPoll`` hands each ready descriptor to ``_doReadOrWrite`` through
``log.callWithLogger``: per event it asks the descriptor for its log prefix, copies the log context
dict, pushes it on the context stack and pops it again, so that a legacy ``log.msg`` made while
handling the event says which connection it came from. clproxy logs through ``twisted.logger``
(which does not read that context), and at 1,000 streams there are ~50,000 events a second: the
wrapper was ~5% of the daemon's time (py-spy, benchmarks/README.md), ~1 µs an event.

:func:`install` gives a reactor the same loop with the event handed to ``_doReadOrWrite``
directly; an exception that escapes it is still logged with the descriptor's prefix, as
``callWithLogger`` does (``_doReadOrWrite`` already catches and logs what the protocol raises
and disconnects it).

A read event alone on an outgoing connection (an upstream's next SSE event, the usual event at
1,000 streams) is handled inline, as ``_doReadOrWrite`` handles it (the descriptor checked, then
``doRead``; what it raises logged; a reason to close handed to ``_disconnectSelectable``), without
the two calls around it; every other event goes through ``_doReadOrWrite``.

Within each turn the outgoing connections (``tcp.Client``: the upstreams, Redis) are served
first, then the client connections and the listening port. At 1,000 streams a turn holds dozens
of upstream events (each a relayed SSE event a client is waiting for) beside new requests, whose
handling costs ~20x an event's: served in epoll's order, an event that came after a burst of new
requests waited for all of them. Nothing waits longer than a turn, and an event whose descriptor
a relay's event closed meanwhile is dropped, as twisted drops one removed earlier in the turn
(epoll reports it again if it is still ready). Measured in benchmarks/README.md ("Relays first").

Only twisted's epoll reactor is changed, and only when the code it mirrors
is the code it was checked against (:mod:`clproxy.mirrored`); anything else keeps its own loop.
"""

import errno
import sys
import types

from twisted.internet import epollreactor, posixbase, tcp
from twisted.python import log

from clproxy import mirrored

#: What :func:`do_poll` replaces or relies on: the loop it replaces, the wrapper it leaves out,
#: and the dispatch it calls (which must keep catching the protocol's exceptions).
MIRRORED = (
    (epollreactor.EPollReactor, "doPoll"),
    (log, "callWithLogger"),
    (posixbase._PollLikeMixin, "_doReadOrWrite"),
)

#: sha256 of the MIRRORED functions' source for the twisted releases checked (26.10.0).
KNOWN_FINGERPRINTS = frozenset({
    "36f3829bc30978121f2ec62b6da0173d7a8d390a396cb835654b30c78c1b4e9a",
})

#: twisted's dispatch of one event, whose read-only case :func:`do_poll` takes inline
_TWISTED_DISPATCH = posixbase._PollLikeMixin._doReadOrWrite
_POLL_IN = epollreactor.EPollReactor._POLL_IN

#: Whether this twisted's loop is the one :func:`do_poll` was checked against (computed once).
ENABLED = mirrored.fingerprint(MIRRORED) in KNOWN_FINGERPRINTS


def install(reactor) -> bool:
    """Give ``reactor`` :func:`do_poll` as its loop step when it is twisted's epoll reactor and
    this twisted is a checked one; True when it has it (now or already)."""
    if type(reactor) is not epollreactor.EPollReactor or not ENABLED:
        return False
    # the reactor's run loop calls self.doIteration(timeout) on every turn: an instance attribute
    # takes the place of the class's doIteration (= doPoll) for this reactor only
    if getattr(reactor.doIteration, "__func__", None) is not do_poll:
        reactor.doIteration = types.MethodType(do_poll, reactor)  # type: ignore[method-assign]
    return True


def do_poll(self, timeout):
    """``EPollReactor.doPoll`` with each event dispatched without ``log.callWithLogger``, the
    outgoing connections' (``tcp.Client``: upstreams, Redis) before the others'."""
    if timeout is None:
        timeout = -1  # wait until something happens
    try:
        # at most as many events as descriptors watched, for at most timeout seconds (twisted's)
        ready = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    # twisted's own dispatch (not a test's stand-in): its read-only case is taken inline below
    inline = getattr(dispatch, "__func__", None) is _TWISTED_DISPATCH
    later = []  # (selectable, fd, event) of client connections and listening ports
    for fd, event in ready:
        selectable = selectables.get(fd)
        if selectable is None:  # removed by an earlier event of this same poll
            continue
        if type(selectable) is tcp.Client:
            if event == _POLL_IN and inline:
                # _doReadOrWrite for data to read and nothing else, the usual event of a relayed
                # stream, without the two calls around it (~2,200 of an event's ~32,000
                # instructions: benchmarks/event_cost.py)
                in_read = False
                try:
                    if selectable.fileno() == -1:
                        why = posixbase._NO_FILEDESC
                    else:
                        why = selectable.doRead()
                        in_read = True
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    _disconnect(self, selectable, why, in_read)
            else:
                _dispatch(dispatch, selectable, fd, event)
        else:
            later.append((selectable, fd, event))
    for selectable, fd, event in later:
        if selectables.get(fd) is selectable:  # not closed by a relay's event (its fd maybe reused)
            _dispatch(dispatch, selectable, fd, event)


def _dispatch(dispatch, selectable, fd, event) -> None:
    """Hand one event to the reactor's dispatch; log what escapes it, as callWithLogger would."""
    try:
        dispatch(selectable, fd, event)
    except KeyboardInterrupt:
        raise
    except BaseException:
        _log_escaped(selectable)


def _disconnect(reactor, selectable, why, in_read: bool) -> None:
    """The end of ``_doReadOrWrite`` for the inline read: disconnect ``selectable`` for ``why``;
    log what escapes, as :func:`_dispatch` does."""
    try:
        reactor._disconnectSelectable(selectable, why, in_read)
    except KeyboardInterrupt:
        raise
    except BaseException:
        _log_escaped(selectable)


def _log_escaped(selectable) -> None:
    """Log the exception being handled with ``selectable``'s prefix, as callWithLogger would."""
    try:
        prefix = selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        prefix = "(buggy logPrefix method)"
    log.err(system=prefix)
