"""``--workers N``: a small supervisor process owns the one listening socket and N worker processes
serve it, acting as one daemon through the Redis state store.

Why a shared socket and not ``SO_REUSEPORT``: the supervisor binds and listens once and hands the
listening descriptor to each worker (``spawnProcess`` ``childFDs``), which adopts it
(``adoptStreamPort``). The kernel then gives each connection to whichever worker accepts first, and
each worker keeps to its share through the connection counts all of them see
(:mod:`clproxy.daemon.shares`: a worker ahead of the others leaves them the next connection). That
works the same on Linux and macOS (macOS accepts ``SO_REUSEPORT`` but does not balance connections
over the sockets), never opens a window where a second program can bind the port, and the port stays
open (connections queue in the backlog) while a dead worker is restarted.

What is shared and how: cooldowns, the refresh single-flight, session bindings, key limits and usage
counters live in the state store. The ``memory`` backend is a Python object in each process, so
``workers > 1`` requires ``state.backend: redis`` (the same store that makes several instances on
several machines act as one) and is refused at start otherwise. The files each process writes are
safe with N writers: the token store and the key file take an ``flock`` around read-modify-write,
the JSONL logs are opened ``O_APPEND`` and written a whole batch of lines per ``write``, the usage
ledger is SQLite in WAL mode (its own locking), the quota snapshot is an atomic rename of a cache.
Only the supervisor writes ``proxy-state.json`` and Claude Code's settings and starts the guard.
It also watches the config: a reload (SIGHUP or a changed file) is checked as one process checks
it, written to the state file and passed on to the workers (SIGHUP); a bad one changes nothing.

``/metrics`` acts as one daemon's: each worker publishes its metrics to the store under the
supervisor's run id every second, and a scrape on any worker answers the sums over all of them
(:mod:`clproxy.observe.aggregate`; a replaced worker's totals stay in the sums, so counters never go
down). ``/health`` and ``/status`` are answered by whichever worker takes the connection: what they
read from the store (cooldowns, sessions, key usage) is global; their in-process figures (requests
served, latencies) are that worker's own (``/status`` names it under ``worker``).
"""

import os
import signal
import socket
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Mapping, Optional

from twisted.application import service
from twisted.internet import defer, error, protocol, task

from clproxy.daemon import runstate
from clproxy.daemon.shares import BOARD_FD_VARIABLE, WORKER_BOARD_FD, ConnectionBoard
from clproxy.observe import console

log = console.logger(__name__)

#: A worker that dies sooner than this after its start counts as failing to start (backoff grows).
QUICK_DEATH_SECONDS = 10.0
#: The descriptor number the listening socket has in a worker.
WORKER_LISTEN_FD = 3
#: The environment variable naming the supervisor's pid to its workers (each stops once its parent
#: is no longer that process).
SUPERVISOR_PID_VARIABLE = "CLPROXY_WORKER_SUPERVISOR_PID"
#: The descriptor number, in a worker, of the config text the supervisor accepted last, and the
#: environment variable that names it (a worker parses that, not the file, at its start).
WORKER_CONFIG_FD = 5
CONFIG_FD_VARIABLE = "CLPROXY_WORKER_CONFIG_FD"
#: Seconds between two looks, while a reload waits for a starting worker, at whether it serves.
RELOAD_WAIT_INTERVAL = 0.1


def worker_count(options: Mapping, cfg) -> int:
    """``--workers`` when given, else ``server.workers``; ``SystemExit`` with one line when more than
    one is asked for without a shared (Redis) state store."""
    given = options.get("workers")
    count = int(given) if given is not None else int(cfg.server.workers)
    if count > 1 and cfg.state.backend != "redis":
        source = f"--workers {count}" if given is not None else f"server.workers: {count}"
        raise SystemExit(f"clproxy: {source} needs state.backend: redis (workers share cooldowns, "
                         f"refreshes, sessions and limits through it)")
    return count


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a worker after ``failures`` quick deaths in a row (1 for a
    worker that died after running a while): 0.25, 0.5, 1, ... up to 30."""
    return min(30.0, 0.25 * 2 ** max(0, failures - 1))


def describe_exit(reason) -> str:
    """``status 1`` or ``signal 9 (SIGKILL)`` for a process's ended reason."""
    value = getattr(reason, "value", None)
    signum = getattr(value, "signal", None)
    if signum is not None:
        try:
            return f"signal {signum} ({signal.Signals(signum).name})"
        except ValueError:
            return f"signal {signum}"
    return f"status {getattr(value, 'exitCode', '?')}"


def worker_argv(options: Mapping, index: int, count: int, run: str) -> List[str]:
    """The command line of worker ``index`` of ``count`` in the supervisor's run ``run``: the
    daemon's own options (without the footprint: no state file, settings or guard of its own),
    after the worker's arguments."""
    args = [sys.executable, "-m", "clproxy.daemon.worker", str(WORKER_LISTEN_FD), str(index), str(count),
            run, "--", "--host", str(options.get("host") or "127.0.0.1"), "--claude-settings", "off", "--no-guard",
            "--health-interval", str(options.get("health-interval") or 30.0)]
    if options.get("config"):
        args += ["--config", os.path.abspath(os.path.expanduser(str(options["config"])))]
    if options.get("strategy"):
        args += ["--strategy", str(options["strategy"])]
    if options.get("env-file"):
        args += ["--env-file", os.path.abspath(os.path.expanduser(str(options["env-file"])))]
    for flag in ("debug", "quiet", "passthrough"):
        if options.get(flag):
            args.append(f"--{flag}")
    return args


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", index: int, started: float):
        self.supervisor, self.index, self.started = supervisor, index, started
        self.pid: Optional[int] = None

    def processEnded(self, reason):
        self.supervisor.ended(self, reason)


class WorkerSupervisor(service.Service):
    """Binds ``host:port`` once, runs ``count`` workers on it and restarts one that dies (with
    :func:`restart_delay`); on stop, closes its copy of the socket, sends the workers SIGTERM (each
    drains its requests) and fires when all have exited (SIGKILL after ``drain_timeout`` + 10 s)."""

    name = "workers"  # type: ignore[assignment]

    def __init__(self, reactor, *, host: str, port: int, count: int, options: Mapping,
                 environ: Mapping[str, str], drain_timeout: float, config_text: Optional[str] = None):
        self.reactor = reactor
        self.host, self.port, self.count = host, port, count
        self.options = options
        self.environ = dict(environ)
        self.drain_timeout = drain_timeout
        #: this supervisor's run: its workers' metric reports are kept (and summed) under it
        self.run = uuid.uuid4().hex[:16]
        self.socket: Optional[socket.socket] = None
        #: the workers' counts of open connections, and its file (made with the socket)
        self.board: Optional[ConnectionBoard] = None
        self.board_file: Any = None
        #: index -> the live worker's process transport
        self.live: Dict[int, Any] = {}
        self.failures: Dict[int, int] = {}
        self._restarts: Dict[int, Any] = {}
        #: workers told to reload before they served: each gets its SIGHUP once it does
        self._reload_waiting: set = set()
        self._reload_wait: Optional[task.LoopingCall] = None
        self._stopping = False
        self._all_ended: Optional[defer.Deferred] = None
        #: the config text accepted last, in an unlinked file each worker started from now on
        #: inherits: a worker restarted after an edit the supervisor refused starts on the config
        #: in force, not on the broken file (None: workers read the file)
        self.config_file: Any = None
        if config_text is not None:
            self.accept_config(config_text)

    def accept_config(self, text: Optional[str]) -> None:
        """``text`` is the config in force from now on: workers started later parse it. A new
        file each time, so a worker reading the last one never sees it half rewritten."""
        if text is None:
            return
        handle = tempfile.TemporaryFile()  # 0600: the text may hold API keys
        handle.write(text.encode("utf-8"))
        handle.flush()
        old, self.config_file = self.config_file, handle
        if old is not None:
            old.close()

    def address(self):
        """The (host, port) the workers serve (useful with ``--port 0``)."""
        if self.socket is None:
            return None
        return self.socket.getsockname()[:2]

    def pids(self) -> List[int]:
        """The live workers' pids."""
        return [process.pid for process in self.live.values() if process.pid]

    def privilegedStartService(self):
        """Bind and listen now (twistd's first step): a port in use is one line and an exit."""
        from clproxy.daemon.assemble import cannot_listen

        super().privilegedStartService()
        try:
            self._listen()
        except error.CannotListenError as e:
            raise cannot_listen(e) from None

    def startService(self):
        """Bind and listen unless done already (``CannotListenError`` as a single process would
        raise), then spawn."""
        if self.socket is None:
            self._listen()
        # each worker's count of open client connections, mapped by all (clproxy.daemon.shares)
        self.board, self.board_file = ConnectionBoard.create(self.count)
        super().startService()
        log.info("clproxy supervisor (pid {pid}) listening on {host}:{port} with {count} workers",
                 pid=os.getpid(), host=self.address()[0], port=self.address()[1], count=self.count)
        for index in range(1, self.count + 1):
            self.spawn(index)

    def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's TCP ports
            sock.bind((self.host, self.port))
            sock.listen(1024)
        except OSError as e:
            sock.close()
            raise error.CannotListenError(self.host, self.port, e)
        sock.setblocking(False)
        self.socket = sock

    def spawn(self, index: int) -> None:
        """Start worker ``index`` on the listening socket."""
        self._restarts.pop(index, None)
        if self._stopping or self.socket is None:
            return
        worker = _WorkerProcess(self, index, self.reactor.seconds())
        args = worker_argv(self.options, index, self.count, self.run)
        # the worker's stdout and stderr are ours (the log), the socket is its fd 3, the board its fd 4
        env = dict(self.environ, **{BOARD_FD_VARIABLE: str(WORKER_BOARD_FD),
                                    SUPERVISOR_PID_VARIABLE: str(os.getpid())})
        child_fds = {1: 1, 2: 2, WORKER_LISTEN_FD: self.socket.fileno(), WORKER_BOARD_FD: self.board_file.fileno()}
        if self.config_file is not None:
            env[CONFIG_FD_VARIABLE] = str(WORKER_CONFIG_FD)
            child_fds[WORKER_CONFIG_FD] = self.config_file.fileno()
        try:
            process = self.reactor.spawnProcess(worker, args[0], args, env=env, childFDs=child_fds)
        except OSError as e:  # fork or exec refused (the process or descriptor limit, memory)
            failures = self.failures.get(index, 0) + 1
            self.failures[index] = failures
            delay = restart_delay(failures)
            log.error("worker {index} could not be started ({error}); trying again in {delay:g}s",
                      index=index, error=e.strerror or e, delay=delay)
            self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)
            return
        self.live[index] = process
        worker.pid = process.pid
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def ended(self, worker: _WorkerProcess, reason) -> None:
        """A worker exited: restart it (after the backoff) unless the daemon is stopping."""
        self.live.pop(worker.index, None)
        self._reload_waiting.discard(worker.index)  # its successor reads the file as it starts
        if self.board is not None:
            self.board.clear(worker.index)  # its connections went with it
        pid = worker.pid
        if self._stopping:
            log.info("worker {index} (pid {pid}) exited ({how})", index=worker.index, pid=pid,
                     how=describe_exit(reason))
            if not self.live and self._all_ended is not None and not self._all_ended.called:
                self._all_ended.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        failures = self.failures.get(worker.index, 0) + 1 if lived < QUICK_DEATH_SECONDS else 1
        self.failures[worker.index] = failures
        delay = restart_delay(failures)
        log.warn("worker {index} (pid {pid}) exited with {how} after {lived:.1f}s; restarting it in "
                 "{delay:g}s", index=worker.index, pid=pid, how=describe_exit(reason), lived=lived,
                 delay=delay)
        self._restarts[worker.index] = self.reactor.callLater(delay, self.spawn, worker.index)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every live worker."""
        for pid in self.pids():
            _kill(pid, signum)

    def reload_workers(self) -> None:
        """Tell every live worker to reload its config (SIGHUP). A worker still starting has no
        handler yet (SIGHUP would kill it): it gets the signal as soon as it serves, since the
        config it read may be the one before."""
        self._reload_waiting.update(self.live)
        self._send_waiting_reloads()
        if self._reload_waiting and self._reload_wait is None:
            self._reload_wait = task.LoopingCall(self._send_waiting_reloads)
            self._reload_wait.clock = self.reactor
            self._reload_wait.start(RELOAD_WAIT_INTERVAL, now=False)

    def _send_waiting_reloads(self) -> None:
        """SIGHUP each waiting worker that serves now; stop looking once none waits."""
        sighup = getattr(signal, "SIGHUP", None)
        for index in sorted(self._reload_waiting):
            process = self.live.get(index)
            if process is None or sighup is None:
                self._reload_waiting.discard(index)
            elif self.board is None or self.board.serving(index):
                self._reload_waiting.discard(index)
                _kill(process.pid, sighup)
        if not self._reload_waiting and self._reload_wait is not None:
            loop, self._reload_wait = self._reload_wait, None
            if loop.running:
                loop.stop()

    def stopService(self):
        """Close the socket here, SIGTERM the workers, wait for them (SIGKILL at the deadline)."""
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._reload_waiting.clear()
        self._send_waiting_reloads()  # (stops the wait)
        if self.socket is not None:
            self.socket.close()  # the workers hold the port until each has stopped listening
            self.socket = None
        if self.board is not None:
            self.board.close()
            self.board_file.close()  # (the workers keep their own mappings until they exit)
            self.board = self.board_file = None
        if self.config_file is not None:
            self.config_file.close()
            self.config_file = None
        if not self.live:
            return defer.succeed(None)
        self._all_ended = defer.Deferred()
        log.info("stopping {count} worker(s): {pids}", count=len(self.live),
                 pids=" ".join(map(str, self.pids())))
        self.signal_workers(signal.SIGTERM)
        deadline = self.reactor.callLater(self.drain_timeout + 10.0, self._kill_stragglers)
        # a second SIGINT/SIGTERM to the supervisor: each worker gets its second one too, and
        # gives up its drain
        forget_hurry = runstate.on_second_signal(lambda: self.signal_workers(signal.SIGTERM))

        def ended(result):
            forget_hurry()
            if deadline.active():
                deadline.cancel()
            return result
        return self._all_ended.addBoth(ended)

    def _kill_stragglers(self) -> None:
        log.warn("workers still running after the drain: {pids}; killing them",
                 pids=" ".join(map(str, self.pids())))
        self.signal_workers(signal.SIGKILL)


def _kill(pid: Optional[int], signum: int) -> None:
    """Send ``signum`` to ``pid`` (None: nothing); a process already gone is no error."""
    if pid:
        try:
            os.kill(pid, signum)
        except OSError:  # already gone: its end is on its way to ended()
            pass


class SupervisedConfig:
    """The config in force in a supervisor. A reload (SIGHUP, or a change of the file: the
    supervisor's :class:`~clproxy.daemon.reload.ConfigWatcher` calls :meth:`apply`) is checked as
    a single daemon checks it; only a good one is written to the state file and passed on to the
    workers (SIGHUP, :meth:`WorkerSupervisor.reload_workers`: each reloads the file; they do not
    watch it themselves). A bad one changes
    nothing, and the watcher says why in one line."""

    def __init__(self, cfg, strategy_override: Optional[str], supervisor: WorkerSupervisor):
        self.config = self.started_with = cfg
        self.strategy_override = strategy_override
        self.supervisor = supervisor
        #: the state file's writer (None when the daemon runs without one)
        self.lifecycle: Optional[Any] = None

    def strategy(self) -> str:
        """The strategy in force: ``--strategy``, else the config's."""
        return self.strategy_override or self.config.routing.strategy

    def apply(self, reloaded) -> List[str]:
        """Install ``reloaded`` (a loaded config) or raise; the keys that need a restart."""
        from clproxy.daemon.assemble import reload_parts
        from clproxy.daemon.reload import restart_needed

        reload_parts(reloaded.config)  # raises before anything changes
        self.config = reloaded.config
        self.supervisor.accept_config(reloaded.text)  # what a worker started from now on parses
        if self.lifecycle is not None:
            self.lifecycle.config_reloaded(self.strategy(), self.config)
        self.supervisor.reload_workers()
        return restart_needed(self.started_with, self.config)


def supervise(options: Mapping, cfg, count: int, *, reactor, environ: Mapping[str, str], home: str,
              config_text: Optional[str] = None):
    """The top service of ``--workers N``: the supervisor, the config's watcher (SIGHUP reloads;
    see :class:`SupervisedConfig`) and the daemon's footprint (state file, Claude Code's settings
    once an account is usable, the guard), which only it writes."""
    from clproxy import config as configuration
    from clproxy.accounts.directory import AccountDirectory
    from clproxy.accounts.tokenstore import TokenStore
    from clproxy.daemon.assemble import accounts_from_config
    from clproxy.daemon.reload import ConfigWatcher, install_sighup
    from clproxy.integrations import claude_settings
    from clproxy.state.probe import probe_store

    # refused here in one line, as a single process does, rather than by workers dying at start
    problem = probe_store(cfg.state)
    if problem:
        raise SystemExit(f"clproxy: {problem}")
    top = service.MultiService()
    supervisor = WorkerSupervisor(reactor, host=options["host"], port=options["port"], count=count,
                                  options=options, environ=environ, drain_timeout=cfg.server.drain_timeout,
                                  config_text=config_text)
    supervisor.setServiceParent(top)
    top.supervisor = supervisor  # type: ignore[attr-defined]
    top.address = supervisor.address  # type: ignore[attr-defined]
    current = SupervisedConfig(cfg, options.get("strategy"), supervisor)
    config_path = options.get("config") or configuration.default_config_path(environ)
    watcher = ConfigWatcher(config_path, lambda path: configuration.load_config(path, environ), current.apply,
                            reactor)
    watcher.setServiceParent(top)
    top.watcher, top.current = watcher, current  # type: ignore[attr-defined]
    install_sighup(watcher, reactor)
    top.lifecycle = None  # type: ignore[attr-defined]
    lifecycle = runstate.attach_lifecycle(top, options, environ, strategy=current.strategy,
                                          fallback_chain=lambda: runstate.chain_of(current.config),
                                          config_path=options.get("config"))
    top.lifecycle = current.lifecycle = lifecycle  # type: ignore[attr-defined]
    if lifecycle is not None and lifecycle.settings_path:
        # the workers serve the accounts; the supervisor only looks whether one is usable
        directory = AccountDirectory(store=TokenStore(home), clock=reactor, environ=environ,
                                     config_accounts=accounts_from_config(cfg),
                                     base_url=cfg.providers.anthropic.base_url)
        claude_settings.SetOnceUsable(lifecycle, directory, reactor,
                                      keys_exist=lambda: _client_keys_exist(home)).setServiceParent(top)
    return top


def _client_keys_exist(home: str) -> bool:
    """Whether the key file of ``home`` holds a client key (an unreadable one counts as holding
    some: the workers, which read it too, refuse to start on it)."""
    from clproxy.team.keystore import KeyStore, KeyStoreError
    try:
        return bool(KeyStore(home).records())
    except (KeyStoreError, OSError):
        return True
