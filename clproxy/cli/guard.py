"""The fail-open guard: a detached process that watches the daemon's pid and ``/health``.

If the daemon dies without cleaning up (SIGKILL, OOM, a crash), the guard takes the proxy's entries
back out of Claude Code's settings, so Claude Code goes direct instead of failing on a dead port.
"""

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO, cast

from twisted.internet import defer, task

from clproxy.daemon import runstate
# Launching the guard is the daemon's job (daemon/ never imports cli/); the command reuses it.
from clproxy.daemon.guard_spawn import FAILURES, INTERVAL, spawn
from clproxy.observe import console

log = console.logger(__name__)

PROBE_TIMEOUT = 3.0


class Guard:
    """Watches one daemon; :meth:`start` returns a Deferred that fires with why the watch ended.

    Each tick re-reads the state file: gone or naming another pid means the daemon cleaned up (nothing
    to do). A dead pid, or ``failures`` failed health probes in a row, means it did not: the guard
    restores Claude Code's settings (and removes the dead daemon's state file).
    """

    def __init__(self, *, clock, pid: int, state_path: str, probe: Callable[[], "defer.Deferred"],
                 alive: Callable[[Any], bool] = runstate.pid_alive, interval: float = INTERVAL,
                 failures: int = FAILURES):
        self.clock = clock
        self.pid = pid
        self.state_path = state_path
        self.probe = probe
        self.alive = alive
        self.interval = interval
        self.failures = failures
        self.failed = 0
        self.done: defer.Deferred = defer.Deferred()
        self._loop: Optional[task.LoopingCall] = None

    def start(self) -> defer.Deferred:
        """Start watching; the result fires with the reason the guard stopped."""
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(self._crashed)
        return self.done

    def _crashed(self, failure) -> None:
        log.failure("guard check failed", failure)
        self._finish("the guard hit an internal error")

    def _finish(self, reason: str) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.done.called:
            log.info("guard exiting: {reason}", reason=reason)
            self.done.callback(reason)

    def _ours(self) -> Optional[dict]:
        try:
            state = runstate.read_state(self.state_path)
        except runstate.StateError:
            return None
        if state is None or state.get("pid") != self.pid:
            return None
        return state

    @defer.inlineCallbacks
    def tick(self):
        """One check of the daemon (run every ``interval`` seconds)."""
        state = self._ours()
        if state is None:
            self._finish(f"proxy pid {self.pid} cleaned up after itself")
            return
        if not self.alive(self.pid):
            self._fail_open(state, f"proxy pid {self.pid} is gone")
            return
        try:
            healthy = yield self.probe()
        except Exception:
            healthy = False
        if healthy:
            self.failed = 0
            return
        self.failed += 1
        if self.failed >= self.failures:
            state = self._ours()
            if state is not None:
                self._fail_open(state, f"proxy pid {self.pid} did not answer /health {self.failed} times")
            else:
                self._finish(f"proxy pid {self.pid} cleaned up after itself")

    def _fail_open(self, state: dict, reason: str) -> None:
        log.warn("{reason}; taking the proxy out of Claude Code's settings", reason=reason)
        runstate.undo_claude_settings(state, why=reason)
        if not self.alive(self.pid):
            runstate.remove_state(self.state_path, pid=self.pid)
        else:
            # Still there but not answering: keep its record for `status`, without the settings part.
            state["claudeSettings"] = None
            state["guardPid"] = None
            try:
                runstate.write_state(self.state_path, state)
            except OSError:
                pass
        self._finish(reason)

    def last_look(self) -> None:
        """On SIGTERM (e.g. systemd stopping the unit after the daemon died): fail open if it is dead."""
        if self.done.called:
            return
        state = self._ours()
        if state is not None and not self.alive(self.pid):
            self._fail_open(state, f"proxy pid {self.pid} is gone")
        else:
            self._finish("terminated")


def http_probe(reactor, url: str, timeout: float = PROBE_TIMEOUT) -> Callable[[], defer.Deferred]:
    """A probe: ``GET <url>/health`` answers 200 within ``timeout`` seconds."""
    import treq
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    health = url.rstrip("/") + "/health"

    @defer.inlineCallbacks
    def probe():
        response = yield treq.get(health, timeout=timeout, pool=pool, reactor=reactor)
        yield treq.content(response)
        return response.code == 200

    return probe


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clproxy proxy guard",
        description="Watch the running proxy; if it dies without cleaning up, take it out of Claude "
                    "Code's settings. Started by `clproxy proxy start`; run it by hand to re-arm.")
    parser.add_argument("--foreground", action="store_true", help="watch in this process (default: detach)")
    parser.add_argument("--pid", type=int, help="the daemon's pid (default: from the state file)")
    parser.add_argument("--state", help="the state file (default: $CLPROXY_HOME/proxy-state.json)")
    parser.add_argument("--url", help="the daemon's base URL (default: from the state file)")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="seconds between checks")
    parser.add_argument("--failures", type=int, default=FAILURES,
                        help="failed /health probes in a row that count as dead")
    return parser


def main(argv: Sequence[str], *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         environ: Mapping[str, str] = os.environ) -> int:
    """``clproxy proxy guard``: detach a guard for the running daemon (``--foreground``: be the guard)."""
    parser = _parser(stdout, stderr)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    if args.interval <= 0 or args.failures < 1:
        stderr.write("clproxy proxy guard: --interval must be > 0 and --failures >= 1\n")
        return 2
    path = args.state or runstate.state_path(environ)
    pid, url = args.pid, args.url
    if pid is None or url is None:
        try:
            state = runstate.read_state(path)
        except runstate.StateError as e:
            stderr.write(f"clproxy proxy guard: {e}\n")
            return 1
        if state is None or not runstate.pid_alive(state.get("pid")):
            stderr.write(f"clproxy proxy guard: no running proxy recorded in {path}; nothing to guard\n")
            return 1
        pid = state["pid"] if pid is None else pid
        url = (state.get("url") or runstate.base_url(state.get("host", "127.0.0.1"), state.get("port", 0))
               if url is None else url)
    if not args.foreground:
        try:
            guard_pid = spawn(pid=pid, state=path, url=url, environ=environ, interval=args.interval,
                              failures=args.failures)
        except OSError as e:
            stderr.write(f"clproxy proxy guard: cannot start: {e.strerror or e}\n")
            return 1
        try:
            state = runstate.read_state(path)
            if state is not None and state.get("pid") == pid:
                state["guardPid"] = guard_pid
                runstate.write_state(path, state)
        except (runstate.StateError, OSError):
            pass
        stdout.write(f"guard started (pid {guard_pid}), watching clproxy pid {pid} at {url}\n")
        return 0
    return _run_foreground(pid, path, url, args.interval, args.failures, stdout)


def _run_foreground(pid: int, path: str, url: str, interval: float, failures: int, stdout: TextIO) -> int:
    from twisted.internet import reactor
    from twisted.logger import (FilteringLogObserver, ILogFilterPredicate, LogLevel, PredicateResult,
                                globalLogBeginner, textFileLogObserver)

    def ours_or_serious(event) -> PredicateResult:
        # The probe's HTTP client announces every connection; keep the guard's log to what it decides.
        level = event.get("log_level") or LogLevel.info
        if event.get("log_namespace", "").startswith("clproxy") or level >= LogLevel.warn:
            return PredicateResult.maybe
        return PredicateResult.no

    # A plain function is a valid predicate (Twisted calls it); cast() says so to the type checker.
    predicate = cast(ILogFilterPredicate, ours_or_serious)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(stdout), [predicate])],
                                     redirectStandardIO=False)
    guard = Guard(clock=reactor, pid=pid, state_path=path, probe=http_probe(reactor, url),
                  interval=interval, failures=failures)
    log.info("guard watching clproxy pid {pid} at {url} (state {path})", pid=pid, url=url, path=path)
    reactor.addSystemEventTrigger("before", "shutdown", guard.last_look)

    def started():
        guard.start().addBoth(lambda _: runstate.stop_reactor(reactor))  # a signal may have stopped it first

    runstate.quiet_signal_stops(reactor)

    reactor.callWhenRunning(started)
    reactor.run()
    return 0
