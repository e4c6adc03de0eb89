"""Contracts of the shared-state interfaces (IAtomicCooldown, ISharedTokens, IQuotaStore,
ILockProvider), run against the Redis store and against the in-process forms that stand in for it.

The ``*Contract`` mixins belong next to ``StateStoreContract`` in ``store_contract.py``; a
subclass defines ``make_store()`` returning a fresh implementation.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from clproxy.interfaces import IAtomicCooldown, ILockProvider, IQuotaStore, ISharedTokens
from clproxy.state.locks import LockToken, MemoryLocks, lock_poll_delay, poll_for_lock
from clproxy.state.model import AccountState
from clproxy.state.memory import MemoryStateStore
from clproxy.state.redis import LocalMirror, RedisStateStore
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)
from store_contract import (ClientKeysContract, LoginSessionsContract, SessionBindingsContract, UsageCountersContract,
                            WorkerMetricsContract)


class AtomicCooldownContract:
    """Contract tests for ``IAtomicCooldown``."""

    def make_store(self):
        raise NotImplementedError

    def test_provides_atomic_cooldown(self):
        """The store provides IAtomicCooldown."""
        assert verifyObject(IAtomicCooldown, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_extend_sets_when_not_cooling(self):
        """Extending an account with nothing recorded cools it and sets the level."""
        store = self.make_store()
        assert await store.extend_cooldown("a", 50.0, 2) == AccountState(50.0, 2)
        assert (await store.get_account_states(["a"]))["a"] == AccountState(50.0, 2)

    @pytest_twisted.ensureDeferred
    async def test_extend_never_shortens(self):
        """A shorter cooldown leaves a longer one in place; a longer one replaces it."""
        store = self.make_store()
        await store.extend_cooldown("a", 500.0, 1)
        assert await store.extend_cooldown("a", 100.0, 1) == AccountState(500.0, 1)
        assert await store.extend_cooldown("a", 900.0) == AccountState(900.0, 1)
        assert (await store.get_account_states(["a"]))["a"] == AccountState(900.0, 1)

    @pytest_twisted.ensureDeferred
    async def test_extend_keeps_the_higher_level(self):
        """The level becomes the larger of the stored and the given one; None keeps it."""
        store = self.make_store()
        await store.set_cooldown("a", 10.0, 4)
        assert (await store.extend_cooldown("a", 20.0, 2)).backoff_level == 4
        assert (await store.extend_cooldown("a", 20.0, 5)).backoff_level == 5
        assert (await store.extend_cooldown("a", 20.0, None)).backoff_level == 5

    @pytest_twisted.ensureDeferred
    async def test_success_after_extend_clears(self):
        """A success outcome ends an extended cooldown like any other."""
        store = self.make_store()
        await store.extend_cooldown("a", 500.0, 3)
        await store.record_outcome("a", "success", 1.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()

    @pytest_twisted.ensureDeferred
    async def test_a_success_sent_before_the_cooldown_leaves_it(self):
        """A success of an attempt sent before (or when) the cooldown was decided leaves cooldown
        and level in place (a slow request finishing after another one's 429); one sent after it
        ends both, and the decision time goes with them."""
        store = self.make_store()
        await store.extend_cooldown("a", 18_100.0, 3, at=100.0)
        await store.record_result("a", "success", 150.0, sent_at=99.0)
        await store.record_outcome("a", "success", 151.0, sent_at=100.0)  # a tie keeps it too
        assert (await store.get_account_states(["a"]))["a"] == AccountState(18_100.0, 3)
        assert (await store.account_stats(["a"]))["a"]["successes"] == 2
        await store.record_result("a", "success", 152.0, sent_at=100.5)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()
        # the decision time was cleared with the cooldown: one decided without a time is cleared
        # by any success, even one sent long before
        await store.extend_cooldown("a", 900.0, 1)
        await store.record_result("a", "success", 153.0, sent_at=1.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()

    @pytest_twisted.ensureDeferred
    async def test_a_shorter_cooldown_decided_later_still_guards_the_longer(self):
        """A cooldown that does not extend the one in place is still news of the limit: a success
        sent between the two decisions leaves the longer cooldown in place."""
        store = self.make_store()
        await store.extend_cooldown("a", 900.0, 2, at=100.0)
        assert await store.extend_cooldown("a", 200.0, 1, at=120.0) == AccountState(900.0, 2)
        await store.record_result("a", "success", 130.0, sent_at=110.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState(900.0, 2)
        await store.record_result("a", "success", 131.0, sent_at=121.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()

    @pytest_twisted.ensureDeferred
    async def test_a_success_without_a_send_time_clears(self):
        """A success recorded without ``sent_at`` (an old caller) ends the cooldown whenever it
        was decided; ``forget`` drops the decision time with the rest."""
        store = self.make_store()
        await store.extend_cooldown("a", 900.0, 2, at=100.0)
        await store.record_outcome("a", "success", 50.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()
        await store.extend_cooldown("b", 900.0, 2, at=100.0)
        await store.forget("b")
        await store.extend_cooldown("b", 900.0, 2)
        await store.record_outcome("b", "success", 50.0, sent_at=10.0)
        assert (await store.get_account_states(["b"]))["b"] == AccountState()


class SharedTokensContract:
    """Contract tests for ``ISharedTokens``."""

    def make_store(self):
        raise NotImplementedError

    def test_provides_shared_tokens(self):
        """The store provides ISharedTokens."""
        assert verifyObject(ISharedTokens, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_unknown_token_is_none(self):
        """A key without a record reads as None."""
        assert await self.make_store().get_token_record("a") is None

    @pytest_twisted.ensureDeferred
    async def test_put_then_get_round_trips(self):
        """A stored record reads back equal, as a new dict the caller may change."""
        store = self.make_store()
        record = {"access_token": "at-1", "refresh_token": "rt-1", "expires_at": 1.5e9,
                  "updated_at": 10.0, "scopes": ["a", "b"], "disabled": False}
        await store.put_token_record("a", record)
        got = await store.get_token_record("a")
        assert got == record
        got["access_token"] = "changed"
        assert (await store.get_token_record("a"))["access_token"] == "at-1"
        assert await store.get_token_record("b") is None

    @pytest_twisted.ensureDeferred
    async def test_put_replaces_even_an_older_version(self):
        """put_token_record replaces unconditionally (the caller holds the refresh lock)."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "rt-2", "updated_at": 20.0})
        await store.put_token_record("a", {"refresh_token": "rt-1", "updated_at": 10.0})
        assert (await store.get_token_record("a"))["refresh_token"] == "rt-1"

    @pytest_twisted.ensureDeferred
    async def test_import_fills_an_empty_key(self):
        """Importing a record where there is none stores it."""
        store = self.make_store()
        assert await store.import_token_record("a", {"refresh_token": "rt", "updated_at": 1.0})
        assert (await store.get_token_record("a"))["refresh_token"] == "rt"

    @pytest_twisted.ensureDeferred
    async def test_import_keeps_a_newer_or_equal_record(self):
        """An import older than or as old as the stored record is kept out."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "live", "updated_at": 20.0})
        assert not await store.import_token_record("a", {"refresh_token": "old",
                                                          "updated_at": 10.0})
        assert not await store.import_token_record("a", {"refresh_token": "same",
                                                          "updated_at": 20.0})
        assert (await store.get_token_record("a"))["refresh_token"] == "live"

    @pytest_twisted.ensureDeferred
    async def test_import_replaces_an_older_record(self):
        """An import newer than the stored record replaces it."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "old", "updated_at": 10.0})
        assert await store.import_token_record("a", {"refresh_token": "new", "updated_at": 30.0})
        assert (await store.get_token_record("a"))["refresh_token"] == "new"

    @pytest_twisted.ensureDeferred
    async def test_import_orders_by_tokens_at_not_updated_at(self):
        """tokens_at (when the tokens were obtained) orders records; a stale copy whose updated_at
        an unrelated edit bumped is kept out. A record without tokens_at is ordered by updated_at."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "live", "tokens_at": 20.0, "updated_at": 20.0})
        assert not await store.import_token_record("a", {"refresh_token": "stale", "tokens_at": 10.0,
                                                          "updated_at": 99.0})
        assert await store.import_token_record("a", {"refresh_token": "newer", "tokens_at": 30.0,
                                                      "updated_at": 5.0})
        assert (await store.get_token_record("a"))["refresh_token"] == "newer"
        await store.put_token_record("b", {"refresh_token": "old-format", "updated_at": 20.0})
        assert not await store.import_token_record("b", {"refresh_token": "x", "tokens_at": 15.0})
        assert await store.import_token_record("b", {"refresh_token": "y", "tokens_at": 25.0})
        assert (await store.get_token_record("b"))["refresh_token"] == "y"

    @pytest_twisted.ensureDeferred
    async def test_import_never_replaces_what_it_cannot_compare(self):
        """Without updated_at on either side an import leaves the stored record alone."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "unversioned"})
        assert not await store.import_token_record("a", {"refresh_token": "x",
                                                          "updated_at": 99.0})
        await store.put_token_record("b", {"refresh_token": "versioned", "updated_at": 1.0})
        assert not await store.import_token_record("b", {"refresh_token": "y"})
        assert (await store.get_token_record("a"))["refresh_token"] == "unversioned"
        assert (await store.get_token_record("b"))["refresh_token"] == "versioned"

    @pytest_twisted.ensureDeferred
    async def test_delete(self):
        """A deleted record reads as None; deleting an unknown key is harmless."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "rt"})
        await store.delete_token_record("a")
        await store.delete_token_record("nobody")
        assert await store.get_token_record("a") is None

    @pytest_twisted.ensureDeferred
    async def test_forget_keeps_tokens(self):
        """forget drops runtime state, not the credential record."""
        store = self.make_store()
        await store.put_token_record("a", {"refresh_token": "rt"})
        await store.forget("a")
        assert (await store.get_token_record("a"))["refresh_token"] == "rt"


class QuotaStoreContract:
    """Contract tests for ``IQuotaStore``."""

    def make_store(self):
        raise NotImplementedError

    def test_provides_quota_store(self):
        """The store provides IQuotaStore."""
        assert verifyObject(IQuotaStore, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_quotas_round_trip_per_key(self):
        """Each key reads its latest snapshot; keys without one read None."""
        store = self.make_store()
        first = {"status": "allowed", "five_hour": {"utilization": 0.25, "reset": 1.7e9}}
        await store.put_quota("a", {"status": "old"})
        await store.put_quota("a", first)
        assert await store.get_quotas(["a", "b"]) == {"a": first, "b": None}
        assert await store.get_quotas([]) == {}

    @pytest_twisted.ensureDeferred
    async def test_forget_drops_quota(self):
        """forget drops the quota snapshot of that key only."""
        store = self.make_store()
        await store.put_quota("a", {"status": "allowed"})
        await store.put_quota("b", {"status": "allowed"})
        await store.forget("a")
        assert await store.get_quotas(["a", "b"]) == {"a": None, "b": {"status": "allowed"}}


class LockProviderContract:
    """Contract tests for ``ILockProvider``; ``clock()`` is the clock the locks are timed on."""

    def make_store(self):
        raise NotImplementedError

    def clock(self):
        return reactor

    def test_provides_lock_provider(self):
        """The provider provides ILockProvider."""
        assert verifyObject(ILockProvider, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_acquire_release_acquire(self):
        """A free lock is taken; a second try without waiting fails; after release it is free."""
        store = self.make_store()
        token = await store.acquire("refresh:a", 10_000, 0, self.clock())
        assert isinstance(token, LockToken) and token.name == "refresh:a"
        assert await store.acquire("refresh:a", 10_000, 0, self.clock()) is None
        assert await store.acquire("refresh:b", 10_000, 0, self.clock()) is not None
        assert await store.release(token) is True
        assert await store.acquire("refresh:a", 10_000, 0, self.clock()) is not None

    @pytest_twisted.ensureDeferred
    async def test_release_twice_is_false(self):
        """Releasing a lock no longer held reports False and changes nothing."""
        store = self.make_store()
        token = await store.acquire("l", 10_000, 0, self.clock())
        assert await store.release(token) is True
        again = await store.acquire("l", 10_000, 0, self.clock())
        assert await store.release(token) is False
        assert await store.acquire("l", 10_000, 0, self.clock()) is None
        assert await store.release(again) is True

    @pytest_twisted.ensureDeferred
    async def test_expired_lock_is_free_and_not_releasable(self):
        """After its TTL a lock can be taken by another; its first holder cannot release it."""
        store = self.make_store()
        first = await store.acquire("l", 50, 0, self.clock())
        await deferLater(reactor, 0.12, lambda: None)
        second = await store.acquire("l", 10_000, 0, self.clock())
        assert second is not None
        assert await store.release(first) is False
        assert await store.acquire("l", 10_000, 0, self.clock()) is None
        assert await store.release(second) is True

    @pytest_twisted.ensureDeferred
    async def test_waiter_gets_the_lock_after_release(self):
        """A waiting acquirer gets the lock soon after the holder releases it."""
        store = self.make_store()
        holder = await store.acquire("l", 10_000, 0, self.clock())
        waiting = store.acquire("l", 10_000, 5.0, self.clock())
        await deferLater(reactor, 0.05, lambda: None)
        assert not waiting.called
        await store.release(holder)
        token = await waiting
        assert token is not None and token.owner != holder.owner

    @pytest_twisted.ensureDeferred
    async def test_wait_ends_with_none(self):
        """A lock held past the wait gives None once the wait is over."""
        store = self.make_store()
        await store.acquire("l", 10_000, 0, self.clock())
        started = reactor.seconds()
        assert await store.acquire("l", 10_000, 0.1, self.clock()) is None
        assert 0.09 <= reactor.seconds() - started < 1.0


class TestMirrorSharedState(AtomicCooldownContract, SharedTokensContract, QuotaStoreContract,
                            LockProviderContract, SessionBindingsContract, UsageCountersContract, ClientKeysContract,
                            LoginSessionsContract):
    """The local mirror (served during an outage) meets the shared-state contracts."""

    def make_store(self):
        """A fresh mirror."""
        return LocalMirror()


class TestMemorySharedState(AtomicCooldownContract, SharedTokensContract, QuotaStoreContract,
                            LockProviderContract, SessionBindingsContract, UsageCountersContract,
                            LoginSessionsContract):
    """The memory store, the backend of a single instance, meets every shared-state contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


class TestMemoryLocks(LockProviderContract):
    """The in-process lock provider meets the lock contract."""

    def make_store(self):
        """A fresh provider."""
        return MemoryLocks()


class TestRedisSharedState(AtomicCooldownContract, SharedTokensContract, QuotaStoreContract,
                           LockProviderContract, SessionBindingsContract, UsageCountersContract, ClientKeysContract,
                            LoginSessionsContract, WorkerMetricsContract):
    """The Redis store meets the shared-state contracts, every call answered by Redis."""

    @pytest.fixture(autouse=True)
    def _connected(self, redis_server):  # noqa: F811
        store = RedisStateStore(redis_server.url, reactor, prefix=unique_prefix())
        pytest_twisted.blockon(store.connect())
        self._store = store
        yield
        pytest_twisted.blockon(store.close())
        assert store._link.failed_calls == 0

    def make_store(self):
        """The connected store of this test."""
        return self._store


class TestRedisWithoutRedisSharedState(AtomicCooldownContract, SharedTokensContract,
                                       QuotaStoreContract, LockProviderContract,
                                       SessionBindingsContract, UsageCountersContract, ClientKeysContract,
                                       LoginSessionsContract):
    """With Redis unreachable the store meets the shared-state contracts from its mirror."""

    def make_store(self):
        """A store that never connected."""
        return RedisStateStore("redis://127.0.0.1:1/0", reactor, prefix=unique_prefix())


def test_lock_poll_delay_backs_off_to_a_cap():
    """Lock polling waits 5 ms, doubling, never more than 200 ms."""
    assert [lock_poll_delay(n) for n in range(8)] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16,
                                                       0.2, 0.2]
    assert lock_poll_delay(10_000) == 0.2


def test_poll_for_lock_on_a_fake_clock():
    """poll_for_lock retries on the clock's schedule and gives up exactly at the deadline."""
    clock = task.Clock()
    tries = []

    async def never():
        tries.append(clock.seconds())
        return None

    result = []
    Deferred.fromCoroutine(poll_for_lock(never, 0.1, clock, jitter=lambda: 0.5)).addCallback(
        result.append)
    clock.pump([0.001] * 200)
    assert result == [None]
    assert tries == pytest.approx([0.0, 0.005, 0.015, 0.035, 0.075, 0.1], abs=1e-3)


def test_poll_for_lock_zero_wait_tries_once():
    """A wait of 0 is one try, answered at once."""
    clock = task.Clock()
    calls = []

    async def held():
        calls.append(1)
        return None

    result = []
    Deferred.fromCoroutine(poll_for_lock(held, 0, clock)).addCallback(result.append)
    assert (result, calls) == ([None], [1])


def test_memory_lock_expires_on_its_clock():
    """An in-process lock is free again once its TTL has passed on the acquiring clock."""
    clock = task.Clock()
    locks = MemoryLocks()
    first = locks.try_acquire("l", 1000, clock)
    assert first is not None and first.local
    clock.advance(0.999)
    assert locks.try_acquire("l", 1000, clock) is None
    clock.advance(0.001)
    assert locks.try_acquire("l", 1000, clock) is not None


@pytest_twisted.ensureDeferred
async def test_redis_bindings_use_prefixed_keys_with_ttl(redis_server):  # noqa: F811
    """Bindings live under the store's prefix with a TTL (Redis reclaims them), and counting needs
    no scan: one sorted set per account."""
    prefix = unique_prefix()
    store = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    await store.connect()
    try:
        await store.put_binding("s1", "a", 100.0, 30.0)
        ttl = await store._link.run(lambda r: r.execute_command("PTTL", prefix + ":bind:s1"))
        bound_ttl = await store._link.run(lambda r: r.execute_command("PTTL", prefix + ":bound:a"))
        assert 0 < ttl <= 90_000 and 0 < bound_ttl <= 90_000
        assert await store._link.run(lambda r: r.zcard(prefix + ":bound:a")) == 1
        assert await store.drop_bindings_of("a") == 1
        assert await store._link.run(lambda r: r.exists(prefix + ":bound:a")) in (0, False)
    finally:
        await store.close()


def test_redis_store_provides_session_bindings():
    """The Redis store provides ISessionBindings (verifyObject, with no connection)."""
    from clproxy.interfaces import ISessionBindings
    assert verifyObject(ISessionBindings,
                        RedisStateStore("redis://127.0.0.1:1/0", reactor, prefix=unique_prefix()))


@pytest_twisted.ensureDeferred
async def test_redis_client_keys_shared_and_hashes_only(redis_server):  # noqa: F811
    """Two instances on one Redis share client keys and revocations; Redis holds the records under
    the prefix and nothing else (the records carry hashes, never keys)."""
    prefix = unique_prefix()
    one = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    two = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    await one.connect()
    await two.connect()
    try:
        await one.put_key("a" * 64, {"name": "alice", "hash": "a" * 64})
        assert list(await two.all_keys()) == ["a" * 64]
        await two.revoke_key("a" * 64)
        assert await one.all_keys() == {}
        assert await one.put_key("a" * 64, {"name": "alice", "hash": "a" * 64}) is False
        names = await one._link.run(lambda r: r.keys(prefix + ":ckeys*"))
        assert sorted(names) == [prefix + ":ckeys:revoked"]
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_redis_client_key_changes_during_outage_reach_redis(redis_server):  # noqa: F811
    """A put and a revocation made while Redis was unreachable are written once it is back."""
    prefix = unique_prefix()
    store = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    await store.connect()
    other = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    await other.connect()
    try:
        await other.put_key("b" * 64, {"name": "bob"})
        down = store._link.run

        async def unreachable(op):
            from clproxy.state.redis.link import RedisDown
            raise RedisDown("test")

        store._link.run = unreachable
        await store.put_key("a" * 64, {"name": "alice"})
        await store.revoke_key("b" * 64)
        assert await store.all_keys() == {"a" * 64: {"name": "alice"}}
        store._link.run = down
        await store._replay()
        assert await other.all_keys() == {"a" * 64: {"name": "alice"}}
        assert store.pending_count() == 0
    finally:
        await store.close()
        await other.close()


@pytest_twisted.ensureDeferred
async def test_redis_worker_metrics_fail_without_redis_and_are_not_mirrored():
    """With Redis unreachable, publishing and reading worker metrics fail (a worker alone knows only
    its own numbers) instead of answering from the local mirror."""
    from clproxy.state.redis.link import RedisDown
    store = RedisStateStore("redis://127.0.0.1:1/0", reactor, prefix=unique_prefix())
    with pytest.raises(RedisDown):
        await store.publish_worker_metrics("r", 1, "a", {"req": 1}, {}, 1.0, 5.0)
    with pytest.raises(RedisDown):
        await store.read_worker_metrics("r", 1.0)
    assert await store.mirror.read_worker_metrics("r", 1.0) == ({}, {})


@pytest_twisted.ensureDeferred
async def test_redis_worker_metrics_keys_are_prefixed_and_expire(redis_server):  # noqa: F811
    """Every key of a run is under ``P:wm:RUN:`` and lives RUN_TTL after the last report, the
    retired totals and the other workers' reports included."""
    from clproxy.state.redis.workermetrics import RUN_TTL
    store = RedisStateStore(redis_server.url, reactor, prefix=unique_prefix())
    await store.connect()
    try:
        await store.publish_worker_metrics("r", 1, "a", {"req": 1}, {"busy": 1}, 1.0, 5.0)
        await store.publish_worker_metrics("r", 2, "b", {"req": 1}, {}, 1.0, 5.0)
        await store.publish_worker_metrics("r", 1, "c", {"req": 1}, {}, 1.0, 5.0)
        raw = store._link._handler
        keys = sorted(await raw.keys(store._key("*", "*")))
        assert keys == sorted(store._run_prefix("r") + name for name in (
            "workers", "retired", "inc:1", "inc:2", "totals:1", "totals:2", "gauges:1", "gauges:2"))
        for key in keys:
            assert RUN_TTL * 1000 - 5_000 < await raw.execute_command("PTTL", key) <= RUN_TTL * 1000
    finally:
        await store.close()
