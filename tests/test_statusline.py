"""`clproxy statusline` and the daemon's `GET /session/{id}` it reads: a real daemon (in-process and under
`twistd -n claudeproxy`), the shipped fake upstream, and the command run as a real subprocess."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from clproxy.cli import statusline
from clproxy.team.keystore import KeyStore
from clproxy.testing.anthropic import unified_headers
from conftest import accounts_config
from helpers import in_thread, post, request_body

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION = "0b4e2f5c-1d2e-4f3a-9b8c-7d6e5f4a3b21"
FIVE_HOUR, SEVEN_DAY = 0.62, 0.18


def claude_code_json(session=SESSION) -> str:
    """What Claude Code pipes to a statusLine command."""
    return json.dumps({"hook_event_name": "Status", "session_id": session, "transcript_path": "/tmp/t.jsonl",
                       "cwd": "/work", "model": {"id": "claude-sonnet-4-5", "display_name": "Sonnet 4.5"},
                       "workspace": {"current_dir": "/work", "project_dir": "/work"}, "version": "2.0.0"})


def command_env(home, **extra) -> dict:
    """The environment Claude Code would give the command: this tree on the path, no stray keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLPROXY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env["CLPROXY_HOME"] = str(home)
    env.update(extra)
    return env


def run_statusline(stdin: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -m clproxy statusline` as Claude Code runs it (blocking: call through in_thread)."""
    return subprocess.run([sys.executable, "-m", "clproxy", "statusline", *args], input=stdin.encode(),
                          capture_output=True, timeout=30, env=env)


def shown(result: subprocess.CompletedProcess) -> str:
    """The one line a status line shows, after checking it is the whole, quiet, successful output."""
    assert result.returncode == 0, result
    assert result.stderr == b"", result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def send_in_session(url: str, session=SESSION, headers=None):
    """One real Messages request through the proxy, in ``session`` (Claude Code's header)."""
    all_headers = {b"x-claude-code-session-id": [session.encode()]}
    all_headers.update(headers or {})
    status, _, body = await post(url + "/v1/messages", request_body(), all_headers)
    assert status == 200, body
    return status


async def get(url: str, headers=None):
    status, response_headers, body = await post(url, None, headers, method=b"GET")
    return status, body


def script_quota(fake, credential="key-work"):
    fake.script(credential, headers=unified_headers(five_hour=FIVE_HOUR, seven_day=SEVEN_DAY,
                                                    reset=time.time() + 3600))


# --- the endpoint --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_session_endpoint_names_the_bound_account_and_its_windows(fake, start_proxy):
    """After a request in a session, /session/{id} names its account, state, the fake's windows and the pool."""
    proxy = start_proxy(accounts_config(fake, "work", "spare"))
    script_quota(fake)
    await send_in_session(proxy.url)
    status, body = await get(f"{proxy.url}/session/{SESSION}")
    assert status == 200, body
    document = json.loads(body)
    assert document["session"] == SESSION
    assert document["account"]["name"] == "work" and document["account"]["state"] == "ok"
    assert set(document["account"]) == {"name", "kind", "state"}
    assert set(document["quota"]) == {"5h", "7d"}
    assert document["quota"]["5h"]["utilization"] == pytest.approx(FIVE_HOUR)
    assert document["quota"]["7d"]["utilization"] == pytest.approx(SEVEN_DAY)
    assert isinstance(document["quota"]["5h"]["reset"], (int, float))
    assert document["pool"] == {"ready": 2, "total": 2}
    assert "key-work" not in body.decode()


@pytest_twisted.ensureDeferred
async def test_session_endpoint_for_an_unbound_session(fake, start_proxy):
    """A session with no binding: account null, no quota, the pool's readiness."""
    proxy = start_proxy(accounts_config(fake, "work", "spare"))
    status, body = await get(f"{proxy.url}/session/{SESSION}")
    assert status == 200
    assert json.loads(body) == {"session": SESSION, "account": None, "quota": {},
                                "pool": {"ready": 2, "total": 2}}


@pytest_twisted.ensureDeferred
async def test_reading_a_session_does_not_bind_or_keep_it(fake, start_proxy):
    """Asking about a session is not a request in it: no binding appears."""
    proxy = start_proxy(accounts_config(fake, "work"))
    await get(f"{proxy.url}/session/{SESSION}")
    assert await proxy.dispatcher.affinity.sessions_by_account() == {}


@pytest_twisted.ensureDeferred
async def test_other_path_shapes_are_anthropic_404s(fake, start_proxy):
    """/session, /session/, a nested path and an invalid id are Anthropic-shaped 404s; POST is a 405."""
    proxy = start_proxy(accounts_config(fake, "work"))
    for path in ("/session", "/session/", f"/session/{SESSION}/more", "/session/a%20b",
                 "/session/" + "x" * 300):
        status, body = await get(proxy.url + path)
        assert status == 404, path
        assert json.loads(body)["type"] == "error" and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = await post(f"{proxy.url}/session/{SESSION}", b"{}")
    assert status == 405 and json.loads(body)["type"] == "error"


# --- the command, against a daemon in this process -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_statusline_shows_the_account_and_windows_via_anthropic_base_url(fake, start_proxy, tmp_path):
    """Found through ANTHROPIC_BASE_URL, the line names the session's account and the fake's 5h/7d."""
    proxy = start_proxy(accounts_config(fake, "work", "spare"))
    script_quota(fake)
    await send_in_session(proxy.url)
    env = command_env(tmp_path / "elsewhere", ANTHROPIC_BASE_URL=proxy.url)
    result = await in_thread(run_statusline, claude_code_json(), env)
    assert shown(result) == "clproxy: work · 5h 62% · 7d 18%"


@pytest_twisted.ensureDeferred
async def test_statusline_for_an_unbound_session_says_how_many_accounts_are_ready(fake, start_proxy, tmp_path):
    """A session with no account yet: the pool's readiness, short and true."""
    config = accounts_config(fake, "work", "spare", "off")
    config["accounts"]["anthropic"][2]["enabled"] = False
    proxy = start_proxy(config)
    env = command_env(tmp_path, ANTHROPIC_BASE_URL=proxy.url)
    result = await in_thread(run_statusline, claude_code_json(), env)
    assert shown(result) == "clproxy: 2 of 3 accounts ready"


@pytest_twisted.ensureDeferred
async def test_statusline_finds_the_daemon_through_its_state_file(fake, start_proxy, tmp_path):
    """Without ANTHROPIC_BASE_URL the command reads $CLPROXY_HOME/proxy-state.json."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "work"), environ={"CLPROXY_HOME": str(home)},
                        **{"claude-settings": "off", "no-guard": True})
    assert (home / "proxy-state.json").exists()
    script_quota(fake)
    await send_in_session(proxy.url)
    result = await in_thread(run_statusline, claude_code_json(), command_env(home))
    assert shown(result) == "clproxy: work · 5h 62% · 7d 18%"


@pytest_twisted.ensureDeferred
async def test_an_anthropic_base_url_is_not_taken_for_the_proxy(fake, start_proxy, tmp_path):
    """ANTHROPIC_BASE_URL naming Anthropic itself: the state file's daemon is asked instead."""
    home = tmp_path / "home"
    start_proxy(accounts_config(fake, "work"), environ={"CLPROXY_HOME": str(home)},
                **{"claude-settings": "off", "no-guard": True})
    env = command_env(home, ANTHROPIC_BASE_URL="https://api.anthropic.com")
    result = await in_thread(run_statusline, claude_code_json(), env)
    assert shown(result) == "clproxy: 1 of 1 account ready"


@pytest_twisted.ensureDeferred
async def test_malformed_input_is_a_short_line_and_exit_0(fake, start_proxy, tmp_path):
    """Empty stdin, broken JSON, a non-object, a bad or missing session id: one short line, exit 0."""
    proxy = start_proxy(accounts_config(fake, "work"))
    env = command_env(tmp_path, ANTHROPIC_BASE_URL=proxy.url)
    for stdin in ("", "{not json", "[1, 2]", '{"session_id": "has spaces in it"}', '{"model": {}}',
                  '{"session_id": 42}', "\x00\xff" * 10, "[" * 100000):
        result = await in_thread(run_statusline, stdin, env)
        assert shown(result) == "clproxy: no session yet", stdin[:40]


def test_daemon_down_is_a_short_line_and_exit_0(tmp_path):
    """Nothing listening (by ANTHROPIC_BASE_URL or by the state file): `proxy not running`, exit 0."""
    port = free_port()
    for env in (command_env(tmp_path, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}"),
                command_env(tmp_path / "nohome", ANTHROPIC_BASE_URL="http://127.0.0.1:1")):
        for stdin in (claude_code_json(), "", "garbage"):
            assert shown(run_statusline(stdin, env)) == "clproxy: proxy not running"
    home = tmp_path / "stale"
    home.mkdir()
    (home / "proxy-state.json").write_text(json.dumps({"pid": 999999, "host": "127.0.0.1", "port": port}))
    assert shown(run_statusline(claude_code_json(), command_env(home))) == "clproxy: proxy not running"
    (home / "proxy-state.json").write_text("{broken")
    result = run_statusline(claude_code_json(), command_env(home, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}"))
    assert shown(result) == "clproxy: proxy not running"


def test_a_proxy_that_never_answers_times_out_quickly(tmp_path):
    """A port that accepts but never answers: a short line within about the timeout, exit 0."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = "http://127.0.0.1:%d" % listener.getsockname()[1]
        started = time.monotonic()
        result = run_statusline(claude_code_json(), command_env(tmp_path, ANTHROPIC_BASE_URL=url))
        elapsed = time.monotonic() - started
    assert shown(result) == "clproxy: proxy not answering"
    assert elapsed < 10


def test_help_and_no_twisted_on_the_status_line_path(tmp_path):
    """--help documents the command; running it imports no Twisted (it runs after every message)."""
    env = command_env(tmp_path, ANTHROPIC_BASE_URL=f"http://127.0.0.1:{free_port()}")
    help_text = subprocess.run([sys.executable, "-m", "clproxy", "statusline", "--help"], capture_output=True,
                               timeout=30, env=env)
    assert help_text.returncode == 0 and b"statusLine" in help_text.stdout
    assert b"statusline" in subprocess.run([sys.executable, "-m", "clproxy", "--help"], capture_output=True,
                                           timeout=30, env=env).stdout
    timed = subprocess.run([sys.executable, "-X", "importtime", "-m", "clproxy", "statusline"],
                           input=claude_code_json().encode(), capture_output=True, timeout=30, env=env)
    assert timed.returncode == 0 and timed.stdout == b"clproxy: proxy not running\n"
    imported = [line.split("|")[-1].strip() for line in timed.stderr.decode().splitlines()]
    assert not [name for name in imported if name.split(".")[0] in ("twisted", "treq", "zope")]


def test_describe_never_trusts_the_answer():
    """Odd documents still give a short line: unknown windows omitted, names cleaned, states said."""
    assert statusline.describe({"account": {"name": "work", "state": "ok"}, "quota": {}}) == "work"
    assert statusline.describe({"account": {"name": "w\x1b[31mork", "state": "cooling"},
                                "quota": {"5h": {"utilization": 1.0}, "7d": {"utilization": None}}}) \
        == "w[31mork (cooling) · 5h 100%"
    assert statusline.describe({"account": None, "pool": {"ready": 0, "total": 0}}) == "no accounts"
    assert statusline.describe({"account": None, "pool": {"ready": 1, "total": 1}}) == "1 of 1 account ready"
    assert statusline.describe([]) == "not a clproxy answer"
    assert statusline.describe({"account": None, "pool": "x"}) == "no account bound yet"


# --- team mode ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_team_mode_needs_a_client_key_and_never_shows_it(fake, start_proxy, tmp_path):
    """With client keys: /session answers a member's key (not only admin), 401 without; the command sends
    the key Claude Code has (x-api-key or Bearer), says so in a short line when refused, never prints it."""
    key, _ = KeyStore(str(tmp_path / "home")).create("alice")
    proxy = start_proxy(accounts_config(fake, "work"))
    script_quota(fake)
    await send_in_session(proxy.url, headers={b"x-api-key": [key.encode()]})

    status, body = await get(f"{proxy.url}/session/{SESSION}", headers={b"x-api-key": [b"nope"]})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert key.encode() not in body
    status, body = await get(f"{proxy.url}/session/{SESSION}", headers={b"x-api-key": [key.encode()]})
    assert status == 200 and json.loads(body)["account"]["name"] == "work"

    base = command_env(tmp_path, ANTHROPIC_BASE_URL=proxy.url)
    expected = "clproxy: work · 5h 62% · 7d 18%"
    for env in (dict(base, ANTHROPIC_API_KEY=key), dict(base, ANTHROPIC_AUTH_TOKEN=key)):
        result = await in_thread(run_statusline, claude_code_json(), env)
        assert shown(result) == expected
        assert key.encode() not in result.stdout + result.stderr
    result = await in_thread(run_statusline, claude_code_json(), base)
    assert shown(result) == "clproxy: needs a client key"
    wrong = key[:-4] + "xxxx"
    result = await in_thread(run_statusline, claude_code_json(), dict(base, ANTHROPIC_API_KEY=wrong))
    assert shown(result) == "clproxy: client key refused"
    assert wrong.encode() not in result.stdout + result.stderr


# --- a daemon started by `twistd -n claudeproxy` -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_statusline_against_a_twistd_daemon(fake, tmp_path):
    """`twistd -n claudeproxy` writes its state file; the command finds it there and shows the account."""
    home = tmp_path / "home"
    config = tmp_path / "proxy-config.json"
    config.write_text(json.dumps(accounts_config(fake, "work")))
    port = free_port()
    env = command_env(home, CLPROXY_CLAUDE_SETTINGS="off")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.Popen([twistd, "-n", "--pidfile=", "claudeproxy", "--port", str(port),
                                "--config", str(config), "--no-guard"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        up = False
        for _ in range(300):
            if process.poll() is not None:
                break
            try:
                up = (await get(url + "/health"))[0] == 200
            except Exception:
                up = False
            if up:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert up, "the twistd daemon did not answer /health"
        assert (home / "proxy-state.json").exists()
        script_quota(fake)
        await send_in_session(url)
        result = await in_thread(run_statusline, claude_code_json(), command_env(home))
        assert shown(result) == "clproxy: work · 5h 62% · 7d 18%"
        unbound = await in_thread(run_statusline, claude_code_json("another-session"), command_env(home))
        assert shown(unbound) == "clproxy: 1 of 1 account ready"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await in_thread(process.communicate, timeout=30)
    assert b"Traceback" not in output
    result = await in_thread(run_statusline, claude_code_json(), command_env(home))
    assert shown(result) == "clproxy: proxy not running"
