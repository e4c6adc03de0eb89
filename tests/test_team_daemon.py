"""Team mode through a real daemon: client keys on /v1, the admin check on /status and /metrics, the
per-key limits and the subscription rule before dispatch, and no open relay on a non-loopback host."""

import json
import os
import subprocess
import sys
import time

import anthropic
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.http.auth import ClientAuth
from clproxy.team.keys import KeyRing
from clproxy.team.keystore import KeyStore
from clproxy.team.limits import day_of, next_midnight
from clproxy.testing.oauth import listen_fake_oauth
from conftest import accounts_config
from helpers import in_thread, request_body, until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def send(url, body=None, headers=None, method=b"POST"):
    """(status, headers, body) of one request carrying exactly ``headers`` (no client key unless given)."""
    from twisted.web.client import FileBodyProducer
    from io import BytesIO
    all_headers = {b"content-type": [b"application/json"], b"anthropic-version": [b"2023-06-01"]}
    all_headers.update(headers or {})
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(method, url.encode(), Headers(all_headers),
                                   FileBodyProducer(BytesIO(body)) if body is not None else None)
    return response.code, response.headers, await treq.content(response)


def error(body):
    parsed = json.loads(body)
    return parsed["error"]["type"], parsed["error"]["message"]


def make_key(tmp_path, name="alice", **limits):
    """A client key in the daemon's home (as `clproxy keys create` makes it): (key, record)."""
    return KeyStore(str(tmp_path / "home")).create(name, **limits)


def with_key(key):
    return {b"x-api-key": [key.encode()]}


@pytest_twisted.ensureDeferred
async def test_no_key_is_401_and_nothing_goes_upstream(fake, start_proxy, tmp_path):
    """With a key in the home, a request without one (or with a wrong one) is 401 and never sent."""
    key, _ = make_key(tmp_path)
    proxy = start_proxy(accounts_config(fake, "a"))
    for headers in ({}, {b"x-api-key": [b"clp_wrong"]}, {b"authorization": [b"Bearer nope"]}):
        status, _, body = await send(proxy.url + "/v1/messages", request_body(), headers)
        assert status == 401 and error(body)[0] == "authentication_error"
        assert key not in body.decode()
    status, _, _ = await send(proxy.url + "/v1/messages/count_tokens", request_body())
    assert status == 401
    status, _, _ = await send(proxy.url + "/v1/models", None, method=b"GET")
    assert status == 401
    status, _, body = await send(proxy.url + "/v1/chat/completions", json.dumps(
        {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert "type" not in json.loads(body)  # the OpenAI shape under /v1/chat
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_a_good_key_passes_and_never_reaches_the_upstream(fake, start_proxy, tmp_path):
    """x-api-key and Bearer (the SDK's auth_token) both pass; the upstream sees the account's
    credential, never the client key; no file under CLPROXY_HOME holds the key (only its hash)."""
    key, record = make_key(tmp_path)
    proxy = start_proxy(accounts_config(fake, "a"))
    status, _, _ = await send(proxy.url + "/v1/messages", request_body(), with_key(key))
    assert status == 200

    def by_sdk():
        client = anthropic.Anthropic(base_url=proxy.url, auth_token=key, api_key=None, max_retries=0)
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=10,
                                      messages=[{"role": "user", "content": "hi"}])
    message = await in_thread(by_sdk)
    assert message.content
    assert len(fake.requests) == 2
    for recorded in fake.requests:
        assert recorded.credential == "key-a"
        assert all(key.encode() not in value for _, value in recorded.headers)
    home = tmp_path / "home"
    await until(lambda: any(home.rglob("*")))
    for path in home.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    assert record.hash.encode() in (home / "keys.json").read_bytes()


@pytest_twisted.ensureDeferred
async def test_a_revoked_key_is_refused_within_two_seconds(fake, start_proxy, tmp_path):
    """`clproxy keys revoke` while the daemon runs: the key is refused within 2 s; a key created
    meanwhile is accepted within 2 s."""
    key, _ = make_key(tmp_path)
    make_key(tmp_path, "bob")
    proxy = start_proxy(accounts_config(fake, "a"))
    assert (await send(proxy.url + "/v1/messages", request_body(), with_key(key)))[0] == 200
    KeyStore(str(tmp_path / "home")).revoke("alice")
    started = time.monotonic()
    statuses = []

    async def refused():
        statuses.append((await send(proxy.url + "/v1/messages", request_body(), with_key(key)))[0])
        return statuses[-1] == 401
    while not await refused():
        assert time.monotonic() - started < 2.0, statuses
    new_key, _ = make_key(tmp_path, "carol")
    started = time.monotonic()
    while (await send(proxy.url + "/v1/messages", request_body(), with_key(new_key)))[0] != 200:
        assert time.monotonic() - started < 2.0


@pytest_twisted.ensureDeferred
async def test_revoking_the_last_key_on_a_public_bind_does_not_open_the_relay(fake, tmp_path):
    """No key left on a non-loopback bind (without allowUnauthenticated): /v1 is refused, naming
    `clproxy keys create`; on loopback, or when allowed, no key means open."""
    ring = KeyRing()

    class Request:
        requestHeaders = Headers()

    refusal = ClientAuth(ring, "0.0.0.0").client(Request())
    assert refusal.status == 401 and "clproxy keys create" in refusal.message
    assert ClientAuth(ring, "0.0.0.0", lambda: True).client(Request()) is None
    assert ClientAuth(ring, "127.0.0.1").client(Request()) is None


@pytest_twisted.ensureDeferred
async def test_models_outside_the_key_are_403(fake, start_proxy, tmp_path):
    """A key limited to claude-haiku-* gets a 403 permission_error naming claude-opus-4-1 without any
    upstream request, while a Haiku model through the same key is served 200."""
    key, _ = make_key(tmp_path, models=["claude-haiku-*"])
    proxy = start_proxy(accounts_config(fake, "a"))
    status, _, body = await send(proxy.url + "/v1/messages", request_body(model="claude-opus-4-1"),
                                 with_key(key))
    assert status == 403 and error(body)[0] == "permission_error" and "claude-opus-4-1" in error(body)[1]
    assert fake.requests == []
    status, _, _ = await send(proxy.url + "/v1/messages", request_body(model="claude-haiku-4-5"),
                              with_key(key))
    assert status == 200 and len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_models_paths_reach_only_the_models_endpoint(fake, start_proxy, tmp_path):
    """/v1/models and /v1/models/{id} go upstream as those paths; anything else under /v1/models
    (dot segments, escaped slashes) is a 404 here: forwarded as sent, ``/v1/models/../files``
    reached another endpoint of the API with the pool's credential."""
    key, _ = make_key(tmp_path)
    proxy = start_proxy(accounts_config(fake, "a"))
    for path in (b"/v1/models", b"/v1/models/", b"/v1/models/claude-sonnet-4-5"):
        status, _, _ = await send(proxy.url + path.decode(), None, with_key(key), method=b"GET")
        assert status == 200 and fake.requests[-1].path == path.rstrip(b"/"), path
    sent = len(fake.requests)
    for path in ("/v1/models/../messages/batches", "/v1/models/..%2Ffiles", "/v1/models/%2e%2e/files",
                 "/v1/models/a/b", "/v1/models/.hidden", "/v1/models/a%20b"):
        status, _, body = await send(proxy.url + path, None, with_key(key), method=b"GET")
        assert status == 404 and error(body)[0] == "not_found_error", path
    assert len(fake.requests) == sent


@pytest_twisted.ensureDeferred
async def test_listing_models_spends_the_keys_rpm_and_stops_at_a_spent_budget(fake, start_proxy, tmp_path):
    """GET /v1/models names no model, and every per-key limit was skipped for it: with rpm 1 the
    second listing is a 429, and a key whose daily tokens are spent gets none."""
    key, _ = make_key(tmp_path, rpm=1)
    spent, _ = make_key(tmp_path, name="bob", tokens_per_day=10)
    proxy = start_proxy(accounts_config(fake, "a"))
    statuses = [(await send(proxy.url + "/v1/models", None, with_key(key), method=b"GET"))[0] for _ in range(3)]
    assert statuses == [200, 429, 429] and len(fake.requests) == 1
    await proxy.service.store.add_usage("bob", day_of(time.time()), 10_000, 0.0)
    status, _, body = await send(proxy.url + "/v1/models", None, with_key(spent), method=b"GET")
    assert status == 429 and "Token budget" in error(body)[1] and len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_rpm_is_429_with_a_truthful_retry_after(fake, start_proxy, tmp_path):
    """A key with rpm 2 gets its first 2 requests served and the third a 429 whose Retry-After is when
    the first leaves the sliding minute (at most 60 s); only 2 requests reach upstream."""
    key, _ = make_key(tmp_path, rpm=2)
    proxy = start_proxy(accounts_config(fake, "a"))
    first = time.time()
    for _ in range(2):
        assert (await send(proxy.url + "/v1/messages", request_body(), with_key(key)))[0] == 200
    status, headers, body = await send(proxy.url + "/v1/messages", request_body(), with_key(key))
    assert status == 429 and error(body)[0] == "rate_limit_error"
    retry = int(headers.getRawHeaders(b"retry-after")[0])
    # the first request leaves the sliding minute 60 s after it was taken
    assert first + 60 - time.time() - 1 <= retry <= 60
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_a_spent_token_budget_is_429_until_midnight_utc(fake, start_proxy, tmp_path):
    """A key whose 1,000 tokens per day are spent gets a 429 saying 00:00 UTC, with a Retry-After to the
    next UTC midnight (within 2 s), and nothing is sent upstream."""
    key, _ = make_key(tmp_path, tokens_per_day=1000)
    proxy = start_proxy(accounts_config(fake, "a"))
    await proxy.service.store.add_usage("alice", day_of(time.time()), 1000, 0.0)
    status, headers, body = await send(proxy.url + "/v1/messages", request_body(), with_key(key))
    now = time.time()
    assert status == 429 and error(body)[0] == "rate_limit_error" and "00:00 UTC" in error(body)[1]
    retry = int(headers.getRawHeaders(b"retry-after")[0])
    assert abs(now + retry - next_midnight(now)) <= 2
    assert fake.requests == []


@pytest.fixture
def oauth():
    server, port, _ = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


def seed_oauth(home, oauth):
    pair = oauth.seed_tokens()
    tokens = TokenSet(access_token=pair.access_token, refresh_token=pair.refresh_token)
    TokenStore(str(home)).put(StoredCredential.new_oauth("work", tokens, time.time(),
                                                         expires_at=time.time() + 3600 * 8))
    return pair


@pytest_twisted.ensureDeferred
async def test_subscription_accounts_serve_only_keys_allowed_to_use_them(fake, oauth, start_proxy,
                                                                         tmp_path):
    """A key without --allow-subscription never reaches the OAuth account; one with it may."""
    pair = seed_oauth(tmp_path / "home", oauth)
    plain, _ = make_key(tmp_path, "plain")
    subscriber, _ = make_key(tmp_path, "sub", allow_subscription=True)
    config = accounts_config(fake, "a", routing={"strategy": "round-robin"})
    config["providers"] = {"anthropic": {"baseUrl": fake.url, "oauthTokenUrl": oauth.token_url}}
    proxy = start_proxy(config)
    for _ in range(4):
        assert (await send(proxy.url + "/v1/messages", request_body(), with_key(plain)))[0] == 200
    assert {r.credential for r in fake.requests} == {"key-a"}
    fake.clear()
    for _ in range(4):
        assert (await send(proxy.url + "/v1/messages", request_body(), with_key(subscriber)))[0] == 200
    assert pair.access_token in {r.credential for r in fake.requests}


@pytest_twisted.ensureDeferred
async def test_only_subscription_accounts_is_403_for_a_plain_key(fake, oauth, start_proxy, tmp_path):
    """With only an OAuth subscription account, a key without --allow-subscription gets a 403 that
    names that flag, and nothing is sent upstream."""
    seed_oauth(tmp_path / "home", oauth)
    plain, _ = make_key(tmp_path, "plain")
    proxy = start_proxy({"providers": {"anthropic": {"baseUrl": fake.url,
                                                     "oauthTokenUrl": oauth.token_url}}})
    status, _, body = await send(proxy.url + "/v1/messages", request_body(), with_key(plain))
    assert status == 403 and error(body)[0] == "permission_error"
    assert "--allow-subscription" in error(body)[1]
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_status_and_metrics_need_an_admin_key_health_stays_open(fake, start_proxy, tmp_path):
    """/status and /metrics answer 401 with no key or a plain key (either header) and 200 only to an
    admin key, without showing any key's text, while /health stays open to all."""
    plain, _ = make_key(tmp_path, "plain")
    admin, _ = make_key(tmp_path, "boss", admin=True)
    proxy = start_proxy(accounts_config(fake, "a"))
    for path in ("/status", "/metrics"):
        for headers in ({}, with_key(plain), {b"authorization": [b"Bearer " + plain.encode()]}):
            status, _, body = await send(proxy.url + path, None, headers, method=b"GET")
            assert status == 401 and error(body)[0] == "authentication_error", path
        status, _, body = await send(proxy.url + path, None,
                                     {b"authorization": [b"Bearer " + admin.encode()]}, method=b"GET")
        assert status == 200, path
        assert admin not in body.decode() and plain not in body.decode()
    assert (await send(proxy.url + "/health", None, method=b"GET"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_no_key_on_loopback_stays_open(fake, start_proxy):
    """With no client keys on a loopback address, /v1/messages and /status stay open without a key, as
    before team mode."""
    proxy = start_proxy(accounts_config(fake, "a"))
    assert (await send(proxy.url + "/v1/messages", request_body()))[0] == 200
    assert (await send(proxy.url + "/status", None, method=b"GET"))[0] == 200


def _environment(home):
    env = dict(os.environ, CLPROXY_HOME=str(home), CLPROXY_CLAUDE_SETTINGS="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("ANTHROPIC_API_KEY", None)
    return env


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "clproxy", "proxy", "start"],
    [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "claudeproxy"]])
def test_a_public_host_without_keys_refuses_to_start(tmp_path, command):
    """Both `python -m clproxy proxy start` and twistd refuse to listen on 0.0.0.0 without client keys:
    a non-zero exit, no traceback, and one line naming the host and `clproxy keys create`."""
    result = subprocess.run(command + ["--host", "0.0.0.0", "--port", "1", "--no-guard"],
                            capture_output=True, text=True, env=_environment(tmp_path / "home"),
                            cwd=str(tmp_path), timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "clproxy keys create" in line]
    assert len(lines) == 1 and "0.0.0.0" in lines[0], output
    if command[1] == "-m":
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, output


@pytest_twisted.ensureDeferred
async def test_revoking_the_last_key_of_a_running_public_daemon_refuses_v1(fake, start_proxy, tmp_path):
    """A daemon on 0.0.0.0 whose last key is revoked answers /v1 with 401 naming `clproxy keys
    create`, never unauthenticated."""
    key, _ = make_key(tmp_path)
    proxy = start_proxy(accounts_config(fake, "a"), host="0.0.0.0")
    url = proxy.url.replace("0.0.0.0", "127.0.0.1")
    assert (await send(url + "/v1/messages", request_body(), with_key(key)))[0] == 200
    KeyStore(str(tmp_path / "home")).revoke("alice")
    started = time.monotonic()
    while True:  # every answer a 401: the one before the watcher saw it, then the no-key refusal
        status, _, body = await send(url + "/v1/messages", request_body())
        assert status == 401 and time.monotonic() - started < 2.0, status
        if "clproxy keys create" in error(body)[1]:
            break
    assert len(fake.requests) == 1


def _raw_exchange(port, request):
    """Send ``request`` bytes to 127.0.0.1:``port`` and read the whole answer (blocking)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest_twisted.ensureDeferred
async def test_an_open_loopback_daemon_answers_421_to_a_foreign_host(fake, start_proxy, tmp_path):
    """DNS rebinding: without keys on loopback, a Host naming another site gets 421 (Anthropic-shaped
    on /v1, OpenAI-shaped under /v1/chat) on /v1, /status and the dashboard's data, and nothing goes
    upstream; local names (any port, any case) and no Host at all (HTTP/1.0) are served; once a
    key exists the key decides, whatever the Host."""
    proxy = start_proxy(accounts_config(fake, "a"))
    foreign = {b"host": [b"attacker.example:55670"], b"origin": [b"http://attacker.example:55670"]}
    status, headers, body = await send(proxy.url + "/v1/messages", request_body(), foreign)
    assert status == 421 and error(body)[0] == "invalid_request_error" and b"attacker" not in body
    status, _, body = await send(proxy.url + "/v1/chat/completions", b"{}", foreign)
    assert status == 421 and json.loads(body)["error"]["message"]
    for path in ("/status", "/metrics", "/dashboard/state", "/dashboard/events", "/session/s1"):
        assert (await send(proxy.url + path, None, foreign, method=b"GET"))[0] == 421, path
    assert (await send(proxy.url + "/health", None, foreign, method=b"GET"))[0] == 200
    assert not fake.requests
    port = proxy.url.rsplit(":", 1)[1]
    for host in (b"localhost", b"LOCALHOST:1", b"127.0.0.1:" + port.encode(), b"[::1]:8080", b"localhost."):
        assert (await send(proxy.url + "/v1/messages", request_body(), {b"host": [host]}))[0] == 200, host
    for host in (b"127.0.0.1.attacker.example", b"localhost.attacker.example:80", b"[::2]"):
        assert (await send(proxy.url + "/v1/messages", request_body(), {b"host": [host]}))[0] == 421, host
    body = request_body()
    answer = await in_thread(_raw_exchange, int(port), b"POST /v1/messages HTTP/1.0\r\ncontent-type: "
                             b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:80]
    key, _ = make_key(tmp_path)
    await until(lambda: not proxy.service.proxy.ring.empty)
    assert (await send(proxy.url + "/v1/messages", request_body(), {**foreign, **with_key(key)}))[0] == 200
    assert (await send(proxy.url + "/v1/messages", request_body(), foreign))[0] == 401


@pytest_twisted.ensureDeferred
async def test_revoking_the_last_key_of_a_running_public_daemon_closes_status_and_metrics(
        fake, start_proxy, tmp_path):
    """On 0.0.0.0 with no key left, /status and /metrics are refused like /v1 (401 naming `clproxy
    keys create`), never shown to anyone who asks; with allowUnauthenticated they are open."""
    make_key(tmp_path)
    proxy = start_proxy(accounts_config(fake, "a"), host="0.0.0.0")
    url = proxy.url.replace("0.0.0.0", "127.0.0.1")
    KeyStore(str(tmp_path / "home")).revoke("alice")
    await until(lambda: proxy.service.proxy.ring.empty)
    for path in ("/status", "/metrics"):
        status, _, body = await send(url + path, None, method=b"GET")
        assert status == 401 and "clproxy keys create" in error(body)[1], path
        assert b"accounts" not in body
    assert not fake.requests
    allowed = ClientAuth(KeyRing(), "0.0.0.0", lambda: True)

    class Request:
        requestHeaders = Headers()

    assert allowed.admin(Request()) is None


@pytest_twisted.ensureDeferred
async def test_allow_unauthenticated_serves_a_public_host_with_a_warning(fake, start_proxy, logs):
    """With allowUnauthenticated, a daemon on 0.0.0.0 without keys logs a WARNING naming that setting
    and serves requests with 200 instead of refusing to start."""
    config = accounts_config(fake, "a", server={"allowUnauthenticated": True})
    proxy = start_proxy(config, host="0.0.0.0")
    assert any("WARNING" in line and "allowUnauthenticated" in line for line in logs), logs
    url = proxy.url.replace("0.0.0.0", "127.0.0.1")
    assert (await send(url + "/v1/messages", request_body()))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_before_its_final_usage_is_charged_its_relayed_output(fake, start_proxy, tmp_path):
    """A client that reads a stream almost to its end and hangs up (or an upstream that breaks)
    left only message_start's placeholder output count (1): reading everything but the last
    event spent nearly nothing of a key's budget. The output is now charged at least one token per
    BYTES_PER_STREAMED_TOKEN relayed; a stream that ends with its message_delta keeps the exact
    count."""
    from twisted.internet import task
    from clproxy.proxy.attempt import BYTES_PER_STREAMED_TOKEN
    from clproxy.testing.anthropic import text_stream
    from helpers import stream
    key, _ = make_key(tmp_path, tokens_per_day=1_000_000)
    proxy = start_proxy(accounts_config(fake, "a"))
    store = proxy.service.store
    fake.script(events=text_stream(["tok%d " % i for i in range(400)]), pace=0.002, times=1)
    response, collected = await stream(proxy.url + "/v1/messages", request_body(stream=True), with_key(key))
    assert response.code == 200
    await until(lambda: collected.body.count(b"text_delta") >= 390, timeout=20)
    collected.transport.stopProducing()  # the client hangs up before message_delta
    await until(lambda: proxy.dispatcher.streams == set(), timeout=10)
    await task.deferLater(reactor, 0.3, lambda: None)
    tokens, _ = await store.get_usage("alice", day_of(time.time()))
    assert tokens >= 12 + 390 * 100 // BYTES_PER_STREAMED_TOKEN, tokens  # input 12, ~105 bytes a delta

    fake.script(events=text_stream(["x"] * 300), pace=0.001, cut_after=250, times=1)  # upstream breaks
    response, collected = await stream(proxy.url + "/v1/messages", request_body(stream=True), with_key(key))
    await collected.done
    assert b"event: error" in collected.body
    await task.deferLater(reactor, 0.3, lambda: None)
    after_cut, _ = await store.get_usage("alice", day_of(time.time()))
    assert after_cut - tokens >= 12 + 240

    fake.script(events=text_stream(["x"] * 300), times=1)  # whole: message_delta's 300 exactly
    response, collected = await stream(proxy.url + "/v1/messages", request_body(stream=True), with_key(key))
    await collected.done
    await task.deferLater(reactor, 0.3, lambda: None)
    whole, _ = await store.get_usage("alice", day_of(time.time()))
    assert whole - after_cut == 12 + 300


@pytest_twisted.ensureDeferred
async def test_fifty_requests_at_once_with_one_token_left_send_one(fake, start_proxy, tmp_path):
    """A budget was read before each request and charged after it: fifty requests sent together
    with one token left all passed and all ran (the review: 1,949 of 1,000 tokens spent). The first
    now holds the budget while it runs; the others get a 429 saying requests are running; the rpm
    limit under the same load was already right."""
    from twisted.internet import defer
    key, _ = make_key(tmp_path, tokens_per_day=1000)
    proxy = start_proxy(accounts_config(fake, "a"))
    store = proxy.service.store
    await store.add_usage("alice", day_of(time.time()), 999, 0.0)
    fake.pause()
    calls = [defer.ensureDeferred(send(proxy.url + "/v1/messages", request_body(), with_key(key)))
             for _ in range(50)]
    await until(lambda: len(fake.requests) >= 1, timeout=10)
    fake.resume()
    results = await defer.gatherResults(calls)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 1 and statuses.count(429) == 49 and len(fake.requests) == 1
    refusal = next(body for status, _, body in results if status == 429)
    assert "still running" in error(refusal)[1] and key not in refusal.decode()
    # and the next one after it: the budget is spent now, until midnight
    status, headers, body = await send(proxy.url + "/v1/messages", request_body(), with_key(key))
    assert status == 429 and "Token budget" in error(body)[1]


def test_host_verdicts_are_remembered_within_a_bound():
    """The Host check runs on every request of an open loopback daemon: a value's verdict is
    remembered (the same one comes each time), the same as computed afresh, and a client sending
    ever new values cannot grow the memory past its bound."""
    from twisted.web.test.requesthelper import DummyRequest
    from clproxy.http import auth

    def asked(host):
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [host])
        return auth.misdirected(request, "127.0.0.1")

    for _ in range(2):  # computed, then remembered
        assert not asked(b"127.0.0.1:55669") and not asked(b"LOCALHOST.") and not asked(b"[::1]:1")
        assert asked(b"attacker.example") and asked(b"localhost.attacker.example:55669")
    for i in range(3 * auth._FOREIGN_HOSTS_SIZE):
        assert asked(b"site%d.example" % i)
        assert len(auth._FOREIGN_HOSTS) <= auth._FOREIGN_HOSTS_SIZE
    request = DummyRequest([b""])  # no Host at all (HTTP/1.0): not foreign
    assert not auth.misdirected(request, "127.0.0.1")
