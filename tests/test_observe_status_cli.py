"""``clproxy proxy status`` (clproxy.cli.status) against a real twisted.web server serving /status."""

import io
import json
import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web import resource, server

from clproxy.cli import status

NOW = 1_767_268_800.0
DOCUMENT = {
    "status": "ok", "version": "0.1.0", "strategy": "fill-first", "uptime": 7384.2,
    "fallback_chain": [{"provider": "openai", "model": "gpt-4o"}, {"provider": "google-ai", "model": "gemini-2.5-pro"}],
    "accounts": [
        {"key": "anthropic:work", "name": "work", "kind": "oauth", "enabled": True, "state": "cooling",
         "cooling_until": NOW + 125, "backoff_level": 3, "attempts": 40, "successes": 31, "errors": 2,
         "rate_limits": 7, "last_error": "429 rate_limit_error: Number of request tokens has exceeded your limit"},
        {"key": "config:spare", "name": "spare", "kind": "api-key", "enabled": True, "state": "ok",
         "cooling_until": None, "backoff_level": 0, "attempts": 12, "successes": 12, "errors": 0,
         "rate_limits": 0, "last_error": None},
    ],
    "counters": {"upstream_attempts": 52, "completed_requests": 43, "truncated_streams": 1},
    "observability": {"logs": {"dir": "/home/u/.clproxy/logs", "dropped": {"buffer-full": 0, "write-error": 3}}},
}


class StatusPage(resource.Resource):
    """Serves one /status document (or an error status)."""

    isLeaf = True

    def __init__(self, document, code=200):
        super().__init__()
        self.document = document
        self.code = code
        self.hits = 0

    def render_GET(self, request):
        self.hits += 1
        if request.path != b"/status":
            request.setResponseCode(404)
            return b"{}"
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.document).encode()


@pytest.fixture
def serve():
    """Start a status server on a free loopback port; returns (page, port number)."""
    ports = []

    def start(document=DOCUMENT, code=200):
        page = StatusPage(document, code)
        port = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
        ports.append(port)
        return page, port.getHost().port

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def write_state(home, **state) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "proxy-state.json").write_text(json.dumps(state))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run(argv, home, **environ):
    """Run the CLI off the reactor thread (it blocks on HTTP while the reactor serves)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await threads.deferToThread(status.main, argv, stdout=stdout, stderr=stderr,
                                       environ=dict(environ, CLPROXY_HOME=str(home)), now=lambda: NOW)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest_twisted.ensureDeferred
async def test_text_status_from_the_state_file(serve, tmp_path):
    """Found through proxy-state.json: PID, uptime, strategy, fallback chain, accounts, attempts vs completed."""
    page, port = serve()
    write_state(tmp_path, pid=os.getpid(), host="127.0.0.1", port=port)
    code, out, err = await run([], tmp_path)
    assert (code, err) == (0, "")
    assert page.hits == 1
    assert f"running at http://127.0.0.1:{port}" in out
    assert f"PID:             {os.getpid()}" in out
    assert "Uptime:          2h 03m 04s" in out
    assert "Strategy:        fill-first" in out
    assert "Fallback chain:  openai/gpt-4o -> google-ai/gemini-2.5-pro" in out
    assert "43 completed, 52 upstream attempts (1.21 attempts per request)" in out
    assert "1 stream(s) ended early" in out
    assert "Logs:            /home/u/.clproxy/logs (3 records dropped)" in out
    work = next(line for line in out.splitlines() if line.strip().startswith("work "))
    assert "cooling" in work and "2m 05s" in work and " 40 " in work and " 7 " in work and "429 rate_limit_error" in work
    spare = next(line for line in out.splitlines() if line.strip().startswith("spare "))
    assert spare.split()[:4] == ["spare", "api-key", "ok", "12"]


@pytest_twisted.ensureDeferred
async def test_json_status_is_the_live_document_plus_pid(serve, tmp_path):
    """--format json prints the /status document with running, pid and url added."""
    _, port = serve()
    write_state(tmp_path, pid=os.getpid(), host="0.0.0.0", port=port)
    code, out, err = await run(["--format", "json"], tmp_path)
    assert code == 0
    document = json.loads(out)
    assert document["running"] is True and document["pid"] == os.getpid()
    assert document["url"] == f"http://127.0.0.1:{port}"
    assert document["accounts"] == DOCUMENT["accounts"]
    assert document["counters"] == DOCUMENT["counters"]


@pytest_twisted.ensureDeferred
async def test_url_option_wins_over_the_state_file(serve, tmp_path):
    """--url reaches the given proxy even when the state file points elsewhere."""
    page, port = serve()
    write_state(tmp_path, pid=os.getpid(), host="127.0.0.1", port=free_port())
    code, out, _ = await run(["--url", f"http://127.0.0.1:{port}/"], tmp_path)
    assert code == 0 and page.hits == 1
    assert "PID:             unknown" in out


@pytest_twisted.ensureDeferred
async def test_no_proxy_running_is_a_clear_message_and_exit_1(tmp_path):
    """Nothing listening: one line on stderr saying so, exit code 1, nothing on stdout."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run(["--url", url], tmp_path)
    assert code == 1 and out == ""
    assert err.startswith(f"clproxy: no proxy is running at {url}")
    assert "clproxy proxy start" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_no_proxy_running_in_json(tmp_path):
    """With --format json, stdout still gets a document: running false and the reason."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = await run(["--url", url, "--format", "json"], tmp_path)
    assert code == 1
    document = json.loads(out)
    assert document["running"] is False and document["url"] == url and "no proxy" in document["error"]


@pytest_twisted.ensureDeferred
async def test_stale_state_file_is_explained(tmp_path):
    """A state file whose PID has exited is named in the message, with what to do."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_state(tmp_path, pid=child.pid, host="127.0.0.1", port=free_port())
    code, _, err = await run([], tmp_path)
    assert code == 1
    assert f"names PID {child.pid}, which has exited" in err
    assert str(tmp_path / "proxy-state.json") in err


@pytest_twisted.ensureDeferred
async def test_an_error_answer_is_exit_1(serve, tmp_path):
    """A /status answering 500 is reported, not printed as a status."""
    _, port = serve({"type": "error"}, code=500)
    code, out, err = await run(["--url", f"http://127.0.0.1:{port}"], tmp_path)
    assert code == 1 and out == "" and "HTTP 500" in err


@pytest_twisted.ensureDeferred
async def test_non_json_answer_is_exit_1(tmp_path):
    """Something that is not clproxy on the port is reported as such."""
    class Html(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"<html>hello</html>"

    port = reactor.listenTCP(0, server.Site(Html()), interface="127.0.0.1")
    try:
        code, _, err = await run(["--url", f"http://127.0.0.1:{port.getHost().port}"], tmp_path)
    finally:
        await port.stopListening()
    assert code == 1 and "did not answer with JSON" in err


def test_bad_usage_is_exit_2(tmp_path):
    """An unknown option prints usage on stderr and exits 2."""
    stdout, stderr = io.StringIO(), io.StringIO()
    assert status.main(["--bogus"], stdout=stdout, stderr=stderr, environ={"CLPROXY_HOME": str(tmp_path)}) == 2
    assert "usage: clproxy proxy status" in stderr.getvalue()


@pytest_twisted.ensureDeferred
async def test_state_file_fills_in_what_status_lacks(serve, tmp_path):
    """The state file's url, fallbackChain and startTime are used when /status does not carry them."""
    document = {k: v for k, v in DOCUMENT.items() if k not in ("fallback_chain", "uptime")}
    _, port = serve(document)
    write_state(tmp_path, version=1, pid=os.getpid(), host="0.0.0.0", port=port,
                url=f"http://0.0.0.0:{port}", startTime=NOW - 65, strategy="fill-first",
                fallbackChain=[{"provider": "openai", "model": "gpt-4o-mini"}])
    code, out, _ = await run([], tmp_path)
    assert code == 0
    assert "Fallback chain:  openai/gpt-4o-mini" in out
    assert "Uptime:          1m 05s" in out


def test_url_from_state_defaults_and_wildcards():
    """No state file means the default port; wildcard binds are reached on loopback."""
    assert status.url_from_state(None) == "http://127.0.0.1:55669"
    assert status.url_from_state({"host": "0.0.0.0", "port": 8080}) == "http://127.0.0.1:8080"
    assert status.url_from_state({"host": "::", "port": 8080}) == "http://[::1]:8080"
    assert status.url_from_state({"host": "::1", "port": 1}) == "http://[::1]:1"
    assert status.url_from_state({"url": "http://0.0.0.0:7/", "port": 9}) == "http://127.0.0.1:7"


def test_duration_formatting():
    """Uptimes read naturally at every scale."""
    assert status.format_duration(7) == "7s"
    assert status.format_duration(306) == "5m 06s"
    assert status.format_duration(7384.2) == "2h 03m 04s"
    assert status.format_duration(3 * 86400 + 4 * 3600 + 300) == "3d 04h 05m"
    assert status.format_duration(None) == "unknown"


def test_last_error_words_say_what_happened():
    """A network failure is shown by what happened; an HTTP error as recorded; nothing as nothing."""
    assert status.last_error_words("network-error network: connection refused by 127.0.0.1:9") == \
        "connection refused by 127.0.0.1:9"
    assert status.last_error_words("network-error network") == "network error"
    http = "429 rate-limited: rate_limit_error: slow"
    assert status.last_error_words(http) == http
    assert status.last_error_words(None) == ""


@pytest_twisted.ensureDeferred
async def test_last_error_of_a_live_daemon_says_what_happened(fake, start_proxy, tmp_path):
    """A refused connection and a timeout show in LAST ERROR as words with host:port, no secret."""
    from conftest import accounts_config
    from helpers import post, request_body

    refused = free_port()
    config = accounts_config(fake, "slow", server={"upstreamTimeout": 0.3})
    config["accounts"]["anthropic"].insert(0, {"name": "down", "apiKey": "sk-ant-secret-down",
                                               "baseUrl": f"http://127.0.0.1:{refused}"})
    proxy = start_proxy(config)
    fake.script("key-slow", delay=5.0, times=1)
    got, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert got == 504
    code, out, err = await run(["--url", proxy.url], tmp_path)
    assert (code, err) == (0, "")
    fake_host = fake.url.split("://", 1)[1]
    down = next(line for line in out.splitlines() if line.strip().startswith("down "))
    slow = next(line for line in out.splitlines() if line.strip().startswith("slow "))
    assert down.endswith(f"connection refused by 127.0.0.1:{refused}"), down
    assert slow.endswith(f"timeout after 0.3 s waiting for {fake_host}"), slow
    assert "network-error network" not in out and "secret" not in out and "key-slow" not in out


@pytest_twisted.ensureDeferred
async def test_team_mode_status_needs_an_admin_key_and_says_which(fake, start_proxy, tmp_path):
    """Once client keys exist /status needs an admin key: without one the command says what to set
    (not "start it": the proxy runs); a member's key is refused as not a valid admin key; the admin key
    from CLPROXY_ADMIN_KEY (or a clp_ key in Claude Code's variables) shows the status. An Anthropic
    credential in ANTHROPIC_API_KEY is never sent, and no key is ever printed."""
    from clproxy.team.keystore import KeyStore
    from conftest import accounts_config

    keys = KeyStore(str(tmp_path / "home"))
    admin, _ = keys.create("ops", admin=True)
    member, _ = keys.create("alice")
    proxy = start_proxy(accounts_config(fake, "work"))
    url = ["--url", proxy.url]

    code, out, err = await run(url, tmp_path, ANTHROPIC_API_KEY="sk-ant-api03-not-sent")
    assert code == 1 and out == ""
    assert "has client keys" in err and "CLPROXY_ADMIN_KEY" in err and "--admin" in err
    assert "Start it" not in err and "sk-ant" not in err
    code, out, err = await run(url + ["--format", "json"], tmp_path)
    assert code == 1 and json.loads(out)["running"] is True
    code, out, err = await run(url, tmp_path, CLPROXY_ADMIN_KEY=member)
    assert code == 1 and "not a valid admin key" in err and member not in err
    for environ in ({"CLPROXY_ADMIN_KEY": admin}, {"ANTHROPIC_AUTH_TOKEN": admin},
                    {"ANTHROPIC_API_KEY": admin}):
        code, out, err = await run(url, tmp_path, **environ)
        assert (code, err) == (0, ""), environ
        assert "work" in out and admin not in out


def test_only_clproxy_keys_are_taken_from_claude_codes_variables():
    """CLPROXY_ADMIN_KEY is sent as it is; ANTHROPIC_* only when it holds a clproxy key."""
    assert status.admin_key({}) is None
    assert status.admin_key({"ANTHROPIC_API_KEY": "sk-ant-api03-x", "ANTHROPIC_AUTH_TOKEN": "sk-ant-oat01-y"}) is None
    assert status.admin_key({"ANTHROPIC_API_KEY": "clp_a"}) == "clp_a"
    assert status.admin_key({"CLPROXY_ADMIN_KEY": " k ", "ANTHROPIC_API_KEY": "clp_a"}) == "k"


def test_a_redirect_is_not_followed_with_the_admin_key():
    """urllib follows a redirect and copies the request's headers to the new host: a --url behind
    a redirecting front end (or a foreign program on the state file's port) would receive the admin
    key. The status command (and the status line, same opener) answers the redirect as an error."""
    import http.server
    import threading
    seen = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    servers = [http.server.HTTPServer(("127.0.0.1", 0), Collector)]

    class Redirector(Collector):
        def do_GET(self):
            self.send_response(302)
            self.send_header("location", f"http://localhost:{servers[0].server_address[1]}/elsewhere")
            self.end_headers()

    servers.append(http.server.HTTPServer(("127.0.0.1", 0), Redirector))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(status.NotRunning) as raised:
            status.fetch_status(f"http://127.0.0.1:{servers[1].server_address[1]}", 5.0, "clp_SECRETADMINKEY")
        assert "HTTP 302" in str(raised.value) and "clp_" not in str(raised.value)
    finally:
        for server in servers:
            server.shutdown()
    assert seen == []
