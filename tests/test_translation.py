"""Translation.answer and the fallback hook against fake providers: streams, keep-alives, failures, headers."""

import json
import re

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from clproxy.testing import providers as fp
from clproxy.errors import ProxyError
from clproxy.routing.router import Target
from clproxy.proxy.sse import KEEPALIVE
from clproxy.state.memory import MemoryStateStore
from clproxy.providers.translation import Translation
from helpers import until
from translation_fixtures import (RecordingOut, claude_request, fake_gemini, fake_openai,  # noqa: F401
                                  load, providers_config, upstream)

OPENAI = Target("openai", "gpt-4o")
GEMINI = Target("google-ai", "gemini-2.5-flash")
EXHAUSTED = ProxyError(429, "all 2 accounts are unavailable", "rate_limit_error")


def translation(upstream, clock=reactor, store=None, **kwargs):
    keys = {k: kwargs.pop(k) for k in ("openai_key", "gemini_key", "fake_openai", "fake_gemini") if k in kwargs}
    providers = load({"providers": providers_config(**keys)}).providers
    return Translation(clock=clock, upstream=upstream, providers=providers, store=store, **kwargs)


def text_of(message):
    return "".join(b.get("text", "") for b in message["content"] if b["type"] == "text")


def streamed_text(events):
    return "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")


# -- answers ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_openai_whole_answer_is_a_claude_message_with_model_headers(upstream, fake_openai):
    """A non-streaming request answered by OpenAI is one Claude message naming the model that answered."""
    store = MemoryStateStore()
    t = translation(upstream, fake_openai=fake_openai, store=store)
    out = RecordingOut()
    assert await t.answer(claude_request(), out, OPENAI, final=True) is True
    message = out.json()
    assert out.status == 200 and message["type"] == "message" and message["role"] == "assistant"
    assert text_of(message) == "Hello from fake OpenAI." and message["stop_reason"] == "end_turn"
    assert message["model"] == "gpt-4o-2024-08-06"
    assert out.header(b"x-clproxy-provider") == b"openai"
    assert out.header(b"x-clproxy-actual-model") == b"gpt-4o-2024-08-06"
    assert out.header(b"content-type") == b"application/json"
    assert (await store.counters())["model_substitutions"] == 1


@pytest_twisted.ensureDeferred
async def test_openai_stream_is_a_complete_claude_event_stream(upstream, fake_openai):
    """A streamed OpenAI answer becomes the exact Claude event sequence, usage included."""
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    assert await t.answer(claude_request(stream=True), out, OPENAI, final=False) is True
    events = out.events()
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 1
    assert streamed_text(events) == "Hello from fake OpenAI."
    assert events[-2][1]["usage"]["output_tokens"] == 9 and events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert out.status == 200 and out.header(b"content-type").startswith(b"text/event-stream")
    assert out.header(b"x-clproxy-actual-model") == b"gpt-4o-2024-08-06" and out.finished


@pytest_twisted.ensureDeferred
async def test_gemini_stream_and_whole_answer(upstream, fake_gemini):
    """Gemini answers both shapes; the model is Gemini's modelVersion; same model asked: no substitution."""
    store = MemoryStateStore()
    t = translation(upstream, fake_gemini=fake_gemini, store=store)
    streamed, whole = RecordingOut(), RecordingOut()
    request = claude_request(stream=True, model="gemini-2.5-flash")
    assert await t.answer(request, streamed, GEMINI, final=True)
    assert await t.answer(claude_request(model="gemini-2.5-flash"), whole, GEMINI, final=True)
    assert streamed_text(streamed.events()) == "Hello from fake Gemini."
    assert streamed.events()[0][1]["message"]["model"] == "gemini-2.5-flash"
    assert text_of(whole.json()) == "Hello from fake Gemini."
    assert whole.header(b"x-clproxy-provider") == b"google-ai"
    assert "model_substitutions" not in await store.counters()


@pytest_twisted.ensureDeferred
async def test_gemini_tool_call_becomes_tool_use(upstream, fake_gemini):
    """A Gemini functionCall is streamed as a tool_use block with its input and stop_reason tool_use."""
    fake_gemini.script(chunks=fp.gemini_tool_chunks(args={"city": "Paris"}))
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    t = translation(upstream, fake_gemini=fake_gemini)
    out = RecordingOut()
    await t.answer(claude_request(stream=True, tools=tools), out, GEMINI, final=True)
    events = out.events()
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["name"] == "get_weather"
    args = "".join(d["delta"]["partial_json"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(args) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    sent = fake_gemini.bodies()[-1]
    assert sent["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"


@pytest_twisted.ensureDeferred
async def test_openai_stream_tool_call_round_trip_body(upstream, fake_openai):
    """An OpenAI tool call streams as tool_use; its tool_result goes back as a tool message with the same id."""
    fake_openai.script(chunks=fp.openai_tool_chunks(call_id="call_abc"), times=1)
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}]
    await t.answer(claude_request(stream=True, tools=tools), out, OPENAI, final=True)
    tool = next(d["content_block"] for n, d in out.events()
                if n == "content_block_start" and d["content_block"]["type"] == "tool_use")
    assert tool["id"] == "call_abc"
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": [dict(tool, input={"city": "Paris"})]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool["id"], "content": "sunny"}]}]
    second = RecordingOut()
    await t.answer(claude_request(stream=True, tools=tools, messages=history), second, OPENAI, final=True)
    sent = fake_openai.bodies()[-1]["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}
    assert streamed_text(second.events()) == "Hello from fake OpenAI."


# -- keep-alives and timeouts ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_keepalive_every_interval_of_silence_after_commit(upstream, fake_gemini):
    """After commit, each 15 s without a write gets one `: keep-alive`; none after the stream ends."""
    clock = task.Clock()
    fake_gemini.script(chunks=fp.gemini_text_chunks(parts=["one", " two"]), hold_after=1)
    t = translation(upstream, clock=clock, fake_gemini=fake_gemini)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(stream=True), out, GEMINI, final=False))
    await until(lambda: out.started)
    assert KEEPALIVE not in out.writes
    clock.advance(14.9)
    assert out.writes.count(KEEPALIVE) == 0
    clock.advance(0.1)
    assert out.writes.count(KEEPALIVE) == 1 and out.writes[-1] == KEEPALIVE
    clock.advance(14)
    assert out.writes.count(KEEPALIVE) == 1
    clock.advance(1)
    assert out.writes.count(KEEPALIVE) == 2
    fake_gemini.release()
    await until(lambda: answering.called)
    assert await answering is True
    clock.advance(60)
    assert out.writes.count(KEEPALIVE) == 2
    assert streamed_text(out.events()) == "one two" and out.events()[-1][0] == "message_stop"
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_no_keepalive_before_commit(upstream, fake_openai):
    """Before anything is committed, silence writes nothing (the status line is not sent yet)."""
    clock = task.Clock()
    # only the role chunk: nothing to commit yet
    fake_openai.script(chunks=fp.openai_text_chunks(), hold_after=1)
    t = translation(upstream, clock=clock, fake_openai=fake_openai)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(stream=True), out, OPENAI, final=False))
    await until(lambda: fake_openai.requests and fake_openai._held)
    await task.deferLater(reactor, 0.05, lambda: None)
    clock.advance(30)
    assert out.writes == [] and not out.started
    fake_openai.release()
    await until(lambda: answering.called)
    assert await answering is True
    assert streamed_text(out.events()) == "Hello from fake OpenAI."


@pytest.mark.parametrize("final", [True, False])
@pytest_twisted.ensureDeferred
async def test_silence_before_content_is_a_504_timeout(upstream, fake_openai, final):
    """A provider that opens its stream (the role chunk) and then goes silent for upstreamTimeout,
    before any content: 504 timeout_error for a mapped model, as for one that never answers (it
    was a 502 api_error), and the next fallback for the chain."""
    clock = task.Clock()
    fake_openai.script(chunks=fp.openai_text_chunks(), hold_after=1)
    t = translation(upstream, clock=clock, fake_openai=fake_openai, upstream_timeout=100)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(stream=True), out, OPENAI, final=final))
    await until(lambda: t.streams)
    clock.advance(99)
    assert not answering.called
    clock.advance(1)
    assert await answering is final
    if final:
        assert out.status == 504 and out.json()["error"]["type"] == "timeout_error"
        assert "went silent for 100s" in out.json()["error"]["message"]
    else:
        assert out.writes == [] and not out.started
    fake_openai.release()


@pytest_twisted.ensureDeferred
async def test_silence_mid_stream_ends_in_error_event(upstream, fake_gemini):
    """A provider silent for upstreamTimeout after commit is abandoned with an Anthropic event: error."""
    clock = task.Clock()
    fake_gemini.script(chunks=fp.gemini_text_chunks(parts=["one", " two"]), hold_after=1)
    t = translation(upstream, clock=clock, fake_gemini=fake_gemini, upstream_timeout=100,
                    keepalive_interval=15)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(stream=True), out, GEMINI, final=False))
    await until(lambda: out.started)
    clock.pump([1] * 99)
    assert not answering.called and out.writes.count(KEEPALIVE) == 6
    clock.advance(1)
    assert await answering is True
    name, data = out.events()[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "went silent for 100s" in data["error"]["message"]
    assert out.writes.count(KEEPALIVE) == 6 and out.finished
    await until(lambda: fake_gemini.unfinished == 1)  # the provider's connection was closed


# -- failures ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mid_stream_cut_becomes_error_event(upstream, fake_openai):
    """A provider connection cut after commit ends the client's stream with event: error, never silently."""
    fake_openai.script(chunks=fp.openai_text_chunks(parts=["a", "b", "c", "d"]), cut_after=3)
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    assert await t.answer(claude_request(stream=True), out, OPENAI, final=False) is True
    events = out.events()
    assert streamed_text(events) == "ab"
    assert events[-1][0] == "error" and "message_stop" not in [n for n, _ in events]
    assert "openai broke off the stream" in events[-1][1]["error"]["message"]
    assert out.finished


@pytest_twisted.ensureDeferred
async def test_cut_after_finish_reason_before_usage_is_an_error_event(upstream, fake_openai):
    """A connection cut after OpenAI's finish_reason chunk, before its usage chunk and [DONE], ends
    with event: error: the answer looked complete but its usage (0/0) would have been made up."""
    fake_openai.script(chunks=fp.openai_text_chunks(parts=["a", "b"]), cut_after=4)  # role, a, b, finish
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    assert await t.answer(claude_request(stream=True), out, OPENAI, final=False) is True
    events = out.events()
    assert streamed_text(events) == "ab" and out.finished
    assert events[-1][0] == "error" and "message_stop" not in [n for n, _ in events]


@pytest_twisted.ensureDeferred
async def test_error_chunk_mid_stream_becomes_error_event(upstream, fake_gemini):
    """An error chunk after commit becomes the stream's event: error with the provider's message."""
    chunks = fp.gemini_text_chunks(parts=["one", " two"])[:1] + [{"error": {"code": 500, "message": "boom"}}]
    fake_gemini.script(chunks=chunks)
    t = translation(upstream, fake_gemini=fake_gemini)
    out = RecordingOut()
    await t.answer(claude_request(stream=True), out, GEMINI, final=False)
    assert [n for n, _ in out.events()][-1] == "error" and out.events()[-1][1]["error"]["message"] == "boom"


PRE_COMMIT_FAILURES = {
    "status-500": dict(status=500, body=fp.openai_error(500, "server had an error", "server_error")),
    "status-429": dict(status=429, body=fp.openai_error(429, "slow down", "requests")),
    "reset": dict(reset=True),
    "empty-stream": dict(end_before_first=True),
    "cut-before-content": dict(cut_after=1),
    "error-chunk-first": dict(chunks=[{"error": {"message": "overloaded", "type": "server_error"}}]),
    "not-json": dict(chunks=[b"data: {nope\n\n"]),
}


@pytest.mark.parametrize("script", PRE_COMMIT_FAILURES.values(), ids=PRE_COMMIT_FAILURES.keys())
@pytest_twisted.ensureDeferred
async def test_fallback_failure_before_commit_writes_nothing(upstream, fake_openai, script):
    """With final=False, a provider failing before anything was written returns False and writes nothing."""
    fake_openai.script(**script)
    store = MemoryStateStore()
    t = translation(upstream, fake_openai=fake_openai, store=store)
    out = RecordingOut()
    assert await t.answer(claude_request(stream=True), out, OPENAI, final=False) is False
    assert out.writes == [] and not out.started and not out.finished
    assert len(fake_openai.requests) == 1
    assert "model_substitutions" not in await store.counters()


@pytest_twisted.ensureDeferred
async def test_untranslatable_or_keyless_fallback_sends_nothing(upstream, fake_openai):
    """A request OpenAI cannot take, or a provider without key, is skipped without a provider request."""
    t = translation(upstream, fake_openai=fake_openai)
    server_tool = claude_request(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    out = RecordingOut()
    assert await t.answer(server_tool, out, OPENAI, final=False) is False
    keyless = translation(upstream, fake_openai=fake_openai, openai_key=None)
    assert await keyless.answer(claude_request(), out, OPENAI, final=False) is False
    assert out.writes == [] and fake_openai.requests == []


FINAL_ERRORS = {
    "translation-400": (dict(), dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
                        400, "invalid_request_error", "web_search_20250305", None),
    "provider-404": (dict(status=404, body=fp.openai_error(404, "The model `gpt-9` does not exist")), {},
                     404, "not_found_error", "The model `gpt-9` does not exist", None),
    "provider-429": (dict(status=429, headers={"retry-after": "17"}, body=fp.openai_error(429, "Rate limit")),
                     {}, 429, "rate_limit_error", "Rate limit", b"17"),
    "provider-500": (dict(status=500, body=fp.openai_error(500, "oops", "server_error")), {},
                     502, "api_error", "openai answered 500: oops", None),
    "provider-401": (dict(status=401, body=fp.openai_error(401, "Incorrect API key")), {},
                     502, "api_error", "providers.openai.apiKey", None),
    "reset": (dict(reset=True), {}, 502, "api_error", "openai", None),
    "empty-stream": (dict(end_before_first=True), {}, 502, "api_error", "without sending anything", None),
}


@pytest.mark.parametrize("script,extra,status,error_type,text,retry_after", FINAL_ERRORS.values(),
                         ids=FINAL_ERRORS.keys())
@pytest_twisted.ensureDeferred
async def test_final_failure_is_an_anthropic_error(upstream, fake_openai, script, extra, status, error_type,
                                                   text, retry_after):
    """With final=True every provider failure is an Anthropic-shaped error with a truthful status."""
    if script:
        fake_openai.script(**script)
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    assert await t.answer(claude_request(stream=True, **extra), out, OPENAI, final=True) is True
    body = out.json()
    assert out.status == status and body["type"] == "error"
    assert body["error"]["type"] == error_type and text in body["error"]["message"]
    assert out.header(b"retry-after") == retry_after


@pytest_twisted.ensureDeferred
async def test_final_without_key_is_a_500_naming_the_setting(upstream):
    """A mapped provider with no API key is answered 500 api_error naming providers.X.apiKey."""
    t = translation(upstream, gemini_key=None)
    out = RecordingOut()
    await t.answer(claude_request(), out, GEMINI, final=True)
    assert out.status == 500 and "providers.google-ai.apiKey" in out.json()["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_gemini_429_retry_delay_reaches_the_client(upstream, fake_gemini):
    """Gemini's retryDelay is the Retry-After of the 429 a mapped model's client gets."""
    fake_gemini.script(status=429, body=fp.gemini_error(429, "Quota exceeded", "RESOURCE_EXHAUSTED", "41s"))
    t = translation(upstream, fake_gemini=fake_gemini)
    out = RecordingOut()
    await t.answer(claude_request(), out, GEMINI, final=True)
    assert out.status == 429 and out.header(b"retry-after") == b"41"


class _Staller(protocol.Protocol):
    """A provider that answers with its status, its headers and the start of a body, then nothing."""

    def connectionMade(self):
        self.received, self.answered = b"", False
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.received += data
        head, sep, body = self.received.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if sep and not self.answered and len(body) >= int(length.group(1) if length else 0):
            self.answered = True
            self.transport.write(b"HTTP/1.1 %d Whatever\r\ncontent-type: application/json\r\n"
                                 b"content-length: 500\r\n\r\n{\"partial\":" % self.factory.status)

    def connectionLost(self, reason=protocol.connectionDone):
        self.factory.lost += 1


@pytest.fixture
def staller():
    """A loopback provider (``url``, ``status`` to answer) whose body stalls after its headers."""
    factory = protocol.Factory.forProtocol(_Staller)
    factory.connections, factory.lost, factory.status = [], 0, 200
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.url = f"http://127.0.0.1:{port.getHost().port}"
    yield factory
    for connection in factory.connections:
        connection.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())


@pytest.mark.parametrize("status", [200, 429])
@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_after_the_headers_is_a_504_after_upstream_timeout(upstream, staller, status):
    """A whole answer (200) or an error body (429) that stops coming after the headers is given up
    after upstreamTimeout seconds without a byte: 504 timeout_error for a mapped model (a fallback
    moves on), and the provider connection is closed.

    Before the fix upstreamTimeout covered only the headers: the request hung for ever."""
    staller.status = status
    clock = task.Clock()
    t = translation(upstream, clock=clock, fake_openai=staller, upstream_timeout=100)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(), out, OPENAI, final=True))
    # the header timer is gone and the idle sweeper watches the body: the headers are in
    await until(lambda: [c.func.__name__ for c in clock.getDelayedCalls()] == ["_sweep"])
    clock.pump([1] * 99)  # second by second, as time passes: the sweeper looks every 25 s
    assert not answering.called
    clock.pump([1] * 26)  # the sweeper's bound: between the timeout and a quarter more
    assert await answering is True
    assert out.status == 504 and out.json()["error"]["type"] == "timeout_error"
    assert "openai" in out.json()["error"]["message"] and "100s" in out.json()["error"]["message"]
    await until(lambda: staller.lost == 1)
    staller.status = 200
    again = defer.ensureDeferred(t.answer(claude_request(), RecordingOut(), OPENAI, final=False))
    await until(lambda: [c.func.__name__ for c in clock.getDelayedCalls()] == ["_sweep"])
    clock.pump([1] * 125)
    assert await again is False  # the fallback chain moves on


GEMINI_BAD_KEY = json.dumps({"error": {
    "code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com"}]}}).encode()


@pytest_twisted.ensureDeferred
async def test_gemini_refusing_the_key_with_a_400_is_a_502_naming_the_setting(upstream, fake_gemini):
    """Gemini refuses a bad key with 400 INVALID_ARGUMENT and ErrorInfo reason API_KEY_INVALID: the
    client gets the 502 naming providers.google-ai.apiKey that a 401/403 gets, not a 400 saying its
    own request is invalid. Another 400 stays a 400."""
    fake_gemini.script(status=400, body=GEMINI_BAD_KEY, times=1)
    t = translation(upstream, fake_gemini=fake_gemini)
    out = RecordingOut()
    await t.answer(claude_request(), out, GEMINI, final=True)
    assert out.status == 502 and out.json()["error"]["type"] == "api_error"
    assert "providers.google-ai.apiKey" in out.json()["error"]["message"]
    fake_gemini.script(status=400, body=fp.gemini_error(400, "Invalid value at 'contents'"))
    other = RecordingOut()
    await t.answer(claude_request(), other, GEMINI, final=True)
    assert other.status == 400 and other.json()["error"]["type"] == "invalid_request_error"


@pytest_twisted.ensureDeferred
async def test_a_provider_message_echoing_the_key_reaches_neither_client_nor_log(upstream, fake_openai,
                                                                                 fake_gemini, logs):
    """Providers echo what they were sent ("Incorrect API key provided: ..."): clproxy's key and any
    Bearer value are taken out of their messages, in an error answer and in a stream's error chunk,
    before the client or the log sees them.

    Before the fix the 401's message reached the client's 502 and the log verbatim."""
    fake_openai.script(status=401, body=fp.openai_error(
        401, "Incorrect API key provided: sk-openai-test. Header: Bearer sk-openai-test", code="invalid_api_key"))
    chunks = fp.gemini_text_chunks(parts=["one", " two"])[:1] + [{"error": {"message": "key gemini-test-key?"}}]
    fake_gemini.script(chunks=chunks)
    t = translation(upstream, fake_openai=fake_openai, fake_gemini=fake_gemini)
    whole, streamed = RecordingOut(), RecordingOut()
    await t.answer(claude_request(), whole, OPENAI, final=True)
    await t.answer(claude_request(stream=True), streamed, GEMINI, final=True)
    assert whole.status == 502 and "Incorrect API key provided: [REDACTED]" in whole.json()["error"]["message"]
    assert streamed.events()[-1][1]["error"]["message"] == "key [REDACTED]?"
    for key in (b"sk-openai-test", b"gemini-test-key"):
        assert key not in whole.body and key not in streamed.body
        assert not [line for line in logs if key.decode() in line]
    assert any("Incorrect API key" in line for line in logs)  # the failure is logged, without the key


# -- client disconnects ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_disconnect_mid_stream_closes_the_provider_stream(upstream, fake_gemini):
    """A client that goes away mid-stream cancels the provider request (its stream is closed)."""
    fake_gemini.script(chunks=fp.gemini_text_chunks(parts=["one", " two"]), hold_after=1)
    t = translation(upstream, fake_gemini=fake_gemini)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(stream=True), out, GEMINI, final=False))
    await until(lambda: out.started)
    assert fake_gemini.open_streams == 1
    out.disconnect()
    await until(lambda: answering.called)
    assert await answering is True
    await until(lambda: fake_gemini.unfinished == 1)
    assert not t.streams and out.writes.count(b"event: message_stop") == 0


@pytest_twisted.ensureDeferred
async def test_disconnect_while_waiting_for_the_provider_cancels_it(upstream, fake_openai):
    """A client gone before the provider answered: the request is cancelled, True is returned, nothing written."""
    fake_openai.script(delay=5)
    t = translation(upstream, fake_openai=fake_openai)
    out = RecordingOut()
    answering = defer.ensureDeferred(t.answer(claude_request(), out, OPENAI, final=False))
    await until(lambda: fake_openai.requests)
    out.disconnect()
    await until(lambda: answering.called)
    assert await answering is True
    await until(lambda: fake_openai.unfinished == 1)
    assert out.writes == []


# -- the fallback hook -----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_fallback_hook_walks_the_chain_in_order(upstream, fake_gemini, fake_openai):
    """Gemini failing before commit hands the request to OpenAI, which answers."""
    fake_gemini.script(status=503, body=fp.gemini_error(503, "overloaded", "UNAVAILABLE"))
    t = translation(upstream, fake_gemini=fake_gemini, fake_openai=fake_openai)
    out = RecordingOut()
    hook = t.fallback_hook((GEMINI, OPENAI))
    assert await hook(claude_request(stream=True), out, EXHAUSTED) is True
    assert len(fake_gemini.requests) == 1 and len(fake_openai.requests) == 1
    assert out.header(b"x-clproxy-provider") == b"openai"
    assert streamed_text(out.events()) == "Hello from fake OpenAI."


@pytest_twisted.ensureDeferred
async def test_fallback_hook_all_failing_returns_false(upstream, fake_gemini, fake_openai):
    """When every fallback fails, the hook returns False and the client has been told nothing yet."""
    fake_gemini.script(reset=True)
    fake_openai.script(status=500, body=b"{}")
    t = translation(upstream, fake_gemini=fake_gemini, fake_openai=fake_openai)
    out = RecordingOut()
    assert await t.fallback_hook((GEMINI, OPENAI))(claude_request(), out, EXHAUSTED) is False
    assert out.writes == [] and not out.started


@pytest_twisted.ensureDeferred
async def test_fallback_hook_skips_count_tokens(upstream, fake_openai):
    """count_tokens has no translation: the hook declines at once and a mapped model gets a 400."""
    t = translation(upstream, fake_openai=fake_openai)
    request = claude_request(path=b"/v1/messages/count_tokens")
    out = RecordingOut()
    assert await t.fallback_hook((OPENAI,))(request, out, EXHAUSTED) is False
    assert out.writes == []
    assert await t.answer(request, out, OPENAI, final=True) is True
    assert out.status == 400 and "count_tokens" in out.json()["error"]["message"]
    assert fake_openai.requests == []


@pytest_twisted.ensureDeferred
async def test_fallback_chain_and_providers_follow_a_reload(upstream, fake_gemini, fake_openai):
    """A callable chain is read per request, and reconfigure() switches provider settings."""
    chain = [GEMINI]
    t = translation(upstream, fake_gemini=fake_gemini, fake_openai=fake_openai)
    hook = t.fallback_hook(lambda: chain)
    chain[:] = [OPENAI]
    out = RecordingOut()
    assert await hook(claude_request(), out, EXHAUSTED) is True
    assert fake_gemini.requests == [] and len(fake_openai.requests) == 1
    t.reconfigure(load({"providers": providers_config(fake_openai, fake_gemini, openai_key="sk-new")}).providers)
    await hook(claude_request(), RecordingOut(), EXHAUSTED)
    assert fake_openai.requests[-1].credential == "sk-new"
