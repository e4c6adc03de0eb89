"""The running daemon's footprint: ``$CLPROXY_HOME/proxy-state.json`` and Claude Code's settings.

:class:`Lifecycle` is a service that, once the port listens, records the instance (pid, address,
strategy, fallback chain, guard pid), points Claude Code at it and starts the fail-open guard; on every
way out it undoes exactly that. :func:`claim_home` refuses a second instance (one starting at the
same moment too), :func:`ensure_not_running` cleans a stale one.
"""

import atexit
import datetime
import errno
import json
import os
import signal
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application import service

from clproxy import config as configuration
from clproxy.daemon import guard_spawn
from clproxy.state.files import atomic_write
from clproxy.integrations import claude_settings
from clproxy.observe import console

log = console.logger(__name__)

STATE_FILE_NAME = "proxy-state.json"
STATE_VERSION = 1

#: Options ``twistd -n claudeproxy`` and ``clproxy proxy start`` add for this (see docs/operations.rst).
OPTION_PARAMETERS = [
    ["claude-settings", None, "auto",
     "Claude Code settings file pointed at the proxy while it runs ('auto': $CLPROXY_CLAUDE_SETTINGS "
     "or ~/.claude/settings.json; 'off': leave Claude Code alone)."],
    ["tool-search", None, claude_settings.DEFAULT_TOOL_SEARCH,
     "Value of ENABLE_TOOL_SEARCH set for Claude Code while the proxy runs ('off': leave it alone)."],
]
OPTION_FLAGS = [
    ["no-guard", None, "Do not start the fail-open guard (`clproxy proxy guard`)."],
]


class StateError(Exception):
    """The state file cannot be read or written; one line for the user."""


class AlreadyRunning(SystemExit):
    """Another instance is running (its pid is alive and its /health answers).

    A ``SystemExit`` so that twistd and the CLI print the one line and exit 1.
    """

    def __init__(self, state: Mapping[str, Any], path: str):
        self.state = dict(state)
        self.path = path
        super().__init__(describe_running(state, path))


def describe_running(state: Mapping[str, Any], path: str) -> str:
    """The one-line refusal naming the running instance."""
    return (f"clproxy: already running (pid {state.get('pid')}, {state.get('url') or _url(state)}, "
            f"strategy {state.get('strategy')}, since {state.get('startedAt', '?')}); stop it with "
            f"`clproxy proxy stop`, or see `clproxy proxy status` (state: {path})")


# --- stopping the reactor -------------------------------------------------------------------------


def stop_reactor(reactor) -> bool:
    """Stop ``reactor`` unless it is already stopping or stopped; whether this call stopped it.

    Every stop path (signals, a finished command) goes through here: a second Ctrl-C, or a command
    finishing while a signal's stop is queued, used to raise ``ReactorNotRunning`` with a traceback.
    """
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        return False
    return True


#: What a second SIGINT/SIGTERM calls, while the daemon drains (:func:`on_second_signal`).
_second_signal_callbacks: List[Callable[[], None]] = []


def on_second_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` when a stop signal comes while the reactor is already stopping (the
    impatient second Ctrl-C: the drain gives up at once); returns what unregisters it."""
    _second_signal_callbacks.append(callback)

    def unregister() -> None:
        if callback in _second_signal_callbacks:
            _second_signal_callbacks.remove(callback)
    return unregister


def stop_or_hurry(reactor) -> None:
    """Stop ``reactor``; when it is already stopping (a second signal), stop now: every
    :func:`on_second_signal` callback is called."""
    if stop_reactor(reactor):
        return
    log.info("stopping now: requests still in flight are cut")
    for callback in list(_second_signal_callbacks):
        try:
            callback()
        except Exception:
            log.failure("stopping now failed")


def quiet_signal_stops(reactor) -> None:
    """Make SIGINT/SIGTERM/SIGBREAK stop ``reactor`` through :func:`stop_or_hurry` (call before
    ``reactor.run()``, which installs them): Twisted's own handlers call ``reactor.stop()`` once
    per signal, so a second signal during shutdown printed a ``ReactorNotRunning`` traceback, and
    did not hurry the drain either."""
    if not hasattr(reactor, "sigInt") or not hasattr(reactor, "callFromThread"):
        return  # a test clock: no signals

    def handler_for(name: str):
        def handler(number, frame=None) -> None:
            log.info("received {signal}, shutting down", signal=name)
            reactor.callFromThread(stop_or_hurry, reactor)
            reactor._exitSignal = number  # as Twisted's handler: twistd re-raises it on exit
        return handler

    for attribute, name in (("sigInt", "SIGINT"), ("sigTerm", "SIGTERM"), ("sigBreak", "SIGBREAK")):
        setattr(reactor, attribute, handler_for(name))
    # and now, not only once reactor.run() installs them: a daemon that has bound its port and
    # written its state is a running one, and a signal before the loop runs (a stop while it was
    # starting) must stop it as any other, not kill it with its state left behind (the stop is
    # queued and carried out as soon as the loop runs). Not in a process whose reactor already
    # runs (a test's): its signals are its own
    if not reactor.running and threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), handler_for(name))


# --- the state file -------------------------------------------------------------------------------


def state_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME/proxy-state.json``."""
    return os.path.join(configuration.clproxy_home(environ), STATE_FILE_NAME)


def read_state(path: str) -> Optional[Dict[str, Any]]:
    """The recorded instance, or ``None`` when there is none; an unreadable file raises :class:`StateError`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateError(f"{path} is not valid JSON") from None
    if not isinstance(state, dict):
        raise StateError(f"{path} is not a JSON object")
    return state


def write_state(path: str, state: Mapping[str, Any]) -> None:
    """Replace the state file atomically, mode 0600 (temp file, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    atomic_write(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o600)


def remove_state(path: str, pid: Optional[int] = None) -> bool:
    """Delete the state file (only if it names ``pid``, when given); whether it was removed."""
    if pid is not None:
        try:
            current = read_state(path)
        except StateError:
            return False
        if current is None or current.get("pid") != pid:
            return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# --- one daemon per home -------------------------------------------------------------------------

#: the homes this process has claimed: lock path -> [open descriptor, claims]
_claims: Dict[str, list] = {}


class HomeClaim:
    """This process's exclusive ``flock`` on ``$CLPROXY_HOME/proxy-state.lock``, held while a
    daemon runs on that home: two daemons started at once both found no state file and both ran
    (the state file then named only one). The kernel drops the lock when the process dies, even
    by SIGKILL, so a killed daemon never blocks the next start. Within one process claims are
    counted (tests build several daemons on one home), not refused."""

    def __init__(self, path: str):
        self.path = path
        self._released = False

    @classmethod
    def take(cls, state_file: str) -> Optional["HomeClaim"]:
        """Claim the home of ``state_file``; None when another process holds it."""
        import fcntl

        path = os.path.join(os.path.dirname(os.path.abspath(state_file)), "proxy-state.lock")
        held = _claims.get(path)
        if held is not None:
            held[1] += 1
            return cls(path)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        _claims[path] = [fd, 1]
        return cls(path)

    def release(self) -> None:
        """Let go of this claim (the lock itself once the process holds no other); idempotent."""
        if self._released:
            return
        self._released = True
        held = _claims.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _claims[self.path]
            os.close(held[0])  # closing the descriptor drops the flock


def claim_home(path: str, alive: Optional[Callable[[Any], bool]] = None,
               healthy: Optional[Callable[[str], bool]] = None) -> HomeClaim:
    """Claim the home of the state file ``path`` for this daemon, then clean a stale record
    (:func:`ensure_not_running`). Raises :class:`AlreadyRunning` (or a ``SystemExit`` of one
    line while the other is still starting) when another daemon has it."""
    try:
        claim = HomeClaim.take(path)
    except OSError as e:
        raise StateError(f"cannot lock {os.path.dirname(os.path.abspath(path))}: {e.strerror or e}") from None
    if claim is None:
        try:
            state = read_state(path)
        except StateError:
            state = None
        if state is not None and (alive or pid_alive)(state.get("pid")):
            raise AlreadyRunning(state, path)
        raise SystemExit(f"clproxy: another clproxy is starting with this CLPROXY_HOME "
                         f"({os.path.dirname(os.path.abspath(path))}); see `clproxy proxy status`")
    try:
        ensure_not_running(path, alive, healthy)
    except BaseException:
        claim.release()
        raise
    return claim


# --- is it alive? ---------------------------------------------------------------------------------


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a killed child nobody reaped yet)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
        if e.errno != errno.EPERM:
            return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ')' (comm may contain one)
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) is all we know


def connect_host(host: str) -> str:
    """The address a client on this machine uses for a daemon bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def base_url(host: str, port: int) -> str:
    """``http://host:port`` for a client on this machine (IPv6 in brackets)."""
    host = connect_host(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _url(state: Mapping[str, Any]) -> str:
    return base_url(str(state.get("host") or "127.0.0.1"), int(state.get("port") or 0))


def health_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET <url>/health`` answers 200 with ``"status": "ok"`` (blocking; CLI and startup only)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200 and json.loads(response.read()).get("status") == "ok"
    except Exception:
        return False


def inspect(path: str, alive: Optional[Callable[[Any], bool]] = None,
            healthy: Optional[Callable[[str], bool]] = None) -> Tuple[str, Optional[Dict[str, Any]]]:
    """``("running", state)``, ``("stale", state)``, ``("none", None)`` or ``("corrupt", None)``.

    Running means the recorded pid is alive AND its /health answers; anything else recorded is stale.
    ``alive`` and ``healthy`` default to :func:`pid_alive` and :func:`health_ok`.
    """
    alive = alive or pid_alive
    healthy = healthy or health_ok
    try:
        state = read_state(path)
    except StateError:
        return "corrupt", None
    if state is None:
        return "none", None
    if alive(state.get("pid")) and healthy(state.get("url") or _url(state)):
        return "running", state
    return "stale", state


def ensure_not_running(path: str, alive: Optional[Callable[[Any], bool]] = None,
                       healthy: Optional[Callable[[str], bool]] = None) -> Optional[Dict[str, Any]]:
    """Raise :class:`AlreadyRunning` if an instance runs; clean a stale record (undoing its Claude Code
    settings change) and return it, logging why."""
    alive = alive or pid_alive
    status, state = inspect(path, alive, healthy)
    if status == "corrupt":
        log.warn("removing unreadable proxy state file {path}", path=path)
        remove_state(path)
        return None
    if state is None:  # "none": nothing recorded
        return None
    if status == "running":
        raise AlreadyRunning(state, path)
    if status == "stale":
        reason = ("is gone" if not alive(state.get("pid")) else "is alive but its /health does not answer "
                  "(not a clproxy, or hung)")
        log.warn("removing stale proxy state {path}: pid {pid} {reason}", path=path,
                 pid=state.get("pid"), reason=reason)
        undo_claude_settings(state, why="a previous run did not clean up")
        remove_state(path)
    return state


def undo_claude_settings(state: Mapping[str, Any], why: str) -> bool:
    """Restore what ``state`` says was changed in Claude Code's settings; whether anything was."""
    record = state.get("claudeSettings")
    if not record:
        return False
    try:
        restored = claude_settings.restore(record)
    except (claude_settings.SettingsError, KeyError, TypeError, AttributeError) as e:
        log.warn("could not restore Claude Code settings ({why}): {error}", why=why, error=str(e))
        return False
    if restored:
        log.info("Claude Code settings {path}: removed the proxy's {keys} ({why})",
                 path=record.get("path"), keys=", ".join(restored), why=why)
    return bool(restored)


# --- the lifecycle service ------------------------------------------------------------------------


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def chain_of(cfg) -> list:
    """The config's fallback chain as it appears in the state file."""
    return [{"provider": t.provider, "model": t.model} for t in cfg.routing.fallback_chain]


class Lifecycle(service.Service):
    """Records the running instance, configures Claude Code and starts the guard; undoes it on stop.

    Add it to the daemon's ``MultiService`` after the listening port, so it starts once the port is
    bound (and stops first). :meth:`cleanup` is idempotent and also registered with ``atexit``.
    """

    name = "lifecycle"  # type: ignore[assignment]  # Service declares `name = None` without a type

    def __init__(self, *, path: str, address: Callable[[], Optional[Tuple[str, int]]],
                 strategy: Callable[[], Optional[str]], fallback_chain: Callable[[], Sequence[Mapping]] = list,
                 settings_path: Optional[str] = None, tool_search: Optional[str] = "true",
                 guard: bool = True, config_path: Optional[str] = None,
                 environ: Mapping[str, str] = os.environ, now: Callable[[], float] = time.time,
                 spawn_guard: Optional[Callable[..., int]] = None, pid: Optional[int] = None,
                 claim: Optional[HomeClaim] = None):
        self.path = path
        #: this daemon's hold on its home (released by :meth:`cleanup`)
        self.claim = claim
        self.address = address
        self.strategy = strategy
        self.fallback_chain = fallback_chain
        self.settings_path = settings_path
        self.tool_search = tool_search
        self.guard = guard
        self.config_path = config_path
        self.environ = environ
        self.now = now
        self.spawn_guard = spawn_guard
        self.pid = os.getpid() if pid is None else pid
        self.state: Optional[Dict[str, Any]] = None
        self.guard_pid: Optional[int] = None
        self._cleaned = True

    def startService(self):
        """Write the state file, point Claude Code here, start the guard."""
        super().startService()
        host, port = self.address() or ("127.0.0.1", 0)
        url = base_url(host, port)
        started = self.now()
        self.state = {
            "version": STATE_VERSION, "pid": self.pid, "host": host, "port": port, "url": url,
            "strategy": self.strategy(), "startTime": started, "startedAt": _iso(started),
            "fallbackChain": list(self.fallback_chain()), "guardPid": None,
            "configPath": self.config_path, "claudeSettings": None,
        }
        self._cleaned = False
        atexit.register(self.cleanup)
        write_state(self.path, self.state)
        if self.settings_path:
            values = claude_settings.proxy_env(url, self.tool_search)
            try:
                record = claude_settings.configure(self.settings_path, values)
            except claude_settings.SettingsError as e:
                log.warn("{error}. Claude Code was not configured: set env.ANTHROPIC_BASE_URL={url} "
                         "in its settings yourself", error=str(e), url=url)
            else:
                self.state["claudeSettings"] = record
                write_state(self.path, self.state)
                log.info("Claude Code settings {path}: env.ANTHROPIC_BASE_URL={url} (restart Claude Code "
                         "to pick it up; removed again when the proxy stops)",
                         path=self.settings_path, url=url)
        if self.guard:
            self._start_guard()

    def _start_guard(self) -> None:
        spawn = self.spawn_guard if self.spawn_guard is not None else guard_spawn.spawn
        assert self.state is not None  # written by startService before the guard starts
        try:
            self.guard_pid = spawn(pid=self.pid, state=self.path, url=self.state["url"], environ=self.environ)
        except Exception as e:  # the proxy works without it; say so
            log.warn("could not start the fail-open guard: {error}", error=str(e) or type(e).__name__)
            return
        self.state["guardPid"] = self.guard_pid
        write_state(self.path, self.state)

    def update(self, **fields: Any) -> None:
        """Rewrite fields of the state file (e.g. ``strategy``, ``fallbackChain`` after a reload)."""
        if self.state is None or self._cleaned:
            return
        self.state.update(fields)
        try:
            write_state(self.path, self.state)
        except OSError as e:
            log.warn("could not update {path}: {error}", path=self.path, error=e.strerror or str(e))

    def config_reloaded(self, strategy: Optional[str], cfg) -> None:
        """A reloaded config is in force: rewrite the state file's strategy and fallback chain."""
        self.update(strategy=strategy, fallbackChain=chain_of(cfg))

    def stopService(self):
        """Undo everything :meth:`startService` did."""
        self.cleanup()
        return super().stopService()

    def cleanup(self) -> None:
        """Restore Claude Code's settings, remove the state file, stop the guard, let go of the
        home; safe to call twice."""
        if self._cleaned:
            if self.claim is not None and not self.running:
                self.claim.release()  # never started (the port was taken): nothing else to undo
            return
        self._cleaned = True
        try:
            atexit.unregister(self.cleanup)
        except Exception:
            pass
        if self.state is not None:
            undo_claude_settings(self.state, why="the proxy stopped")
        remove_state(self.path, pid=self.pid)
        if self.guard_pid:
            try:
                os.kill(self.guard_pid, signal.SIGTERM)
            except OSError:
                pass
        if self.claim is not None:
            self.claim.release()  # after the state file is gone: the next daemon may start


def lifecycle_enabled(options: Mapping[str, Any]) -> bool:
    """Whether these options ask for the lifecycle (parsed options do; a plain dict in tests does not)."""
    return options.get("claude-settings") is not None


def attach_lifecycle(top: service.MultiService, options: Mapping[str, Any],
                     environ: Mapping[str, str] = os.environ, *,
                     strategy: Optional[Callable[[], Optional[str]]] = None,
                     fallback_chain: Callable[[], Sequence[Mapping]] = list,
                     config_path: Optional[str] = None,
                     alive: Optional[Callable[[Any], bool]] = None,
                     healthy: Optional[Callable[[str], bool]] = None) -> Optional[Lifecycle]:
    """Refuse to run twice (raises :class:`AlreadyRunning`), then add a :class:`Lifecycle` to ``top``.

    Call after the listening service was added to ``top``. Idempotent (``top.lifecycle``). Does nothing
    and returns ``None`` when ``options`` has no ``claude-settings`` key (programmatic use, tests).
    """
    existing = getattr(top, "lifecycle", None)
    if existing is not None:
        return existing
    if not lifecycle_enabled(options):
        return None
    path = state_path(environ)
    claim = claim_home(path, alive, healthy)
    choice = str(options.get("claude-settings")).strip()
    if choice.lower() == "auto":
        settings_path = claude_settings.default_settings_path(environ)
    elif choice.lower() in claude_settings.OFF_VALUES:
        settings_path = None
    else:
        settings_path = os.path.abspath(os.path.expanduser(choice))
    if strategy is None:
        pool = getattr(top, "pool", None)
        strategy = (lambda: pool.strategy) if pool is not None else (lambda: options.get("strategy"))
    # The tap attaches `address` (and below `lifecycle`) to its MultiService, which does not declare them.
    address = top.address  # type: ignore[attr-defined]
    lifecycle = Lifecycle(
        path=path, address=address, strategy=strategy, fallback_chain=fallback_chain,
        settings_path=settings_path, tool_search=options.get("tool-search"),
        guard=not options.get("no-guard"), config_path=config_path, environ=environ, claim=claim)
    lifecycle.setServiceParent(top)
    top.lifecycle = lifecycle  # type: ignore[attr-defined]
    return lifecycle

