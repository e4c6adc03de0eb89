"""Graceful shutdown: count the requests in flight and wait for them, up to a deadline.

The site tracks every request with :meth:`Drainer.track`; on stop the daemon first stops listening
and answers what still arrives with :class:`ShuttingDown`, then waits on :meth:`Drainer.drain`,
which fires when the last request ends or the timeout passes.
"""

from typing import List

from twisted.internet import defer
from twisted.web import resource

from clproxy.errors import ProxyError
from clproxy.http.site import write_error
from clproxy.observe import console

log = console.logger(__name__)


class Drainer:
    """Requests in flight, and a way to wait until there are none (at most ``timeout`` seconds)."""

    def __init__(self, clock, timeout: float):
        self.clock = clock
        self.timeout = timeout
        self.draining = False
        self._count = 0
        self._waiters: List[defer.Deferred] = []
        self._timer = None
        #: when the first drain() gives up (the clock's seconds); later calls share it
        self._deadline = None

    def track(self, finished: defer.Deferred) -> None:
        """Count one request until ``finished`` (its ``notifyFinish()``) fires or fails."""
        self._count += 1
        finished.addBoth(self._ended)

    def _ended(self, _result) -> None:
        # Returning None also consumes a disconnect failure, which is a normal way for a request to end.
        self._count -= 1
        if self._count <= 0:
            self._count = 0
            self._release()

    def in_flight(self) -> int:
        """How many tracked requests have not ended."""
        return self._count

    def drain(self) -> defer.Deferred:
        """A Deferred that fires (with the number cut short) when nothing is in flight or at the
        timeout. The timeout runs from the first call: every later call (each service that waits
        for the drain at stop) shares that one deadline, and one made after it fires at once."""
        self.draining = True
        if self._deadline is None:
            self._deadline = self.clock.seconds() + max(0.0, self.timeout)
        d = defer.Deferred()
        if self._count == 0:
            d.callback(0)
            return d
        if self.clock.seconds() >= self._deadline:
            # the drain already gave up: a second full wait doubled the stop (past systemd's
            # TimeoutStopSec, and past the supervisor's kill of a worker still draining)
            d.callback(self._count)
            return d
        self._waiters.append(d)
        if self._timer is None:
            log.info("draining {count} request(s) in flight (up to {timeout:g}s)", count=self._count,
                     timeout=self.timeout)
            self._timer = self.clock.callLater(self._deadline - self.clock.seconds(), self._expired)
        return d

    def hurry(self) -> None:
        """Give up the drain now (a second SIGINT/SIGTERM): the waiters fire with what is left in
        flight, as at the timeout. Called before :meth:`drain` (both signals came before the stop
        began), the drain that follows gives up at once."""
        now = self.clock.seconds()
        self._deadline = now if self._deadline is None else min(self._deadline, now)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._expired(why="drain cut short by a second signal")

    def _release(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(0)

    def _expired(self, why: str = "") -> None:
        self._timer = None
        cut = self._count
        log.warn("{why}: {cut} request(s) still in flight were cut",
                 why=why or f"drain timeout after {self.timeout:g}s", cut=cut)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(cut)


class ShuttingDown(resource.Resource):
    """What the site serves once the daemon stops: every request that arrives then (on a connection
    kept alive from before: new ones are no longer accepted) gets a 503 and its connection closed,
    so the client retries on a new one (another worker, or the daemon once it is back), instead of
    starting an upstream request the drain would then wait for, or cut."""

    isLeaf = True
    ERROR = ProxyError(503, "clproxy is shutting down; retry the request on a new connection",
                       headers=((b"connection", b"close"), (b"retry-after", b"1")))

    def render(self, request):
        channel = getattr(request, "channel", None)
        if channel is not None:
            channel.persistent = False  # closed once this answer is written
        return write_error(request, self.ERROR)
