"""Integration: OAuth accounts through the real daemon: refresh before use, on 401, single-flight, quotas."""

import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.testing.oauth import listen_fake_oauth
from helpers import post, request_body, until


@pytest.fixture
def oauth():
    """A fake OAuth token endpoint with single-use rotating refresh tokens."""
    server, port, _ = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


def seed(home, oauth, label="work", expires_in=3600 * 8):
    """Log an OAuth account in to the token store at ``home`` (as `clproxy auth login` would)."""
    pair = oauth.seed_tokens()
    tokens = TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token)
    store = TokenStore(str(home))
    store.put(StoredCredential.new_oauth(label, tokens, time.time(), expires_at=time.time() + expires_in))
    return pair


def oauth_config(fake, oauth):
    return {"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}}}


@pytest_twisted.ensureDeferred
async def test_fifty_requests_on_expired_token_cause_one_refresh(fake, oauth, start_proxy, tmp_path):
    """50 concurrent requests on an expired token share one refresh; all succeed with the new token."""
    home = tmp_path / "home"
    old = seed(home, oauth, expires_in=-60)
    fake.authorize = oauth.is_live_access_token
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    oauth.pause()  # hold the refresh until everyone is waiting on it
    calls = [defer.ensureDeferred(post(proxy.url + "/v1/messages", request_body())) for _ in range(50)]
    await until(lambda: oauth.refresh_calls >= 1)
    oauth.resume()
    results = await defer.gatherResults(calls)
    assert [status for status, _, _ in results] == [200] * 50
    assert oauth.refresh_calls == 1 and oauth.invalid_grants == 0
    used = {r.credential for r in fake.requests}
    assert len(used) == 1 and old.access_token not in used
    assert all(r.header("anthropic-beta").endswith("oauth-2025-04-20") for r in fake.requests)
    stored = TokenStore(str(home)).get("anthropic:work")
    assert stored.access_token in used and oct(os.stat(home / "tokens.json").st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_401_refreshes_and_retries_same_account(fake, oauth, start_proxy, tmp_path):
    """A 401 on a fresh-looking token triggers a forced refresh and a retry that succeeds."""
    home = tmp_path / "home"
    pair = seed(home, oauth)
    fake.script(pair.access_token, status=401,
                body=b'{"type":"error","error":{"type":"authentication_error","message":"revoked"}}')
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    assert oauth.refresh_calls == 1
    assert [r.credential == pair.access_token for r in fake.requests] == [True, False]


@pytest_twisted.ensureDeferred
async def test_dead_refresh_token_disables_and_fails_over(fake, oauth, start_proxy, tmp_path):
    """invalid_grant disables the OAuth account at once; the config API key answers instead."""
    home = tmp_path / "home"
    seed(home, oauth, expires_in=-60)
    oauth.fail_next(400, {"error": "invalid_grant"})
    config = oauth_config(fake, oauth)
    config["accounts"] = {"anthropic": [{"name": "key", "apiKey": "key-backup", "baseUrl": fake.url}]}
    proxy = start_proxy(config, environ={"CLPROXY_HOME": str(home)})
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200 and fake.requests[-1].credential == "key-backup"
    stored = TokenStore(str(home)).get("anthropic:work")
    assert stored.disabled and "invalid_grant" in stored.disabled_reason
    _, _, body = await post(proxy.url + "/status", None, method=b"GET")
    rows = {row["name"]: row for row in json.loads(body)["accounts"]}
    assert rows["work"]["state"] == "disabled"


@pytest_twisted.ensureDeferred
async def test_restart_after_rotation_uses_rotated_token(fake, oauth, start_proxy, tmp_path):
    """A daemon started after a rotation sends the rotated token without refreshing again."""
    home = tmp_path / "home"
    seed(home, oauth, expires_in=-60)
    fake.authorize = oauth.is_live_access_token
    first = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    assert (await post(first.url + "/v1/messages", request_body()))[0] == 200
    await first.service.stopService()
    second = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    assert (await post(second.url + "/v1/messages", request_body()))[0] == 200
    assert oauth.refresh_calls == 1 and oauth.invalid_grants == 0


@pytest_twisted.ensureDeferred
async def test_quota_headers_are_captured(fake, oauth, start_proxy, tmp_path):
    """Unified rate-limit headers are parsed per account, shown in /status and persisted 0600."""
    home = tmp_path / "home"
    pair = seed(home, oauth)
    reset = int(time.time()) + 3600
    fake.script(pair.access_token, times=1, headers={
        "anthropic-ratelimit-unified-status": "allowed_warning",
        "anthropic-ratelimit-unified-5h-utilization": "0.91",
        "anthropic-ratelimit-unified-5h-reset": str(reset),
        "anthropic-ratelimit-unified-7d-utilization": "0.4",
        "anthropic-ratelimit-unified-representative-claim": "five_hour"})
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 200
    _, _, body = await post(proxy.url + "/status", None, method=b"GET")
    (row,) = json.loads(body)["accounts"]
    assert row["quota"]["five_hour"]["utilization"] == 0.91
    assert row["quota"]["representative_claim"] == "five_hour"
    assert row["state"] == "ok"  # allowed_warning does not cool
    proxy.service.quotas.flush()
    saved = json.loads((home / "account-quotas.json").read_text())
    assert saved["anthropic:work"]["seven_day"]["utilization"] == 0.4
    assert oct(os.stat(home / "account-quotas.json").st_mode & 0o777) == "0o600"
    assert pair.access_token not in body.decode()


@pytest_twisted.ensureDeferred
async def test_upstream_disable_of_a_stored_account_is_kept_in_the_token_store(fake, oauth, start_proxy,
                                                                                 tmp_path):
    """A 403 "organization has been disabled" on a token-store account is written to tokens.json, so
    `clproxy auth list` shows it and a restart does not put the dead account back in the pool."""
    from clproxy.testing.anthropic import error_json

    home = tmp_path / "home"
    seed(home, oauth)
    fake.script(None, status=403, body=error_json(403, "permission_error",
                                                  "This organization has been disabled."))
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    await post(proxy.url + "/v1/messages", request_body())
    stored = TokenStore(str(home)).get("anthropic:work")
    assert stored.disabled and "organization is disabled" in stored.disabled_reason
    assert oauth.refresh_calls == 0  # the verdict disables; it is no reason to refresh


@pytest_twisted.ensureDeferred
async def test_a_failed_early_refresh_still_sends_the_valid_token(fake, oauth, start_proxy, tmp_path):
    """The token is valid for 30 more minutes, so the request refreshes it early; the token endpoint
    answers 503: the request is still answered with the current token (no 5-minute cooldown), and
    the failure is counted in the store; the next one refreshes."""
    home = tmp_path / "home"
    pair = seed(home, oauth, expires_in=1800)
    fake.authorize = oauth.is_live_access_token
    # The upkeep's first check refreshes the same token at start: the token endpoint holds its
    # answer until the request has joined that refresh, so one token call (the 503) answers both.
    # (Unheld, the upkeep's refresh sometimes failed before the request came, and the request's own
    # refresh then succeeded: the test failed on a loaded machine.)
    oauth.pause()
    oauth.fail_next(503, {"error": "temporarily_unavailable"})
    proxy = start_proxy(oauth_config(fake, oauth), environ={"CLPROXY_HOME": str(home)})
    asking = defer.ensureDeferred(post(proxy.url + "/v1/messages", request_body()))
    await until(lambda: proxy.service.refresher.waiting("anthropic:work") == 2)
    oauth.resume()
    status, _, _ = await asking
    assert status == 200 and [r.credential for r in fake.requests] == [pair.access_token]
    assert oauth.refresh_calls == 1
    stored = TokenStore(str(home)).get("anthropic:work")
    assert stored.refresh_failures == 1 and not stored.disabled
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200 and oauth.refresh_calls == 2
    assert fake.requests[-1].credential == TokenStore(str(home)).get("anthropic:work").access_token
