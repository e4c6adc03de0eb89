"""A real ``redis-server`` for tests and benchmarks: free loopback port, no persistence, tmp dir.

Missing ``redis-server`` fails the tests loudly (they are part of the suite, never skipped).
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest

INSTALL_HINT = ("redis-server not found on PATH: the Redis state store tests need a real server. "
                "Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install "
                "redis) or set CLPROXY_REDIS_SERVER to its path.")


def find_redis_server() -> str:
    """The redis-server executable; raises RuntimeError with an install hint when there is none."""
    path = os.environ.get("CLPROXY_REDIS_SERVER") or shutil.which("redis-server")
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(INSTALL_HINT)
    return path


def free_port() -> int:
    """A TCP port nothing listens on at the moment (on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1; ``stop`` then ``start`` reuses the same port (and,
    without persistence, comes back empty)."""

    def __init__(self, directory, password=None, port=None):
        self.directory = str(directory)
        self.password = password
        self.port = port or free_port()
        self.executable = find_redis_server()
        self.process = None

    @property
    def url(self) -> str:
        auth = ":{}@".format(self.password) if self.password else ""
        return "redis://{}127.0.0.1:{}/0".format(auth, self.port)

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.directory,
                "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(os.path.join(self.directory, "redis-{}.log".format(self.port)), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.directory)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited with {} at start (port {})".format(
                    self.process.returncode, self.port))
            if self.ping():
                return
            time.sleep(0.02)
        self.stop(kill=True)
        raise RuntimeError("redis-server did not answer on port {} within {}s".format(
            self.port, timeout))

    def ping(self) -> bool:
        """True when the server answers PING (AUTH first when it has a password)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_command("PING"))
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGKILL (a crash) when ``kill``, else SIGTERM; waits for the exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _command(*words) -> bytes:
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def start_server(directory, password=None) -> RedisServer:
    """A started server; in tests, a missing redis-server fails the test with the install hint."""
    try:
        server = RedisServer(directory, password=password)
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    return server


def unique_prefix() -> str:
    """A key prefix no other test uses (tests share one server)."""
    return "clproxy-test-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server shared by the tests of a module (each test uses its own key prefix)."""
    server = start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A password-protected redis-server of one test's own, which it may kill and restart."""
    server = start_server(tmp_path, password="s3cret-" + uuid.uuid4().hex[:8])
    yield server
    server.stop(kill=True)
