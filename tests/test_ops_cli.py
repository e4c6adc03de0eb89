"""`clproxy proxy start/stop/guard` as real processes: settings restored on every exit, one instance, fail-open."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from clproxy.daemon import runstate

from clproxy.daemon import assemble

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_SETTINGS = {"model": "opus", "env": {"ANTHROPIC_BASE_URL": "https://users-own-gateway", "FOO": "1"}}


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=20.0, interval=0.05):
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def health(port):
    """The /health document, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return json.loads(r.read())
    except OSError:
        return None


class Daemon:
    """A `python -m clproxy proxy start` subprocess with its own CLPROXY_HOME and Claude settings file."""

    def __init__(self, tmp_path, name="a"):
        self.dir = tmp_path
        self.home = tmp_path / "home"
        self.settings = tmp_path / "claude-settings.json"
        self.log = tmp_path / f"daemon-{name}.log"
        self.process = None
        self.port = None

    @property
    def env(self):
        env = dict(os.environ, CLPROXY_HOME=str(self.home), CLPROXY_CLAUDE_SETTINGS=str(self.settings))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        env.pop("ANTHROPIC_API_KEY", None)
        return env

    def cli(self, *args, timeout=60):
        """Run another `clproxy` command with the same environment."""
        return subprocess.run([sys.executable, "-m", "clproxy", *args], capture_output=True, text=True,
                              env=self.env, cwd=str(self.dir), timeout=timeout)

    def start(self, *args, port=None, wait=True):
        self.port = port or free_port()
        self.out = open(self.log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "clproxy", "proxy", "start", "--port", str(self.port), *args],
            stdout=self.out, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.dir))
        if wait:
            assert wait_for(lambda: health(self.port) or self.process.poll() is not None), self.output()
            assert self.process.poll() is None, self.output()
            assert wait_for(lambda: (self.state() or {}).get("guardPid") or "--no-guard" in args), self.output()
        return self

    def add_account(self):
        """An API-key account in the token store, as `clproxy auth login` leaves it: without a usable
        account the daemon leaves Claude Code's settings alone (issue 11, item 7)."""
        from clproxy.accounts.tokenstore import StoredCredential, TokenStore
        TokenStore(str(self.home)).put(StoredCredential.new_api_key("test", "sk-ant-test", time.time()))
        return self

    def state(self):
        try:
            return runstate.read_state(str(self.home / "proxy-state.json"))
        except runstate.StateError:
            return None

    def settings_document(self):
        return json.loads(self.settings.read_text()) if self.settings.exists() else None

    def output(self):
        return self.log.read_text() if self.log.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=timeout)
        self.out.close()
        return self.process.returncode

    def cleanup(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        guard = (self.state() or {}).get("guardPid")
        if guard and runstate.pid_alive(guard):
            os.kill(guard, signal.SIGTERM)


@pytest.fixture
def daemons(tmp_path):
    """Daemons started by the test; killed (with their guards) afterwards."""
    started = []

    def make(name="a"):
        d = Daemon(tmp_path, name)
        started.append(d)
        return d

    yield make
    for d in started:
        d.cleanup()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_by_signal_restores_claude_settings(daemons, sig):
    """SIGTERM and SIGINT restore the user's own settings exactly, remove the state, stop the guard."""
    d = daemons().add_account()
    d.settings.write_text(json.dumps(USER_SETTINGS))
    d.start()
    url = f"http://127.0.0.1:{d.port}"
    assert d.settings_document()["env"] == {"ANTHROPIC_BASE_URL": url, "FOO": "1", "ENABLE_TOOL_SEARCH": "true"}
    state = d.state()
    assert state["pid"] == d.process.pid and state["port"] == d.port and state["strategy"] == "fill-first"
    guard = state["guardPid"]
    assert runstate.pid_alive(guard)
    assert d.stop(sig) == 0
    assert d.settings_document() == USER_SETTINGS
    assert d.state() is None
    assert wait_for(lambda: not runstate.pid_alive(guard), timeout=10)
    assert "Traceback" not in d.output()


def test_sigkill_is_caught_by_the_guard(daemons):
    """After SIGKILL the guard takes the proxy out of Claude Code's settings within a few seconds."""
    d = daemons().add_account()
    d.settings.write_text(json.dumps(USER_SETTINGS))
    d.start()
    guard = d.state()["guardPid"]
    assert d.settings_document()["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{d.port}"
    d.process.send_signal(signal.SIGKILL)
    d.process.wait(timeout=10)
    assert wait_for(lambda: d.settings_document() == USER_SETTINGS, timeout=10), d.settings_document()
    assert wait_for(lambda: d.state() is None, timeout=5)
    assert wait_for(lambda: not runstate.pid_alive(guard), timeout=10)
    log = (d.home / "logs" / "guard.log").read_text()
    assert f"proxy pid {d.process.pid} is gone" in log


def test_port_in_use_is_one_line_and_exit_1(daemons):
    """A taken port: one clear line on the terminal, exit 1, Claude Code and the state untouched."""
    d = daemons()
    d.settings.write_text(json.dumps(USER_SETTINGS))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = d.cli("proxy", "start", "--port", str(port))
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert d.settings_document() == USER_SETTINGS and d.state() is None


def test_second_start_is_refused_with_the_first_ones_details(daemons):
    """Another start on the same CLPROXY_HOME names the running instance, exits 1, and leaves it running."""
    first = daemons("first").start()
    result = first.cli("proxy", "start", "--port", str(free_port()))
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.count("\n") == 0 and "already running" in message
    assert f"pid {first.process.pid}" in message and f"127.0.0.1:{first.port}" in message
    assert health(first.port) and first.state()["pid"] == first.process.pid
    assert first.stop() == 0


def test_stale_state_is_cleaned_at_start(daemons):
    """A dead instance's record is removed with a log line; its stale settings entry does not survive."""
    d = daemons()
    d.settings.write_text(json.dumps(USER_SETTINGS))
    from clproxy.integrations import claude_settings
    record = claude_settings.configure(str(d.settings), {"ANTHROPIC_BASE_URL": "http://127.0.0.1:1"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d.home.mkdir()
    runstate.write_state(str(d.home / "proxy-state.json"),
                         {"pid": dead.pid, "host": "127.0.0.1", "port": 1, "claudeSettings": record})
    d.start()
    assert "removing stale proxy state" in d.output() and str(dead.pid) in d.output()
    assert d.state()["pid"] == d.process.pid
    assert d.stop() == 0
    assert d.settings_document() == USER_SETTINGS


def test_proxy_stop_command(daemons):
    """`clproxy proxy stop` SIGTERMs the recorded daemon and waits for it; then there is nothing to stop."""
    d = daemons().start()
    result = d.cli("proxy", "stop")
    assert result.returncode == 0 and f"stopped clproxy (pid {d.process.pid})" in result.stdout
    assert d.process.wait(timeout=10) == 0
    again = d.cli("proxy", "stop")
    assert again.returncode == 1 and "not running" in again.stderr


def test_corrupt_settings_are_left_alone(daemons):
    """With invalid settings JSON the proxy still runs, says why it did not configure Claude Code, and
    never rewrites the file."""
    d = daemons().add_account()
    d.settings.write_text('{"env": {"A": 1,}}')
    d.start()
    assert "not valid JSON" in d.output() and "Claude Code was not configured" in d.output()
    assert d.stop() == 0
    assert d.settings.read_text() == '{"env": {"A": 1,}}'


def test_settings_off_and_no_guard(daemons):
    """--claude-settings off and --no-guard leave Claude Code alone and start no guard."""
    d = daemons().start("--claude-settings", "off", "--no-guard")
    assert d.state()["guardPid"] is None and d.state()["claudeSettings"] is None
    assert not d.settings.exists()
    assert d.stop() == 0


def test_guard_command_rearms_a_guard(daemons):
    """`clproxy proxy guard` detaches a new guard for the running daemon and records its pid."""
    d = daemons().start("--no-guard")
    result = d.cli("proxy", "guard")
    assert result.returncode == 0 and "guard started" in result.stdout
    guard = d.state()["guardPid"]
    assert guard and runstate.pid_alive(guard)
    assert d.stop() == 0
    assert wait_for(lambda: not runstate.pid_alive(guard), timeout=10)


def test_unknown_commands_are_usage_errors(daemons):
    """Unknown commands exit 2 with the usage, no traceback."""
    d = daemons()
    result = d.cli("proxy", "frobnicate")
    assert result.returncode == 2 and "unknown proxy command" in result.stderr
    assert "Traceback" not in result.stderr


def _wired(name: str) -> bool:
    with open(assemble.__file__, encoding="utf-8") as f:  # the one assembly the tap calls
        return name in f.read()


@pytest.mark.skipif(not _wired("ConfigWatcher"),
                    reason="tap.makeService does not wire clproxy.daemon.reload.ConfigWatcher yet")
def test_sighup_with_a_broken_config_keeps_running(daemons):
    """SIGHUP with an invalid config logs why and keeps the old one; a valid one is then applied."""
    d = daemons()
    config = d.dir / "proxy-config.yaml"
    config.write_text("routing:\n  strategy: fill-first\n")
    d.start("--config", str(config))
    config.write_text("accounts:\n  anthropic:\n    - name: a\n      apiKey: k\n      weight: two\n")
    d.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "config reload failed, keeping the previous one" in d.output(), timeout=10)
    assert "accounts.anthropic[0].weight" in d.output()
    assert health(d.port)["strategy"] == "fill-first"
    config.write_text("routing:\n  strategy: round-robin\n")
    d.process.send_signal(signal.SIGHUP)
    assert wait_for(lambda: (health(d.port) or {}).get("strategy") == "round-robin", timeout=10), d.output()
    assert d.stop() == 0 and "Traceback" not in d.output()


FAKE_UPSTREAM = """
import sys
from twisted.internet import reactor
from clproxy.testing.anthropic import FakeAnthropic, text_stream
fake = FakeAnthropic(reactor)
fake.script(events=text_stream(tuple("part%d " % i for i in range(8))), pace=0.25)
port = fake.listen()
print(port.getHost().port, flush=True)
reactor.run()
"""


@pytest.mark.skipif(not _wired("Drainer"), reason="tap.makeService does not wire clproxy.daemon.drain.Drainer yet")
def test_sigterm_lets_a_stream_in_flight_finish(daemons, tmp_path):
    """SIGTERM during a stream: the stream still completes (message_stop), then the daemon exits 0."""
    upstream = subprocess.Popen([sys.executable, "-c", FAKE_UPSTREAM], stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=REPO))
    try:
        upstream_port = int(upstream.stdout.readline())
        d = daemons()
        config = tmp_path / "proxy-config.json"
        config.write_text(json.dumps({"accounts": {"anthropic": [
            {"name": "a", "apiKey": "key-a", "baseUrl": f"http://127.0.0.1:{upstream_port}"}]}}))
        d.start("--config", str(config), "--no-guard")
        connection = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
        connection.request("POST", "/v1/messages", body=json.dumps(
            {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
             "messages": [{"role": "user", "content": "hi"}]}),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"})
        response = connection.getresponse()
        assert response.status == 200
        first = response.read1(65536)
        assert b"event:" in first
        d.process.send_signal(signal.SIGTERM)
        rest = response.read()
        assert b"message_stop" in first + rest
        assert d.process.wait(timeout=30) == 0
    finally:
        upstream.kill()
        upstream.wait()


SIGNAL_AT_START = """
import os, signal, sys
from clproxy.cli import main as cli
from clproxy.daemon import tap

made = tap.makeService


def make(*args, **kwargs):
    service = made(*args, **kwargs)
    started = service.startService

    def start_then_signal():
        started()  # the port is bound and the state file written: the reactor is not running yet
        os.kill(os.getpid(), signal.SIGTERM)

    service.startService = start_then_signal
    return service


tap.makeService = make
sys.exit(cli.main(["proxy", "start", *sys.argv[1:]]))
"""


def test_a_sigterm_during_start_up_is_a_clean_stop(daemons):
    """A SIGTERM that arrives after the daemon has bound its port and written its state, but
    before its event loop runs (systemd stopping a service that is still starting), stops it as
    any SIGTERM does: exit 0, the state file removed, nothing left behind.

    Before the fix the signal's default action applied in that window: the process died (-15)
    with its state file (and Claude Code's settings, when set) left behind."""
    d = daemons()
    port = free_port()
    result = subprocess.run([sys.executable, "-c", SIGNAL_AT_START, "--port", str(port), "--no-guard"],
                            capture_output=True, text=True, env=d.env, cwd=str(d.dir), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert d.state() is None
    assert "Traceback" not in result.stdout + result.stderr
