"""One worker process of ``--workers N``
(``python -m clproxy.daemon.worker FD INDEX COUNT RUN -- OPTIONS``).

It builds the same daemon as a single process (:func:`~clproxy.daemon.assemble.build_proxy`) but
serves the listening socket its supervisor passed as descriptor ``FD`` instead of binding one, writes
no footprint (state file, Claude Code's settings: the supervisor's), publishes its metrics for the
supervisor's run ``RUN`` (``/metrics`` answers the sums over the workers), and stops (draining) on
SIGTERM or when its supervisor is gone. See :mod:`clproxy.daemon.workers`.
"""

import os
import socket
import sys
import uuid
from typing import List, Mapping, Optional

from twisted.application import internet
from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer

from clproxy.daemon import runstate
from clproxy.daemon.assemble import ProxyService, RecordingEndpoint, build_proxy
from clproxy.daemon.reload import install_sighup
from clproxy.daemon.shares import ACCEPT_PAUSE, ACCEPT_SLACK, BOARD_FD_VARIABLE, ConnectionBoard
from clproxy.daemon.workers import CONFIG_FD_VARIABLE, SUPERVISOR_PID_VARIABLE
from clproxy.observe import console
from clproxy.observe.aggregate import WorkerMetrics

log = console.logger(__name__)

#: Seconds between two looks at whether the supervisor is still there.
PARENT_CHECK_INTERVAL = 1.0


class CountedServer(tcp.Server):
    """A client connection of a worker's port, counted on the port's board while it is open."""

    _board: Optional[ConnectionBoard] = None

    def __init__(self, sock, protocol, client, server, sessionno, reactor):
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        # counted once it is open: a connection the reactor refused to watch never was
        self._board = getattr(server, "board", None)
        if self._board is not None:
            self._board.add(1)

    def connectionLost(self, reason):
        board, self._board = self._board, None
        if board is not None:
            board.add(-1)
        super().connectionLost(reason)


class OneAcceptPort(tcp.Port):
    """A TCP listening port that accepts one connection each time its socket is ready, and leaves
    connections to the other workers while it holds more than its share.

    Every worker listens on the same socket and every one of them is woken when a connection
    arrives. twisted's port accepts up to ``numberAccepts`` connections per wake-up (100 at
    first, 20 more each time it takes as many as it may), so the first worker awake takes a whole
    burst (a client opening 32 connections at once) and the others get none of it: two workers
    served no more than one (1.02x at c=32). Taking one per wake-up, the worker that is back in
    its loop first, the less busy one, takes the next.

    Taking one per wake-up is not enough when the worker already running takes each connection
    before a sleeping one is scheduled (both cores busy): with a ``board`` (the workers' counts
    of open connections), a worker more than ``ACCEPT_SLACK`` ahead of the least loaded one
    leaves the socket out of its polls for ``ACCEPT_PAUSE``, then takes a connection still
    waiting whatever the counts say (so a stalled worker holds nothing back for longer), and
    looks at the counts again at the next wake-up.
    """

    transport = CountedServer
    #: the workers' counts of open client connections (None: balance by wake-ups alone)
    board: Optional[ConnectionBoard] = None
    clock = None  # what schedules the pause when not the reactor (a test's clock)

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # twisted's port scales it after each wake-up: here it stays 1

    def doRead(self):
        board = self.board
        if board is not None and board.ahead() > ACCEPT_SLACK:
            self.stopReading()
            (self.clock or self.reactor).callLater(ACCEPT_PAUSE, self._resume)
            return
        super().doRead()

    def _resume(self) -> None:
        if self.connected and not self.disconnecting:
            # a connection the others left waiting is taken now (none: the accept finds nothing);
            # the wake-ups after this one weigh the counts again
            super().doRead()
            if self.connected and not self.disconnecting:
                self.startReading()


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens by adopting an already listening socket (descriptor ``fd``, inherited) instead of
    binding one; the reactor works on its own duplicate, so ``fd`` is closed once adopted. A TCP
    socket is served by a :class:`OneAcceptPort` (shared with the other workers)."""

    def __init__(self, reactor, fd: int, board: Optional[ConnectionBoard] = None):
        self.reactor = reactor
        self.fd = fd
        self.board = board

    def listen(self, factory):
        """Adopt the socket for ``factory``."""
        with socket.socket(fileno=os.dup(self.fd)) as probe:
            family = probe.family
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(self.reactor, PosixReactorBase):
            port = OneAcceptPort._fromListeningDescriptor(self.reactor, self.fd, family, factory)
            port.board = self.board
            port.startListening()
            if self.board is not None:
                self.board.serve()  # the others may leave this worker connections from now on
        else:
            port = self.reactor.adoptStreamPort(self.fd, family, factory)
        os.close(self.fd)
        return defer.succeed(port)


def make_worker_service(options: Mapping, reactor, environ: Mapping[str, str], fd: int, index: int,
                        count: int, run: str) -> ProxyService:
    """The worker's top service: the whole daemon serving the adopted socket ``fd``, its metrics
    published for (and ``/metrics`` summed over) the supervisor's run ``run``."""
    from clproxy.daemon.tap import load

    env, home, loaded = load(options, environ, config_text=_inherited_config(environ))
    proxy = build_proxy(loaded.config, clock=reactor, reactor=reactor, environ=env, home=home,
                        config_path=options.get("config"), strategy=options.get("strategy"),
                        passthrough=bool(options.get("passthrough")), debug=bool(options.get("debug")),
                        health_interval=float(options.get("health-interval") or 30.0),
                        host=options["host"])
    supervisor = _supervisor_pid(environ)
    own, track = proxy.status.extra, proxy.drainer.track
    served = [0]

    def counted(finished) -> None:
        served[0] += 1
        track(finished)

    proxy.drainer.track = counted  # type: ignore[method-assign]
    # /status: "pid" is the daemon's (the supervisor, as in proxy-state.json: the one to signal);
    # "worker" says which worker answered, whose in-process counters are its own (/metrics sums them)
    proxy.status.extra = lambda: dict(own(), pid=supervisor, worker={"index": index, "count": count, "pid": os.getpid(),
                                                     "supervisor": supervisor, "requests": served[0]})
    # a new incarnation id per process: the store retires a replaced worker's totals by it
    metrics = WorkerMetrics(proxy.observability.metrics, proxy.store, reactor, run=run, worker=index,
                            incarnation=f"{os.getpid()}-{uuid.uuid4().hex[:8]}", drained=proxy.drainer.drain)
    metrics.setServiceParent(proxy.shared_state)  # publishes once the store is connected
    proxy.observability.metrics_resource().exposition = metrics.render
    endpoint = RecordingEndpoint(AdoptedEndpoint(reactor, fd, _inherited_board(environ, count, index)))
    top = ProxyService(proxy, endpoint, reactor)
    for child in proxy.services:
        child.setServiceParent(top)
    internet.StreamServerEndpointService(endpoint, proxy.site).setServiceParent(top)
    # the supervisor watches the file and, once it has checked a new config, SIGHUPs the workers:
    # N watchers would say N times that a bad config was refused
    proxy.watcher.polling = False
    install_sighup(proxy.watcher, reactor)
    orphan_check = internet.TimerService(PARENT_CHECK_INTERVAL, _stop_when_orphaned, reactor, supervisor)
    orphan_check.clock = reactor
    orphan_check.setServiceParent(top)
    return top


def _inherited_board(environ: Mapping[str, str], count: int, index: int) -> Optional[ConnectionBoard]:
    """The workers' connection counts, mapped from the descriptor the supervisor named in
    ``environ`` (None when it named none: a worker started by hand balances by wake-ups alone)."""
    try:
        return ConnectionBoard(int(environ[BOARD_FD_VARIABLE]), count, index)
    except (KeyError, OSError, ValueError):
        return None


def _inherited_config(environ: Mapping[str, str]) -> Optional[str]:
    """The config text the supervisor accepted last, read from the descriptor it named in
    ``environ`` (closed once read), or None (started by hand: the file is read). A worker restarted
    after an edit the supervisor refused starts on the config in force, not on the broken file."""
    try:
        fd = int(environ[CONFIG_FD_VARIABLE])
    except (KeyError, ValueError):
        return None
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    except OSError:
        return None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return data.decode("utf-8", "replace")


def _supervisor_pid(environ: Mapping[str, str]) -> int:
    """The supervisor's pid as it named it in ``environ``; else (a worker started by hand) the
    parent's. Named, not asked of ``getppid()`` once the worker is built (seconds of imports after
    its start): a supervisor that died in between would leave the orphan's parent (init) taken for
    it, and the worker serving the port with no one to stop it."""
    try:
        return int(environ[SUPERVISOR_PID_VARIABLE])
    except (KeyError, ValueError):
        return os.getppid()


def _stop_when_orphaned(reactor, supervisor: int) -> None:
    # a supervisor killed without its stop (SIGKILL) leaves no one to restart or stop the workers
    if os.getppid() != supervisor:
        log.warn("the supervisor (pid {pid}) is gone; stopping", pid=supervisor)
        runstate.stop_reactor(reactor)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one worker until SIGTERM/SIGINT (drain, then exit) or its supervisor is gone."""
    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner
    from twisted.python import usage

    from clproxy.daemon.tap import Options

    argv = sys.argv[1:] if argv is None else argv
    try:
        fd, index, count = (int(value) for value in argv[:3])
        run = argv[3]
        assert run and argv[4] == "--"
    except (ValueError, AssertionError, IndexError):
        sys.stderr.write("usage: python -m clproxy.daemon.worker FD INDEX COUNT RUN -- OPTIONS "
                         "(started by `--workers N`, not by hand)\n")
        return 2
    options = Options()
    try:
        options.parseOptions(argv[5:])
    except usage.UsageError as e:
        sys.stderr.write(f"clproxy worker {index}: {e}\n")
        return 2
    runstate.quiet_signal_stops(reactor)
    try:
        top = make_worker_service(options, reactor, os.environ, fd, index, count, run)
        top.startService()
    except SystemExit as e:
        sys.stderr.write(f"{e} (worker {index})\n")
        return 1
    prefix = f"[worker {index} pid {os.getpid()}] "

    def format_event(event) -> Optional[str]:
        text = formatEventAsClassicLogText(event)
        return prefix + text if text else None

    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, format_event)], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
