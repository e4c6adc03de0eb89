"""proxy-state.json and the Lifecycle service: one instance at a time, stale records cleaned, undone on stop."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from twisted.application import service

from clproxy.daemon import runstate
from clproxy.integrations import claude_settings


def dead_pid() -> int:
    """A pid that no longer exists (a child that exited and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_lifecycle(tmp_path, **overrides):
    settings = tmp_path / "settings.json"
    kwargs = dict(path=str(tmp_path / "home" / "proxy-state.json"),
                  address=lambda: ("127.0.0.1", 4321), strategy=lambda: "round-robin",
                  fallback_chain=lambda: [{"provider": "openai", "model": "gpt-4o"}],
                  settings_path=str(settings), tool_search="true", guard=False,
                  config_path="/etc/x.yaml", now=lambda: 1_700_000_000.0)
    kwargs.update(overrides)
    return runstate.Lifecycle(**kwargs), settings


def test_state_file_is_private_and_atomic(tmp_path):
    """The state file is written 0600 through a temp file, and reads back as written."""
    path = tmp_path / "home" / "proxy-state.json"
    runstate.write_state(str(path), {"pid": 1, "port": 2})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert runstate.read_state(str(path)) == {"pid": 1, "port": 2}
    assert os.listdir(path.parent) == ["proxy-state.json"]
    assert runstate.read_state(str(tmp_path / "missing.json")) is None


def test_inspect_tells_running_stale_none_and_corrupt(tmp_path):
    """Running needs a live pid AND an answering /health; anything else recorded is stale."""
    path = str(tmp_path / "proxy-state.json")
    assert runstate.inspect(path) == ("none", None)
    runstate.write_state(path, {"pid": os.getpid(), "host": "127.0.0.1", "port": 1, "url": "http://x"})
    assert runstate.inspect(path, healthy=lambda url: True)[0] == "running"
    assert runstate.inspect(path, healthy=lambda url: False)[0] == "stale"
    runstate.write_state(path, {"pid": dead_pid(), "host": "127.0.0.1", "port": 1})
    assert runstate.inspect(path, healthy=lambda url: True)[0] == "stale"
    with open(path, "w") as f:
        f.write("{nope")
    assert runstate.inspect(path) == ("corrupt", None)


def test_second_start_is_refused_with_the_running_details(tmp_path):
    """A live instance makes ensure_not_running raise AlreadyRunning (a SystemExit) naming it."""
    path = str(tmp_path / "proxy-state.json")
    runstate.write_state(path, {"pid": os.getpid(), "host": "127.0.0.1", "port": 5555,
                                "url": "http://127.0.0.1:5555", "strategy": "fill-first",
                                "startedAt": "2026-01-01T00:00:00+00:00"})
    with pytest.raises(runstate.AlreadyRunning) as error:
        runstate.ensure_not_running(path, healthy=lambda url: True)
    message = str(error.value)
    assert isinstance(error.value, SystemExit)
    assert f"pid {os.getpid()}" in message and "http://127.0.0.1:5555" in message
    assert "clproxy proxy stop" in message and "\n" not in message
    assert os.path.exists(path)


def test_stale_state_is_cleaned_with_a_log_line_and_settings_undone(tmp_path, logs):
    """A dead pid's record is removed, logged, and the Claude Code entry it left is taken back."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"env": {"ANTHROPIC_BASE_URL": "https://mine"}}))
    record = claude_settings.configure(str(settings), {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    path = str(tmp_path / "proxy-state.json")
    pid = dead_pid()
    runstate.write_state(path, {"pid": pid, "host": "127.0.0.1", "port": 9, "claudeSettings": record})
    cleaned = runstate.ensure_not_running(path)
    assert cleaned["pid"] == pid and not os.path.exists(path)
    assert json.loads(settings.read_text()) == {"env": {"ANTHROPIC_BASE_URL": "https://mine"}}
    assert any("stale proxy state" in line and str(pid) in line for line in logs)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombie detection reads /proc (Linux)")
def test_pid_alive_treats_a_zombie_as_dead():
    """A killed child nobody reaped yet (a zombie) does not count as running."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert runstate.pid_alive(process.pid)
        process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while runstate.pid_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not runstate.pid_alive(process.pid)
    finally:
        process.wait()
    assert runstate.pid_alive(os.getpid())
    assert not runstate.pid_alive(None) and not runstate.pid_alive(-1) and not runstate.pid_alive(True)


def test_lifecycle_records_configures_and_undoes(tmp_path, logs):
    """Start writes the state (pid, address, strategy, chain) and the settings; stop undoes both."""
    lifecycle, settings = make_lifecycle(tmp_path)
    lifecycle.startService()
    state = runstate.read_state(lifecycle.path)
    assert state["pid"] == os.getpid() and state["port"] == 4321 and state["host"] == "127.0.0.1"
    assert state["url"] == "http://127.0.0.1:4321" and state["strategy"] == "round-robin"
    assert state["fallbackChain"] == [{"provider": "openai", "model": "gpt-4o"}]
    assert state["startTime"] == 1_700_000_000.0 and state["startedAt"].startswith("2023-11-14T22:13:20")
    assert state["claudeSettings"]["set"]["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:4321"
    assert json.loads(settings.read_text())["env"] == {"ANTHROPIC_BASE_URL": "http://127.0.0.1:4321",
                                                       "ENABLE_TOOL_SEARCH": "true"}
    lifecycle.update(strategy="fill-first")
    assert runstate.read_state(lifecycle.path)["strategy"] == "fill-first"
    lifecycle.stopService()
    assert not os.path.exists(lifecycle.path) and not settings.exists()
    lifecycle.cleanup()  # a second cleanup (atexit, finally) is harmless
    assert any("restart Claude Code" in line for line in logs)


def test_lifecycle_with_unwritable_settings_still_runs(tmp_path, logs):
    """Settings that cannot be written give a warning saying what to do; the state is still recorded."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    lifecycle, _ = make_lifecycle(tmp_path, settings_path=str(blocker / "settings.json"))
    lifecycle.startService()
    state = runstate.read_state(lifecycle.path)
    assert state["pid"] == os.getpid() and state["claudeSettings"] is None
    assert any("Claude Code was not configured" in line and "ANTHROPIC_BASE_URL=http://127.0.0.1:4321" in line
               for line in logs)
    lifecycle.stopService()
    assert not os.path.exists(lifecycle.path)


def test_lifecycle_records_and_stops_its_guard(tmp_path):
    """The guard's pid goes into the state file and the guard is sent SIGTERM on stop."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    calls = []

    def spawn(**kwargs):
        calls.append(kwargs)
        return sleeper.pid

    lifecycle, _ = make_lifecycle(tmp_path, guard=True, spawn_guard=spawn)
    try:
        lifecycle.startService()
        assert runstate.read_state(lifecycle.path)["guardPid"] == sleeper.pid
        assert calls[0]["pid"] == os.getpid() and calls[0]["url"] == "http://127.0.0.1:4321"
        lifecycle.stopService()
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_settings_off_touches_no_settings(tmp_path):
    """Without a settings path the lifecycle records the state and leaves Claude Code alone."""
    lifecycle, settings = make_lifecycle(tmp_path, settings_path=None)
    lifecycle.startService()
    assert runstate.read_state(lifecycle.path)["claudeSettings"] is None and not settings.exists()
    lifecycle.stopService()


class FakeTop(service.MultiService):
    """A daemon stand-in with an address and a pool."""

    class pool:
        strategy = "fill-first"

    def address(self):
        return ("127.0.0.1", 7777)


def test_attach_lifecycle_only_for_parsed_options(tmp_path):
    """Plain option dicts (tests, embedding) get no lifecycle; parsed options do, once."""
    environ = {"CLPROXY_HOME": str(tmp_path / "home"), "HOME": str(tmp_path),
               "CLPROXY_CLAUDE_SETTINGS": str(tmp_path / "s.json")}
    top = FakeTop()
    assert runstate.attach_lifecycle(top, {"port": 1}, environ) is None
    options = {"claude-settings": "auto", "tool-search": "auto", "no-guard": True}
    lifecycle = runstate.attach_lifecycle(top, options, environ)
    assert lifecycle is top.lifecycle and lifecycle.parent is top
    assert runstate.attach_lifecycle(top, options, environ) is lifecycle
    assert lifecycle.settings_path == str(tmp_path / "s.json") and lifecycle.tool_search == "auto"
    assert lifecycle.guard is False and lifecycle.strategy() == "fill-first"
    off = runstate.attach_lifecycle(FakeTop(), {"claude-settings": "off"}, environ)
    assert off.settings_path is None and off.guard is True


def test_attach_lifecycle_refuses_a_running_instance(tmp_path):
    """attach_lifecycle raises AlreadyRunning before anything is started."""
    environ = {"CLPROXY_HOME": str(tmp_path)}
    runstate.write_state(str(tmp_path / "proxy-state.json"), {"pid": os.getpid(), "url": "http://x"})
    top = FakeTop()
    with pytest.raises(runstate.AlreadyRunning):
        runstate.attach_lifecycle(top, {"claude-settings": "off"}, environ, healthy=lambda url: True)
    assert getattr(top, "lifecycle", None) is None


def test_base_url_for_wildcard_and_ipv6_hosts():
    """Clients on this machine reach 0.0.0.0 at 127.0.0.1 and :: at [::1]."""
    assert runstate.base_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert runstate.base_url("::", 2) == "http://[::1]:2"
    assert runstate.base_url("::1", 3) == "http://[::1]:3"
    assert runstate.base_url("localhost", 4) == "http://localhost:4"
