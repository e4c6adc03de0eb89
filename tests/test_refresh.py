"""Tests for clproxy.accounts.refresh: single-flight, persist-before-use, cross-process safety, failures."""

import errno
import hashlib
import os
import re
import shutil
import sys
import textwrap
import time

import json
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import defer, protocol, task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from clproxy.accounts import oauth
from clproxy.accounts.model import Account
from clproxy.accounts.oauth import OAuthEndpoints, TokenSet
from clproxy.accounts.refresh import (
    INVALID_GRANT_REASON, AccountDisabled, NotRefreshable, RefreshFailed, RefreshPostponed, TokenRefresher,
)
from clproxy.accounts.tokenstore import (
    StoredCredential, TokenStore, TokenStoreLockTimeout, _FileLock, discover_accounts,
)
from clproxy.testing.oauth import listen_fake_oauth

T0 = 1_700_000_000.0
KEY = "anthropic:work"


def reactor():
    from twisted.internet import reactor as r
    return r


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(T0)
    return c


@pytest.fixture
def http():
    r = reactor()
    return HTTPClient(Agent(r, pool=HTTPConnectionPool(r, persistent=False)))


@pytest.fixture
def fake(clock):
    """The fake OAuth server on real loopback; its scripted delays run on the test's task.Clock."""
    server, port, _ = listen_fake_oauth(reactor(), clock=clock)
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def store(tmp_path, clock):
    return TokenStore(str(tmp_path), now=clock.seconds)


def seed(store, fake, *, expires_at, label="work", refresh=None):
    """Put a live pair from the fake into the store, expiring at ``expires_at``; return its Account."""
    pair = fake.seed_tokens()
    tokens = TokenSet(access_token=pair.access_token,
                      refresh_token=pair.refresh_token if refresh is None else refresh)
    store.put(StoredCredential.new_oauth(label, tokens, store.now(), expires_at=expires_at))
    return next(a for a in store.accounts() if a.key == f"anthropic:{label}")


def within(d, seconds=60.0):
    """Guard a wait on real I/O so a broken test fails instead of hanging."""
    return d.addTimeout(seconds, reactor())


# --- the fast path ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_not_due_comes_back_unchanged(store, fake, http, clock):
    """A token expiring after the refresh window is returned as it is, without any call."""
    account = seed(store, fake, expires_at=T0 + 7200)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    assert await refresher.fresh(account) is account
    assert fake.refresh_calls == 0


@pytest_twisted.ensureDeferred
async def test_api_key_accounts_pass_through(store, fake, http, clock):
    """Non-OAuth accounts are returned unchanged even when forced."""
    account = Account(key="env:ANTHROPIC_API_KEY", name="env", secret="sk-ant-api03-x")
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    assert await refresher.fresh(account, force=True) is account
    assert fake.refresh_calls == 0


@pytest_twisted.ensureDeferred
async def test_refresh_window_is_one_hour_by_default(store, fake, http, clock):
    """A token expiring within refresh_before_expiry (3600 s) is refreshed; the new one is stored."""
    account = seed(store, fake, expires_at=T0 + 3500)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fresh = await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert fresh.secret != account.secret and fake.is_live_access_token(fresh.secret)
    assert fresh.expires_at == T0 + 28800
    stored = store.get(KEY)
    assert stored.access_token == fresh.secret and stored.refresh_token in fake.live_refresh_tokens
    assert fake.refresh_calls == 1


# --- single flight ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_callers_share_one_refresh(store, fake, http, clock):
    """50 concurrent fresh() calls on an expired token make ONE refresh call and all get its token."""
    account = seed(store, fake, expires_at=T0 - 10)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.delay = 1.0
    arrived = fake.next_request()
    calls = [Deferred.fromCoroutine(refresher.fresh(account)) for _ in range(50)]
    await within(arrived)
    assert not any(d.called for d in calls)
    assert refresher.in_flight(KEY)
    clock.advance(1.0)
    results = await within(defer.gatherResults(calls))
    assert fake.refresh_calls == 1
    assert len({r.secret for r in results}) == 1
    assert results[0].secret == store.get(KEY).access_token
    assert fake.is_live_access_token(results[0].secret)
    assert not refresher.in_flight(KEY)


@pytest_twisted.ensureDeferred
async def test_forced_refresh_joins_the_one_in_flight(store, fake, http, clock):
    """A force (401) refresh arriving during a refresh of the same account waits for it, no second call."""
    account = seed(store, fake, expires_at=T0 + 60)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.delay = 1.0
    arrived = fake.next_request()
    first = Deferred.fromCoroutine(refresher.fresh(account))
    await within(arrived)
    forced = Deferred.fromCoroutine(refresher.fresh(account, force=True))
    clock.advance(1.0)
    a, b = await within(defer.gatherResults([first, forced]))
    assert a.secret == b.secret and fake.refresh_calls == 1


@pytest_twisted.ensureDeferred
async def test_a_cancelled_waiter_does_not_stop_the_refresh(store, fake, http, clock):
    """Cancelling one caller leaves the shared refresh running for the others."""
    account = seed(store, fake, expires_at=T0 - 1)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.delay = 1.0
    arrived = fake.next_request()
    doomed = Deferred.fromCoroutine(refresher.fresh(account))
    kept = Deferred.fromCoroutine(refresher.fresh(account))
    await within(arrived)
    doomed.cancel()
    doomed.addErrback(lambda f: f.trap(defer.CancelledError))
    clock.advance(1.0)
    result = await within(kept)
    assert result.secret == store.get(KEY).access_token and fake.refresh_calls == 1


@pytest_twisted.ensureDeferred
async def test_after_a_flight_a_stale_401_uses_the_stored_token(store, fake, http, clock):
    """A forced refresh with the pre-rotation account uses the newer stored token instead of refreshing."""
    account = seed(store, fake, expires_at=T0 - 1)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fresh = await within(Deferred.fromCoroutine(refresher.fresh(account)))
    again = await within(Deferred.fromCoroutine(refresher.fresh(account, force=True)))
    assert again.secret == fresh.secret and fake.refresh_calls == 1


# --- persist before use -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_new_tokens_are_on_disk_before_the_caller_gets_them(tmp_path, fake, http, clock):
    """When fresh() delivers the new access token, a new reader of the file already sees the new pair."""
    store = TokenStore(str(tmp_path), now=clock.seconds)
    account = seed(store, fake, expires_at=T0 - 1)
    events = []

    class Spy(TokenStore):
        def _write_file(self, path, data):
            super()._write_file(path, data)
            events.append("written")

    refresher = TokenRefresher(Spy(str(tmp_path), now=clock.seconds), http, fake.endpoints(), clock)

    def on_delivery(result):
        events.append("delivered")
        on_disk = TokenStore(str(tmp_path)).get(KEY)
        assert on_disk.access_token == result.secret
        assert on_disk.refresh_token in fake.live_refresh_tokens
        return result

    d = Deferred.fromCoroutine(refresher.fresh(account)).addCallback(on_delivery)
    await within(d)
    assert events == ["written", "delivered"]


@pytest_twisted.ensureDeferred
async def test_a_failed_write_means_no_token_for_anyone(tmp_path, fake, http, clock):
    """If the rotated pair cannot be written, every waiter gets RefreshFailed and no new token escapes."""

    class FullDisk(TokenStore):
        broken = False

        def _write_file(self, path, data):
            if self.broken:
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._write_file(path, data)

    store = FullDisk(str(tmp_path), now=clock.seconds)
    account = seed(store, fake, expires_at=T0 - 1)
    before = store.get(KEY)
    store.broken = True
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    waiters = [Deferred.fromCoroutine(refresher.fresh(account)) for _ in range(3)]
    outcomes = await within(defer.DeferredList(waiters, consumeErrors=True))
    assert fake.refresh_calls == 1
    minted = [t for t in fake._live_access if t != account.secret]
    for ok, value in outcomes:
        assert not ok and value.check(RefreshFailed)
        assert not any(t in str(value.value) or t in repr(value.value) for t in minted)
    assert store.get(KEY).access_token == before.access_token
    assert not refresher.in_flight(KEY)


# --- restarts and other processes -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_restart_uses_the_rotated_token(tmp_path, fake, http, clock):
    """New store and refresher objects after a rotation read and refresh with the rotated token."""
    store = TokenStore(str(tmp_path), now=clock.seconds)
    account = seed(store, fake, expires_at=T0 - 1)
    first = await within(Deferred.fromCoroutine(
        TokenRefresher(store, http, fake.endpoints(), clock).fresh(account)))
    # "restart"
    store2 = TokenStore(str(tmp_path), now=clock.seconds)
    (rediscovered,) = discover_accounts(str(tmp_path), (), {}, store=store2)
    assert rediscovered.secret == first.secret
    clock.advance(28800)
    second = await within(Deferred.fromCoroutine(
        TokenRefresher(store2, http, fake.endpoints(), clock).fresh(rediscovered)))
    assert second.secret != first.secret
    assert fake.refresh_calls == 2 and fake.invalid_grants == 0


@pytest_twisted.ensureDeferred
async def test_another_refresher_already_rotated(tmp_path, fake, http, clock):
    """A second refresher (another process) holding the old account uses the stored rotation, no call."""
    store = TokenStore(str(tmp_path), now=clock.seconds)
    account = seed(store, fake, expires_at=T0 + 60)
    daemon = TokenRefresher(store, http, fake.endpoints(), clock)
    cli = TokenRefresher(TokenStore(str(tmp_path), now=clock.seconds), http, fake.endpoints(), clock)
    rotated = await within(Deferred.fromCoroutine(cli.fresh(account, force=True)))
    got = await within(Deferred.fromCoroutine(daemon.fresh(account)))
    assert got.secret == rotated.secret
    assert fake.refresh_calls == 1 and fake.invalid_grants == 0


class Child(protocol.ProcessProtocol):
    """A child process whose output the test can wait on."""

    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()
        self._waiters = []

    def outReceived(self, data):
        self.out += data
        self._check()

    def errReceived(self, data):
        self.err += data

    def wait_for(self, pattern):
        d = Deferred()
        self._waiters.append((re.compile(pattern), d))
        self._check()
        return d

    def _check(self):
        text = self.out.decode("utf-8", "replace")
        for entry in list(self._waiters):
            match = entry[0].search(text)
            if match:
                self._waiters.remove(entry)
                entry[1].callback(match)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def spawn(args, env_extra, cwd):
    child = Child()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.getcwd(), **env_extra}
    reactor().spawnProcess(child, sys.executable, [sys.executable, *args], env=env, path=cwd)
    return child


CLI = "import sys; from clproxy.cli.auth import main; sys.exit(main(sys.argv[1:]))"

RACER = textwrap.dedent("""
    import hashlib, sys
    from treq.client import HTTPClient
    from twisted.internet import defer, task
    from twisted.web.client import Agent, HTTPConnectionPool
    from clproxy.accounts.oauth import OAuthEndpoints
    from clproxy.accounts.refresh import TokenRefresher
    from clproxy.accounts.tokenstore import TokenStore

    async def run(reactor, home, token_url):
        store = TokenStore(home)
        account = store.accounts()[0]          # this process's snapshot: the pre-rotation token
        print("snapshot", flush=True)
        sys.stdin.readline()
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        refresher = TokenRefresher(store, http, OAuthEndpoints(token_url=token_url), reactor)
        fresh = await refresher.fresh(account, force=True)
        print("token", hashlib.sha256(fresh.secret.encode()).hexdigest(), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, sys.argv[1], sys.argv[2])))
""")


@pytest.fixture
def live_fake():
    """The fake OAuth server with delays on the real reactor (for tests with a second process)."""
    server, port, _ = listen_fake_oauth(reactor())
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_cli_process_refreshing_while_the_daemon_needs_a_refresh(tmp_path, live_fake, http):
    """A CLI refresh process holding the lock mid-call makes the daemon wait and reuse its rotation."""
    home = tmp_path / "home"
    store = TokenStore(str(home))
    account = seed(store, live_fake, expires_at=time.time() + 60)
    live_fake.pause()
    arrived = live_fake.next_request()
    child = spawn(["-c", CLI, "refresh", "anthropic", "--label", "work"],
                  {"CLPROXY_HOME": str(home), "HOME": str(tmp_path),
                   "CLPROXY_OAUTH_TOKEN_URL": live_fake.token_url}, str(tmp_path))
    await within(arrived)  # the CLI process now holds the store lock, waiting for its answer
    daemon = TokenRefresher(store, http, live_fake.endpoints(), reactor())
    d = Deferred.fromCoroutine(daemon.fresh(account))
    assert not d.called
    live_fake.resume()
    code = await within(child.ended)
    got = await within(d)
    assert code == 0, child.err.decode()
    assert live_fake.refresh_calls == 1 and live_fake.invalid_grants == 0
    stored = TokenStore(str(home)).get(KEY)
    assert got.secret == stored.access_token and live_fake.is_live_access_token(got.secret)
    assert stored.refresh_token in live_fake.live_refresh_tokens
    assert not stored.disabled


@pytest_twisted.ensureDeferred
async def test_daemon_refreshing_while_another_process_has_a_stale_snapshot(tmp_path, live_fake, http):
    """A process with a pre-rotation snapshot waits for the daemon's lock and reuses its rotation."""
    home = tmp_path / "home"
    store = TokenStore(str(home))
    account = seed(store, live_fake, expires_at=time.time() + 60)
    child = spawn(["-c", RACER, str(home), live_fake.token_url], {"HOME": str(tmp_path)}, str(tmp_path))
    await within(child.wait_for(r"snapshot"))
    live_fake.pause()
    arrived = live_fake.next_request()
    daemon = TokenRefresher(store, http, live_fake.endpoints(), reactor())
    d = Deferred.fromCoroutine(daemon.fresh(account))
    await within(arrived)  # the daemon holds the lock now
    child.transport.write(b"go\n")
    live_fake.resume()
    got = await within(d)
    line = await within(child.wait_for(r"token ([0-9a-f]{64})"))
    assert await within(child.ended) == 0, child.err.decode()
    assert line.group(1) == hashlib.sha256(got.secret.encode()).hexdigest()
    assert live_fake.refresh_calls == 1 and live_fake.invalid_grants == 0
    stored = TokenStore(str(home)).get(KEY)
    assert stored.access_token == got.secret and stored.refresh_token in live_fake.live_refresh_tokens


@pytest_twisted.ensureDeferred
async def test_legacy_file_account_is_refreshed_in_place(tmp_path, fake, http, clock):
    """legacy:anthropic is refreshed through its own file, which keeps Claude Code's shape and ms expiry."""
    pair = fake.seed_tokens()
    legacy = tmp_path / "anthropic-credentials.json"
    legacy.write_text(json.dumps({"claudeAiOauth": {"accessToken": pair.access_token,
                                                    "refreshToken": pair.refresh_token,
                                                    "expiresAt": int((T0 - 5) * 1000)}}))
    store = TokenStore(str(tmp_path), now=clock.seconds)
    (account,) = discover_accounts(str(tmp_path), (), {}, store=store)
    fresh = await within(Deferred.fromCoroutine(TokenRefresher(store, http, fake.endpoints(), clock).fresh(account)))
    raw = json.loads(legacy.read_text())["claudeAiOauth"]
    assert raw["accessToken"] == fresh.secret and raw["refreshToken"] in fake.live_refresh_tokens
    assert raw["expiresAt"] == int((T0 + 28800) * 1000)
    assert oct(os.stat(legacy).st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_a_store_corrupted_meanwhile_fails_the_refresh_cleanly(tmp_path, fake, http, clock):
    """If the store became unreadable, fresh() raises RefreshFailed naming the file and calls nothing."""
    store = TokenStore(str(tmp_path), now=clock.seconds)
    account = seed(store, fake, expires_at=T0 - 1)
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(RefreshFailed) as info:
        await within(Deferred.fromCoroutine(TokenRefresher(store, http, fake.endpoints(), clock).fresh(account)))
    assert "tokens.json" in str(info.value) and fake.refresh_calls == 0
    assert (tmp_path / "tokens.json").read_text() == "{not json"


# --- failures -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fifteen_consecutive_failures_disable(store, fake, http, clock):
    """Each failed refresh counts; the 15th disables the account; then no more calls are made."""
    account = seed(store, fake, expires_at=T0 - 1)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.fail_next(500, times=15)
    for n in range(1, 16):
        with pytest.raises(RefreshFailed) as info:
            await within(Deferred.fromCoroutine(refresher.fresh(account)))
        record = store.get(KEY)
        assert record.refresh_failures == n
        assert record.disabled == (n == 15) and info.value.disabled == (n == 15)
    assert store.get(KEY).disabled_reason == "15 consecutive refresh failures"
    with pytest.raises(AccountDisabled):
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert fake.refresh_calls == 15
    (discovered,) = discover_accounts(store.home, (), {})
    assert discovered.enabled is False
    store.enable(KEY)
    fresh = await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert fake.is_live_access_token(fresh.secret) and store.get(KEY).refresh_failures == 0


@pytest_twisted.ensureDeferred
async def test_failures_never_disable_while_the_token_is_valid(store, fake, http, clock):
    """A token endpoint down for 10 minutes (a 503 every 30 s, 20 in a row) while the access token is
    valid for 30 more: each failure is counted, none disables the account. Once the token has
    expired, the next failure (15 or more in a row) does; invalid_grant needs no expiry."""
    account = seed(store, fake, expires_at=T0 + 1800)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.fail_next(503, {"error": "temporarily_unavailable"}, times=21)
    for n in range(1, 21):
        with pytest.raises(RefreshFailed) as info:
            await within(Deferred.fromCoroutine(refresher.fresh(account)))
        assert not info.value.disabled
        assert store.get(KEY).refresh_failures == n and not store.get(KEY).disabled
        clock.advance(30.0)
    clock.advance(1800.0)  # now expired
    with pytest.raises(RefreshFailed) as info:
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    record = store.get(KEY)
    assert info.value.disabled and record.disabled and record.refresh_failures == 21
    assert record.disabled_reason == "21 consecutive refresh failures"


@pytest_twisted.ensureDeferred
async def test_success_resets_the_failure_count(store, fake, http, clock):
    """A successful refresh after some failures sets the count back to zero."""
    account = seed(store, fake, expires_at=T0 - 1)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.fail_next(502, times=3)
    for _ in range(3):
        with pytest.raises(RefreshFailed):
            await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert store.get(KEY).refresh_failures == 3
    await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert store.get(KEY).refresh_failures == 0


@pytest_twisted.ensureDeferred
async def test_invalid_grant_disables_at_once_until_relogin(store, fake, http, clock):
    """invalid_grant disables the account on the first failure; a new login re-enables it."""
    account = seed(store, fake, expires_at=T0 - 1, refresh="sk-ant-ort01-" + "d" * 40)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    with pytest.raises(RefreshFailed) as info:
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert info.value.disabled and isinstance(info.value.__cause__, oauth.InvalidGrant)
    record = store.get(KEY)
    assert record.disabled and record.disabled_reason == INVALID_GRANT_REASON
    assert record.disabled_reason == "refresh token rejected (invalid_grant): run clproxy auth login again"
    relogin = seed(store, fake, expires_at=T0 + 28800)
    assert not store.get(KEY).disabled and store.get(KEY).refresh_failures == 0
    assert (await within(Deferred.fromCoroutine(refresher.fresh(relogin, force=True)))).enabled


@pytest_twisted.ensureDeferred
async def test_network_errors_count_as_failures(store, fake, http, clock):
    """An unreachable token endpoint is a counted failure, not a disable."""
    account = seed(store, fake, expires_at=T0 - 1)
    _server, port, url = listen_fake_oauth(reactor())
    await port.stopListening()
    refresher = TokenRefresher(store, http, OAuthEndpoints(token_url=url + "/v1/oauth/token"), clock)
    with pytest.raises(RefreshFailed) as info:
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert isinstance(info.value.__cause__, oauth.OAuthNetworkError) and not info.value.disabled
    assert store.get(KEY).refresh_failures == 1


class _StalledBody(protocol.Protocol):
    """A token endpoint that sends its status line, headers and the start of a body, then stalls."""

    def __init__(self, closed):
        self.closed = closed

    def dataReceived(self, data):
        if b"\r\n\r\n" in data and not getattr(self, "answered", False):
            self.answered = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 500\r\n\r\n{\"access_token\": ")

    def connectionLost(self, reason=None):
        self.closed.callback(None)


class _HeadersSeen:
    """An HTTP client that fires :attr:`headers` (on the next reactor turn) once a response's headers
    are in: from then on only its body is awaited."""

    def __init__(self, http):
        self.http = http
        self.headers = Deferred()

    def post(self, *args, **kwargs):
        def seen(response):
            reactor().callLater(0, self.headers.callback, None)
            return response
        return self.http.post(*args, **kwargs).addCallback(seen)


@pytest_twisted.ensureDeferred
async def test_a_stalled_answer_body_ends_at_http_timeout(store, fake, http, clock):
    """The token call's deadline covers the answer's body: a body that stalls after the headers fails
    the refresh as a network error at http_timeout (on the refresher's clock), releases the store
    lock and closes the connection, instead of holding them for ever."""
    account = seed(store, fake, expires_at=T0 - 1)
    closed = Deferred()
    port = reactor().listenTCP(0, protocol.Factory.forProtocol(lambda: _StalledBody(closed)),
                               interface="127.0.0.1")
    try:
        client = _HeadersSeen(http)
        endpoints = OAuthEndpoints(token_url=f"http://127.0.0.1:{port.getHost().port}/v1/oauth/token")
        refresher = TokenRefresher(store, client, endpoints, clock, http_timeout=10.0)
        d = Deferred.fromCoroutine(refresher.fresh(account))
        await within(client.headers)
        clock.advance(9.9)
        assert not d.called and store.held()
        clock.advance(0.1)
        with pytest.raises(RefreshFailed) as info:
            await within(d, 5.0)  # no real wait: the deadline has passed
        assert isinstance(info.value.__cause__, oauth.OAuthNetworkError) and not info.value.disabled
        assert "TimeoutError" in str(info.value)
        assert not store.held() and store.get(KEY).refresh_failures == 1
        await within(closed, 10.0)  # the stalled connection was dropped, not left open
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_failed_early_refresh_hands_back_the_still_valid_token(store, fake, http, clock):
    """A refresh started early (the token valid 30 more minutes) that fails for a passing reason
    raises RefreshPostponed with the caller's account, so its token is used; the failure is counted.
    Forced (after a 401), for an expired token, or on invalid_grant it is a plain RefreshFailed."""
    account = seed(store, fake, expires_at=T0 + 1800)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    fake.fail_next(503, {"error": "temporarily_unavailable"})
    with pytest.raises(RefreshPostponed) as info:
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert info.value.account is account and not info.value.disabled
    assert isinstance(info.value.__cause__.__cause__, oauth.OAuthHTTPError)
    assert "still valid" in str(info.value) and account.secret not in str(info.value)
    assert store.get(KEY).refresh_failures == 1 and not store.get(KEY).disabled
    fake.fail_next(503)
    with pytest.raises(RefreshFailed) as forced:
        await within(Deferred.fromCoroutine(refresher.fresh(account, force=True)))
    assert not isinstance(forced.value, RefreshPostponed)
    clock.advance(1800)
    fake.fail_next(503)
    with pytest.raises(RefreshFailed) as expired:
        await within(Deferred.fromCoroutine(refresher.fresh(account)))
    assert not isinstance(expired.value, RefreshPostponed)
    dead = seed(store, fake, expires_at=clock.seconds() + 1800, label="dead",
                refresh="sk-ant-ort01-" + "d" * 40)
    with pytest.raises(RefreshFailed) as rejected:
        await within(Deferred.fromCoroutine(refresher.fresh(dead)))
    assert rejected.value.disabled and not isinstance(rejected.value, RefreshPostponed)


@pytest_twisted.ensureDeferred
async def test_no_refresh_token_is_not_refreshable(store, fake, http, clock):
    """An expiring OAuth account without a refresh token (or absent from the store) raises NotRefreshable."""
    pair = fake.seed_tokens()
    store.put(StoredCredential.new_oauth("work", TokenSet(access_token=pair.access_token), T0,
                                         expires_at=T0 - 1))
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    with pytest.raises(NotRefreshable):
        await within(Deferred.fromCoroutine(refresher.fresh(store.accounts()[0])))
    stranger = Account(key="config:x", name="x", kind="oauth", secret="sk-ant-oat01-zz", expires_at=T0 - 1)
    with pytest.raises(NotRefreshable):
        await within(Deferred.fromCoroutine(refresher.fresh(stranger)))
    assert fake.refresh_calls == 0


@pytest_twisted.ensureDeferred
async def test_lock_wait_times_out_without_calling(store, fake, http, clock):
    """If another process holds the lock past lock_timeout, fresh() fails clearly and makes no call."""
    account = seed(store, fake, expires_at=T0 - 1)
    refresher = TokenRefresher(store, http, fake.endpoints(), clock, lock_timeout=5.0, lock_poll=1.0)
    holder = _FileLock(store.lock_path)
    assert holder.try_acquire()
    try:
        d = Deferred.fromCoroutine(refresher.fresh(account))
        clock.pump([1.0] * 6)
        with pytest.raises(RefreshFailed) as info:
            await d
        assert isinstance(info.value.__cause__, TokenStoreLockTimeout)
        assert "lock" in str(info.value)
    finally:
        holder.release()
    assert fake.refresh_calls == 0 and store.get(KEY).refresh_failures == 0


class _CountingPosts:
    """An HTTP client counting its POSTs as they are made (synchronously, before any answer)."""

    def __init__(self, http):
        self.http = http
        self.posts = 0

    def post(self, *args, **kwargs):
        self.posts += 1
        return self.http.post(*args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_the_shared_lock_outlives_a_file_lock_wait_and_a_slow_call(tmp_path, fake, http, clock):
    """Instance A takes the instance-wide lock, waits 59 s for its machine's file lock (another worker
    holds it), then the token endpoint takes 29 s: all within lock_timeout and http_timeout. The
    instance-wide lock must still be A's meanwhile, so instance B (its own file, the same login) waits
    and then uses A's rotation instead of spending the same refresh token."""
    from clproxy.state.memory import MemoryStateStore

    shared = MemoryStateStore()  # the instance-wide lock and token records, as Redis keeps them
    store_a = TokenStore(str(tmp_path / "a"), now=clock.seconds)
    account_a = seed(store_a, fake, expires_at=T0 + 600)  # due: within refresh_before_expiry
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    store_b = TokenStore(str(tmp_path / "b"), now=clock.seconds)
    client = _CountingPosts(http)
    refresher_a = TokenRefresher(store_a, client, fake.endpoints(), clock, shared=shared)
    refresher_b = TokenRefresher(store_b, client, fake.endpoints(), clock, shared=shared)
    assert refresher_a.shared_lock_ttl() >= 60.0 + 30.0  # lock_timeout + http_timeout, by default
    other_worker = _FileLock(store_a.lock_path)
    assert other_worker.try_acquire()
    d_a = Deferred.fromCoroutine(refresher_a.fresh(account_a))
    clock.advance(59.0)
    other_worker.release()
    fake.delay = 29.0
    arrived = fake.next_request()
    clock.advance(0.05)  # A's next poll takes the file lock and calls the token endpoint
    await within(arrived)
    assert client.posts == 1
    d_b = Deferred.fromCoroutine(refresher_b.fresh(store_b.get(KEY).to_account()))
    assert client.posts == 1, "B took the instance-wide lock while A still held it"
    clock.advance(29.0)
    fresh_a = await within(d_a)
    for _ in range(10):  # B's lock polls (at most 0.2 s apart)
        clock.advance(0.2)
    fresh_b = await within(d_b)
    assert fresh_b.secret == fresh_a.secret and fake.refresh_calls == 1 and fake.invalid_grants == 0
    assert store_b.get(KEY).refresh_token == store_a.get(KEY).refresh_token


# --- startup ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_startup_check_refreshes_or_disables_expired_accounts(store, fake, http, clock):
    """At startup an expired account gets one refresh; one whose refresh fails is disabled; others pass."""
    good = seed(store, fake, expires_at=T0 - 100, label="good")
    dead = seed(store, fake, expires_at=T0 - 100, label="dead", refresh="sk-ant-ort01-" + "d" * 40)
    fine = seed(store, fake, expires_at=T0 + 20000, label="fine")
    key = Account(key="env:ANTHROPIC_API_KEY", name="env", secret="sk-ant-api03-k")
    refresher = TokenRefresher(store, http, fake.endpoints(), clock)
    result = await within(Deferred.fromCoroutine(refresher.startup_check([good, dead, fine, key])))
    by_key = {a.key: a for a in result}
    assert [a.key for a in result] == [good.key, dead.key, fine.key, key.key]
    assert by_key[good.key].enabled and by_key[good.key].secret != good.secret
    assert by_key[dead.key].enabled is False and store.get(dead.key).disabled
    assert by_key[fine.key] is fine and by_key[key.key] is key
    assert fake.refresh_calls == 2


@pytest_twisted.ensureDeferred
async def test_startup_check_disables_on_a_transient_failure(store, fake, http, clock):
    """A startup refresh that fails for a network reason also disables the expired account, with why."""
    account = seed(store, fake, expires_at=T0 - 1)
    _server, port, url = listen_fake_oauth(reactor())
    await port.stopListening()
    refresher = TokenRefresher(store, http, OAuthEndpoints(token_url=url + "/v1/oauth/token"), clock)
    (result,) = await within(Deferred.fromCoroutine(refresher.startup_check([account])))
    assert result.enabled is False
    record = store.get(KEY)
    assert record.disabled and "startup refresh failed" in record.disabled_reason
