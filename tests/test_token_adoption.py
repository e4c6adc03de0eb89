"""Adopting another instance's token rotation (Redis backend) writes the file copy once, no error.

Instance B, refreshing after a 401, reads the record instance A rotated into Redis while B's refresh
path holds B's token-file lock; the file copy must then be written under that lock, not by taking
it a second time (issue 11, item 5).
"""

import shutil
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore, TokenStoreError
from clproxy.testing.oauth import listen_fake_oauth
from helpers import post, request_body, until
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

KEY = "anthropic:work"


@pytest.fixture
def oauth():
    """A fake OAuth token endpoint with single-use rotating refresh tokens."""
    server, port, _ = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


def count_writes(store: TokenStore):
    """Count the writes of ``store``'s token file (the list grows by one per write)."""
    writes = []
    original = store._write_file

    def write(path, data):
        if path == store.path:
            writes.append(path)
        original(path, data)

    store._write_file = write
    return writes


@pytest.fixture
def warnings():
    """Log lines at warn level or above emitted while the test runs."""
    lines = []

    def observer(event):
        if event.get("log_level") is not None and event["log_level"] >= LogLevel.warn:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_b_adopts_a_rotation_once_without_error(fake, oauth, start_proxy, redis_server,  # noqa: F811
                                                      tmp_path, warnings):
    """A refreshes after a 401; B then gets a 401 on the old token, adopts A's rotation from Redis
    without a refresh of its own, writes its token file exactly once and logs no error."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    pair = oauth.seed_tokens()
    now = time.time()
    TokenStore(str(home_a)).put(StoredCredential.new_oauth(
        "work", TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token), now,
        expires_at=now + 8 * 3600))
    shutil.copytree(home_a, home_b)  # the same login on a second machine
    config = {"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}},
              "state": {"backend": "redis", "url": redis_server.url, "prefix": unique_prefix()}}
    one = start_proxy(config, environ={"CLPROXY_HOME": str(home_a)})
    two = start_proxy(config, environ={"CLPROXY_HOME": str(home_b)})
    await until(lambda: one.service.store.available and two.service.store.available)
    fake.authorize = oauth.is_live_access_token
    oauth.revoke(pair.access_token)
    assert (await post(one.url + "/v1/messages", request_body()))[0] == 200
    assert oauth.refresh_calls == 1
    rotated = TokenStore(str(home_a)).get(KEY)
    writes = count_writes(two.service.tokens)
    del warnings[:]
    assert (await post(two.url + "/v1/messages", request_body()))[0] == 200
    assert oauth.refresh_calls == 1  # B adopted A's tokens, it did not refresh again
    assert len(writes) == 1
    on_b = TokenStore(str(home_b)).get(KEY)
    assert (on_b.access_token, on_b.refresh_token) == (rotated.access_token, rotated.refresh_token)
    assert warnings == []


@pytest_twisted.ensureDeferred
async def test_held_and_write_while_held(tmp_path):
    """held() is true only while this process holds the lock; write_while_held refuses otherwise."""
    store = TokenStore(str(tmp_path))
    record = StoredCredential.new_oauth("work", TokenSet(access_token="a1", refresh_token="r1"),
                                        time.time(), expires_at=time.time() + 3600)
    assert not store.held()
    with pytest.raises(TokenStoreError):
        store.write_while_held(record)
    tx = await store.acquire(reactor, 1.0)
    try:
        assert store.held()
        assert store.write_while_held(record).access_token == "a1"
    finally:
        tx.release()
    assert not store.held() and store.get(KEY).refresh_token == "r1"
