#!/usr/bin/env python3
"""clproxy load benchmark: the same fake upstream and the same load, direct vs through the proxy.

One run measures, side by side (client -> fake upstream, and client -> clproxy -> fake upstream):

* non-stream ``POST /v1/messages`` with a ~20 KB Claude-Code-like body at concurrency 1, 32, 256
  (wrk, ``benchmarks/wrk_messages.lua``): req/s, p50, p99;
* paced SSE streams (40 text deltas 20 ms apart) with 100 and 1,000 concurrent streams
  (``benchmarks/stream_client.py``): time to first byte, per-event delay, completeness, and the
  daemon's idle and peak RSS.

The proxy is pinned to one core (``taskset -c 0``), the load generator and the fake upstream to
the other (``taskset -c 1``). It prints a table, PASS/MISS per target, and writes everything as
JSON to ``benchmarks/results/latest.json``. See ``benchmarks/README.md``.

Usage: ``python benchmarks/run.py [--quick] [--only nonstream|stream] [--proxy-cmd CMD]``.
"""

import argparse
import atexit
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import re
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import payload  # noqa: E402
import upstream as fake_upstream  # noqa: E402

LUA = os.path.join(HERE, "wrk_messages.lua")
DEFAULT_OUTPUT = os.path.join(HERE, "results", "latest.json")
DEFAULT_PROXY_CMD = "{python} -m clproxy proxy start --port {port} --config {config} --quiet"
# `proxy start` options that keep a benchmark daemon away from the user's Claude Code settings and
# from starting a detached guard; added to the default command when this tree's daemon has them
LIFECYCLE_FLAGS = ("--claude-settings", "off", "--no-guard")
TICK = os.sysconf("SC_CLK_TCK")
LINE_RE = re.compile(r":\d+\)$")

#: Issue 17's targets (one process pinned to one core; see benchmarks/README.md "Streams at scale")
TARGETS = {
    "added_p50_c1_ms": 0.5,
    "proxy_rps_c32": 3000.0,
    "stream100_added_delay_p99_ms": 2.0,
    "stream1000_added_ttfb_p50_ms": 100.0,
    "stream1000_added_delay_p99_ms": 50.0,
    "stream1000_peak_rss_mib": 150.0,
    "idle_rss_mib": 60.0,
}


class BenchError(Exception):
    """The run cannot go on (a process did not start, a sanity check failed)."""


# -- processes -------------------------------------------------------------------------------

class Process:
    """A child in its own process group, always stopped (TERM, then KILL) by :meth:`stop`."""

    live = []

    def __init__(self, name, argv, log_path, env=None, cwd=None, stdout=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=stdout if stdout is not None else self._log,
                                     stderr=self._log, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                     start_new_session=True)
        self.pid = self.proc.pid
        Process.live.append(self)
        if name not in ("py-spy", "perf"):
            boost(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=5.0):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # the leader exited; make sure nothing it started lingers in its group
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        if self in Process.live:
            Process.live.remove(self)

    def log_tail(self, n=20):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


def stop_all():
    for p in list(reversed(Process.live)):
        try:
            p.stop(timeout=3.0)
        except Exception:
            pass


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped


NICE = 0  # set by main(): the niceness given to every benchmark process


def boost(pid):
    """Give ``pid`` the benchmark's niceness, also as its autogroup's.

    Each child runs in its own session (so its whole process group can be stopped), and with
    ``kernel.sched_autogroup_enabled`` every session is its own scheduling group: a plain nice value
    then only ranks threads inside that group, so the autogroup's niceness is set as well.
    Best effort: without the permission nothing changes.
    """
    if not NICE:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, NICE)
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(NICE))
    except OSError:
        pass


def run_boosted(argv, timeout, env=None):
    """``subprocess.run(argv, capture_output=True)`` in its own session, boosted, bounded by ``timeout``."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    boost(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def pinned(cpu, argv):
    if cpu is None or not shutil.which("taskset"):
        return argv
    return ["taskset", "-c", str(cpu)] + argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(need=8192):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(need, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc readings ----------------------------------------------------------------------------

def cpu_times():
    """Per-core (busy, total) ticks from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                values = [int(v) for v in parts[1:9]]
                idle = values[3] + values[4]
                out[int(parts[0][3:])] = (sum(values) - idle, sum(values))
    return out


def _stat_cpu(path):
    """utime + stime in seconds from a /proc ``stat`` file (None when it is gone)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def proc_cpu(pid):
    """utime + stime of ``pid`` (all its threads) in seconds (None when it is gone)."""
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(pid, tid):
    """utime + stime of one thread ``tid`` of ``pid`` in seconds (None when it is gone)."""
    return _stat_cpu(f"/proc/{pid}/task/{tid}/stat")


def proc_wait(pid):
    """Seconds ``pid`` (its main thread) spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def proc_status(pid):
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def cores_busy(cpu):
    """The busy shares of all cores in a ``Meter.finish()`` result, summed (% of one core)."""
    shares = [value for key, value in cpu.items() if key.startswith("core") and key.endswith("_busy_pct")]
    return round(sum(shares), 1) if shares else None


def ratio_of(many, one, key):
    """``many[key] / one[key]`` rounded, or None when either is missing or zero."""
    if not many.get(key) or not one.get(key):
        return None
    return round(many[key] / one[key], 3)


class Meter:
    """CPU use of the cores and of named processes over one measurement."""

    def __init__(self, pids):
        self.pids = {k: v for k, v in pids.items() if v}
        self.t0 = time.monotonic()
        self.cores0 = cpu_times()
        self.proc0 = {k: proc_cpu(v) for k, v in self.pids.items()}
        self.wait0 = {k: proc_wait(v) for k, v in self.pids.items()}
        self.main0 = {k: thread_cpu(v, v) for k, v in self.pids.items()}
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def finish(self, generator_pid=None):
        elapsed = time.monotonic() - self.t0
        cores1 = cpu_times()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"elapsed_s": round(elapsed, 3)}
        for core, (busy, total) in cores1.items():
            b0, t0 = self.cores0.get(core, (busy, total))
            out[f"core{core}_busy_pct"] = round(100.0 * (busy - b0) / max(1, total - t0), 1)
        for name, pid in self.pids.items():
            before, after = self.proc0.get(name), proc_cpu(pid)
            if before is not None and after is not None:
                out[f"{name}_cpu_pct"] = round(100.0 * (after - before) / elapsed, 1)
            before, after = self.wait0.get(name), proc_wait(pid)
            if before is not None and after is not None:
                out[f"{name}_runq_wait_pct"] = round(100.0 * (after - before) / elapsed, 1)
            # the process's other threads (the daemon's JSONL writer): pinned with it, they take
            # its core while its main thread waits, which is its own cost, not other processes'
            main0, main1 = self.main0.get(name), thread_cpu(pid, pid)
            if f"{name}_cpu_pct" in out and main0 is not None and main1 is not None:
                main = round(100.0 * (main1 - main0) / elapsed, 1)
                out[f"{name}_other_threads_cpu_pct"] = round(max(0.0, out[f"{name}_cpu_pct"] - main), 1)
        generator = ((children1.ru_utime + children1.ru_stime)
                     - (self.children0.ru_utime + self.children0.ru_stime))
        out["generator_cpu_pct"] = round(100.0 * generator / elapsed, 1)
        return out


class RssSampler(threading.Thread):
    """Samples VmRSS and CPU time of ``pid`` every ``interval`` s until stopped (bounded by ``limit`` s)."""

    def __init__(self, pid, interval=0.1, limit=600.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.limit = pid, interval, limit
        self.max_rss_kib = 0
        self.samples = 0
        self.cpu = []  # (monotonic time, cpu seconds)
        self._stop_event = threading.Event()

    def run(self):
        deadline = time.monotonic() + self.limit
        while not self._stop_event.is_set() and time.monotonic() < deadline:
            rss = proc_status(self.pid).get("VmRSS")
            cpu = proc_cpu(self.pid)
            if rss is None or cpu is None:
                return
            self.samples += 1
            self.max_rss_kib = max(self.max_rss_kib, rss)
            self.cpu.append((time.monotonic(), cpu))
            self._stop_event.wait(self.interval)

    def cpu_pct_between(self, start, stop):
        """CPU use (% of one core) between two monotonic instants, from the samples nearest them."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= stop]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return round(100.0 * (c1 - c0) / (t1 - t0), 1)

    def stop(self):
        self._stop_event.set()
        self.join(5.0)


# -- the pieces of the run -----------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="clproxy-bench-")
        self.files = payload.write_files(self.tmp)
        self.upstream = None
        self.upstream_port = None
        self.proxy = None
        self.proxy_port = None
        self.config_path = os.path.join(self.tmp, "config.json")
        self.results_dir = os.path.dirname(os.path.abspath(args.output))
        self.profiles = {}
        #: with ``--syscalls``: the daemon's system calls during each proxy run, by label
        self.syscalls = {}
        #: with ``--load c``: the compiled fake upstream and stream client (load/*.c)
        try:
            self.binaries = build_c_load(self.tmp) if args.load == "c" else {}
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def cleanup(self):
        stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # upstream ----------------------------------------------------------------------------
    def start_upstream(self):
        program = ([self.binaries["sse_upstream"]] if self.binaries
                   else [sys.executable, os.path.join(HERE, "upstream.py")])
        argv = pinned(self.args.load_cpu, program + ["--port", "0", "--deltas", str(self.args.deltas),
                                                     "--interval-ms", str(self.args.interval_ms)])
        self.upstream = Process("upstream", argv, os.path.join(self.tmp, "upstream.log"),
                                stdout=subprocess.PIPE)
        deadline = time.monotonic() + 15.0
        line = b""
        # the first stdout line is "READY <port>"; bounded wait
        os.set_blocking(self.upstream.proc.stdout.fileno(), False)
        while time.monotonic() < deadline and self.upstream.alive():
            try:
                chunk = self.upstream.proc.stdout.read()
            except (BlockingIOError, TypeError):
                chunk = None
            if chunk:
                line += chunk
                if b"\n" in line:
                    break
            time.sleep(0.05)
        if not line.startswith(b"READY "):
            raise BenchError(f"the fake upstream did not start:\n{self.upstream.log_tail()}")
        self.upstream_port = int(line.split()[1])
        with open(self.config_path, "w") as f:
            json.dump({"version": 1, "accounts": {"anthropic": [
                {"name": "bench", "apiKey": "bench-key",
                 "baseUrl": f"http://127.0.0.1:{self.upstream_port}"}]}}, f)

    # proxy -------------------------------------------------------------------------------
    def proxy_env(self):
        """The daemon's environment: a throw-away HOME, so nothing of the user's is read or changed."""
        env = dict(os.environ)
        env.pop("ANTHROPIC_API_KEY", None)
        home = os.path.join(self.tmp, "home")
        env["HOME"] = home
        env["CLPROXY_HOME"] = os.path.join(home, ".clproxy")
        env["CLPROXY_CLAUDE_SETTINGS"] = os.path.join(home, ".claude", "settings.json")
        env["PYTHONUNBUFFERED"] = "1"
        os.makedirs(env["CLPROXY_HOME"], exist_ok=True)
        return env

    def proxy_template(self):
        if self.args.proxy_cmd:
            return self.args.proxy_cmd
        if getattr(self, "_template", None) is None:
            template = DEFAULT_PROXY_CMD
            try:
                helped = subprocess.run([sys.executable, "-m", "clproxy", "proxy", "start", "--help"],
                                        capture_output=True, timeout=30, cwd=REPO, env=self.proxy_env())
                text = helped.stdout.decode("utf-8", "replace")
                for flag in ("--claude-settings", "--no-guard"):
                    if flag in text:
                        template += " " + " ".join(LIFECYCLE_FLAGS[:2] if flag == "--claude-settings"
                                                   else LIFECYCLE_FLAGS[2:])
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._template = template
        return self._template

    def start_proxy(self, extra=(), config=None):
        port = free_port()
        template = self.proxy_template()
        argv = [part.format(python=sys.executable, port=port, config=config or self.config_path)
                for part in shlex.split(template)] + list(extra)
        env = self.proxy_env()
        proxy = Process("proxy", pinned(self.args.proxy_cpu, argv),
                        os.path.join(self.tmp, f"proxy-{port}.log"), env=env, cwd=REPO)
        deadline = time.monotonic() + 20.0
        status = None
        while time.monotonic() < deadline:
            if not proxy.alive():
                break
            try:
                status, _, _ = http_request(port, "GET", "/health", timeout=1.0)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        if not proxy.alive() or status != 200:
            tail = proxy.log_tail()
            proxy.stop()
            raise BenchError(f"the proxy did not become healthy ({' '.join(argv)}):\n{tail}")
        self.proxy, self.proxy_port = proxy, port
        time.sleep(0.5)  # let start-up settle before reading the idle RSS
        return proc_status(proxy.pid)

    def stop_proxy(self):
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    def url(self, path_kind):
        port = self.upstream_port if path_kind == "direct" else self.proxy_port
        return f"http://127.0.0.1:{port}/v1/messages"

    def port(self, path_kind):
        return self.upstream_port if path_kind == "direct" else self.proxy_port

    # profiling (optional) ------------------------------------------------------------------
    def start_profile(self, label, seconds):
        if not self.args.profile:
            return None
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            sys.stderr.write("--profile: py-spy is not installed (pip install py-spy); skipping\n")
            return None
        out = os.path.join(self.results_dir, f"profile-{label}.txt")
        argv = pinned(self.args.load_cpu, [spy, "record", "--pid", str(self.proxy.pid), "--rate", "200",
                                           "--duration", str(max(1, int(seconds))), "--nonblocking",
                                           "--format", "raw", "--output", out])
        return Process("py-spy", argv, os.path.join(self.tmp, f"py-spy-{label}.log")), out, label

    def start_syscalls(self, label, seconds):
        """With ``--syscalls``: count the daemon's receives, sends and epoll waits for ``seconds``
        with ``perf stat`` (on the load's core); :meth:`finish_syscalls` reads the counts."""
        if not self.args.syscalls:
            return None
        if self.args.workers:
            # perf -p follows one process: the supervisor, not the workers that serve
            sys.stderr.write("--syscalls: not with --workers (it would count the supervisor only); skipping\n")
            return None
        perf = shutil.which("perf")
        if perf is None:
            sys.stderr.write("--syscalls: perf is not installed (Debian: linux-perf); skipping\n")
            return None
        log = os.path.join(self.tmp, f"perf-{label}.log")
        argv = pinned(self.args.load_cpu, [perf, "stat", "-x,", "-e", ",".join(SYSCALL_EVENTS),
                                           "-p", str(self.proxy.pid), "--", "sleep", f"{max(1.0, seconds):g}"])
        return Process("perf", argv, log), log, label, max(1.0, seconds)

    def finish_syscalls(self, handle, units, unit):
        """The counts of :meth:`start_syscalls` (None without ``--syscalls``), a second and per
        ``unit`` (``units`` of them in the run: requests, or streams completed)."""
        if handle is None:
            return None
        proc, log, label, seconds = handle
        try:
            proc.proc.wait(seconds + 30.0)
        except subprocess.TimeoutExpired:
            pass
        proc.stop()
        with open(log, errors="replace") as f:
            counts = parse_perf_stat(f.read())
        if not counts:
            sys.stderr.write(f"--syscalls: perf counted nothing for {label} (see {log})\n")
            return None
        found = {"label": label, "seconds": seconds, "unit": unit, "counts": counts,
                 "per_second": {k: round(v / seconds, 1) for k, v in counts.items() if v is not None},
                 "per_unit": {k: round(v / units, 2) for k, v in counts.items() if v is not None and units}}
        self.syscalls[label] = found
        return found

    def finish_profile(self, handle):
        if handle is None:
            return
        proc, out, label = handle
        try:
            proc.proc.wait(30.0)
        except subprocess.TimeoutExpired:
            pass
        proc.stop()
        if os.path.exists(out):
            self.profiles[label] = summarize_profile(out)

    # non-stream --------------------------------------------------------------------------
    def sanity_nonstream(self):
        body = open(self.files["body"], "rb").read()
        headers = dict(line.split(": ", 1) for line in payload.header_lines(False))
        for kind in ("direct", "proxy"):
            status, _, data = http_request(self.port(kind), "POST", "/v1/messages", body, headers)
            if status != 200 or json.loads(data).get("content") != fake_upstream.MESSAGE["content"]:
                raise BenchError(f"{kind}: POST /v1/messages answered {status}: {data[:300]!r}")

    def wrk(self, kind, concurrency, seconds, record=True):
        env = dict(os.environ, CLPROXY_BENCH_BODY=self.files["body"],
                   CLPROXY_BENCH_HEADERS=self.files["headers"])
        threads = 1
        argv = pinned(self.args.load_cpu, [self.args.wrk, f"-t{threads}", f"-c{concurrency}",
                                           f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
                                           "-s", LUA, self.url(kind)])
        meter = Meter({"proxy": self.proxy.pid if self.proxy else None,
                       "upstream": self.upstream.pid}) if record else None
        label = f"nonstream-c{concurrency}"
        prof = self.start_profile(label, seconds) if record and kind == "proxy" else None
        calls = self.start_syscalls(label, seconds) if record and kind == "proxy" else None
        try:
            done = run_boosted(argv, timeout=seconds + 60, env=env)
        finally:
            usage = meter.finish() if meter else None
            self.finish_profile(prof)
        out = done.stdout.decode("utf-8", "replace")
        line = next((l for l in out.splitlines() if l.startswith("WRK_JSON ")), None)
        if done.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({done.returncode}): {out[-800:]}"
                             f"{done.stderr.decode('utf-8', 'replace')[-800:]}")
        raw = json.loads(line[len("WRK_JSON "):])
        # perf counted for as long as wrk ran, from the same moment: per request is their ratio
        self.finish_syscalls(calls, raw["requests"], "request")
        if not record:
            return None
        lat = raw["latency_us"]
        pct = lat["percentiles"]
        errors = sum(raw["errors"].values())
        return {
            "requests": raw["requests"],
            "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": pct["50"] / 1000.0, "p90_ms": pct["90"] / 1000.0,
            "p99_ms": pct["99"] / 1000.0, "p99.9_ms": pct["99.9"] / 1000.0,
            "mean_ms": round(lat["mean"] / 1000.0, 3), "max_ms": lat["max"] / 1000.0,
            "errors": raw["errors"], "error_count": errors,
            "cpu": usage,
        }

    # workers: 1 against N on the same machine, unpinned ---------------------------------
    def proxy_tree(self):
        """The daemon's pids: the supervisor and its worker processes (just the daemon with one)."""
        pids = {"proxy": self.proxy.pid}
        try:
            with open(f"/proc/{self.proxy.pid}/task/{self.proxy.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            children = []
        for i, pid in enumerate(children, 1):
            pids[f"worker{i}"] = pid
        return pids

    def run_workers(self):
        """Non-stream at ``--workers-concurrency`` through 1 worker, then N, both on the Redis state
        store (needed by N; used by 1 too, so the two differ only in the process count)."""
        a = self.args
        redis_port = free_port()
        redis = Process("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                  "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                        os.path.join(self.tmp, "redis.log"))
        config = os.path.join(self.tmp, "config-redis.json")
        with open(self.config_path) as f:
            document = json.load(f)
        document["state"] = {"backend": "redis", "url": f"redis://127.0.0.1:{redis_port}/0"}
        with open(config, "w") as f:
            json.dump(document, f)
        c = a.workers_concurrency
        section = {"concurrency": c, "runs": [], "streams": []}
        try:
            for count in (1, a.workers):
                self.start_proxy(["--workers", str(count)], config=config)
                try:
                    self.sanity_nonstream()
                    progress(f"workers={count} c={c}: warm-up {a.warmup:g}s, run {a.duration:g}s")
                    self.wrk("proxy", c, a.warmup, record=False)
                    tree = self.proxy_tree()
                    meter = Meter(dict(tree, upstream=self.upstream.pid, redis=redis.pid))
                    row = self.wrk("proxy", c, a.duration)
                    cpu = meter.finish()
                    daemon = sum(cpu.get(f"{name}_cpu_pct") or 0.0 for name in tree)
                    row["workers"] = count
                    row["cpu"] = cpu
                    row["daemon_cpu_pct"] = round(daemon, 1)
                    row["load_cpu_pct"] = round((cpu.get("upstream_cpu_pct") or 0.0)
                                                + (cpu.get("generator_cpu_pct") or 0.0), 1)
                    row["redis_cpu_pct"] = cpu.get("redis_cpu_pct")
                    row["cores_busy_pct"] = cores_busy(cpu)
                    # the daemon's CPU per request: flat from 1 worker to N when nothing on the
                    # hot path grows with the worker count (the ratio is then the cores' limit)
                    row["daemon_cpu_ms_per_request"] = (round(10.0 * daemon / row["rps"], 3)
                                                        if row["rps"] else None)
                    section["runs"].append(row)
                    if a.workers_streams:
                        section["streams"].append(self._workers_streams(count, redis.pid))
                finally:
                    self.stop_proxy()
        finally:
            redis.stop()
        one, many = section["runs"][0], section["runs"][-1]
        section["ratio"] = round(many["rps"] / one["rps"], 3) if one["rps"] else None
        section["cpu_per_request_ratio"] = ratio_of(many, one, "daemon_cpu_ms_per_request")
        if section["streams"]:
            first, last = section["streams"][0], section["streams"][-1]
            section["streams_ratio"] = (round(last["streams_per_s"] / first["streams_per_s"], 3)
                                        if first["streams_per_s"] else None)
            section["cpu_per_stream_ratio"] = ratio_of(last, first, "daemon_cpu_ms_per_stream")
        return section

    def _workers_streams(self, count, redis_pid):
        """``--workers-streams`` paced streams through the daemon now running ``count`` workers:
        streams/s, TTFB and per-event delay, and each side's CPU share."""
        a = self.args
        progress(f"workers={count}: {a.workers_streams} paced streams for {a.stream_duration:g}s")
        tree = self.proxy_tree()
        meter = Meter(dict(tree, upstream=self.upstream.pid, redis=redis_pid))
        result = self.stream_client("proxy", a.workers_streams)
        cpu = meter.finish()
        daemon = sum(cpu.get(f"{name}_cpu_pct") or 0.0 for name in tree)
        seconds = daemon / 100.0 * cpu["elapsed_s"]  # the daemon's CPU over the whole run, drain included
        return {"workers": count, "streams": a.workers_streams, "completed": result["completed"],
                "started": result["started"], "streams_per_s": result["streams_per_s"],
                "failures": result.get("failures"), "status": result.get("status"),
                "client_cpu_pct": result.get("client_cpu_pct"),
                "steady_cpu_pct": (result.get("cpu") or {}).get("steady_cpu_pct"),
                "ttfb_p50_ms": result["ttfb_ms"].get("p50"),
                "event_delay_p99_ms": result["event_delay_ms"].get("p99"),
                "daemon_cpu_pct": round(daemon, 1),
                "daemon_cpu_ms_per_stream": (round(1000.0 * seconds / result["completed"], 3)
                                             if result["completed"] else None),
                "cores_busy_pct": cores_busy(cpu),
                "load_cpu_pct": round((cpu.get("upstream_cpu_pct") or 0.0) + (cpu.get("generator_cpu_pct") or 0.0), 1),
                "redis_cpu_pct": cpu.get("redis_cpu_pct")}

    def run_nonstream(self):
        a = self.args
        idle = self.start_proxy()
        section = {"idle_rss_kib": idle.get("VmRSS"), "runs": []}
        try:
            self.sanity_nonstream()
            for c in a.concurrency:
                row = {"concurrency": c}
                for kind in ("direct", "proxy"):
                    progress(f"non-stream c={c} {kind}: warm-up {a.warmup:g}s, run {a.duration:g}s")
                    self.wrk(kind, c, a.warmup, record=False)
                    row[kind] = self.wrk(kind, c, a.duration)
                row["ratio"] = round(row["proxy"]["rps"] / row["direct"]["rps"], 4) if row["direct"]["rps"] else None
                row["added_p50_ms"] = round(row["proxy"]["p50_ms"] - row["direct"]["p50_ms"], 3)
                row["added_p99_ms"] = round(row["proxy"]["p99_ms"] - row["direct"]["p99_ms"], 3)
                section["runs"].append(row)
            section["peak_rss_kib"] = proc_status(self.proxy.pid).get("VmHWM")
        finally:
            self.stop_proxy()
        return section

    # streams -----------------------------------------------------------------------------
    def stream_client(self, kind, streams):
        a = self.args
        if self.binaries:
            # the C client sends these bytes as they are: the same request stream_client.py builds
            request = os.path.join(self.tmp, f"stream-request-{kind}.http")
            with open(request, "wb") as f:
                f.write(payload.request_bytes(f"127.0.0.1:{self.port(kind)}", "/v1/messages",
                                              payload.build_body(stream=True), stream=True))
            program = [self.binaries["sse_client"], "--request-file", request]
        else:
            program = [sys.executable, os.path.join(HERE, "stream_client.py")]
        argv = pinned(a.load_cpu, program + [
                                   "--url", self.url(kind), "--concurrency", str(streams),
                                   "--duration", str(a.stream_duration), "--ramp", str(a.ramp),
                                   "--warmup", str(a.stream_warmup), "--deltas", str(a.deltas),
                                   "--drain-timeout", "20", "--stream-timeout", "30", "--json"]
                       + (["--once"] if a.stream_mode == "wave" else []))
        meter = Meter({"proxy": self.proxy.pid, "upstream": self.upstream.pid})
        sampler = RssSampler(self.proxy.pid if kind == "proxy" else self.upstream.pid,
                             limit=a.stream_duration + 120)
        sampler.start()
        prof = self.start_profile(f"stream-{streams}", a.stream_duration + a.ramp) if kind == "proxy" else None
        calls = self.start_syscalls(f"stream-{streams}", a.stream_duration + a.ramp) if kind == "proxy" else None
        try:
            done = run_boosted(argv, timeout=a.stream_duration + 120)
        finally:
            usage = meter.finish()
            sampler.stop()
            self.finish_profile(prof)
        out = done.stdout.decode("utf-8", "replace").strip().splitlines()
        if done.returncode != 0 or not out:
            raise BenchError(f"stream_client failed ({done.returncode}): "
                             f"{done.stderr.decode('utf-8', 'replace')[-1500:]}")
        result = json.loads(out[-1])
        # the streams started while perf counted (a stream's ~1 s runs a little past the window)
        self.finish_syscalls(calls, result["completed"], "stream")
        result["cpu"] = usage
        # CPU of the proxy (or, on the direct path, of the fake upstream) while the streams ran,
        # after the ramp: the meter's figure also covers start-up, warm-up and drain
        steady_from = result["window_start"] + (result["ramp_s"] if a.stream_mode == "sustained" else 0)
        usage["steady_cpu_pct"] = sampler.cpu_pct_between(steady_from, result["window_stop"])
        usage["steady_cpu_of"] = kind == "proxy" and "proxy" or "upstream"
        if kind == "proxy":
            status = proc_status(self.proxy.pid)
            result["rss"] = {"max_sampled_rss_kib": sampler.max_rss_kib, "samples": sampler.samples,
                             "hwm_kib": status.get("VmHWM"), "rss_after_kib": status.get("VmRSS")}
        return result

    def run_streams(self):
        a = self.args
        section = {"levels": []}
        for n in a.streams:
            idle = self.start_proxy()  # a fresh daemon per level: its VmHWM is this level's peak
            try:
                row = {"streams": n, "idle_rss_kib": idle.get("VmRSS")}
                for kind in ("direct", "proxy"):
                    progress(f"streams n={n} {kind}: {a.stream_duration:g}s of paced SSE")
                    row[kind] = self.stream_client(kind, n)
                added = {}
                for metric in ("event_delay_ms", "ttfb_ms"):
                    d, p = row["direct"][metric], row["proxy"][metric]
                    added[metric] = {q: round(p[q] - d[q], 3) for q in ("p50", "p90", "p99", "p99.9")
                                     if q in p and q in d}
                row["added"] = added
                section["levels"].append(row)
            finally:
                self.stop_proxy()
        return section


def build_c_load(directory):
    """Compile the C fake upstream and stream client (``load/*.c``) into ``directory``; returns
    their paths by name. They do what upstream.py and stream_client.py do, on the wire and in the
    figures, with about half the CPU (``--load c``)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not compiler:
        raise SystemExit("--load c needs a C compiler (Debian package gcc)")
    binaries = {}
    for name in ("sse_upstream", "sse_client"):
        out = os.path.join(directory, name)
        done = subprocess.run([compiler, "-O2", "-o", out, os.path.join(HERE, "load", name + ".c"), "-lm"],
                              capture_output=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"--load c: compiling load/{name}.c failed:\n"
                             f"{done.stderr.decode('utf-8', 'replace')[-2000:]}")
        binaries[name] = out
    return binaries


def http_request(port, method, path, body=None, headers=None, timeout=10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


IDLE_LEAVES = ("EPollReactor.doPoll (", "Condition.wait (", "Thread.wait (", "select (", "poll (")


#: the daemon's system calls ``--syscalls`` counts: a relayed event is a receive and a send
SYSCALL_EVENTS = ("syscalls:sys_enter_recvfrom", "syscalls:sys_enter_sendto", "syscalls:sys_enter_epoll_wait")


def parse_perf_stat(text):
    """``{"recvfrom": n, "sendto": n, "epoll_wait": n}`` from ``perf stat -x,`` output (None for an
    event perf could not count: "<not counted>", "<not supported>")."""
    counts = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[2].startswith("syscalls:sys_enter_"):
            continue
        counts[fields[2][len("syscalls:sys_enter_"):]] = int(fields[0]) if fields[0].isdigit() else None
    return counts


def syscall_lines(syscalls):
    """The report's lines for ``--syscalls``: per run, each call a second and per request or stream."""
    if not syscalls:
        return []
    names = tuple(event.rpartition("sys_enter_")[2] for event in SYSCALL_EVENTS)
    rows = [[s["label"], f"{s['seconds']:g}"] + [fmt(s["per_second"].get(n), 0) for n in names]
            + [fmt(s["per_unit"].get(n), 2) for n in names] + [s["unit"]] for s in syscalls.values()]
    return ["", "System calls of the daemon (perf stat, during each proxy run)",
            table(rows, ["run", "seconds", "recv/s", "send/s", "epoll_wait/s", "recv/unit", "send/unit",
                         "epoll_wait/unit", "unit"])]


def summarize_profile(path, top=15):
    """Self and inclusive shares per function from py-spy's collapsed stacks (``--format raw``).

    Shares are of the busy samples: a stack whose innermost frame is the reactor waiting in
    epoll (or an idle thread) is counted as idle, not as work.
    """
    self_c, incl_c, total, idle = Counter(), Counter(), 0, 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            total += n
            # a frame reads "function (path/file.py:LINE)": keep function and file, drop the line
            frames = [LINE_RE.sub(")", frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            if frames[-1].startswith(IDLE_LEAVES):
                idle += n
                total -= n
                continue
            self_c[frames[-1]] += n
            for frame in set(frames):
                incl_c[frame] += n
    if not total:
        return {"samples": 0}

    def share(counter):
        return [(name, round(100.0 * v / total, 1)) for name, v in counter.most_common(top)]

    return {"samples": total, "idle_samples": idle, "file": path, "self": share(self_c),
            "inclusive": share(incl_c)}


def progress(message):
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


# -- report ------------------------------------------------------------------------------------

def evaluate(results):
    targets = []

    def add(name, label, value, limit, higher_is_better=False, note=""):
        if value is None:
            ok = None
        else:
            ok = value >= limit if higher_is_better else value <= limit
        targets.append({"name": name, "label": label, "value": value, "target": limit,
                        "pass": ok, "note": note, "higher_is_better": higher_is_better})

    ns = results.get("nonstream")
    if ns:
        runs = {r["concurrency"]: r for r in ns["runs"]}
        if 1 in runs:
            add("added_p50_c1_ms", "added p50 latency at concurrency 1 (ms)", runs[1]["added_p50_ms"],
                TARGETS["added_p50_c1_ms"])
        if 32 in runs:
            add("proxy_rps_c32", "req/s through the proxy at concurrency 32", runs[32]["proxy"]["rps"],
                TARGETS["proxy_rps_c32"], higher_is_better=True)
    st = results.get("stream")
    if st:
        levels = {l["streams"]: l for l in st["levels"]}
        if 100 in levels:
            add("stream100_added_delay_p99_ms", "100 streams: added per-event delay p99 (ms)",
                levels[100]["added"]["event_delay_ms"].get("p99"), TARGETS["stream100_added_delay_p99_ms"])
        if 1000 in levels:
            l = levels[1000]["proxy"]
            add("stream1000_all_complete", "1,000 streams: every stream complete (complete/started)",
                f"{l['completed']}/{l['started']}", "all", note="")
            targets[-1]["pass"] = l["started"] > 0 and l["completed"] == l["started"]
            add("stream1000_added_ttfb_p50_ms", "1,000 streams: added TTFB p50 (ms)",
                levels[1000]["added"]["ttfb_ms"].get("p50"), TARGETS["stream1000_added_ttfb_p50_ms"])
            add("stream1000_added_delay_p99_ms", "1,000 streams: added per-event delay p99 (ms)",
                levels[1000]["added"]["event_delay_ms"].get("p99"), TARGETS["stream1000_added_delay_p99_ms"])
            hwm = l["rss"]["hwm_kib"]
            add("stream1000_peak_rss_mib", "1,000 streams: peak RSS of the daemon (MiB, VmHWM)",
                round(hwm / 1024, 1) if hwm else None, TARGETS["stream1000_peak_rss_mib"])
    idle = [v for v in [(ns or {}).get("idle_rss_kib")] +
            [l.get("idle_rss_kib") for l in (st or {}).get("levels", [])] if v]
    if idle:
        add("idle_rss_mib", "idle RSS of the daemon after start (MiB, max over starts)",
            round(max(idle) / 1024, 1), TARGETS["idle_rss_mib"])
    return targets


def over_rounds(per_round):
    """Each target judged on its median over the rounds (the issue's protocol: three rounds,
    medians); "every stream complete" must hold in every round. ``per_round``: each round's
    :func:`evaluate` list. Each entry also keeps the rounds' values and how many met the target."""
    combined = []
    for first in per_round[0]:
        runs = [t for targets in per_round for t in targets if t["name"] == first["name"]]
        values = [t["value"] for t in runs]
        entry = dict(first, values=values, rounds=len(runs), rounds_met=sum(1 for t in runs if t["pass"]))
        if first["target"] == "all":
            entry["value"] = ", ".join(str(v) for v in values)
            entry["pass"] = all(t["pass"] for t in runs)
        else:
            numbers = [v for v in values if isinstance(v, (int, float))]
            median = statistics.median(numbers) if numbers else None
            entry["value"] = median
            entry["pass"] = None if median is None else (
                median >= first["target"] if first["higher_is_better"] else median <= first["target"])
        combined.append(entry)
    return combined


def fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows, header):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def section_lines(results, meta):
    """The tables of one round: the non-stream runs and the stream levels."""
    out = []
    ns = results.get("nonstream")
    if ns:
        out.append("")
        out.append(f"Non-stream POST /v1/messages (wrk -t1, {meta['duration_s']:g} s per run after "
                   f"{meta['warmup_s']:g} s warm-up)")
        rows = []
        for r in ns["runs"]:
            for kind in ("direct", "proxy"):
                d = r[kind]
                cpu = d["cpu"] or {}
                rows.append([r["concurrency"], kind, fmt(d["rps"], 0), fmt(d["p50_ms"], 3), fmt(d["p99_ms"], 3),
                             d["error_count"], fmt(cpu.get("proxy_cpu_pct"), 0),
                             fmt(round((cpu.get("upstream_cpu_pct") or 0) + (cpu.get("generator_cpu_pct") or 0), 1), 0),
                             fmt(cpu.get("proxy_runq_wait_pct"), 1) if kind == "proxy" else "",
                             fmt(cpu.get(f"core{meta['load_cpu']}_busy_pct"), 0)])
            rows.append([r["concurrency"], "proxy/direct", f"{r['ratio']:.3f}x", f"+{r['added_p50_ms']:.3f}",
                         f"+{r['added_p99_ms']:.3f}", "", "", "", "", ""])
        out.append(table(rows, ["conc", "path", "req/s", "p50 ms", "p99 ms", "errors", "proxy cpu%",
                                "load cpu%", "proxy wait%", "load core busy%"]))
    st = results.get("stream")
    if st:
        out.append("")
        mode = meta.get("stream_mode", "sustained")
        how = (f"N workers send streams back to back for {meta['stream_duration_s']:g} s (closed loop, "
               f"first starts spread over {meta['ramp_s']:g} s)" if mode == "sustained" else
               f"one wave of N streams started within {meta['ramp_s']:g} s")
        out.append(f"Paced SSE: {meta['deltas']} text deltas {meta['interval_ms']:g} ms apart; {how}. "
                   "Times in ms; cpu% of one core while the streams ran")
        rows = []
        for l in st["levels"]:
            for kind in ("direct", "proxy"):
                d = l[kind]
                cpu = d["cpu"]
                rss = d.get("rss") or {}
                steady = cpu.get("steady_cpu_pct")
                rows.append([l["streams"], kind, f"{d['completed']}/{d['started']}",
                             fmt(d.get("streams_per_s"), 0),
                             fmt(d["ttfb_ms"].get("p50"), 2), fmt(d["ttfb_ms"].get("p99"), 2),
                             fmt(d["event_delay_ms"].get("p50"), 2), fmt(d["event_delay_ms"].get("p99"), 2),
                             fmt(d["event_delay_ms"].get("max"), 1),
                             fmt(round(rss["hwm_kib"] / 1024, 1), 1) if rss.get("hwm_kib") else "",
                             fmt(steady, 0) if kind == "proxy" else "",
                             fmt(cpu.get("proxy_runq_wait_pct"), 1) if kind == "proxy" else "",
                             fmt(steady, 0) if kind == "direct" else "",
                             fmt(round((cpu.get("upstream_cpu_pct") or 0) + (cpu.get("generator_cpu_pct") or 0), 1), 0)])
            ad = l["added"]
            rows.append([l["streams"], "added", "", "", f"+{ad['ttfb_ms']['p50']:.2f}", f"+{ad['ttfb_ms']['p99']:.2f}",
                         f"+{ad['event_delay_ms']['p50']:.2f}", f"+{ad['event_delay_ms']['p99']:.2f}", "",
                         f"idle {l['idle_rss_kib'] / 1024:.1f}" if l.get("idle_rss_kib") else "", "", "", "", ""])
        out.append(table(rows, ["streams", "path", "complete", "streams/s", "ttfb p50", "ttfb p99", "delay p50",
                                "delay p99", "delay max", "RSS MiB", "proxy cpu%", "proxy wait%", "upstream cpu%",
                                "load cpu% (avg)"]))
        fails = [(l["streams"], k, l[k]["failures"]) for l in st["levels"] for k in ("direct", "proxy")
                 if l[k]["failures"]]
        for n, k, f in fails:
            out.append(f"  failures at {n} streams ({k}): {f}")
    return out


def report(results):
    out = []
    meta = results["meta"]
    out.append(f"clproxy load benchmark  {meta['started']}  ({'quick' if meta['quick'] else 'full'} run)")
    out.append(f"proxy on core {meta['proxy_cpu']}, load generator + fake upstream on core {meta['load_cpu']}; "
               f"body {meta['body_bytes']:,} bytes; loadavg before {meta['loadavg_before']}")
    out.append(f"proxy: {meta['proxy_cmd']}  (niceness {meta.get('niceness')})")
    out.append(f"load: {'upstream.py and stream_client.py' if meta.get('load', 'python') == 'python' else 'load/sse_upstream.c and load/sse_client.c'}")
    workers = results.get("workers")
    if workers:
        out.append("")
        out.append(f"Workers, non-stream POST /v1/messages at c={workers['concurrency']}, unpinned "
                   f"(wrk -t1, {meta['duration_s']:g} s after {meta['warmup_s']:g} s warm-up; CPU % of one core)")
        out.append(table([[str(r["workers"]), fmt(r["rps"], 0), fmt(r["p50_ms"]), fmt(r["p99_ms"]),
                           str(r["error_count"]), fmt(r["daemon_cpu_pct"], 0),
                           fmt(r.get("daemon_cpu_ms_per_request"), 3), fmt(r["load_cpu_pct"], 0),
                           fmt(r["redis_cpu_pct"], 0), fmt(r.get("cores_busy_pct"), 0)] for r in workers["runs"]],
                         ["workers", "req/s", "p50 ms", "p99 ms", "errors", "daemon cpu%", "cpu ms/req",
                          "wrk+upstream cpu%", "redis cpu%", "cores busy%"]))
        out.append(f"ratio {workers['runs'][-1]['workers']} workers / 1: {fmt(workers['ratio'], 2)}x; "
                   f"daemon CPU per request {fmt(workers.get('cpu_per_request_ratio'), 2)}x")
        if workers.get("streams"):
            out.append("")
            out.append(f"Workers, {workers['streams'][0]['streams']:,} paced streams, unpinned (CPU % of one core)")
            out.append(table([[str(r["workers"]), f"{r['completed']}/{r['started']}", fmt(r["streams_per_s"], 0),
                               fmt(r["ttfb_p50_ms"]), fmt(r["event_delay_p99_ms"]), fmt(r["daemon_cpu_pct"], 0),
                               fmt(r.get("daemon_cpu_ms_per_stream"), 3), fmt(r["load_cpu_pct"], 0),
                               fmt(r["redis_cpu_pct"], 0), fmt(r.get("cores_busy_pct"), 0)]
                              for r in workers["streams"]],
                             ["workers", "complete", "streams/s", "ttfb p50 ms", "delay p99 ms", "daemon cpu%",
                              "cpu ms/stream", "client+upstream cpu%", "redis cpu%", "cores busy%"]))
            out.append(f"ratio {workers['streams'][-1]['workers']} workers / 1 (streams/s): "
                       f"{fmt(workers.get('streams_ratio'), 2)}x; daemon CPU per stream "
                       f"{fmt(workers.get('cpu_per_stream_ratio'), 2)}x")
    rounds = results.get("rounds") or []
    if len(rounds) > 1:
        for number, one in enumerate(rounds, 1):
            out.append("")
            out.append(f"=== Round {number} of {len(rounds)}")
            out.extend(section_lines(one, meta))
    else:
        out.extend(section_lines(results, meta))
    ns = results.get("nonstream")
    if results["targets"]:
        out.append("")
        out.append("Targets" if len(rounds) < 2 else
                   f"Targets over {len(rounds)} rounds: each judged on its median (every stream complete: in every round)")

    def wanted(t):
        return "all" if t["target"] == "all" else (">= " if t["higher_is_better"] else "<= ") + fmt(t["target"])

    verdict = {True: "PASS", False: "MISS", None: "n/a"}
    if len(rounds) < 2:
        rows = [[t["label"], fmt(t["value"], 3 if isinstance(t["value"], float) else 0), wanted(t),
                 verdict[t["pass"]]] for t in results["targets"]]
        if rows:
            out.append(table(rows, ["target", "value", "wanted", "result"]))
    else:
        rows = []
        for t in results["targets"]:
            numbers = [v for v in t["values"] if isinstance(v, (int, float))]
            spread = f"{fmt(min(numbers), 3)}-{fmt(max(numbers), 3)}" if numbers else ""
            rows.append([t["label"], fmt(t["value"], 3 if isinstance(t["value"], float) else 0), spread, wanted(t),
                         f"{t['rounds_met']}/{t['rounds']}", verdict[t["pass"]]])
        out.append(table(rows, ["target", "median", "range", "wanted", "rounds met", "result"]))
    for number, one in enumerate(rounds or [results], 1):
        runs = (one.get("nonstream") or {}).get("runs", [])
        if runs:
            out.append(("req/s ratio proxy/direct" + (f", round {number}" if len(rounds) > 1 else "") + ": ")
                       + ", ".join(f"c={r['concurrency']}: {r['ratio']:.3f}" for r in runs))
    noise = results.get("noise")
    if noise:
        out.append(noise)
    out.extend(syscall_lines(results.get("syscalls")))
    for label, prof in results.get("profiles", {}).items():
        if prof.get("samples"):
            out.append("")
            out.append(f"Profile of the proxy, {label} ({prof['samples']} busy samples, {prof.get('idle_samples', 0)} "
                       f"idle, {prof['file']}); self time, % of busy:")
            for name, share in prof["self"][:12]:
                out.append(f"  {share:5.1f}%  {name}")
    out.append("")
    out.append(f"JSON: {results['meta']['output']}")
    return "\n".join(out)


def noise_note(results, meta):
    """Flag runs where the pinned proxy had to wait for its core because of other processes.

    The proxy is alone on its core among the benchmark's processes, so the time its main thread
    spent runnable but not running (``/proc/PID/schedstat``) was taken either by the daemon's own
    other threads (the JSONL writer, pinned with it: part of its cost) or by something else. At
    most the other threads' CPU time of that wait is theirs; only the rest, when above 5%, makes
    the figures pessimistic. CPU the proxy leaves idle may be used by other processes without harm;
    that is reported in the JSON only.
    """
    outside = (0.0, 0.0, "")  # (wait not explained by the daemon's own threads, whole wait, where)
    runs = [(r["proxy"]["cpu"] or {}, f"non-stream c={r['concurrency']}")
            for r in (results.get("nonstream") or {}).get("runs", [])]
    runs += [(l["proxy"]["cpu"] or {}, f"{l['streams']} streams")
             for l in (results.get("stream") or {}).get("levels", [])]
    longest = (0.0, 0.0, "")
    for cpu, where in runs:
        wait = cpu.get("proxy_runq_wait_pct") or 0.0
        own = cpu.get("proxy_other_threads_cpu_pct") or 0.0
        outside = max(outside, (round(max(0.0, wait - own), 1), wait, where))
        longest = max(longest, (wait, own, where))
    meta["proxy_max_runq_wait_pct"] = max(meta.get("proxy_max_runq_wait_pct") or {"value": 0.0, "during": ""},
                                          {"value": longest[0], "during": longest[2],
                                           "own_threads_cpu": longest[1]}, key=lambda w: w["value"])
    if outside[0] > 5.0:
        return (f"NOTE: the proxy waited for its core {outside[1]:.0f}% of the time during {outside[2]}, "
                f"{outside[0]:.0f}% more than its own other threads ran (other processes on this "
                "machine); its figures there are pessimistic.")
    if longest[0] > 5.0:
        return (f"NOTE: the proxy's main thread waited for its core {longest[0]:.0f}% of the time "
                f"during {longest[2]}, while the daemon's own other threads (the log writer) ran "
                f"{longest[1]:.0f}%: that is the daemon's cost, not other processes'.")
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description="clproxy load benchmark: direct vs through the proxy.")
    p.add_argument("--quick", action="store_true", help="short durations (a smoke run)")
    p.add_argument("--workers", type=int,
                   help="instead of the usual sections: non-stream through 1 worker, then this many "
                        "(--workers N, Redis state), unpinned, with each side's CPU share")
    p.add_argument("--workers-concurrency", type=int, default=32,
                   help="wrk connections for --workers (default 32)")
    p.add_argument("--workers-streams", type=int, default=0,
                   help="with --workers: also this many concurrent paced streams through 1 and N workers")
    p.add_argument("--only", choices=("nonstream", "stream"), help="run one section only")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the sections this many times (direct and proxy in each) and judge every target on "
                        "its median over the rounds, with each round's tables and the spread (the issue's "
                        "protocol: --rounds 3)")
    p.add_argument("--proxy-cmd", help="command template starting the daemon; {python}, {port} and {config} "
                                       f"are filled in (default: {DEFAULT_PROXY_CMD!r})")
    p.add_argument("--concurrency", default="1,32,256", help="non-stream concurrency levels")
    p.add_argument("--streams", default="100,1000", help="concurrent stream levels")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 8, quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of wrk warm-up per run (default 2, quick 1); wrk takes whole seconds")
    p.add_argument("--stream-duration", type=float, help="seconds during which streams start (default 8, quick 2)")
    p.add_argument("--stream-mode", choices=("sustained", "wave"), default="sustained",
                   help="sustained: each of the N workers sends streams back to back for --stream-duration "
                        "(about N open at any time); wave: N streams, one per worker, started within --ramp")
    p.add_argument("--ramp", type=float,
                   help="spread of the stream workers' first starts in s (default 1.0 sustained, 0.5 wave)")
    p.add_argument("--stream-warmup", type=int, default=10, help="unrecorded warm-up streams per run")
    p.add_argument("--deltas", type=int, default=40)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument("--load", choices=("python", "c"), default="python",
                   help="the fake upstream and stream client: upstream.py and stream_client.py, or their "
                        "C versions in load/ (compiled with cc into the run's directory), which use a "
                        "fraction of the CPU: room for the daemon's workers on a small machine")
    p.add_argument("--profile", action="store_true",
                   help="record the proxy with py-spy during each proxy run (results/profile-*.txt)")
    p.add_argument("--syscalls", action="store_true",
                   help="count the daemon's receives, sends and epoll waits with perf stat during each proxy "
                        "run, a second and per request or stream (Debian package linux-perf; root)")
    p.add_argument("--nice", type=int, default=-10,
                   help="scheduling niceness for this script and every process it starts (inherited); "
                        "the default -10 shields the pinned processes from other processes on a shared "
                        "machine when permitted (root or CAP_SYS_NICE), else it stays 0; --nice 0 to opt out")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="where the JSON goes")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be 1 or more")
    if args.workers and args.rounds > 1:
        p.error("--rounds repeats the single-process sections; --workers runs once (alternate runs by hand)")
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.streams = [int(x) for x in args.streams.split(",") if x.strip()]
    args.duration = args.duration or (2.0 if args.quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.stream_duration = args.stream_duration or (2.0 if args.quick else 8.0)
    if args.ramp is None:
        args.ramp = 1.0 if args.stream_mode == "sustained" else 0.5
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.workers:
        # N workers need the cores: nothing is pinned, and each side's CPU share is reported instead
        args.proxy_cpu = args.load_cpu = None
    elif len(cpus) < 2 or args.proxy_cpu not in cpus or args.load_cpu not in cpus or args.proxy_cpu == args.load_cpu:
        sys.stderr.write(f"[bench] cannot pin to cores {args.proxy_cpu}/{args.load_cpu} (have {cpus}); "
                         "running unpinned\n")
        args.proxy_cpu = args.load_cpu = None
    if not os.path.exists(args.wrk) and args.only != "stream":
        p.error(f"wrk not found at {args.wrk}")
    if any(c < 1 for c in args.concurrency + args.streams):
        p.error("concurrency levels must be positive")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nofile = raise_nofile(2 * max(args.streams + [256]) + 512)
    global NICE
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if args.nice != niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # children inherit it
        except (PermissionError, OSError):
            sys.stderr.write(f"[bench] cannot set niceness {args.nice} (needs CAP_SYS_NICE); staying at {niceness}\n")
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
    NICE = niceness if niceness < 0 else 0
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})  # this script's own sampling stays off the proxy's core
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    atexit.register(stop_all)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    bench = Bench(args)
    results = {"meta": {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "only": args.only,
        "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu, "nofile": nofile, "niceness": niceness,
        "proxy_cmd": args.proxy_cmd or DEFAULT_PROXY_CMD, "duration_s": args.duration,
        "warmup_s": args.warmup, "stream_duration_s": args.stream_duration, "ramp_s": args.ramp,
        "stream_mode": args.stream_mode, "load": args.load,
        "deltas": args.deltas, "interval_ms": args.interval_ms,
        "body_bytes": len(open(bench.files["body"], "rb").read()),
        "loadavg_before": open("/proc/loadavg").read().split()[:3], "output": os.path.abspath(args.output),
    }}
    started = time.monotonic()
    try:
        results["meta"]["proxy_cmd"] = bench.proxy_template()
        bench.start_upstream()
        rounds = []
        for number in range(1 if args.workers else args.rounds):
            if args.rounds > 1:
                progress(f"round {number + 1} of {args.rounds}")
            one = {}
            if args.workers:
                results["workers"] = bench.run_workers()
            elif args.only in (None, "nonstream"):
                one["nonstream"] = bench.run_nonstream()
            if args.only in (None, "stream") and not args.workers:
                one["stream"] = bench.run_streams()
            rounds.append(one)
    except BenchError as e:
        sys.stderr.write(f"[bench] FAILED: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("[bench] interrupted; every process started was stopped\n")
        return 130
    except SystemExit as e:
        sys.stderr.write(f"[bench] stopped by a signal ({e.code}); every process started was stopped\n")
        raise
    finally:
        bench.cleanup()
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    results.update(rounds[-1])  # the last round's sections where a single run's are (one round: the run's)
    if len(rounds) > 1:
        for one in rounds:
            one["targets"] = evaluate(one)
            one["noise"] = noise_note(one, results["meta"])
        results["rounds"] = rounds
        results["targets"] = over_rounds([one["targets"] for one in rounds])
        results["noise"] = "\n".join(f"round {number}: {one['noise']}" for number, one in enumerate(rounds, 1)
                                      if one["noise"]) or None
    else:
        results["targets"] = evaluate(results)
        results["noise"] = noise_note(results, results["meta"])
    results["profiles"] = bench.profiles
    results["syscalls"] = bench.syscalls
    with open(args.output + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(args.output + ".tmp", args.output)
    print(report(results))
    missed = [t for t in results["targets"] if t["pass"] is False]
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
