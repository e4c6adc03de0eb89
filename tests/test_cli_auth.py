"""End-to-end tests of ``clproxy auth``: login, import, list, status, refresh, cleanup, enable, logout."""

import io
import json
import os
import re
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

import attr
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.cli import auth as cli
from clproxy.testing.oauth import listen_fake_oauth
from clproxy.testing.anthropic import listen_fake_anthropic
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

TOKEN_RE = re.compile(r"sk-ant-[a-z]+\d*-[A-Za-z0-9_\-]{6,}")
URL_RE = re.compile(r"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)")


def reactor():
    from twisted.internet import reactor as r
    return r


@pytest.fixture
def fake():
    server, port, _ = listen_fake_oauth(reactor())
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def home(tmp_path):
    return tmp_path / "clproxy-home"


@pytest.fixture
def environ(tmp_path, home, fake):
    return {"CLPROXY_HOME": str(home), "HOME": str(tmp_path),
            "CLPROXY_OAUTH_TOKEN_URL": fake.token_url,
            "CLPROXY_OAUTH_AUTHORIZE_URL": fake.authorize_url,
            "CLPROXY_CREATE_API_KEY_URL": fake.create_api_key_url}


@pytest.fixture
def offline_environ(tmp_path, home):
    return {"CLPROXY_HOME": str(home), "HOME": str(tmp_path)}


class Browser:
    """Plays the user: reads the authorize URL the CLI printed, signs in at the fake, pastes code#state."""

    def __init__(self, server, stdout, state=None, text=None):
        self.server = server
        self.stdout = stdout
        self.state = state
        self.text = text
        self.url = None

    def readline(self):
        self.url = URL_RE.search(self.stdout.getvalue()).group(1)
        query = parse_qs(urlsplit(self.url).query)
        code = self.server.issue_code(query["code_challenge"][0], query["state"][0])
        if self.text is not None:
            return self.text
        return f"{code}#{self.state or query['state'][0]}\n"


def secrets_known(fake, home):
    known = set(fake._live_access) | set(fake._live_refresh) | set(fake._burnt)
    try:
        for record in TokenStore(str(home)).load().values():
            known |= {record.access_token, record.refresh_token, record.api_key} - {None}
    except Exception:
        pass
    return known


def assert_no_tokens(text, extra=()):
    """No token-shaped string, and none of the known secrets, in ``text``."""
    assert not TOKEN_RE.search(text), text
    for secret in extra:
        assert secret not in text


def assert_clean(err):
    assert "Traceback" not in err


async def run_async(argv, environ, stdin=None, stdout=None):
    stdout = stdout or io.StringIO()
    stderr = io.StringIO()
    r = reactor()
    http = HTTPClient(Agent(r, pool=HTTPConnectionPool(r, persistent=False)))
    code = await cli.main_async(argv, reactor=r, stdin=stdin or io.StringIO(""), stdout=stdout,
                                stderr=stderr, environ=environ, http_client=http)
    return code, stdout.getvalue(), stderr.getvalue()


def run(argv, environ, stdin_text=""):
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdin=io.StringIO(stdin_text), stdout=stdout, stderr=stderr, environ=environ)
    assert_clean(stderr.getvalue())
    return code, stdout.getvalue(), stderr.getvalue()


def put_oauth(home, label, *, expires_at, refresh="sk-ant-ort01-" + "r" * 30, access=None, **changes):
    store = TokenStore(str(home))
    tokens = TokenSet(access_token=access or "sk-ant-oat01-" + label * 10 + "x" * 10, refresh_token=refresh,
                      email=f"{label}@example.com")
    record = store.put(StoredCredential.new_oauth(label, tokens, time.time(), expires_at=expires_at))
    if changes:
        with store.locked() as tx:
            record = tx.write(attr.evolve(record, **changes))
    return record


def corrupt(home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "tokens.json").write_text('{"accounts": {"anthropic:x": {"access_token": "sk-ant-oat01-LEAKLEAKLEAK')


# --- login ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_oauth_login_end_to_end(fake, environ, home):
    """OAuth login: URL printed, code#state pasted, PKCE exchange at the fake, account stored; no token shown."""
    stdout = io.StringIO()
    browser = Browser(fake, stdout)
    code, out, err = await run_async(["login", "anthropic", "--method", "oauth", "--add", "--label", "work"],
                                     environ, stdin=browser, stdout=stdout)
    assert code == 0, err
    query = parse_qs(urlsplit(browser.url).query)
    assert query["code_challenge_method"] == ["S256"] and query["client_id"]
    record = TokenStore(str(home)).get("anthropic:work")
    assert record.type == "oauth" and record.email == "user@example.com"
    assert fake.is_live_access_token(record.access_token)
    assert record.refresh_token in fake.live_refresh_tokens
    assert out.count("Claude Code only") == 1
    assert "anthropic:work" in out and "user@example.com" in out
    assert_no_tokens(out + err, secrets_known(fake, home))
    assert oct(os.stat(home / "tokens.json").st_mode & 0o777) == "0o600"


@pytest_twisted.ensureDeferred
async def test_login_without_add_uses_default_label_and_json(fake, environ, home):
    """Without --add the account is anthropic:default; --format json prints one JSON object on stdout."""
    stdout = io.StringIO()
    stdin = Browser(fake, io.StringIO())

    class Tee(io.StringIO):
        def write(self, s):
            stdin.stdout.write(s)
            return super().write(s)

    stderr_capture = Tee()
    r = reactor()
    http = HTTPClient(Agent(r, pool=HTTPConnectionPool(r, persistent=False)))
    code = await cli.main_async(["login", "anthropic", "--method", "oauth", "--format", "json"],
                                reactor=r, stdin=stdin, stdout=stdout, stderr=stderr_capture,
                                environ=environ, http_client=http)
    assert code == 0, stderr_capture.getvalue()
    data = json.loads(stdout.getvalue())
    assert data["ok"] and data["key"] == "anthropic:default" and data["type"] == "oauth"
    assert "Claude Code only" in stderr_capture.getvalue()
    assert_no_tokens(stdout.getvalue() + stderr_capture.getvalue(), secrets_known(fake, home))


@pytest_twisted.ensureDeferred
async def test_login_with_wrong_state_is_refused(fake, environ, home):
    """A pasted code with another state is refused before any exchange; nothing is stored."""
    stdout = io.StringIO()
    code, out, err = await run_async(["login", "anthropic", "--method", "oauth"], environ,
                                     stdin=Browser(fake, stdout, state="forged-state"), stdout=stdout)
    assert code == 1
    assert "state" in err and "Traceback" not in err
    assert fake.calls["authorization_code"] == 0
    assert not (home / "tokens.json").exists()


@pytest_twisted.ensureDeferred
async def test_login_with_a_bare_code_is_refused(fake, environ, home):
    """Pasting only the code (no #state) is a clear error."""
    stdout = io.StringIO()
    code, _, err = await run_async(["login", "anthropic", "--method", "oauth"], environ,
                                   stdin=Browser(fake, stdout, text="justacode\n"), stdout=stdout)
    assert code == 1 and "code#state" in err


@pytest_twisted.ensureDeferred
async def test_create_api_key_login(fake, environ, home):
    """create-api-key signs in with OAuth, mints an API key and stores only the key."""
    stdout = io.StringIO()
    code, out, err = await run_async(["login", "anthropic", "--method", "create-api-key", "--add",
                                      "--label", "minted"], environ, stdin=Browser(fake, stdout), stdout=stdout)
    assert code == 0, err
    record = TokenStore(str(home)).get("anthropic:minted")
    assert record.type == "api-key" and record.api_key.startswith("sk-ant-api03-")
    assert record.access_token is None and record.email == "user@example.com"
    assert fake.calls["create_api_key"] == 1
    assert_no_tokens(out + err, secrets_known(fake, home))


def test_api_key_login_from_stdin(offline_environ, home):
    """api-key login reads the key from stdin and never echoes it."""
    key = "sk-ant-api03-" + "k" * 40
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--add", "--label", "api",
                          "--no-verify"], offline_environ, stdin_text=key + "\n")
    assert code == 0, err
    assert TokenStore(str(home)).get("anthropic:api").api_key == key
    assert_no_tokens(out + err, [key])


def test_api_key_login_non_interactive(offline_environ, home):
    """--non-interactive api-key login takes ANTHROPIC_API_KEY; without it, a usage error."""
    key = "sk-ant-api03-" + "e" * 40
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--non-interactive", "--no-verify"],
                         {**offline_environ, "ANTHROPIC_API_KEY": key})
    assert code == 0 and TokenStore(str(home)).get("anthropic:default").api_key == key
    assert_no_tokens(out + err, [key])
    code, _, err = run(["login", "anthropic", "--method", "api-key", "--non-interactive", "--replace"],
                       offline_environ)
    assert code == 2 and "ANTHROPIC_API_KEY" in err


def test_login_refuses_to_replace_an_account_silently(offline_environ, home):
    """A login whose label exists is refused (saying how to add or replace); --replace replaces it."""
    first, second = "sk-ant-api03-" + "1" * 40, "sk-ant-api03-" + "2" * 40
    assert run(["login", "anthropic", "--method", "api-key", "--no-verify"], offline_environ,
               first + "\n")[0] == 0
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--no-verify"], offline_environ,
                         second + "\n")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "anthropic:default already exists" in err and "--add --label NAME" in err and "--replace" in err
    assert TokenStore(str(home)).get("anthropic:default").api_key == first
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--add", "--label", "default",
                          "--no-verify"], offline_environ, second + "\n")
    assert code == 1 and TokenStore(str(home)).get("anthropic:default").api_key == first
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--replace", "--no-verify"],
                         offline_environ, second + "\n")
    assert code == 0 and "replaced" in out, err
    assert TokenStore(str(home)).get("anthropic:default").api_key == second
    assert_no_tokens(out + err, [first, second])


@pytest.fixture
def anthropic_fake():
    fake = listen_fake_anthropic(reactor())
    yield fake
    pytest_twisted.blockon(fake.port.stopListening())


def config_with_base_url(tmp_path, base_url):
    path = tmp_path / "proxy-config.yaml"
    path.write_text(f"providers:\n  anthropic:\n    baseUrl: {base_url}\n")
    return str(path)


@pytest_twisted.ensureDeferred
async def test_api_key_login_checks_the_key(anthropic_fake, offline_environ, home, tmp_path):
    """A new API key is checked with one GET /v1/models at the configured base URL: a working key is
    saved and said to work; a rejected one (401) is not saved; --no-verify saves without a call."""
    good, bad = "sk-ant-api03-" + "g" * 40, "sk-ant-api03-" + "b" * 40
    anthropic_fake.authorize = lambda credential: credential == good
    config = config_with_base_url(tmp_path, anthropic_fake.url)
    code, out, err = await run_async(["login", "anthropic", "--method", "api-key", "--add", "--label", "ok",
                                      "--config", config], offline_environ, stdin=io.StringIO(good + "\n"))
    assert code == 0, err
    assert "API key works" in out and TokenStore(str(home)).get("anthropic:ok").api_key == good
    [check] = anthropic_fake.requests
    assert check.method == b"GET" and check.path == b"/v1/models"
    assert check.header("x-api-key") == good and check.header("anthropic-version")

    code, out, err = await run_async(["login", "anthropic", "--method", "api-key", "--add", "--label", "no",
                                      "--config", config], offline_environ, stdin=io.StringIO(bad + "\n"))
    assert code == 1 and "not saved" in err and "rejected" in err and "401" in err and "--no-verify" in err
    assert TokenStore(str(home)).get("anthropic:no") is None
    assert_no_tokens(out + err, [good, bad])

    requests = len(anthropic_fake.requests)
    code, out, err = await run_async(["login", "anthropic", "--method", "api-key", "--add", "--label", "no",
                                      "--config", config, "--no-verify"], offline_environ,
                                     stdin=io.StringIO(bad + "\n"))
    assert code == 0 and TokenStore(str(home)).get("anthropic:no").api_key == bad
    assert len(anthropic_fake.requests) == requests
    assert_no_tokens(out + err, [good, bad])


@pytest_twisted.ensureDeferred
async def test_api_key_login_saves_with_a_warning_when_the_check_cannot_reach(offline_environ, home,
                                                                               tmp_path):
    """Nothing listening at the base URL: the key is saved, with a warning saying it was not checked."""
    key = "sk-ant-api03-" + "u" * 40
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = config_with_base_url(tmp_path, f"http://127.0.0.1:{closed}")
    code, out, err = await run_async(["login", "anthropic", "--method", "api-key", "--format", "json",
                                      "--config", config], offline_environ, stdin=io.StringIO(key + "\n"))
    assert code == 0, err
    assert "not checked" in err and "could not reach" in err and "saved anyway" in err
    assert json.loads(out)["verified"] == "unreachable"
    assert TokenStore(str(home)).get("anthropic:default").api_key == key
    assert_no_tokens(out + err, [key])
    assert_clean(err)


def test_login_bad_usage(offline_environ):
    """--add without --label, OAuth with --non-interactive, bad labels and unknown providers exit 2."""
    assert run(["login", "anthropic", "--method", "oauth", "--add"], offline_environ)[0] == 2
    code, _, err = run(["login", "anthropic", "--method", "oauth", "--non-interactive"], offline_environ)
    assert code == 2 and "browser" in err
    assert run(["login", "anthropic", "--method", "api-key", "--add", "--label", "a b"],
               offline_environ, "sk-ant-api03-xxxxxxxxxx\n")[0] == 2
    code, _, err = run(["login", "openai"], offline_environ)
    assert code == 2 and "invalid choice" in err
    assert run(["frobnicate"], offline_environ)[0] == 2


def test_login_into_a_corrupt_store_fails_before_signing_in(offline_environ, home):
    """A corrupt store is reported (file named, content not) and left untouched."""
    corrupt(home)
    before = (home / "tokens.json").read_bytes()
    code, out, err = run(["login", "anthropic", "--method", "api-key"], offline_environ,
                         "sk-ant-api03-" + "k" * 30 + "\n")
    assert code == 1 and str(home / "tokens.json") in err and "LEAK" not in err + out
    assert (home / "tokens.json").read_bytes() == before


class Child(protocol.ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()
        self._url = Deferred()

    def outReceived(self, data):
        self.out += data
        match = URL_RE.search(self.out.decode("utf-8", "replace"))
        if match and not self._url.called:
            self._url.callback(match.group(1))

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_oauth_login_in_a_real_process(fake, environ, home, tmp_path):
    """The installed entry point run as a process: the test reads the URL, signs in, pastes code#state."""
    child = Child()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.getcwd(), **environ}
    argv = [sys.executable, "-c", "import sys; from clproxy.cli.auth import main; sys.exit(main(sys.argv[1:]))",
            "login", "anthropic", "--method", "oauth", "--add", "--label", "proc"]
    reactor().spawnProcess(child, sys.executable, argv, env=env, path=str(tmp_path))
    url = await child._url.addTimeout(60, reactor())
    query = parse_qs(urlsplit(url).query)
    code = fake.issue_code(query["code_challenge"][0], query["state"][0])
    child.transport.write(f"{code}#{query['state'][0]}\n".encode())
    child.transport.closeStdin()
    exit_code = await child.ended.addTimeout(60, reactor())
    out, err = child.out.decode(), child.err.decode()
    assert exit_code == 0, err
    assert TokenStore(str(home)).get("anthropic:proc").email == "user@example.com"
    assert_no_tokens(out + err, secrets_known(fake, home))
    assert_clean(err)


# --- import -------------------------------------------------------------------------------------------


def test_import_from_claude_code(offline_environ, home, tmp_path):
    """Claude Code's credentials (ms expiry) become anthropic:<label>, with the shared-token warning."""
    expires_ms = int((time.time() + 5000) * 1000)
    cc = tmp_path / ".claude" / ".credentials.json"
    cc.parent.mkdir()
    access, refresh = "sk-ant-oat01-" + "c" * 40, "sk-ant-ort01-" + "d" * 40
    cc.write_text(json.dumps({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh,
                                                "expiresAt": expires_ms, "scopes": ["user:inference"],
                                                "subscriptionType": "max"}}))
    code, out, err = run(["import", "anthropic", "--from-claude-code", "--label", "cc"], offline_environ)
    assert code == 0, err
    record = TokenStore(str(home)).get("anthropic:cc")
    assert (record.access_token, record.refresh_token) == (access, refresh)
    assert abs(record.expires_at - expires_ms / 1000) < 1e-3 and record.subscription_type == "max"
    assert "must not both keep refreshing" in err
    assert_no_tokens(out + err, [access, refresh])
    # an explicit path works too
    code, _, _ = run(["import", "anthropic", "--from-claude-code", str(cc), "--label", "cc2"], offline_environ)
    assert code == 0 and TokenStore(str(home)).get("anthropic:cc2") is not None


def test_import_bad_inputs(offline_environ, tmp_path):
    """A missing or corrupt Claude Code file is one clear error line."""
    code, _, err = run(["import", "anthropic", "--from-claude-code", str(tmp_path / "nope.json")], offline_environ)
    assert code == 1 and "nope.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"claudeAiOauth": {"refreshToken": "sk-ant-ort01-LEAKLEAKLEAK"}}')
    code, out, err = run(["import", "anthropic", "--from-claude-code", str(bad)], offline_environ)
    assert code == 1 and "bad.json" in err and "LEAK" not in err + out


# --- list and status ----------------------------------------------------------------------------------


def seed_three(home):
    now = time.time()
    work = put_oauth(home, "work", expires_at=now + 7200)
    old = put_oauth(home, "old", expires_at=now - 60, disabled=True,
                    disabled_reason="15 consecutive refresh failures")
    api = TokenStore(str(home)).put(StoredCredential.new_api_key("api", "sk-ant-api03-" + "z" * 30, now))
    (home / "account-quotas.json").write_text(json.dumps(
        {"anthropic:work": {"five_hour": {"utilization": 0.4}, "seven_day": {"utilization": 0.12}}}))
    return work, old, api


def test_list_text_and_json(offline_environ, home):
    """list shows label, type, email, expiry, status with reason and 5h/7d utilization; JSON too."""
    work, old, api = seed_three(home)
    secrets = [work.access_token, work.refresh_token, old.access_token, api.api_key]
    code, out, err = run(["list"], offline_environ)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["KEY", "TYPE", "EMAIL"]
    row = next(line for line in lines if line.startswith("anthropic:work"))
    assert "work@example.com" in row and "40%" in row and "12%" in row and "enabled" in row
    assert "disabled: 15 consecutive refresh failures" in out
    assert_no_tokens(out + err, secrets)
    code, out, _ = run(["list", "--format", "json"], offline_environ)
    items = {a["key"]: a for a in json.loads(out)["accounts"]}
    assert items["anthropic:work"]["quota"] == {"five_hour": 0.4, "seven_day": 0.12}
    assert items["anthropic:old"]["enabled"] is False and items["anthropic:old"]["expired"] is True
    assert items["anthropic:api"]["type"] == "api-key"
    assert_no_tokens(out, secrets)
    assert run(["list", "--debug"], offline_environ)[0] == 0


def test_list_shows_legacy_and_env_fallbacks(offline_environ, home):
    """With an empty store, list shows what discovery would use: the environment's API key."""
    code, out, _ = run(["list"], {**offline_environ, "ANTHROPIC_API_KEY": "sk-ant-api03-" + "q" * 30})
    assert code == 0 and "env:ANTHROPIC_API_KEY" in out
    assert_no_tokens(out)
    code, out, _ = run(["list"], offline_environ)
    assert code == 0 and "No accounts" in out


def test_list_with_a_corrupt_store(offline_environ, home):
    """list on a corrupt store names the file and exits 1, in text and JSON."""
    corrupt(home)
    code, out, err = run(["list"], offline_environ)
    assert code == 1 and "tokens.json" in err and "LEAK" not in out + err
    code, out, err = run(["list", "--format", "json"], offline_environ)
    assert code == 1 and json.loads(out)["ok"] is False


def test_status(offline_environ, home):
    """status summarizes usable accounts (exit 0) and says when there are none (exit 1)."""
    code, out, _ = run(["status"], offline_environ)
    assert code == 1 and "not authenticated" in out
    seed_three(home)
    code, out, err = run(["status", "anthropic"], offline_environ)
    assert code == 0 and "2 of 3 accounts usable" in out
    code, out, _ = run(["status", "--format", "json"], offline_environ)
    data = json.loads(out)["providers"]["anthropic"]
    assert data["authenticated"] and data["usable"] == 2 and data["accounts"] == 3
    assert_no_tokens(out)
    assert run(["status", "gemini"], offline_environ)[0] == 2
    corrupt(home)
    code, _, err = run(["status"], offline_environ)
    assert code == 1 and "tokens.json" in err


# --- refresh ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refresh_command(fake, environ, home):
    """refresh anthropic --label L forces a refresh: a new pair is stored, nothing secret printed."""
    pair = fake.seed_tokens()
    put_oauth(home, "work", expires_at=time.time() + 20000, access=pair.access_token, refresh=pair.refresh_token)
    code, out, err = await run_async(["refresh", "anthropic", "--label", "work"], environ)
    assert code == 0, err
    record = TokenStore(str(home)).get("anthropic:work")
    assert record.refresh_token != pair.refresh_token and record.refresh_token in fake.live_refresh_tokens
    assert fake.refresh_calls == 1 and "refreshed anthropic:work" in out
    assert_no_tokens(out + err, secrets_known(fake, home))


@pytest_twisted.ensureDeferred
async def test_refresh_all_reports_failures(fake, environ, home):
    """Without --label every OAuth account is refreshed; a dead one is reported, disabled, exit 1."""
    pair = fake.seed_tokens()
    put_oauth(home, "good", expires_at=time.time() + 20000, access=pair.access_token, refresh=pair.refresh_token)
    put_oauth(home, "dead", expires_at=time.time() + 20000, refresh="sk-ant-ort01-" + "x" * 30)
    code, out, err = await run_async(["refresh", "anthropic", "--format", "json"], environ)
    assert code == 1
    results = {r["key"]: r for r in json.loads(out)["results"]}
    assert results["anthropic:good"]["ok"] and not results["anthropic:dead"]["ok"]
    assert results["anthropic:dead"]["disabled"] is True
    assert TokenStore(str(home)).get("anthropic:dead").disabled
    assert_no_tokens(out + err, secrets_known(fake, home))


@pytest_twisted.ensureDeferred
async def test_refresh_unknown_label_and_corrupt_store(fake, environ, home):
    """refresh with an unknown label, or on a corrupt store, is one error line and exit 1."""
    put_oauth(home, "work", expires_at=time.time() + 20000)
    code, _, err = await run_async(["refresh", "anthropic", "--label", "nobody"], environ)
    assert code == 1 and "anthropic:nobody" in err and "Traceback" not in err
    corrupt(home)
    code, out, err = await run_async(["refresh", "anthropic"], environ)
    assert code == 1 and "tokens.json" in err and "LEAK" not in out + err
    assert fake.refresh_calls == 0


def redis_config(tmp_path, url, prefix):
    """A configuration file whose state section shares tokens in Redis (as a fleet's does)."""
    path = tmp_path / "fleet-config.json"
    path.write_text(json.dumps({"state": {"backend": "redis", "url": url, "prefix": prefix}}))
    return str(path)


@pytest_twisted.ensureDeferred
async def test_refresh_in_a_redis_fleet_starts_from_and_publishes_to_redis(fake, environ, home, tmp_path,
                                                                          redis_server):  # noqa: F811
    """With state.backend redis, `auth refresh` refreshes as an instance does: under the shared lock,
    from the live record in Redis (another instance rotated: this machine's file holds a spent refresh
    token) and publishing its rotation there, so no instance spends a rotated refresh token."""
    from clproxy.state.redis import RedisStateStore

    spent = fake.seed_tokens()
    put_oauth(home, "work", expires_at=time.time() + 20000, access=spent.access_token,
              refresh=spent.refresh_token)
    http = HTTPClient(Agent(reactor(), pool=HTTPConnectionPool(reactor(), persistent=False)))
    from clproxy.accounts import oauth as flows
    live = await flows.refresh_tokens(http, fake.endpoints(), spent.refresh_token)  # another instance
    stale = TokenStore(str(home)).get("anthropic:work")
    prefix = unique_prefix()
    redis = RedisStateStore(redis_server.url, reactor(), prefix=prefix)
    await redis.connect()
    try:
        await redis.put_token_record("anthropic:work", stale.rotated(live, time.time()).to_json())
        code, out, err = await run_async(["refresh", "anthropic", "--label", "work", "--config",
                                          redis_config(tmp_path, redis_server.url, prefix)], environ)
        assert code == 0, err
        # the live record was adopted (its access token is fresh: no call needed), not the dead one spent
        assert fake.invalid_grants == 0 and fake.refresh_calls == 1
        assert TokenStore(str(home)).get("anthropic:work").refresh_token == live.refresh_token
        code, out2, err2 = await run_async(["refresh", "anthropic", "--label", "work", "--config",
                                            redis_config(tmp_path, redis_server.url, prefix)], environ)
        assert code == 0, err2
        assert fake.invalid_grants == 0 and fake.refresh_calls == 2  # now a rotation of its own
        on_disk = TokenStore(str(home)).get("anthropic:work")
        assert on_disk.refresh_token in fake.live_refresh_tokens and not on_disk.disabled
        assert (await redis.get_token_record("anthropic:work"))["refresh_token"] == on_disk.refresh_token
        assert_no_tokens(out + err + out2 + err2, secrets_known(fake, home))
    finally:
        await redis.close()


@pytest_twisted.ensureDeferred
async def test_refresh_in_a_redis_fleet_without_redis_refreshes_nothing(fake, environ, home, tmp_path):
    """With state.backend redis and Redis unreachable, `auth refresh` says so in one line and spends
    no refresh token (a rotation the other instances cannot see would log them out)."""
    from redis_server import free_port

    put_oauth(home, "work", expires_at=time.time() + 20000)
    config = redis_config(tmp_path, f"redis://:pw@127.0.0.1:{free_port()}/0", unique_prefix())
    code, out, err = await run_async(["refresh", "anthropic", "--config", config], environ)
    assert code == 1 and fake.refresh_calls == 0
    assert "not refreshed" in err and "Redis" in err and "Traceback" not in err
    assert ":pw@" not in out + err and len(err.strip().splitlines()) == 1


# --- cleanup, enable, logout --------------------------------------------------------------------------


def seed_cleanup(home):
    now = time.time()
    put_oauth(home, "healthy", expires_at=now + 9000)
    put_oauth(home, "expired", expires_at=now - 10, refresh=None)
    put_oauth(home, "refreshable", expires_at=now - 10)
    put_oauth(home, "off", expires_at=now + 9000, disabled=True, disabled_reason="refresh token rejected")


def test_cleanup_asks_and_respects_no(offline_environ, home):
    """cleanup without --force lists what it would remove and keeps everything on 'n'."""
    seed_cleanup(home)
    code, out, _ = run(["cleanup"], offline_environ, "n\n")
    assert code == 0 and "anthropic:expired" in out and "anthropic:off" in out and "Nothing removed" in out
    assert len(TokenStore(str(home)).load()) == 4


def test_cleanup_removes_on_yes_and_force(offline_environ, home):
    """'y' (or --force) removes disabled and expired-unrefreshable accounts, and only those."""
    seed_cleanup(home)
    code, out, _ = run(["cleanup"], offline_environ, "y\n")
    assert code == 0
    assert set(TokenStore(str(home)).load()) == {"anthropic:healthy", "anthropic:refreshable"}
    seed_cleanup(home)
    code, out, _ = run(["cleanup", "--force", "--format", "json"], offline_environ)
    assert code == 0 and sorted(json.loads(out)["removed"]) == ["anthropic:expired", "anthropic:off"]
    code, out, _ = run(["cleanup", "--force"], offline_environ)
    assert code == 0 and "Nothing to clean up" in out


def test_cleanup_on_a_corrupt_store(offline_environ, home):
    """cleanup refuses to touch a corrupt store."""
    corrupt(home)
    before = (home / "tokens.json").read_bytes()
    code, _, err = run(["cleanup", "--force"], offline_environ)
    assert code == 1 and "tokens.json" in err
    assert (home / "tokens.json").read_bytes() == before


def test_enable(offline_environ, home):
    """enable LABEL re-enables a disabled account and resets its failures; unknown labels fail."""
    put_oauth(home, "work", expires_at=time.time() + 9000, disabled=True,
              disabled_reason="15 consecutive refresh failures", refresh_failures=15)
    code, out, _ = run(["enable", "work"], offline_environ)
    record = TokenStore(str(home)).get("anthropic:work")
    assert code == 0 and "enabled anthropic:work" in out
    assert not record.disabled and record.refresh_failures == 0
    code, _, err = run(["enable", "ghost"], offline_environ)
    assert code == 1 and "anthropic:ghost" in err
    corrupt(home)
    assert run(["enable", "work"], offline_environ)[0] == 1


def test_logout(offline_environ, home):
    """logout LABEL removes the account; unknown labels and a corrupt store fail with exit 1."""
    put_oauth(home, "work", expires_at=time.time() + 9000)
    put_oauth(home, "other", expires_at=time.time() + 9000)
    code, out, _ = run(["logout", "anthropic:work"], offline_environ)
    assert code == 0 and set(TokenStore(str(home)).load()) == {"anthropic:other"}
    code, out, err = run(["logout", "work", "--format", "json"], offline_environ)
    assert code == 1 and json.loads(out)["ok"] is False and "anthropic:work" in err
    corrupt(home)
    code, _, err = run(["logout", "other"], offline_environ)
    assert code == 1 and "tokens.json" in err


def test_help_and_usage_errors_never_trace(offline_environ):
    """--help exits 0 on stdout; missing arguments exit 2 with usage on stderr, no traceback."""
    code, out, _ = run(["--help"], offline_environ)
    assert code == 0 and "login" in out
    code, _, err = run([], offline_environ)
    assert code == 2 and "usage" in err
    code, _, err = run(["enable"], offline_environ)
    assert code == 2 and "label" in err
    secret = "sk-ant-oat01-" + "p" * 40
    code, out, err = run(["status", secret], offline_environ)
    assert code == 2 and "invalid choice" in err
    assert_no_tokens(out + err, [secret])


# --- per-account limits (issue 13) --------------------------------------------------------------------


def test_login_with_limits_and_relogin_keeps_them(offline_environ, home):
    """login --exclude-model (repeatable) --max-concurrent stores them; a --replace login without the
    flags keeps them; list shows them (text and JSON); the key is never printed."""
    key = "sk-ant-api03-" + "m" * 40
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--add", "--label", "api", "--no-verify",
                          "--exclude-model", "claude-opus-*", "--exclude-model", "*-haiku-*",
                          "--max-concurrent", "2"], offline_environ, stdin_text=key + "\n")
    assert code == 0, err
    record = TokenStore(str(home)).get("anthropic:api")
    assert record.excluded_models == ("claude-opus-*", "*-haiku-*") and record.max_concurrent == 2
    assert TokenStore(str(home)).accounts()[0].max_concurrent == 2
    code, out, err = run(["login", "anthropic", "--method", "api-key", "--label", "api", "--replace",
                          "--no-verify"], offline_environ, stdin_text=key + "\n")
    assert code == 0, err
    record = TokenStore(str(home)).get("anthropic:api")
    assert record.excluded_models == ("claude-opus-*", "*-haiku-*") and record.max_concurrent == 2
    code, out, err = run(["list"], offline_environ)
    assert code == 0 and "LIMITS" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("anthropic:api"))
    assert "max 2; excludes claude-opus-*,*-haiku-*" in row
    code, out, _ = run(["list", "--format", "json"], offline_environ)
    item = json.loads(out)["accounts"][0]
    assert item["excluded_models"] == ["claude-opus-*", "*-haiku-*"] and item["max_concurrent"] == 2
    assert_no_tokens(out + err, [key])


@pytest.mark.parametrize("value", ["0", "-1", "two", "none"])
def test_login_rejects_a_bad_max_concurrent(offline_environ, home, value):
    """--max-concurrent must be a positive integer: a one-line usage error, nothing stored."""
    code, _, err = run(["login", "anthropic", "--method", "api-key", "--non-interactive", "--no-verify",
                        "--max-concurrent", value], {**offline_environ, "ANTHROPIC_API_KEY": "sk-ant-api03-xx"})
    assert code == 2 and "--max-concurrent" in err and "positive integer" in err
    assert TokenStore(str(home)).get("anthropic:default") is None


def test_set_changes_limits(offline_environ, home):
    """auth set: replace the patterns, clear them, set and remove the cap; each alone keeps the other."""
    put_oauth(home, "work", expires_at=time.time() + 9000)
    code, out, err = run(["set", "work", "--exclude-model", "claude-opus-*", "--max-concurrent", "3"],
                         offline_environ)
    assert code == 0, err
    assert "anthropic:work: max 3; excludes claude-opus-*" in out
    record = TokenStore(str(home)).get("anthropic:work")
    assert (record.excluded_models, record.max_concurrent) == (("claude-opus-*",), 3)
    assert run(["set", "anthropic:work", "--max-concurrent", "none"], offline_environ)[0] == 0
    record = TokenStore(str(home)).get("anthropic:work")
    assert (record.excluded_models, record.max_concurrent) == (("claude-opus-*",), None)
    assert run(["set", "work", "--exclude-model", "a*", "--exclude-model", "b*"], offline_environ)[0] == 0
    assert TokenStore(str(home)).get("anthropic:work").excluded_models == ("a*", "b*")
    code, out, _ = run(["set", "work", "--no-excluded-models", "--format", "json"], offline_environ)
    assert code == 0 and json.loads(out)["excluded_models"] == [] and json.loads(out)["max_concurrent"] is None
    record = TokenStore(str(home)).get("anthropic:work")
    assert record.excluded_models == () and record.access_token.startswith("sk-ant-oat01-")
    assert_no_tokens(out, [record.access_token, record.refresh_token])


def test_set_errors_are_one_line(offline_environ, home):
    """auth set: nothing to change, contradictory flags, bad values, unknown accounts: one line, no trace."""
    put_oauth(home, "work", expires_at=time.time() + 9000)
    code, _, err = run(["set", "work"], offline_environ)
    assert code == 2 and "nothing to change" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["set", "work", "--exclude-model", "x", "--no-excluded-models"], offline_environ)
    assert code == 2 and "not both" in err
    code, _, err = run(["set", "work", "--max-concurrent", "0"], offline_environ)
    assert code == 2 and "positive integer or 'none'" in err
    code, _, err = run(["set", "work", "--exclude-model", " "], offline_environ)
    assert code == 2 and "must not be empty" in err
    code, _, err = run(["set", "ghost", "--max-concurrent", "1"], offline_environ)
    assert code == 1 and "anthropic:ghost" in err and len(err.strip().splitlines()) == 1
    assert TokenStore(str(home)).get("anthropic:work").max_concurrent is None


def test_clproxys_own_help_names_every_auth_command():
    """`clproxy --help` lists the auth commands in one line: each one `clproxy auth` has (it once
    left out `set`, which the README names)."""
    import io
    import re
    from clproxy.cli import auth as auth_cli
    from clproxy.cli.main import USAGE
    parser = auth_cli._parser(io.StringIO(), io.StringIO())
    commands = next(action for action in parser._actions if action.dest == "command").choices
    listed = re.search(r"auth \.\.\. +manage accounts \(([^)]*)\)", USAGE).group(1).split(", ")
    assert listed == list(commands)
