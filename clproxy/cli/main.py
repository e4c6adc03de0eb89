"""The ``clproxy`` command: ``clproxy proxy <start|stop|status|setup|install|uninstall|guard>``, ``clproxy auth``,
``clproxy usage``, ``clproxy keys``, ``clproxy statusline``.

``proxy start`` runs the same service as ``twistd -n claudeproxy`` in the foreground, logging to
the terminal; every failure is one line on stderr and a non-zero exit, never a traceback.
Twisted is imported only by the commands that need it: ``clproxy statusline`` runs after every
Claude Code message and must start fast.
"""

import os
import signal
import sys
import time
from typing import Callable, List, Mapping, Optional

USAGE = """usage: clproxy <command> [options]

commands:
  proxy start [options]   run the proxy in the foreground (same options as `twistd -n claudeproxy`)
  proxy stop              stop the running proxy (or the installed service)
  proxy status            show the running proxy, its accounts and counters
  proxy setup             log in if needed, install the service, point Claude Code at the proxy
  proxy install           run the proxy as a per-user service (systemd user unit / launchd agent)
  proxy uninstall         remove that service
  proxy guard             (re)start the fail-open guard for the running proxy
  auth ...                manage accounts (login, import, list, status, refresh, cleanup, enable, set, logout)
  usage [options]         requests, tokens and cost by key, account, model or day (`clproxy usage --help`)
  keys ...                manage client keys (create, list, revoke): who may use this proxy
  statusline              one line for Claude Code's statusLine: the account serving the session
  version                 print clproxy's version (also: clproxy --version)

`clproxy proxy <command> --help` lists each command's options.
"""

STOP_TIMEOUT = 40.0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``clproxy`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from clproxy import version_line
        sys.stdout.write(version_line() + "\n")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "proxy":
            return proxy(rest)
        if command == "auth":
            from clproxy.cli import auth
            return auth.main(rest)
        if command == "usage":
            from clproxy.cli import usage as usage_command
            return usage_command.main(rest)
        if command == "keys":
            from clproxy.cli import keys
            return keys.main(rest)
        if command == "statusline":
            from clproxy.cli import statusline
            return statusline.main(rest)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:  # a bug: still one line, never a traceback
        sys.stderr.write(f"clproxy: unexpected error: {type(e).__name__}: {_one_line(e)}\n")
        return 1
    sys.stderr.write(f"clproxy: unknown command {command!r}\n{USAGE}")
    return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def proxy(argv: List[str]) -> int:
    """``clproxy proxy <command> ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands: Mapping[str, Callable[[List[str]], int]] = {
        "start": start, "stop": stop, "status": status, "setup": setup, "install": install,
        "uninstall": uninstall, "guard": guard,
    }
    if command not in commands:
        sys.stderr.write(f"clproxy: unknown proxy command {command!r}\n{USAGE}")
        return 2
    return commands[command](rest)


def start(argv: List[str], environ: Mapping[str, str] = os.environ) -> int:
    """Run the daemon in the foreground until interrupted (SIGINT/SIGTERM drain, then exit)."""
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    from clproxy.daemon import runstate
    from clproxy.daemon.assemble import cannot_listen
    from clproxy.daemon.tap import Options, makeService

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        # one line: the whole option list buried the problem
        sys.stderr.write(f"clproxy proxy start: {e} (`clproxy proxy start --help` lists the options)\n")
        return 2
    try:
        # the same service as `twistd -n claudeproxy`, lifecycle (state file, Claude Code's
        # settings, guard) included: nothing is wired here
        service = makeService(options, reactor, environ)
        lifecycle = service.lifecycle
    except SystemExit as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except (OSError, runstate.StateError) as e:
        sys.stderr.write(f"clproxy: cannot start: {_one_line(e)}\n")
        return 1
    try:
        service.startService()
    except CannotListenError as e:
        sys.stderr.write(f"{cannot_listen(e)}\n")
        _cleanup(lifecycle)
        return 1
    except Exception as e:
        sys.stderr.write(f"clproxy: could not start: {type(e).__name__}: {_one_line(e)}\n")
        _cleanup(lifecycle)
        return 1
    # Logging starts once the port is bound, so a failed start prints its one line and nothing else.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    try:
        reactor.run()
    finally:
        _cleanup(lifecycle)
    return 0


def _cleanup(lifecycle) -> None:
    if lifecycle is not None:
        lifecycle.cleanup()


def _looks_like_clproxy(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"clproxy" in cmdline or b"claudeproxy" in cmdline


def stop(argv: List[str], environ: Mapping[str, str] = os.environ,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """``clproxy proxy stop [--timeout SECONDS]``: stop the service, or SIGTERM the recorded daemon."""
    import argparse

    from clproxy.daemon import runstate
    from clproxy.cli import service
    from clproxy.cli.argparsing import seconds

    parser = argparse.ArgumentParser(prog="clproxy proxy stop",
                                     description="Stop the running proxy: it drains in-flight requests "
                                                 "and restores Claude Code's settings.")
    parser.add_argument("--timeout", type=seconds, default=STOP_TIMEOUT,
                        help="seconds to wait for it to exit (default 40)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    if service.installed(environ):
        ok, message = service.stop()
        if ok:
            sys.stdout.write("stopped the clproxy service (`clproxy proxy uninstall` removes it; it starts "
                             "again at login)\n")
            return 0
        sys.stderr.write(f"warning: could not stop the service ({message or 'no service manager'}); "
                         f"signalling the process instead\n")
    path = runstate.state_path(environ)
    status_, state = runstate.inspect(path)
    if status_ == "none":
        sys.stderr.write(f"clproxy is not running (no {path})\n")
        return 1
    if status_ == "corrupt":
        runstate.remove_state(path)
        sys.stderr.write(f"clproxy: removed unreadable {path}; no running proxy is known\n")
        return 1
    pid = state.get("pid")
    if status_ == "stale" and not (runstate.pid_alive(pid) and _looks_like_clproxy(pid)):
        runstate.ensure_not_running(path)
        sys.stderr.write(f"clproxy is not running (removed stale state of pid {pid})\n")
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as e:
        sys.stderr.write(f"clproxy: cannot stop pid {pid}: {e.strerror}\n")
        return 1
    deadline = time.monotonic() + args.timeout
    while runstate.pid_alive(pid):
        if time.monotonic() >= deadline:
            sys.stderr.write(f"clproxy (pid {pid}) is still draining after {args.timeout:g}s\n")
            return 1
        sleep(0.1)
    sys.stdout.write(f"stopped clproxy (pid {pid})\n")
    return 0


def status(argv: List[str]) -> int:
    """``clproxy proxy status``: see :mod:`clproxy.cli.status`."""
    try:
        from clproxy.cli import status as status_command
    except ImportError:
        sys.stderr.write("clproxy proxy status is not available in this build\n")
        return 1
    return status_command.main(argv)


def setup(argv: List[str]) -> int:
    """``clproxy proxy setup``: see :mod:`clproxy.cli.setup`."""
    from clproxy.cli import setup as setup_command
    return setup_command.main(argv)


def install(argv: List[str]) -> int:
    """``clproxy proxy install``: see :mod:`clproxy.cli.service`."""
    from clproxy.cli import service
    return service.install_main(argv)


def uninstall(argv: List[str]) -> int:
    """``clproxy proxy uninstall``: see :mod:`clproxy.cli.service`."""
    from clproxy.cli import service
    return service.uninstall_main(argv)


def guard(argv: List[str]) -> int:
    """``clproxy proxy guard``: see :mod:`clproxy.cli.guard`."""
    from clproxy.cli import guard as guard_command
    return guard_command.main(argv)


if __name__ == "__main__":
    sys.exit(main())
