"""Adopting another instance's token rotation (Redis backend) writes the file copy once, no error.

Instance B, refreshing after a 401, reads the record instance A rotated into Redis while B's refresh
path holds B's token-file lock; the file copy must then be written under that lock, not by taking
it a second time (issue 11, item 5).
"""

import shutil
import time

import attr
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
    one, two, _, home_b, _, _, rotated = await two_instances(fake, oauth, start_proxy, redis_server, tmp_path)
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


async def two_instances(fake, oauth, start_proxy, redis_server, tmp_path, start_b=True):  # noqa: F811
    """One login copied to two homes (two machines), instance A started on Redis (and B unless
    ``start_b`` is false); A then rotates the tokens on a 401. Returns (one, two, home_a, home_b,
    config, pair, rotated)."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    pair = oauth.seed_tokens()
    now = time.time()
    TokenStore(str(home_a)).put(StoredCredential.new_oauth(
        "work", TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token), now,
        expires_at=now + 8 * 3600))
    shutil.copytree(home_a, home_b)
    config = {"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}},
              "state": {"backend": "redis", "url": redis_server.url, "prefix": unique_prefix()}}
    one = start_proxy(config, environ={"CLPROXY_HOME": str(home_a)})
    two = start_proxy(config, environ={"CLPROXY_HOME": str(home_b)}) if start_b else None
    await until(lambda: one.service.store.available and (two is None or two.service.store.available))
    fake.authorize = oauth.is_live_access_token
    oauth.revoke(pair.access_token)
    assert (await post(one.url + "/v1/messages", request_body()))[0] == 200
    rotated = TokenStore(str(home_a)).get(KEY)
    assert oauth.refresh_calls == 1 and rotated.refresh_token in oauth.live_refresh_tokens
    return one, two, home_a, home_b, config, pair, rotated


@pytest_twisted.ensureDeferred
async def test_a_stale_copy_edited_later_still_adopts_the_live_rotation(fake, oauth, start_proxy,
                                                                        redis_server, tmp_path):  # noqa: F811
    """B's file still holds the spent refresh token when an operator edits the account on B
    (`clproxy auth limits`): that edit is not newer tokens, so B's next refresh adopts A's rotation
    from Redis instead of spending the dead refresh token (invalid_grant: the user logged out)."""
    one, two, home_a, home_b, _, _, rotated = await two_instances(fake, oauth, start_proxy,
                                                                  redis_server, tmp_path)
    time.sleep(0.01)  # the edit's updated_at is later than the rotation's on the wall clock
    TokenStore(str(home_b)).set_limits(KEY, max_concurrent=4)
    assert (await post(two.url + "/v1/messages", request_body()))[0] == 200
    on_b = TokenStore(str(home_b)).get(KEY)
    assert oauth.invalid_grants == 0 and oauth.refresh_calls == 1 and not on_b.disabled
    assert on_b.refresh_token == rotated.refresh_token


@pytest_twisted.ensureDeferred
async def test_a_stale_copy_edited_later_does_not_replace_the_live_record_at_start(
        fake, oauth, start_proxy, redis_server, tmp_path):  # noqa: F811
    """B starts with a stale file edited after A's rotation: its start-up import keeps A's live
    record in Redis, and A's next refresh rotates with the live refresh token."""
    one, _, home_a, home_b, config, _, rotated = await two_instances(
        fake, oauth, start_proxy, redis_server, tmp_path, start_b=False)
    time.sleep(0.01)
    TokenStore(str(home_b)).set_limits(KEY, max_concurrent=4)
    two = start_proxy(config, environ={"CLPROXY_HOME": str(home_b)})
    await until(lambda: two.service.store.available)
    shared = await one.service.store.get_token_record(KEY)
    assert shared["refresh_token"] == rotated.refresh_token
    account = next(a for a in one.service.directory.current() if a.key == KEY)
    await one.service.refresher.fresh(account, force=True)
    assert oauth.invalid_grants == 0 and oauth.refresh_calls == 2
    assert TokenStore(str(home_a)).get(KEY).refresh_token in oauth.live_refresh_tokens


@pytest_twisted.ensureDeferred
async def test_invalid_grant_adopts_a_live_refresh_token_from_the_shared_state(oauth, tmp_path):
    """Ordering went wrong (machine clocks apart: B's stale copy claims newer tokens than the live
    record in the shared state), so B spends its dead refresh token: on invalid_grant B reads the
    shared record again, finds another, enabled refresh token there, writes it to its file and
    refreshes with it, instead of disabling the account."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from clproxy.accounts.refresh import TokenRefresher
    from clproxy.state.memory import MemoryStateStore

    spent, live = oauth.seed_tokens(), oauth.seed_tokens()
    await oauth_refresh_once(oauth, spent)  # the first pair's refresh token is now spent
    now = time.time()
    store = TokenStore(str(tmp_path))
    stale = store.put(StoredCredential.new_oauth(
        "work", TokenSet(access_token=spent.access_token, refresh_token=spent.refresh_token), now,
        expires_at=now - 60))
    with store.locked() as tx:  # B's clock runs ahead: its stale copy claims the newer tokens
        tx.write(attr.evolve(stale, tokens_at=now + 3600))
    shared = MemoryStateStore()
    record = StoredCredential.new_oauth("work", TokenSet(access_token=live.access_token,
                                        refresh_token=live.refresh_token), now, expires_at=now - 60)
    await shared.put_token_record(KEY, record.to_json())
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    refresher = TokenRefresher(store, http, oauth.endpoints(), reactor, shared=shared)
    fresh = await refresher.fresh(store.get(KEY).to_account())
    assert oauth.invalid_grants == 1 and oauth.is_live_access_token(fresh.secret)
    on_disk = store.get(KEY)
    assert not on_disk.disabled and on_disk.refresh_token in oauth.live_refresh_tokens
    assert (await shared.get_token_record(KEY))["refresh_token"] == on_disk.refresh_token


async def oauth_refresh_once(oauth, pair):
    """Spend ``pair``'s refresh token at the fake (a rotation whose result nobody kept)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from clproxy.accounts import oauth as flows

    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    await flows.refresh_tokens(http, oauth.endpoints(), pair.refresh_token)
