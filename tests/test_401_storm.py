"""A 401 storm: the upstream revokes an OAuth access token while many requests are in flight.

Every request that hits the 401 while a refresh is possible waits on one shared refresh and is
retried with the new token; the account cools only when refreshing is impossible or failed, and no
client is told to wait longer than the account really needs (issue 11, item 1).
"""

import json
import shutil
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.testing.oauth import listen_fake_oauth
from clproxy.testing.anthropic import error_json
from conftest import accounts_config
from helpers import error_of, post, request_body, until
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

KEY = "anthropic:work"
N = 50


@pytest.fixture
def oauth():
    """A fake OAuth token endpoint with single-use rotating refresh tokens."""
    server, port, _ = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


def seed(home, oauth, expires_in=3600 * 8):
    """A logged-in OAuth account ``work`` in the token store at ``home``; returns its token pair."""
    pair = oauth.seed_tokens()
    now = time.time()
    TokenStore(str(home)).put(StoredCredential.new_oauth(
        "work", TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token), now,
        expires_at=now + expires_in))
    return pair


def oauth_config(fake, oauth, redis_url=None):
    config = {"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}}}
    if redis_url is not None:
        config["state"] = {"backend": "redis", "url": redis_url, "prefix": unique_prefix()}
    return config


async def storm(fake, oauth, proxies, revoked, staging):
    """Revoke ``revoked`` and send N requests over ``proxies``; the token endpoint holds its answer
    until every request waits on a refresh, then answers.

    ``all-in-flight``: all N reach the upstream before the first 401 is answered.
    ``first-alone``: one request hits the 401 and starts the refresh; the other N-1 arrive while
    that refresh is under way (they must wait on it, not be told the account is cooling).
    """
    fake.authorize = oauth.is_live_access_token
    oauth.revoke(revoked)
    fake.revoke(revoked)
    oauth.pause()
    fake.pause()

    def send(i):
        return defer.ensureDeferred(post(proxies[i % len(proxies)].url + "/v1/messages", request_body()))

    if staging == "all-in-flight":
        calls = [send(i) for i in range(N)]
        await until(lambda: len(fake.held) == N)  # all in flight before the first 401 is answered
        fake.resume()
    else:
        calls = [send(0)]
        await until(lambda: len(fake.held) == 1)
        fake.resume()
        await until(lambda: oauth.refresh_calls == 1)  # the refresh is under way, its answer held
        calls += [send(i) for i in range(1, N)]
    await until(lambda: sum(p.service.refresher.waiting(KEY) for p in proxies) == N
                or any(c.called for c in calls))
    oauth.resume()
    return await defer.gatherResults(calls)


async def account_row(proxy):
    _, _, body = await post(proxy.url + "/status", None, method=b"GET")
    (row,) = [r for r in json.loads(body)["accounts"] if r["key"] == KEY]
    return row


STAGINGS = pytest.mark.parametrize("staging", ["all-in-flight", "first-alone"])


@STAGINGS
@pytest_twisted.ensureDeferred
async def test_401_storm_waits_on_one_refresh_and_all_succeed(fake, oauth, start_proxy, tmp_path, staging):
    """50 requests in flight when the token is revoked: one refresh, 50 retries with the new token,
    50 x 200, and the account is not left cooling."""
    home = tmp_path / "home"
    pair = seed(home, oauth)
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    results = await storm(fake, oauth, [proxy], pair.access_token, staging)
    assert [status for status, _, _ in results] == [200] * N, [b for s, _, b in results if s != 200][:1]
    assert oauth.refresh_calls == 1 and oauth.invalid_grants == 0
    new = TokenStore(str(home)).get(KEY).access_token
    assert [r.credential for r in fake.requests].count(new) == N
    row = await account_row(proxy)
    assert row["state"] == "ok" and row["cooling_until"] is None


@STAGINGS
@pytest_twisted.ensureDeferred
async def test_401_storm_over_two_instances_sharing_redis(fake, oauth, start_proxy, redis_server,  # noqa: F811
                                                          tmp_path, staging):
    """The same storm over two instances (two machines, one Redis): one refresh in all, 50 x 200."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    pair = seed(home_a, oauth)
    shutil.copytree(home_a, home_b)
    config = oauth_config(fake, oauth, redis_server.url)
    one = start_proxy(config, environ={"CLPROXY_HOME": str(home_a)})
    two = start_proxy(config, environ={"CLPROXY_HOME": str(home_b)})
    await until(lambda: one.service.store.available and two.service.store.available)
    results = await storm(fake, oauth, [one, two], pair.access_token, staging)
    assert [status for status, _, _ in results] == [200] * N, [b for s, _, b in results if s != 200][:1]
    assert oauth.refresh_calls == 1 and oauth.invalid_grants == 0
    for proxy in (one, two):
        row = await account_row(proxy)
        assert row["state"] == "ok" and row["cooling_until"] is None


@pytest_twisted.ensureDeferred
async def test_credential_dead_even_after_refresh_answers_401(fake, oauth, start_proxy, tmp_path):
    """An OAuth account whose refreshed tokens are rejected too: the client gets Anthropic's 401
    (authentication_error), not a 429 telling it to wait; the account then cools."""
    home = tmp_path / "home"
    seed(home, oauth)
    fake.authorize = lambda credential: False  # every token this account ever gets is rejected
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    status, headers, body = await post(proxy.url + "/v1/messages", request_body())
    assert status == 401 and error_of(body)[0] == "authentication_error"
    assert headers.getRawHeaders(b"retry-after") is None
    assert 1 <= oauth.refresh_calls <= proxy.dispatcher.settings.max_refresh_retries
    row = await account_row(proxy)
    assert row["state"] == "cooling" and row["cooling_until"] <= time.time() + 300


@pytest_twisted.ensureDeferred
async def test_unrefreshable_oauth_401_cools_with_a_true_retry_after(fake, oauth, start_proxy, tmp_path):
    """An OAuth account without a refresh token cannot be fixed by a refresh: its 401 cools it, and
    the next request's Retry-After is no longer than the cooldown really left."""
    home = tmp_path / "home"
    now = time.time()
    TokenStore(str(home)).put(StoredCredential.new_oauth(
        "work", TokenSet(access_token="sk-ant-oat01-norefresh", refresh_token=None), now,
        expires_at=now + 8 * 3600))
    fake.revoke("sk-ant-oat01-norefresh")
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    first = await post(proxy.url + "/v1/messages", request_body())
    assert first[0] == 401 and error_of(first[2])[0] == "authentication_error"
    row = await account_row(proxy)
    assert row["state"] == "cooling"
    status, headers, _ = await post(proxy.url + "/v1/messages", request_body())
    (retry_after,) = headers.getRawHeaders(b"retry-after")
    assert status == 429 and int(retry_after) <= int(row["cooling_until"] - time.time()) + 1
    assert oauth.refresh_calls == 0


@pytest_twisted.ensureDeferred
async def test_401_as_first_stream_event_is_refreshed_and_retried(fake, oauth, start_proxy, tmp_path):
    """A stream whose first event is an authentication_error is an OAuth 401 too: refreshed once
    and retried with the new token, not left uncooled and unrefreshed."""
    home = tmp_path / "home"
    pair = seed(home, oauth)
    fake.script(pair.access_token, events=[("error", {"type": "error", "error": {
        "type": "authentication_error", "message": "OAuth token has expired"}})])
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    status, _, body = await post(proxy.url + "/v1/messages", request_body(stream=True))
    assert status == 200 and b"message_stop" in body
    assert oauth.refresh_calls == 1
    assert [r.credential == pair.access_token for r in fake.requests] == [True, False]


@pytest_twisted.ensureDeferred
async def test_401_cooldown_does_not_outlive_a_successful_refresh(fake, oauth, start_proxy, tmp_path):
    """401, refresh succeeds, the retry meets a transient 529: the account is not left cooling for
    the 401 (its token is fine now), so the next request goes through at once."""
    home = tmp_path / "home"
    pair = seed(home, oauth)
    fake.revoke(pair.access_token)
    fake.script(None, status=529, times=1, body=error_json(529, "overloaded_error", "Overloaded"))
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 529 and oauth.refresh_calls == 1
    row = await account_row(proxy)
    assert row["state"] == "ok" and row["cooling_until"] is None
    assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 200
