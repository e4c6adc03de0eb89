"""Soak: what a long day leaves behind in the daemon (a load that prints figures; not a test).

Runs the real daemon (``python -m clproxy proxy start``) against the shipped fake Anthropic
upstream and fake OAuth server for a while, with the traffic users make: non-stream and stream
requests, clients that hang up mid-stream and mid-body, upstream answers of 429 / 401 (the OAuth
account refreshes) / 500 / a cut body / a stall / a cut stream, /status, /metrics and /dashboard
polls, and many distinct sessions (``metadata.user_id``). It samples the daemon's RSS, open fds
and threads over time, and asks it (SIGUSR2, handled by the wrapper this script starts it with) for
a census: live objects by type, delayed calls and readers/writers in the reactor.

    .venv/bin/python benchmarks/soak.py --minutes 5              # memory store
    .venv/bin/python benchmarks/soak.py --minutes 5 --redis      # Redis store (redis-server on PATH)

It prints one row per sample, then the census types that grew most from the end of the warm-up
to the end. All traffic stays on 127.0.0.1; HOME and CLPROXY_HOME are throw-away directories.
"""

import argparse
import collections
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# -- the fakes (a child process: `soak.py fakes HOME`) ---------------------------------------


def run_fakes(home: str) -> None:
    """Serve the fake Anthropic API and the fake OAuth server; seed one OAuth account in ``home``.

    The fake answers by a marker in the request body (``SOAK:<mode>``), so the load chooses the
    upstream's behaviour per request whatever account the daemon picks."""
    from twisted.internet import reactor

    from clproxy.accounts.oauth import TokenSet
    from clproxy.accounts.tokenstore import StoredCredential, TokenStore
    from clproxy.testing.anthropic import FakeAnthropic, Script, error_json, text_stream
    from clproxy.testing.oauth import listen_fake_oauth

    oauth, _, _ = listen_fake_oauth(reactor, access_ttl=90)
    pair = oauth.seed_tokens()
    TokenStore(home).put(StoredCredential.new_oauth(
        "oauth", TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token),
        time.time(), expires_at=time.time() + 90))

    class SoakAnthropic(FakeAnthropic):
        def render(self, request):
            # keep the fake's own records short: it runs for hours too
            del self.requests[:], self.sent[:]
            body = request.content.read()
            request.content.seek(0)
            # the marker is SOAK:<mode>:<nonce>; only a request's first attempt gets the mode's
            # answer, so the daemon's retry on another account succeeds (as upstream errors do)
            marker = body.find(b"SOAK:")
            tag = body[marker + 5:marker + 40].split(b'\\')[0] if marker >= 0 else b""
            mode = tag.split(b":")[0]
            if tag in seen:
                mode = b""
            else:
                seen[tag] = None
                while len(seen) > 10000:
                    seen.popitem(last=False)
            credential = self._credential(request)
            oauth_token = credential is not None and credential.startswith("sk-ant-oat")
            script = None
            if mode == b"429":
                script = Script(status=429, headers={"retry-after": "1"},
                                body=error_json(429, "rate_limit_error", "slow down"))
            elif mode == b"401" and oauth_token and oauth.is_live_access_token(credential):
                self.revoke(credential)
            elif mode == b"500":
                script = Script(status=500, body=error_json(500, "api_error", "boom"))
            elif mode == b"cut":
                script = Script(body_cut_at=40)
            elif mode == b"stall":
                script = Script(body_stall_at=40)
            elif mode == b"scut":
                script = Script(events=text_stream(), cut_after=3)
            elif mode == b"slow":
                script = Script(events=text_stream(tuple(f" part{i}" for i in range(20))), pace=0.05)
            if script is not None:
                self._scripts[credential] = [script]
            try:
                return super().render(request)
            finally:
                self._scripts.pop(credential, None)

        def _take(self, credential):  # the one-shot script render() queued
            queue = self._scripts.get(credential)
            return queue[0] if queue else None

        @staticmethod
        def _credential(request):
            from clproxy.testing.anthropic import credential_of
            return credential_of(request)

    seen = collections.OrderedDict()
    fake = SoakAnthropic(reactor)
    fake.listen()
    print(f"READY {fake.port.getHost().port} {oauth.token_url}", flush=True)
    reactor.run()


# -- the daemon wrapper (`soak.py daemon CENSUS ARGS...`) --------------------------------------


def run_daemon(census_path: str, argv) -> None:
    """Run ``python -m clproxy ARGS`` in this process, with a SIGUSR2 handler writing a census."""
    import collections
    import gc
    import threading
    import types
    from collections import Counter

    import tracemalloc
    first = []  # the first census's tracemalloc snapshot: later ones are compared with it

    def census(_signum, _frame):
        from twisted.internet import reactor
        gc.collect()
        grown = []
        if tracemalloc.is_tracing():  # --tracemalloc: what allocated the memory held since then
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            if not first:
                first.append(snapshot)
            grown = [(stat.size_diff, stat.count_diff, str(stat.traceback))
                     for stat in snapshot.compare_to(first[0], "lineno")[:20]]
        counts = Counter(type(o).__qualname__ for o in gc.get_objects())
        calls = Counter()
        for call in reactor.getDelayedCalls():
            func = getattr(call.func, "__qualname__", repr(call.func))
            calls[func] += 1
        big = []
        for o in gc.get_objects():
            if isinstance(o, (dict, list, set, collections.deque, collections.OrderedDict)) and len(o) >= 300:
                owners = [type(r).__qualname__ for r in gc.get_referrers(o)
                          if not isinstance(r, (list, types.FrameType))][:2]
                owner = ""
                for r in gc.get_referrers(o):
                    if isinstance(r, dict):
                        for attr_owner in gc.get_referrers(r):
                            if getattr(attr_owner, "__dict__", None) is r:
                                name = next((k for k, v in r.items() if v is o), "?")
                                owner = f"{type(attr_owner).__qualname__}.{name}"
                                break
                    if owner:
                        break
                big.append((len(o), type(o).__qualname__, owner or ",".join(owners)))
        big.sort(reverse=True)
        figures = {"types": dict(counts.most_common(400)), "big": big[:12], "delayed": dict(calls),
                   "delayed_total": sum(calls.values()), "readers": len(reactor.getReaders()),
                   "writers": len(reactor.getWriters()), "threads": threading.active_count(),
                   "gc_objects": sum(counts.values()), "tracemalloc": grown}
        with open(census_path + ".tmp", "w") as f:
            json.dump(figures, f)
        os.replace(census_path + ".tmp", census_path)

    signal.signal(signal.SIGUSR2, census)
    sys.argv = ["clproxy"] + list(argv)
    from clproxy.cli.main import main
    sys.exit(main(list(argv)))


# -- the load ------------------------------------------------------------------------------------

PAD = "x" * 3000  # a modest body, a few KB like a short Claude Code turn


_nonces = iter(range(1, 1 << 62))


def body(mode: str, session: str, stream: bool) -> bytes:
    user_id = json.dumps({"device_id": "soak", "account_uuid": "", "session_id": session})
    return json.dumps({
        "model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
        "metadata": {"user_id": user_id},
        "messages": [{"role": "user", "content": f"SOAK:{mode}:{next(_nonces)}\\ {PAD}"}]}).encode()


def head(method: str, path: str, length: int = 0, extra: str = "", keep: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: " + ("keep-alive" if keep else "close"),
             "anthropic-version: 2023-06-01", "x-api-key: soak-client-not-a-secret"]
    if method == "POST":
        lines += ["content-type: application/json", f"content-length: {length}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


class Load:
    """Workers making the mix of requests; counts outcomes."""

    # (weight, kind)
    MIX = [(30, "ok"), (18, "stream"), (4, "slow"), (6, "hangup_stream"), (5, "hangup_body"),
           (1, "429"), (5, "401"), (5, "500"), (4, "cut"), (2, "stall"), (4, "scut"),
           (3, "hangup_wait"), (3, "status"), (2, "metrics"), (2, "dashboard"), (2, "feed"),
           (4, "keepalive"), (1, "silent"), (1, "half_head"), (1, "idle_keepalive")]

    def __init__(self, port: int, seed: int = 1):
        self.port = port
        self.rng = random.Random(seed)
        self.counts = {}
        self.statuses = {}
        self.samples = {}
        self.sessions = 0
        self.kinds = [k for w, k in self.MIX for _ in range(w)]

    def session(self) -> str:
        # half the requests continue one of the last sessions, half start a new one
        if self.sessions and self.rng.random() < 0.5:
            n = self.rng.randrange(max(0, self.sessions - 50), self.sessions)
        else:
            n = self.sessions
            self.sessions += 1
        return f"soak-session-{n:08d}"

    async def exchange(self, data: bytes, read_limit=None, timeout=30.0, close_after=None):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        try:
            writer.write(data)
            await writer.drain()
            if close_after is not None:
                await asyncio.sleep(close_after)
                return None
            got = b""
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return got
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), left)
                except asyncio.TimeoutError:
                    return got
                if not chunk:
                    return got
                got += chunk
                if read_limit is not None and len(got) >= read_limit:
                    return got
        finally:
            writer.transport.abort() if close_after is not None or read_limit else writer.close()

    async def keepalive(self, count: int, idle: float = 0.0):
        """``count`` non-stream requests on one kept-alive connection, then ``idle`` seconds of
        silence with the connection open, then a hang-up; the last answer's head."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        got = b""
        try:
            for _ in range(count):
                data = body("ok", self.session(), False)
                writer.write(head("POST", "/v1/messages", len(data), keep=True) + data)
                got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = 0
                for line in got.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await asyncio.wait_for(reader.readexactly(length), 30)
            await asyncio.sleep(idle)
            return got
        finally:
            writer.transport.abort()

    async def one(self) -> None:
        kind = self.rng.choice(self.kinds)
        try:
            got = await self._one(kind)
        except (OSError, asyncio.TimeoutError) as e:
            got = None
            self.statuses[type(e).__name__] = self.statuses.get(type(e).__name__, 0) + 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if got:
            status = got[9:12].decode("latin-1", "replace")
            key = f"{kind}:{status}"
            if status not in self.samples:
                self.samples[status] = got[-300:].decode("latin-1", "replace")
            self.statuses[key] = self.statuses.get(key, 0) + 1

    async def _one(self, kind: str):
        if kind == "keepalive":
            return await self.keepalive(self.rng.randint(2, 5))
        if kind == "idle_keepalive":  # a client that keeps its connection open between turns
            return await self.keepalive(1, self.rng.uniform(1.0, 4.0))
        if kind == "silent":  # connects, says nothing, goes away
            return await self.exchange(b"", close_after=self.rng.uniform(0.5, 3.0))
        if kind == "half_head":  # half a request head, then gone
            return await self.exchange(head("POST", "/v1/messages", 100)[:60], close_after=0.5)
        if kind in ("status", "metrics"):
            return await self.exchange(head("GET", "/" + kind))
        if kind == "dashboard":
            await self.exchange(head("GET", "/dashboard/"))
            return await self.exchange(head("GET", "/dashboard/state"))
        if kind == "feed":  # a live feed open for a moment, then the tab closes
            return await self.exchange(head("GET", "/dashboard/events"), timeout=self.rng.uniform(0.5, 3.0))
        stream = kind in ("stream", "slow", "hangup_stream", "scut") or (
            kind not in ("ok",) and self.rng.random() < 0.3)
        mode = {"hangup_stream": "slow", "hangup_wait": "stall", "ok": "ok", "stream": "ok"}.get(kind, kind)
        data = body(mode, self.session(), stream)
        if kind == "hangup_body":  # the client sends half its body and goes away
            return await self.exchange(head("POST", "/v1/messages", len(data)) + data[:len(data) // 2],
                                       close_after=0.2)
        if kind == "hangup_stream":  # reads the first events of a slow stream, then hangs up
            return await self.exchange(head("POST", "/v1/messages", len(data)) + data, read_limit=600)
        if kind == "hangup_wait":  # the upstream stalls; the client gives up after a moment
            return await self.exchange(head("POST", "/v1/messages", len(data)) + data,
                                       close_after=self.rng.uniform(0.3, 1.5))
        return await self.exchange(head("POST", "/v1/messages", len(data)) + data, timeout=30.0)

    async def worker(self, until: float) -> None:
        while time.monotonic() < until:
            await self.one()


# -- sampling ------------------------------------------------------------------------------------


async def edit_config(config: dict, path: str, every: float, until: float) -> None:
    """Change key1's weight every ``every`` seconds: the daemon reloads its config each time."""
    n = 0
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        n += 1
        config["accounts"]["anthropic"][1]["weight"] = 1 + n % 2
        with open(path + ".tmp", "w") as f:
            json.dump(config, f)
        os.replace(path + ".tmp", path)


def proc_figures(pid: int) -> dict:
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                figures[name] = int(value.split()[0])
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


def ask_census(pid: int, path: str) -> dict:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.1)
    return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(head("GET", path))
        data = s.recv(100)
    return int(data[9:12])


def wait_line(proc, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    line = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline and proc.poll() is None:
        chunk = proc.stdout.read()
        if chunk:
            line += chunk
            if b"\n" in line:
                return line.split(b"\n")[0].decode()
        time.sleep(0.05)
    raise SystemExit(f"no READY line from {proc.args}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the baseline sample")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--redis", action="store_true", help="use the Redis store (starts redis-server)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the daemon under tracemalloc (slower) and print the allocation sites "
                             "whose memory grew from the end of the warm-up to the end")
    parser.add_argument("--reload-every", type=float, default=0.0,
                        help="rewrite the config (key1's weight) every this many seconds (0: never)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="clproxy-soak-")
    home = os.path.join(tmp, "home")
    clhome = os.path.join(home, ".clproxy")
    os.makedirs(clhome)
    env = dict(os.environ, HOME=home, CLPROXY_HOME=clhome, PYTHONUNBUFFERED="1",
               CLPROXY_CLAUDE_SETTINGS=os.path.join(home, ".claude", "settings.json"))
    env.pop("ANTHROPIC_API_KEY", None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    children = []
    try:
        fakes = subprocess.Popen([sys.executable, __file__, "fakes", clhome], stdout=subprocess.PIPE,
                                 stderr=open(os.path.join(tmp, "fakes.log"), "w"), env=env,
                                 start_new_session=True)
        children.append(fakes)
        _, upstream_port, token_url = wait_line(fakes, 20).split()
        upstream = f"http://127.0.0.1:{upstream_port}"
        config = {
            "version": 1,
            # key0 takes 2 requests at a time: the others queue for it or go elsewhere
            "accounts": {"anthropic": [dict({"name": f"key{i}", "apiKey": f"soak-upstream-key-{i}",
                                             "baseUrl": upstream}, **({"maxConcurrent": 2} if i == 0 else {}))
                                       for i in range(3)]},
            "providers": {"anthropic": {"baseUrl": upstream, "oauthTokenUrl": token_url,
                                        "refreshBeforeExpiry": 30}},
            "routing": {"strategy": "round-robin", "session-affinity": {"enabled": True, "ttl": 3600}},
            "server": {"upstreamTimeout": 3, "keepaliveInterval": 2},
        }
        if args.redis:
            redis_port = free_port()
            redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "",
                                      "--appendonly", "no", "--dir", tmp],
                                     stdout=open(os.path.join(tmp, "redis.log"), "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
            children.append(redis)
            time.sleep(0.5)
            config["state"] = {"backend": "redis", "url": f"redis://127.0.0.1:{redis_port}/0"}
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        port = free_port()
        census_path = os.path.join(tmp, "census.json")
        daemon = subprocess.Popen(
            [sys.executable, __file__, "daemon", census_path, "proxy", "start", "--port", str(port),
             "--config", config_path, "--quiet", "--claude-settings", "off", "--no-guard"],
            stdout=open(os.path.join(tmp, "daemon.log"), "w"), stderr=subprocess.STDOUT,
            env=dict(env, PYTHONTRACEMALLOC="1") if args.tracemalloc else env, cwd=REPO, start_new_session=True)
        children.append(daemon)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_get(port, "/health") == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"the daemon did not start; see {tmp}/daemon.log")
        time.sleep(1.0)
        pid = daemon.pid
        rows = [("start", 0, proc_figures(pid))]
        print(f"soak: daemon pid {pid} port {port}, {'redis' if args.redis else 'memory'} store, "
              f"{args.workers} clients, {args.minutes:g} min; tmp {tmp}", flush=True)
        print(f"{'when':>8} {'requests':>9} {'RSS MiB':>8} {'HWM MiB':>8} {'fds':>5} {'threads':>7}", flush=True)

        def show(label, served, fig):
            print(f"{label:>8} {served:>9} {fig['VmRSS'] / 1024:>8.1f} {fig['VmHWM'] / 1024:>8.1f} "
                  f"{fig['fds']:>5} {fig['Threads']:>7}", flush=True)

        show("start", 0, rows[0][2])
        load = Load(port)
        start = time.monotonic()
        end = start + args.minutes * 60
        baseline = None

        async def run():
            nonlocal baseline
            tasks = [asyncio.ensure_future(load.worker(end)) for _ in range(args.workers)]
            if args.reload_every:
                tasks.append(asyncio.ensure_future(edit_config(config, config_path, args.reload_every, end)))
            next_sample = start + args.warmup
            while time.monotonic() < end:
                await asyncio.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
                if time.monotonic() >= end:
                    break
                served = sum(load.counts.values())
                fig = proc_figures(pid)
                label = f"{(time.monotonic() - start) / 60:.1f}m"
                rows.append((label, served, fig))
                show(label, served, fig)
                if baseline is None:
                    baseline = await asyncio.get_running_loop().run_in_executor(
                        None, ask_census, pid, census_path)
                next_sample += args.interval
            await asyncio.gather(*tasks)

        asyncio.run(run())
        time.sleep(4.0)  # let stalls time out and hung streams be noticed
        served = sum(load.counts.values())
        fig = proc_figures(pid)
        rows.append(("end", served, fig))
        show("end", served, fig)
        final = ask_census(pid, census_path)
        print("requests by kind:", json.dumps(dict(sorted(load.counts.items()))))
        print("answers:", json.dumps(dict(sorted(load.statuses.items()))))
        print(f"sessions: {load.sessions}")
        for status, sample in sorted(load.samples.items()):
            if not status.startswith("2"):
                print(f"a {status} answer ends: {sample!r}")
        if baseline and final:
            print(f"census (after warm-up -> end): gc objects {baseline['gc_objects']} -> {final['gc_objects']}, "
                  f"delayed calls {baseline['delayed_total']} -> {final['delayed_total']}, "
                  f"readers {baseline['readers']} -> {final['readers']}, writers {baseline['writers']} -> "
                  f"{final['writers']}, threads {baseline['threads']} -> {final['threads']}")
            grown = sorted(((final["types"].get(t, 0) - baseline["types"].get(t, 0), t)
                            for t in final["types"]), reverse=True)[:15]
            print("types grown most:", ", ".join(f"{t} +{n}" for n, t in grown if n > 0))
            print("delayed calls at end:", json.dumps(final["delayed"]))
            print("largest containers after warm-up:", baseline["big"])
            print("largest containers at end:", final["big"])
            for size, count, where in final.get("tracemalloc") or []:
                print(f"tracemalloc: {size / 1024:+10.1f} KiB {count:+8d} blocks  {where}")
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                    child.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(child.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fakes":
        sys.path.insert(0, REPO)
        run_fakes(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "daemon":
        sys.path.insert(0, REPO)
        run_daemon(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
