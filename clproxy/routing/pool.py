"""Which accounts one request may try, in which order, and what each attempt did to its account.

Selection (fill-first, smooth weighted round-robin, per-account rateLimit) over the cooldowns and
stats kept in an ``IStateStore``; the verdicts themselves come from :mod:`clproxy.routing.policy`.
"""

import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet import defer

from clproxy.accounts.model import Account
from clproxy.config.schema import STRATEGIES
from clproxy.interfaces import IAtomicCooldown
from clproxy.routing.policy import SUCCESS, Verdict
from clproxy.state.model import OUTCOME_ERROR, OUTCOME_RATE_LIMITED, OUTCOME_SUCCESS

FILL_FIRST = "fill-first"
ROUND_ROBIN = "round-robin"
#: Same base order as fill-first; :func:`clproxy.routing.headroom.order_for_new_session` reorders a
#: new session's candidates by quota (unknown first, then soonest 5h reset).
DRAIN_SOONEST = "drain-soonest"

#: ``Account.rate_limit`` is requests per this many seconds (a sliding window).
RATE_WINDOW = 60.0
#: The proxy-wide counter of upstream attempts, bumped once per ``record``.
UPSTREAM_ATTEMPTS = "upstream_attempts"


class _WallClock:
    """``IReactorTime.seconds`` without a reactor, for callers that inject no clock."""

    @staticmethod
    def seconds() -> float:
        return time.time()


class AccountPool:
    """Account selection and cooldown bookkeeping for one process.

    Use per request: ``accounts = await pool.candidates(all_accounts)``; then for each account in
    order, ``await pool.admit(account)`` right before sending (False: skip it, its rateLimit is
    reached) and ``await pool.record(account, verdict)`` once the attempt has a verdict (also for
    network errors). A retry with the same account after a token refresh is a new attempt: admit and
    record it again.

    **Counting.** ``record`` counts the attempt: the account's ``attempts`` and ``last_attempt_at``,
    the proxy-wide ``upstream_attempts`` counter, and exactly one outcome (success, rate-limited or
    error). So every attempt that gets a verdict is counted exactly once, and
    ``attempts == successes + errors + rate_limits`` per account. ``admit`` only takes a rate slot:
    an admitted attempt abandoned before it has a verdict (the client went away) uses a slot but is
    not counted as an attempt.

    **Memory.** Cooldowns and stats live in the store (bounded there per account key). The pool
    itself keeps the round-robin weights, pruned on every ``candidates`` call to the accounts passed
    in, and the set of keys it wrote state for, which ``retain`` trims after a reload. Nothing is
    kept per request.
    """

    def __init__(self, store, strategy: str = FILL_FIRST, clock=None):
        self._store = store
        self._clock = clock if clock is not None else _WallClock()
        self.strategy = strategy
        # Smooth weighted round-robin "current weight" per account key (nginx's algorithm).
        self._current_weights: Dict[str, int] = {}
        self._written_keys: Set[str] = set()

    @property
    def strategy(self) -> str:
        """``"fill-first"``, ``"round-robin"`` or ``"drain-soonest"``; may be reassigned at runtime
        (hot reload)."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in STRATEGIES:
            raise ValueError("unknown strategy {!r}; expected one of {}".format(
                value, ", ".join(STRATEGIES)))
        self._strategy = value

    def _now(self) -> float:
        return self._clock.seconds()

    async def candidates(self, accounts: Sequence[Account]) -> List[Account]:
        """The accounts one request may try, in order, each once: enabled, not cooling and below
        their rateLimit now.

        fill-first keeps the configured order (the first usable account always comes first);
        drain-soonest does too here (its quota ordering is the headroom rule's, applied by the caller).
        round-robin puts the smooth-weighted pick first, then the others in configured order after
        it; each call advances the rotation by one pick. No rate slot is taken here (see ``admit``).
        """
        now = self._now()
        self._prune_weights(accounts)
        usable = await self._usable(accounts, now)
        if self._strategy == ROUND_ROBIN and usable:
            first = self._pick_weighted(usable)
            return usable[first:] + usable[:first]
        return usable

    async def admit(self, account: Account) -> bool:
        """Take a rate slot for one attempt with ``account`` right before it is sent.

        True when the account has no rateLimit or is below it (the slot is then counted); False
        means skip this account for this request.
        """
        limit = _rate_limit(account)
        if limit is None:
            return True
        self._written_keys.add(account.key)
        return await self._store.take_rate_slot(account.key, self._now(), limit, RATE_WINDOW)

    def record(self, account: Account, verdict: Verdict, sent_at: Optional[float] = None) -> defer.Deferred:
        """Count one attempt with ``account`` and apply its verdict; a Deferred firing with None
        once done, the store's call already sent when this returns.

        Counts the attempt (see the class docstring), then: a success resets the backoff level and
        ends any cooldown -- unless that cooldown was decided at or after ``sent_at`` (when the
        attempt was sent, the pool's clock): a slow request sent before another one's 429 proves
        nothing about the limit that 429 reported; a verdict with a cooldown (429, 401 both API-key
        and OAuth "refresh", 402, 403) cools the account until ``now + cooldown`` -- or longer if it
        was already cooling longer -- and stores the verdict's backoff level; other verdicts change
        neither. Without ``sent_at`` a success clears whatever cooldown there is.
        """
        now = self._now()
        key = account.key
        self._written_keys.add(key)
        if verdict.action == SUCCESS:
            outcome, error = OUTCOME_SUCCESS, None
        else:
            outcome = OUTCOME_RATE_LIMITED if verdict.status == 429 else OUTCOME_ERROR
            error = _error_text(verdict)
        # the attempt, its outcome and the proxy-wide count in one store call (one Redis round trip);
        # a plain Deferred, no coroutine: a success is recorded this way on every request
        if sent_at is None:  # (a store written before sent_at existed still works for such callers)
            recorded = self._store.record_result(key, outcome, now, error=error, counter=UPSTREAM_ATTEMPTS)
        else:
            recorded = self._store.record_result(key, outcome, now, error=error, counter=UPSTREAM_ATTEMPTS,
                                                 sent_at=sent_at)
        if verdict.cooldown is None:
            return recorded
        until, level = now + verdict.cooldown, verdict.backoff_level
        return recorded.addCallback(lambda _: defer.ensureDeferred(self._extend(key, until, level, now)))

    async def cool(self, account: Account, seconds: float) -> None:
        """Cool ``account`` for ``seconds`` from now (never shortening a longer cooldown) without
        counting an attempt: for a decision about an attempt already recorded."""
        self._written_keys.add(account.key)
        now = self._now()
        await self._extend(account.key, now + seconds, None, now)

    async def _extend(self, key: str, until: float, level: Optional[int], at: float) -> None:
        """Cool ``key`` until ``until`` unless it already cools longer (two requests in flight on
        one account: a short cooldown must not cut a long one), decided at ``at`` (a success sent
        before then leaves it in place). A shared store does the max in one atomic step, so
        instances cannot overwrite each other's longer cooldown."""
        if IAtomicCooldown.providedBy(self._store):
            await self._store.extend_cooldown(key, until, level, at=at)
            return
        state = (await self._store.get_account_states([key]))[key]
        await self._store.set_cooldown(key, max(until, state.cooling_until),
                                       state.backoff_level if level is None else level)

    async def backoff_level(self, account: Account) -> int:
        """The account's current 429 backoff level (pass it to ``policy.classify``)."""
        return (await self._store.get_account_states([account.key]))[account.key].backoff_level

    async def cooling(self, accounts: Sequence[Account]) -> List[Tuple[Account, float]]:
        """The enabled accounts cooling now, each with the absolute time its cooldown ends."""
        now = self._now()
        enabled = _unique(a for a in accounts if a.enabled)
        states = await self._store.get_account_states([a.key for a in enabled])
        return [(a, states[a.key].cooling_until) for a in enabled
                if states[a.key].is_cooling(now)]

    async def earliest_recovery(self, accounts: Sequence[Account]) -> Optional[float]:
        """The absolute time the first enabled, unusable account becomes usable again; None when
        every enabled account is usable (or there is none).

        A cooling account recovers when its cooldown ends; an account at its rateLimit recovers
        when its oldest request in the window leaves it.
        """
        now = self._now()
        enabled = _unique(a for a in accounts if a.enabled)
        states = await self._store.get_account_states([a.key for a in enabled])
        times = []
        for account in enabled:
            state = states[account.key]
            if state.is_cooling(now):
                times.append(state.cooling_until)
                continue
            limit = _rate_limit(account)
            if limit is not None:
                used, oldest = await self._store.rate_usage(account.key, now, RATE_WINDOW)
                if used >= limit and oldest is not None:
                    times.append(oldest + RATE_WINDOW)
        return min(times) if times else None

    async def snapshot(self, accounts: Sequence[Account]) -> List[dict]:
        """One dict per account for /status, in configured order; never the secret.

        Keys: key, name, kind, enabled, weight, rate_limit, state (``"ok"``, ``"cooling"`` or
        ``"disabled"``), cooling_until (None unless cooling), backoff_level, attempts, successes,
        errors, rate_limits, last_attempt_at, last_error_at, last_error, and rate_used (requests in
        the current rate window, None without a rateLimit).
        """
        now = self._now()
        listed = _unique(accounts)
        stats = await self._store.account_stats([a.key for a in listed])
        rows = []
        for account in listed:
            row = dict(stats[account.key])
            cooling = row["cooling_until"] > now
            if not account.enabled:
                state = "disabled"
            elif cooling:
                state = "cooling"
            else:
                state = "ok"
            rate_used = None
            if _rate_limit(account) is not None:
                rate_used, _ = await self._store.rate_usage(account.key, now, RATE_WINDOW)
            if not account.enabled and account.metadata.get("disabled_reason"):
                row["disabled_reason"] = account.metadata["disabled_reason"]
            row.update(key=account.key, name=account.name, kind=account.kind,
                       enabled=account.enabled, weight=account.weight,
                       rate_limit=account.rate_limit, state=state,
                       cooling_until=row["cooling_until"] if cooling else None,
                       rate_used=rate_used)
            rows.append(row)
        return rows

    async def forget(self, account: Account) -> None:
        """Drop all runtime state of one account (its credential changed)."""
        self._written_keys.discard(account.key)
        self._current_weights.pop(account.key, None)
        await self._store.forget(account.key)

    async def retain(self, accounts: Sequence[Account]) -> None:
        """Drop the runtime state of every account this pool wrote state for that is not in
        ``accounts`` (call after a reload removed accounts), so state stays bounded by the
        configured accounts."""
        keep = {a.key for a in accounts}
        self._prune_weights(accounts)
        for key in sorted(self._written_keys - keep):
            self._written_keys.discard(key)
            await self._store.forget(key)

    def footprint(self) -> Dict[str, int]:
        """Sizes of the pool's own tables (for tests and diagnostics)."""
        return {"round_robin_weights": len(self._current_weights),
                "written_keys": len(self._written_keys)}

    async def _usable(self, accounts: Sequence[Account], now: float) -> List[Account]:
        enabled = _unique(a for a in accounts if a.enabled)
        states = await self._store.get_account_states([a.key for a in enabled])
        usable = []
        for account in enabled:
            if states[account.key].is_cooling(now):
                continue
            limit = _rate_limit(account)
            if limit is not None:
                used, _ = await self._store.rate_usage(account.key, now, RATE_WINDOW)
                if used >= limit:
                    continue
            usable.append(account)
        return usable

    def _pick_weighted(self, usable: Sequence[Account]) -> int:
        """Smooth weighted round-robin (nginx): every usable account gains its weight, the richest
        is picked and pays the total. Weights 1 give plain rotation; 5,1,1 give a a b a c a a.
        """
        total = 0
        best, best_weight = 0, None
        for index, account in enumerate(usable):
            weight = _weight(account)
            total += weight
            current = self._current_weights.get(account.key, 0) + weight
            self._current_weights[account.key] = current
            if best_weight is None or current > best_weight:
                best, best_weight = index, current
        self._current_weights[usable[best].key] -= total
        return best

    def _prune_weights(self, accounts: Sequence[Account]) -> None:
        known = {a.key for a in accounts}
        for key in [k for k in self._current_weights if k not in known]:
            del self._current_weights[key]


def _unique(accounts) -> List[Account]:
    """Accounts in order, each key once (one request tries each account at most once)."""
    seen, unique = set(), []
    for account in accounts:
        if account.key not in seen:
            seen.add(account.key)
            unique.append(account)
    return unique


def _rate_limit(account: Account) -> Optional[int]:
    """The account's requests-per-minute limit; None (or 0 or less) means unlimited."""
    limit = account.rate_limit
    return limit if limit is not None and limit > 0 else None


def _weight(account: Account) -> int:
    """Round-robin weight; anything below 1 counts as 1 so every usable account gets its turn."""
    try:
        return max(1, int(account.weight))
    except (TypeError, ValueError):
        return 1


def _error_text(verdict: Verdict) -> str:
    """``last_error`` for /status: ``429 rate-limited: rate_limit_error: ...``."""
    head = "network-error" if verdict.status is None else str(verdict.status)
    text = "{} {}".format(head, verdict.reason)
    return text + ": " + verdict.detail if verdict.detail else text
