"""Integration: the real daemon over loopback in front of the fake Anthropic API, in passthrough mode."""

import json
import socket

import anthropic
import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task

from clproxy.testing import anthropic as testing
from clproxy.proxy.sse import encode_event
from conftest import accounts_config
from helpers import error_of, in_thread, post, request_body, sdk, stream, until


@pytest_twisted.ensureDeferred
async def test_create_forwards_body_byte_for_byte(fake, start_proxy):
    """A non-streaming request reaches the upstream byte for byte, with the account's key and the query kept."""
    proxy = start_proxy(accounts_config(fake, "one"))
    body = request_body()
    status, headers, content = await post(proxy.url + "/v1/messages?beta=true", body, {
        b"anthropic-beta": [b"interleaved-thinking-2025-05-14,prompt-caching-2024-07-31"],
        b"x-app": [b"cli"], b"user-agent": [b"claude-cli/2.1.0 (external, cli)"],
        b"x-stainless-lang": [b"js"], b"x-claude-code-session-id": [b"sess-1"],
        b"traceparent": [b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
        b"connection": [b"keep-alive"]})
    assert status == 200
    assert json.loads(content)["type"] == "message"
    received = fake.requests[-1]
    assert received.body == body
    assert received.uri == b"/v1/messages?beta=true"
    assert received.credential == "key-one"
    assert received.header("anthropic-beta") == "interleaved-thinking-2025-05-14,prompt-caching-2024-07-31"
    for name in ("x-app", "user-agent", "x-stainless-lang", "x-claude-code-session-id", "traceparent",
                 "anthropic-version"):
        assert received.header(name) is not None, name
    assert received.header("authorization") is None
    assert headers.getRawHeaders(b"request-id")[0].startswith(b"req_fake")


@pytest_twisted.ensureDeferred
async def test_client_credentials_never_reach_upstream(fake, start_proxy):
    """The client's own x-api-key and Authorization are replaced, not forwarded."""
    proxy = start_proxy(accounts_config(fake, "one"))
    await post(proxy.url + "/v1/messages", request_body(),
               {b"authorization": [b"Bearer client-token"], b"x-api-key": [b"client-key"]})
    received = fake.requests[-1]
    values = [v for _, v in received.headers]
    assert b"client-key" not in values and b"Bearer client-token" not in values
    assert received.credential == "key-one"


@pytest_twisted.ensureDeferred
async def test_sdk_create_and_rate_limit_headers(fake, start_proxy):
    """The anthropic SDK's create works through the proxy and rate-limit headers come back."""
    proxy = start_proxy(accounts_config(fake, "one"))
    fake.script(status=200, headers={"anthropic-ratelimit-requests-remaining": "99",
                                     "content-type": "application/json"},
                body=json.dumps(testing.message("Hi there")).encode(), times=1)
    client = sdk(proxy)
    raw = await in_thread(lambda: client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert raw.parse().content[0].text == "Hi there"


@pytest.mark.parametrize("events", [testing.text_stream(), testing.tool_use_stream(),
                                    testing.thinking_stream()], ids=["text", "tool_use", "thinking"])
@pytest_twisted.ensureDeferred
async def test_sdk_stream_every_event_in_order(fake, start_proxy, events):
    """The SDK sees every upstream SSE event in order (text, tool use, thinking with signature_delta)."""
    proxy = start_proxy(accounts_config(fake, "one"))
    fake.script(events=events)
    client = sdk(proxy)

    def consume():
        raw = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, stream=True,
                                     messages=[{"role": "user", "content": "hi"}])
        seen = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in raw]
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            return seen, s.get_final_message()

    seen, final = await in_thread(consume)
    # the SDK drops "ping" itself; the byte-level test checks pings arrive
    expected = [(name, data["delta"]["type"] if name == "content_block_delta" else
                 data["delta"].get("type") if name == "message_delta" else None)
                for name, data in events if name != "ping"]
    assert [t for t, _ in seen] == [name for name, _ in expected]
    assert [d for t, d in seen if t == "content_block_delta"] == [
        d for t, d in expected if t == "content_block_delta"]
    if any(d.get("delta", {}).get("type") == "signature_delta" for _, d in events):
        assert final.content[0].type == "thinking" and final.content[0].signature
    if any(d.get("content_block", {}).get("type") == "tool_use" for _, d in events):
        assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Paris"}


@pytest_twisted.ensureDeferred
async def test_raw_stream_bytes_identical(fake, start_proxy):
    """The client receives exactly the bytes of every upstream event."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.thinking_stream()
    fake.script(events=events)
    response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    assert await body.done
    assert body.body == b"".join(encode_event(name, data) for name, data in events)


@pytest_twisted.ensureDeferred
async def test_count_tokens_and_models(fake, start_proxy):
    """count_tokens and models.list go to the upstream with the account's key."""
    proxy = start_proxy(accounts_config(fake, "one"))
    client = sdk(proxy)
    counted = await in_thread(lambda: client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hello"}]))
    assert counted.input_tokens > 0
    assert fake.requests[-1].path == b"/v1/messages/count_tokens"
    models = await in_thread(lambda: list(client.models.list()))
    assert [m.id for m in models] == ["claude-sonnet-4-5", "claude-opus-4-1"]
    assert fake.requests[-1].method == b"GET" and fake.requests[-1].credential == "key-one"


@pytest.mark.parametrize("status,error_type,exception", [
    (400, "invalid_request_error", anthropic.BadRequestError),
    (404, "not_found_error", anthropic.NotFoundError),
    (413, "request_too_large", anthropic.APIStatusError),
])
@pytest_twisted.ensureDeferred
async def test_upstream_client_errors_surface_as_sdk_exceptions(fake, start_proxy, status, error_type,
                                                                 exception):
    """Upstream client errors come back as is and the SDK raises its typed exception."""
    proxy = start_proxy(accounts_config(fake, "one"))
    fake.script(status=status, body=testing.error_json(status, error_type, "scripted failure"))
    client = sdk(proxy)
    with pytest.raises(exception) as caught:
        await in_thread(lambda: client.messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == error_type
    assert len(fake.requests) == 1  # the client's fault: no retry on another account


@pytest_twisted.ensureDeferred
async def test_no_account_explains_how_to_add_one(start_proxy):
    """With no config and no key the daemon starts, answers /health, and tells how to add an account."""
    proxy = start_proxy(None, environ={"CLPROXY_HOME": "/nonexistent-clproxy-home"})
    status, _, body = await post(proxy.url + "/health", None, method=b"GET")
    assert status == 200 and json.loads(body)["status"] == "ok"
    client = sdk(proxy)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await in_thread(lambda: client.messages.create(
            model="claude-sonnet-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
    message = caught.value.body["error"]["message"]
    assert "clproxy auth login anthropic" in message and "ANTHROPIC_API_KEY" in message


@pytest_twisted.ensureDeferred
async def test_environment_key_is_used_without_config(fake, start_proxy, tmp_path):
    """ANTHROPIC_API_KEY from the environment is the account when the config names none."""
    proxy = start_proxy({"providers": {"anthropic": {"baseUrl": fake.url}}},
                        environ={"ANTHROPIC_API_KEY": "env-key", "CLPROXY_HOME": str(tmp_path)})
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200 and fake.requests[-1].credential == "env-key"


@pytest.mark.parametrize("body,headers,status,error_type,needle", [
    (b"{not json", {}, 400, "invalid_request_error", "not valid JSON"),
    (b"[1,2]", {}, 400, "invalid_request_error", "JSON object"),
    (b'{"max_tokens": 5}', {}, 400, "invalid_request_error", "model"),
    (b'{"model": 5}', {}, 400, "invalid_request_error", "model"),
    (b'{"model": "m"}', {b"content-type": [b"text/plain"]}, 400, "invalid_request_error", "content-type"),
    (b"\xff\xfe\x00", {}, 400, "invalid_request_error", "JSON"),
    # broken only where the proxy reads no field: the body is still checked whole
    (b'{"model": "m", "messages": [{"role": "user",}]}', {}, 400, "invalid_request_error", "not valid JSON"),
    (b'{"model": "m", "messages": "\xff"}', {}, 400, "invalid_request_error", "not UTF-8"),
    (b'{"model": "m"} {"model": "m"}', {}, 400, "invalid_request_error", "not valid JSON"),
    # JSON in other encodings than UTF-8, which Python's json would guess and read: refused, not
    # forwarded as it came to an API that reads UTF-8 only
    ('{"model": "m"}'.encode("utf-16"), {}, 400, "invalid_request_error", "not UTF-8"),
    ('{"model": "m"}'.encode("utf-16-be"), {}, 400, "invalid_request_error", "not valid JSON"),
    ('{"model": "m"}'.encode("utf-32-le"), {}, 400, "invalid_request_error", "not valid JSON"),
    (b'{"model": "m", "x": "\xed\xa0\x80"}', {}, 400, "invalid_request_error", "not UTF-8"),
    (b'{"model": "m", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "invalid_request_error", "JSON"),
])
@pytest_twisted.ensureDeferred
async def test_bad_input_gets_anthropic_error(fake, start_proxy, body, headers, status, error_type, needle):
    """Malformed, non-object, model-less or mistyped bodies get a typed error and never reach upstream."""
    proxy = start_proxy(accounts_config(fake, "one"))
    got, _, content = await post(proxy.url + "/v1/messages", body, headers)
    assert got == status
    kind, message = error_of(content)
    assert kind == error_type and needle in message
    assert fake.requests == []
    health, _, _ = await post(proxy.url + "/health", None, method=b"GET")
    assert health == 200


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(fake, start_proxy):
    """A body over server.maxBodyBytes is answered 413 request_too_large without reaching upstream."""
    proxy = start_proxy(accounts_config(fake, "one", server={"maxBodyBytes": 1000}))
    got, _, content = await post(proxy.url + "/v1/messages", b'{"model":"m","x":"' + b"a" * 5000 + b'"}')
    assert got == 413 and error_of(content)[0] == "request_too_large"
    assert fake.requests == []


@pytest.mark.parametrize("method,path,status,error_type", [
    (b"GET", "/v1/messages", 405, "invalid_request_error"),
    (b"DELETE", "/v1/models", 405, "invalid_request_error"),
    (b"POST", "/v1/nothing", 404, "not_found_error"),
    (b"GET", "/", 404, "not_found_error"),
    (b"POST", "/v1/messages/count_tokens/extra", 404, "not_found_error"),
])
@pytest_twisted.ensureDeferred
async def test_wrong_method_and_unknown_path(fake, start_proxy, method, path, status, error_type):
    """Wrong methods get 405 and unknown paths 404, both Anthropic-shaped."""
    proxy = start_proxy(accounts_config(fake, "one"))
    got, _, content = await post(proxy.url + path, b"{}", method=method)
    assert got == status and error_of(content)[0] == error_type


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_502_naming_it(start_proxy):
    """An upstream that refuses connections gets a 502 api_error naming it, no traceback."""
    from twisted.internet.protocol import Factory
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    address = port.getHost()
    await port.stopListening()
    url = f"http://127.0.0.1:{address.port}"
    proxy = start_proxy({"accounts": {"anthropic": [{"name": "a", "apiKey": "k", "baseUrl": url}]}})
    got, _, content = await post(proxy.url + "/v1/messages", request_body())
    kind, message = error_of(content)
    assert got == 502 and kind == "api_error"
    assert f"127.0.0.1:{address.port}" in message and "Traceback" not in message


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504(fake, start_proxy):
    """An upstream that sends no response within server.upstreamTimeout gets a 504 timeout_error."""
    proxy = start_proxy(accounts_config(fake, "one", server={"upstreamTimeout": 0.3}))
    fake.script(delay=5.0)
    got, _, content = await post(proxy.url + "/v1/messages", request_body())
    kind, message = error_of(content)
    assert got == 504 and kind == "timeout_error" and "0.3" in message


@pytest_twisted.ensureDeferred
async def test_paced_stream_is_not_buffered(fake, start_proxy):
    """Each paced event reaches the client before the upstream sends the next one."""
    proxy = start_proxy(accounts_config(fake, "one"))
    events = testing.text_stream(parts=["a", "b", "c", "d", "e"])
    fake.script(events=events, pace=0.15)
    _, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    assert await body.done
    sent = dict(fake.sent[-len(events):])
    arrived = [t for t, _ in body.events]
    assert len(arrived) == len(events)
    for k in range(len(events) - 1):
        assert arrived[k] < sent[k + 1], f"event {k} arrived only after event {k + 1} was sent"


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(fake, start_proxy):
    """A client that goes away mid-stream makes the proxy close the upstream stream too."""
    proxy = start_proxy(accounts_config(fake, "one"))
    fake.script(events=testing.text_stream(parts=["x"] * 200), pace=0.05)
    response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    await until(lambda: len(body.events) >= 3)
    assert fake.open_streams == 1
    body.transport.stopProducing()  # hang up
    await until(lambda: fake.open_streams == 0, timeout=5)
    assert len(fake.sent) < 200  # the upstream stopped sending long before the end


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_reused(fake, start_proxy):
    """Sequential requests reuse one persistent upstream connection."""
    proxy = start_proxy(accounts_config(fake, "one"))
    for _ in range(3):
        status, _, _ = await post(proxy.url + "/v1/messages", request_body())
        assert status == 200
    assert len({r.client_port for r in fake.requests}) == 1


@pytest_twisted.ensureDeferred
async def test_status_and_health_documents(fake, start_proxy):
    """/health has status, strategy and uptime; /status lists accounts without secrets and counts requests."""
    proxy = start_proxy(accounts_config(fake, "one", "two"))
    await post(proxy.url + "/v1/messages", request_body())
    _, _, health = await post(proxy.url + "/health", None, method=b"GET")
    assert set(json.loads(health)) >= {"status", "strategy", "uptime"}
    _, _, status = await post(proxy.url + "/status", None, method=b"GET")
    document = json.loads(status)
    assert [a["name"] for a in document["accounts"]] == ["one", "two"]
    assert document["counters"]["upstream_attempts"] == 1
    assert document["counters"]["completed_requests"] == 1
    assert "key-one" not in status.decode()


class _SlowReader(protocol.Protocol):
    """A raw HTTP client that sends one request, then stops reading until told to resume."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = 0
        self.data = []
        self.closed = defer.Deferred()

    def connectionMade(self):
        # a fixed small receive buffer (no autotuning up to tens of MB) so the stall shows quickly
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data):
        self.received += len(data)
        self.data.append(data)

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_upstream(fake, start_proxy):
    """A client that stops reading pauses the upstream read: the proxy holds a bounded amount, then resumes."""
    proxy = start_proxy(accounts_config(fake, "one"))
    big = "z" * 10_000
    events = testing.text_stream(parts=[big] * 1200)  # ~12 MB
    total = sum(len(encode_event(n, d)) for n, d in events)
    fake.script(events=events)
    body = request_body(stream=True)
    host, port = proxy.service.address()
    raw = (b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
           b"x-api-key: c\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)) + body
    client = _SlowReader(raw)
    await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, host, port), client)
    await until(lambda: proxy.dispatcher.streams)
    relay = next(iter(proxy.dispatcher.streams))
    # wait until the relay stalls (no progress across many polls)
    last, still = -1, 0
    while still < 15:
        await until(lambda: True)
        await task.deferLater(reactor, 0.02, lambda: None)
        still = still + 1 if relay.bytes_relayed == last else 0
        last = relay.bytes_relayed
    # what was read from upstream is bounded by the kernel's socket buffers plus the proxy's own
    # 64 KiB write buffer, far below the stream's size
    assert relay.bytes_relayed < total // 2, "the upstream was read although the client was not"
    client.transport.resumeProducing()
    await client.closed
    received = _dechunk(b"".join(client.data))
    assert received.count(b"event: content_block_delta") == 1200
    assert b"event: message_stop" in received


def _dechunk(raw: bytes) -> bytes:
    """The body of a raw chunked HTTP/1.1 response."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(body)


@pytest_twisted.ensureDeferred
async def test_json_that_only_the_strict_parser_refuses_still_passes(fake, start_proxy):
    """Valid JSON with a lone surrogate escape or a huge integer is forwarded unchanged."""
    proxy = start_proxy(accounts_config(fake, "one"))
    body = b'{"model":"claude-sonnet-4-5","max_tokens":10,"n":123456789012345678901234567890,' \
           b'"messages":[{"role":"user","content":"half an emoji \\ud83d"}]}'
    status, _, _ = await post(proxy.url + "/v1/messages", body)
    assert status == 200 and fake.requests[-1].body == body
