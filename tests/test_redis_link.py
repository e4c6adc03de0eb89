"""The Redis link on Twisted's ``ClientService``: bounded backoff on the clock, a clean stop in
either state, and a real redis-server restarted on the same port reconnected to."""

import pytest_twisted
from twisted.application.service import IService
from twisted.internet import reactor, task
from twisted.internet.task import deferLater

from clproxy.state.redis import (RECONNECT_CAP, RedisLink, RedisStateStore, RedisUnavailable,
                                 reconnect_delay)
from clproxy.state.redis.url import parse_redis_url
from redis_fakes import FakeRedisFactory, ScriptedEndpoint
from redis_server import private_redis, redis_server, unique_prefix  # noqa: F401  (fixtures)

TARGET = parse_redis_url("redis://127.0.0.1:1/0")


def gaps(times):
    return [later - earlier for earlier, later in zip(times, times[1:])]


def run_retries(clock, count):
    """Advance ``clock`` to each of the next ``count`` delayed calls in turn (so every attempt
    happens exactly when it was scheduled)."""
    for _ in range(count):
        due = min(call.getTime() for call in clock.getDelayedCalls())
        clock.advance(due - clock.seconds())


def test_reconnect_delays_follow_the_policy_and_stay_bounded():
    """Refused again and again, the link waits reconnect_delay(1), (2) ... between attempts, never
    longer than the cap; a connection that works resets the backoff."""
    clock = task.Clock()
    endpoint = ScriptedEndpoint(clock, ["refused"] * 12 + ["ok"])
    link = RedisLink(TARGET, clock, endpoint, FakeRedisFactory())
    link.startService()
    run_retries(clock, 12)
    assert gaps(endpoint.attempts) == [reconnect_delay(n) for n in range(1, 13)]
    assert max(gaps(endpoint.attempts)) == RECONNECT_CAP and link.up
    # Lost again: the first wait is the shortest again.
    link.run(lambda handler: handler.get("k")).addErrback(lambda f: None)
    clock.advance(0)
    lost_at = clock.seconds()
    clock.advance(reconnect_delay(1))
    assert endpoint.attempts[-1] == lost_at + reconnect_delay(1)
    link.stopService()
    clock.advance(0)


def test_refused_connections_back_off_too():
    """A server that accepts TCP but then fails PING does not reset the backoff (ClientService
    alone would retry it after the first delay forever)."""
    clock = task.Clock()
    factory = FakeRedisFactory()
    factory.ping_reply = "LOADING"
    endpoint = ScriptedEndpoint(clock, ["ok"] * 6)
    link = RedisLink(TARGET, clock, endpoint, factory)
    opened = link.connect()
    failure = []
    opened.addErrback(failure.append)
    assert failure and failure[0].check(RedisUnavailable)
    run_retries(clock, 10)  # each refused connection is closed, then waited for
    assert len(endpoint.transports) == 6
    assert gaps(endpoint.attempts) == [reconnect_delay(n) for n in range(1, len(endpoint.attempts))]
    assert not link.up and all(t.closed for t in endpoint.transports)
    link.stopService()
    clock.advance(0)


def test_stop_while_disconnected_stops_retrying():
    """stopService during the wait between attempts cancels the retry: nothing is left on the
    clock and no attempt follows; a pending connect() fails with RedisUnavailable."""
    clock = task.Clock()
    endpoint = ScriptedEndpoint(clock, [])
    link = RedisLink(TARGET, clock, endpoint, FakeRedisFactory())
    opened = link.connect()
    errors = []
    opened.addErrback(errors.append)
    assert errors and "redis unavailable at redis://127.0.0.1:1/0" in str(errors[0].value)
    clock.advance(reconnect_delay(1))
    assert len(endpoint.attempts) == 2 and clock.getDelayedCalls()
    stopped = link.stopService()
    assert stopped.called and not clock.getDelayedCalls()
    clock.advance(1000)
    assert len(endpoint.attempts) == 2 and not link.running


def test_stop_while_connected_closes_the_connection():
    """stopService on a live link closes the connection and fires once it is closed; nothing is
    retried afterwards."""
    clock = task.Clock()
    endpoint = ScriptedEndpoint(clock, ["ok", "ok"])
    link = RedisLink(TARGET, clock, endpoint, FakeRedisFactory())
    assert link.connect().called and link.up
    stopped = link.stopService()
    assert not link.up and endpoint.transports[0].closed == "lose"
    assert not stopped.called  # waits for the connection to be closed
    clock.advance(0)
    assert stopped.called and not clock.getDelayedCalls()
    clock.advance(1000)
    assert len(endpoint.attempts) == 1


@pytest_twisted.ensureDeferred
async def test_store_is_a_service(redis_server):  # noqa: F811
    """The Redis store is a service: startService connects (and keeps reconnecting),
    stopService closes the connection; close() is stopService."""
    store = RedisStateStore(redis_server.url, reactor, prefix=unique_prefix())
    assert IService.providedBy(store) and not store.running
    store.startService()
    await _until(lambda: store.available)
    await store.counters()
    assert store._link.failed_calls == 0
    await store.stopService()
    assert not store.running and not store.available and not store._link.running
    await store.close()  # already stopped: nothing to do


@pytest_twisted.ensureDeferred
async def test_restarted_redis_on_the_same_port_is_reconnected(private_redis):  # noqa: F811
    """A real redis-server killed and started again on its port: the link notices the loss and
    connects again by itself, and commands work on the new connection."""
    link = RedisLink(parse_redis_url(private_redis.url), reactor,
                     _endpoint(private_redis), retry=lambda attempt: 0.05)
    await link.connect()
    try:
        assert await link.run(lambda r: r.set("k", "v")) == "OK"
        private_redis.stop(kill=True)
        await _until(lambda: not link.up)
        private_redis.start()
        await _until(lambda: link.up)
        assert await link.run(lambda r: r.get("k")) is None  # a new, empty server
        assert await link.run(lambda r: r.ping()) == "PONG"
    finally:
        await link.stopService()
    assert not link.up


def _endpoint(server):
    from clproxy.state.redis import redis_endpoint
    return redis_endpoint(parse_redis_url(server.url), 2.0)


async def _until(predicate, timeout=10.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02, lambda: None)
