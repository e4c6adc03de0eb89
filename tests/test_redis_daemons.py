"""Integration: two daemon instances sharing one Redis act as one proxy."""

import json
import shutil
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from clproxy.testing import anthropic as testing
from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.testing.oauth import listen_fake_oauth
from clproxy.daemon.tap import makeService
from conftest import accounts_config
from helpers import post, request_body, until
from redis_server import private_redis, redis_server, unique_prefix  # noqa: F401  (fixtures)


@pytest.fixture
def oauth():
    server, port, _ = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


def shared(config, url):
    config = dict(config)
    config["state"] = {"backend": "redis", "url": url, "prefix": unique_prefix()}
    return config


@pytest_twisted.ensureDeferred
async def test_429_on_one_instance_cools_the_account_for_the_other(fake, start_proxy, redis_server,  # noqa: F811
                                                                 tmp_path):
    """A 429 taken by instance A cools that account for instance B too."""
    config = shared(accounts_config(fake, "a", "b"), redis_server.url)
    one = start_proxy(config)
    two = start_proxy(config)
    await until(lambda: one.service.store.available and two.service.store.available)
    fake.script("key-a", status=429, headers={"retry-after": "60"},
                body=testing.error_json(429, "rate_limit_error", "limited"), times=1)
    assert (await post(one.url + "/v1/messages", request_body()))[0] == 200
    assert [r.credential for r in fake.requests] == ["key-a", "key-b"]
    assert (await post(two.url + "/v1/messages", request_body()))[0] == 200
    assert fake.requests[-1].credential == "key-b"  # B never tried the cooling account
    _, _, body = await post(two.url + "/status", None, method=b"GET")
    rows = {row["name"]: row for row in json.loads(body)["accounts"]}
    assert rows["a"]["state"] == "cooling" and rows["a"]["rate_limits"] == 1


@pytest_twisted.ensureDeferred
async def test_expired_token_refreshed_once_across_instances_on_two_machines(
        fake, oauth, start_proxy, redis_server, tmp_path):  # noqa: F811
    """50 requests over two instances with separate homes (two machines) cause exactly one refresh."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    pair = oauth.seed_tokens()
    store = TokenStore(str(home_a))
    now = time.time()
    store.put(StoredCredential.new_oauth("work", TokenSet(access_token=pair.access_token,
                                                          refresh_token=pair.refresh_token),
                                         now, expires_at=now - 60))
    shutil.copytree(home_a, home_b)  # the same login copied to the second machine
    fake.authorize = oauth.is_live_access_token
    config = shared({"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}}},
                    redis_server.url)
    oauth.pause()
    one = start_proxy(config, environ={"CLPROXY_HOME": str(home_a)})
    two = start_proxy(config, environ={"CLPROXY_HOME": str(home_b)})
    await until(lambda: one.service.store.available and two.service.store.available)
    calls = [defer.ensureDeferred(post((one if i % 2 else two).url + "/v1/messages", request_body()))
             for i in range(50)]
    await until(lambda: oauth.refresh_calls >= 1)
    oauth.resume()
    results = await defer.gatherResults(calls)
    assert [status for status, _, _ in results] == [200] * 50
    assert oauth.refresh_calls == 1 and oauth.invalid_grants == 0
    assert TokenStore(str(home_b)).get("anthropic:work").refresh_token == \
        TokenStore(str(home_a)).get("anthropic:work").refresh_token


@pytest_twisted.ensureDeferred
async def test_redis_lost_and_back_while_serving(fake, start_proxy, private_redis):  # noqa: F811
    """Killing Redis mid-run keeps the daemon serving from its last state; it reconnects when Redis returns."""
    proxy = start_proxy(shared(accounts_config(fake, "a"), private_redis.url))
    store = proxy.service.store
    await until(lambda: store.available)
    assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 200
    private_redis.stop(kill=True)
    for _ in range(5):
        assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 200
    assert not store.available
    private_redis.start()
    deadline = reactor.seconds() + 20
    while not store.available and reactor.seconds() < deadline:
        await post(proxy.url + "/v1/messages", request_body())
        await until(lambda: True)
    assert store.available


def test_redis_unavailable_at_start_names_the_url(tmp_path):
    """A Redis that does not answer at start stops the daemon with one line naming the URL, not its password."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"state": {"backend": "redis", "url": "redis://:s3cret@127.0.0.1:1/0"}}))
    options = {"port": 0, "host": "127.0.0.1", "config": str(path), "strategy": None, "env-file": None,
               "health-interval": 30.0, "debug": False, "quiet": True, "passthrough": False}
    with pytest.raises(SystemExit) as caught:
        makeService(options, reactor, environ={"CLPROXY_HOME": str(tmp_path)})
    message = str(caught.value)
    assert "redis://:***@127.0.0.1:1/0" in message and "s3cret" not in message


@pytest_twisted.ensureDeferred
async def test_a_redis_restarted_empty_keeps_the_client_keys_in_force(fake, start_proxy, private_redis,  # noqa: F811
                                                                      tmp_path):
    """Redis killed and restarted without its data: the daemon (loopback, behind a reverse proxy)
    never opens up, its valid key keeps working, and the tombstone of a key revoked before the
    restart is back in Redis (no other instance can put that key back)."""
    from clproxy.state.redis import RedisStateStore
    from clproxy.team.keys import hash_key
    from clproxy.team.keystore import KeyStore
    keys = KeyStore(str(tmp_path / "home"))
    key, _ = keys.create("alice")
    gone, _ = keys.create("bob")
    config = shared(accounts_config(fake, "a"), private_redis.url)
    proxy = start_proxy(config)
    store, ring = proxy.service.store, proxy.service.proxy.ring
    await until(lambda: store.available and len(ring) == 2)
    keys.revoke("bob")
    await until(lambda: len(ring) == 1)
    sizes = []
    ring_replace = ring.replace
    ring.replace = lambda records: (sizes.append(len(records)), ring_replace(records))
    private_redis.stop(kill=True)
    private_redis.start()
    await until(lambda: not store.available, timeout=20)  # the loss was noticed
    await until(lambda: store.available, timeout=20)
    probe = RedisStateStore(private_redis.url, reactor, prefix=config["state"]["prefix"])
    await probe.connect()
    try:
        deadline = reactor.seconds() + 10
        while hash_key(key) not in await probe.all_keys():  # published again within a tick or two
            assert reactor.seconds() < deadline, "the key file was not published again"
            await task.deferLater(reactor, 0.05, lambda: None)
        assert not await probe.put_key(hash_key(gone), {"name": "bob", "hash": hash_key(gone)})
    finally:
        await probe.close()
    assert 0 not in sizes and ring.verify(key) is not None and ring.verify(gone) is None
    assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 401
    assert (await post(proxy.url + "/v1/messages", request_body(), {b"x-api-key": [key.encode()]}))[0] == 200
