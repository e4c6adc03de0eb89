"""Per-account model and concurrency limits: ``excludedModels`` and ``maxConcurrent``.

Pure: no reactor import; time comes from an injected clock (``IReactorTime``: ``seconds`` and
``callLater``; ``task.Clock`` in tests).

**Models.** :func:`excluded` says which ``excludedModels`` pattern (if any) bars an account from a
model; :func:`serving` splits a list of accounts into those that may serve it and the rules that
barred the rest, and :func:`not_served_message` words the 404 ``not_found_error`` for the case
where none may.

**Concurrency.** A :class:`ConcurrencyGate` counts requests in flight per account key. The
dispatcher calls :meth:`ConcurrencyGate.try_acquire` right before sending to an account (``None``:
the account is at its ``maxConcurrent``, skip it) and releases the :class:`Slot` when the attempt is
over, on every path (``Slot.release`` is idempotent, so a ``finally`` may call it again). When every
candidate is at its cap, :meth:`ConcurrencyGate.wait_for_slot` queues the request (FIFO) until a
slot of any candidate frees, for at most ``timeout`` seconds (then :class:`QueueTimeout`); cancelling
the Deferred (the client hung up) takes the request out of the queue at once.

A freed slot is handed straight to the first waiter that can use it, without the count ever going
below the cap, so a request arriving later cannot overtake the queue with ``try_acquire``.
"""

import fnmatch
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred

from clproxy.accounts.model import Account


# --- models ---------------------------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class Exclusion:
    """One account barred from a model by one of its ``excludedModels`` patterns."""

    account_key: str
    account_name: str
    pattern: str


def excluded(account: Account, model: str) -> Optional[str]:
    """The first of ``account.excluded_models`` that matches ``model`` (``fnmatchcase``), or ``None``.

    Matching is case-sensitive, as model names are: ``claude-opus-*`` does not bar ``Claude-Opus-4``.
    """
    for pattern in account.excluded_models:
        if fnmatch.fnmatchcase(model, pattern):
            return pattern
    return None


def serving(accounts: Sequence[Account], model: Optional[str]
            ) -> Tuple[Tuple[Account, ...], Tuple[Exclusion, ...]]:
    """``(allowed, exclusions)``: the accounts that may serve ``model`` (order kept), and why the rest may not.

    A request without a model name (``None`` or empty) is barred by no pattern. When ``allowed`` is
    empty but ``exclusions`` is not, answer 404 ``not_found_error`` with :func:`not_served_message`
    and send nothing upstream.
    """
    if not model:
        return tuple(accounts), ()
    allowed: List[Account] = []
    rules: List[Exclusion] = []
    for account in accounts:
        pattern = excluded(account, model)
        if pattern is None:
            allowed.append(account)
        else:
            rules.append(Exclusion(account.key, account.name, pattern))
    return tuple(allowed), tuple(rules)


def not_served_message(model: str, exclusions: Sequence[Exclusion]) -> str:
    """The 404 message when no account may serve ``model``: names the model and each excludedModels rule."""
    rules = ", ".join(f'account "{e.account_name}" excludes "{e.pattern}"' for e in exclusions)
    return f"model: {model} is not served by any account (excludedModels: {rules})"


# --- concurrency ----------------------------------------------------------------------------------


class QueueTimeout(Exception):
    """No concurrency slot freed within the queue timeout; ``waited`` is the seconds spent queued."""

    def __init__(self, waited: float, timeout: float):
        self.waited = waited
        self.timeout = timeout
        super().__init__(f"every account is at its maxConcurrent; no slot freed within {timeout:g}s")


class Slot:
    """One request in flight on one account. :meth:`release` gives it back (once; later calls do nothing).

    ``waited`` is how long the request queued for it (0 when it was free at once), for the
    ``clproxy_queue_wait_seconds`` histogram.
    """

    def __init__(self, gate: "ConcurrencyGate", account: Account, waited: float = 0.0):
        self._gate = gate
        self.account = account
        self.waited = waited
        self.released = False

    @property
    def key(self) -> str:
        """The account key this slot counts against."""
        return self.account.key

    def release(self) -> None:
        """Give the slot back (to the first waiter that can use it, if any). Idempotent."""
        if self.released:
            return
        self.released = True
        self._gate._released(self.account.key)

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Slot {self.account.key} {state}>"


class _Waiter:
    def __init__(self, accounts: Tuple[Account, ...], started: float):
        self.accounts = accounts
        self.started = started
        self.deferred: "Deferred[Tuple[Account, Slot]]" = Deferred(self._cancelled)
        self.timer: Any = None
        self.gate: Optional["ConcurrencyGate"] = None

    def _cancelled(self, _deferred: Any) -> None:
        # The client went away: leave the queue now (Deferred then errbacks with CancelledError).
        if self.gate is not None:
            self.gate._leave(self)


def _has_room(account: Account, in_flight: int) -> bool:
    cap = account.max_concurrent
    return cap is None or in_flight < cap


class ConcurrencyGate:
    """Requests in flight per account key, capped by ``Account.max_concurrent``, and a FIFO wait queue.

    One per process (caps are per instance). Memory: one counter per account key with requests in
    flight (dropped at zero) and one entry per queued request.
    """

    def __init__(self, clock: Any):
        self._clock = clock
        self._in_flight: Dict[str, int] = {}
        self._waiters: Deque[_Waiter] = deque()

    def in_flight(self, key: str) -> int:
        """Requests in flight on the account ``key`` (for ``/status`` ``inFlight``)."""
        return self._in_flight.get(key, 0)

    def queue_length(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    def try_acquire(self, account: Account) -> Optional[Slot]:
        """A slot on ``account`` now, or ``None`` when it is at its ``max_concurrent``.

        An account without a cap always gets one (counted, for ``inFlight``).
        """
        if not _has_room(account, self.in_flight(account.key)):
            return None
        self._in_flight[account.key] = self.in_flight(account.key) + 1
        return Slot(self, account)

    def wait_for_slot(self, accounts: Sequence[Account], timeout: float) -> "Deferred[Tuple[Account, Slot]]":
        """A Deferred firing with ``(account, slot)`` once any of ``accounts`` has a free slot.

        Fires at once when one is free now (first in ``accounts`` order). Otherwise the request joins
        the queue: slots go to waiters in arrival order (a waiter is served by the first freed slot of
        any of its accounts). After ``timeout`` seconds it errbacks with :class:`QueueTimeout`;
        ``Deferred.cancel()`` leaves the queue at once (errback ``CancelledError``). ``slot.waited``
        is the time spent queued. An empty ``accounts`` would wait forever: it times out.
        """
        accounts = tuple(accounts)
        for account in accounts:
            slot = self.try_acquire(account)
            if slot is not None:
                return _fired((account, slot))
        waiter = _Waiter(accounts, self._clock.seconds())
        waiter.gate = self
        waiter.timer = self._clock.callLater(max(0.0, timeout), self._timed_out, waiter, timeout)
        self._waiters.append(waiter)
        return waiter.deferred

    # -- internals --

    def _released(self, key: str) -> None:
        left = self.in_flight(key) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        # Hand the freed slot to the first waiter that can use it. The waiter leaves the queue
        # before its Deferred fires, so a callback that releases at once re-enters safely.
        for waiter in list(self._waiters):
            account = next((a for a in waiter.accounts if a.key == key), None)
            if account is None:
                continue
            if not _has_room(account, self.in_flight(key)):
                return
            self._remove(waiter)
            self._in_flight[key] = self.in_flight(key) + 1
            slot = Slot(self, account, self._clock.seconds() - waiter.started)
            waiter.deferred.callback((account, slot))
            return

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        if self._remove(waiter):
            waiter.deferred.errback(QueueTimeout(self._clock.seconds() - waiter.started, timeout))

    def _leave(self, waiter: _Waiter) -> None:
        self._remove(waiter)

    def _remove(self, waiter: _Waiter) -> bool:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return False
        return True


def _fired(value: Tuple[Account, Slot]) -> "Deferred[Tuple[Account, Slot]]":
    d: "Deferred[Tuple[Account, Slot]]" = Deferred()
    d.callback(value)
    return d
