"""The daemon's recent activity, in memory and bounded: what the dashboard shows of the last hour.

:class:`Activity` keeps two things, fed by the request records (``clproxy.observe.recorder``):

* a traffic ring of one bucket per minute for the last ``minutes`` minutes: requests finished,
  errors (a status of 400 or more, or a truncated stream), 429s met upstream (every attempt that got
  one, the thing that cools accounts), and a latency histogram for p50/p95;
* the last ``keep`` requests (time, key, model, account, status, duration, tokens, attempts),
  newest first, each with a sequence number so a live feed can send only what is new.

Both are bounded whatever the traffic: the ring holds ``minutes`` buckets of fixed size (the
latencies go into :data:`LATENCY_BOUNDS` buckets, not a list), the request list a ``deque`` of
``keep``. It is never read back from the logs: a restarted daemon starts with an empty hour.
Recording is a few dict and list operations per request; reading builds JSON-ready documents.
Nothing here holds a secret: a request row names its client key, never the key itself.
"""

import bisect
import collections
from typing import Any, Deque, Dict, List, Optional, Sequence

#: Upper bounds (milliseconds) of the latency histogram's buckets; one more bucket holds the rest.
#: About 25% apart from 1 ms to 20 min, so p50/p95 are read to within a quarter of their value.
LATENCY_BOUNDS: Sequence[float] = tuple(round(1.25 ** i, 3) for i in range(0, 64))
MINUTE = 60.0


class _Minute:
    """One minute of traffic."""

    __slots__ = ("start", "requests", "errors", "rate_limited", "latency")

    def __init__(self, start: float):
        self.start = start
        self.requests = 0
        self.errors = 0
        self.rate_limited = 0
        self.latency: List[int] = [0] * (len(LATENCY_BOUNDS) + 1)


def quantile_ms(histogram: Sequence[int], q: float) -> Optional[float]:
    """The ``q`` quantile (0..1) of a :data:`LATENCY_BOUNDS` histogram, as the upper bound of the
    bucket it falls in (None for an empty histogram; the last bucket reads as its lower bound)."""
    total = sum(histogram)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank and count:
            return LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
    return LATENCY_BOUNDS[-1]


class Activity:
    """The last hour of traffic and the last requests of one daemon (see the module docstring).

    ``clock`` gives the time of every event (an ``IReactorTime``; a ``task.Clock`` in tests).
    """

    def __init__(self, clock, minutes: int = 60, keep: int = 200):
        if minutes < 1 or keep < 1:
            raise ValueError("minutes and keep must be at least 1")
        self.clock = clock
        self.minutes = minutes
        self.keep = keep
        self._ring: Deque[_Minute] = collections.deque(maxlen=minutes)
        self._recent: Deque[Dict[str, Any]] = collections.deque(maxlen=keep)
        #: the sequence number of the newest request recorded (0: none yet)
        self.seq = 0

    def _bucket(self, now: float) -> _Minute:
        start = now - now % MINUTE
        ring = self._ring
        if ring and ring[-1].start == start:
            return ring[-1]
        if ring and ring[-1].start > start:  # the clock stepped back: count it in the newest minute
            return ring[-1]
        bucket = _Minute(start)
        ring.append(bucket)
        return bucket

    def rate_limited(self, now: float) -> None:
        """An upstream attempt met a 429 at ``now``."""
        self._bucket(now).rate_limited += 1

    def finished(self, row: Dict[str, Any]) -> None:
        """One request is answered. ``row`` is its dashboard row: ``at`` (epoch seconds), ``status``,
        ``durationMs`` and ``truncated`` are read here; the row is kept as given (plus ``seq``)."""
        bucket = self._bucket(row["at"])
        bucket.requests += 1
        status = row.get("status") or 0
        if status >= 400 or row.get("truncated"):
            bucket.errors += 1
        duration = row.get("durationMs")
        if duration is not None:
            bucket.latency[bisect.bisect_left(LATENCY_BOUNDS, duration)] += 1
        self.seq += 1
        row["seq"] = self.seq
        self._recent.append(row)

    def traffic(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """The last ``minutes`` minutes ending with the current one, oldest first, one entry per
        minute (quiet minutes included, as zeros): ``{"t": minute start, "requests", "errors",
        "rateLimited", "p50Ms", "p95Ms"}`` (the quantiles None in a minute without requests)."""
        now = self.clock.seconds() if now is None else now
        current = now - now % MINUTE
        by_start = {bucket.start: bucket for bucket in self._ring}
        series = []
        for i in range(self.minutes - 1, -1, -1):
            start = current - i * MINUTE
            bucket = by_start.get(start)
            if bucket is None:
                series.append({"t": start, "requests": 0, "errors": 0, "rateLimited": 0,
                               "p50Ms": None, "p95Ms": None})
            else:
                series.append({"t": start, "requests": bucket.requests, "errors": bucket.errors,
                               "rateLimited": bucket.rate_limited,
                               "p50Ms": quantile_ms(bucket.latency, 0.5),
                               "p95Ms": quantile_ms(bucket.latency, 0.95)})
        return series

    def recent(self, after: int = 0) -> List[Dict[str, Any]]:
        """The kept requests with a sequence number above ``after``, newest first."""
        rows = []
        for row in reversed(self._recent):
            if row["seq"] <= after:
                break
            rows.append(row)
        return rows
