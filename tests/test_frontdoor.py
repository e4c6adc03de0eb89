"""The OpenAI front door: request parsing, the response adapter and the dual-shape /v1/models."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from clproxy.testing import anthropic as testing
from clproxy.errors import ProxyError, error_event
from clproxy.http.openai import ModelsListing, OpenAIResponseAdapter, chat_node
from clproxy.routing.router import Router
from clproxy.proxy.sse import KEEPALIVE, encode_event
from helpers import post
from translation_fixtures import RecordingOut, load

NOW = lambda: 1700000000.0  # noqa: E731


def adapter(stream=False, include_usage=False):
    out = RecordingOut()
    return OpenAIResponseAdapter(out, "claude-sonnet-4-5", stream, include_usage, now=NOW), out


def sse_bytes(events):
    return b"".join(encode_event(name, data) for name, data in events)


def chunks_of(body: bytes):
    """The parsed ``data:`` payloads of an OpenAI stream (``[DONE]`` kept as the string)."""
    out = []
    for frame in body.split(b"\n\n"):
        if frame.startswith(b"data: "):
            text = frame[6:].decode()
            out.append(text if text == "[DONE]" else json.loads(text))
    return out


# -- the adapter -------------------------------------------------------------------------------

def test_claude_message_becomes_chat_completion():
    """A whole Claude message is answered as a chat.completion with usage, keeping x-clproxy headers."""
    a, out = adapter()
    message = testing.message("Hi there.", model="claude-sonnet-4-5")
    a.send(200, [(b"content-type", [b"application/json"]), (b"x-clproxy-provider", [b"openai"]),
                 (b"anthropic-organization-id", [b"org"])], json.dumps(message).encode())
    completion = out.json()
    assert out.status == 200 and completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": "Hi there."}
    assert completion["choices"][0]["finish_reason"] == "stop" and completion["created"] == 1700000000
    assert completion["usage"]["prompt_tokens"] == 12 and completion["usage"]["completion_tokens"] == 7
    assert out.header(b"x-clproxy-provider") == b"openai"
    assert out.header(b"anthropic-organization-id") is None


def test_claude_stream_split_anywhere_becomes_chunks_with_usage_and_done():
    """Claude SSE bytes split at arbitrary points become chat.completion.chunk frames, usage, then [DONE]."""
    a, out = adapter(stream=True, include_usage=True)
    a.start(200, [(b"content-type", [b"text/event-stream"]), (b"request-id", [b"req_1"])])
    data = sse_bytes(testing.text_stream(parts=["Hel", "lo"]))
    for i in range(0, len(data), 7):
        a.write(data[i:i + 7])
    a.finish()
    chunks = chunks_of(out.body)
    assert chunks[-1] == "[DONE]" and out.finished
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert text == "Hello"
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
    assert finish[-1] == "stop"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert all(c["id"] == chunks[0]["id"] and c["id"].startswith("chatcmpl-") for c in chunks[:-1])
    assert out.header(b"content-type").startswith(b"text/event-stream")
    assert out.header(b"request-id") == b"req_1"


def test_tool_use_stream_becomes_tool_calls():
    """A streamed tool_use block becomes tool_calls deltas with the id, the name and the arguments."""
    a, out = adapter(stream=True)
    a.start(200, [])
    a.write(sse_bytes(testing.tool_use_stream(arguments='{"city": "Paris"}')))
    a.finish()
    chunks = [c for c in chunks_of(out.body) if c != "[DONE]"]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "toolu_fake01" and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" not in chunks[-1]


def test_keepalive_and_ping_pass_through_as_comments():
    """Keep-alive comments and Claude pings reach the OpenAI client as SSE comments."""
    a, out = adapter(stream=True)
    a.start(200, [])
    a.write(KEEPALIVE)
    a.write(encode_event("ping", {"type": "ping"}))
    assert out.writes == [KEEPALIVE, KEEPALIVE]


def test_error_event_mid_stream_becomes_error_chunk_without_done():
    """An Anthropic event: error mid-stream becomes an OpenAI error chunk; no [DONE] pretends success."""
    a, out = adapter(stream=True)
    a.start(200, [])
    a.write(sse_bytes(testing.text_stream()[:4]))
    a.write(error_event("upstream broke off", "api_error"))
    a.finish()
    chunks = chunks_of(out.body)
    assert chunks[-1] == {"error": {"message": "upstream broke off", "type": "api_error", "code": None}}
    assert "[DONE]" not in chunks


def test_stream_ending_without_stop_gets_an_error_chunk():
    """A stream finished without message_stop or error is reported, not ended silently."""
    a, out = adapter(stream=True)
    a.start(200, [])
    a.write(sse_bytes(testing.text_stream()[:3]))
    a.finish()
    assert chunks_of(out.body)[-1]["error"]["type"] == "api_error"


def test_anthropic_error_becomes_openai_error_with_status_and_retry_after():
    """An Anthropic 429 is answered 429 with OpenAI's error shape and the Retry-After kept."""
    a, out = adapter()
    a.send(429, [(b"retry-after", [b"25"]), (b"content-type", [b"application/json"])],
           testing.error_json(429, "rate_limit_error", "all accounts cooling"))
    assert out.status == 429 and out.header(b"retry-after") == b"25"
    assert out.json() == {"error": {"message": "all accounts cooling", "type": "rate_limit_error",
                                    "param": None, "code": None}}


def test_non_json_upstream_error_body_is_summarised():
    """An HTML error page is not forwarded as the message."""
    a, out = adapter()
    a.send(500, [], b"<html>oops</html>")
    assert out.status == 500 and out.json()["error"]["message"] == "upstream error"


def test_send_error_before_and_after_commit():
    """A proxy error is OpenAI JSON before commit and an error chunk after it."""
    a, out = adapter()
    a.send_error(ProxyError(429, "exhausted", "rate_limit_error", headers=[(b"retry-after", b"9")]))
    assert out.status == 429 and out.header(b"retry-after") == b"9"
    assert out.json()["error"]["type"] == "rate_limit_error"
    a, out = adapter(stream=True)
    a.start(200, [])
    a.send_error(ProxyError(502, "gone"))
    assert chunks_of(out.body) == [{"error": {"message": "gone", "type": "api_error", "param": None,
                                              "code": None}}]
    assert out.finished


def test_whole_answer_to_a_stream_request_is_streamed():
    """A stream request answered with a whole Claude message still gets chunks and [DONE]."""
    a, out = adapter(stream=True)
    a.send(200, [], json.dumps(testing.message("whole")).encode())
    chunks = chunks_of(out.body)
    assert chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == "whole"


# -- the resources, through a real loopback port -----------------------------------------------

class StubDispatcher:
    """Records forwarded requests and answers each with ``answer(request, out)``."""

    def __init__(self, answer=None):
        self.requests = []
        self.answer = answer or (lambda request, out: out.send(
            200, [(b"content-type", [b"application/json"])],
            json.dumps(testing.message("stubbed")).encode()))

    async def forward(self, request, out):
        self.requests.append(request)
        self.answer(request, out)


class AnthropicModels(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b'{"anthropic":true}'


@pytest.fixture
def serve():
    ports = []

    def start(dispatcher, router=None):
        v1 = resource.Resource()
        v1.putChild(b"models", ModelsListing(dispatcher, router, AnthropicModels()))
        v1.putChild(b"chat", chat_node(dispatcher))
        root = resource.Resource()
        root.putChild(b"v1", v1)
        port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


OPENAI_HEADERS = {b"authorization": [b"Bearer sk-client"], b"anthropic-version": [],
                  b"x-api-key": [], b"openai-organization": [b"org-x"], b"x-app": [b"cursor"]}


def openai_body(**extra):
    doc = {"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    doc.update(extra)
    return json.dumps(doc).encode()


async def chat(url, body, headers=None):
    merged = dict(OPENAI_HEADERS)
    merged.update(headers or {})
    merged = {k: v for k, v in merged.items() if v}
    return await post(url + "/v1/chat/completions", body, merged)


@pytest_twisted.ensureDeferred
async def test_chat_request_is_forwarded_as_claude_messages(serve):
    """The dispatcher gets a Claude /v1/messages request: translated body, client headers minus credentials."""
    dispatcher = StubDispatcher()
    url = serve(dispatcher)
    status, headers, body = await chat(url, openai_body(stream=False, max_tokens=100))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "stubbed"
    request = dispatcher.requests[0]
    assert (request.method, request.path, request.query) == (b"POST", b"/v1/messages", b"")
    assert request.model == "claude-sonnet-4-5" and request.stream is False
    claude = json.loads(request.body)
    assert claude["system"] == "Be brief." and claude["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert claude["max_tokens"] == 100
    names = {name.lower(): value for name, value in request.headers}
    assert b"authorization" not in names and b"content-length" not in names
    assert b"openai-organization" not in names and names[b"x-app"] == b"cursor"
    assert names[b"anthropic-version"] == b"2023-06-01"


@pytest_twisted.ensureDeferred
async def test_chat_stream_flag_and_include_usage_reach_the_adapter(serve):
    """stream and stream_options.include_usage shape the answer: chunks, usage chunk, [DONE]."""
    def answer(request, out):
        out.start(200, [(b"content-type", [b"text/event-stream"])])
        out.write(sse_bytes(testing.text_stream(parts=["a", "b"])))
        out.finish()

    dispatcher = StubDispatcher(answer)
    url = serve(dispatcher)
    status, headers, body = await chat(url, openai_body(stream=True, stream_options={"include_usage": True}))
    assert status == 200 and dispatcher.requests[0].stream is True
    chunks = chunks_of(body)
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"]["total_tokens"] == 14


BAD_REQUESTS = {
    "not-json": (b"{nope", {}, 400, None),
    "array": (b"[]", {}, 400, None),
    "too-deep": (b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, None),
    "no-model": (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), {}, 400, "model"),
    "no-messages": (json.dumps({"model": "m"}).encode(), {}, 400, "messages"),
    "n-2": (openai_body(n=2), {}, 400, "n"),
    "bad-part": (openai_body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), {}, 400,
                 "messages.0.content.0"),
    "content-type": (openai_body(), {b"content-type": [b"text/plain"]}, 400, None),
    # other encodings than UTF-8, which Python's json would guess and read
    "utf-16": (openai_body().decode().encode("utf-16"), {}, 400, None),
    "utf-32": (openai_body().decode().encode("utf-32-le"), {}, 400, None),
    "surrogate-bytes": (openai_body().replace(b'"m', b'"\xed\xa0\x80m', 1), {}, 400, None),
}


@pytest.mark.parametrize("body,headers,status,param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
@pytest_twisted.ensureDeferred
async def test_bad_chat_requests_get_openai_errors(serve, body, headers, status, param):
    """Malformed or untranslatable requests get OpenAI-shaped 400s (with param) and reach no account."""
    dispatcher = StubDispatcher()
    url = serve(dispatcher)
    code, _, answer = await chat(url, body, headers)
    error = json.loads(answer)["error"]
    assert code == status and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert dispatcher.requests == []


@pytest_twisted.ensureDeferred
async def test_chat_wrong_method_and_unknown_path(serve):
    """GET on /v1/chat/completions is 405; an unknown path under /v1/chat is an OpenAI-shaped 404."""
    url = serve(StubDispatcher())
    status, headers, body = await post(url + "/v1/chat/completions", None, method=b"GET")
    assert status == 405 and headers.getRawHeaders(b"allow") == [b"POST"]
    assert "error" in json.loads(body)
    status, _, body = await post(url + "/v1/chat/other", None, method=b"GET")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


UPSTREAM_MODELS = {"data": [{"type": "model", "id": "claude-sonnet-4-5", "created_at": "2025-09-29T00:00:00Z"},
                            {"type": "model", "id": "claude-opus-4-1", "created_at": "2025-08-05T00:00:00Z"}]}


def routing():
    return Router.from_config(load({"routing": {
        "model-mappings": [{"from": "claude-haiku-x", "to": "gpt-4o", "provider": "openai"},
                           {"from": "claude-*", "to": "gemini-2.5-pro", "provider": "google-ai"}],
        "passthrough-models": ["claude-sonnet-4-5"],
        "fallback-chain": [{"provider": "google-ai", "model": "gemini-2.5-flash"},
                           {"provider": "openai", "model": "gpt-4o"}]}}).routing)


@pytest_twisted.ensureDeferred
async def test_models_openai_shape_from_upstream_and_config(serve):
    """Without anthropic-version, /v1/models is OpenAI's list: Anthropic's models, then requestable config names."""
    def answer(request, out):
        out.send(200, [(b"content-type", [b"application/json"])], json.dumps(UPSTREAM_MODELS).encode())

    dispatcher = StubDispatcher(answer)
    url = serve(dispatcher, routing())
    status, _, body = await post(url + "/v1/models", None, {b"anthropic-version": [], b"x-api-key": []},
                                 method=b"GET")
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == [
        ("claude-sonnet-4-5", "anthropic"), ("claude-opus-4-1", "anthropic"),
        ("claude-haiku-x", "openai"), ("gemini-2.5-flash", "google-ai")]
    assert listing["data"][0] == {"id": "claude-sonnet-4-5", "object": "model", "created": 1759104000,
                                  "owned_by": "anthropic"}
    assert dispatcher.requests[0].path == b"/v1/models"
    status, _, body = await post(url + "/v1/models/claude-haiku-x", None,
                                 {b"anthropic-version": [], b"x-api-key": []}, method=b"GET")
    assert status == 200 and json.loads(body)["owned_by"] == "openai"
    status, _, body = await post(url + "/v1/models/nope", None, {b"anthropic-version": [], b"x-api-key": []},
                                 method=b"GET")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


@pytest_twisted.ensureDeferred
async def test_models_with_anthropic_version_go_to_the_passthrough(serve):
    """A request carrying anthropic-version is served by the Anthropic models resource, untouched."""
    dispatcher = StubDispatcher()
    url = serve(dispatcher, routing())
    status, _, body = await post(url + "/v1/models", None, method=b"GET")
    assert status == 200 and body == b'{"anthropic":true}' and dispatcher.requests == []


@pytest_twisted.ensureDeferred
async def test_models_upstream_failure_without_config_names_is_an_openai_error(serve):
    """With no account able to list and nothing configured, the upstream's status comes back, OpenAI-shaped."""
    def answer(request, out):
        out.send_error(ProxyError(429, "all accounts cooling", "rate_limit_error",
                                  headers=[(b"retry-after", b"12")]))

    url = serve(StubDispatcher(answer), Router())
    status, headers, body = await post(url + "/v1/models", None, {b"anthropic-version": [], b"x-api-key": []},
                                       method=b"GET")
    assert status == 429 and headers.getRawHeaders(b"retry-after") == [b"12"]
    assert json.loads(body)["error"] == {"message": "all accounts cooling", "type": "rate_limit_error",
                                         "param": None, "code": None}

