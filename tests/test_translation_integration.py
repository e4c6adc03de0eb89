"""Integration: fallback, mapped models and the OpenAI front door through a real daemon, driven by the SDKs."""

import json

import anthropic
import openai
import pytest
import pytest_twisted

from clproxy.testing import providers as fp
from clproxy.testing import anthropic as testing
from helpers import in_thread, post, request_body
from translation_fixtures import fake_gemini, fake_openai, providers_config, start_daemon  # noqa: F401

TOOLS = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                  "parameters": t["input_schema"]}} for t in TOOLS]


def daemon_config(fake, fake_gemini=None, fake_openai=None, accounts=("a", "b"), **routing):
    routing.setdefault("fallback-chain", [{"provider": "google-ai", "model": "gemini-2.5-flash"},
                                         {"provider": "openai", "model": "gpt-4o"}])
    return {"version": 1,
            "accounts": {"anthropic": [{"name": n, "apiKey": f"key-{n}", "baseUrl": fake.url} for n in accounts]},
            "routing": routing,
            "providers": providers_config(fake_openai, fake_gemini)}


def all_accounts_limited(fake, retry_after="30"):
    fake.script(status=429, headers={"retry-after": retry_after},
                body=testing.error_json(429, "rate_limit_error", "rate limited"))


def claude_sdk(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="client-key", max_retries=0)


def openai_sdk(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="client-key", max_retries=0)


def ask(client, model="claude-sonnet-4-5", **extra):
    kwargs = dict(model=model, max_tokens=1000, messages=[{"role": "user", "content": "hi"}])
    kwargs.update(extra)
    raw = client.messages.with_raw_response.create(**kwargs)
    return raw.parse(), raw.headers


def stream_final(client, **kwargs):
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1000, **kwargs) as s:
        return s.get_final_message()


# -- fallback ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_all_accounts_rate_limited_gemini_answers(fake, fake_gemini, fake_openai, start_daemon):
    """With every Claude account at 429, the first fallback (Gemini) answers, and says so in headers."""
    daemon = start_daemon(daemon_config(fake, fake_gemini, fake_openai))
    all_accounts_limited(fake)
    message, headers = await in_thread(ask, claude_sdk(daemon))
    assert message.content[0].text == "Hello from fake Gemini." and message.model == "gemini-2.5-flash"
    assert headers["x-clproxy-provider"] == "google-ai"
    assert headers["x-clproxy-actual-model"] == "gemini-2.5-flash"
    assert [r.credential for r in fake.requests] == ["key-a", "key-b"]
    assert len(fake_gemini.requests) == 1 and fake_openai.requests == []
    assert (await daemon.counters())["model_substitutions"] == 1
    # while the accounts cool, the next request goes to the fallback without touching Anthropic
    await in_thread(ask, claude_sdk(daemon))
    assert len(fake.requests) == 2 and len(fake_gemini.requests) == 2


@pytest_twisted.ensureDeferred
async def test_gemini_failing_hands_over_to_openai_streaming(fake, fake_gemini, fake_openai, start_daemon):
    """When Gemini fails before answering, OpenAI answers; the SDK reads the translated stream."""
    daemon = start_daemon(daemon_config(fake, fake_gemini, fake_openai))
    all_accounts_limited(fake)
    fake_gemini.script(status=503, body=fp.gemini_error(503, "The model is overloaded.", "UNAVAILABLE"))
    message = await in_thread(stream_final, claude_sdk(daemon), messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from fake OpenAI." and message.stop_reason == "end_turn"
    assert message.model == "gpt-4o-2024-08-06" and message.usage.output_tokens == 9
    assert len(fake_gemini.requests) == 1 and len(fake_openai.requests) == 1
    sent = fake_openai.bodies()[0]
    assert sent["model"] == "gpt-4o" and sent["stream"] is True


@pytest_twisted.ensureDeferred
async def test_tool_use_round_trip_through_gemini_fallback(fake, fake_gemini, start_daemon):
    """The SDK gets a tool_use from Gemini's functionCall; the tool_result goes back as a functionResponse."""
    daemon = start_daemon(daemon_config(fake, fake_gemini))
    all_accounts_limited(fake)
    fake_gemini.script(chunks=fp.gemini_tool_chunks(args={"city": "Paris"}), times=1)
    client = claude_sdk(daemon)
    question = {"role": "user", "content": "Weather in Paris?"}
    first = await in_thread(stream_final, client, tools=TOOLS, messages=[question])
    assert first.stop_reason == "tool_use"
    tool = next(b for b in first.content if b.type == "tool_use")
    assert tool.name == "get_weather" and tool.input == {"city": "Paris"}
    history = [question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "sunny"}]}]
    second = await in_thread(stream_final, client, tools=TOOLS, messages=history)
    assert second.content[0].text == "Hello from fake Gemini."
    contents = fake_gemini.bodies()[1]["contents"]
    assert contents[1]["role"] == "model" and contents[1]["parts"][-1]["functionCall"]["name"] == "get_weather"
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}]}


@pytest_twisted.ensureDeferred
async def test_every_fallback_failing_returns_the_pools_429(fake, fake_gemini, fake_openai, start_daemon):
    """When Gemini and OpenAI both fail, the client gets the pool's 429 with its Retry-After, not theirs."""
    daemon = start_daemon(daemon_config(fake, fake_gemini, fake_openai))
    all_accounts_limited(fake, retry_after="40")
    fake_gemini.script(reset=True)
    fake_openai.script(status=500, body=fp.openai_error(500, "internal", "server_error"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await in_thread(ask, claude_sdk(daemon))
    assert 39 <= int(caught.value.response.headers["retry-after"]) <= 40
    assert "2 accounts" in caught.value.body["error"]["message"]
    assert len(fake_gemini.requests) == 1 and len(fake_openai.requests) == 1


@pytest_twisted.ensureDeferred
async def test_untranslatable_request_falls_through_to_the_pools_429(fake, fake_gemini, start_daemon):
    """A request no fallback can express (a server tool) gets the pool's 429 and reaches no provider."""
    daemon = start_daemon(daemon_config(fake, fake_gemini))
    all_accounts_limited(fake)
    body = request_body(tools=[{"type": "web_search_20250305", "name": "web_search"}])
    status, headers, answer = await post(daemon.url + "/v1/messages", body)
    assert status == 429 and json.loads(answer)["error"]["type"] == "rate_limit_error"
    assert fake_gemini.requests == []


# -- mapped models ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_model_mapped_to_openai_is_answered_by_openai(fake, fake_openai, start_daemon):
    """A model mapped to openai never reaches Anthropic: OpenAI answers, with the requested vs actual model."""
    mappings = [{"from": "claude-haiku-4-5", "to": "gpt-4o", "provider": "openai"}]
    daemon = start_daemon(daemon_config(fake, fake_openai=fake_openai, **{"model-mappings": mappings}))
    message, headers = await in_thread(ask, claude_sdk(daemon), model="claude-haiku-4-5")
    assert message.content[0].text == "Hello from fake OpenAI." and message.model == "gpt-4o-2024-08-06"
    assert headers["x-clproxy-provider"] == "openai" and headers["x-clproxy-actual-model"] == "gpt-4o-2024-08-06"
    assert fake.requests == [] and fake_openai.bodies()[0]["model"] == "gpt-4o"
    message, _ = await in_thread(ask, claude_sdk(daemon))  # an unmapped model still goes to Anthropic
    assert message.content[0].text == "Hello from the fake upstream." and len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_mapped_provider_failure_is_an_anthropic_error(fake, fake_openai, start_daemon):
    """A mapped provider's 404 reaches the SDK as an Anthropic not_found_error naming the provider."""
    mappings = [{"from": "claude-haiku-4-5", "to": "gpt-nope", "provider": "openai"}]
    daemon = start_daemon(daemon_config(fake, fake_openai=fake_openai, **{"model-mappings": mappings}))
    fake_openai.script(status=404, body=fp.openai_error(404, "The model `gpt-nope` does not exist"))
    with pytest.raises(anthropic.NotFoundError) as caught:
        await in_thread(ask, claude_sdk(daemon), model="claude-haiku-4-5")
    assert caught.value.body["error"]["message"] == "openai: The model `gpt-nope` does not exist"


@pytest_twisted.ensureDeferred
async def test_anthropic_mapping_renames_the_model(fake, start_daemon):
    """A mapping to anthropic sends the request to an account under the mapped model name."""
    mappings = [{"from": "claude-alias", "to": "claude-sonnet-4-5", "provider": "anthropic"}]
    daemon = start_daemon(daemon_config(fake, **{"model-mappings": mappings}))
    message, _ = await in_thread(ask, claude_sdk(daemon), model="claude-alias")
    assert json.loads(fake.requests[0].body)["model"] == "claude-sonnet-4-5"
    assert message.model == "claude-sonnet-4-5"


# -- the OpenAI front door ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_openai_sdk_is_answered_by_a_claude_account(fake, start_daemon):
    """The openai SDK's chat completion is answered by a Claude account through /v1/chat/completions."""
    daemon = start_daemon(daemon_config(fake))
    completion = await in_thread(lambda: openai_sdk(daemon).chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"}]))
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.choices[0].finish_reason == "stop" and completion.usage.total_tokens == 19
    recorded = fake.requests[0]
    assert recorded.path == b"/v1/messages" and recorded.credential == "key-a"
    assert recorded.header("anthropic-version") == "2023-06-01"
    sent = json.loads(recorded.body)
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 4096


@pytest_twisted.ensureDeferred
async def test_openai_sdk_streaming_with_usage(fake, start_daemon):
    """A streamed chat completion arrives as chunks, with the usage chunk include_usage asks for."""
    daemon = start_daemon(daemon_config(fake))

    def consume():
        chunks = list(openai_sdk(daemon).chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        return chunks

    chunks = await in_thread(consume)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake."
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_tool_call_round_trip(fake, start_daemon):
    """A Claude tool_use reaches the openai SDK as tool_calls; the tool message goes back as tool_result."""
    daemon = start_daemon(daemon_config(fake))
    fake.script(events=testing.tool_use_stream(arguments='{"city": "Paris"}'), times=1)
    client = openai_sdk(daemon)

    def first_turn():
        calls = {}
        finish = None
        for chunk in client.chat.completions.create(model="claude-sonnet-4-5", tools=OPENAI_TOOLS, stream=True,
                                                    messages=[{"role": "user", "content": "Weather in Paris?"}]):
            if not chunk.choices:
                continue
            for call in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = (call.function.name if call.function else None) or entry["name"]
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = chunk.choices[0].finish_reason or finish
        return calls, finish

    calls, finish = await in_thread(first_turn)
    assert finish == "tool_calls"
    assert calls[0]["id"] == "toolu_fake01" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert json.loads(fake.requests[0].body)["tools"][0]["name"] == "get_weather"

    def second_turn():
        return client.chat.completions.create(model="claude-sonnet-4-5", tools=OPENAI_TOOLS, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": calls[0]["id"], "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"}])

    completion = await in_thread(second_turn)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    messages = json.loads(fake.requests[1].body)["messages"]
    assert messages[1]["content"][0]["type"] == "tool_use" and messages[1]["content"][0]["id"] == "toolu_fake01"
    assert messages[2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_fake01", "content": "sunny"}]


@pytest_twisted.ensureDeferred
async def test_openai_sdk_falls_back_to_gemini_when_accounts_cool(fake, fake_gemini, start_daemon):
    """The front door shares the pool and the fallback chain: cooling accounts mean Gemini answers it too."""
    daemon = start_daemon(daemon_config(fake, fake_gemini))
    all_accounts_limited(fake)

    def consume():
        return list(openai_sdk(daemon).chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], stream=True))

    chunks = await in_thread(consume)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from fake Gemini."
    assert chunks[0].model == "gemini-2.5-flash"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_gets_the_pools_429_as_rate_limit_error(fake, start_daemon):
    """With no fallback configured, the OpenAI client gets a 429 RateLimitError with Retry-After."""
    daemon = start_daemon(daemon_config(fake, **{"fallback-chain": []}))
    all_accounts_limited(fake, retry_after="20")
    with pytest.raises(openai.RateLimitError) as caught:
        await in_thread(lambda: openai_sdk(daemon).chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]))
    assert 19 <= int(caught.value.response.headers["retry-after"]) <= 20
    assert caught.value.body["type"] == "rate_limit_error"


@pytest_twisted.ensureDeferred
async def test_openai_sdk_lists_models(fake, start_daemon):
    """The openai SDK's models.list() gets OpenAI's shape; the anthropic SDK still gets Anthropic's."""
    mappings = [{"from": "claude-haiku-4-5", "to": "gpt-4o", "provider": "openai"}]
    daemon = start_daemon(daemon_config(fake, **{"model-mappings": mappings}))
    models = await in_thread(lambda: list(openai_sdk(daemon).models.list()))
    assert [(m.id, m.owned_by) for m in models] == [
        ("claude-sonnet-4-5", "anthropic"), ("claude-opus-4-1", "anthropic"), ("claude-haiku-4-5", "openai"),
        ("gemini-2.5-flash", "google-ai")]
    page = await in_thread(lambda: claude_sdk(daemon).models.list())
    assert [m.id for m in page.data] == ["claude-sonnet-4-5", "claude-opus-4-1"]


@pytest_twisted.ensureDeferred
async def test_oversized_chat_request_is_an_openai_413(fake, start_daemon):
    """A chat completion over server.maxBodyBytes gets an OpenAI-shaped 413 and reaches no account."""
    config = daemon_config(fake)
    config["server"] = {"maxBodyBytes": 1000}
    daemon = start_daemon(config)
    body = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x" * 2000}]})
    status, _, answer = await post(daemon.url + "/v1/chat/completions", body.encode(),
                                   {b"anthropic-version": [], b"x-api-key": []})
    assert status == 413 and "1000 bytes" in json.loads(answer)["error"]["message"]
    assert fake.requests == []
