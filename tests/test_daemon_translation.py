"""The daemon as makeService wires it: fallback to Gemini/OpenAI and the OpenAI front door."""

import anthropic
import openai
import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy.testing import anthropic as testing
from clproxy.testing.providers import listen_fake_gemini, listen_fake_openai
from conftest import accounts_config
from helpers import in_thread


@pytest.fixture
def providers():
    """Fake Gemini and OpenAI APIs on loopback ports."""
    gemini, oai = listen_fake_gemini(reactor), listen_fake_openai(reactor)
    yield gemini, oai
    pytest_twisted.blockon(gemini.port.stopListening())
    pytest_twisted.blockon(oai.port.stopListening())


def config(fake, gemini, oai, **routing):
    cfg = accounts_config(fake, "a", "b")
    cfg["providers"] = {"google-ai": {"baseUrl": gemini.url, "apiKey": "${GEMINI_TEST_KEY:-g-key}"},
                        "openai": {"baseUrl": oai.url + "/v1", "apiKey": "${OPENAI_TEST_KEY:-o-key}"}}
    cfg["routing"] = {"fallback-chain": [{"provider": "google-ai", "model": "gemini-2.5-flash"},
                                         {"provider": "openai", "model": "gpt-4o"}], **routing}
    return cfg


@pytest_twisted.ensureDeferred
async def test_all_accounts_limited_falls_back_to_gemini_then_openai(fake, providers, start_proxy):
    """With every Claude account 429, Gemini answers; when Gemini fails too, OpenAI does."""
    gemini, oai = providers
    proxy = start_proxy(config(fake, gemini, oai))
    fake.script(status=429, headers={"retry-after": "30"},
                body=testing.error_json(429, "rate_limit_error", "limited"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="c", max_retries=0)
    ask = lambda: client.messages.create(model="claude-sonnet-4-5", max_tokens=50,  # noqa: E731
                                         messages=[{"role": "user", "content": "hi"}])
    first = await in_thread(ask)
    assert first.content[0].type == "text" and len(gemini.requests) == 1
    gemini.script(status=500, body=b'{"error":{"code":500,"message":"boom","status":"INTERNAL"}}')
    second = await in_thread(ask)
    assert second.content[0].type == "text" and len(oai.requests) == 1
    oai.script(status=500, body=b'{"error":{"message":"down","type":"server_error"}}')
    with pytest.raises(anthropic.RateLimitError) as caught:
        await in_thread(ask)
    assert int(caught.value.response.headers["retry-after"]) >= 1  # the pool's 429, not a fallback error
    client.close()  # its pooled connections, not left to the collector


@pytest_twisted.ensureDeferred
async def test_openai_sdk_through_front_door_reaches_claude_account(fake, providers, start_proxy):
    """The openai SDK at /v1 gets a Claude account's answer, streaming included."""
    gemini, oai = providers
    proxy = start_proxy(config(fake, gemini, oai))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="c", max_retries=0)
    answer = await in_thread(lambda: client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]))
    assert answer.choices[0].message.content == "Hello from the fake upstream."
    assert fake.requests[-1].credential == "key-a" and fake.requests[-1].path == b"/v1/messages"

    def stream():
        chunks = client.chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "hi"}])
        return list(chunks)

    chunks = await in_thread(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake." and chunks[-1].usage is not None
    models = await in_thread(lambda: [m.id for m in client.models.list()])
    assert "claude-sonnet-4-5" in models
    client.close()


@pytest_twisted.ensureDeferred
async def test_fallback_answer_is_logged_with_provider_and_actual_model(fake, providers, start_proxy, tmp_path):
    """The summary names the fallback provider and the model that answered; attempts list every try."""
    import glob
    import json as jsonlib
    from pathlib import Path
    gemini, oai = providers
    proxy = start_proxy(config(fake, gemini, oai), environ={"CLPROXY_HOME": str(tmp_path / "home")})
    fake.script(status=429, headers={"retry-after": "30"},
                body=testing.error_json(429, "rate_limit_error", "limited"))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="c", max_retries=0)
    await in_thread(lambda: client.messages.create(model="claude-sonnet-4-5", max_tokens=50,
                                                   messages=[{"role": "user", "content": "hi"}]))
    client.close()
    await in_thread(proxy.service.observability.flush)
    logs = tmp_path / "home" / "logs"
    summary = [jsonlib.loads(line) for f in glob.glob(str(logs / "proxy-2*.jsonl"))
               for line in Path(f).read_text().splitlines()][-1]
    attempts = [jsonlib.loads(line) for f in glob.glob(str(logs / "proxy-attempts-*.jsonl"))
                for line in Path(f).read_text().splitlines()]
    assert summary["provider"] == "google-ai" and summary["status"] == 200
    assert summary["actualModel"] and summary["actualModel"] != "claude-sonnet-4-5" and summary["substituted"]
    assert [a["provider"] for a in attempts] == ["anthropic", "anthropic", "google-ai"]


def failed_turn(reason):
    """A Gemini answer that ends with ``reason`` and says nothing else (as Gemini does)."""
    return {"candidates": [{"finishReason": reason, "index": 0}],
            "usageMetadata": {"promptTokenCount": 2595, "totalTokenCount": 2595},
            "modelVersion": "gemini-2.5-flash"}


@pytest.mark.parametrize("reason", ["MALFORMED_FUNCTION_CALL", "MISSING_THOUGHT_SIGNATURE"])
@pytest.mark.parametrize("streamed", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_gemini_turn_that_failed_moves_the_chain_on(fake, providers, start_proxy, streamed, reason):
    """Gemini answering finishReason MALFORMED_FUNCTION_CALL or MISSING_THOUGHT_SIGNATURE with no
    content is a failed answer, not an empty end_turn: the fallback chain moves on to OpenAI, whose
    answer the client gets, whole or streamed."""
    gemini, oai = providers
    proxy = start_proxy(config(fake, gemini, oai))
    fake.script(status=429, headers={"retry-after": "30"},
                body=testing.error_json(429, "rate_limit_error", "limited"))
    if streamed:
        gemini.script(chunks=[failed_turn(reason)])
    else:
        gemini.script(response=failed_turn(reason))
    client = anthropic.Anthropic(base_url=proxy.url, api_key="c", max_retries=0)
    request = dict(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    if streamed:
        def ask():
            with client.messages.stream(**request) as stream:
                return stream.get_final_message()
    else:
        def ask():
            return client.messages.create(**request)
    answer = await in_thread(ask)
    assert len(gemini.requests) == 1 and len(oai.requests) == 1
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text
    client.close()
