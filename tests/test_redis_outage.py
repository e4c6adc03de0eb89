"""Losing Redis while running: every call keeps working from the local mirror, the outage and the
recovery are logged once each without secrets, and what was written meanwhile reaches Redis."""

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from clproxy.state.model import AccountState
from clproxy.state.redis import RedisLink, RedisStateStore, TokenNotStored, reconnect_delay
from clproxy.state.redis.url import parse_redis_url
from redis_fakes import FakeRedisFactory, ScriptedEndpoint
from redis_server import private_redis, unique_prefix  # noqa: F401  (fixture)

ROTATED = {"access_token": "at-secret-2", "refresh_token": "rt-secret-2", "updated_at": 2.0}


@pytest.fixture
def log_lines():
    """Every log event emitted during the test, formatted as text (namespace, text)."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [(e.get("log_namespace", ""), formatEvent(e) or "") for e in events]
    globalLogPublisher.removeObserver(events.append)


def store_lines(lines, text):
    """The lines logged by the Redis store that contain ``text``."""
    return [line for namespace, line in lines() if namespace == "clproxy.state.redis"
            and text in line]


async def wait_until(predicate, timeout=10.0):
    """Poll ``predicate`` on the reactor until true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_killed_redis_is_survived_and_recovered(private_redis, log_lines):  # noqa: F811
    """Redis killed mid-run: calls keep working from the mirror (one log line); restarted on the
    same port, the store reconnects, writes what changed meanwhile, and writes to Redis again."""
    prefix = unique_prefix()
    files = []
    store = RedisStateStore(private_redis.url, reactor, prefix=prefix,
                            on_token_write=lambda key, record: files.append((key, record)),
                            reconnect=lambda attempt: 0.05, reply_timeout=1.0)
    await store.connect()
    now = reactor.seconds()
    await store.set_cooldown("work", now + 100.0, 2)
    await store.record_attempt("work", now)
    await store.put_token_record("work", {"refresh_token": "rt-secret-1", "updated_at": 1.0})
    assert await store.take_rate_slot("work", now, 3)
    await store.account_stats(["work"])
    await store.counters()

    private_redis.stop(kill=True)

    # In flight while the connection dies, then with no connection at all: nothing raises.
    burst = await defer.gatherResults([store.record_attempt("work", now + 1.0) for _ in range(5)])
    assert burst == [None] * 5
    assert not store.available
    assert (await store.get_account_states(["work"]))["work"] == AccountState(now + 100.0, 2)
    assert (await store.account_stats(["work"]))["work"]["attempts"] == 6
    assert await store.extend_cooldown("other", now + 50.0, 1) == AccountState(now + 50.0, 1)
    await store.put_token_record("work", ROTATED)
    assert await store.get_token_record("work") == ROTATED
    assert files[-1] == ("work", ROTATED)
    assert await store.take_rate_slot("work", now + 1.0, 3)
    await store.incr("upstream_attempts")
    # one attempt's bookkeeping goes to the mirror; a success drops a cooldown waiting for replay
    await store.extend_cooldown("third", now + 60.0, 1)
    await store.record_result("third", "success", now + 1.0, counter="upstream_attempts")
    assert (await store.get_account_states(["third"]))["third"] == AccountState()
    assert (await store.account_stats(["third"]))["third"]["successes"] == 1
    assert (await store.counters())["upstream_attempts"] == 2
    # a late success (sent before the cooldown was decided) keeps it, and its replay
    await store.extend_cooldown("fourth", now + 70.0, 3, at=now + 1.0)
    await store.record_result("fourth", "success", now + 2.0, sent_at=now + 0.5)
    assert (await store.get_account_states(["fourth"]))["fourth"] == AccountState(now + 70.0, 3)
    await store.put_quota("work", {"status": "allowed"})
    lock = await store.acquire("refresh:work", 5_000, 0, reactor)
    assert lock is not None and lock.local
    assert await store.release(lock)
    assert len(store_lines(log_lines, "redis unavailable at")) == 1
    assert store.pending_count() == 4  # the token, the cooldowns of "other" and "fourth", the quota

    private_redis.start()
    await wait_until(lambda: store.available and store.pending_count() == 0)
    assert len(store_lines(log_lines, "redis available again at")) == 1

    other = RedisStateStore(private_redis.url, reactor, prefix=prefix)
    await other.connect()
    try:
        # Written during the outage, replayed on recovery (the restarted Redis was empty).
        assert await other.get_token_record("work") == ROTATED
        assert (await other.get_account_states(["other"]))["other"] == AccountState(now + 50.0, 1)
        # "fourth" came back with its decision time: a late success still leaves it in place
        await other.record_result("fourth", "success", now + 3.0, sent_at=now + 0.5)
        assert (await other.get_account_states(["fourth"]))["fourth"] == AccountState(now + 70.0, 3)
        assert await other.get_quotas(["work"]) == {"work": {"status": "allowed"}}
        # New writes go to Redis again.
        failed_before = store._link.failed_calls
        await store.set_cooldown("work", now + 500.0, 4)
        assert (await other.get_account_states(["work"]))["work"] == AccountState(now + 500.0, 4)
        lock = await store.acquire("refresh:work", 5_000, 0, reactor)
        assert not lock.local
        assert await other.acquire("refresh:work", 5_000, 0, reactor) is None
        assert store._link.failed_calls == failed_before
    finally:
        await other.close()
        await store.close()

    text = "\n".join(line for _, line in log_lines())
    assert private_redis.password not in text
    assert "secret-1" not in text and "secret-2" not in text
    assert "redis://:***@127.0.0.1:{}/0".format(private_redis.port) in text


@pytest_twisted.ensureDeferred
async def test_stalled_redis_costs_one_reply_timeout(private_redis, log_lines):  # noqa: F811
    """A Redis that stops answering (SIGSTOP) delays one call by the reply timeout; the calls after
    it are served from the mirror at once, and the store recovers once Redis answers again."""
    store = RedisStateStore(private_redis.url, reactor, prefix=unique_prefix(),
                            reconnect=lambda attempt: 0.1, reply_timeout=0.3)
    await store.connect()
    await store.set_cooldown("work", 1000.0, 1)
    pid = private_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = reactor.seconds()
        state = (await store.get_account_states(["work"]))["work"]
        assert state == AccountState(1000.0, 1)
        assert 0.25 <= reactor.seconds() - started < 1.0
        started = reactor.seconds()
        for _ in range(20):
            await store.record_attempt("work", 1.0)
        assert reactor.seconds() - started < 0.25
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_until(lambda: store.available)
    await store.set_cooldown("work", 2000.0, 2)
    assert (await store.get_account_states(["work"]))["work"] == AccountState(2000.0, 2)
    await store.close()
    assert len(store_lines(log_lines, "redis unavailable at")) == 1
    assert len(store_lines(log_lines, "redis available again at")) == 1


@pytest_twisted.ensureDeferred
async def test_token_neither_in_redis_nor_file_raises(private_redis, log_lines):  # noqa: F811
    """With Redis down and the file copy failing, put_token_record raises TokenNotStored naming the
    key only, keeps the record in memory and writes it to Redis on recovery."""
    def broken_file(key, record):
        raise OSError("disk full: " + record["refresh_token"])

    store = RedisStateStore(private_redis.url, reactor, prefix=unique_prefix(),
                            on_token_write=broken_file, reconnect=lambda attempt: 0.05)
    await store.connect()
    private_redis.stop(kill=True)
    await store.counters()  # notices the loss
    with pytest.raises(TokenNotStored) as caught:
        await store.put_token_record("work", ROTATED)
    assert "work" in str(caught.value) and "secret" not in str(caught.value)
    assert await store.get_token_record("work") == ROTATED
    private_redis.start()
    await wait_until(lambda: store.available and store.pending_count() == 0)
    check = RedisStateStore(private_redis.url, reactor, prefix=store._prefix)
    await check.connect()
    assert await check.get_token_record("work") == ROTATED
    await check.close()
    await store.close()
    assert all("secret" not in line for _, line in log_lines())


@pytest_twisted.ensureDeferred
async def test_error_reply_is_served_from_mirror_and_logged_once(private_redis,  # noqa: F811
                                                                 log_lines):
    """A Redis error reply (a key of the wrong type) serves that call from the mirror, logged once
    per kind of error, without dropping the connection."""
    store = RedisStateStore(private_redis.url, reactor, prefix=unique_prefix())
    await store.connect()
    await store._link._handler.set(store._key("counters", "all"), "not a hash")
    for _ in range(3):
        await store.incr("upstream_attempts")
    assert await store.counters() == {"upstream_attempts": 3}
    assert store.available
    assert len(store_lines(log_lines, "WRONGTYPE")) == 1
    await store.close()


def test_reconnect_backs_off_on_the_clock(log_lines):
    """After a lost connection the link retries at 0.5, 1, 2 ... s on its clock, serving nothing
    from Redis meanwhile, and runs the recovery hook once when a connection is back."""
    clock = task.Clock()
    recovered = []
    endpoint = ScriptedEndpoint(clock, ["ok", "refused", "refused", "ok"])
    link = RedisLink(parse_redis_url("redis://:pw@127.0.0.1:1/0"), clock, endpoint,
                     FakeRedisFactory(), on_recovered=lambda: recovered.append(clock.seconds()))
    opened = link.connect()
    assert opened.called and link.up
    failed = link.run(lambda handler: handler.get("k"))
    failed.addErrback(lambda f: f.value)
    assert not link.up and link.in_outage
    assert link.run(lambda handler: handler.get("k")).addErrback(lambda f: None).called
    clock.advance(0)  # the dropped connection is reported lost
    clock.pump([0.5, 1.0, 2.0])
    assert endpoint.attempts == [0.0, 0.5, 1.5, 3.5]
    assert link.up and not link.in_outage and recovered == [3.5]
    assert len(store_lines(log_lines, "redis unavailable at redis://:***@127.0.0.1:1/0")) == 1
    assert len(store_lines(log_lines, "redis available again at")) == 1
    assert "pw" not in "".join(line for _, line in log_lines()).replace("***", "")
    link.stopService()
    clock.advance(0)


def test_reconnect_delay_is_capped():
    """Reconnection waits 0.5 s doubling up to 30 s (ClientService counts failures from 1)."""
    assert [reconnect_delay(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0,
                                                         30.0]
    assert reconnect_delay(10_000) == 30.0


def test_close_stops_reconnecting():
    """A closed link schedules no further reconnection."""
    clock = task.Clock()
    endpoint = ScriptedEndpoint(clock, ["ok", "ok"])
    link = RedisLink(parse_redis_url("redis://127.0.0.1:1/0"), clock, endpoint, FakeRedisFactory())
    link.connect()
    link.run(lambda handler: handler.get("k")).addErrback(lambda f: None)
    link.stopService()
    clock.advance(100)
    assert len(endpoint.attempts) == 1 and not clock.getDelayedCalls()
