"""Keeping OAuth access tokens fresh without ever losing a rotated refresh token.

One refresh per account at a time in this process (single-flight), one across processes (the store's
file lock, held across the token-endpoint call and the write), and the new tokens are on disk before
anyone gets the new access token.
"""

from typing import Any, Dict, Iterable, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from clproxy.accounts import oauth
from clproxy.accounts.model import Account
from clproxy.accounts.tokenstore import (
    DEFAULT_LOCK_TIMEOUT, StoredCredential, StoreTransaction, TokenStore, TokenStoreError,
)

log = Logger()

#: Seconds the instance-wide refresh lock outlives the longest legitimate hold it covers (the file lock
#: wait plus the token call): the adoption read, the token file's write and fsync, the publish to
#: Redis and the reactor's own delays happen while it is held too. Expiring under a live holder
#: would let another instance spend the same refresh token.
SHARED_LOCK_MARGIN = 10.0

INVALID_GRANT_REASON = "refresh token rejected (invalid_grant): run clproxy auth login again"


def failures_reason(count: int) -> str:
    return f"{count} consecutive refresh failures"


class RefreshFailed(Exception):
    """A refresh of ``key`` did not produce a usable token. ``disabled`` is true when the account is now
    out of the pool (invalid_grant, too many failures, or it was disabled already). The underlying
    error is ``__cause__``. The message never holds a token."""

    def __init__(self, key: str, reason: str, *, disabled: bool = False):
        self.key = key
        self.reason = reason
        self.disabled = disabled
        super().__init__(key, reason)

    def __str__(self) -> str:
        state = " (account disabled)" if self.disabled else ""
        return f"refresh of {self.key} failed: {self.reason}{state}"


class AccountDisabled(RefreshFailed):
    """The account is disabled in the store; nothing was sent."""

    def __init__(self, key: str, reason: Optional[str]):
        super().__init__(key, f"disabled: {reason or 'no reason recorded'}", disabled=True)


class NotRefreshable(RefreshFailed):
    """The account has no refresh token, or is not in the token store, so it cannot be refreshed."""


class RefreshPostponed(RefreshFailed):
    """An early refresh (not forced, started ``refresh_before_expiry`` ahead) failed without
    disabling the account, and the caller's access token has not expired: send ``account`` (that
    token) now; the next request or upkeep tick tries the refresh again. The failure is counted
    in the store like any other; ``__cause__`` is the :class:`RefreshFailed` of the refresh."""

    def __init__(self, account: Account, reason: str):
        super().__init__(account.key, reason)
        self.account = account

    def __str__(self) -> str:
        return f"early refresh of {self.key} failed: {self.reason} (its token is still valid: using it)"


class _Flight:
    """One refresh in progress and everyone waiting for its outcome."""

    def __init__(self) -> None:
        self._waiters: List[Deferred] = []

    @property
    def waiting(self) -> int:
        return sum(1 for d in self._waiters if not d.called)

    def wait(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def land(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if d.called:  # this waiter was cancelled; the refresh itself went on for the others
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class TokenRefresher:
    """Gives out usable access tokens for OAuth accounts, refreshing through ``store``.

    ``http_client`` is a treq ``HTTPClient`` or a zero-argument callable returning one; ``clock`` an
    ``IReactorTime`` (expiry decisions and lock polling); ``endpoints`` an
    :class:`~clproxy.accounts.oauth.OAuthEndpoints`.

    Lock waiting: the store lock is a non-blocking ``flock`` retried every ``lock_poll`` seconds on
    ``clock`` (``deferLater``), so the reactor never blocks; after ``lock_timeout`` seconds the refresh
    fails with :class:`RefreshFailed` (cause :class:`~clproxy.accounts.tokenstore.TokenStoreLockTimeout`).
    The lock is held across the token-endpoint call (at most ``http_timeout`` seconds) and the write.
    With ``shared``, the instance-wide lock is taken first, for :meth:`shared_lock_ttl` seconds.

    Failures: ``invalid_grant`` disables the account at once; any other failure is counted, and the
    ``max_consecutive_failures``-th in a row (or a later one) disables it only when the access token
    has expired (a known expiry that has passed, or no known expiry).
    """

    def __init__(self, store: TokenStore, http_client: Any, endpoints: Any, clock: Any,
                 refresh_before_expiry: float = 3600.0, max_consecutive_failures: int = 15, *,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, lock_poll: float = 0.05,
                 http_timeout: float = oauth.DEFAULT_TIMEOUT, shared: Any = None):
        self._store = store
        #: optional store providing ILockProvider and ISharedTokens (Redis): refreshes are then
        #: single-flight across machines too, and every instance reads the rotated tokens there
        self._shared = shared
        self._http = http_client
        self._endpoints = endpoints
        self._clock = clock
        self.refresh_before_expiry = refresh_before_expiry
        self.max_consecutive_failures = max_consecutive_failures
        self._lock_timeout = lock_timeout
        self._lock_poll = lock_poll
        self._http_timeout = http_timeout
        self._flights: Dict[str, _Flight] = {}

    def _client(self) -> Any:
        if hasattr(self._http, "post"):
            return self._http
        return self._http()

    def expiring(self, expires_at: Optional[float]) -> bool:
        """True when a token expiring at ``expires_at`` should be refreshed now (unknown: no)."""
        if expires_at is None:
            return False
        return expires_at - self._clock.seconds() <= self.refresh_before_expiry

    def shared_lock_ttl(self) -> float:
        """Seconds the instance-wide refresh lock is taken for: the longest a refresh can hold it
        (the file lock wait, then the token call, and a second one when an invalid_grant made it
        adopt another instance's live refresh token) plus :data:`SHARED_LOCK_MARGIN`."""
        return self._lock_timeout + 2 * self._http_timeout + SHARED_LOCK_MARGIN

    def in_flight(self, key: str) -> bool:
        """True while a refresh of ``key`` is running in this process."""
        return key in self._flights

    def waiting(self, key: str) -> int:
        """How many callers in this process wait on the refresh of ``key`` in flight (0: none)."""
        flight = self._flights.get(key)
        return 0 if flight is None else flight.waiting

    async def fresh(self, account: Account, force: bool = False) -> Account:
        """``account`` with a usable access token, refreshed first when it expires within
        ``refresh_before_expiry`` (or when ``force``, e.g. after a 401).

        Non-OAuth accounts, and OAuth accounts not yet due, come back unchanged without any I/O.
        Concurrent callers for one account share one refresh; a forced call joins one in flight.
        Raises :class:`RefreshFailed` (``disabled`` tells whether the account left the pool), or
        :class:`RefreshPostponed` when an unforced refresh failed but ``account``'s token is still
        valid (use it).
        """
        if not account.is_oauth:
            return account
        flight = self._flights.get(account.key)
        if flight is None:
            if not force and not self.expiring(account.expires_at):
                return account
            flight = self._flights[account.key] = _Flight()
            waiter = flight.wait()
            started = Deferred.fromCoroutine(self._refresh_locked(account, force))
            started.addBoth(self._land, account.key, flight)
        else:
            waiter = flight.wait()
        try:
            return await waiter
        except RefreshFailed as e:
            if force or e.disabled or not self._still_valid(account):
                raise
            # Refreshing starts an hour early so that requests never wait on it; a refresh that fails
            # then for a passing reason (the endpoint down, a lock busy) must not take a good token
            # out of service. invalid_grant disabled the account: that one is raised as it is. The
            # failure is logged (with its count) by _refresh, and by the caller with this message.
            raise RefreshPostponed(account, e.reason) from e

    def _still_valid(self, account: Account) -> bool:
        """True when ``account``'s access token has a known expiry that has not come yet."""
        return account.expires_at is not None and account.expires_at > self._clock.seconds()

    def _land(self, result: Any, key: str, flight: _Flight) -> None:
        # Clear first: a waiter that calls fresh() again must start a new refresh, not join this one.
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.land(result)

    async def _refresh_locked(self, account: Account, force: bool) -> Account:
        shared_lock = None
        if self._shared is not None:
            # The instance-wide lock first (TTL-bound: a holder that dies blocks nobody for long),
            # then the file lock, always in this order so two locks cannot deadlock. Its TTL covers
            # the whole hold: up to lock_timeout waiting for the file lock, then the token call.
            ttl_ms = int(self.shared_lock_ttl() * 1000)
            shared_lock = await self._shared.acquire(f"refresh:{account.key}", ttl_ms,
                                                     self._lock_timeout, self._clock)
            if shared_lock is None:
                raise RefreshFailed(account.key, "another instance holds the refresh lock for too long")
        try:
            try:
                tx = await self._store.acquire(self._clock, self._lock_timeout, self._lock_poll)
            except TokenStoreError as e:
                raise RefreshFailed(account.key, str(e)) from e
            try:
                if self._shared is not None:
                    await self._adopt_shared(tx, account.key)
                try:
                    return await self._refresh(tx, account, force)
                finally:
                    if self._shared is not None:
                        await self._publish(tx, account.key)
            finally:
                tx.release()
        finally:
            if shared_lock is not None:
                await self._shared.release(shared_lock)

    async def _shared_record(self, key: str) -> Optional[StoredCredential]:
        """The shared record of ``key``, or None (none there, or malformed)."""
        data = await self._shared.get_token_record(key)
        if not data:
            return None
        try:
            return StoredCredential.from_json(key, data, "shared state")
        except TokenStoreError:
            log.warn("refresh: ignoring a malformed shared token record for {key}", key=key)
            return None

    async def _adopt_shared(self, tx: StoreTransaction, key: str) -> None:
        """Another instance may have rotated the tokens: copy a shared record with newer tokens into
        the file before deciding, so the refresh token we would burn is the live one. Ordered by
        ``tokens_version``, which only a login or a rotation moves: a stale file copy edited since
        (limits, enable, a failure count) must not win over the live rotation."""
        shared = await self._shared_record(key)
        if shared is None:
            return
        local = tx.get(key)
        if local is None or shared.tokens_version > local.tokens_version:
            tx.write(shared)

    async def _publish(self, tx: StoreTransaction, key: str) -> None:
        """Share the record as it now is on disk (rotated tokens, failures, disabled flag)."""
        try:
            record = tx.get(key)
            if record is not None:
                await self._shared.put_token_record(key, record.to_json())
        except Exception as e:  # the file copy is written already; sharing is best effort
            log.warn("refresh: could not share the tokens of {key} ({error})", key=key,
                     error=type(e).__name__)

    async def _refresh(self, tx: StoreTransaction, account: Account, force: bool,
                       adopted: bool = False) -> Account:
        key = account.key
        try:
            record = tx.get(key)
        except TokenStoreError as e:
            raise RefreshFailed(key, str(e)) from e
        if record is None:
            raise NotRefreshable(key, "not in the token store")
        if not record.is_oauth:
            return _as_account(account, record)
        if record.disabled:
            raise AccountDisabled(key, record.disabled_reason)
        # Another process (or an earlier flight here) rotated since this snapshot was taken: its fresh
        # access token is ours to use, and its refresh token is the live one; never burn ours.
        if record.access_token != account.secret and not self.expiring(record.expires_at):
            log.info("refresh: {key} was already refreshed elsewhere; using the stored token", key=key)
            return _as_account(account, record)
        if not record.refresh_token:
            raise NotRefreshable(key, "no refresh token: run clproxy auth login again")
        try:
            tokens = await oauth.refresh_tokens(self._client(), self._endpoints, record.refresh_token,
                                                timeout=self._http_timeout, clock=self._clock)
        except oauth.InvalidGrant as e:
            live = None if adopted else await self._live_elsewhere(key, record)
            if live is not None:
                # Ours was spent, but another instance holds the live one (a rotation whose order by
                # time we got wrong, or missed): adopt it, on disk first, and go on with it.
                log.warn("refresh: {key} invalid_grant, but the shared state holds another refresh "
                         "token: adopting it", key=key)
                try:
                    tx.write(live)
                except (OSError, TokenStoreError) as write_error:
                    raise RefreshFailed(key, f"could not store the shared tokens "
                                             f"({type(write_error).__name__})") from write_error
                return await self._refresh(tx, account, force, adopted=True)
            self._record_failure(tx, record, INVALID_GRANT_REASON)
            log.warn("refresh: {key} invalid_grant; account disabled", key=key)
            raise RefreshFailed(key, str(e), disabled=True) from e
        except oauth.OAuthError as e:
            disabled = self._record_failure(tx, record, None)
            log.warn("refresh: {key} failed ({error}); failures={failures}", key=key, error=str(e),
                     failures=record.refresh_failures + 1)
            raise RefreshFailed(key, str(e), disabled=disabled) from e
        # The one path to a new token: written (atomic, 0600) and read back before it is returned.
        try:
            stored = tx.write(record.rotated(tokens, self._clock.seconds()))
        except (OSError, TokenStoreError) as e:
            log.error("refresh: {key} got new tokens but could not store them ({error}); the old refresh "
                      "token is spent: run clproxy auth login again if this persists",
                      key=key, error=type(e).__name__)
            raise RefreshFailed(key, f"could not store the new tokens ({type(e).__name__})") from e
        log.info("refresh: {key} refreshed; expires_at={expires_at}", key=key,
                 expires_at=stored.expires_at)
        return _as_account(account, stored)

    async def _live_elsewhere(self, key: str, record: StoredCredential) -> Optional[StoredCredential]:
        """After ``record``'s refresh token got invalid_grant: the shared record when it holds a
        different refresh token on an enabled account (read again now, under the locks), else None."""
        if self._shared is None:
            return None
        try:
            shared = await self._shared_record(key)
        except Exception as e:  # no shared state to ask: the invalid_grant stands
            log.warn("refresh: could not read the shared tokens of {key} ({error})", key=key,
                     error=type(e).__name__)
            return None
        if (shared is None or shared.disabled or not shared.refresh_token
                or shared.refresh_token == record.refresh_token):
            return None
        return shared

    def _record_failure(self, tx: StoreTransaction, record: StoredCredential,
                        disable_reason: Optional[str]) -> bool:
        """Count one failed refresh; disable on ``disable_reason``, or on the Nth in a row once the
        access token has expired. True if disabled."""
        failures = record.refresh_failures + 1
        # While the access token is still valid the account serves, and the next try may succeed:
        # a token endpoint down for a few minutes must not take it out until someone re-enables it.
        still_valid = record.expires_at is not None and record.expires_at > self._clock.seconds()
        if disable_reason is None and failures >= self.max_consecutive_failures and not still_valid:
            disable_reason = failures_reason(failures)
        updated = attr.evolve(record, refresh_failures=failures, updated_at=self._clock.seconds(),
                              disabled=disable_reason is not None or record.disabled,
                              disabled_reason=disable_reason or record.disabled_reason)
        try:
            tx.write(updated)
        except (OSError, TokenStoreError) as e:
            log.error("refresh: could not record the failure of {key} ({error})", key=record.key,
                      error=type(e).__name__)
        return updated.disabled

    async def disable(self, key: str, reason: str) -> Optional[StoredCredential]:
        """Disable ``key`` in the store (lock taken without blocking the reactor); ``None`` if absent."""
        tx = await self._store.acquire(self._clock, self._lock_timeout, self._lock_poll)
        try:
            record = tx.get(key)
            if record is None:
                return None
            return tx.write(attr.evolve(record, disabled=True, disabled_reason=reason,
                                        updated_at=self._clock.seconds()))
        finally:
            tx.release()

    async def startup_check(self, accounts: Iterable[Account]) -> Tuple[Account, ...]:
        """Give each expired, enabled OAuth account one refresh; one that fails is disabled (in the store
        when it is there) and comes back with ``enabled=False``. Other accounts pass unchanged."""
        result = []
        now = self._clock.seconds()
        for account in accounts:
            if (not account.is_oauth or not account.enabled or account.expires_at is None
                    or account.expires_at > now):
                result.append(account)
                continue
            try:
                result.append(await self.fresh(account, force=True))
            except RefreshFailed as e:
                log.warn("startup: {key} is expired and could not be refreshed ({reason}); disabled",
                         key=account.key, reason=e.reason)
                if not e.disabled:
                    try:
                        await self.disable(account.key,
                                           f"expired and the startup refresh failed ({e.reason}); "
                                           f"run clproxy auth refresh anthropic, or log in again")
                    except TokenStoreError as store_error:
                        log.error("startup: could not disable {key} ({error})", key=account.key,
                                  error=str(store_error))
                result.append(attr.evolve(account, enabled=False))
        return tuple(result)


def _as_account(account: Account, record: StoredCredential) -> Account:
    """The caller's account (its base URL, weight ...) with the credential as stored."""
    stored = record.to_account(account.base_url)
    return attr.evolve(account, kind=stored.kind, secret=stored.secret, expires_at=stored.expires_at,
                       enabled=stored.enabled, org_id=stored.org_id or account.org_id,
                       metadata={**dict(account.metadata), **dict(stored.metadata)})
