"""Two RedisStateStores on one Redis (two connections, as two proxy instances have) act as one
store: cooldowns, rate windows, stats, tokens and the refresh lock are shared."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater

from clproxy.accounts.model import Account
from clproxy.routing.policy import COOL, SUCCESS, Verdict
from clproxy.routing.pool import AccountPool
from clproxy.state.model import AccountState
from clproxy.state.redis import RedisStateStore
from clproxy.state.redis.mirror import fired
from clproxy.state.redis.store import COUNTER_FLUSH_DELAY
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)


@pytest.fixture
def two_stores(redis_server):  # noqa: F811
    """Two connected stores (A and B) on one Redis and one prefix; file copies recorded."""
    prefix = unique_prefix()
    files = {"A": [], "B": []}
    stores = []
    for name in ("A", "B"):
        store = RedisStateStore(redis_server.url, reactor, prefix=prefix,
                                on_token_write=lambda key, record, name=name:
                                files[name].append((key, record)))
        pytest_twisted.blockon(store.connect())
        stores.append(store)
    stores[0].files, stores[1].files = files["A"], files["B"]
    yield stores
    for store in stores:
        pytest_twisted.blockon(store.close())
    assert [s._link.failed_calls for s in stores] == [0, 0]


@pytest_twisted.ensureDeferred
async def test_cooldown_set_through_a_is_seen_by_b(two_stores):
    """A cooldown and level written through A are what B reads next, and B's success clears them."""
    a, b = two_stores
    await a.set_cooldown("work", 1234.5, 3)
    assert (await b.get_account_states(["work"]))["work"] == AccountState(1234.5, 3)
    await b.record_outcome("work", "success", 10.0)
    assert (await a.get_account_states(["work"]))["work"] == AccountState()


@pytest_twisted.ensureDeferred
async def test_rate_slots_are_shared(two_stores):
    """Two instances taking slots concurrently under limit 5 get exactly 5 between them."""
    a, b = two_stores
    now = reactor.seconds()
    takes = [store.take_rate_slot("work", now, 5) for _ in range(10) for store in (a, b)]
    results = await defer.gatherResults(takes)
    assert sum(results) == 5
    assert await a.rate_usage("work", now) == (5, now)
    assert not await b.take_rate_slot("work", now + 30.0, 5)
    assert await b.take_rate_slot("work", now + 60.0, 5)


@pytest_twisted.ensureDeferred
async def test_stats_and_counters_are_shared(two_stores):
    """Attempts and outcomes counted through both instances add up, as do proxy-wide counters."""
    a, b = two_stores
    await defer.gatherResults([s.record_attempt("work", 1.0) for s in (a, b) * 50])
    await defer.gatherResults([s.incr("upstream_attempts") for s in (a, b) * 50])
    await a.flush_counters()  # (else sent within COUNTER_FLUSH_DELAY; b's own unsent counts it adds itself)
    await a.record_outcome("work", "error", 2.0, error="503 transient")
    await b.record_outcome("work", "rate-limited", 3.0, error="429 rate-limited")
    stats = (await a.account_stats(["work"]))["work"]
    assert (stats["attempts"], stats["errors"], stats["rate_limits"]) == (100, 1, 1)
    assert (stats["last_error"], stats["last_error_at"]) == ("429 rate-limited", 3.0)
    assert await b.counters() == {"upstream_attempts": 100}


@pytest_twisted.ensureDeferred
async def test_concurrent_extends_keep_the_longest(two_stores):
    """Cooling one account from both instances at once keeps the longest cooldown and level."""
    a, b = two_stores
    untils = [100.0 + i for i in range(40)]
    await defer.gatherResults([(a, b)[i % 2].extend_cooldown("work", until, i % 7)
                               for i, until in enumerate(untils)])
    assert (await b.get_account_states(["work"]))["work"] == AccountState(139.0, 6)


@pytest_twisted.ensureDeferred
async def test_forget_through_a_clears_b(two_stores):
    """forget through one instance drops the account's state for every instance."""
    a, b = two_stores
    await b.set_cooldown("work", 500.0, 2)
    await b.record_attempt("work", 1.0)
    await b.put_quota("work", {"status": "allowed"})
    await a.forget("work")
    assert (await b.get_account_states(["work"]))["work"] == AccountState()
    assert (await b.account_stats(["work"]))["work"]["attempts"] == 0
    assert await b.get_quotas(["work"]) == {"work": None}


@pytest_twisted.ensureDeferred
async def test_rotated_token_reaches_the_other_instance_and_its_file(two_stores):
    """A token rotated through A is read by B, and each instance's file copy gets it once."""
    a, b = two_stores
    rotated = {"access_token": "at-2", "refresh_token": "rt-2", "updated_at": 20.0}
    await a.put_token_record("work", rotated)
    assert a.files == [("work", rotated)]
    assert await b.get_token_record("work") == rotated
    assert await b.get_token_record("work") == rotated
    assert b.files == [("work", rotated)]


@pytest_twisted.ensureDeferred
async def test_pool_on_two_instances_shares_a_429_cooldown(two_stores):
    """A 429 recorded by the pool of instance A takes the account out of B's candidates."""
    a, b = two_stores
    accounts = [Account(key="one", name="one"), Account(key="two", name="two")]
    pool_a, pool_b = AccountPool(a, clock=reactor), AccountPool(b, clock=reactor)
    assert [x.key for x in await pool_b.candidates(accounts)] == ["one", "two"]
    await pool_a.record(accounts[0], Verdict(COOL, 429, "rate-limited", 30.0, 1))
    assert [x.key for x in await pool_b.candidates(accounts)] == ["two"]
    assert await pool_b.backoff_level(accounts[0]) == 1
    await pool_b.record(accounts[0], Verdict(SUCCESS, 200, "ok", None, 0))
    assert [x.key for x in await pool_a.candidates(accounts)] == ["one", "two"]


@pytest_twisted.ensureDeferred
async def test_a_late_success_on_one_instance_keeps_the_other_ones_429_cooldown(two_stores):
    """B's request was sent before A's 429 and succeeds after it: the account stays cooling, its
    level kept (decided atomically in Redis); B's next request, sent after the 429, ends it."""
    a, b = two_stores
    clock = task.Clock()
    clock.advance(1_000_000)
    accounts = [Account(key="one", name="one"), Account(key="two", name="two")]
    pool_a, pool_b = AccountPool(a, clock=clock), AccountPool(b, clock=clock)
    sent = clock.seconds()
    clock.advance(1)
    await pool_a.record(accounts[0], Verdict(COOL, 429, "rate-limited", 5 * 3600.0, 2))
    clock.advance(10)
    await pool_b.record(accounts[0], Verdict(SUCCESS, 200, "ok", None, 0), sent_at=sent)
    assert [x.key for x in await pool_a.candidates(accounts)] == ["two"]
    assert await pool_a.backoff_level(accounts[0]) == 2
    await pool_b.record(accounts[0], Verdict(SUCCESS, 200, "ok", None, 0), sent_at=clock.seconds())
    assert [x.key for x in await pool_a.candidates(accounts)] == ["one", "two"]
    assert await pool_a.backoff_level(accounts[0]) == 0


@pytest_twisted.ensureDeferred
async def test_fifty_acquirers_across_two_stores_hold_one_at_a_time(two_stores):
    """50 concurrent acquirers of one lock through two stores: one holder at a time, all served."""
    a, b = two_stores
    holding, most, served = [0], [0], []

    async def worker(index):
        store = (a, b)[index % 2]
        token = await store.acquire("refresh:work", 10_000, 30.0, reactor)
        assert token is not None and not token.local
        holding[0] += 1
        most[0] = max(most[0], holding[0])
        await deferLater(reactor, 0.002, lambda: None)
        holding[0] -= 1
        served.append(index)
        assert await store.release(token)

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(i)) for i in range(50)])
    assert most[0] == 1
    assert sorted(served) == list(range(50))


@pytest_twisted.ensureDeferred
async def test_dead_holder_blocks_no_longer_than_ttl(two_stores):
    """A holder that never releases (it died) keeps the others out only until its TTL ends."""
    a, b = two_stores
    dead = await a.acquire("refresh:work", 300, 0, reactor)
    assert dead is not None
    started = reactor.seconds()
    got = []

    async def take_and_release(store):
        token = await store.acquire("refresh:work", 10_000, 5.0, reactor)
        assert token is not None
        got.append(reactor.seconds() - started)
        await deferLater(reactor, 0.01, lambda: None)
        assert await store.release(token)

    await defer.gatherResults([defer.Deferred.fromCoroutine(take_and_release(s))
                               for s in (a, b, b)])
    assert len(got) == 3
    assert 0.25 <= min(got) < 1.0
    assert max(got) < 2.0
    assert not await a.release(dead)


@pytest_twisted.ensureDeferred
async def test_quota_seen_by_a_is_what_b_reports(two_stores, tmp_path):
    """A quota header seen by instance A is in instance B's quota book (what B's /status shows),
    because the snapshot goes through the shared store, not only A's own file."""
    from twisted.web.http_headers import Headers

    from clproxy.routing.quota import QuotaBook
    a, b = two_stores
    book_a = QuotaBook(str(tmp_path / "a.json"), reactor, store=a)
    book_b = QuotaBook(str(tmp_path / "b.json"), reactor, store=b)
    book_a.note("work", Headers({"anthropic-ratelimit-unified-status": ["allowed"],
                                 "anthropic-ratelimit-unified-5h-utilization": ["0.62"]}))
    await deferLater(reactor, 0.05, lambda: None)  # the put reaches Redis
    latest = await book_b.latest(["work", "other"])
    assert latest["work"]["five_hour"]["utilization"] == 0.62
    assert latest["other"] is None
    book_a.flush()
    book_b.flush()


# proxy-wide counters: added up, then sent in one HINCRBY per counter --------------------------------

@pytest_twisted.ensureDeferred
async def test_counter_increments_are_sent_together(two_stores):
    """Fifty increments within COUNTER_FLUSH_DELAY are one HINCRBY (one round trip, where each
    completed request used to make its own); the instance's own counters() includes them before
    they are sent, the other instance sees them once they are."""
    a, b = two_stores
    calls = a._link.calls
    await defer.gatherResults([a.incr("completed_requests") for _ in range(50)] + [a.incr("session_moves", 2)])
    assert a._link.calls == calls  # nothing sent yet
    assert await a.counters() == {"completed_requests": 50, "session_moves": 2}
    assert await b.counters() == {}
    calls = a._link.calls
    await a.flush_counters()
    assert a._link.calls == calls + 2  # one HINCRBY per counter
    assert await b.counters() == {"completed_requests": 50, "session_moves": 2}
    assert await a.counters() == {"completed_requests": 50, "session_moves": 2}  # not counted twice
    await a.flush_counters()  # nothing left: nothing sent
    assert a._link.calls == calls + 3  # (the counters() read above)


@pytest_twisted.ensureDeferred
async def test_closing_a_store_sends_its_last_counts(two_stores, redis_server):  # noqa: F811
    """An instance that stops (a worker told to stop, a daemon shut down) sends what it counted."""
    a, b = two_stores
    await a.incr("completed_requests", 3)
    await a.close()
    assert await b.counters() == {"completed_requests": 3}
    # (the fixture closes it again: a no-op)


@pytest_twisted.ensureDeferred
async def test_an_instances_own_counters_stay_exact_across_a_flush_made_during_the_read(redis_server):  # noqa: F811
    """A counters() read whose HGETALL is on its way when the counts are flushed: the flush's
    HINCRBYs go behind it (not in its reply) and the unsent counts are gone from the instance;
    the read still adds them, and the mirror never adopts a count that went backwards."""
    clock = task.Clock()
    store = RedisStateStore(redis_server.url, clock, prefix=unique_prefix())
    await store.connect()
    try:
        await store.incr("completed_requests", 5)
        assert await store.counters() == {"completed_requests": 5}
        reading = store.counters()  # HGETALL written
        clock.advance(COUNTER_FLUSH_DELAY)  # the flush's HINCRBY written behind it
        assert await reading == {"completed_requests": 5}
        assert fired(store.mirror.counters()) == {"completed_requests": 5}
        await store.incr("completed_requests", 2)
        assert await store.counters() == {"completed_requests": 7}  # a flush before: not twice
    finally:
        await store.close()


def test_counts_are_sent_after_the_delay_on_the_stores_clock():
    """The first increment schedules one flush, COUNTER_FLUSH_DELAY later on the store's clock;
    with Redis unreachable the counts stay in the instance's mirror."""
    clock = task.Clock()
    store = RedisStateStore("redis://127.0.0.1:9", clock, prefix=unique_prefix())  # never connected
    store.incr("completed_requests")
    store.incr("completed_requests")
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == COUNTER_FLUSH_DELAY
    clock.advance(COUNTER_FLUSH_DELAY)
    assert clock.getDelayedCalls() == [] and store._unsent_counts == {}
    assert store._link.failed_calls == 1  # one HINCRBY tried, Redis down: dropped
    assert fired(store.mirror.counters()) == {"completed_requests": 2}
    store.incr("completed_requests")
    assert len(clock.getDelayedCalls()) == 1  # a new flush for the next counts
