"""What the dashboard shows, and the live feed that keeps every open page current.

Server-sent events, not polling: the daemon already streams SSE well, a page learns of a cooldown
within one tick without asking, and the work per tick is shared. Each tick (:data:`TICK`, 1 s)
builds the state document once, encodes it once, and writes the same bytes to every open page, with
only the requests that finished since the previous tick; a page that has just connected, or one
that fell behind (its connection pushed back), gets the whole list instead. Each tick first asks
every page whether what let it in still does (its admin key not revoked, its session not logged
out or expired, see :meth:`clproxy.dashboard.access.DashboardAccess.watch`), and ends the stream of one that is
no longer let in: the feed is checked once, when it opens, and then runs for hours. So 20 open pages cost one
document per second plus the bytes, and with no page open nothing runs at all: the tick starts with
the first subscriber and stops with the last. A page whose connection cannot take more is skipped
(it gets a full frame when it can again), so a stuck browser never grows the daemon's buffers.

The document (``GET /dashboard/state`` answers it whole, the feed's frames carry it)::

    {"full": bool, "state": {...}, "requests": [...newest first...]}

``state`` is :func:`dashboard_state`: the proxy-wide figures, one row per account, one per client
key, and the traffic of the last hour. It is chosen field by field from the ``/status`` document, so
nothing that is not meant for the page (paths, key prefixes, upstream URLs) reaches it.
"""

import inspect
import json
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Set, Union

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from clproxy.observe import console
from clproxy.observe.activity import Activity
from clproxy.routing.headroom import current_windows, percent

log = console.logger(__name__)

TICK = 1.0
def _quota(row: Dict[str, Any]) -> Dict[str, Any]:
    """The row's current 5h/7d windows with their percent for the bars (0..100: ``aria-valuenow``)."""
    return {name: {"percent": min(100, percent(window["utilization"]) or 0), "reset": window.get("reset"),
                   "status": window.get("status")}
            for name, window in current_windows(row.get("quota")).items()}


def _account(row: Dict[str, Any]) -> Dict[str, Any]:
    return {"name": row.get("name"), "kind": row.get("kind"), "state": row.get("state"),
            "coolingUntil": row.get("cooling_until"), "backoffLevel": row.get("backoff_level") or 0,
            "attempts": row.get("attempts") or 0, "successes": row.get("successes") or 0,
            "errors": row.get("errors") or 0, "rateLimits": row.get("rate_limits") or 0,
            "lastError": row.get("last_error"), "lastErrorAt": row.get("last_error_at"),
            "disabledReason": row.get("disabledReason"), "quota": _quota(row),
            "inFlight": row.get("inFlight") or 0, "sessions": row.get("sessions") or 0,
            "cacheHitRatio": row.get("cacheHitRatio")}


def _key(row: Dict[str, Any]) -> Dict[str, Any]:
    return {"name": row.get("name"), "admin": bool(row.get("admin")), "limits": row.get("limits") or {},
            "today": row.get("today") or {}, "month": row.get("month") or {}}


def dashboard_state(status: Dict[str, Any], *, now: float, traffic: List[dict],
                    fallback_chain: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The page's state from a ``/status`` document (see the module docstring)."""
    counters = status.get("counters") or {}
    accounts = [_account(row) for row in status.get("accounts") or ()]
    return {
        "now": now,
        "proxy": {"version": status.get("version"), "uptime": status.get("uptime"),
                  "strategy": status.get("strategy"), "fallbackChain": list(fallback_chain),
                  "attempts": counters.get("upstream_attempts", 0),
                  "completed": counters.get("completed_requests", 0),
                  "truncated": counters.get("truncated_streams", 0),
                  "sessionMoves": status.get("sessionMoves", 0),
                  "queueLength": status.get("queueLength", 0),
                  "inFlight": sum(a["inFlight"] for a in accounts)},
        "accounts": accounts,
        "keys": [_key(row) for row in status.get("keys") or ()],
        "traffic": traffic,
    }


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def frame(state: bytes, requests: bytes, full: bool) -> bytes:
    """One SSE ``update`` event carrying an encoded state and request list."""
    return (b'event: update\ndata: {"full":' + (b"true" if full else b"false") + b',"state":' + state
            + b',"requests":' + requests + b"}\n\n")


@implementer(IPushProducer)
class Subscriber:
    """One open page's event stream. Its connection pauses it when the page cannot keep up; a paused
    subscriber is skipped and owed a full frame. ``admitted()`` says whether the viewer is still let
    in (asked on every tick)."""

    def __init__(self, request, admitted: Callable[[], Union[bool, Awaitable[bool]]] = lambda: True):
        self.request = request
        self.admitted = admitted
        self.paused = False
        self.needs_full = True
        self.closed = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.needs_full = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def close(self) -> None:
        """End the stream (the daemon is stopping, or the viewer is no longer let in)."""
        if not self.closed:
            self.closed = True
            self.request.unregisterProducer()
            self.request.finish()


class DashboardFeed(service.Service):
    """The dashboard's data: :meth:`snapshot` for one read, :meth:`subscribe` for a live stream.

    ``state()`` builds the state document (async: it reads the state store); ``activity`` holds the
    recent requests; ``clock`` drives the tick.
    """

    def __init__(self, state: Callable[[], Awaitable[Dict[str, Any]]], activity: Activity, clock,
                 tick: float = TICK):
        self.state = state
        self.activity = activity
        self.clock = clock
        self.tick = tick
        self.subscribers: Set[Subscriber] = set()
        self._loop: Optional[task.LoopingCall] = None
        self._busy = False
        self._sent_seq = 0
        #: how many state documents were built (the benchmark and tests read it)
        self.built = 0

    async def snapshot(self) -> Dict[str, Any]:
        """The whole document: the state and every kept request."""
        state = await self.state()
        self.built += 1
        return {"full": True, "state": state, "requests": self.activity.recent()}

    def subscribe(self, request, admitted: Callable[[], Union[bool, Awaitable[bool]]] = lambda: True
                  ) -> Subscriber:
        """Stream updates to ``request`` (its headers are the caller's) until it goes away or
        ``admitted()`` (a bool, or an awaitable of one) turns False (checked on every tick)."""
        subscriber = Subscriber(request, admitted)
        self.subscribers.add(subscriber)
        request.registerProducer(subscriber, True)
        request.notifyFinish().addBoth(self._gone, subscriber)
        if self._loop is None:
            self._loop = task.LoopingCall(self._run_tick)
            self._loop.clock = self.clock
            self._loop.start(self.tick, now=False).addErrback(
                lambda failure: log.failure("the dashboard feed stopped", failure))
        self._run_tick()  # the new page gets its first frame now, not a tick later
        return subscriber

    def _gone(self, _result, subscriber: Subscriber) -> None:
        subscriber.closed = True
        self.subscribers.discard(subscriber)
        if not self.subscribers and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def _run_tick(self) -> None:
        if self._busy:
            return  # the previous tick is still reading the store: the pages get the next one
        self._busy = True
        d = defer.ensureDeferred(self._send())
        d.addErrback(lambda failure: log.failure("a dashboard update failed", failure))
        d.addBoth(self._done)

    def _done(self, _result) -> None:
        self._busy = False

    async def _send(self) -> None:
        for subscriber in list(self.subscribers):
            if not subscriber.closed and not await self._still_admitted(subscriber):
                # its key was revoked (or lost its admin right), its session ended: no more state
                subscriber.close()
        if not self.subscribers:
            return
        state = _encode(await self.state())
        self.built += 1
        delta_rows = self.activity.recent(self._sent_seq)
        self._sent_seq = self.activity.seq
        delta: Optional[bytes] = None
        full: Optional[bytes] = None
        for subscriber in list(self.subscribers):
            if subscriber.closed or subscriber.paused:
                continue
            if subscriber.needs_full:
                if full is None:
                    full = frame(state, _encode(self.activity.recent()), True)
                subscriber.needs_full = False
                subscriber.write(full)
            else:
                if delta is None:
                    delta = frame(state, _encode(delta_rows), False)
                subscriber.write(delta)

    @staticmethod
    async def _still_admitted(subscriber: Subscriber) -> bool:
        try:
            admitted = subscriber.admitted()
            if inspect.isawaitable(admitted):  # a session is read from the state store
                admitted = await admitted
        except Exception:
            # a store that cannot say ends the stream (the page asks again): never shown unchecked
            log.failure("checking a dashboard viewer failed")
            return False
        return bool(admitted)

    def stopService(self):
        """Close every open stream (a graceful stop must not wait on open pages) and stop ticking."""
        for subscriber in list(self.subscribers):
            subscriber.close()
        self.subscribers.clear()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()
