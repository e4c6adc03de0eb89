"""The daemon's lifecycle as users meet it: stopping (drain bound, a second signal, requests that
arrive while draining), starting (a port in use, two starts at once)."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from clproxy import config as configuration
from clproxy.daemon.assemble import build_proxy, serve
from clproxy.daemon.drain import Drainer
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {
    "clproxy proxy start": [sys.executable, "-m", "clproxy", "proxy", "start"],
    "twistd -n claudeproxy": [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
                              "claudeproxy"],
}

CONFIG = {"accounts": {"anthropic": [{"name": "a", "apiKey": "key-a", "baseUrl": "http://127.0.0.1:9"}]},
          "server": {"drainTimeout": 30}}


def proxy_on(tmp_path, clock, config=CONFIG):
    """A whole daemon (not started) on ``clock``, listening on a free loopback port once started."""
    path = tmp_path / "proxy-config.json"
    path.write_text(json.dumps(config))
    cfg = configuration.parse_config(json.dumps(config), str(path), environ={}).config
    proxy = build_proxy(cfg, clock=clock, reactor=reactor, environ={}, home=str(tmp_path / "home"),
                        config_path=str(path))
    return serve(proxy, "tcp:0:interface=127.0.0.1", reactor)


def test_a_drain_that_gave_up_is_not_waited_for_again():
    """Every service that waits for the drain at stop shares its one deadline: a wait begun after
    the deadline fires at once instead of starting a second full timeout."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=30)
    drainer.track(defer.Deferred())  # a stream that never ends
    first = drainer.drain()
    clock.advance(20)
    second = drainer.drain()  # a later waiter: only the 10 s left
    clock.advance(10)
    assert first.result == 1 and second.result == 1
    third = drainer.drain()
    assert third.called and third.result == 1
    assert clock.getDelayedCalls() == []


def test_hurry_gives_up_the_drain_now_or_as_soon_as_it_begins():
    """hurry() (a second stop signal) fires the drain's waiters with what is in flight at once;
    called before the drain began, the drain that follows gives up at once."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=30)
    drainer.track(defer.Deferred())
    d = drainer.drain()
    drainer.hurry()
    assert d.result == 1 and clock.getDelayedCalls() == []
    early = Drainer(clock, timeout=30)
    early.track(defer.Deferred())
    early.hurry()
    assert early.drain().result == 1 and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_daemon_stops_within_one_drain_timeout_with_a_stream_stuck(tmp_path):
    """A request that never ends holds the stop for server.drainTimeout, once: the usage ledger
    and the proxy's close each waited a whole timeout, so a stop took twice the bound (60 s by
    default: past systemd's TimeoutStopSec=45 and the supervisor's kill of a draining worker)."""
    clock = task.Clock()
    top = proxy_on(tmp_path, clock)
    top.startService()
    top.drainer.track(defer.Deferred())  # a stream whose upstream stalls
    stopped = defer.ensureDeferred(_stop(top))
    await _turns()
    clock.advance(30)
    await _turns()
    assert stopped.called, "still stopping one drain timeout after the stop"
    await stopped


async def _stop(top) -> None:
    await top.stopService()


async def _turns(count: int = 5) -> None:
    """Let the real reactor run ``count`` turns (the listener closes, the store's calls return)."""
    for _ in range(count):
        d = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        await d


def environment(home) -> dict:
    """This source tree first on the path, a home of the test's own, never Claude Code's settings."""
    env = dict(os.environ, CLPROXY_HOME=str(home), HOME=str(home), CLPROXY_CLAUDE_SETTINGS="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("ANTHROPIC_API_KEY", None)
    return env


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(port: int) -> bool:
    """Whether the daemon on ``port`` answers /health, asked for up to a minute (start-up I/O)."""
    import urllib.request
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return True
        except OSError:
            threading.Event().wait(0.1)
    return False


class Lines:
    """The lines a subprocess prints, read on a thread; :meth:`wait_for` one containing a text."""

    def __init__(self, stream):
        self.queue: "queue.Queue[bytes]" = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(b"")

    def wait_for(self, text: bytes) -> None:
        while True:
            line = self.queue.get(timeout=60)
            self.seen.append(line)
            assert line, b"".join(self.seen).decode()
            if text in line:
                return

    def text(self) -> str:
        while True:
            try:
                line = self.queue.get(timeout=10)
            except queue.Empty:
                break
            if not line:
                break
            self.seen.append(line)
        return b"".join(self.seen).decode()


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_a_second_signal_while_draining_stops_at_once(tmp_path, entry_point):
    """SIGTERM, then SIGTERM again while a request to a silent upstream drains (drainTimeout
    600 s): the second signal gives up the drain and the daemon exits, instead of waiting the
    whole drain out."""
    silent = socket.socket()  # accepts the upstream connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    config = tmp_path / "proxy-config.json"
    config.write_text(json.dumps({
        "accounts": {"anthropic": [{"name": "slow", "apiKey": "sk-test-not-a-real-key",
                                    "baseUrl": f"http://127.0.0.1:{silent.getsockname()[1]}"}]},
        "server": {"drainTimeout": 600}}))
    port = free_port()
    process = subprocess.Popen(
        ENTRY_POINTS[entry_point] + ["--port", str(port), "--no-guard", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(tmp_path / "home"),
        cwd=str(tmp_path))
    lines = Lines(process.stdout)
    client = socket.socket()
    try:
        lines.wait_for(b"ProxySite starting")
        body = b'{"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": true, "messages": []}'
        client.connect(("127.0.0.1", port))
        client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        silent.settimeout(60)
        held = silent.accept()[0]  # the request is in flight, its upstream silent
        process.send_signal(signal.SIGTERM)
        lines.wait_for(b"draining 1 request")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("a second SIGTERM did not stop the draining daemon:\n" + lines.text(), pytrace=False)
        held.close()
    finally:
        client.close()
        silent.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    out = lines.text()
    assert "drain cut short by a second signal: 1 request(s) still in flight were cut" in out, out
    assert "Traceback" not in out, out


def test_a_second_signal_to_the_supervisor_reaches_every_worker(monkeypatch):
    """--workers: a second SIGTERM to the supervisor while its workers drain is passed on to each
    of them (their second, which gives up their drain); after the workers are gone, nothing is."""
    from clproxy.daemon import runstate, workers

    class Stopping(task.Clock):
        def stop(self):
            from twisted.internet.error import ReactorNotRunning
            raise ReactorNotRunning()  # already stopping: the signal is a second one

    sent = []
    monkeypatch.setattr(workers, "_kill", lambda pid, signum: sent.append((pid, signum)))
    clock = Stopping()
    supervisor = workers.WorkerSupervisor(clock, host="127.0.0.1", port=0, count=2, options={},
                                          environ={}, drain_timeout=1.0)
    supervisor.live = {1: type("P", (), {"pid": 101})(), 2: type("P", (), {"pid": 102})()}
    supervisor.running = True
    stopped = supervisor.stopService()
    assert sent == [(101, signal.SIGTERM), (102, signal.SIGTERM)]
    runstate.stop_or_hurry(clock)
    assert sent[2:] == [(101, signal.SIGTERM), (102, signal.SIGTERM)]
    supervisor.live.clear()
    supervisor._all_ended.callback(None)
    assert stopped.called
    runstate.stop_or_hurry(clock)
    assert len(sent) == 4


@pytest_twisted.ensureDeferred
async def test_a_request_on_a_kept_alive_connection_while_draining_is_refused(tmp_path, fake):
    """Once the stop begins, a new request on a connection kept alive from before (Claude Code
    keeps its connections) gets 503 with Connection: close, and reaches no upstream: it was
    served in full, opening a new upstream stream that held the drain open."""
    import http.client

    from clproxy.testing.anthropic import text_stream
    from helpers import in_thread, request_body, stream, until

    fake.script(events=text_stream(tuple(f"part{i} " for i in range(6))), pace=0.1)
    config = {"accounts": {"anthropic": [{"name": "a", "apiKey": "key-a", "baseUrl": fake.url}]}}
    top = proxy_on(tmp_path, reactor, config)
    top.startService()
    port = top.address()[1]
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def ask(method, path, body=None):
        kept.request(method, path, body=body, headers={"content-type": "application/json"})
        answer = kept.getresponse()
        return answer.status, answer.getheader("connection"), answer.read()

    try:
        assert (await in_thread(ask, "GET", "/health"))[0] == 200
        response, body = await stream(f"http://127.0.0.1:{port}/v1/messages", request_body(stream=True))
        assert response.code == 200
        await until(lambda: len(fake.requests) == 1)
        stopping = top.stopService()
        status, connection, answer = await in_thread(ask, "POST", "/v1/messages", request_body())
        assert status == 503 and connection == "close"
        assert json.loads(answer)["error"]["message"].startswith("clproxy is shutting down")
        await stopping
        assert b"message_stop" in body.body  # the stream in flight still finished
        assert len(fake.requests) == 1
    finally:
        kept.close()
        if top.running:
            await top.stopService()


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_on_a_port_in_use_says_so_in_one_line(tmp_path, workers, redis_server):  # noqa: F811
    """`twistd -n claudeproxy` (one process, or a supervisor of two workers) on a port another
    program holds: one line naming the address and the cause, a non-zero exit, no traceback (a
    40-line CannotListenError traceback was printed)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    config = tmp_path / "proxy-config.json"
    config.write_text(json.dumps({"state": {"backend": "redis", "url": redis_server.url,
                                            "prefix": unique_prefix()}} if workers > 1 else {}))
    try:
        result = subprocess.run(
            ENTRY_POINTS["twistd -n claudeproxy"] + ["--port", str(port), "--no-guard", "--config", str(config),
                                                     "--workers", str(workers)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(tmp_path / "home"),
            cwd=str(tmp_path), timeout=60)
    finally:
        holder.close()
    out = result.stdout
    assert result.returncode != 0, out
    assert f"clproxy: cannot listen on 127.0.0.1:{port}: Address already in use" in out, out
    assert "Traceback" not in out, out


HOLD_THE_HOME = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_a_daemon_starting_on_the_same_home_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
    """Two daemons started at once on one CLPROXY_HOME both found no state file and both ran (the
    state file named one; stopping it restored Claude Code's settings under the other). A daemon
    holds $CLPROXY_HOME/proxy-state.lock from its check to its exit: a start while another holds
    it is refused in one line; once the holder is killed (SIGKILL), the next start works."""
    home = tmp_path / "home"
    home.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_HOME, str(home / "proxy-state.lock")],
                              stdout=subprocess.PIPE)
    port = free_port()
    command = ENTRY_POINTS["clproxy proxy start"] + ["--port", str(port), "--no-guard"]
    try:
        assert holder.stdout.readline() == b"held\n"
        refused = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=environment(home), cwd=str(tmp_path))
        try:
            out = refused.communicate(timeout=60)[0].decode()
        finally:
            if refused.poll() is None:
                refused.kill()
                refused.communicate()
        assert refused.returncode == 1, out
        assert out.strip() == (f"clproxy: another clproxy is starting with this CLPROXY_HOME ({home}); "
                               "see `clproxy proxy status`"), out
    finally:
        holder.kill()
        holder.wait()
    started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=environment(home), cwd=str(tmp_path))
    lines = Lines(started.stdout)
    try:
        lines.wait_for(b"ProxySite starting")
        assert serving(port)  # (its signal handlers are in place once it answers)
        started.send_signal(signal.SIGTERM)
        assert started.wait(timeout=60) == 0
    finally:
        if started.poll() is None:
            started.kill()
            started.wait()
    assert not (home / "proxy-state.json").exists()


@pytest_twisted.ensureDeferred
async def test_a_stop_waits_for_a_token_refresh_in_flight_past_the_drain(tmp_path, fake):
    """The drain gives up while a request waits on an OAuth refresh: the stop still waits for that
    refresh to land and its rotated refresh token to be written. It finished at once, and the
    process exited with the token endpoint's answer (a new refresh token, the old one spent)
    still on its way: the account was lost."""
    import time

    from clproxy.accounts.oauth import TokenSet
    from clproxy.accounts.tokenstore import StoredCredential, TokenStore
    from clproxy.testing.oauth import listen_fake_oauth
    from helpers import post, request_body, until

    oauth, oauth_port, _ = listen_fake_oauth(reactor)
    home = tmp_path / "home"
    pair = oauth.seed_tokens()
    TokenStore(str(home)).put(StoredCredential.new_oauth(
        "work", TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token), time.time(),
        expires_at=time.time() + 8 * 3600))
    # the access token is refused: the request forces a refresh, which the token endpoint holds
    fake.script(pair.access_token, status=401,
                body=b'{"type":"error","error":{"type":"authentication_error","message":"revoked"}}')
    clock = task.Clock()
    top = proxy_on(tmp_path, clock, {
        "providers": {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}},
        "server": {"drainTimeout": 5}})  # (shorter than the token call's own 30 s timeout)
    top.startService()
    try:
        oauth.pause()
        asked = defer.ensureDeferred(post(f"http://127.0.0.1:{top.address()[1]}/v1/messages", request_body()))
        await until(lambda: oauth.refresh_calls >= 1)
        stopping = defer.ensureDeferred(_stop(top))
        await _turns()
        clock.advance(5)  # the drain gives up on the request
        await _turns()
        assert not stopping.called, "stopped with a token refresh in flight"
        oauth.resume()
        while not stopping.called:
            await _turns(1)
            clock.advance(0.1)
        await stopping
        stored = TokenStore(str(home)).get("anthropic:work")
        assert stored.refresh_token != pair.refresh_token
        assert stored.refresh_token in oauth.live_refresh_tokens
        await asked
    finally:
        if top.running:
            await top.stopService()
        await oauth_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_at_the_end_of_the_drain_says_the_proxy_stopped(tmp_path, fake):
    """A stream still running when drainTimeout is over ends with a well-formed ``event: error``
    saying clproxy is shutting down, then the response's end: before, it was left to the
    process's exit, and its client got a broken connection, or an error saying the upstream
    "broke off the stream", which blamed Anthropic for the proxy's own stop."""
    from clproxy.testing.anthropic import text_stream
    from helpers import request_body, stream, until

    fake.script(events=text_stream(tuple(f"part{i} " for i in range(200))), pace=0.05)
    config = {"accounts": {"anthropic": [{"name": "a", "apiKey": "key-a", "baseUrl": fake.url}]},
              "server": {"drainTimeout": 0.3}}
    top = proxy_on(tmp_path, reactor, config)
    top.startService()
    port = top.address()[1]
    try:
        response, body = await stream(f"http://127.0.0.1:{port}/v1/messages", request_body(stream=True))
        assert response.code == 200
        await until(lambda: top.proxy.dispatcher.streams)
        await top.stopService()
        assert await body.done is True  # the response ended properly (its last chunk), not a dropped connection
        names = [event.name for _, event in body.events]
        assert names[0] == "message_start" and names[-1] == "error", names[-3:]
        message = json.loads(body.events[-1][1].data)["error"]["message"]
        assert message.startswith("clproxy is shutting down") and "upstream" not in message
    finally:
        if top.running:
            await top.stopService()
