"""``clproxy proxy install`` / ``uninstall``: run the daemon as a per-user service that restarts itself.

Linux gets a systemd user unit, macOS a launchd agent. What install writes is listed, with hashes, in
``$CLPROXY_HOME/service-manifest.json``; uninstall removes only files listed there and still unchanged.
What ``clproxy proxy setup`` did to Claude Code's ``statusLine`` is recorded in
``$CLPROXY_HOME/claude-statusline.json``; uninstall puts the user's own back (or removes ours).
"""

import argparse
import datetime
import hashlib
import json
import os
import plistlib
import shlex
import subprocess
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import attr

from clproxy import config as configuration
from clproxy.state.files import atomic_write
from clproxy.integrations import claude_settings

UNIT_NAME = "clproxy.service"
LAUNCHD_LABEL = "com.clproxy.proxy"
MANIFEST_NAME = "service-manifest.json"
STATUS_LINE_RECORD_NAME = "claude-statusline.json"
ENV_FILE_NAME = ".env"
MARKER = "# Written by `clproxy proxy install`; `clproxy proxy uninstall` removes it."
DEFAULT_PORT = 55669
DEFAULT_HOST = "127.0.0.1"
RESTART_SECONDS = 5
#: Longer than the default drain timeout (server.drainTimeout, 30 s), so a stop can drain.
STOP_TIMEOUT = 45
ENV_FILE_HEADER = ("# Environment for the clproxy service: KEY=VALUE lines (e.g. OPENAI_API_KEY=...).\n"
                   "# Read by the daemon at every start (--env-file); created empty by `clproxy proxy install`.\n")

#: Runs a command, returns ``(exit code, combined output)``; 127 when the program does not exist.
Runner = Callable[[Sequence[str]], Tuple[int, str]]


class ServiceError(Exception):
    """Installing or removing the service failed; the message is one line for the user."""


def run_command(argv: Sequence[str]) -> Tuple[int, str]:
    """The real :data:`Runner`: run ``argv`` with a timeout, capture its output."""
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=60)
    except FileNotFoundError:
        return 127, f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(argv)}: timed out"
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()


def kind_for(platform: str = sys.platform) -> str:
    """``"systemd"`` on Linux, ``"launchd"`` on macOS; :class:`ServiceError` elsewhere."""
    if platform.startswith("linux"):
        return "systemd"
    if platform == "darwin":
        return "launchd"
    raise ServiceError(f"`clproxy proxy install` supports Linux (systemd) and macOS (launchd), not "
                       f"{platform}; run `clproxy proxy start` instead")


def _home(environ: Mapping[str, str]) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def unit_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CONFIG_HOME/systemd/user/clproxy.service`` (``~/.config`` by default)."""
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    return os.path.join(config_home, "systemd", "user", UNIT_NAME)


def plist_path(environ: Mapping[str, str] = os.environ) -> str:
    """``~/Library/LaunchAgents/com.clproxy.proxy.plist``."""
    return os.path.join(_home(environ), "Library", "LaunchAgents", LAUNCHD_LABEL + ".plist")


def manifest_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME/service-manifest.json``."""
    return os.path.join(configuration.clproxy_home(environ), MANIFEST_NAME)


def status_line_record_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME/claude-statusline.json``: what setup did to Claude Code's ``statusLine``."""
    return os.path.join(configuration.clproxy_home(environ), STATUS_LINE_RECORD_NAME)


def read_status_line_record(environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, Any]]:
    """The record :func:`claude_settings.configure_status_line` returned at setup, or None."""
    try:
        with open(status_line_record_path(environ), "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


def write_status_line_record(record: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> None:
    """Keep ``record`` for uninstall (0600: it names the user's own status-line command)."""
    _write(status_line_record_path(environ), (json.dumps(record, indent=2) + "\n").encode(), 0o600)


def restore_status_line(environ: Mapping[str, str], outcome: "Outcome") -> None:
    """Undo what setup did to Claude Code's ``statusLine`` (see the record), noting it in ``outcome``."""
    record = read_status_line_record(environ)
    if record is None:
        return
    try:
        done = claude_settings.restore_status_line(record)
    except claude_settings.SettingsError as e:
        outcome.notes.append(f"{e}; clproxy's statusLine was left in it")
        return
    if done == "restored":
        outcome.notes.append(f"restored your own statusLine in {record['path']}")
    elif done == "removed":
        outcome.notes.append(f"removed clproxy's statusLine from {record['path']}")
    try:
        os.unlink(status_line_record_path(environ))
    except OSError:
        pass


def env_file_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME/.env``: provider keys and telemetry settings for the service."""
    return os.path.join(configuration.clproxy_home(environ), ENV_FILE_NAME)


def daemon_command(port: int, host: str, environ: Mapping[str, str] = os.environ,
                   python: Optional[str] = None) -> List[str]:
    """The foreground daemon the service runs, with this interpreter's absolute path."""
    python = os.path.abspath(python or sys.executable)
    return [python, "-m", "clproxy", "proxy", "start", "--port", str(port), "--host", host,
            "--env-file", env_file_path(environ)]


def service_environment(environ: Mapping[str, str]) -> Dict[str, str]:
    """What the service's environment must carry over from the installing shell."""
    env = {"CLPROXY_HOME": configuration.clproxy_home(environ), "PYTHONUNBUFFERED": "1"}
    if environ.get(claude_settings.SETTINGS_ENV):
        env[claude_settings.SETTINGS_ENV] = environ[claude_settings.SETTINGS_ENV]
    return env


# --- the files ------------------------------------------------------------------------------------


def _systemd_escape(value: str, command: bool = False) -> str:
    """One word for a unit file: ``%`` specifiers (and ``$`` in commands) escaped, quoted if needed."""
    value = value.replace("%", "%%")
    if command:
        value = value.replace("$", "$$")
    if value and not any(c in value for c in ' \t"\'\\;'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: What ``systemctl --user reload`` runs: SIGHUP to the daemon ($MAINPID, systemd's argument).
RELOAD_CODE = "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGHUP)"


def systemd_unit(command: Sequence[str], environment: Mapping[str, str], env_file: str,
                 port: int, host: str) -> str:
    """The systemd user unit running ``command`` in the foreground, restarted 5 s after any exit,
    reloaded (SIGHUP) by ``systemctl --user reload``."""
    # The reload signal is sent by the interpreter ExecStart runs: /bin/kill is not everywhere
    # (NixOS has none, and systemd looks a bare `kill` up in a fixed PATH that misses it there).
    reload_line = " ".join([_systemd_escape(command[0], command=True),
                            "-c", _systemd_escape(RELOAD_CODE, command=True), "$MAINPID"])
    env_lines = "".join(f"Environment={_systemd_escape(f'{k}={v}')}\n" for k, v in environment.items())
    return (
        f"{MARKER}\n"
        f"[Unit]\n"
        f"Description=clproxy: Claude Messages API proxy on {host}:{port}\n"
        f"\n"
        f"[Service]\n"
        f"Type=simple\n"
        f"{env_lines}"
        f"EnvironmentFile=-{env_file.replace('%', '%%')}\n"  # one path, no quoting
        f"ExecStart={' '.join(_systemd_escape(word, command=True) for word in command)}\n"
        f"ExecReload={reload_line}\n"  # `systemctl --user reload clproxy`: SIGHUP reloads
        f"Restart=always\n"
        f"RestartSec={RESTART_SECONDS}\n"
        f"KillSignal=SIGTERM\n"
        f"TimeoutStopSec={STOP_TIMEOUT}\n"
        f"\n"
        f"[Install]\n"
        f"WantedBy=default.target\n"
    )


def launchd_plist(command: Sequence[str], environment: Mapping[str, str], log_file: str,
                  working_directory: str) -> bytes:
    """The launchd agent: started at login, kept alive, restarted no sooner than 5 s apart."""
    return plistlib.dumps({
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(command),
        "EnvironmentVariables": dict(environment),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": RESTART_SECONDS,
        "ExitTimeOut": STOP_TIMEOUT,
        "WorkingDirectory": working_directory,
        "StandardOutPath": log_file,
        "StandardErrorPath": log_file,
        "ProcessType": "Background",
    })


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return _digest(f.read())
    except OSError:
        return None


def _write(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    atomic_write(path, data, mode)


def read_manifest(environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, Any]]:
    """What the last install wrote, or ``None``."""
    try:
        with open(manifest_path(environ), "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ServiceError(f"cannot read {manifest_path(environ)}: {e}") from None
    return manifest if isinstance(manifest, dict) else None


def installed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``clproxy proxy install`` put a service in place (its manifest exists)."""
    try:
        return read_manifest(environ) is not None
    except ServiceError:
        return False


# --- install / uninstall --------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class Outcome:
    """What install or uninstall did: ``files`` touched, whether the service ``active`` now, notes."""

    kind: str
    files: List[str] = attr.Factory(list)
    active: bool = False
    notes: List[str] = attr.Factory(list)


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _systemctl(runner: Runner, *args: str) -> Tuple[int, str]:
    return runner(["systemctl", "--user", *args])


def install(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, *, environ: Mapping[str, str] = os.environ,
            platform: str = sys.platform, runner: Runner = run_command,
            python: Optional[str] = None) -> Outcome:
    """Write the service definition (and an empty ``$CLPROXY_HOME/.env`` if there is none), then
    enable and (re)start it. When the service manager cannot be reached the files stay and
    ``Outcome.active`` is false, with a note saying why and what to do."""
    kind = kind_for(platform)
    home = configuration.clproxy_home(environ)
    os.makedirs(home, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(home, "logs"), mode=0o700, exist_ok=True)
    previous = read_manifest(environ) or {}
    outcome = Outcome(kind=kind)
    environment = service_environment(environ)
    command = daemon_command(port, host, environ, python)

    env_file = env_file_path(environ)
    created_env = previous.get("createdEnvFile")
    if not os.path.exists(env_file):
        _write(env_file, ENV_FILE_HEADER.encode(), 0o600)
        created_env = {"path": env_file, "sha256": _digest(ENV_FILE_HEADER.encode())}
        outcome.files.append(env_file)

    if kind == "systemd":
        path = unit_path(environ)
        data = systemd_unit(command, environment, env_file, port, host).encode("utf-8")
    else:
        path = plist_path(environ)
        data = launchd_plist(command, environment, os.path.join(home, "logs", "proxy.log"), home)
    if os.path.exists(path) and path not in previous.get("files", {}) and not _carries_marker(path):
        raise ServiceError(f"{path} exists and was not written by clproxy; move it away first")
    _write(path, data, 0o644)
    outcome.files.append(path)
    manifest = {
        "kind": kind, "files": {path: _digest(data)}, "createdEnvFile": created_env,
        "port": port, "host": host, "command": command,
        "installedAt": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write(manifest_path(environ), (json.dumps(manifest, indent=2) + "\n").encode(), 0o600)

    if kind == "systemd":
        _start_systemd(runner, path, outcome)
    else:
        _start_launchd(runner, path, outcome)
    return outcome


def _carries_marker(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


def _start_systemd(runner: Runner, path: str, outcome: Outcome) -> None:
    code, output = _systemctl(runner, "daemon-reload")
    if code != 0:
        outcome.notes.append(
            f"systemctl --user is not available here ({_first_line(output) or f'exit {code}'}). The unit is "
            f"written to {path}; once a user session manager runs, start it with `systemctl --user "
            f"daemon-reload && systemctl --user enable --now {UNIT_NAME}`, or run `clproxy proxy start`")
        return
    for args in (("enable", UNIT_NAME), ("restart", UNIT_NAME)):
        code, output = _systemctl(runner, *args)
        if code != 0:
            outcome.notes.append(f"`systemctl --user {' '.join(args)}` failed: "
                                 f"{_first_line(output) or f'exit {code}'}")
            return
    outcome.active = True
    outcome.notes.append(f"logs: journalctl --user -u {UNIT_NAME} -f; to keep it running after you log "
                         f"out: loginctl enable-linger")


def _start_launchd(runner: Runner, path: str, outcome: Outcome) -> None:
    domain = f"gui/{_uid()}"
    runner(["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"])  # a previous install; may not exist
    code, output = runner(["launchctl", "bootstrap", domain, path])
    if code != 0:
        code, output = runner(["launchctl", "load", "-w", path])
    if code != 0:
        outcome.notes.append(f"launchctl could not load the agent ({_first_line(output) or f'exit {code}'}). "
                             f"It is written to {path}; load it with `launchctl load -w {shlex.quote(path)}`, "
                             f"or run `clproxy proxy start`")
        return
    outcome.active = True


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def uninstall(*, environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
              runner: Runner = run_command) -> Outcome:
    """Stop and disable the service, then remove what install wrote and nobody changed since."""
    kind = kind_for(platform)
    manifest = read_manifest(environ)
    outcome = Outcome(kind=kind)
    restore_status_line(environ, outcome)  # setup may have set it even without a service (--no-service)
    path = unit_path(environ) if kind == "systemd" else plist_path(environ)
    if manifest is None:
        if os.path.exists(path) and _carries_marker(path):
            manifest = {"files": {path: None}}  # our marker, manifest lost: still ours
        elif os.path.exists(path):
            raise ServiceError(f"{path} was not written by `clproxy proxy install`; left alone")
        else:
            outcome.notes.append("no clproxy service is installed" + ("" if outcome.notes else "; nothing to do"))
            return outcome
    if kind == "systemd":
        code, output = _systemctl(runner, "disable", "--now", UNIT_NAME)
        if code != 0:
            outcome.notes.append(f"could not stop the service with systemctl --user "
                                 f"({_first_line(output) or f'exit {code}'}); if it still runs, stop it "
                                 f"with `clproxy proxy stop`")
    else:
        code, output = runner(["launchctl", "bootout", f"gui/{_uid()}/{LAUNCHD_LABEL}"])
        if code != 0:
            runner(["launchctl", "unload", "-w", path])
    for file, digest in (manifest.get("files") or {}).items():
        _remove_if_unchanged(file, digest, outcome)
    created_env = manifest.get("createdEnvFile")
    if created_env:
        _remove_if_unchanged(created_env["path"], created_env.get("sha256"), outcome,
                             changed_note="kept {path}: it has your settings in it")
    if kind == "systemd":
        _systemctl(runner, "daemon-reload")
    try:
        os.unlink(manifest_path(environ))
    except FileNotFoundError:
        pass
    return outcome


def _remove_if_unchanged(path: str, digest: Optional[str], outcome: Outcome,
                         changed_note: str = "kept {path}: it was changed after install") -> None:
    current = _file_digest(path)
    if current is None:
        return
    if digest is not None and current != digest and not _carries_marker(path):
        outcome.notes.append(changed_note.format(path=path))
        return
    os.unlink(path)
    outcome.files.append(path)


def stop(*, platform: str = sys.platform, runner: Runner = run_command) -> Tuple[bool, str]:
    """Stop the installed service (it would restart a daemon merely killed); ``(ok, message)``."""
    kind = kind_for(platform)
    if kind == "systemd":
        code, output = _systemctl(runner, "stop", UNIT_NAME)
        return code == 0, _first_line(output)
    code, output = runner(["launchctl", "bootout", f"gui/{_uid()}/{LAUNCHD_LABEL}"])
    return code == 0, _first_line(output)


# --- the commands ---------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def install_parser() -> argparse.ArgumentParser:
    """Options of ``clproxy proxy install``."""
    parser = argparse.ArgumentParser(prog="clproxy proxy install",
                                     description="Run the proxy as a per-user service (systemd user unit "
                                                 "on Linux, launchd agent on macOS) that restarts on crash.")
    parser.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT, help="port (default 55669)")
    parser.add_argument("-H", "--host", default=DEFAULT_HOST, help="interface (default 127.0.0.1)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the service file instead of installing it")
    return parser


def install_main(argv: Sequence[str], *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
                 environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                 runner: Runner = run_command) -> int:
    """``clproxy proxy install [-p PORT] [-H HOST] [--print]``."""
    try:
        args = install_parser().parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    try:
        if args.print_only:
            kind = kind_for(platform)
            command = daemon_command(args.port, args.host, environ)
            if kind == "systemd":
                stdout.write(systemd_unit(command, service_environment(environ), env_file_path(environ),
                                          args.port, args.host))
            else:
                home = configuration.clproxy_home(environ)
                stdout.write(launchd_plist(command, service_environment(environ),
                                           os.path.join(home, "logs", "proxy.log"), home).decode())
            return 0
        outcome = install(args.port, args.host, environ=environ, platform=platform, runner=runner)
    except ServiceError as e:
        stderr.write(f"clproxy proxy install: {e}\n")
        return 1
    except OSError as e:
        stderr.write(f"clproxy proxy install: cannot write {e.filename or 'a file'}: {e.strerror or e}\n")
        return 1
    for path in outcome.files:
        stdout.write(f"wrote {path}\n")
    if outcome.active:
        stdout.write(f"clproxy service is running on http://{args.host}:{args.port} and restarts on "
                     f"crash and at login\n")
    for note in outcome.notes:
        stream = stdout if outcome.active else stderr
        stream.write(("" if outcome.active else "warning: ") + note + "\n")
    return 0


def uninstall_main(argv: Sequence[str], *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
                   environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
                   runner: Runner = run_command) -> int:
    """``clproxy proxy uninstall``."""
    parser = argparse.ArgumentParser(prog="clproxy proxy uninstall",
                                     description="Stop the proxy service and remove what "
                                                 "`clproxy proxy install` wrote.")
    try:
        parser.parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    try:
        outcome = uninstall(environ=environ, platform=platform, runner=runner)
    except ServiceError as e:
        stderr.write(f"clproxy proxy uninstall: {e}\n")
        return 1
    except OSError as e:
        stderr.write(f"clproxy proxy uninstall: cannot remove {e.filename or 'a file'}: {e.strerror or e}\n")
        return 1
    for path in outcome.files:
        stdout.write(f"removed {path}\n")
    for note in outcome.notes:
        stdout.write(note + "\n")
    return 0
