"""The client key file ``$CLPROXY_HOME/keys.json`` and the watcher that keeps a daemon's keys current.

The file holds hashes and limits only (mode 0600, every write an atomic rename). Reads take no lock;
read-modify-writes hold the same advisory ``flock`` discipline as the token store (its lock helper,
on ``keys.json.lock``), so ``clproxy keys`` and a running daemon never lose each other's writes.

**File and shared store.** The file is the source of truth for ``clproxy keys`` on one machine.
Under the Redis backend the daemon's :class:`KeyWatcher` also publishes the file to the shared
store (``IClientKeys``): every key in the file is put, every key that left the file is revoked,
and the daemon serves the store's keys, which every instance shares. A revocation leaves a
tombstone in the store, so a machine whose file still holds a revoked key cannot bring it back:
keys are random, a revoked hash never legitimately returns. Without a shared store the daemon
serves the file's keys.

**A store that lost its keys.** Redis may come back empty (a restart without persistence, FLUSHDB,
eviction). Serving only what it holds would then leave the daemon with no key at all: open on
loopback, 401 for every valid key elsewhere. So the watcher puts the file's keys back whenever the
store reconnects or holds fewer of them than the file, restoring first the tombstones of the
revocations it knows of (keys that left its file, keys the store refused), and it never lets a
read of the store empty the ring while the file holds live keys.

**Last use.** The daemon notes when each key was last accepted in memory (one dict assignment per
request) and :class:`LastUseRecorder` writes those times to the file every minute and at stop, off
the reactor thread. Such a write changes only ``last_used_at``: the watcher reads the file again but
publishes nothing for it (:meth:`KeyWatcher._publish` puts only new or changed keys).
"""

import json
import os
import re
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Set, Tuple

import attr
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from clproxy.accounts.tokenstore import (DEFAULT_LOCK_POLL, DEFAULT_LOCK_TIMEOUT, TokenStoreLockTimeout,
                                         _FileLock, _stat_signature, default_home)
from clproxy.state.files import atomic_write
from clproxy.team.keys import KeyRecord, display_prefix, generate_key, hash_key

log = Logger()

KEYS_FILE_NAME = "keys.json"
KEYS_VERSION = 1
#: How often (seconds) a daemon looks at the key file and the shared store: a change is served
#: within two of these, inside the issue's 2 seconds.
DEFAULT_WATCH_INTERVAL = 1.0
#: How often (seconds) a daemon writes the last uses of its keys to the key file.
LAST_USED_INTERVAL = 60.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

__all__ = ["KeyStore", "KeyWatcher", "LastUseRecorder", "KeyStoreError", "KeyStoreCorrupt", "KeyExists", "UnknownKey",
           "InvalidKeyName", "KeyStoreLockTimeout", "default_home"]


class KeyStoreError(Exception):
    """Base of the key store's errors; one line, never a key or a hash."""


class KeyStoreCorrupt(KeyStoreError):
    """keys.json cannot be read; it is left as it is."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"client key file {path} is unreadable ({reason}); it was left untouched: "
                         f"repair it or move it away")


class KeyExists(KeyStoreError):
    """A key with this name exists already (names are unique)."""

    def __init__(self, name: str):
        super().__init__(f"a client key named {name!r} exists already (revoke it first, or pick "
                         f"another name)")


class UnknownKey(KeyStoreError):
    """No key has this name."""

    def __init__(self, name: str):
        super().__init__(f"no client key named {name!r}")


class InvalidKeyName(KeyStoreError, ValueError):
    """Names are 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit."""

    def __init__(self, name: str):
        super().__init__(f"invalid key name {name[:80]!r}: use 1-64 letters, digits, '.', '_', '@' "
                         f"or '-', starting with a letter or digit")


#: The token store's lock timeout error, under this module's name.
KeyStoreLockTimeout = TokenStoreLockTimeout


class KeyStore:
    """``$CLPROXY_HOME/keys.json``: client key records by name (hashes, never keys).

    Snapshot reads (:meth:`load`, :meth:`records`, :meth:`fingerprint`) take no lock; changes
    (:meth:`create`, :meth:`revoke`, :meth:`record_last_used`) take the lock, blocking up to
    ``lock_timeout`` seconds. They are quick local file writes: the daemon may call
    :meth:`record_last_used` from a thread (``deferToThread``) every so often, never per request.
    """

    def __init__(self, home: str, *, now: Callable[[], float] = time.time,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, lock_poll: float = DEFAULT_LOCK_POLL):
        self.home = os.path.abspath(home)
        self.path = os.path.join(self.home, KEYS_FILE_NAME)
        self.lock_path = self.path + ".lock"
        self.now = now
        self.lock_timeout = lock_timeout
        self.lock_poll = lock_poll

    def __repr__(self) -> str:
        return f"KeyStore({self.path!r})"

    # -- reading (no lock) --

    def fingerprint(self) -> Optional[Tuple[int, int, int]]:
        """(mtime_ns, size, inode) of keys.json, or None: cheap; when it changes, :meth:`load` again.
        Every write is a rename, so the inode alone already changes."""
        return _stat_signature(self.path)

    def _read_raw(self) -> Dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {"version": KEYS_VERSION, "keys": {}}
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise KeyStoreCorrupt(self.path, "not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise KeyStoreCorrupt(self.path, f"invalid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("keys", {}), dict):
            raise KeyStoreCorrupt(self.path, "not a key file")
        if raw.get("version", KEYS_VERSION) != KEYS_VERSION:
            raise KeyStoreCorrupt(self.path, f"unsupported version {raw.get('version')!r}")
        raw.setdefault("keys", {})
        return raw

    def load(self) -> Dict[str, KeyRecord]:
        """Every record by name (missing file: none). :class:`KeyStoreCorrupt` if unreadable."""
        raw = self._read_raw()
        records = {}
        for name, entry in raw["keys"].items():
            if not isinstance(entry, dict):
                raise KeyStoreCorrupt(self.path, f"the entry of {name!r} is not an object")
            try:
                records[name] = KeyRecord.from_json(dict(entry, name=name))
            except ValueError as e:
                raise KeyStoreCorrupt(self.path, str(e)) from None
        return records

    def records(self) -> Tuple[KeyRecord, ...]:
        """Every record, by name."""
        return tuple(sorted(self.load().values(), key=lambda r: r.name))

    # -- writing (under the lock) --

    @contextmanager
    def locked(self, timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """Hold the key file's lock; yields the raw file content, written back (atomically) on exit
        without an exception. The token store's lock helper: one flock discipline for both files."""
        timeout = self.lock_timeout if timeout is None else timeout
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        lock = _FileLock(self.lock_path)
        deadline = time.monotonic() + timeout
        while not lock.try_acquire():
            if time.monotonic() >= deadline:
                lock.close()
                raise KeyStoreLockTimeout(self.lock_path, timeout)
            time.sleep(self.lock_poll)
        try:
            raw = self._read_raw()
            before = json.dumps(raw, sort_keys=True)
            yield raw
            if json.dumps(raw, sort_keys=True) != before:
                raw["version"] = KEYS_VERSION
                self._write(raw)
        finally:
            lock.release()

    def _write(self, raw: Mapping[str, Any]) -> None:
        """Every write of keys.json goes through here (tests replace it to inject faults)."""
        atomic_write(self.path, (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o600)

    def create(self, name: str, *, models: Sequence[str] = (), rpm: Optional[int] = None,
               tokens_per_day: Optional[int] = None, usd_per_day: Optional[float] = None,
               usd_per_month: Optional[float] = None, allow_subscription: bool = False,
               admin: bool = False) -> Tuple[str, KeyRecord]:
        """A new key named ``name``: returns ``(key, record)``. The key exists only in the returned
        value: show it once, keep nothing. :class:`KeyExists` if the name is taken."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidKeyName(str(name))
        key = generate_key()
        record = KeyRecord(name=name, hash=hash_key(key), prefix=display_prefix(key), models=tuple(models),
                           rpm=rpm, tokens_per_day=tokens_per_day, usd_per_day=usd_per_day,
                           usd_per_month=usd_per_month, allow_subscription=allow_subscription,
                           admin=admin, created_at=self.now())
        with self.locked() as raw:
            if name in raw["keys"]:
                raise KeyExists(name)
            entry = record.to_json()
            del entry["name"]
            raw["keys"][name] = entry
        return key, record

    def revoke(self, name: str) -> KeyRecord:
        """Remove the key named ``name``; :class:`UnknownKey` if there is none."""
        with self.locked() as raw:
            entry = raw["keys"].pop(name, None)
            if entry is None:
                raise UnknownKey(name)
        return KeyRecord.from_json(dict(entry, name=name))

    def record_last_used(self, times: Mapping[str, float]) -> None:
        """Set ``last_used_at`` of each named key (only ever forward; revoked names are skipped):
        for a daemon flushing the last uses it saw, in one write."""
        with self.locked() as raw:
            for name, when in times.items():
                entry = raw["keys"].get(name)
                if isinstance(entry, dict) and (entry.get("last_used_at") or 0) < when:
                    entry["last_used_at"] = float(when)


@attr.s(frozen=True, auto_attribs=True)
class _Seen:
    """What the watcher last served: the file's signature and records, the served set."""

    fingerprint: Any = None
    file_records: Tuple[KeyRecord, ...] = ()
    served: Tuple[KeyRecord, ...] = ()


class KeyWatcher(service.Service):
    """Polls the key file (and the shared store, if any) every ``interval`` seconds on ``clock`` and
    calls ``on_change(records)`` with the full set of keys to accept whenever it changes (and once
    at start). The daemon passes ``KeyRing.replace`` as ``on_change``.

    ``shared`` is an ``IClientKeys`` (the Redis store under the Redis backend): the file's keys are
    published to it, put back when it lost them, and the daemon serves its keys (see the module
    docstring). A key file that turns unreadable keeps the last good keys served (one error logged,
    never fail open).

    At start, the daemon reads :meth:`KeyStore.records` itself before starting the watcher (a
    corrupt file then stops the start with one line, and the ring is full before the port opens);
    the watcher's first poll hands the same keys (or newer ones) to ``on_change`` again.
    """

    def __init__(self, store: KeyStore, clock: Any, on_change: Callable[[Tuple[KeyRecord, ...]], Any],
                 interval: float = DEFAULT_WATCH_INTERVAL, shared: Any = None):
        self.store = store
        self.clock = clock
        self.on_change = on_change
        self.interval = interval
        self.shared = shared
        # a fingerprint no file has: the first poll always reads the file
        self._seen = _Seen(fingerprint=object())
        self._loop: Optional[task.LoopingCall] = None
        self._broken: Optional[str] = None
        self._served_once = False
        #: hashes known revoked (they left the file, or the store refused them): their tombstones
        #: are restored in a store that lost them, and they are never put back
        self._revoked: Set[str] = set()
        # the shared store's connection at the last look (a store without one is always up)
        self._available = True

    def startService(self) -> None:
        """Serve the current keys now, then poll (a LoopingCall on the injected clock)."""
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return None

    def poll(self) -> defer.Deferred:
        """One look: fires once ``on_change`` has been called if anything changed. Never fails: a
        failure is logged and the next tick tries again (a stopped watcher would miss revocations)."""
        return defer.ensureDeferred(self._poll()).addErrback(
            lambda f: log.error("client key check failed ({error}); retrying", error=f.type.__name__))

    async def _poll(self) -> None:
        seen = self._seen
        fingerprint = self.store.fingerprint()
        file_records = seen.file_records
        if fingerprint != seen.fingerprint:
            try:
                file_records = self.store.records()
            except KeyStoreError as e:
                if self._broken != str(e):
                    self._broken = str(e)
                    log.error("client keys not reloaded: {error}; the last good keys stay in force",
                              error=str(e))
                return
            self._broken = None
            if self.shared is not None:
                await self._publish(seen.file_records, file_records)
        served = file_records
        if self.shared is not None:
            try:
                served = await self._shared_keys(file_records)
            except Exception as e:  # keep serving what we had; the next tick tries again
                log.error("could not read the shared client keys ({error})", error=type(e).__name__)
                # nothing served yet: the file's keys, never none (an empty ring opens a loopback daemon)
                served = seen.served if self._served_once else file_records
            if not served:
                # a store that lost every key must not open the daemon while the file holds live ones
                served = tuple(r for r in file_records if r.hash not in self._revoked)
        self._seen = _Seen(fingerprint, file_records, served)
        if served != seen.served or not self._served_once:
            self._served_once = True
            self.on_change(served)

    async def _publish(self, before: Iterable[KeyRecord], after: Iterable[KeyRecord]) -> None:
        """Put the file's new and changed keys into the shared store, revoke those that left the
        file. A change of ``last_used_at`` alone (the daemon's own minutely write) is no change: it
        would put every key every minute, and the store lacking a key is seen on every tick anyway
        (:meth:`_shared_keys`)."""
        was = {r.hash: _published(r) for r in before}
        now = {r.hash: r for r in after}
        for digest in set(was) - set(now):
            self._revoked.add(digest)
            await self.shared.revoke_key(digest)
        for digest, record in now.items():
            if was.get(digest) == _published(record):
                continue
            if not await self.shared.put_key(digest, record.to_json()):
                self._revoked.add(digest)

    async def _shared_keys(self, file_records: Tuple[KeyRecord, ...]) -> Tuple[KeyRecord, ...]:
        """The shared store's keys, once the file's keys it lost are back in it.

        It lost some when it holds fewer of the file's live keys than the file does, and may have
        lost its tombstones when it reconnected (a restarted Redis comes back empty): then the known
        revocations are written again first, so a put can never bring a revoked key back, and the
        missing keys are put. A put the store refuses names a key revoked elsewhere: remembered, so
        it is not tried again on every tick."""
        available = bool(getattr(self.shared, "available", True))
        reconnected = available and not self._available
        self._available = available
        shared = await self.shared.all_keys()
        missing = [r for r in file_records if r.hash not in shared and r.hash not in self._revoked]
        if reconnected or missing:
            if missing:
                log.warn("the shared store lost {count} client key(s) of the key file; putting them back",
                         count=len(missing))
            for digest in sorted(self._revoked):
                await self.shared.revoke_key(digest)
            for record in missing:
                if not await self.shared.put_key(record.hash, record.to_json()):
                    self._revoked.add(record.hash)
            shared = await self.shared.all_keys()
        return tuple(sorted((KeyRecord.from_json(r) for r in shared.values()), key=lambda r: r.name))


def _published(record: KeyRecord) -> KeyRecord:
    """What of ``record`` the shared store needs to be told again when it changes: all but its last
    use."""
    return attr.evolve(record, last_used_at=None)


class LastUseRecorder(service.Service):
    """The last time each client key was used, noted in memory and written to the key file every
    ``interval`` seconds on ``clock`` and at stop, in a thread (``in_thread``: ``deferToThread``).

    :attr:`times` (name -> epoch seconds) is the dict the request path writes to, one assignment
    per request and no I/O (:class:`clproxy.http.auth.ClientAuth`); it is the same dict for the
    daemon's life, so a flush copies and empties it. A write that fails (the lock held too long, a
    broken file) keeps its times for the next one and is logged once per distinct error."""

    def __init__(self, store: KeyStore, clock: Any, interval: float = LAST_USED_INTERVAL,
                 in_thread: Callable[..., defer.Deferred] = threads.deferToThread):
        self.store = store
        self.clock = clock
        self.interval = interval
        self.in_thread = in_thread
        self.times: Dict[str, float] = {}
        self._loop: Optional[task.LoopingCall] = None
        self._failing: Optional[str] = None

    def startService(self) -> None:
        """Write every ``interval`` seconds from now on."""
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> defer.Deferred:
        """Stop the timer and write what is left; fires once it is written."""
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self.flush()

    def flush(self) -> defer.Deferred:
        """Write the times noted since the last write (none: nothing to do); never fails."""
        if not self.times:
            return defer.succeed(None)
        batch = dict(self.times)
        self.times.clear()
        d = self.in_thread(self.store.record_last_used, batch)
        d.addCallbacks(self._written, self._failed, errbackArgs=(batch,))
        return d

    def _written(self, _result: Any) -> None:
        self._failing = None

    def _failed(self, failure: Any, batch: Mapping[str, float]) -> None:
        # the error names the file, never a key (KeyStoreError, OSError); others by type only
        error = str(failure.value) if failure.check(KeyStoreError, OSError) else failure.type.__name__
        if error != self._failing:
            self._failing = error
            log.error("the last use of client keys was not written ({error}); retrying later",
                      error=error)
        for name, when in batch.items():  # back for the next write, unless a newer use came since
            if self.times.get(name, 0.0) < when:
                self.times[name] = when
