"""The client key file (0600, atomic, locked; create/list/revoke) and the watcher that reloads it."""

import json
import multiprocessing
import os
import stat

import pytest
from twisted.internet import defer, task

from clproxy.accounts.tokenstore import _FileLock
from clproxy.state.memory import MemoryStateStore
from clproxy.team.keys import KeyRing, hash_key
from clproxy.team.keystore import (InvalidKeyName, KeyExists, KeyStore, KeyStoreCorrupt,
                                   KeyStoreLockTimeout, KeyWatcher, LastUseRecorder, UnknownKey)


def files_under(home):
    """Every file under ``home`` with its bytes."""
    for root, _, names in os.walk(home):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                yield path, f.read()


def test_create_list_revoke(tmp_path):
    """create stores a record with its limits; records lists them; revoke removes by name."""
    store = KeyStore(str(tmp_path), now=lambda: 1000.0)
    key, rec = store.create("alice", models=["claude-sonnet-*"], rpm=10, tokens_per_day=5000,
                            usd_per_day=2.5, usd_per_month=40, allow_subscription=True, admin=True)
    assert key.startswith("clp_") and rec.hash == hash_key(key) and rec.prefix == key[4:12]
    store.create("bob")
    listed = store.records()
    assert [r.name for r in listed] == ["alice", "bob"]
    assert listed[0] == rec and listed[0].created_at == 1000.0 and listed[0].models == ("claude-sonnet-*",)
    assert store.revoke("alice").name == "alice"
    assert [r.name for r in store.records()] == ["bob"]


def test_names_unique_and_valid(tmp_path):
    """A taken name, an unknown name to revoke and a bad name give one-line errors."""
    store = KeyStore(str(tmp_path))
    store.create("alice")
    with pytest.raises(KeyExists) as info:
        store.create("alice")
    assert "\n" not in str(info.value)
    with pytest.raises(UnknownKey):
        store.revoke("nobody")
    for bad in ("", "-x", "a b", "x" * 65, "a/b"):
        with pytest.raises(InvalidKeyName):
            store.create(bad)
    assert [r.name for r in store.records()] == ["alice"]


def test_file_is_0600_and_holds_hashes_only(tmp_path):
    """keys.json is 0600 and no file under the home holds a key, only its hash."""
    store = KeyStore(str(tmp_path))
    made = [store.create(f"k{i}")[0] for i in range(3)]
    store.revoke("k1")
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    for path, data in files_under(str(tmp_path)):
        for key in made:
            assert key.encode() not in data, path
            assert key[4:].encode() not in data, path
    assert hash_key(made[0]).encode() in open(store.path, "rb").read()


def test_write_is_atomic(tmp_path):
    """A write that fails leaves the previous file intact (and no temp file behind)."""
    store = KeyStore(str(tmp_path))
    store.create("alice")
    before = open(store.path, "rb").read()

    def broken(raw):
        raise OSError(28, "No space left on device")

    store._write = broken
    with pytest.raises(OSError):
        store.create("bob")
    assert open(store.path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["keys.json", "keys.json.lock"]


def test_lock_held_elsewhere_times_out(tmp_path):
    """While another holder has the lock, a change waits, then fails in one line."""
    store = KeyStore(str(tmp_path), lock_timeout=0.2, lock_poll=0.01)
    os.makedirs(store.home, exist_ok=True)
    lock = _FileLock(store.lock_path)
    assert lock.try_acquire()
    try:
        with pytest.raises(KeyStoreLockTimeout):
            store.create("alice")
    finally:
        lock.release()
    store.create("alice")


def _create_many(home, prefix, count):
    store = KeyStore(home)
    for i in range(count):
        store.create(f"{prefix}{i}")


def test_concurrent_processes_lose_no_write(tmp_path):
    """Two processes creating keys at once: every key is in the file (the lock serialises them)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_create_many, args=(str(tmp_path), p, 15)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(KeyStore(str(tmp_path)).records()) == 30


def test_corrupt_file_is_reported_and_left_alone(tmp_path):
    """An unreadable keys.json raises KeyStoreCorrupt and is not overwritten."""
    store = KeyStore(str(tmp_path))
    with open(store.path, "w") as f:
        f.write("{not json")
    with pytest.raises(KeyStoreCorrupt):
        store.records()
    with pytest.raises(KeyStoreCorrupt):
        store.create("alice")
    assert open(store.path).read() == "{not json"


def test_last_used_only_moves_forward(tmp_path):
    """record_last_used sets last_used_at, never backwards, and skips unknown names."""
    store = KeyStore(str(tmp_path))
    store.create("alice")
    store.record_last_used({"alice": 50.0, "ghost": 1.0})
    store.record_last_used({"alice": 40.0})
    assert store.records()[0].last_used_at == 50.0
    assert [r.name for r in store.records()] == ["alice"]


def test_watcher_sees_new_and_revoked_keys_within_two_seconds(tmp_path):
    """On a task.Clock the watcher serves a new key, then drops a revoked one, within 2 s."""
    clock = task.Clock()
    store = KeyStore(str(tmp_path))
    ring = KeyRing()
    watcher = KeyWatcher(store, clock, ring.replace)
    watcher.startService()
    assert ring.empty
    key, _ = store.create("alice")
    clock.advance(2.0)
    assert ring.verify(key).name == "alice"
    store.revoke("alice")
    clock.advance(2.0)
    assert ring.verify(key) is None and ring.empty
    watcher.stopService()


def test_watcher_calls_on_change_only_on_change(tmp_path):
    """on_change runs once at start and again only when the set of keys changes."""
    clock = task.Clock()
    store = KeyStore(str(tmp_path))
    calls = []
    watcher = KeyWatcher(store, clock, calls.append, interval=1.0)
    watcher.startService()
    clock.advance(5)
    assert calls == [()]
    store.create("alice")
    clock.advance(1)
    clock.advance(5)
    assert [tuple(r.name for r in c) for c in calls] == [(), ("alice",)]
    watcher.stopService()


def test_watcher_keeps_last_good_keys_when_file_breaks(tmp_path):
    """A corrupt key file does not open the door: the last good keys stay in force."""
    clock = task.Clock()
    store = KeyStore(str(tmp_path))
    key, _ = store.create("alice")
    ring = KeyRing()
    watcher = KeyWatcher(store, clock, ring.replace)
    watcher.startService()
    with open(store.path, "w") as f:
        f.write("garbage")
    clock.advance(3)
    assert ring.verify(key) is not None
    watcher.stopService()


def test_watcher_publishes_to_shared_store_and_serves_it(tmp_path):
    """With a shared store the file's keys are published, revocations tombstoned, and the store's
    keys (another instance's too) served."""
    clock = task.Clock()
    shared = MemoryStateStore()
    store_a = KeyStore(str(tmp_path / "a"))
    store_b = KeyStore(str(tmp_path / "b"))
    ring_a, ring_b = KeyRing(), KeyRing()
    watchers = [KeyWatcher(store_a, clock, ring_a.replace, shared=shared),
                KeyWatcher(store_b, clock, ring_b.replace, shared=shared)]
    for w in watchers:
        w.startService()
    key, rec = store_a.create("alice")
    clock.advance(1)
    clock.advance(1)
    assert ring_a.verify(key) is not None and ring_b.verify(key) is not None
    # machine b's file holds the same record (copied by hand): a revocation on a still wins
    os.makedirs(store_b.home, exist_ok=True)
    with open(store_b.path, "w") as f:
        f.write(open(store_a.path).read())
    clock.advance(1)
    store_a.revoke("alice")
    clock.advance(1)
    clock.advance(1)
    assert ring_a.verify(key) is None and ring_b.verify(key) is None
    # b's file changes (b republishes all it holds): the revoked key stays out
    store_b.create("carol")
    clock.advance(1)
    clock.advance(1)
    assert ring_a.verify(key) is None and ring_b.verify(key) is None
    assert [r.name for r in ring_a] == ["carol"]
    for w in watchers:
        w.stopService()
    assert json.dumps(shared._client_keys).find(key) == -1


def test_watcher_serves_the_file_keys_when_the_shared_store_cannot_be_read_at_start(tmp_path):
    """A shared store that fails on the first poll does not empty the ring (which would run a
    loopback daemon without authentication): the file's keys are served until it answers."""
    class Unreadable(MemoryStateStore):
        def all_keys(self):
            raise ConnectionError("redis is down")

    clock = task.Clock()
    store = KeyStore(str(tmp_path))
    key, _ = store.create("alice")
    ring = KeyRing(store.records())
    watcher = KeyWatcher(store, clock, ring.replace, shared=Unreadable())
    watcher.startService()
    assert ring.verify(key) is not None and not ring.empty
    watcher.stopService()


class Forgetful(MemoryStateStore):
    """A shared store that can lose everything, tombstones included (a Redis restarted without
    persistence, FLUSHDB), and be down for a while; it counts the puts it is asked for."""

    def __init__(self):
        super().__init__()
        self.available = True
        self.puts = 0

    def flush(self):
        self._client_keys.clear()
        self._revoked_keys.clear()

    def put_key(self, key_hash, record):
        self.puts += 1
        return super().put_key(key_hash, record)


def test_watcher_puts_back_the_keys_a_shared_store_lost_and_never_serves_none(tmp_path):
    """A shared store that comes back empty: the ring never empties, the file's keys are put back on
    the next tick, the tombstone of a key revoked through the file is written again (another machine
    whose file still holds it cannot bring it back), and a key the store refuses is not tried again
    on every tick."""
    clock = task.Clock()
    shared = Forgetful()
    store, other = KeyStore(str(tmp_path / "a")), KeyStore(str(tmp_path / "b"))
    alice, _ = store.create("alice")
    bob, _ = store.create("bob")
    ring, other_ring = KeyRing(), KeyRing()
    emptied = []
    watcher = KeyWatcher(store, clock, lambda records: (ring.replace(records), emptied.append(not records)),
                         shared=shared)
    watcher.startService()
    clock.advance(1)
    assert ring.verify(alice) and ring.verify(bob)
    os.makedirs(other.home, exist_ok=True)
    with open(other.path, "w") as f:  # machine b holds a copy of the file, bob included
        f.write(open(store.path).read())
    store.revoke("bob")
    clock.advance(1)
    assert ring.verify(bob) is None and hash_key(bob) in shared._revoked_keys

    shared.flush()  # restarted empty, while the daemon still had a connection
    clock.advance(1)
    assert ring.verify(alice) is not None and not any(emptied)
    assert hash_key(alice) in shared._client_keys and hash_key(bob) in shared._revoked_keys

    shared.available = False  # down, then back empty: the reconnection restores the tombstones
    clock.advance(1)
    shared.flush()
    shared.available = True
    clock.advance(1)
    assert hash_key(bob) in shared._revoked_keys and ring.verify(alice) is not None and not any(emptied)

    later = KeyWatcher(other, clock, other_ring.replace, shared=shared)  # machine b starts now
    later.startService()
    clock.advance(1)
    assert other_ring.verify(bob) is None and ring.verify(bob) is None and other_ring.verify(alice)
    puts = shared.puts
    for _ in range(5):
        clock.advance(1)
    assert shared.puts == puts  # the refused copy of bob is not put again on every tick
    later.stopService()
    watcher.stopService()


def test_watcher_never_lets_an_empty_shared_store_empty_the_ring(tmp_path):
    """A shared store that answers with no key and refuses nothing (its writes lost) leaves the file's
    keys served, not an empty ring that would open a loopback daemon."""
    class Amnesic(MemoryStateStore):
        def all_keys(self):
            return defer.succeed({})

    clock = task.Clock()
    store = KeyStore(str(tmp_path))
    key, _ = store.create("alice")
    ring = KeyRing()
    watcher = KeyWatcher(store, clock, ring.replace, shared=Amnesic())
    watcher.startService()
    for _ in range(3):
        clock.advance(1)
        assert ring.verify(key) is not None
    watcher.stopService()


def in_place(function, *args):
    """``deferToThread`` for a test on a task.Clock: runs ``function`` now, in a Deferred."""
    return defer.maybeDeferred(function, *args)


def test_last_uses_are_written_every_minute_and_at_stop_not_per_request(tmp_path):
    """The uses noted in memory reach the file only at the minute's write (never per request), only
    forward, then again at stop; a write that fails keeps its times for the next one."""
    clock = task.Clock()
    clock.advance(1000)
    store = KeyStore(str(tmp_path))
    store.create("alice")
    store.create("bob")
    recorder = LastUseRecorder(store, clock, in_thread=in_place)
    recorder.startService()
    recorder.times["alice"] = 1010.0
    recorder.times["ghost"] = 1011.0  # revoked since: skipped
    clock.advance(59)
    assert {r.name: r.last_used_at for r in store.records()} == {"alice": None, "bob": None}
    clock.advance(1)
    assert {r.name: r.last_used_at for r in store.records()} == {"alice": 1010.0, "bob": None}
    assert recorder.times == {}

    def broken(raw):
        raise OSError(28, "No space left on device")

    write, store._write = store._write, broken
    recorder.times["bob"] = 1070.0
    clock.advance(60)
    assert recorder.times == {"bob": 1070.0} and store.records()[1].last_used_at is None
    store._write = write
    recorder.times["alice"] = 1125.0
    recorder.stopService()
    assert {r.name: r.last_used_at for r in store.records()} == {"alice": 1125.0, "bob": 1070.0}
    assert clock.getDelayedCalls() == []


def test_a_last_use_write_republishes_nothing_to_the_shared_store(tmp_path):
    """The minutely last-use write changes the key file; the watcher reads it again but puts no key
    into the shared store for it (no write storm every minute), and the keys stay served. A real
    change of a key is still published."""
    clock = task.Clock()
    shared = Forgetful()
    store = KeyStore(str(tmp_path))
    key, _ = store.create("alice")
    ring = KeyRing()
    watcher = KeyWatcher(store, clock, ring.replace, shared=shared)
    watcher.startService()
    recorder = LastUseRecorder(store, clock, in_thread=in_place)
    recorder.startService()
    clock.advance(1)
    puts = shared.puts
    for minute in range(3):
        recorder.times["alice"] = clock.seconds()
        for _ in range(60):
            clock.advance(1)
    assert store.records()[0].last_used_at is not None
    assert shared.puts == puts and ring.verify(key) is not None
    store.create("bob")
    clock.advance(1)
    assert shared.puts == puts + 1 and [r.name for r in ring] == ["alice", "bob"]
    recorder.stopService()
    watcher.stopService()
