"""The ``clproxy`` command: ``clproxy proxy start ...``, ``clproxy auth ...``.

``proxy start`` runs the same service as ``twistd -n claudeproxy`` in the foreground, logging to
the terminal; every failure is one line on stderr and a non-zero exit, never a traceback.
"""

import sys
from typing import List, Optional

from twisted.python import usage

USAGE = """usage: clproxy <command> [options]

commands:
  proxy start [options]   run the proxy in the foreground (same options as `twistd -n claudeproxy`)
  auth ...                manage accounts (login, import, list, status, refresh, cleanup, enable, logout)

`clproxy proxy start --help` lists the proxy's options.
"""


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``clproxy`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "proxy":
            return proxy(rest)
        if command == "auth":
            from . import auth
            return auth.main(rest)
    except KeyboardInterrupt:
        return 130
    sys.stderr.write(f"clproxy: unknown command {command!r}\n{USAGE}")
    return 2


def proxy(argv: List[str]) -> int:
    """``clproxy proxy <start|...>``."""
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] == "start":
        return start(argv[1:])
    sys.stderr.write(f"clproxy: unknown proxy command {argv[0]!r}\n{USAGE}")
    return 2


def start(argv: List[str]) -> int:
    """Run the daemon in the foreground until interrupted."""
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from ..tap import Options, makeService

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"clproxy proxy start: {e}\n{options}")
        return 2
    try:
        service = makeService(options, reactor)
    except SystemExit as e:
        sys.stderr.write(f"{e}\n")
        return 1
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    try:
        service.startService()
    except CannotListenError as e:
        sys.stderr.write(f"clproxy: cannot listen on {options['host']}:{options['port']}: "
                         f"{e.socketError}\n")
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
