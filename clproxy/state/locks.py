"""Named, expiring locks held by one owner token: the refresh lock's shape, and its in-process form.

The Redis form (``SET NX PX`` + compare-and-delete) lives in :mod:`clproxy.state.redis`; both
wait the same way, polling on an injected clock with a bounded backoff.
"""

import random
import secrets
from typing import Awaitable, Callable, Dict, Optional, Tuple

import attr
from twisted.internet import defer
from twisted.internet.task import deferLater
from zope.interface import implementer

from clproxy.interfaces import ILockProvider

#: The first wait between two tries of a held lock, and the longest one (seconds).
POLL_FIRST = 0.005
POLL_CAP = 0.2


@attr.s(frozen=True, auto_attribs=True)
class LockToken:
    """Proof of holding lock ``name``: hand it back to ``release``.

    ``owner`` is a random value only this holder knows (so a holder whose lock expired cannot
    release the next holder's); ``local`` is True when the lock is held in this process only (the
    in-memory provider, or a Redis store serving from its local state during an outage).
    """

    name: str
    owner: str = attr.ib(repr=False)
    ttl_ms: int
    local: bool = False


def new_owner() -> str:
    """A fresh random owner token (128 bits)."""
    return secrets.token_hex(16)


def lock_poll_delay(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1`` of a held lock: 5 ms doubling up to 200 ms."""
    return min(POLL_CAP, POLL_FIRST * (2.0 ** min(max(0, attempt), 16)))


async def poll_for_lock(try_once: Callable[[], Awaitable[Optional[LockToken]]], wait: float,
                        clock, delay: Callable[[int], float] = lock_poll_delay,
                        jitter: Callable[[], float] = random.random) -> Optional[LockToken]:
    """Call ``try_once`` until it gives a token or ``wait`` seconds (on ``clock``) have passed.

    Always tries at least once (``wait`` 0 is a single non-blocking try); never waits past the
    deadline. Each wait is ``delay(attempt)`` scaled by ``0.5 + jitter()`` (``jitter`` in [0, 1)),
    so waiters that started together do not all retry in the same instant. Returns the token, or
    None when the deadline passed with the lock still held.
    """
    deadline = clock.seconds() + max(0.0, float(wait))
    attempt = 0
    while True:
        token = await try_once()
        if token is not None:
            return token
        remaining = deadline - clock.seconds()
        if remaining <= 0:
            return None
        await deferLater(clock, min(delay(attempt) * (0.5 + jitter()), remaining))
        attempt += 1


@implementer(ILockProvider)
class MemoryLocks:
    """``ILockProvider`` within one process: enough for one daemon, and the fallback of the Redis
    store while Redis is unreachable.

    A lock is held until released or until ``ttl_ms`` has passed on the acquiring clock. Memory is
    bounded by the names currently held (expired entries are dropped when their name is next tried).
    """

    def __init__(self):
        # name -> (owner, expires_at, the clock that time is on)
        self._held: Dict[str, Tuple[str, float, object]] = {}

    def try_acquire(self, name: str, ttl_ms: int, clock) -> Optional[LockToken]:
        """One non-blocking try: the token when ``name`` was free (or its holder's TTL ran out)."""
        now = clock.seconds()
        held = self._held.get(name)
        if held is not None and held[1] > now:
            return None
        owner = new_owner()
        self._held[name] = (owner, now + int(ttl_ms) / 1000.0, clock)
        return LockToken(name, owner, int(ttl_ms), local=True)

    def acquire(self, name, ttl_ms, wait, clock):
        async def try_once():
            return self.try_acquire(name, ttl_ms, clock)
        return defer.Deferred.fromCoroutine(poll_for_lock(try_once, wait, clock))

    def release(self, token):
        held = self._held.get(token.name)
        if held is None or held[0] != token.owner:
            return defer.succeed(False)
        del self._held[token.name]
        # Like Redis: a lock whose TTL ran out was no longer ours to release.
        owner, expires_at, clock = held
        return defer.succeed(expires_at > clock.seconds())

    def held_names(self):
        """The names held now or with an expired holder not yet dropped (for tests)."""
        return sorted(self._held)
