"""`clproxy proxy install` / `uninstall`: the systemd user unit and launchd plist, with a fake service manager."""

import io
import json
import os
import plistlib
import shutil
import subprocess
import sys

import pytest

from clproxy.cli import service


class FakeManager:
    """Records systemctl/launchctl commands; answers each with a chosen exit code."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, argv):
        self.calls.append(list(argv))
        for word in self.fail:
            if word in argv:
                return 1, f"Failed to connect to bus: No medium found ({word})"
        return 0, ""


@pytest.fixture
def environ(tmp_path):
    """A home directory and CLPROXY_HOME under tmp_path, and a settings override carried into the unit."""
    return {"HOME": str(tmp_path / "home"), "CLPROXY_HOME": str(tmp_path / "home" / ".clproxy"),
            "CLPROXY_CLAUDE_SETTINGS": str(tmp_path / "claude.json")}


def run(main, argv, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_systemd_unit_content(environ):
    """The unit runs this interpreter's `-m clproxy proxy start` in the foreground, restarts after
    5 s, and `systemctl --user reload` sends the daemon SIGHUP (without ExecReload systemd refuses
    the reload that docs/operations.rst gives)."""
    command = service.daemon_command(9000, "0.0.0.0", environ)
    unit = service.systemd_unit(command, service.service_environment(environ),
                                service.env_file_path(environ), 9000, "0.0.0.0")
    home = environ["CLPROXY_HOME"]
    assert unit.startswith(service.MARKER)
    assert (f"ExecStart={os.path.abspath(sys.executable)} -m clproxy proxy start --port 9000 --host 0.0.0.0 "
            f"--env-file {home}/.env") in unit
    assert f"EnvironmentFile=-{home}/.env" in unit
    assert f"Environment=CLPROXY_HOME={home}" in unit
    assert f"Environment=CLPROXY_CLAUDE_SETTINGS={environ['CLPROXY_CLAUDE_SETTINGS']}" in unit
    for line in ("Restart=always", "RestartSec=5", "Type=simple", "WantedBy=default.target",
                 "TimeoutStopSec=45"):
        assert line in unit.splitlines()
    assert f"ExecReload={os.path.abspath(sys.executable)} -c " in unit


def _exec_line(unit, key):
    """The argv of the unit's ``key=`` command as systemd splits it (quotes, ``$$`` and ``%%``)."""
    import shlex
    line = next(line for line in unit.splitlines() if line.startswith(key + "="))
    return [word.replace("$$", "$").replace("%%", "%") for word in shlex.split(line[len(key) + 1:])]


def test_systemd_reload_needs_no_kill_binary(environ, tmp_path):
    """`systemctl --user reload` works where there is no /bin/kill (NixOS): ExecReload runs only the
    interpreter ExecStart runs, and run as systemd runs it (empty PATH, $MAINPID given) it sends SIGHUP."""
    python = os.path.abspath(sys.executable)
    command = service.daemon_command(55669, "127.0.0.1", environ, python=python)
    unit = service.systemd_unit(command, service.service_environment(environ),
                                service.env_file_path(environ), 55669, "127.0.0.1")
    reload_argv = _exec_line(unit, "ExecReload")
    assert reload_argv[0] == _exec_line(unit, "ExecStart")[0] == python
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP}); "
                               "print('ready', flush=True); signal.sigwait({signal.SIGHUP}); print('hup')"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline().strip() == "ready"
        argv = [str(daemon.pid) if word == "$MAINPID" else word for word in reload_argv]
        done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert daemon.stdout.readline().strip() == "hup"
    finally:
        daemon.kill()
        daemon.wait()


def test_systemd_unit_escapes_spaces_and_specifiers(tmp_path):
    """Paths with spaces, % and $ are quoted and escaped the way systemd reads them."""
    environ = {"HOME": str(tmp_path), "CLPROXY_HOME": str(tmp_path / "my 100%$home")}
    command = service.daemon_command(1, "127.0.0.1", environ, python="/opt/py thon/bin/python")
    unit = service.systemd_unit(command, service.service_environment(environ),
                                service.env_file_path(environ), 1, "127.0.0.1")
    assert 'ExecStart="/opt/py thon/bin/python" -m clproxy' in unit
    assert f'--env-file "{tmp_path}/my 100%%$$home/.env"' in unit
    assert f'Environment="CLPROXY_HOME={tmp_path}/my 100%%$home"' in unit
    assert f"EnvironmentFile=-{tmp_path}/my 100%%$home/.env" in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(environ, tmp_path):
    """`systemd-analyze verify` finds nothing wrong with the generated unit."""
    command = service.daemon_command(55669, "127.0.0.1", environ)
    path = tmp_path / "clproxy.service"
    path.write_text(service.systemd_unit(command, service.service_environment(environ),
                                         service.env_file_path(environ), 55669, "127.0.0.1"))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "clproxy.service" in line]
    assert result.returncode == 0 and not problems, problems


def test_launchd_plist_content(environ):
    """The agent starts at login, is kept alive with a 5 s throttle, and runs this interpreter."""
    command = service.daemon_command(55669, "127.0.0.1", environ)
    plist = plistlib.loads(service.launchd_plist(command, service.service_environment(environ),
                                                 "/tmp/proxy.log", environ["CLPROXY_HOME"]))
    assert plist["Label"] == "com.clproxy.proxy" and plist["ProgramArguments"] == command
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True and plist["ThrottleInterval"] == 5
    assert plist["EnvironmentVariables"]["CLPROXY_HOME"] == environ["CLPROXY_HOME"]
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/tmp/proxy.log"


def test_install_on_linux_writes_enables_and_starts(environ):
    """install writes the unit, an empty .env and a manifest, then daemon-reload, enable, restart."""
    manager = FakeManager()
    code, out, err = run(service.install_main, ["-p", "9001"], environ=environ, platform="linux",
                         runner=manager)
    unit = service.unit_path(environ)
    assert code == 0 and err == ""
    assert unit == os.path.join(environ["HOME"], ".config", "systemd", "user", "clproxy.service")
    assert "--port 9001" in open(unit).read() and f"wrote {unit}" in out
    assert manager.calls == [["systemctl", "--user", "daemon-reload"],
                             ["systemctl", "--user", "enable", "clproxy.service"],
                             ["systemctl", "--user", "restart", "clproxy.service"]]
    env_file = service.env_file_path(environ)
    assert oct(os.stat(env_file).st_mode & 0o777) == "0o600"
    manifest = json.load(open(service.manifest_path(environ)))
    assert unit in manifest["files"] and manifest["createdEnvFile"]["path"] == env_file
    assert "is running on http://127.0.0.1:9001" in out


def test_install_without_a_user_manager_still_writes_the_unit(environ):
    """When systemctl --user cannot connect, the unit is written and the user is told why and what next."""
    code, out, err = run(service.install_main, [], environ=environ, platform="linux",
                         runner=FakeManager(fail=["daemon-reload"]))
    assert code == 0
    assert os.path.exists(service.unit_path(environ))
    assert "systemctl --user is not available here" in err and "Failed to connect to bus" in err
    assert "clproxy proxy start" in err and "Traceback" not in err


def test_install_with_systemctl_missing(environ):
    """No systemctl at all (run_command's 127) reads the same way."""
    def missing(argv):
        return 127, f"{argv[0]}: command not found"

    code, out, err = run(service.install_main, [], environ=environ, platform="linux", runner=missing)
    assert code == 0 and "systemctl: command not found" in err


def test_uninstall_removes_only_what_install_wrote(environ):
    """uninstall stops the unit and removes the unit, the untouched .env and the manifest."""
    service.install(environ=environ, platform="linux", runner=FakeManager())
    manager = FakeManager()
    code, out, err = run(service.uninstall_main, [], environ=environ, platform="linux", runner=manager)
    assert code == 0
    assert ["systemctl", "--user", "disable", "--now", "clproxy.service"] in manager.calls
    assert not os.path.exists(service.unit_path(environ))
    assert not os.path.exists(service.env_file_path(environ))
    assert not os.path.exists(service.manifest_path(environ))
    assert os.path.isdir(environ["CLPROXY_HOME"])


def test_uninstall_keeps_an_env_file_with_user_content(environ):
    """A .env the user filled in is kept (and said so)."""
    service.install(environ=environ, platform="linux", runner=FakeManager())
    with open(service.env_file_path(environ), "a") as f:
        f.write("OPENAI_API_KEY=sk-test\n")
    code, out, err = run(service.uninstall_main, [], environ=environ, platform="linux", runner=FakeManager())
    assert code == 0 and os.path.exists(service.env_file_path(environ))
    assert f"kept {service.env_file_path(environ)}" in out


def test_existing_env_file_is_never_claimed(environ):
    """An .env that existed before install is not recorded, so uninstall never removes it."""
    os.makedirs(environ["CLPROXY_HOME"])
    with open(service.env_file_path(environ), "w") as f:
        f.write("")
    service.install(environ=environ, platform="linux", runner=FakeManager())
    service.uninstall(environ=environ, platform="linux", runner=FakeManager())
    assert os.path.exists(service.env_file_path(environ))


def test_foreign_unit_is_neither_overwritten_nor_removed(environ):
    """A clproxy.service someone else wrote is left alone by install and uninstall (exit 1, one line)."""
    unit = service.unit_path(environ)
    os.makedirs(os.path.dirname(unit))
    with open(unit, "w") as f:
        f.write("[Service]\nExecStart=/usr/local/bin/my-proxy\n")
    code, out, err = run(service.install_main, [], environ=environ, platform="linux", runner=FakeManager())
    assert code == 1 and "was not written by clproxy" in err and err.count("\n") == 1
    code, out, err = run(service.uninstall_main, [], environ=environ, platform="linux", runner=FakeManager())
    assert code == 1 and "left alone" in err
    assert open(unit).read() == "[Service]\nExecStart=/usr/local/bin/my-proxy\n"


def test_reinstall_replaces_our_unit(environ):
    """Installing again (another port) replaces the unit it wrote before."""
    service.install(9000, environ=environ, platform="linux", runner=FakeManager())
    service.install(9002, environ=environ, platform="linux", runner=FakeManager())
    text = open(service.unit_path(environ)).read()
    assert "--port 9002" in text and "--port 9000" not in text


def test_uninstall_with_nothing_installed(environ):
    """uninstall with nothing installed says so and succeeds."""
    code, out, err = run(service.uninstall_main, [], environ=environ, platform="linux", runner=FakeManager())
    assert code == 0 and "nothing to do" in out


def test_macos_install_and_uninstall(environ):
    """On macOS the agent goes to ~/Library/LaunchAgents and is bootstrapped, then booted out and removed."""
    manager = FakeManager()
    outcome = service.install(environ=environ, platform="darwin", runner=manager)
    plist = service.plist_path(environ)
    assert outcome.active and plist == os.path.join(environ["HOME"], "Library", "LaunchAgents",
                                                    "com.clproxy.proxy.plist")
    assert plistlib.load(open(plist, "rb"))["KeepAlive"] is True
    assert ["launchctl", "bootstrap", f"gui/{os.getuid()}", plist] in manager.calls
    manager = FakeManager()
    service.uninstall(environ=environ, platform="darwin", runner=manager)
    assert ["launchctl", "bootout", f"gui/{os.getuid()}/com.clproxy.proxy"] in manager.calls
    assert not os.path.exists(plist)


def test_macos_falls_back_to_launchctl_load(environ):
    """Where `launchctl bootstrap` fails (older macOS), `launchctl load -w` is tried."""
    manager = FakeManager(fail=["bootstrap"])
    outcome = service.install(environ=environ, platform="darwin", runner=manager)
    assert outcome.active and ["launchctl", "load", "-w", service.plist_path(environ)] in manager.calls


def test_unsupported_platform(environ):
    """Windows and others get one line pointing at `clproxy proxy start`, exit 1."""
    code, out, err = run(service.install_main, [], environ=environ, platform="win32", runner=FakeManager())
    assert code == 1 and "clproxy proxy start" in err and err.count("\n") == 1


def test_print_shows_the_unit_without_installing(environ):
    """--print writes the unit to stdout and nothing to disk."""
    code, out, err = run(service.install_main, ["--print", "--port", "9100"], environ=environ,
                         platform="linux", runner=FakeManager())
    assert code == 0 and "--port 9100" in out and "Restart=always" in out
    assert not os.path.exists(service.unit_path(environ))


def test_bad_port_is_a_usage_error(environ, capsys):
    """A port out of range is rejected by the option parser (exit 2)."""
    code, out, err = run(service.install_main, ["--port", "70000"], environ=environ, platform="linux",
                         runner=FakeManager())
    assert code == 2 and "between 1 and 65535" in capsys.readouterr().err
