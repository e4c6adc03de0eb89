"""The daemon's live list of accounts: discovered from the token store, config and environment.

Discovery runs again when the token store's files change on disk (checked at most once per
``check_interval`` seconds, by a cheap stat), when the config is reloaded, and after a refresh.
A credential that changed (a re-login) has its runtime state reset in the pool. Listeners
(:meth:`AccountDirectory.add_listener`) hear of every change to the list (an account added, removed,
enabled or disabled), e.g. to point Claude Code at the proxy once a usable account appears.
"""

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr

from clproxy.observe.console import logger
from clproxy.accounts.model import Account
from clproxy.accounts.tokenstore import TokenStore, TokenStoreError, credential_fingerprint, discover_accounts

log = logger(__name__)


class AccountDirectory:
    """Answers "which accounts are there now?" on every request, cheaply."""

    def __init__(self, *, store: TokenStore, clock, environ: Mapping[str, str],
                 config_accounts: Sequence[Account] = (), base_url: str,
                 on_changed_credential: Optional[Callable[[Account], object]] = None,
                 check_interval: float = 1.0):
        self._store = store
        self._clock = clock
        self._environ = environ
        self._config_accounts = tuple(config_accounts)
        self._base_url = base_url
        self._on_changed = on_changed_credential
        self._interval = check_interval
        self._accounts: Tuple[Account, ...] = ()
        self._fingerprints: Dict[str, str] = {}
        self._files = None
        self._checked_at = float("-inf")
        self._listeners: List[Callable[[Tuple[Account, ...]], object]] = []
        #: accounts the upstream said can never serve, with why (until a new credential or restart)
        self._disabled: Dict[str, Tuple[str, str]] = {}
        self.refresh()

    def current(self) -> Tuple[Account, ...]:
        """The accounts, re-discovered first if the token store changed on disk."""
        now = self._clock.seconds()
        if now - self._checked_at >= self._interval:
            self._checked_at = now
            if self._store.fingerprint() != self._files:
                self.refresh()
        return self._accounts

    def refresh(self) -> Tuple[Account, ...]:
        """Discover again now; keeps the previous list (and logs why) when the store is unreadable."""
        files = self._store.fingerprint()
        try:
            accounts = discover_accounts(self._store.home, self._config_accounts, self._environ,
                                         base_url=self._base_url, store=self._store)
        except TokenStoreError as e:
            log.error("accounts: keeping the previous list, the token store is unreadable: {error}",
                      error=str(e))
            self._files = files
            return self._accounts
        fingerprints = {a.key: credential_fingerprint(a) for a in accounts}
        accounts = self._apply_disabled(accounts, fingerprints)
        for account in accounts:
            before = self._fingerprints.get(account.key)
            if before is not None and before != fingerprints[account.key]:
                log.info("accounts: credential of {name} changed; its cooldowns and stats start afresh",
                         name=account.name)
                if self._on_changed is not None:
                    self._on_changed(account)
        if [a.key for a in accounts] != [a.key for a in self._accounts]:
            log.info("accounts: {count} in the pool: {names}", count=len(accounts),
                     names=", ".join(f"{a.name} ({a.kind}{'' if a.enabled else ', disabled'})"
                                     for a in accounts) or "none")
        changed = [(a.key, a.enabled) for a in accounts] != [(a.key, a.enabled) for a in self._accounts]
        self._accounts, self._fingerprints, self._files = accounts, fingerprints, files
        if changed:
            for listener in list(self._listeners):
                try:
                    listener(accounts)
                except Exception:  # a listener's bug must not stop discovery (or the request asking)
                    log.failure("accounts: a listener failed")
        return accounts

    def disable(self, account: Account, reason: str) -> None:
        """Take ``account`` out of the pool with ``reason`` (shown in /status), at once. It stays
        out until its credential changes (a new login) or the daemon restarts; a stored account is
        also disabled in the token store by the caller, which survives both."""
        self._disabled[account.key] = (reason, self._fingerprints.get(account.key, ""))
        self._checked_at = float("-inf")  # the next current() re-applies it
        self._files = None
        self.refresh()

    def _apply_disabled(self, accounts: Tuple[Account, ...], fingerprints: Mapping[str, str]) -> Tuple[Account, ...]:
        """The accounts with the ones disabled at run time marked so (a changed credential clears it)."""
        if not self._disabled:
            return accounts
        marked = []
        for account in accounts:
            held = self._disabled.get(account.key)
            if held is not None and held[1] and held[1] != fingerprints.get(account.key):
                del self._disabled[account.key]  # a new credential (a re-login): give it a chance
                held = None
            if held is not None:
                account = attr.evolve(account, enabled=False,
                                      metadata={**account.metadata, "disabled_reason": held[0]})
            marked.append(account)
        return tuple(marked)

    def add_listener(self, listener: Callable[[Tuple[Account, ...]], object]) -> None:
        """Call ``listener(accounts)`` after each discovery that changed the list (an account added,
        removed, enabled or disabled). Discovery runs on :meth:`current` (at most once per check
        interval), :meth:`refresh` and a config reload; nothing polls on its own."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Tuple[Account, ...]], object]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def set_config_accounts(self, accounts: Sequence[Account], base_url: Optional[str] = None) -> None:
        """New config-file accounts (a config reload); discovery runs again at once."""
        self._config_accounts = tuple(accounts)
        if base_url:
            self._base_url = base_url
        self.refresh()

    def updated(self, account: Account) -> None:
        """An account came back from a refresh with a new token: use it from now on."""
        self._accounts = tuple(account if a.key == account.key else a for a in self._accounts)
