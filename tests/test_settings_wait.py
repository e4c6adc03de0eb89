"""Claude Code's settings wait for a usable account: a proxy without one would answer 401 to everything.

Unit level: a real Lifecycle, AccountDirectory and TokenStore on temp files, polled on a task.Clock.
Daemon level: makeService with a real settings.json and token store, as `clproxy proxy start` runs it.
"""

import json
import time

import pytest
from twisted.application import service
from twisted.internet import task

from clproxy.daemon import runstate
from clproxy.accounts.directory import AccountDirectory
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.integrations import claude_settings

USER_SETTINGS = {"model": "opus", "env": {"FOO": "bar"}}
WAITING = "no usable account: Claude Code's settings"


def add_api_key(store: TokenStore, label: str = "work") -> None:
    """What `clproxy auth login anthropic --method api-key` leaves in the token store."""
    store.put(StoredCredential.new_api_key(label, f"sk-ant-api03-{label}", time.time()))


class Harness:
    """A daemon's top service holding a Lifecycle and the settings gate over a real token store."""

    def __init__(self, tmp_path):
        self.settings = tmp_path / "claude" / "settings.json"
        self.settings.parent.mkdir()
        self.settings.write_text(json.dumps(USER_SETTINGS))
        self.original = self.settings.read_bytes()
        self.clock = task.Clock()
        self.store = TokenStore(str(tmp_path / "home"))
        self.directory = AccountDirectory(store=self.store, clock=self.clock, environ={},
                                          base_url="http://upstream")
        self.top = service.MultiService()
        self.lifecycle = runstate.Lifecycle(
            path=str(tmp_path / "home" / "proxy-state.json"), address=lambda: ("127.0.0.1", 4321),
            strategy=lambda: "fill-first", settings_path=str(self.settings), tool_search="true",
            guard=False)
        self.lifecycle.setServiceParent(self.top)
        self.gate = claude_settings.SetOnceUsable(self.lifecycle, self.directory, self.clock)
        self.gate.setServiceParent(self.top)

    def env(self):
        return json.loads(self.settings.read_text()).get("env")

    def recorded(self):
        return runstate.read_state(self.lifecycle.path)["claudeSettings"]


def test_no_account_leaves_settings_alone_until_one_is_added(tmp_path, logs):
    """Started without an account: settings.json is byte-for-byte untouched and one line says why;
    an account added later (a login in another terminal) sets them at the next check."""
    h = Harness(tmp_path)
    h.top.startService()
    assert h.settings.read_bytes() == h.original
    assert h.recorded() is None
    waiting = [line for line in logs if WAITING in line]
    assert len(waiting) == 1 and "left unchanged" in waiting[0]
    assert str(h.settings) in waiting[0] and "clproxy auth login" in waiting[0]
    h.clock.advance(5)
    assert h.settings.read_bytes() == h.original  # still nothing to point at

    add_api_key(h.store)
    h.clock.advance(1.0)
    assert h.env() == {"FOO": "bar", "ANTHROPIC_BASE_URL": "http://127.0.0.1:4321",
                       "ENABLE_TOOL_SEARCH": "true"}
    assert h.recorded()["set"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:4321"
    assert h.clock.getDelayedCalls() == []  # done waiting: no more polling
    assert len([line for line in logs if WAITING in line]) == 1

    h.top.stopService()  # the lifecycle undoes exactly what was set
    assert json.loads(h.settings.read_text()) == USER_SETTINGS


def test_an_account_at_start_sets_the_settings_at_once(tmp_path, logs):
    """With an account already there the settings are set at start, as before; nothing polls."""
    h = Harness(tmp_path)
    add_api_key(h.store)
    h.directory.refresh()
    h.top.startService()
    assert h.env()["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:4321"
    assert h.recorded()["set"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:4321"
    assert h.clock.getDelayedCalls() == [] and not any(WAITING in line for line in logs)
    h.top.stopService()
    assert json.loads(h.settings.read_text()) == USER_SETTINGS


def test_stopping_while_waiting_touches_nothing(tmp_path):
    """Stopped before any account appeared: the settings were never touched, no timer is left."""
    h = Harness(tmp_path)
    h.top.startService()
    h.top.stopService()
    assert h.clock.getDelayedCalls() == []
    add_api_key(h.store)
    h.directory.refresh()  # a late discovery does not point Claude Code at a stopped proxy
    assert h.settings.read_bytes() == h.original


# --- the daemon as `clproxy proxy start` builds it ---------------------------------------------------


@pytest.fixture
def daemon(start_proxy, tmp_path):
    """Start makeService with the lifecycle on (as parsed options have it) and a real settings.json."""
    settings = tmp_path / "claude-settings.json"
    settings.write_text(json.dumps(USER_SETTINGS))
    home = tmp_path / "home"

    def start(**extra):
        return start_proxy(config=extra.pop("config", None), environ={"CLPROXY_HOME": str(home)},
                           **{"claude-settings": str(settings), "tool-search": "true", "no-guard": True})

    start.settings, start.store = settings, TokenStore(str(home))
    return start


def test_daemon_without_account_waits_then_sets_settings(daemon, logs):
    """makeService with no account: settings untouched and the line logged; a login then sets them."""
    original = daemon.settings.read_bytes()
    proxy = daemon()
    assert daemon.settings.read_bytes() == original
    assert any(WAITING in line for line in logs)
    add_api_key(daemon.store)
    proxy.service.directory.refresh()  # what the gate's next poll does
    assert json.loads(daemon.settings.read_text())["env"]["ANTHROPIC_BASE_URL"] == proxy.url


def test_daemon_with_account_sets_settings_at_once(daemon, logs):
    """makeService with an account in the token store: Claude Code is pointed at the proxy at start."""
    add_api_key(daemon.store)
    proxy = daemon()
    assert json.loads(daemon.settings.read_text())["env"]["ANTHROPIC_BASE_URL"] == proxy.url
    assert not any(WAITING in line for line in logs)


def test_proxy_start_process_waits_for_a_login(tmp_path):
    """`clproxy proxy start` as a real process: without an account the terminal gets the one line and
    settings.json stays as it was; a login meanwhile points Claude Code at the proxy; stop restores."""
    from test_ops_cli import Daemon, wait_for

    d = Daemon(tmp_path)
    d.settings.write_text(json.dumps(USER_SETTINGS))
    original = d.settings.read_bytes()
    try:
        d.start("--no-guard")
        assert wait_for(lambda: WAITING in d.output(), timeout=10), d.output()
        assert d.settings.read_bytes() == original
        d.add_account()
        url = f"http://127.0.0.1:{d.port}"
        assert wait_for(lambda: (d.settings_document()["env"].get("ANTHROPIC_BASE_URL") == url), timeout=10)
        assert d.stop() == 0
        assert d.settings_document() == USER_SETTINGS and "Traceback" not in d.output()
    finally:
        d.cleanup()


# --- team mode: client keys ---------------------------------------------------------------------------

KEYS_HELD_BACK = "client keys exist: Claude Code's settings"


def test_daemon_with_client_keys_leaves_settings_alone_and_says_what_claude_code_needs(daemon, logs):
    """With client keys the proxy answers only a request carrying one: pointed at it without one,
    Claude Code got 401 on every request. The settings stay byte for byte and one line says what
    to give Claude Code (never a key: the proxy keeps only their hashes)."""
    from clproxy.team.keystore import KeyStore
    add_api_key(daemon.store)
    key, _ = KeyStore(str(daemon.settings.parent / "home")).create("alice")
    original = daemon.settings.read_bytes()
    daemon()
    assert daemon.settings.read_bytes() == original
    line = next(line for line in logs if KEYS_HELD_BACK in line)
    assert "ANTHROPIC_AUTH_TOKEN=clp_..." in line and "ANTHROPIC_BASE_URL=" in line and key not in line


def test_daemon_with_client_keys_points_claude_code_that_holds_one_at_the_proxy(daemon, logs):
    """Settings that already give Claude Code a client key are pointed at the proxy as before."""
    from clproxy.team.keystore import KeyStore
    add_api_key(daemon.store)
    key, _ = KeyStore(str(daemon.settings.parent / "home")).create("alice")
    daemon.settings.write_text(json.dumps({"env": {"ANTHROPIC_AUTH_TOKEN": key}}))
    proxy = daemon()
    env = json.loads(daemon.settings.read_text())["env"]
    assert env["ANTHROPIC_BASE_URL"] == proxy.url and env["ANTHROPIC_AUTH_TOKEN"] == key
    assert not any(KEYS_HELD_BACK in line for line in logs)


def test_a_client_key_in_the_settings_is_recognised_only_as_clproxys(tmp_path):
    """holds_client_key: a clp_ value in ANTHROPIC_AUTH_TOKEN or ANTHROPIC_API_KEY; not an
    Anthropic credential, not a missing, unreadable or oddly shaped file."""
    path = tmp_path / "settings.json"
    assert not claude_settings.holds_client_key(str(path))
    for document, held in (({"env": {"ANTHROPIC_API_KEY": "clp_x"}}, True),
                           ({"env": {"ANTHROPIC_AUTH_TOKEN": " clp_x"}}, True),
                           ({"env": {"ANTHROPIC_API_KEY": "sk-ant-api03-x"}}, False),
                           ({"env": ["clp_x"]}, False), ({"env": {"ANTHROPIC_API_KEY": 5}}, False)):
        path.write_text(json.dumps(document))
        assert claude_settings.holds_client_key(str(path)) is held, document
    path.write_text("{not json")
    assert not claude_settings.holds_client_key(str(path))
