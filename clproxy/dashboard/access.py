"""Who may look at the dashboard, and the login that lets a browser in.

The rule: with no client key at all the dashboard is open where the relay is (loopback, or
``server.allowUnauthenticated``); otherwise it needs an admin client key, presented as
``Authorization: Bearer`` / ``x-api-key`` (scripts, a browser told to send it), or once to the
page's login form, which turns it into a session cookie.

A session is a random token in an ``HttpOnly; SameSite=Strict`` cookie scoped to ``/dashboard``
that expires (:data:`SESSION_TTL`); the state store keeps only the token's SHA-256 and the hash of
the key it was opened with (shared by every worker and instance on one Redis), so revoking the key
(or taking its admin right) ends its sessions at once, and its open live feeds on the feed's next
tick (:meth:`DashboardAccess.still_admits`), as a logout or the session's expiry ends the feeds
that session opened (:meth:`DashboardAccess.watch`).
Failed login attempts are rate-limited per peer address (a peer over its limit is refused before
its key is looked at), and overall as well (:class:`LoginThrottle`), answered with a true
``Retry-After``; a correct admin key is never refused
by the overall cap, so a flood of wrong keys from many addresses cannot lock the admins out. No key,
token or part of one is ever logged or echoed.
"""

import collections
import hashlib
import secrets
from typing import Awaitable, Callable, Deque, Optional, Tuple

from clproxy.http.auth import misdirected
from clproxy.team.keys import KeyRing, extract_client_key
from clproxy.team.limits import is_loopback

COOKIE = b"clproxy_dashboard"
SESSION_TTL = 8 * 3600.0
#: a longer cookie value is no token of ours (ours are 43 characters)
MAX_TOKEN_LENGTH = 200
TOO_MANY = "too many login attempts; try again later"
#: what let a viewer in when it was no key: the dashboard was open (no hash is this string)
OPEN = "open"


class LoginThrottle:
    """At most ``per_peer`` failed login attempts per peer address and ``overall`` failed ones in
    all, in any ``window`` seconds (sliding windows of failure times, bounded: at most
    ``max_peers`` peers are remembered, the least recent forgotten first).

    :meth:`admit` is asked before a key is looked at: a peer whose window is full is refused
    whatever it presents, so wrong keys from one address are held to ``per_peer`` a window. Only
    failures fill it (:meth:`admit_failure`): behind a reverse proxy every browser shares one
    address, and admins logging in there must not lock each other out with their own successes.

    The overall cap counts failures only and is asked only once a key turned out wrong: a client key
    holds 256 random bits, so the cap protects nothing against guessing, and applied to every
    attempt it would let anyone lock every admin out with 30 bad tries a minute."""

    def __init__(self, clock, per_peer: int = 5, overall: int = 30, window: float = 60.0,
                 max_peers: int = 10_000):
        self.clock = clock
        self.per_peer = per_peer
        self.overall = overall
        self.window = window
        self.max_peers = max_peers
        self._peers: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()
        self._all: Deque[float] = collections.deque()

    def _expire(self, times: Deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def admit(self, peer: str) -> Optional[float]:
        """Whether ``peer`` may make an attempt now: None, else the seconds until its oldest failure
        in the window leaves it. Counts nothing (see :meth:`admit_failure`)."""
        times = self._peers.get(peer)
        if times is None:
            return None
        now = self.clock.seconds()
        self._expire(times, now)
        if len(times) >= self.per_peer:
            return times[0] + self.window - now
        return None

    def admit_failure(self, peer: Optional[str] = None) -> Optional[float]:
        """Count one failed attempt (a wrong key) from ``peer`` against its window, and against the
        overall cap: None when it may be answered as it is, else the seconds until the cap frees
        (the failure is then not counted there)."""
        now = self.clock.seconds()
        if peer is not None:
            times = self._peers.get(peer)
            if times is None:
                times = self._peers[peer] = collections.deque()
                while len(self._peers) > self.max_peers:
                    self._peers.popitem(last=False)
            else:
                self._peers.move_to_end(peer)
            self._expire(times, now)
            times.append(now)
        return self._take(self._all, self.overall, now)

    def _take(self, times: Deque[float], limit: int, now: float) -> Optional[float]:
        self._expire(times, now)
        if len(times) >= limit:
            return times[0] + self.window - now
        times.append(now)
        return None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LoginSessions:
    """Open login sessions, kept in the state store (``ILoginSessions``: every worker and instance
    on the same Redis sees them) under the digest of their token; they expire ``ttl`` seconds
    after login."""

    def __init__(self, store, clock, ttl: float = SESSION_TTL):
        self.store = store
        self.clock = clock
        self.ttl = ttl

    async def open(self, key_hash: str) -> str:
        """A new session for the key with ``key_hash``; returns its token (for the cookie only)."""
        token = secrets.token_urlsafe(32)
        now = self.clock.seconds()
        await self.store.put_login(_digest(token), key_hash, now + self.ttl, now)
        return token

    async def key_hash(self, token: Optional[str]) -> Optional[str]:
        """The key hash of the live session ``token`` names, or None (unknown, expired)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return await self.store.get_login(_digest(token), self.clock.seconds())

    async def close(self, token: Optional[str]) -> None:
        """End the session ``token`` names (nothing when there is none)."""
        if token and len(token) <= MAX_TOKEN_LENGTH:
            await self.store.drop_login(_digest(token))


class DashboardAccess:
    """The dashboard's gate over the live key ring.

    ``host`` is the interface the daemon listens on; ``allow_unauthenticated()`` reads the config in
    force (the same two facts decide whether the relay itself is open)."""

    def __init__(self, ring: KeyRing, sessions: LoginSessions, host: str = "127.0.0.1",
                 allow_unauthenticated: Callable[[], bool] = lambda: False,
                 throttle: Optional[LoginThrottle] = None):
        self.ring = ring
        self.sessions = sessions
        self.host = host
        self.allow_unauthenticated = allow_unauthenticated
        self.throttle = throttle if throttle is not None else LoginThrottle(sessions.clock)

    def is_open(self) -> bool:
        """No client key exists and the relay is open here: anyone who reaches it may look."""
        return self.ring.empty and (is_loopback(self.host) or bool(self.allow_unauthenticated()))

    def misdirected(self, request) -> bool:
        """Open only because it is on loopback, and ``request``'s ``Host`` names another site (DNS
        rebinding): refused with 421 like ``/v1`` (:func:`clproxy.http.auth.misdirected`)."""
        return self.ring.empty and is_loopback(self.host) and misdirected(request, self.host)

    def login_possible(self) -> bool:
        """Whether an admin key exists to log in with."""
        return self.ring.has_admin

    def _admin_hash(self, key_hash: Optional[str]) -> Optional[str]:
        record = self.ring.find(key_hash) if key_hash else None
        return record.hash if record is not None and record.admin else None

    def by_header(self, request) -> Optional[str]:
        """The hash of the admin key ``request`` presents in its headers, or None."""
        record = self.ring.verify(extract_client_key(request.requestHeaders))
        return record.hash if record is not None and record.admin else None

    async def by_cookie(self, request) -> Optional[str]:
        """The hash of the admin key behind ``request``'s session cookie, or None (no cookie, an
        expired session, or a key revoked or no longer admin since)."""
        token = request.getCookie(COOKIE)
        if not token:
            return None
        return self._admin_hash(await self.sessions.key_hash(token.decode("ascii", "replace")))

    async def admission(self, request) -> Optional[str]:
        """What lets ``request`` read the dashboard's data: :data:`OPEN`, the hash of the admin key
        it presents (header or session), or None when nothing does. An open live feed keeps it and
        asks :meth:`still_admits` on every tick."""
        if self.is_open():
            return None if self.misdirected(request) else OPEN
        return self.by_header(request) or await self.by_cookie(request)

    def still_admits(self, admission: Optional[str]) -> bool:
        """Whether what once admitted a viewer (:meth:`admission`) still does, against the ring now:
        False once its key is revoked or no longer admin, or, for an open dashboard, once a key
        exists."""
        if admission == OPEN:
            return self.is_open()
        return self._admin_hash(admission) is not None

    def watch(self, request, admission: str) -> Callable[[], Awaitable[bool]]:
        """What an open live feed of ``request`` asks on every tick: whether its viewer is still let
        in. Its key must still admit (:meth:`still_admits`), and a viewer let in by its session
        cookie needs that session live too: a logout (on any worker) or the session's expiry ends
        the feed, as the session's next request would be refused."""
        session = None
        if admission != OPEN and self.by_header(request) is None:
            cookie = request.getCookie(COOKIE)
            session = cookie.decode("ascii", "replace") if cookie else None

        async def admits() -> bool:
            if not self.still_admits(admission):
                return False
            return session is None or await self.sessions.key_hash(session) == admission

        return admits

    async def allowed(self, request) -> bool:
        """Whether ``request`` may read the dashboard's data."""
        return await self.admission(request) is not None

    async def login(self, presented: Optional[str], peer: str) -> Tuple[int, str, Optional[str], Optional[float]]:
        """One login attempt: ``(status, message, session token or None, retry after or None)``.
        200 with a token for an admin key; 429 when throttled (the peer's failures fill its window,
        or for a wrong key the overall cap on failures); 403 for a valid key that is not an admin's; 401 otherwise.
        The message never repeats what was presented."""
        wait = self.throttle.admit(peer)
        if wait is not None:
            return 429, TOO_MANY, None, wait
        if self.ring.empty:
            return 400, "no client key exists: the dashboard is open on loopback", None, None
        record = self.ring.verify(presented)
        if record is not None and record.admin:
            return 200, "logged in", await self.sessions.open(record.hash), None
        wait = self.throttle.admit_failure(peer)
        if wait is not None:
            return 429, TOO_MANY, None, wait
        if record is None:
            return 401, "that is not a valid clproxy client key", None, None
        return 403, "the dashboard needs an admin client key (clproxy keys create NAME --admin)", None, None

    async def logout(self, request) -> None:
        """End the session of ``request``'s cookie."""
        token = request.getCookie(COOKIE)
        if token:
            await self.sessions.close(token.decode("ascii", "replace"))


def session_cookie(token: str, max_age: float) -> bytes:
    """The ``Set-Cookie`` value carrying ``token`` (``max_age`` 0 removes the cookie)."""
    return (COOKIE + b"=" + token.encode("ascii") + b"; Path=/dashboard; Max-Age=" +
            str(int(max_age)).encode("ascii") + b"; HttpOnly; SameSite=Strict")

