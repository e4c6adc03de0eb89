"""The .deb as a user meets it: installed with apt into a clean Debian 12 (bookworm) chroot, started, purged.

Builds the package with scripts/build-deb.sh, makes a minimal bookworm root with mmdebstrap from
deb.debian.org (the tarball is cached in /var/cache/clproxy-tests/, one per day), installs the .deb
there with `apt-get install ./clproxy_*.deb` (so apt resolves every dependency from Debian alone,
with bookworm's Twisted, treq and Python), then runs the daemon inside the chroot in front of a fake
Anthropic API served by this test process on 127.0.0.1 (a chroot shares the host's network). Needs
root, mmdebstrap and network access to deb.debian.org: without them it fails, naming what is missing.
"""

import datetime
import os
import shlex
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from helpers import in_thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE = "/var/cache/clproxy-tests"
UNIT = "lib/systemd/system/clproxy.service"
KEY = "sk-ant-chroot-test-key"  # a made-up key the fake upstream accepts

pytestmark = pytest.mark.slow


def run(*args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its command line and the end of its output."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{shlex.join(args)} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    return result


def require_tools() -> None:
    """Fail (never skip) when this machine cannot build and enter a chroot, naming what is missing."""
    missing = [f"{tool} (apt-get install {package})" for tool, package in
               (("mmdebstrap", "mmdebstrap"), ("dpkg-deb", "dpkg"), ("chroot", "coreutils"),
                ("mount", "mount"), ("tar", "tar")) if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (chroot and mount need it: run the suite as root, e.g. in CI's container)")
    if missing:
        pytest.fail("cannot build the Debian chroot; missing: " + ", ".join(missing), pytrace=False)


def base_tarball() -> str:
    """A minimal bookworm root as a tarball, made by mmdebstrap at most once a day."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{SUITE}-minbase-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}.tar")
    if not os.path.exists(path):
        partial = path + ".partial"
        run("mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "--format=tar", SUITE, partial, MIRROR)
        os.replace(partial, path)  # a run cut short never leaves a half tarball under the real name
        for name in os.listdir(CACHE):  # yesterday's roots are stale now
            if name.startswith(f"{SUITE}-minbase-") and os.path.join(CACHE, name) != path:
                os.remove(os.path.join(CACHE, name))
    return path


class Chroot:
    """A root directory with /proc, /dev and apt's download cache mounted; ``close`` unmounts them."""

    def __init__(self, root: str):
        self.root = root
        self.mounts = []

    def mount(self, target: str, *args) -> None:
        path = os.path.join(self.root, target)
        os.makedirs(path, exist_ok=True)
        run("mount", *args, path, timeout=60)
        self.mounts.append(path)

    def __call__(self, *args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
        return run("chroot", self.root, *args, timeout=timeout, **kwargs)

    def close(self) -> None:
        for path in reversed(self.mounts):
            if subprocess.run(["umount", path], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", path], capture_output=True)  # busy: detach it anyway
        self.mounts.clear()


@pytest.fixture(scope="module")
def chroot(tmp_path_factory):
    """A clean bookworm chroot with ./clproxy_*.deb installed by apt-get, as a user installs it."""
    require_tools()
    out = tmp_path_factory.mktemp("deb")
    deb = run("sh", os.path.join(REPO, "scripts", "build-deb.sh"), str(out), timeout=300).stdout.split()[-1]
    tarball = base_tarball()
    root = str(tmp_path_factory.mktemp("chroot"))
    run("tar", "-xf", tarball, "-C", root, timeout=300)
    shutil.copy(deb, os.path.join(root, "tmp"))
    shutil.copy("/etc/resolv.conf", os.path.join(root, "etc", "resolv.conf"))
    box = Chroot(root)
    try:
        box.mount("proc", "-t", "proc", "proc")
        box.mount("dev", "--bind", "/dev")
        # apt's downloads survive between runs: re-runs fetch only what changed in the archive
        archives = os.path.join(CACHE, f"{SUITE}-apt-archives")
        os.makedirs(os.path.join(archives, "partial"), exist_ok=True)
        box.mount("var/cache/apt/archives", "--bind", archives)
        box("apt-get", "update", "-q")
        box("sh", "-c", "cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends ./{os.path.basename(deb)}")  # apt resolves the rest from Debian
        yield box
    finally:
        box.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes = None):
    """(status, body) of a GET, or of a Messages API POST when ``body`` is given."""
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "client"}
    request = urllib.request.Request(url, data=body, headers=headers if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def unit_exec_start(root: str) -> list:
    """The unit's ExecStart command line, split as systemd splits it."""
    with open(os.path.join(root, UNIT)) as f:
        line = next(line for line in f if line.startswith("ExecStart="))
    return shlex.split(line[len("ExecStart="):])


def unit_environment(root: str) -> dict:
    """The unit's Environment= settings, plus what systemd sets for User=clproxy."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/var/lib/clproxy",
           "USER": "clproxy", "LANG": "C.UTF-8"}
    with open(os.path.join(root, UNIT)) as f:
        for line in f:
            if line.startswith("Environment="):
                key, value = line.strip()[len("Environment="):].split("=", 1)
                env[key] = value
    return env


def with_port(argv: list, port: int) -> list:
    """``argv`` with its --port value replaced (the unit's port may be taken on the machine running the tests)."""
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    return argv


async def run_daemon(box: Chroot, argv: list, env: dict, port: int, log_path: str, userspec: str = None):
    """Start ``argv`` in the chroot, check /health, one proxied request and /dashboard, stop it with SIGTERM.

    Returns the daemon's output; fails if it does not answer, exits non-zero or prints a traceback.
    """
    chroot = ["chroot"] + ([f"--userspec={userspec}"] if userspec else []) + [box.root]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(chroot + ["env", "-i"] + [f"{k}={v}" for k, v in env.items()] + argv,
                                   stdout=log, stderr=subprocess.STDOUT)

    def output() -> str:
        with open(log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):  # 60 s: bookworm's Python starts Twisted slowly in a cold chroot
            status, body = await in_thread(http, base + "/health")
            if status == 200 or process.poll() is not None:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert status == 200, f"/health did not answer 200 (got {status}); daemon output:\n{output()}"
        request = (b'{"model": "claude-sonnet-4-5", "max_tokens": 32, '
                   b'"messages": [{"role": "user", "content": "hello from the chroot"}]}')
        status, body = await in_thread(http, base + "/v1/messages", request)
        assert status == 200 and b"Hello from the fake upstream." in body, (status, body, output())
        # the packaged daemon serves its dashboard page (package data the .deb must ship)
        status, body = await in_thread(http, base + "/dashboard")
        assert status == 200 and b"/dashboard/app.js" in body, (status, output())
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # what systemctl stop sends
        try:
            code = await in_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the daemon did not stop within 60 s of SIGTERM; output:\n{output()}", pytrace=False)
    text = output()
    assert code == 0, f"exit status {code}; output:\n{text}"
    assert "Traceback" not in text and "Unhandled" not in text, text
    return text


def write_config(box: Chroot, upstream: str) -> None:
    """Point the packaged config at the fake upstream, keeping the file's owner and mode (root:clproxy 0640)."""
    with open(os.path.join(box.root, "etc/clproxy/proxy-config.yaml"), "w") as f:
        f.write("version: 1\naccounts:\n  anthropic:\n"
                f"    - name: chroot\n      apiKey: {KEY}\n      baseUrl: {upstream}\n"
                "routing:\n  strategy: fill-first\n")


def test_installed_with_bookworms_own_packages(chroot):
    """apt resolved every dependency from Debian: the system user exists, orjson is absent (the
    standard json serves), and the Redis backend has its client (the vendored txredisapi)."""
    assert "clproxy:" in open(os.path.join(chroot.root, "etc/passwd")).read()
    out = chroot("python3", "-c",
                 "import sys, twisted, treq, clproxy.jsoncodec as c, clproxy.state.redis.link as r; "
                 "print(sys.version_info[:2], twisted.__version__, c.BACKEND, r.txredisapi.__name__)").stdout
    assert "(3, 11) 22.4.0 json clproxy._vendor.txredisapi" in out, out
    assert os.path.exists(os.path.join(chroot.root, UNIT))


@pytest_twisted.ensureDeferred
async def test_clproxy_proxy_start_in_the_chroot(chroot, fake, tmp_path):
    """`clproxy proxy start`, as root typing it: /health, one proxied /v1/messages, a clean stop."""
    write_config(chroot, fake.url)
    port = free_port()
    argv = ["clproxy", "proxy", "start", "--config", "/etc/clproxy/proxy-config.yaml", "--host", "127.0.0.1",
            "--port", str(port), "--claude-settings", "off", "--no-guard"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    await run_daemon(chroot, argv, env, port, str(tmp_path / "daemon.log"))
    assert [r.credential for r in fake.requests if r.path == b"/v1/messages"] == [KEY]


@pytest_twisted.ensureDeferred
async def test_the_units_exec_start_in_the_chroot(chroot, fake, tmp_path):
    """The unit's own ExecStart, as user clproxy with the unit's environment: serves, stops cleanly."""
    write_config(chroot, fake.url)
    port = free_port()
    argv = with_port(unit_exec_start(chroot.root), port)
    assert argv[:3] == ["/usr/bin/python3", "-m", "clproxy"]
    ids = chroot("getent", "passwd", "clproxy").stdout.split(":")
    await run_daemon(chroot, argv, unit_environment(chroot.root), port, str(tmp_path / "unit.log"),
                     userspec=f"{ids[2]}:{ids[3]}")
    assert len([r for r in fake.requests if r.path == b"/v1/messages"]) == 1


def test_purge_leaves_nothing_behind(chroot):
    """`apt-get purge clproxy`: no unit, no /etc/clproxy, no state, no system user or group, no file."""
    chroot("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "clproxy")
    root = chroot.root
    for path in (UNIT, "etc/clproxy", "var/lib/clproxy", "usr/bin/clproxy",
                 "usr/lib/python3/dist-packages/clproxy"):
        assert not os.path.lexists(os.path.join(root, path)), path
    assert "clproxy:" not in open(os.path.join(root, "etc/passwd")).read()
    assert "clproxy:" not in open(os.path.join(root, "etc/group")).read()
    # what apt downloaded and users' own files (root's ~/.clproxy from `clproxy proxy start` above)
    # are not the package's to remove
    kept = ("tmp", "var/cache/apt", "root", "home")
    prune = [arg for path in kept for arg in ("-path", os.path.join(root, path), "-prune", "-o")]
    left = run("find", root, "-xdev", *prune, "-name", "*clproxy*", "-print").stdout
    assert left.split() == [], left
