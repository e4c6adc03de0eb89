"""Per-client-key limits, decided before dispatch, and the check that keeps clproxy from being an open
relay.

Pure logic with an injected clock: nothing here imports the reactor or does I/O of its own. The shared
parts (the rpm window, the amounts spent) come from stores passed in, so that limits hold across
instances when those stores are Redis-backed.

A key record is any object with the attributes ``name``, ``models`` (fnmatch patterns, case-sensitive;
empty: every model), ``rpm``, ``tokens_per_day``, ``usd_per_day``, ``usd_per_month`` (``None``: no
limit) and ``allow_subscription`` -- :class:`clproxy.team.keys.KeyRecord` is one.

Wiring, per ``/v1/*`` request, after the client key was authenticated and the model parsed::

    limits = KeyLimits(state_store, clock, spent_source)     # once, at assembly
    await limits.check(record, model)                        # ProxyError: answer it, send nothing
    accounts = usable_accounts(record, pool_accounts)        # ProxyError 403 when none is left

And once at start, before listening::

    problem = listen_check(host, keys_exist, config.server.allow_unauthenticated)
    # allow_unauthenticated False and problem: print it, exit 1; True and problem: log it as a warning.

Every message names the limit and the amounts, never a client key (not even its name: the client knows
who it is, and the message may end up in a shared log).
"""

import calendar
import datetime
import fnmatch
import functools
import ipaddress
import math
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from clproxy.errors import ProxyError

#: The rpm window: a sliding minute.
RPM_WINDOW = 60.0

#: The state store's rate windows are shared with the per-account ``rateLimit`` (keys like
#: ``config:NAME``); a client key's window lives under this namespace so the two never meet.
RATE_NAMESPACE = "client:"

_DAY = 86400


class SpentSource(Protocol):
    """Where the amounts a key has spent come from (the usage counters; shared under Redis).

    ``day`` is a UTC date as ``"YYYY-MM-DD"``, ``month`` a UTC month as ``"YYYY-MM"`` (see
    :func:`day_of` and :func:`month_of`). Both return ``(tokens, usd)``: every token the key's
    requests counted in that window (input, output, cache writes and reads) and their cost in USD
    (requests without a price count 0). They may return a Deferred or be coroutines.
    """

    def spent(self, key_name: str, day: str) -> Awaitable[Tuple[int, float]]:
        """Tokens and USD spent by ``key_name`` during the UTC day ``day``."""

    def spent_month(self, key_name: str, month: str) -> Awaitable[Tuple[int, float]]:
        """Tokens and USD spent by ``key_name`` during the UTC calendar month ``month``."""


# --- time windows (UTC) ---------------------------------------------------------------------------


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)


def day_of(now: float) -> str:
    """The UTC day of the epoch time ``now``, as ``"YYYY-MM-DD"``."""
    return _utc(now).strftime("%Y-%m-%d")


def month_of(now: float) -> str:
    """The UTC calendar month of the epoch time ``now``, as ``"YYYY-MM"``."""
    return _utc(now).strftime("%Y-%m")


def next_midnight(now: float) -> float:
    """The epoch time of the next UTC midnight after ``now`` (a day window's end)."""
    return (math.floor(now / _DAY) + 1) * _DAY


def next_month_start(now: float) -> float:
    """The epoch time of 00:00 UTC on the first day of the month after ``now``'s."""
    moment = _utc(now)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def retry_after(until: float, now: float) -> int:
    """Whole seconds from ``now`` until ``until``, rounded up, at least 1 (a Retry-After value)."""
    return max(1, int(math.ceil(until - now - 1e-9)))


# --- models and accounts ---------------------------------------------------------------------------


def model_allowed(record: Any, model: str) -> bool:
    """Whether ``record``'s ``models`` patterns (fnmatchcase; none: every model) let it use ``model``."""
    patterns = tuple(record.models or ())
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


def check_model(record: Any, model: str) -> None:
    """Raise a 403 ``permission_error`` naming ``model`` when ``record`` may not use it."""
    if not model_allowed(record, model):
        raise ProxyError(403, f"This API key may not use the model {model!r} "
                              f"(allowed: {', '.join(record.models)}).", "permission_error")


def subscription_allowed(record: Any) -> bool:
    """Whether subscription (OAuth) accounts may serve ``record`` (``None``: no client keys, yes)."""
    return record is None or bool(record.allow_subscription)


NO_API_KEY_ACCOUNT = ("This API key may not use subscription (OAuth) accounts -- it was created without "
                      "--allow-subscription -- and no API-key account is available.")


def usable_accounts(record: Any, accounts: Sequence[Any]) -> List[Any]:
    """The accounts that may serve ``record``, in their order: subscription (OAuth) accounts only when
    :func:`subscription_allowed`.

    Accounts are anything with an ``is_oauth`` attribute (:class:`clproxy.accounts.model.Account`).
    Raises a 403 ``permission_error`` saying why when the rule removed every account; an empty list in
    gives an empty list out (the pool answers "no account" itself).
    """
    if subscription_allowed(record):
        return list(accounts)
    kept = [a for a in accounts if not a.is_oauth]
    if accounts and not kept:
        raise ProxyError(403, NO_API_KEY_ACCOUNT, "permission_error")
    return kept


# --- budgets and rate ------------------------------------------------------------------------------


def _tokens(n: Union[int, float]) -> str:
    return f"{int(n):,}"


def _usd(x: float) -> str:
    return f"${x:,.2f}"


def _limited(message: str, until: float, now: float) -> ProxyError:
    return ProxyError(429, message, "rate_limit_error",
                      headers=[(b"retry-after", str(retry_after(until, now)).encode("ascii"))])


def _budget_words(record: Any) -> str:
    """The key's budgets in words, for a message."""
    parts = []
    if record.tokens_per_day is not None:
        parts.append(f"{_tokens(record.tokens_per_day)} tokens per day")
    if record.usd_per_day is not None:
        parts.append(f"{_usd(record.usd_per_day)} per day")
    if record.usd_per_month is not None:
        parts.append(f"{_usd(record.usd_per_month)} per month")
    return ", ".join(parts)


def budget_error(record: Any, now: float, day: Optional[Tuple[int, float]],
                 month: Optional[Tuple[int, float]]) -> Optional[ProxyError]:
    """The 429 for the first spent budget of ``record`` (tokens/day, usd/day, usd/month), or None.

    ``day`` and ``month`` are the ``(tokens, usd)`` spent in the current UTC day and month (None when
    not needed). A budget is spent when the amount reaches the limit (a request below it may still
    cross it: the amount is only known once it ran). Retry-After runs to the window's end.
    """
    if day is not None:
        tokens, usd = day[0] or 0, day[1] or 0.0
        if record.tokens_per_day is not None and tokens >= record.tokens_per_day:
            return _limited(f"Token budget of this API key spent: {_tokens(tokens)} of "
                            f"{_tokens(record.tokens_per_day)} tokens per day (UTC) used; it renews "
                            f"at 00:00 UTC.", next_midnight(now), now)
        if record.usd_per_day is not None and usd >= record.usd_per_day:
            return _limited(f"Daily spending limit of this API key reached: {_usd(usd)} of "
                            f"{_usd(record.usd_per_day)} per day (UTC) spent; it renews at 00:00 UTC.",
                            next_midnight(now), now)
    if month is not None:
        usd = month[1] or 0.0
        if record.usd_per_month is not None and usd >= record.usd_per_month:
            return _limited(f"Monthly spending limit of this API key reached: {_usd(usd)} of "
                            f"{_usd(record.usd_per_month)} per month (UTC) spent; it renews on the "
                            f"first of next month, 00:00 UTC.", next_month_start(now), now)
    return None


#: How much of a request's last cost the running average of a key's requests keeps (the rest is
#: the history): what a request in flight is taken to spend before it is answered.
AVERAGE_WEIGHT = 0.2

IN_FLIGHT_MESSAGE = ("{count} request(s) of this API key are still running and may spend what is left "
                     "of its budget ({limit}); retry when they finish.")


def _plus(spent: Optional[Tuple[int, float]], held: Tuple[float, float]) -> Optional[Tuple[int, float]]:
    """``spent`` (tokens, usd) with what requests in flight hold added (None stays None)."""
    if spent is None:
        return None
    return (int((spent[0] or 0) + held[0]), (spent[1] or 0.0) + held[1])


class KeyLimits:
    """The per-key checks made before a request is dispatched.

    A budget is only known to be spent once the answers that spend it are in, so requests admitted
    together could all pass a nearly spent budget (50 at once with one token left all ran). While
    a key with a budget has requests in flight, each is taken to cost what the key's requests cost
    on average (at least 1 token), and a new one is refused while the spent amount plus those
    would reach the budget. Held in this process: under Redis, instances each hold their own.

    :param store: the state store (:class:`clproxy.interfaces.IStateStore`); its ``take_rate_slot`` /
        ``rate_usage`` hold the rpm window under ``"client:" + name`` (Redis: shared by instances).
    :param clock: an ``IReactorTime`` (``seconds()`` is epoch time).
    :param spent: a :class:`SpentSource`.
    """

    def __init__(self, store: Any, clock: Any, spent: SpentSource):
        self._store = store
        self._clock = clock
        self._spent = spent
        #: key name -> [tokens, usd, requests] held by its requests in flight
        self._held: Dict[str, List[float]] = {}
        #: key name -> (tokens, usd) a request of it costs, on average
        self._average: Dict[str, Tuple[float, float]] = {}

    async def check(self, record: Any, model: Optional[str]) -> Optional[Callable[[], None]]:
        """Raise :class:`ProxyError` when ``record`` may not send this request now; when it may,
        take an rpm slot and return the release of what the request holds of its key's budgets
        (None when it holds nothing): call once per client request, right before dispatch, and the
        release once the request's usage is recorded (under Redis, sent: for one round trip a
        check may then see neither the hold nor the spend).

        In order: the model (403; a request naming none, ``GET /v1/models``, skips only this), the
        day and month budgets (429 until the window's end), the same with the requests in flight
        (429, Retry-After 1 s: they may not spend it), the rpm (429 until the oldest request of
        the sliding minute leaves it). A refused request takes no rpm slot and holds nothing.
        ``record`` None (no client keys) passes.
        """
        if record is None:
            return None
        if model is not None:
            check_model(record, model)
        now = self._clock.seconds()
        day = month = None
        if record.tokens_per_day is not None or record.usd_per_day is not None:
            day = await self._spent.spent(record.name, day_of(now))
        if record.usd_per_month is not None:
            month = await self._spent.spent_month(record.name, month_of(now))
        error = budget_error(record, now, day, month)
        if error is not None:
            raise error
        release = None
        if day is not None or month is not None:
            held = self._held.get(record.name)
            if held is not None and budget_error(record, now, _plus(day, (held[0], held[1])),
                                                 _plus(month, (held[0], held[1]))) is not None:
                raise _limited(IN_FLIGHT_MESSAGE.format(count=int(held[2]), limit=_budget_words(record)),
                               now + 1, now)
            # held at once, before the rpm slot's round trip: requests checked together must see
            # each other's holds, or they all pass a nearly spent budget again
            release = self._hold(record.name)
        if record.rpm is not None:
            try:
                await self._take_slot(record, now)
            except BaseException:
                if release is not None:
                    release()
                raise
        return release

    def _hold(self, name: str) -> Callable[[], None]:
        """Hold what a request of ``name`` costs on average (at least 1 token); its release."""
        tokens, usd = self._average.get(name, (1.0, 0.0))
        share = (max(1.0, tokens), max(0.0, usd))
        held = self._held.setdefault(name, [0.0, 0.0, 0])
        held[0] += share[0]
        held[1] += share[1]
        held[2] += 1
        released: List[bool] = []

        def release() -> None:
            if released:
                return
            released.append(True)
            held[0] -= share[0]
            held[1] -= share[1]
            held[2] -= 1
            if held[2] <= 0 and self._held.get(name) is held:
                del self._held[name]
        return release

    def charged(self, name: Optional[str], tokens: int, usd: float) -> None:
        """A request of key ``name`` was answered and cost ``tokens`` and ``usd``: the average a
        request in flight is held at follows it."""
        if name is None:
            return
        previous = self._average.get(name)
        if previous is None:
            self._average[name] = (float(tokens), float(usd))
        else:
            self._average[name] = (previous[0] + AVERAGE_WEIGHT * (tokens - previous[0]),
                                   previous[1] + AVERAGE_WEIGHT * (usd - previous[1]))

    async def _take_slot(self, record: Any, now: float) -> None:
        key = RATE_NAMESPACE + record.name
        if await self._store.take_rate_slot(key, now, record.rpm, RPM_WINDOW):
            return
        _, oldest = await self._store.rate_usage(key, now, RPM_WINDOW)
        # The window emptied in between (or rpm is 0): a retry in a second is the honest answer.
        until = now if oldest is None or record.rpm < 1 else oldest + RPM_WINDOW
        raise _limited(f"Rate limit of this API key reached: {record.rpm} requests per minute.",
                       until, now)


# --- no open relay ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # asked on every request about the one listening host
def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches only this machine: 127.0.0.0/8, ::1 (also IPv4-mapped), or
    ``localhost``. Any other name, and the wildcards ``0.0.0.0``, ``::`` and ``""``, are not."""
    text = (host or "").strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listen_check(host: str, keys_exist: bool, allow_unauthenticated: bool) -> Optional[str]:
    """What to say before listening on ``host``: None when it is safe (loopback, or client keys exist).

    Otherwise one line: when ``allow_unauthenticated`` is False it is the refusal (print it, exit 1,
    never listen); when True it is the warning to log at every start.
    """
    if keys_exist or is_loopback(host):
        return None
    if allow_unauthenticated:
        return (f"clproxy: WARNING: listening on {host} without client keys "
                f"(server.allowUnauthenticated: true): anyone who reaches the port spends your "
                f"accounts; run `clproxy keys create NAME` to require a key")
    return (f"clproxy: refusing to listen on {host} without client keys: anyone who reaches the port "
            f"would spend your accounts; run `clproxy keys create NAME`, or set "
            f"server.allowUnauthenticated: true")


__all__ = ["KeyLimits", "SpentSource", "RATE_NAMESPACE", "RPM_WINDOW", "budget_error", "check_model",
           "day_of", "is_loopback", "listen_check", "model_allowed", "month_of", "next_midnight",
           "next_month_start", "retry_after", "subscription_allowed", "usable_accounts"]
