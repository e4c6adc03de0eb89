"""Starting the fail-open guard process from the daemon.

The guard itself is a command (``clproxy proxy guard``, :mod:`clproxy.cli.guard`); the daemon only
launches it as a detached process. This lives on the daemon side so that ``daemon/`` never imports
``cli/`` (the command imports the daemon's run state, not the other way round).
"""

import os
import subprocess
import sys
from typing import List, Mapping

from clproxy import config as configuration

#: Seconds between the guard's probes, and failed probes in a row before it acts.
INTERVAL = 1.0
FAILURES = 3
#: Popen objects of guards started by this process (kept so they are not reported as leaked).
_spawned: List[subprocess.Popen] = []


def _python_path(environ: Mapping[str, str]) -> str:
    # The guard runs `python -m clproxy` from cwd "/": it must find this very source tree.
    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(filter(None, [source, environ.get("PYTHONPATH")]))


def spawn(*, pid: int, state: str, url: str, environ: Mapping[str, str] = os.environ,
          interval: float = INTERVAL, failures: int = FAILURES) -> int:
    """Start a detached guard (its own session, stdin closed, output to ``$CLPROXY_HOME/logs/guard.log``)."""
    env = dict(environ)
    env["PYTHONPATH"] = _python_path(environ)
    logs = os.path.join(configuration.clproxy_home(environ), "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    with open(os.path.join(logs, "guard.log"), "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clproxy", "proxy", "guard", "--foreground", "--pid", str(pid),
             "--state", state, "--url", url, "--interval", str(interval), "--failures", str(failures)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/",
            close_fds=True, start_new_session=True)
    _spawned.append(process)
    return process.pid
