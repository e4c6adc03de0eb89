"""The token store: every logged-in account in ``$CLPROXY_HOME/tokens.json`` (mode 0600), and discovery.

Reads take no lock: every write replaces the whole file by a rename, so a reader sees the old file or the
new one. Read-modify-write holds an advisory ``flock`` on ``tokens.json.lock``, so the daemon and
``clproxy auth`` never lose each other's writes, and a refresh in one process sees another's rotation.
"""

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import attr
from twisted.internet.task import deferLater
from twisted.logger import Logger

from clproxy.state.files import _fsync_dir, atomic_write  # noqa: F401  (atomic_write is re-exported)
from clproxy.accounts.model import API_KEY, DEFAULT_ANTHROPIC_BASE_URL, OAUTH, Account, accounts_from_environment

log = Logger()

STORE_FILE_NAME = "tokens.json"
LEGACY_FILE_NAME = "anthropic-credentials.json"
QUOTAS_FILE_NAME = "account-quotas.json"
PROVIDER = "anthropic"
LEGACY_KEY = "legacy:anthropic"
ENV_KEY = "env:ANTHROPIC_API_KEY"
STORE_VERSION = 1
#: Seconds to wait for the store lock. Longer than one token-endpoint call (30 s), which a refresh
#: makes while holding it.
DEFAULT_LOCK_TIMEOUT = 60.0
DEFAULT_LOCK_POLL = 0.05
#: ``Account.source`` of the accounts this store holds (``tokens.json`` and the legacy file): the
#: ones whose state (disabled, failures) can be written back here.
STORED_SOURCES = frozenset({"tokenstore", "legacy"})

#: :meth:`TokenStore.set_limits`: leave ``max_concurrent`` as it is.
KEEP: Any = object()

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# Paths whose lock this process holds: a blocking acquire of one of them could only time out.
_HELD_HERE: Dict[str, int] = {}


# --- errors ---------------------------------------------------------------------------------------


class TokenStoreError(Exception):
    """Base of the token store's errors; messages name files and keys, never a credential."""


class TokenStoreCorrupt(TokenStoreError):
    """A credentials file cannot be parsed; it is left as it is (never overwritten blindly)."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return (f"credentials file {self.path} is unreadable ({self.reason}); it was left untouched: "
                f"repair it or move it away, then log in again")


class TokenStoreLockTimeout(TokenStoreError):
    """Another process (or, for a blocking wait, this one) held the store lock too long."""

    def __init__(self, path: str, timeout: float, detail: str = "another clproxy process holds it"):
        self.path = path
        self.timeout = timeout
        super().__init__(path, timeout)
        self._detail = detail

    def __str__(self) -> str:
        return f"gave up after {self.timeout:g}s waiting for the lock {self.path} ({self._detail})"


class UnknownAccount(TokenStoreError, KeyError):
    """No account is stored under this key."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"no account {self.key!r} in the token store"


class InvalidLabel(TokenStoreError, ValueError):
    """A label must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""

    def __init__(self, label: str):
        self.label = label
        super().__init__(label)

    def __str__(self) -> str:
        return (f"invalid label {self.label!r}: use 1-64 letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit")


# --- one stored credential --------------------------------------------------------------------------


def store_key(label: str, provider: str = PROVIDER) -> str:
    """The compound key of a labelled account: ``anthropic:work``."""
    if not _LABEL.match(label or ""):
        raise InvalidLabel(label)
    return f"{provider}:{label}"


def key_for(label_or_key: str, provider: str = PROVIDER) -> str:
    """``work`` or ``anthropic:work`` -> ``anthropic:work`` (``legacy:anthropic`` passes through)."""
    if ":" in label_or_key:
        return label_or_key
    return store_key(label_or_key, provider)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class StoredCredential:
    """One account as the store keeps it. Tokens and keys never appear in ``repr``.

    ``login_id`` is new on every login and kept across refreshes: it tells a re-login from a rotation.
    ``tokens_at`` is when the tokens were last obtained (a login or a rotation); unlike ``updated_at``,
    which every edit bumps (limits, enable, disable, a counted failure), it orders two copies of one
    account's tokens (:attr:`tokens_version`). Times are seconds since the epoch.
    """

    key: str
    label: str
    type: str = OAUTH
    provider: str = PROVIDER
    access_token: Optional[str] = attr.ib(default=None, repr=False)
    refresh_token: Optional[str] = attr.ib(default=None, repr=False)
    api_key: Optional[str] = attr.ib(default=None, repr=False)
    expires_at: Optional[float] = None
    email: Optional[str] = None
    org_id: Optional[str] = None
    org_name: Optional[str] = None
    scopes: Tuple[str, ...] = ()
    subscription_type: Optional[str] = None
    disabled: bool = False
    disabled_reason: Optional[str] = None
    refresh_failures: int = 0
    created_at: Optional[float] = None
    updated_at: Optional[float] = None
    login_id: Optional[str] = None
    tokens_at: Optional[float] = None
    source: str = "tokenstore"
    #: ``excludedModels``: fnmatch patterns of models this account is never sent.
    excluded_models: Tuple[str, ...] = ()
    #: ``maxConcurrent``: requests in flight at once on this account; ``None``: no cap.
    max_concurrent: Optional[int] = None
    #: Members of the file entry this version does not know; written back unchanged.
    extra: Mapping[str, Any] = attr.ib(factory=dict, repr=False, eq=False, hash=False)

    @classmethod
    def new_oauth(cls, label: str, tokens: Any, now: float, *, provider: str = PROVIDER,
                  expires_at: Optional[float] = None) -> "StoredCredential":
        """A fresh OAuth login from an :class:`~clproxy.accounts.oauth.TokenSet`."""
        if expires_at is None and getattr(tokens, "expires_in", None):
            expires_at = now + tokens.expires_in
        return cls(key=store_key(label, provider), label=label, type=OAUTH, provider=provider,
                   access_token=tokens.access_token, refresh_token=tokens.refresh_token,
                   expires_at=expires_at, email=getattr(tokens, "email", None),
                   org_id=getattr(tokens, "org_id", None), org_name=getattr(tokens, "org_name", None),
                   scopes=tuple(getattr(tokens, "scopes", ()) or ()), created_at=now, updated_at=now,
                   tokens_at=now)

    @classmethod
    def new_api_key(cls, label: str, api_key: str, now: float, *, provider: str = PROVIDER,
                    email: Optional[str] = None, org_id: Optional[str] = None,
                    org_name: Optional[str] = None) -> "StoredCredential":
        """A fresh API-key account."""
        return cls(key=store_key(label, provider), label=label, type=API_KEY, provider=provider,
                   api_key=api_key, email=email, org_id=org_id, org_name=org_name,
                   created_at=now, updated_at=now, tokens_at=now)

    @property
    def secret(self) -> Optional[str]:
        """What authenticates a request: the API key or the OAuth access token."""
        return self.api_key if self.type == API_KEY else self.access_token

    @property
    def is_oauth(self) -> bool:
        return self.type == OAUTH

    @property
    def tokens_version(self) -> float:
        """What orders two copies of this account's tokens (the newer holds the live refresh token):
        ``tokens_at``, or ``updated_at`` for a record written before ``tokens_at`` existed (0: none)."""
        version = self.tokens_at if self.tokens_at is not None else self.updated_at
        return version or 0.0

    def is_expired(self, now: float) -> bool:
        """True for an OAuth credential past its expiry (unknown expiry: not expired)."""
        return self.is_oauth and self.expires_at is not None and self.expires_at <= now

    def rotated(self, tokens: Any, now: float) -> "StoredCredential":
        """This credential after a successful refresh: new tokens, failures reset, still the same login."""
        expires_at = now + tokens.expires_in if tokens.expires_in else None
        return attr.evolve(
            self, access_token=tokens.access_token,
            refresh_token=tokens.refresh_token or self.refresh_token,
            expires_at=expires_at, email=tokens.email or self.email, org_id=tokens.org_id or self.org_id,
            org_name=tokens.org_name or self.org_name, scopes=tuple(tokens.scopes) or self.scopes,
            refresh_failures=0, disabled=False, disabled_reason=None, updated_at=now, tokens_at=now)

    def to_account(self, base_url: str = DEFAULT_ANTHROPIC_BASE_URL) -> Account:
        """The pool's view of this credential; a disabled credential gives ``enabled=False``."""
        metadata = {"label": self.label, "email": self.email, "org_name": self.org_name,
                    "disabled_reason": self.disabled_reason, "refresh_failures": self.refresh_failures,
                    "has_refresh_token": bool(self.refresh_token), "login_id": self.login_id,
                    "subscription_type": self.subscription_type}
        return Account(key=self.key, name=self.label, kind=self.type, secret=self.secret or "",
                       base_url=base_url, enabled=not self.disabled, org_id=self.org_id,
                       metadata={k: v for k, v in metadata.items() if v is not None},
                       source=self.source, expires_at=self.expires_at if self.is_oauth else None,
                       excluded_models=self.excluded_models, max_concurrent=self.max_concurrent)

    def to_json(self) -> Dict[str, Any]:
        data: Dict[str, Any] = dict(self.extra)
        data.update({
            "provider": self.provider, "label": self.label, "type": self.type,
        })
        if self.type == API_KEY:
            data["api_key"] = self.api_key
        else:
            data["access_token"] = self.access_token
            data["refresh_token"] = self.refresh_token
            data["expires_at"] = self.expires_at
        data.update({
            "email": self.email, "org_id": self.org_id, "org_name": self.org_name,
            "scopes": list(self.scopes), "subscription_type": self.subscription_type,
            "disabled": self.disabled, "disabled_reason": self.disabled_reason,
            "refresh_failures": self.refresh_failures, "created_at": self.created_at,
            "updated_at": self.updated_at, "tokens_at": self.tokens_at, "login_id": self.login_id,
            "excluded_models": list(self.excluded_models), "max_concurrent": self.max_concurrent,
        })
        return data

    @classmethod
    def from_json(cls, key: str, data: Any, path: str) -> "StoredCredential":
        """Validate one file entry; a bad one raises :class:`TokenStoreCorrupt` naming the key, not a value."""
        def bad(what: str) -> TokenStoreCorrupt:
            return TokenStoreCorrupt(path, f"account {key!r}: {what}")

        if not isinstance(data, dict):
            raise bad("entry is not an object")
        provider, sep, label = key.partition(":")
        if not sep or not provider or not label:
            raise TokenStoreCorrupt(path, f"key {key!r} is not provider:label")
        kind = data.get("type", OAUTH)
        if kind not in (OAUTH, API_KEY):
            raise bad("type must be 'oauth' or 'api-key'")

        def text(name: str, required: bool = False) -> Optional[str]:
            value = data.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or (required and not value):
                raise bad(f"{name} must be a{' non-empty' if required else ''} string")
            return value

        def number(name: str) -> Optional[float]:
            value = data.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{name} must be a number")
            return float(value)

        failures = data.get("refresh_failures", 0)
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            raise bad("refresh_failures must be a non-negative integer")
        disabled = data.get("disabled", False)
        if not isinstance(disabled, bool):
            raise bad("disabled must be true or false")
        scopes = data.get("scopes") or []
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise bad("scopes must be a list of strings")
        excluded_models = data.get("excluded_models") or []
        if not isinstance(excluded_models, list) or not all(isinstance(p, str) and p for p in excluded_models):
            raise bad("excluded_models must be a list of non-empty strings")
        max_concurrent = data.get("max_concurrent")
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                           or max_concurrent < 1):
            raise bad("max_concurrent must be a positive integer or null")
        known = {"provider", "label", "type", "access_token", "refresh_token", "api_key", "expires_at",
                 "email", "org_id", "org_name", "scopes", "subscription_type", "disabled",
                 "disabled_reason", "refresh_failures", "created_at", "updated_at", "tokens_at",
                 "login_id", "excluded_models", "max_concurrent"}
        updated_at = number("updated_at")
        tokens_at = number("tokens_at")
        return cls(
            key=key, label=text("label") or label, type=kind, provider=text("provider") or provider,
            access_token=text("access_token", required=kind == OAUTH),
            refresh_token=text("refresh_token"),
            api_key=text("api_key", required=kind == API_KEY),
            expires_at=number("expires_at"), email=text("email"), org_id=text("org_id"),
            org_name=text("org_name"), scopes=tuple(scopes), subscription_type=text("subscription_type"),
            disabled=disabled, disabled_reason=text("disabled_reason"), refresh_failures=failures,
            # A record from before tokens_at: its last update is the latest its tokens can be from;
            # kept from here on, so an edit that bumps updated_at does not make stale tokens newer.
            created_at=number("created_at"), updated_at=updated_at,
            tokens_at=tokens_at if tokens_at is not None else updated_at, login_id=text("login_id"),
            excluded_models=tuple(excluded_models), max_concurrent=max_concurrent,
            extra={k: v for k, v in data.items() if k not in known},
        )


# --- files ------------------------------------------------------------------------------------------


def default_home(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME``, or ``~/.clproxy`` (``~`` from the given environ's ``HOME``)."""
    home = environ.get("CLPROXY_HOME", "").strip()
    if not home:
        home = os.path.join("~", ".clproxy")
    if home == "~" or home.startswith("~/"):
        home = (environ.get("HOME") or os.path.expanduser("~")) + home[1:]
    return os.path.expanduser(home)


def _stat_signature(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _FileLock:
    """An exclusive ``flock`` on one lock file, taken without blocking (callers decide how to wait)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None

    def try_acquire(self) -> bool:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            self.close()
            raise
        _HELD_HERE[self.path] = _HELD_HERE.get(self.path, 0) + 1
        return True

    def release(self) -> None:
        if self._fd is not None:
            count = _HELD_HERE.get(self.path, 0) - 1
            if count > 0:
                _HELD_HERE[self.path] = count
            else:
                _HELD_HERE.pop(self.path, None)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- the store ----------------------------------------------------------------------------------------


class StoreTransaction:
    """The store while this process holds its lock: reads see the latest data, each write is atomic.

    Obtain one from :meth:`TokenStore.locked` (blocking, for the CLI) or :meth:`TokenStore.acquire`
    (polls with a clock, for the reactor); call :meth:`release` when done.
    """

    def __init__(self, store: "TokenStore", lock: _FileLock):
        self._store = store
        self._lock = lock
        self.active = True

    def _check(self) -> None:
        if not self.active:
            raise TokenStoreError("the store lock was already released")

    def load(self) -> Dict[str, StoredCredential]:
        """All token-store accounts (not the legacy file)."""
        self._check()
        return self._store.load()

    def get(self, key: str) -> Optional[StoredCredential]:
        """One account by key, including ``legacy:anthropic``."""
        self._check()
        return self._store.get(key)

    def write(self, record: StoredCredential) -> StoredCredential:
        """Store ``record`` as it is and return it as read back from disk."""
        self._check()
        if record.key == LEGACY_KEY:
            self._store._write_legacy(record)
        else:
            raw = self._store._read_raw_store()
            accounts = raw.setdefault("accounts", {})
            accounts[record.key] = record.to_json()
            self._store._write_raw_store(raw)
        on_disk = self._store.get(record.key)
        if on_disk is None or on_disk.secret != record.secret or on_disk.refresh_token != record.refresh_token:
            raise TokenStoreError(f"account {record.key!r} did not read back as written")
        return on_disk

    def remove(self, key: str) -> StoredCredential:
        """Delete one account; :class:`UnknownAccount` if there is none under ``key``."""
        self._check()
        existing = self._store.get(key)
        if existing is None:
            raise UnknownAccount(key)
        if key == LEGACY_KEY:
            os.unlink(self._store.legacy_path)
            _fsync_dir(self._store.home)
        else:
            raw = self._store._read_raw_store()
            del raw["accounts"][key]
            self._store._write_raw_store(raw)
        return existing

    def release(self) -> None:
        if self.active:
            self.active = False
            self._lock.release()


class TokenStore:
    """``$CLPROXY_HOME/tokens.json``: accounts under compound keys, atomic 0600 writes, flock-guarded.

    Snapshot reads (:meth:`load`, :meth:`get`, :meth:`fingerprint`) take no lock. Changes go through a
    :class:`StoreTransaction`; the convenience methods (:meth:`put`, :meth:`remove`, :meth:`enable`,
    :meth:`disable`) take the lock blocking and are meant for the CLI. In the daemon, changes go through
    :class:`~clproxy.accounts.refresh.TokenRefresher`, which waits for the lock without blocking the reactor.
    """

    def __init__(self, home: str, *, now: Callable[[], float] = time.time,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, lock_poll: float = DEFAULT_LOCK_POLL):
        self.home = os.path.abspath(home)
        self.path = os.path.join(self.home, STORE_FILE_NAME)
        self.lock_path = self.path + ".lock"
        self.legacy_path = os.path.join(self.home, LEGACY_FILE_NAME)
        self.now = now
        self.lock_timeout = lock_timeout
        self.lock_poll = lock_poll

    def __repr__(self) -> str:
        return f"TokenStore({self.path!r})"

    # -- reading (no lock) --

    def _read_raw_store(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {"version": STORE_VERSION, "accounts": {}}
        if not data.strip():
            raise TokenStoreCorrupt(self.path, "the file is empty")
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenStoreCorrupt(self.path, "not UTF-8 text") from None
        except json.JSONDecodeError as e:
            # e.msg and the position only: the document itself holds tokens.
            raise TokenStoreCorrupt(self.path, f"invalid JSON: {e.msg} at line {e.lineno} "
                                               f"column {e.colno}") from None
        if not isinstance(raw, dict):
            raise TokenStoreCorrupt(self.path, "the top level is not an object")
        version = raw.get("version", STORE_VERSION)
        if version != STORE_VERSION:
            raise TokenStoreCorrupt(self.path, f"unsupported version {version!r}")
        accounts = raw.setdefault("accounts", {})
        if not isinstance(accounts, dict):
            raise TokenStoreCorrupt(self.path, "'accounts' is not an object")
        return raw

    def load(self) -> Dict[str, StoredCredential]:
        """All token-store accounts in file order (login order). Missing file: empty."""
        raw = self._read_raw_store()
        return {key: StoredCredential.from_json(key, entry, self.path)
                for key, entry in raw["accounts"].items()}

    def get(self, key: str) -> Optional[StoredCredential]:
        """One account (``legacy:anthropic`` reads the legacy file), or ``None``."""
        if key == LEGACY_KEY:
            return self.legacy()
        return self.load().get(key)

    def accounts(self, base_url: str = DEFAULT_ANTHROPIC_BASE_URL) -> Tuple[Account, ...]:
        """The token-store accounts as pool :class:`Account` objects."""
        return tuple(record.to_account(base_url) for record in self.load().values())

    def fingerprint(self) -> Tuple[Any, ...]:
        """A cheap signature of the files discovery reads (mtime_ns, size, inode of each): when it
        changes, re-discover. Every write is a rename, so the inode alone already changes."""
        return (_stat_signature(self.path), _stat_signature(self.legacy_path))

    # -- the legacy file --

    def _read_legacy_raw(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.legacy_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise TokenStoreCorrupt(self.legacy_path, "not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise TokenStoreCorrupt(self.legacy_path, f"invalid JSON: {e.msg} at line {e.lineno} "
                                                      f"column {e.colno}") from None
        if not isinstance(raw, dict):
            raise TokenStoreCorrupt(self.legacy_path, "the top level is not an object")
        return raw

    def legacy(self) -> Optional[StoredCredential]:
        """The legacy ``anthropic-credentials.json`` account (flat or Claude Code shape), or ``None``."""
        raw = self._read_legacy_raw()
        if raw is None:
            return None
        return legacy_record(raw, self.legacy_path)

    def _write_legacy(self, record: StoredCredential) -> None:
        raw = self._read_legacy_raw() or {}
        inner = raw["claudeAiOauth"] if isinstance(raw.get("claudeAiOauth"), dict) else raw
        in_ms = _legacy_expiry_in_ms(inner)
        inner["accessToken"] = record.access_token
        if record.refresh_token is not None:
            inner["refreshToken"] = record.refresh_token
        if record.expires_at is not None:
            inner["expiresAt"] = int(record.expires_at * 1000) if in_ms else record.expires_at
        # The legacy shape has no room for these; extra members do no harm to a file only we write.
        raw["clproxyDisabled"] = record.disabled
        raw["clproxyDisabledReason"] = record.disabled_reason
        raw["clproxyRefreshFailures"] = record.refresh_failures
        self._write_file(self.legacy_path, (json.dumps(raw, indent=2) + "\n").encode("utf-8"))

    # -- writing --

    def _write_file(self, path: str, data: bytes) -> None:
        """Every write of a credentials file goes through here (tests replace it to inject faults)."""
        atomic_write(path, data, 0o600)

    def _write_raw_store(self, raw: Dict[str, Any]) -> None:
        raw["version"] = STORE_VERSION
        self._write_file(self.path, (json.dumps(raw, indent=2) + "\n").encode("utf-8"))

    def _ensure_home(self) -> None:
        os.makedirs(self.home, mode=0o700, exist_ok=True)

    # -- the lock --

    def held(self) -> bool:
        """True while this process holds the store lock (a refresh in progress on the reactor)."""
        return self.lock_path in _HELD_HERE

    def write_while_held(self, record: StoredCredential) -> StoredCredential:
        """Write ``record`` under the lock this process already holds (see :meth:`held`).

        For code the lock holder itself calls back into (adopting a rotation read from shared state
        during a refresh): taking the lock again would fail. Safe because each write is one
        synchronous read-modify-write on the reactor thread, so it cannot interleave with the
        holder's own writes. Raises :class:`TokenStoreError` when the lock is not held here.
        """
        if not self.held():
            raise TokenStoreError("write_while_held without the store lock")
        return StoreTransaction(self, _FileLock(self.lock_path)).write(record)

    @contextmanager
    def locked(self, timeout: Optional[float] = None) -> Iterator[StoreTransaction]:
        """Hold the store lock (blocking, polling up to ``timeout`` seconds) for a read-modify-write.

        Not for the reactor thread: use :meth:`acquire` there.
        """
        timeout = self.lock_timeout if timeout is None else timeout
        self._ensure_home()
        lock = _FileLock(self.lock_path)
        if self.lock_path in _HELD_HERE:
            raise TokenStoreLockTimeout(self.lock_path, 0, "this process already holds it")
        deadline = time.monotonic() + timeout
        while not lock.try_acquire():
            if time.monotonic() >= deadline:
                lock.close()
                raise TokenStoreLockTimeout(self.lock_path, timeout)
            time.sleep(self.lock_poll)
        tx = StoreTransaction(self, lock)
        try:
            yield tx
        finally:
            tx.release()

    async def acquire(self, clock: Any, timeout: Optional[float] = None,
                      poll: Optional[float] = None) -> StoreTransaction:
        """Take the store lock without blocking the reactor: a non-blocking ``flock`` retried every
        ``poll`` seconds on ``clock`` (``deferLater``) until ``timeout``. Call ``release()`` after."""
        timeout = self.lock_timeout if timeout is None else timeout
        poll = self.lock_poll if poll is None else poll
        self._ensure_home()
        lock = _FileLock(self.lock_path)
        deadline = clock.seconds() + timeout
        while not lock.try_acquire():
            if clock.seconds() >= deadline:
                lock.close()
                raise TokenStoreLockTimeout(self.lock_path, timeout)
            await deferLater(clock, poll, lambda: None)
        return StoreTransaction(self, lock)

    # -- convenience changes (blocking lock; for the CLI) --

    def put(self, record: StoredCredential) -> StoredCredential:
        """Store new credentials (a login): enabled, failure count reset, a new ``login_id``; an account
        already under this key keeps its place and ``created_at``."""
        now = self.now()
        with self.locked() as tx:
            existing = tx.get(record.key)
            created = existing.created_at if existing is not None and existing.created_at else now
            fresh = attr.evolve(record, disabled=False, disabled_reason=None, refresh_failures=0,
                                created_at=created, updated_at=now, tokens_at=now,
                                login_id=uuid.uuid4().hex)
            return tx.write(fresh)

    def remove(self, key: str) -> StoredCredential:
        """Delete an account (logout); :class:`UnknownAccount` if there is none."""
        with self.locked() as tx:
            return tx.remove(key)

    def enable(self, key: str) -> StoredCredential:
        """Re-enable an account and reset its refresh failure count."""
        with self.locked() as tx:
            existing = tx.get(key)
            if existing is None:
                raise UnknownAccount(key)
            return tx.write(attr.evolve(existing, disabled=False, disabled_reason=None,
                                        refresh_failures=0, updated_at=self.now()))

    def set_limits(self, key: str, *, excluded_models: Optional[Iterable[str]] = None,
                   max_concurrent: Any = KEEP) -> StoredCredential:
        """Change an account's ``excluded_models`` (``None``: keep them; ``()``: none) and
        ``max_concurrent`` (:data:`KEEP`: keep it; ``None``: no cap); :class:`UnknownAccount` if there
        is none. The daemon picks the change up with its next discovery (the file changed)."""
        with self.locked() as tx:
            existing = tx.get(key)
            if existing is None:
                raise UnknownAccount(key)
            changes: Dict[str, Any] = {"updated_at": self.now()}
            if excluded_models is not None:
                changes["excluded_models"] = tuple(excluded_models)
            if max_concurrent is not KEEP:
                if max_concurrent is not None and (isinstance(max_concurrent, bool)
                                                   or not isinstance(max_concurrent, int) or max_concurrent < 1):
                    raise ValueError("max_concurrent must be a positive integer or None")
                changes["max_concurrent"] = max_concurrent
            return tx.write(attr.evolve(existing, **changes))

    def disable(self, key: str, reason: str) -> StoredCredential:
        """Take an account out of the pool until it is enabled or logged in again."""
        with self.locked() as tx:
            existing = tx.get(key)
            if existing is None:
                raise UnknownAccount(key)
            return tx.write(attr.evolve(existing, disabled=True, disabled_reason=reason,
                                        updated_at=self.now()))


def write_token_copy(tokens: TokenStore, key: str, data: Dict[str, Any]) -> None:
    """Keep the token file in step with a token record another instance rotated (the shared state's
    ``on_token_write``). Ordered by ``tokens_version``: a file copy edited since (limits, a failure
    count) still holds older tokens."""
    record = StoredCredential.from_json(key, data, "shared state")
    current = tokens.get(key)
    if current is None or record.tokens_version > current.tokens_version:
        if tokens.held():
            # Called back from this process's own refresh (it read the rotation from Redis while
            # holding the lock): taking the lock again would time out; write under the held one.
            tokens.write_while_held(record)
            return
        with tokens.locked(5.0) as tx:
            tx.write(record)


# --- the legacy file's shapes ------------------------------------------------------------------------


def _legacy_expiry_in_ms(inner: Mapping[str, Any]) -> bool:
    value = inner.get("expiresAt")
    # Claude Code writes milliseconds; 1e11 s is the year 5138 while 1e11 ms is 1973.
    return not isinstance(value, (int, float)) or value > 1e11


def legacy_record(raw: Mapping[str, Any], path: str, key: str = LEGACY_KEY,
                  label: str = "legacy") -> StoredCredential:
    """A credential from ``{"accessToken","refreshToken","expiresAt"}`` or Claude Code's
    ``{"claudeAiOauth": {...}}`` (``expiresAt`` in milliseconds or seconds)."""
    inner = raw.get("claudeAiOauth") if isinstance(raw.get("claudeAiOauth"), dict) else raw
    access = inner.get("accessToken")
    if not isinstance(access, str) or not access:
        raise TokenStoreCorrupt(path, "no accessToken")
    refresh = inner.get("refreshToken")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise TokenStoreCorrupt(path, "refreshToken is not a string")
    expires = inner.get("expiresAt")
    if expires is not None:
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
            raise TokenStoreCorrupt(path, "expiresAt is not a number")
        expires = expires / 1000.0 if expires > 1e11 else float(expires)
    scopes = inner.get("scopes")
    failures = raw.get("clproxyRefreshFailures", 0)
    subscription = inner.get("subscriptionType")
    reason = raw.get("clproxyDisabledReason")
    return StoredCredential(
        key=key, label=label, type=OAUTH, access_token=access, refresh_token=refresh, expires_at=expires,
        scopes=tuple(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else (),
        subscription_type=subscription if isinstance(subscription, str) else None,
        disabled=raw.get("clproxyDisabled") is True,
        disabled_reason=reason if isinstance(reason, str) else None,
        refresh_failures=failures if isinstance(failures, int) and not isinstance(failures, bool) else 0,
        source="legacy")


def read_claude_code_credentials(path: str) -> StoredCredential:
    """Claude Code's ``~/.claude/.credentials.json`` as a (label-less) credential, for import."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenStoreError(f"no Claude Code credentials at {path}") from None
    except OSError as e:
        raise TokenStoreError(f"cannot read {path}: {e.strerror}") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise TokenStoreCorrupt(path, "invalid JSON") from None
    if not isinstance(raw, dict):
        raise TokenStoreCorrupt(path, "the top level is not an object")
    return legacy_record(raw, path, key="import:claude-code", label="claude-code")


# --- discovery ---------------------------------------------------------------------------------------


def discover_accounts(home: str, config_accounts: Iterable[Account] = (),
                      environ: Mapping[str, str] = os.environ, *,
                      base_url: str = DEFAULT_ANTHROPIC_BASE_URL,
                      store: Optional[TokenStore] = None) -> Tuple[Account, ...]:
    """The pool's Anthropic accounts, in priority order.

    Token-store accounts (``anthropic:<label>``); only when there are none, the legacy
    ``anthropic-credentials.json`` (``legacy:anthropic``). Config-file accounts join after them with
    their own keys. ``ANTHROPIC_API_KEY`` (``env:ANTHROPIC_API_KEY``) is used only when no other
    account exists. Disabled store accounts are included with ``enabled=False``.
    Raises :class:`TokenStoreCorrupt` for an unreadable store or legacy file.
    """
    store = store if store is not None else TokenStore(home)
    found = list(store.accounts(base_url))
    if not found:
        legacy = store.legacy()
        if legacy is not None:
            found.append(legacy.to_account(base_url))
    seen = {account.key for account in found}
    for account in config_accounts:
        if account.key not in seen:
            seen.add(account.key)
            found.append(account)
    if not found:
        found.extend(accounts_from_environment(environ, base_url))
    return tuple(found)


def credential_fingerprint(account: Account) -> str:
    """A short hash naming the credential behind ``account`` (never the credential itself).

    For a token-store login it hashes the ``login_id``, so it stays the same across refreshes (a
    rotation is not a new credential) and changes on a re-login; for other accounts it hashes the
    secret. The daemon resets an account's runtime state when this changes.
    """
    identity = account.metadata.get("login_id") if account.metadata else None
    material = f"{account.key}\0{account.kind}\0"
    material += f"login:{identity}" if identity else f"secret:{account.secret}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]
