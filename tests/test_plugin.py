"""The twistd plugin and the daemon as a real process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from clproxy.daemon import tap


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def daemon_env(**extra) -> dict:
    """The environment for a daemon subprocess: this source tree first on the path, so twistd
    finds its plugin whether the package was installed editable or not."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("ANTHROPIC_API_KEY", None)
    env["CLPROXY_CLAUDE_SETTINGS"] = "off"  # never touch the real ~/.claude/settings.json
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plugin_is_discoverable():
    """twistd finds the claudeproxy plugin, which points at clproxy.daemon.tap."""
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "claudeproxy" in makers
    assert makers["claudeproxy"].module is tap or makers["claudeproxy"].options is tap.Options


def test_options_defaults_and_validation():
    """The options have the documented defaults and reject bad values with a usage error."""
    options = tap.Options()
    options.parseOptions([])
    assert options["port"] == 55669 and options["host"] == "127.0.0.1"
    assert options["health-interval"] == 30.0 and not options["passthrough"]
    for bad in (["--strategy", "random"], ["--port", "70000"], ["--debug", "--quiet"]):
        try:
            tap.Options().parseOptions(bad)
        except Exception as e:
            assert "UsageError" in type(e).__name__
        else:
            raise AssertionError(f"{bad} was accepted")


def test_twistd_runs_the_daemon_without_config(tmp_path):
    """`twistd -n claudeproxy` starts with no config, answers /health, explains what to add, stops on SIGTERM."""
    port = free_port()
    env = daemon_env(CLPROXY_HOME=str(tmp_path / "home"))
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    process = subprocess.Popen([twistd, "-n", "--pidfile=", "claudeproxy", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        health = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    health = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.1)
        assert health and health["status"] == "ok" and health["strategy"] == "fill-first"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    text = output.decode()
    assert "clproxy auth login anthropic" in text
    assert "Traceback" not in text


def test_twistd_refuses_invalid_config_with_one_line(tmp_path):
    """An invalid config stops the daemon with one line naming the key path, no traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text("accounts:\n  anthropic:\n    - name: a\n      apiKey: k\n      weight: two\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    result = subprocess.run([twistd, "-n", "--pidfile=", "claudeproxy", "--port", str(free_port()),
                             "--config", str(config)], capture_output=True, timeout=30,
                            env=daemon_env(CLPROXY_HOME=str(tmp_path)), cwd=str(tmp_path))
    text = (result.stdout + result.stderr).decode()
    assert result.returncode != 0
    assert "accounts.anthropic[0].weight" in text
    assert "Traceback" not in text
