"""Starting clproxy from the command line: the version, one-line start-up errors, quiet stops.

The entry points run as real processes (``python -m clproxy`` and ``twistd``), as a user runs them.
"""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import globalLogPublisher

import clproxy
from clproxy.daemon import runstate
from clproxy.daemon import tap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(**extra) -> dict:
    """This source tree first on the path; never the real Claude Code settings or API key."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("ANTHROPIC_API_KEY", None)
    env.setdefault("CLPROXY_CLAUDE_SETTINGS", "off")
    return env


def clproxy_command(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "clproxy", *args], capture_output=True, text=True,
                          env=env or environment(), cwd=cwd or REPO, timeout=60)


def twistd_command(*args, env=None, cwd=None):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return subprocess.run([twistd, *args], capture_output=True, text=True, env=env or environment(),
                          cwd=cwd or REPO, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unwritable_home(tmp_path) -> str:
    """A CLPROXY_HOME nobody can create, not even root: a directory under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    return str(blocker / "clproxy-home")


# --- item 9: the version ----------------------------------------------------------------------------


def test_version_constant_matches_setup_py():
    """__version__ (used from a checkout) and setup.py's version (the installed metadata) agree."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        declared = re.search(r'\bversion="([^"]+)"', f.read()).group(1)
    assert clproxy.__version__ == declared
    assert clproxy.version_line() == f"clproxy {clproxy.version()}"
    assert clproxy.version() == declared


@pytest.mark.parametrize("argv", [["--version"], ["version"], ["proxy", "start", "--version"]])
def test_clproxy_version_is_clproxys(argv):
    """`clproxy --version`, `clproxy version` and `clproxy proxy start --version` print clproxy's line."""
    result = clproxy_command(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == clproxy.version_line()
    assert "Twisted" not in result.stdout + result.stderr


def test_twistd_claudeproxy_version_is_clproxys():
    """`twistd claudeproxy --version` prints clproxy's version, not Twisted's."""
    result = twistd_command("claudeproxy", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == clproxy.version_line()


# --- item 10: one-line start-up errors --------------------------------------------------------------


def test_unwritable_home_is_one_line_for_clproxy_proxy_start(tmp_path):
    """`clproxy proxy start` with an unwritable CLPROXY_HOME: exit 1, one line naming it, no traceback."""
    home = unwritable_home(tmp_path)
    result = clproxy_command("proxy", "start", "--port", str(free_port()), "--no-guard",
                             env=environment(CLPROXY_HOME=home), cwd=str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert home in lines[0] and "CLPROXY_HOME" in lines[0] and "writable directory" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr and "Errno" not in lines[0]


def test_unwritable_home_is_one_line_for_twistd(tmp_path):
    """`twistd -n claudeproxy` with an unwritable CLPROXY_HOME: non-zero, the same one line, no traceback."""
    home = unwritable_home(tmp_path)
    result = twistd_command("-n", "--pidfile=", "claudeproxy", "--port", str(free_port()), "--no-guard",
                            env=environment(CLPROXY_HOME=home), cwd=str(tmp_path))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Errno" not in output
    line = [l for l in output.splitlines() if "CLPROXY_HOME" in l]
    assert len(line) == 1 and home in line[0] and "writable directory" in line[0], output


def test_check_home_creates_a_writable_home(tmp_path):
    """A home that does not exist yet is created (0700) and passes; nothing is left behind in it."""
    home = tmp_path / "new" / "home"
    tap.check_home(str(home))
    assert home.is_dir() and oct(home.stat().st_mode & 0o777) == "0o700"
    assert list(home.iterdir()) == []
    with pytest.raises(SystemExit) as raised:
        tap.check_home(unwritable_home(tmp_path))
    assert "CLPROXY_HOME" in str(raised.value)


@pytest.mark.parametrize("port", ["abc", "0", "70000", "8.5"])
def test_bad_port_is_one_line(port):
    """`--port abc` is one line saying what a port is, not int()'s message plus the whole help."""
    result = clproxy_command("proxy", "start", "--port", port)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"--port must be a number from 1 to 65535, not {port!r}" in lines[0]
    assert "invalid literal" not in result.stderr and "Traceback" not in result.stderr


def test_port_option_is_still_a_number():
    """The parsed --port is an int, whether given or the default."""
    options = tap.Options()
    options.parseOptions(["--port", "8080"])
    assert options["port"] == 8080
    options = tap.Options()
    options.parseOptions([])
    assert options["port"] == 55669


# --- item 12: no traceback on any stop path ---------------------------------------------------------


@pytest.fixture
def logged_errors():
    """Every error event logged while the test runs."""
    errors = []

    def observe(event):
        if event.get("isError") or event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield errors
    globalLogPublisher.removeObserver(observe)


def test_stop_reactor_twice_and_after_it_stopped(logged_errors):
    """Stopping twice, and once more after the reactor stopped, is quiet; only the first call stops it."""
    reactor = SelectReactor()
    reactor.callLater(30, reactor.crash)  # a broken stop path fails the test instead of hanging it
    results = []
    reactor.callWhenRunning(lambda: results.extend([runstate.stop_reactor(reactor),
                                                     runstate.stop_reactor(reactor)]))
    reactor.run(installSignalHandlers=False)
    assert results == [True, False]
    assert runstate.stop_reactor(reactor) is False
    assert logged_errors == []


def test_two_signals_stop_the_reactor_quietly(logged_errors):
    """Two SIGINTs (and a SIGTERM) before the reactor gets to stop: it stops once, no ReactorNotRunning."""
    reactor = SelectReactor()
    reactor.callLater(30, reactor.crash)  # a broken stop path fails the test instead of hanging it
    runstate.quiet_signal_stops(reactor)
    reactor.callWhenRunning(lambda: (reactor.sigInt(signal.SIGINT), reactor.sigInt(signal.SIGINT),
                                     reactor.sigTerm(signal.SIGTERM)))
    reactor.run(installSignalHandlers=False)
    assert logged_errors == []
    assert reactor._exitSignal == signal.SIGTERM


ENTRY_POINTS = {
    "clproxy proxy start": [sys.executable, "-m", "clproxy", "proxy", "start"],
    "twistd -n claudeproxy": [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
                              "claudeproxy"],
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_two_quick_ctrl_c_print_no_traceback(tmp_path, entry_point):
    """`clproxy proxy start` (and twistd), Ctrl-C, and Ctrl-C again while it drains a request: it
    stops, and nothing prints a traceback (the second SIGINT used to raise ReactorNotRunning)."""
    # An upstream that accepts connections and never answers keeps one request in flight.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    config = tmp_path / "proxy-config.yaml"
    config.write_text(
        "accounts:\n  anthropic:\n    - name: slow\n      apiKey: sk-test-not-a-real-key\n"
        f"      baseUrl: http://127.0.0.1:{silent.getsockname()[1]}\n"
        "server:\n  drainTimeout: 5\n")
    port = free_port()
    process = subprocess.Popen(
        ENTRY_POINTS[entry_point] + ["--port", str(port), "--no-guard", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment(CLPROXY_HOME=str(tmp_path / "home")),
        cwd=str(tmp_path))
    lines: "queue.Queue[bytes]" = queue.Queue()
    stdout = []

    def read():
        for line in process.stdout:
            lines.put(line)
        lines.put(b"")

    def wait_for_line(text: bytes) -> None:
        while True:
            line = lines.get(timeout=60)
            stdout.append(line)
            assert line, (b"".join(stdout) + process.stderr.read()).decode()
            if text in line:
                return

    threading.Thread(target=read, daemon=True).start()
    client = socket.socket()
    try:
        wait_for_line(b"ProxySite starting")
        body = b'{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}'
        client.connect(("127.0.0.1", port))
        client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        silent.settimeout(60)
        held = silent.accept()[0]  # the proxy is now waiting on the upstream: the request is in flight
        process.send_signal(signal.SIGINT)
        wait_for_line(b"draining 1 request")
        process.send_signal(signal.SIGINT)  # the impatient second Ctrl-C
        wait_for_line(b"received SIGINT")
        held.close()  # the upstream gives up: the request ends, the drain is over
        process.wait(timeout=60)
    finally:
        client.close()
        silent.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    while True:
        line = lines.get(timeout=60)
        if not line:
            break
        stdout.append(line)
    out, err = b"".join(stdout).decode(), process.stderr.read().decode()
    assert "Traceback" not in out + err and "ReactorNotRunning" not in out + err, out + err
    assert process.returncode in (0, 130, -signal.SIGINT), out + err
