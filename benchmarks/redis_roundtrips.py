#!/usr/bin/env python3
"""How many Redis round trips and lock acquisitions one request costs, counted by Redis itself.

A daemon (``--workers N``, default 1) on the Redis state store, with two accounts in front of the
benchmark's fake upstream, serves ``--requests`` requests of each kind, one at a time; Redis's own
``MONITOR`` feed gives the commands the daemon sent, per request, by command. A Lua script
(``EVALSHA``) is one round trip however many keys it touches (the commands it runs are counted
apart); a lock is a ``SET ... NX`` (``set`` below) and its release a script. Kinds:

* ``nonstream``: ``POST /v1/messages`` without a session;
* ``session``: the same with Claude Code's session header (affinity: the binding is read and
  refreshed);
* ``stream``: a short SSE stream with the session header.

Each ``EVALSHA`` is named by its script (the Lua scripts of ``clproxy.state.redis``, matched by SHA1).

This is what bounds scaling on a bigger machine: every worker pays these round trips per request
and nothing else is shared between workers (no lock is taken on a request's path unless an OAuth
token is refreshed).

Usage: ``.venv/bin/python benchmarks/redis_roundtrips.py [--requests 200] [--workers 1]``
"""

import argparse
import collections
import hashlib
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
import payload  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402

MONITOR_LINE = re.compile(rb'^\+\d+\.\d+ \[\d+ ([^\]]+)\] "([A-Za-z]+)"(?: "([0-9a-f]{40})")?')


def script_names():
    """The SHA1 of each of the Redis store's Lua scripts -> its name (``EVALSHA`` names a script
    by its SHA1 only)."""
    from clproxy.state.redis import scripts, store, workermetrics
    return {hashlib.sha1(text.encode()).hexdigest(): name.lower()
            for module in (scripts, store, workermetrics)
            for name, text in vars(module).items()
            if name.isupper() and isinstance(text, str) and "redis.call" in text}


class Monitor(threading.Thread):
    """Redis's ``MONITOR`` feed, counted: a command the daemon sent is one round trip; a command a
    Lua script ran shows as ``[0 lua]`` and is counted apart."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.sent = collections.Counter()
        self.scripted = collections.Counter()
        self.scripts = collections.Counter()  # EVALSHA by script name
        self._names = script_names()
        self._stop_event = threading.Event()

    def run(self):
        buffer = b""
        self.sock.settimeout(0.2)
        while not self._stop_event.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                match = MONITOR_LINE.match(line)
                if match is None:
                    continue
                source, command = match.group(1), match.group(2).decode("ascii", "replace").lower()
                (self.scripted if source == b"lua" else self.sent)[command] += 1
                if command == "evalsha" and source != b"lua" and match.group(3):
                    sha = match.group(3).decode("ascii")
                    self.scripts[self._names.get(sha, sha[:8])] += 1

    def take(self):
        """The counts so far (and start again from zero)."""
        time.sleep(0.3)  # the feed trails the commands a little
        sent, scripted, scripts = self.sent, self.scripted, self.scripts
        self.sent, self.scripted, self.scripts = collections.Counter(), collections.Counter(), collections.Counter()
        return sent, scripted, scripts

    def stop(self):
        self._stop_event.set()
        self.sock.close()


def start_upstream():
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py"), "--port", "0",
                             "--deltas", "10", "--interval-ms", "1"], stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("READY "):
        raise SystemExit(f"the fake upstream did not start: {line!r}")
    return proc, int(line.split()[1])


def start_proxy(tmp: str, upstream_port: int, redis_url: str, workers: int):
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"version": 1, "state": {"backend": "redis", "url": redis_url},
                   "accounts": {"anthropic": [{"name": name, "apiKey": "bench-key",
                                               "baseUrl": f"http://127.0.0.1:{upstream_port}"}
                                              for name in ("bench", "spare")]}}, f)
    home = os.path.join(tmp, "home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, CLPROXY_HOME=os.path.join(home, ".clproxy"),
               CLPROXY_CLAUDE_SETTINGS=os.path.join(home, "settings.json"))
    env.pop("ANTHROPIC_API_KEY", None)
    port = free_port()
    log_path = os.path.join(tmp, "proxy.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clproxy", "proxy", "start", "--port", str(port),
                                 "--config", config, "--quiet", "--claude-settings", "off", "--no-guard",
                                 "--workers", str(workers)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    with open(log_path) as log:
        raise SystemExit("the proxy did not start: " + log.read()[-2000:])


def request(port: int, method: str, path: str, body: bytes = None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def count(port: int, monitor: Monitor, requests: int, workers: int, body: dict) -> None:
    kinds = {
        "nonstream": (dict(body, stream=False), {}),
        "session": (dict(body, stream=False), {"x-claude-code-session-id": "bench-session-1"}),
        "stream": (dict(body, stream=True), {"x-claude-code-session-id": "bench-session-2"}),
    }
    print(f"Redis round trips per request ({requests} requests of each kind, two accounts, "
          f"{workers} worker(s), counted from Redis's MONITOR feed)")
    for kind, (document, extra) in kinds.items():
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", **extra}
        data = json.dumps(document).encode()
        request(port, "POST", "/v1/messages", data, headers)  # the first one may create state
        monitor.take()
        took = []
        for _ in range(requests):
            started = time.perf_counter()
            status, _ = request(port, "POST", "/v1/messages", data, headers)
            took.append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"{kind}: the proxy answered {status}")
        sent, scripted, scripts = monitor.take()
        total = sum(sent.values()) / requests
        shown = ", ".join(f"{name} {n / requests:.2f}" for name, n in sent.most_common())
        if scripts:
            shown += "; scripts: " + ", ".join(f"{name} {n / requests:.2f}" for name, n in scripts.most_common())
        print(f"  {kind:<10} {total:5.2f} round trips ({shown}); "
              f"{sum(scripted.values()) / requests:.2f} commands inside scripts; "
              f"locks taken (SET NX) {sent['set'] / requests:.2f}; "
              f"median {statistics.median(took) * 1000:.3f} ms per request (a new connection each)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="clproxy-rtt-")
    redis = RedisServer(tmp)
    redis.start()
    upstream, upstream_port = start_upstream()
    proxy = monitor = None
    try:
        proxy, port = start_proxy(tmp, upstream_port, redis.url, args.workers)
        time.sleep(1.0)  # let start-up (key and token publishing) finish before counting
        with open(payload.write_files(tmp)["body"], "rb") as f:
            body = json.loads(f.read())
        monitor = Monitor(redis.port)
        monitor.start()
        count(port, monitor, args.requests, args.workers, body)
    finally:
        if monitor is not None:
            monitor.stop()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        upstream.terminate()
        upstream.wait(10)
        redis.stop()


if __name__ == "__main__":
    main()
