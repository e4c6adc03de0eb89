"""``--workers N``: one port served by N worker processes that act as one daemon (issue 17).

The daemon runs as a real ``twistd -n claudeproxy --workers 2`` process tree over a real
redis-server; the fake Anthropic API and OAuth server run in this test process. Which worker answered
is told by ``/status`` (``worker``: its pid and the requests it served), never by the proxied answers.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task

from clproxy.daemon import runstate, tap, workers
from clproxy.daemon.shares import ConnectionBoard
from clproxy.testing.anthropic import error_json
from conftest import accounts_config
from helpers import post, request_body
from redis_server import free_port, redis_server, unique_prefix  # noqa: F401  (fixture)
from test_401_storm import oauth, seed  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def environment(home) -> dict:
    env = dict(os.environ, CLPROXY_HOME=str(home), CLPROXY_CLAUDE_SETTINGS="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("ANTHROPIC_API_KEY", None)
    return env


def shared(config: dict, redis) -> dict:
    """``config`` on the Redis state store (a prefix of this test's own)."""
    return dict(config, state={"backend": "redis", "url": redis.url, "prefix": unique_prefix()})


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class Daemon:
    """A ``twistd -n claudeproxy --workers N`` process tree on a free port."""

    def __init__(self, tmp_path, config: dict, workers: int = 2):
        self.home = tmp_path / "home"
        self.config = tmp_path / "proxy-config.json"
        self.config.write_text(json.dumps(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "daemon.log", "wb")
        self.log_path = tmp_path / "daemon.log"
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "claudeproxy", "--port", str(self.port), "--no-guard",
             "--config", str(self.config), "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env=environment(self.home), cwd=str(tmp_path))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def status(self) -> dict:
        """``/status`` over a fresh connection: whichever worker accepts it answers."""
        code, _, body = await post(self.url + "/status", b"", method=b"GET")
        assert code == 200, body
        return json.loads(body)

    async def metrics(self) -> dict:
        """``/metrics`` over a fresh connection: ``{"requests": clproxy_requests_total summed over
        its labels, "partial": clproxy_metrics_partial}``."""
        code, _, body = await post(self.url + "/metrics", b"", method=b"GET")
        assert code == 200, body
        found = {"requests": 0.0}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                if sample.name == "clproxy_requests_total":
                    found["requests"] += sample.value
                elif sample.name == "clproxy_metrics_partial":
                    found["partial"] = sample.value
        return found

    async def metrics_reach(self, requests: int, timeout: float = 20.0, floor: float = 0.0) -> list:
        """Scrape until the request counter is ``requests`` (each worker reports every second);
        every value seen, each checked to be at least ``floor`` and never below the one before."""
        seen: list = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1] != requests:
            assert time.monotonic() < deadline, f"the counter went {seen}, not to {requests}\n{self.output()}"
            found = await self.metrics()
            assert found["partial"] == 0, found
            assert found["requests"] >= max(seen + [floor]), seen + [found["requests"]]
            seen.append(found["requests"])
            await pause(0.1)
        return seen

    async def worker_pids(self, wanted: int, timeout: float = 20.0, exclude=()) -> set:
        """Ask /status until ``wanted`` different worker pids (not in ``exclude``) have answered."""
        seen: set = set()
        deadline = time.monotonic() + timeout
        while len(seen) < wanted:
            assert time.monotonic() < deadline, f"only workers {seen} answered\n{self.output()}"
            assert self.process.poll() is None, self.output()
            try:
                pid = (await self.status())["worker"]["pid"]
            except Exception:  # not listening yet, or a worker starting
                await pause(0.05)
                continue
            if pid not in exclude:
                seen.add(pid)
        return seen

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the supervisor and wait for it to exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("the supervisor did not stop\n" + self.output())
            await pause(0.05)
        self.log.close()
        return self.process.returncode


@pytest.fixture
def daemons():
    """Start daemons; each is stopped (and its workers checked gone) after the test."""
    started = []

    def start(*args, **kwargs) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.log.close()


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_one_port_and_share_the_requests(tmp_path, daemons, fake, redis_server):
    """Two workers answer on the one port; requests on fresh connections reach both of them."""
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    pids = await daemon.worker_pids(2)
    assert daemon.process.pid not in pids
    for _ in range(20):
        code, _, body = await post(daemon.url + "/v1/messages", request_body())
        assert code == 200, body
    assert len(fake.for_credential("key-a")) == 20
    served = {}
    deadline = time.monotonic() + 20
    while set(served) != pids:
        assert time.monotonic() < deadline, served
        worker = (await daemon.status())["worker"]
        served[worker["pid"]] = worker["requests"]
    # /status itself counts too; each worker answered some of the 20 messages
    assert sum(served.values()) >= 20 and min(served.values()) > 0, served
    state = runstate.read_state(str(daemon.home / runstate.STATE_FILE_NAME))
    assert (state["pid"], state["port"]) == (daemon.process.pid, daemon.port)
    assert await daemon.stop() in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on


def _status_pids_over_connections_opened_at_once(port: int, count: int) -> list:
    """Open ``count`` connections to 127.0.0.1:``port`` at once, then ask /status on each: the pid
    of the worker that accepted each one."""
    import http.client
    import socket as socketlib
    connections = [socketlib.create_connection(("127.0.0.1", port), timeout=20) for _ in range(count)]
    pids = []
    try:
        for connection in connections:
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            client.sock = connection  # the connection opened above, whichever worker took it
            client.request("GET", "/status")
            pids.append(json.loads(client.getresponse().read())["worker"]["pid"])
    finally:
        for connection in connections:
            connection.close()
    return pids


@pytest_twisted.ensureDeferred
async def test_connections_opened_at_once_are_shared_by_the_workers(tmp_path, daemons, fake, redis_server):
    """32 keep-alive connections opened in one burst (wrk's start, a team's clients after a
    restart) end up on both workers, none more than a few beyond its share: the worker already
    running used to take them all while the other slept (102% against 0.4% CPU at c=32)."""
    from twisted.internet import threads
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    workers_seen = await daemon.worker_pids(2)
    await pause(0.5)  # the /status connections above closed, and uncounted
    # every core busy, as under load: a sleeping worker is not scheduled at once, the one running is
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3 * (os.cpu_count() or 2))]
    try:
        pids = await threads.deferToThread(_status_pids_over_connections_opened_at_once, daemon.port, 32)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    shares = {pid: pids.count(pid) for pid in workers_seen}
    assert set(pids) == workers_seen and min(shares.values()) >= 8, shares


@pytest_twisted.ensureDeferred
async def test_a_429_seen_by_one_worker_cools_the_account_for_the_other(tmp_path, daemons, fake,
                                                                        redis_server):
    """The first request's 429 cools the only account for both workers: the others, wherever they
    land, get 429 with the remaining Retry-After and never reach the upstream."""
    fake.script("key-a", status=429, headers={"retry-after": "30"},
                body=error_json(429, "rate_limit_error", "slow down"))
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    await daemon.worker_pids(2)
    for _ in range(12):
        code, headers, body = await post(daemon.url + "/v1/messages", request_body())
        assert code == 429, body
        assert 0 < int(headers.getRawHeaders("retry-after")[0]) <= 30
    assert len(fake.for_credential("key-a")) == 1
    served = {}
    deadline = time.monotonic() + 20
    while len(served) < 2:
        assert time.monotonic() < deadline, served
        worker = (await daemon.status())["worker"]
        served[worker["pid"]] = worker["requests"]
    assert min(served.values()) > 1, served  # both answered messages besides this /status


@pytest_twisted.ensureDeferred
async def test_one_refresh_for_fifty_requests_spread_over_workers(tmp_path, daemons, fake, oauth,
                                                                   redis_server):
    """An expired OAuth token and 50 concurrent requests over two workers: one refresh in all."""
    seed(tmp_path / "home", oauth, expires_in=-60)
    config = {"providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}}}
    daemon = daemons(tmp_path, shared(config, redis_server))
    await daemon.worker_pids(2)
    answers = await defer.gatherResults([
        defer.ensureDeferred(post(daemon.url + "/v1/messages", request_body())) for _ in range(50)])
    assert [code for code, _, _ in answers] == [200] * 50, [b for _, _, b in answers if b][:3]
    assert oauth.refresh_calls == 1
    assert len({r.credential for r in fake.requests}) == 1  # all on the one new token


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(tmp_path, daemons, fake,
                                                                         redis_server):
    """SIGKILL one worker: the supervisor starts a new one (a new pid answers /status), the port
    stays open and every request sent meanwhile is answered."""
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    first = await daemon.worker_pids(2)
    victim = sorted(first)[0]
    os.kill(victim, signal.SIGKILL)
    answered = 0
    seen: set = set()
    deadline = time.monotonic() + 20
    while not seen - first:
        assert time.monotonic() < deadline, f"no new worker answered\n{daemon.output()}"
        code, _, body = await post(daemon.url + "/v1/messages", request_body())
        assert code == 200, body
        answered += 1
        seen.add((await daemon.status())["worker"]["pid"])
    assert victim not in seen and not runstate.pid_alive(victim)
    assert len(fake.requests) == answered
    assert "exited with signal 9 (SIGKILL)" in daemon.output()


async def refused_edit(daemon, config: dict) -> None:
    """Write an invalid strategy into the daemon's config, SIGHUP it, wait for its refusal."""
    daemon.config.write_text(json.dumps(dict(config, routing={"strategy": "nonsense"})))
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "config reload failed" not in daemon.output():
        assert time.monotonic() < deadline, daemon.output()
        await pause(0.05)


@pytest_twisted.ensureDeferred
async def test_a_worker_restarted_after_a_refused_edit_starts_on_the_config_in_force(
        tmp_path, daemons, fake, redis_server):
    """An edit the supervisor refused (invalid) leaves the config in force; a worker that dies
    then used to be restarted on the broken file, fail at once and again (backoff up to 30 s),
    one worker short. It starts on the config the supervisor accepted last, and serves."""
    config = dict(shared(accounts_config(fake, "a"), redis_server), routing={"strategy": "round-robin"})
    daemon = daemons(tmp_path, config)
    first = await daemon.worker_pids(2)
    await refused_edit(daemon, config)
    victim = sorted(first)[0]
    os.kill(victim, signal.SIGKILL)
    replacement = await daemon.worker_pids(1, exclude=first)
    found = await strategies_of(daemon, (first - {victim}) | replacement)
    assert set(found.values()) == {"round-robin"}
    assert (await post(daemon.url + "/v1/messages", request_body()))[0] == 200
    assert "invalid configuration" not in daemon.output()
    assert daemon.output().count("started (pid") == 3  # two at start, one replacement: no crash loop


@pytest_twisted.ensureDeferred
async def test_metrics_count_every_workers_requests_and_never_go_down(tmp_path, daemons, fake, redis_server):
    """/metrics on either worker counts the requests of both: N requests spread over two workers
    read N on every scrape; a worker killed with SIGKILL and replaced never makes the counter go
    down, and the requests after it add up."""
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    pids = await daemon.worker_pids(2)
    sent = 30
    for _ in range(sent):
        code, _, body = await post(daemon.url + "/v1/messages", request_body())
        assert code == 200, body
    await daemon.metrics_reach(sent)
    for _ in range(12):  # fresh connections: either worker answers
        assert await daemon.metrics() == {"requests": sent, "partial": 0}
    os.kill(sorted(pids)[0], signal.SIGKILL)
    await daemon.worker_pids(1, exclude=pids)  # its replacement answers
    for _ in range(12):
        assert await daemon.metrics() == {"requests": sent, "partial": 0}
    for _ in range(10):
        code, _, body = await post(daemon.url + "/v1/messages", request_body())
        assert code == 200, body
    await daemon.metrics_reach(sent + 10, floor=sent)
    assert "exited with signal 9 (SIGKILL)" in daemon.output()


async def strategies_of(daemon, pids: set, timeout: float = 20.0, wanted=None) -> dict:
    """``{worker pid: strategy}`` from /status until every pid of ``pids`` answered (with
    ``wanted``, once each answered with it)."""
    found: dict = {}
    deadline = time.monotonic() + timeout
    while set(found) != pids or (wanted is not None and set(found.values()) != {wanted}):
        assert time.monotonic() < deadline, f"{found}\n{daemon.output()}"
        status = await daemon.status()
        found[status["worker"]["pid"]] = status["strategy"]
    return found


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_state_file_and_the_workers_and_a_bad_config_changes_nothing(
        tmp_path, daemons, fake, redis_server):
    """SIGHUP to the supervisor: a new strategy and fallback chain reach proxy-state.json and every
    worker; then an invalid config changes neither and is said in one line (not once per worker)."""
    config = dict(shared(accounts_config(fake, "a"), redis_server), routing={"strategy": "fill-first"})
    daemon = daemons(tmp_path, config)
    pids = await daemon.worker_pids(2)
    path = str(daemon.home / runstate.STATE_FILE_NAME)
    assert (runstate.read_state(path)["strategy"], runstate.read_state(path)["fallbackChain"]) == ("fill-first", [])
    chain = [{"provider": "openai", "model": "gpt-4o"}]
    daemon.config.write_text(json.dumps(dict(config, routing={"strategy": "round-robin", "fallbackChain": chain})))
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while runstate.read_state(path)["strategy"] != "round-robin":
        assert time.monotonic() < deadline, daemon.output()
        await pause(0.05)
    assert runstate.read_state(path)["fallbackChain"] == chain
    await strategies_of(daemon, pids, wanted="round-robin")

    await refused_edit(daemon, config)
    await pause(2.0)  # a worker watching the file itself would have noticed and said so by now
    assert daemon.output().count("config reload failed") == 1, daemon.output()
    assert runstate.read_state(path)["strategy"] == "round-robin"
    assert runstate.read_state(path)["fallbackChain"] == chain
    assert await strategies_of(daemon, pids) == dict.fromkeys(pids, "round-robin")


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_the_supervisor_and_every_worker(tmp_path, daemons, fake, redis_server):
    """`clproxy proxy status` sees the daemon; `clproxy proxy stop` (SIGTERM to the supervisor)
    stops it and all its workers, and removes the state file."""
    daemon = daemons(tmp_path, shared(accounts_config(fake, "a"), redis_server))
    pids = await daemon.worker_pids(2)

    def clproxy(*args):
        return subprocess.run([sys.executable, "-m", "clproxy", "proxy", *args], capture_output=True,
                              text=True, env=environment(daemon.home), timeout=60)

    status = await defer.Deferred.fromCoroutine(_in_thread(clproxy, "status"))
    assert status.returncode == 0 and str(daemon.process.pid) in status.stdout, status.stdout + status.stderr
    stopped = await defer.Deferred.fromCoroutine(_in_thread(clproxy, "stop"))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert await daemon.stop() in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
    assert not [pid for pid in pids if runstate.pid_alive(pid)]
    assert not (daemon.home / runstate.STATE_FILE_NAME).exists()


async def _in_thread(function, *args):
    from twisted.internet import threads
    return await threads.deferToThread(function, *args)


def _twistd(tmp_path, config: dict, *args):
    path = tmp_path / "proxy-config.json"
    path.write_text(json.dumps(config))
    return subprocess.run([TWISTD, "-n", "--pidfile=", "claudeproxy", "--port", str(free_port()),
                           "--no-guard", "--config", str(path), *args], capture_output=True, text=True,
                          env=environment(tmp_path / "home"), cwd=str(tmp_path), timeout=60)


@pytest.mark.parametrize("config, args, line", [
    ({}, ["--workers", "2"], "clproxy: --workers 2 needs state.backend: redis (workers share cooldowns, "
                             "refreshes, sessions and limits through it)"),
    ({"server": {"workers": 3}}, [], "clproxy: server.workers: 3 needs state.backend: redis"),
    ({"server": {"workers": 65}}, [], "server.workers: must be an integer from 1 to 64, got 65"),
    ({}, ["--workers", "0"], "--workers must be a number from 1 to 64, not '0'"),
    ({}, ["--workers", "two"], "--workers must be a number from 1 to 64, not 'two'"),
])
def test_workers_without_redis_or_out_of_range_are_refused_in_one_line(tmp_path, config, args, line):
    """More than one worker on the memory backend, or a count outside 1..64: refused, one line."""
    result = _twistd(tmp_path, config, *args)
    assert result.returncode != 0
    assert line in result.stdout + result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_proxy_start_refuses_workers_without_redis_in_one_line(tmp_path):
    """`clproxy proxy start --workers 2` on the memory backend: the same one line, exit 1."""
    path = tmp_path / "proxy-config.json"
    path.write_text("{}")
    result = subprocess.run([sys.executable, "-m", "clproxy", "proxy", "start", "--port", str(free_port()),
                             "--no-guard", "--config", str(path), "--workers", "2"], capture_output=True,
                            text=True, env=environment(tmp_path / "home"), cwd=str(tmp_path), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == ("clproxy: --workers 2 needs state.backend: redis (workers share "
                                     "cooldowns, refreshes, sessions and limits through it)")


def test_restart_backoff_grows_for_a_worker_that_keeps_dying_at_start():
    """0.25 s after one death, doubling per quick death in a row, never above 30 s."""
    assert [workers.restart_delay(n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]
    assert workers.restart_delay(50) == 30.0


def test_worker_command_line_has_no_footprint_of_its_own(tmp_path):
    """A worker gets the daemon's options but never writes Claude Code's settings or starts a guard."""
    argv = workers.worker_argv({"host": "::1", "config": "c.yaml", "strategy": "round-robin",
                                "debug": True, "health-interval": 5.0}, 2, 3, "run-1")
    assert argv[2:8] == ["clproxy.daemon.worker", "3", "2", "3", "run-1", "--"]
    options = tap.Options()
    options.parseOptions(argv[8:])
    assert (options["host"], options["claude-settings"], options["no-guard"]) == ("::1", "off", True)
    assert options["config"] == os.path.abspath("c.yaml") and options["debug"]
    assert options["strategy"] == "round-robin" and options["workers"] is None


def test_workers_with_an_unreachable_redis_are_refused_in_one_line(tmp_path):
    """The supervisor checks Redis answers before spawning anything: one line, as one process says."""
    result = _twistd(tmp_path, {"state": {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"}},
                     "--workers", "2")
    assert result.returncode != 0
    assert "Redis" in result.stdout + result.stderr or "redis" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "worker 1 started" not in result.stdout


class _SpawnedProcess:
    """What the fake reactor's spawnProcess returns: a pid, as a process transport has."""

    def __init__(self, pid: int):
        self.pid = pid


class _SpawningClock(task.Clock):
    """A clock whose spawnProcess records what it was asked (and can refuse, as fork does at the
    process limit) instead of starting a process."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.refusals = 0

    def spawnProcess(self, worker, executable, args, env=None, childFDs=None):
        if self.refusals:
            self.refusals -= 1
            raise OSError(11, "Resource temporarily unavailable")
        self.spawned.append((worker, env))
        return _SpawnedProcess(100000 + len(self.spawned))


@pytest.fixture
def supervisor():
    """A WorkerSupervisor of 2 workers on a real socket and board, spawning on a fake clock."""
    clock = _SpawningClock()
    made = workers.WorkerSupervisor(clock, host="127.0.0.1", port=0, count=2, options={"host": "127.0.0.1"},
                                    environ={}, drain_timeout=1.0)
    yield made
    made._stopping = True
    if made.socket is not None:
        made.socket.close()
    if made.board is not None:
        made.board.close()
        made.board_file.close()


def test_a_worker_whose_start_fails_is_tried_again_with_the_backoff(supervisor):
    """fork refused (EAGAIN at the process limit) when a worker is restarted: it is tried again
    after the backoff, not left out for good (the error escaped the timer and nothing retried)."""
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure
    clock = supervisor.reactor
    supervisor.startService()
    assert sorted(supervisor.live) == [1, 2]
    clock.advance(60)
    clock.refusals = 2
    supervisor.ended(clock.spawned[1][0], Failure(ProcessTerminated(signal=9)))
    clock.advance(workers.restart_delay(1))  # refused
    assert sorted(supervisor.live) == [1]
    clock.advance(workers.restart_delay(2))  # refused again
    assert sorted(supervisor.live) == [1]
    clock.advance(workers.restart_delay(3))
    assert sorted(supervisor.live) == [1, 2] and len(clock.spawned) == 3


def test_workers_are_told_their_supervisors_pid(supervisor):
    """Each worker's environment names the supervisor's pid: the worker compares its parent with
    it from its start, so a supervisor that died while the worker was importing is noticed."""
    from clproxy.daemon import worker
    supervisor.startService()
    env = supervisor.reactor.spawned[0][1]
    assert env[workers.SUPERVISOR_PID_VARIABLE] == str(os.getpid())
    assert worker._supervisor_pid(env) == os.getpid()
    assert worker._supervisor_pid({}) == os.getppid()  # started by hand: its parent


def test_a_worker_whose_supervisor_died_before_it_was_built_stops(monkeypatch):
    """The orphan check compares the parent with the pid the supervisor named (a dead supervisor's
    workers are re-parented): the worker stops at its first look."""
    from clproxy.daemon import worker
    stopped = []
    monkeypatch.setattr(runstate, "stop_reactor", stopped.append)
    worker._stop_when_orphaned("reactor", os.getppid())
    assert stopped == []
    worker._stop_when_orphaned("reactor", os.getppid() + 1)
    assert stopped == ["reactor"]


def test_a_reload_reaches_a_starting_worker_only_once_it_serves(supervisor, monkeypatch):
    """SIGHUP kills a worker that has not installed its handler yet (seconds of imports at each
    start): a reload signals the workers that serve at once and a starting one as soon as its
    slot says it serves; one that dies before then is not signalled (its successor reads the
    file as it starts)."""
    sent = []
    monkeypatch.setattr(workers.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    clock = supervisor.reactor
    supervisor.startService()
    first, second = (supervisor.live[i].pid for i in (1, 2))
    board = supervisor.board
    serving_first = ConnectionBoard(os.dup(supervisor.board_file.fileno()), 2, 1)
    serving_first.serve()
    supervisor.reload_workers()
    assert sent == [(first, signal.SIGHUP)]
    clock.advance(workers.RELOAD_WAIT_INTERVAL * 5)
    assert sent == [(first, signal.SIGHUP)]  # worker 2 still starting
    serving_second = ConnectionBoard(os.dup(supervisor.board_file.fileno()), 2, 2)
    serving_second.serve()
    clock.advance(workers.RELOAD_WAIT_INTERVAL)
    assert sent == [(first, signal.SIGHUP), (second, signal.SIGHUP)]
    assert supervisor._reload_wait is None  # nothing left to wait for: the loop stopped
    # a worker that dies while its reload waits is not signalled, nor is its successor
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure
    board.clear(2)
    sent.clear()
    supervisor.reload_workers()
    supervisor.ended(clock.spawned[1][0], Failure(ProcessTerminated(signal=9)))
    clock.advance(1)
    assert sent == [(first, signal.SIGHUP)] and supervisor._reload_wait is None
    serving_first.close()
    serving_second.close()


def test_workers_start_on_the_config_text_the_supervisor_accepted_last(supervisor, tmp_path):
    """Each worker inherits the accepted config text (an unlinked 0600 file, a new one per
    accepted reload, so a worker never reads one half rewritten) and parses it instead of the
    file; without that descriptor (started by hand) it reads the file."""
    from clproxy.daemon import worker
    supervisor.accept_config("routing:\n  strategy: round-robin\n")
    supervisor.startService()
    clock = supervisor.reactor
    first = supervisor.config_file
    assert os.fstat(first.fileno()).st_mode & 0o777 == 0o600
    env = clock.spawned[0][1]
    assert env[workers.CONFIG_FD_VARIABLE] == str(workers.WORKER_CONFIG_FD)
    supervisor.accept_config("routing:\n  strategy: fill-first\n")
    assert first.closed and supervisor.config_file is not first
    supervisor.accept_config(None)  # nothing parsed (no text): the last accepted stays
    assert not supervisor.config_file.closed
    fd = os.dup(supervisor.config_file.fileno())
    assert worker._inherited_config({workers.CONFIG_FD_VARIABLE: str(fd)}) == "routing:\n  strategy: fill-first\n"
    with pytest.raises(OSError):
        os.fstat(fd)  # read, then closed
    assert worker._inherited_config({}) is None
    options = tap.Options()
    options.parseOptions(["--config", str(tmp_path / "broken.yaml")])
    (tmp_path / "broken.yaml").write_text("routing: [")
    _, _, loaded = tap.load(options, {"CLPROXY_HOME": str(tmp_path / "home")},
                            config_text="routing:\n  strategy: round-robin\n")
    assert loaded.config.routing.strategy == "round-robin" and loaded.source == str(tmp_path / "broken.yaml")
