"""The Redis state store: the IStateStore contract against a real redis-server (and against its
local mirror alone), what it keeps in Redis, choosing a store from config, and URL redaction."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from zope.interface.verify import verifyClass, verifyObject

from clproxy.config import StateConfig
from clproxy.interfaces import (IAtomicCooldown, ILockProvider, IQuotaStore, ISharedTokens,
                                IStateStore)
from clproxy.state.memory import MemoryStateStore
from clproxy.state import connect_store, open_store
from clproxy.state.redis import LocalMirror, RedisStateStore, RedisUnavailable
from clproxy.state.redis.url import parse_redis_url, redact_url
from redis_server import free_port, redis_server, unique_prefix  # noqa: F401  (fixture)
from store_contract import StateStoreContract


def connected_store(url, clock=reactor, **kwargs):
    """A RedisStateStore on ``url`` with a fresh prefix, connected (blocks; call from fixtures)."""
    store = RedisStateStore(url, clock, prefix=unique_prefix(), **kwargs)
    pytest_twisted.blockon(store.connect())
    return store


class TestRedisStateStore(StateStoreContract):
    """The Redis store meets the IStateStore contract, every call answered by Redis."""

    @pytest.fixture(autouse=True)
    def _connected(self, redis_server):  # noqa: F811
        self._prepared = [connected_store(redis_server.url, clock=task.Clock())]
        self._handed_out = []
        yield
        for store in self._prepared + self._handed_out:
            pytest_twisted.blockon(store.close())
        # A call served from the local mirror would make these contract tests meaningless.
        assert [store._link.failed_calls for store in self._handed_out] == [0] * len(
            self._handed_out)

    def make_store(self):
        """The connected store prepared for this test, on a key prefix of its own."""
        assert self._prepared, "make_store called twice in one test"
        store = self._prepared.pop()
        self._handed_out.append(store)
        return store


class TestRedisStoreWithoutRedis(StateStoreContract):
    """With Redis unreachable from the start, the store still meets the contract from its mirror."""

    def make_store(self):
        """A store whose Redis URL points at a closed port and that never connected."""
        return RedisStateStore("redis://127.0.0.1:{}/0".format(free_port()), task.Clock(),
                               prefix=unique_prefix())


class TestLocalMirror(StateStoreContract):
    """The local mirror alone meets the contract (it is a MemoryStateStore underneath)."""

    def make_store(self):
        """A fresh mirror."""
        return LocalMirror()


def test_redis_store_provides_every_interface():
    """RedisStateStore provides IStateStore and the shared-state interfaces."""
    store = RedisStateStore("redis://127.0.0.1:1/0", task.Clock())
    for interface in (IStateStore, IAtomicCooldown, ISharedTokens, IQuotaStore, ILockProvider):
        assert verifyObject(interface, store)
        assert verifyClass(interface, LocalMirror)


@pytest_twisted.ensureDeferred
async def test_cooldown_and_level_keys_expire(redis_server):  # noqa: F811
    """A cooldown key expires a grace after the cooldown's end; the level has its own 24 h TTL."""
    clock = task.Clock()
    clock.advance(1000.0)
    store = RedisStateStore(redis_server.url, clock, prefix=unique_prefix())
    await store.connect()
    try:
        await store.set_cooldown("a", 1060.0, 2)
        raw = store._link._handler
        cd_ttl = await raw.execute_command("PTTL", store._key("cd", "a"))
        lvl_ttl = await raw.execute_command("PTTL", store._key("lvl", "a"))
        assert 60_000 + 3_600_000 - 2_000 < cd_ttl <= 60_000 + 3_600_000
        assert 86_400_000 - 2_000 < lvl_ttl <= 86_400_000
        await store.record_attempt("a", 1000.0)
        stats_ttl = await raw.execute_command("PTTL", store._key("stats", "a"))
        assert stats_ttl > 29 * 86_400_000
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_rate_window_in_redis_is_bounded_by_limit(redis_server):  # noqa: F811
    """The sorted set of a rate window never holds more than ``limit`` members and has a TTL."""
    store = RedisStateStore(redis_server.url, task.Clock(), prefix=unique_prefix())
    await store.connect()
    try:
        for i in range(50):
            await store.take_rate_slot("a", i * 0.01, 5)
        raw = store._link._handler
        assert await raw.zcard(store._key("rate", "a")) == 5
        assert 0 < await raw.execute_command("PTTL", store._key("rate", "a")) <= 61_000
        assert not await store.take_rate_slot("a", 1.0, 3)
        assert await raw.zcard(store._key("rate", "a")) == 3
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_reads_create_no_keys(redis_server):  # noqa: F811
    """Reading states, stats, rate usage, quotas and tokens of unknown keys writes nothing."""
    store = RedisStateStore(redis_server.url, task.Clock(), prefix=unique_prefix())
    await store.connect()
    try:
        keys = ["k{}".format(i) for i in range(20)]
        await store.get_account_states(keys)
        await store.account_stats(keys)
        await store.get_quotas(keys)
        for key in keys:
            await store.rate_usage(key, 0.0)
            await store.get_token_record(key)
        found = await store._link._handler.keys(store._key("*", "*"))
        assert found == []
        assert store.mirror.footprint()["accounts"] == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_times_round_trip_exactly(redis_server):  # noqa: F811
    """Wall-clock times with full float precision come back unchanged (no 6-digit rounding)."""
    store = RedisStateStore(redis_server.url, task.Clock(), prefix=unique_prefix())
    await store.connect()
    try:
        now = 1717171717.1234567
        await store.set_cooldown("a", now + 0.3333333, 1)
        await store.record_attempt("a", now)
        await store.take_rate_slot("a", now, 5)
        assert (await store.get_account_states(["a"]))["a"].cooling_until == now + 0.3333333
        assert (await store.account_stats(["a"]))["a"]["last_attempt_at"] == now
        assert await store.rate_usage("a", now + 1.0) == (1, now)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_last_error_that_looks_like_a_number_stays_text(redis_server):  # noqa: F811
    """An error text such as "503" is returned as the string it was, not converted to a number."""
    store = RedisStateStore(redis_server.url, task.Clock(), prefix=unique_prefix())
    await store.connect()
    try:
        await store.record_outcome("a", "error", 1.0, error="503")
        assert (await store.account_stats(["a"]))["a"]["last_error"] == "503"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_connect_store_memory():
    """Backend memory gives a MemoryStateStore without any I/O."""
    store = await connect_store(StateConfig(backend="memory"), task.Clock())
    assert isinstance(store, MemoryStateStore)


@pytest_twisted.ensureDeferred
async def test_connect_store_redis(redis_server):  # noqa: F811
    """Backend redis connects and PINGs, and the store it gives is in use."""
    config = StateConfig(backend="redis", url=redis_server.url, prefix=unique_prefix())
    store = await connect_store(config, reactor)
    try:
        assert isinstance(store, RedisStateStore) and store.available
        await store.incr("x")
        assert await store.counters() == {"x": 1}
        assert store._link.failed_calls == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_at_start_names_url_without_password():
    """An unreachable Redis fails connect_store with an error naming the redacted URL."""
    port = free_port()
    config = StateConfig(backend="redis", url="redis://:hunter2@127.0.0.1:{}/0".format(port))
    with pytest.raises(RedisUnavailable) as caught:
        await connect_store(config, reactor)
    message = str(caught.value)
    assert "redis://:***@127.0.0.1:{}/0".format(port) in message
    assert "hunter2" not in message and "hunter2" not in repr(caught.value)
    assert caught.value.__cause__ is None


@pytest_twisted.ensureDeferred
async def test_wrong_password_at_start_is_unavailable(redis_server, tmp_path):  # noqa: F811
    """A Redis that refuses the password fails the start with a redacted error, not a hang."""
    from redis_server import start_server
    server = start_server(tmp_path, password="right-one")
    try:
        url = "redis://:wrong-one@127.0.0.1:{}/0".format(server.port)
        with pytest.raises(RedisUnavailable) as caught:
            await connect_store(StateConfig(backend="redis", url=url), reactor)
        assert "wrong-one" not in str(caught.value) and "right-one" not in str(caught.value)
        assert "redis://:***@127.0.0.1" in str(caught.value)
    finally:
        server.stop()


def test_unknown_backend_is_refused():
    """A backend other than memory or redis is a ValueError naming it."""
    with pytest.raises(ValueError, match="memcached"):
        open_store(StateConfig(backend="memcached"), task.Clock())


@pytest.mark.parametrize("url, redacted", [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://user:pw@host/2", "redis://user:***@host/2"),
    ("rediss://user:p%40ss@host:6380", "rediss://user:***@host:6380"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://user@host", "redis://user@host"),
    ("redis://:pw@host/0?password=pw2", "redis://:***@host/0?***"),
    ("not a url :pw@", "not a url :pw@"),
])
def test_redact_url(url, redacted):
    """Passwords in Redis URLs are replaced by *** and nothing else changes."""
    assert redact_url(url) == redacted


def test_parse_redis_url():
    """Host, port, database, user, password and TLS come out of the URL."""
    target = parse_redis_url("rediss://me:p%40ss@cache.local:6380/3")
    assert (target.host, target.port, target.db, target.username, target.password, target.tls) \
        == ("cache.local", 6380, 3, "me", "p@ss", True)
    assert "p@ss" not in repr(target) and target.redacted == "rediss://me:***@cache.local:6380/3"
    default = parse_redis_url("redis://127.0.0.1")
    assert (default.port, default.db, default.password, default.tls) == (6379, 0, None, False)


@pytest.mark.parametrize("url", ["http://:pw@host/0", "redis://:pw@host/x", "redis:///0",
                                 "redis://:pw@host:99999/0", "redis://:pw@host/0?db=1"])
def test_bad_urls_are_refused_without_password(url):
    """A URL that is not redis://host[:port][/db] is a ValueError that never shows the password."""
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "pw" not in str(caught.value).replace("***", "")


@pytest_twisted.ensureDeferred
async def test_file_copy_is_written_before_redis(redis_server):  # noqa: F811
    """put_token_record waits for the file copy (even an asynchronous one) before writing Redis."""
    from twisted.internet import defer
    pending = defer.Deferred()
    copies = []

    def write_file(key, record):
        copies.append((key, record))
        return pending

    store = RedisStateStore(redis_server.url, reactor, prefix=unique_prefix(),
                            on_token_write=write_file)
    await store.connect()
    try:
        record = {"refresh_token": "rt-new", "updated_at": 5.0}
        putting = store.put_token_record("work", record)
        await store.incr("x")  # a full round trip while the file write is pending
        assert copies == [("work", record)] and not putting.called
        assert await store._link._handler.get(store._key("token", "work")) is None
        pending.callback(None)
        await putting
        assert await store.get_token_record("work") == record
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_failed_file_copy_is_logged_without_secret(redis_server):  # noqa: F811
    """A file copy that fails while Redis is up is logged by error type; the record is stored."""
    from twisted.logger import formatEvent, globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)

    def write_file(key, record):
        raise PermissionError("cannot write " + record["refresh_token"])

    store = RedisStateStore(redis_server.url, reactor, prefix=unique_prefix(),
                            on_token_write=write_file)
    await store.connect()
    try:
        await store.put_token_record("work", {"refresh_token": "rt-secret-9"})
        assert (await store.get_token_record("work"))["refresh_token"] == "rt-secret-9"
    finally:
        await store.close()
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "clproxy.state.redis"]
    assert any("PermissionError" in line and "work" in line for line in lines)
    assert not any("rt-secret-9" in (formatEvent(e) or "") for e in events)


def test_missing_redis_server_fails_loudly(monkeypatch, tmp_path):
    """Without redis-server the Redis tests fail (not skip) with an install hint."""
    from redis_server import start_server
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CLPROXY_REDIS_SERVER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install redis-server"):
        start_server(tmp_path)
