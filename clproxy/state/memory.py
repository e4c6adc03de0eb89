"""The embedded state store: every state interface in this process's memory.

Cooldowns, stats, rate windows, counters, token records, quota snapshots and locks. State resets
when the daemon restarts, as the seed's in-memory statistics do. Nothing here knows of Redis: the
Redis store keeps one of these as its mirror of the last known shared state.
"""

import collections
import json
from typing import Deque, Dict, Optional, Set, Tuple

import attr
from twisted.internet import defer
from zope.interface import implementer

from clproxy.interfaces import (IAtomicCooldown, IClientKeys, ILockProvider, ILoginSessions, IQuotaStore,
                                ISessionBindings, ISharedTokens, IStateLifecycle, IStateStore, IUsageCounters,
                                IWorkerMetrics)
from clproxy.state.locks import MemoryLocks
from clproxy.state.model import (OUTCOME_RATE_LIMITED, OUTCOME_SUCCESS, STAT_KEYS, TOKEN_VERSION_FALLBACK,
                                 TOKEN_VERSION_FIELD, AccountState, add_series, empty_stats, success_clears,
                                 validate_outcome)


@attr.s(auto_attribs=True)
class _AccountRecord:
    """Everything kept for one account key (mutable; never leaves this module)."""

    cooling_until: float = 0.0
    backoff_level: int = 0
    #: the latest time a cooldown was decided (``extend_cooldown``'s ``at``); None: unknown
    cooled_at: Optional[float] = None
    attempts: int = 0
    successes: int = 0
    errors: int = 0
    rate_limits: int = 0
    last_attempt_at: Optional[float] = None
    last_error_at: Optional[float] = None
    last_error: Optional[str] = None


#: How many session bindings a memory store keeps unless told otherwise (``limit_bindings``).
DEFAULT_BINDING_CAP = 10000


@attr.s(auto_attribs=True)
class _Binding:
    """One session's binding (mutable; never leaves this module)."""

    key: str
    last_used: float
    expires_at: float


def _copy(record: dict) -> dict:
    """A deep copy through JSON: what a caller gets or gives can never alias the stored record,
    and a record that JSON cannot hold fails here as it would in Redis."""
    return json.loads(json.dumps(record))


def token_version(record) -> Optional[float]:
    """The number that orders two token records (``TOKEN_VERSION_FIELD``, or
    ``TOKEN_VERSION_FALLBACK`` in a record without it), or None."""
    if not isinstance(record, dict):
        return None
    for field in (TOKEN_VERSION_FIELD, TOKEN_VERSION_FALLBACK):
        value = record.get(field)
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            return float(value)
    return None


#: How many distinct days (and months) of usage sums a memory store keeps: the current one and
#: the one before (a request that started before midnight and ends after it).
USAGE_PERIODS_KEPT = 2


#: How many dashboard login sessions a memory store keeps (the oldest is dropped first).
MAX_LOGINS = 1024

#: How many ``--workers`` runs' metric reports a memory store keeps (the oldest dropped first).
WORKER_METRIC_RUNS_KEPT = 4


@attr.s(auto_attribs=True)
class _WorkerReport:
    """The latest metric report of one worker index (``IWorkerMetrics``)."""

    incarnation: str
    totals: Dict[str, float]
    gauges: Dict[str, float]
    live_until: float


@implementer(IStateStore, IAtomicCooldown, ISharedTokens, IQuotaStore, ILockProvider, IStateLifecycle,
             ISessionBindings, IUsageCounters, IClientKeys, ILoginSessions, IWorkerMetrics)
class MemoryStateStore:
    """Every state interface in dicts; every Deferred it returns has already fired.

    Memory stays bounded however long the daemon runs: one record per account key written to
    (reads never create one; ``forget`` drops one), one rate window per rate-limited key holding at
    most ``limit`` timestamps (expired ones are dropped on each use, an emptied window is removed),
    and one int per counter name, one token record and one quota snapshot per account, one lock
    per name held, and at most ``limit_bindings`` session bindings (least recently used evicted
    first), and the usage sums of the latest ``USAGE_PERIODS_KEPT`` days and months (one pair
    per client key name used in them), and the worker metric reports of the latest
    ``WORKER_METRIC_RUNS_KEPT`` runs (one per worker index, plus the retired totals). Nothing grows
    per request.
    """

    def __init__(self, max_bindings: int = DEFAULT_BINDING_CAP):
        self._accounts: Dict[str, _AccountRecord] = {}
        self._rate_windows: Dict[str, Deque[float]] = {}
        self._counters: Dict[str, int] = {}
        self._tokens: Dict[str, dict] = {}
        self._quotas: Dict[str, dict] = {}
        self.locks = MemoryLocks()
        # Session bindings in least-recently-used order (oldest first), and the sessions bound to
        # each account, so counting and dropping one account's bindings need no full scan.
        self._bindings: "collections.OrderedDict[str, _Binding]" = collections.OrderedDict()
        self._bound: Dict[str, Set[str]] = {}
        self._binding_cap = max(0, int(max_bindings))
        # Usage sums for the team limits: period (day or month) -> key name -> [tokens, usd].
        self._usage_days: Dict[str, Dict[str, list]] = {}
        self._usage_months: Dict[str, Dict[str, list]] = {}
        # Client keys (team mode): records by key hash, and the revoked hashes (tombstones).
        self._client_keys: Dict[str, dict] = {}
        self._revoked_keys: Set[str] = set()
        # Dashboard login sessions: token digest -> (key hash, expiry), oldest first.
        self._logins: "collections.OrderedDict[str, Tuple[str, float]]" = collections.OrderedDict()
        # Worker metrics: run -> (retired totals, worker index -> its latest report), oldest run first.
        self._worker_runs: "collections.OrderedDict[str, Tuple[Dict[str, float], Dict[int, _WorkerReport]]]" = \
            collections.OrderedDict()

    def _record(self, key: str) -> _AccountRecord:
        record = self._accounts.get(key)
        if record is None:
            record = self._accounts[key] = _AccountRecord()
        return record

    def get_account_states(self, keys):
        states = {}
        for key in keys:
            record = self._accounts.get(key)
            states[key] = (AccountState() if record is None else
                           AccountState(cooling_until=record.cooling_until,
                                        backoff_level=record.backoff_level))
        return defer.succeed(states)

    def set_cooldown(self, key, until, backoff_level):
        record = self._record(key)
        record.cooling_until = float(until)
        record.backoff_level = int(backoff_level)
        return defer.succeed(None)

    def record_attempt(self, key, now):
        record = self._record(key)
        record.attempts += 1
        record.last_attempt_at = now
        return defer.succeed(None)

    def record_outcome(self, key, outcome, now, error=None, sent_at=None):
        problem = validate_outcome(outcome)
        if problem is not None:
            return defer.fail(problem)
        record = self._record(key)
        if outcome == OUTCOME_SUCCESS:
            record.successes += 1
            if success_clears(record.cooled_at, sent_at):
                record.backoff_level = 0
                record.cooling_until = 0.0
                record.cooled_at = None
            return defer.succeed(None)
        if outcome == OUTCOME_RATE_LIMITED:
            record.rate_limits += 1
        else:
            record.errors += 1
        record.last_error_at = now
        record.last_error = error if error is not None else outcome
        return defer.succeed(None)

    def record_result(self, key, outcome, now, error=None, counter=None, sent_at=None):
        problem = validate_outcome(outcome)
        if problem is not None:
            return defer.fail(problem)
        self.record_attempt(key, now)
        if counter is not None:
            self.incr(counter)
        return self.record_outcome(key, outcome, now, error, sent_at=sent_at)

    def _live_window(self, key, now, window) -> Optional[Deque[float]]:
        """The key's rate window with expired timestamps dropped; None (and removed) when empty."""
        stamps = self._rate_windows.get(key)
        if stamps is None:
            return None
        horizon = now - window
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        if not stamps:
            del self._rate_windows[key]
            return None
        return stamps

    def take_rate_slot(self, key, now, limit, window=60.0):
        if limit < 1:
            return defer.succeed(False)
        stamps = self._live_window(key, now, window)
        if stamps is None:
            stamps = self._rate_windows[key] = collections.deque()
        # A limit lowered at runtime: the oldest stamps beyond it no longer matter.
        while len(stamps) > limit:
            stamps.popleft()
        if len(stamps) >= limit:
            return defer.succeed(False)
        stamps.append(now)
        return defer.succeed(True)

    def rate_usage(self, key, now, window=60.0):
        stamps = self._live_window(key, now, window)
        if stamps is None:
            return defer.succeed((0, None))
        return defer.succeed((len(stamps), stamps[0]))

    def incr(self, counter, amount=1):
        self._counters[counter] = self._counters.get(counter, 0) + amount
        return defer.succeed(None)

    def counters(self):
        return defer.succeed(dict(self._counters))

    def account_stats(self, keys):
        stats = {}
        for key in keys:
            record = self._accounts.get(key)
            stats[key] = (empty_stats() if record is None else
                          {name: getattr(record, name) for name in STAT_KEYS})
        return defer.succeed(stats)

    def forget(self, key):
        self._accounts.pop(key, None)
        self._rate_windows.pop(key, None)
        self._quotas.pop(key, None)
        return defer.succeed(None)

    # IStateLifecycle: memory needs no connection
    def connect(self):
        return defer.succeed(None)

    def close(self):
        return defer.succeed(None)

    # IAtomicCooldown
    def extend_cooldown(self, key, until, backoff_level=None, at=None):
        if at is not None:
            # every cooldown decided counts, even one shorter than the cooldown in place: it is
            # news of the limit that a success sent before it must not undo
            record = self._record(key)
            record.cooled_at = float(at) if record.cooled_at is None else max(record.cooled_at, float(at))
        record = self._accounts.get(key)
        state = (AccountState() if record is None else
                 AccountState(cooling_until=record.cooling_until, backoff_level=record.backoff_level))
        level = state.backoff_level
        if backoff_level is not None:
            level = max(level, int(backoff_level))
        merged = AccountState(max(state.cooling_until, float(until)), level)
        if merged != state:
            self.set_cooldown(key, merged.cooling_until, merged.backoff_level)
        return defer.succeed(merged)

    # ISharedTokens
    def get_token_record(self, key):
        record = self._tokens.get(key)
        return defer.succeed(None if record is None else _copy(record))

    def put_token_record(self, key, record):
        self._tokens[key] = _copy(record)
        return defer.succeed(None)

    def import_token_record(self, key, record):
        stored = self._tokens.get(key)
        if stored is not None:
            new, old = token_version(record), token_version(stored)
            if new is None or old is None or old >= new:
                return defer.succeed(False)
        return self.put_token_record(key, record).addCallback(lambda _: True)

    def delete_token_record(self, key):
        self._tokens.pop(key, None)
        return defer.succeed(None)

    def token_keys(self):
        """The keys with a token record here."""
        return sorted(self._tokens)

    # IQuotaStore
    def put_quota(self, key, snapshot):
        self._quotas[key] = _copy(snapshot)
        return defer.succeed(None)

    def get_quotas(self, keys):
        return defer.succeed({key: (_copy(self._quotas[key]) if key in self._quotas else None)
                              for key in keys})

    # ILockProvider
    def acquire(self, name, ttl_ms, wait, clock):
        return self.locks.acquire(name, ttl_ms, wait, clock)

    def release(self, token):
        return self.locks.release(token)

    # ISessionBindings
    def _unbind(self, session: str) -> None:
        binding = self._bindings.pop(session)
        sessions = self._bound.get(binding.key)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._bound[binding.key]

    def _live_binding(self, session, now) -> Optional[_Binding]:
        """The binding of ``session`` unless it expired (an expired one is dropped)."""
        binding = self._bindings.get(session)
        if binding is not None and binding.expires_at <= now:
            self._unbind(session)
            return None
        return binding

    def _sweep_bindings(self, now) -> None:
        """Drop expired bindings from the least recently used end (with one TTL for every
        binding, that is expiry order; a longer-lived one stops the sweep early, which only
        delays freeing memory: reads check expiry themselves)."""
        while self._bindings:
            session, binding = next(iter(self._bindings.items()))
            if binding.expires_at > now:
                return
            self._unbind(session)

    def _evict_bindings(self) -> None:
        while len(self._bindings) > self._binding_cap:
            self._unbind(next(iter(self._bindings)))

    def touch_binding(self, session, now, ttl):
        binding = self._live_binding(session, now)
        if binding is None:
            return defer.succeed(None)
        before = (binding.key, binding.last_used)
        binding.last_used = now
        binding.expires_at = now + ttl
        self._bindings.move_to_end(session)
        return defer.succeed(before)

    def get_binding(self, session, now):
        binding = self._bindings.get(session)
        if binding is None or binding.expires_at <= now:
            return defer.succeed(None)
        return defer.succeed((binding.key, binding.last_used))

    def put_binding(self, session, key, now, ttl):
        self._sweep_bindings(now)
        previous = self._live_binding(session, now)
        replaced = None if previous is None else previous.key
        if previous is not None:
            self._unbind(session)
        self._bindings[session] = _Binding(key, now, now + ttl)
        self._bound.setdefault(key, set()).add(session)
        self._evict_bindings()
        return defer.succeed(replaced)

    def drop_bindings_of(self, key):
        sessions = self._bound.pop(key, set())
        for session in sessions:
            del self._bindings[session]
        return defer.succeed(len(sessions))

    def count_bindings(self, now, keys=None):
        self._sweep_bindings(now)
        wanted = list(self._bound) if keys is None else list(keys)
        counts = {}
        for key in wanted:
            counts[key] = sum(1 for session in self._bound.get(key, ())
                              if self._bindings[session].expires_at > now)
        if keys is None:
            counts = {key: count for key, count in counts.items() if count}
        return defer.succeed(counts)

    def limit_bindings(self, cap):
        self._binding_cap = max(0, int(cap))
        self._evict_bindings()

    # IUsageCounters
    @staticmethod
    def _add_period(periods: Dict[str, Dict[str, list]], period: str, key_name: str, tokens: int,
                    usd: float) -> None:
        sums = periods.setdefault(period, {}).setdefault(key_name, [0, 0.0])
        sums[0] += int(tokens)
        sums[1] += float(usd)
        while len(periods) > USAGE_PERIODS_KEPT:  # ISO dates sort in time order: drop the oldest
            del periods[min(periods)]

    def add_usage(self, key_name, day, tokens, usd):
        self._add_period(self._usage_days, day, key_name, tokens, usd)
        self._add_period(self._usage_months, day[:7], key_name, tokens, usd)
        return defer.succeed(None)

    def get_usage(self, key_name, day):
        tokens, usd = self._usage_days.get(day, {}).get(key_name, (0, 0.0))
        return defer.succeed((tokens, usd))

    def get_month_usage(self, key_name, month):
        tokens, usd = self._usage_months.get(month, {}).get(key_name, (0, 0.0))
        return defer.succeed((tokens, usd))
    # IClientKeys
    def put_key(self, key_hash, record):
        if key_hash in self._revoked_keys:
            return defer.succeed(False)
        self._client_keys[key_hash] = _copy(record)
        return defer.succeed(True)

    def revoke_key(self, key_hash):
        self._client_keys.pop(key_hash, None)
        self._revoked_keys.add(key_hash)
        return defer.succeed(None)

    def all_keys(self):
        return defer.succeed({h: _copy(r) for h, r in self._client_keys.items()})

    # ILoginSessions
    def put_login(self, digest, key_hash, expires, now):
        self._logins[digest] = (key_hash, float(expires))
        self._logins.move_to_end(digest)
        while len(self._logins) > MAX_LOGINS:
            self._logins.popitem(last=False)
        return defer.succeed(None)

    def get_login(self, digest, now):
        found = self._logins.get(digest)
        if found is None:
            return defer.succeed(None)
        if found[1] <= now:
            del self._logins[digest]
            return defer.succeed(None)
        return defer.succeed(found[0])

    def drop_login(self, digest):
        self._logins.pop(digest, None)
        return defer.succeed(None)

    # IWorkerMetrics
    def publish_worker_metrics(self, run, worker, incarnation, totals, gauges, now, ttl):
        if run not in self._worker_runs:
            self._worker_runs[run] = ({}, {})
            while len(self._worker_runs) > WORKER_METRIC_RUNS_KEPT:
                self._worker_runs.popitem(last=False)
        retired, reports = self._worker_runs[run]
        previous = reports.get(int(worker))
        if previous is not None and previous.incarnation != str(incarnation):
            add_series(retired, previous.totals)
        reports[int(worker)] = _WorkerReport(str(incarnation), add_series({}, totals), add_series({}, gauges),
                                             float(now) + float(ttl))
        return defer.succeed(None)

    def read_worker_metrics(self, run, now):
        retired, reports = self._worker_runs.get(run, ({}, {}))
        totals, gauges = add_series({}, retired), {}
        for report in reports.values():
            add_series(totals, report.totals)
            if report.live_until > now:
                add_series(gauges, report.gauges)
        return defer.succeed((totals, gauges))

    def adopt_client_keys(self, records) -> None:
        """Replace the live client keys with ``records`` (``{hash: dict}``), tombstones kept:
        for a mirror of a shared store."""
        self._client_keys = {h: _copy(r) for h, r in records.items() if h not in self._revoked_keys}

    def footprint(self) -> Dict[str, int]:
        """Sizes of the internal tables (for tests and diagnostics): account records, rate windows,
        timestamps held across all windows, counters (bindings: ``binding_footprint``)."""
        return {"accounts": len(self._accounts),
                "rate_windows": len(self._rate_windows),
                "rate_stamps": sum(len(s) for s in self._rate_windows.values()),
                "counters": len(self._counters)}

    def binding_footprint(self) -> Dict[str, int]:
        """Sizes of the session binding tables (for tests and diagnostics): bindings held and
        accounts with at least one."""
        return {"bindings": len(self._bindings), "bound_accounts": len(self._bound)}
