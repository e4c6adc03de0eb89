"""Provider clients: the URL, headers and body each provider gets, and how their failures are reported."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy.testing.providers import gemini_error, openai_error
from clproxy.providers.clients import GeminiClient, OpenAIClient, ProviderError, build_providers
from clproxy.translate.claude import TranslationError
from clproxy.proxy.upstream import read_body
from translation_fixtures import fake_gemini, fake_openai, load, providers_config, upstream  # noqa: F401

CLAUDE = {"model": "claude-sonnet-4-5", "max_tokens": 32000, "temperature": 0.5,
          "system": "Be brief.", "messages": [{"role": "user", "content": "hi"}],
          "thinking": {"type": "enabled", "budget_tokens": 10000}}


def clients(upstream, **kwargs):
    return build_providers(load({"providers": providers_config(**kwargs)}).providers, upstream)


async def send(client, model, stream, claude=CLAUDE):
    response = await client.send(client.prepare(dict(claude), model, stream), 10, reactor)
    return response, await read_body(response, 10 ** 6)


@pytest_twisted.ensureDeferred
async def test_openai_request_url_headers_and_body(fake_openai, upstream):
    """OpenAI gets POST {baseUrl}/chat/completions with the Bearer key, organization and translated body."""
    client = clients(upstream, fake_openai=fake_openai, org_id="org-123")["openai"]
    response, _ = await send(client, "gpt-4o", stream=True)
    assert response.code == 200
    recorded = fake_openai.requests[-1]
    assert recorded.path == b"/v1/chat/completions"
    assert recorded.header("authorization") == "Bearer sk-openai-test"
    assert recorded.header("openai-organization") == "org-123"
    assert recorded.header("content-type") == "application/json"
    body = json.loads(recorded.body)
    assert body["model"] == "gpt-4o" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_completion_tokens"] == 16384  # capped to gpt-4o's output limit
    assert "reasoning_effort" not in body and body["temperature"] == 0.5


@pytest_twisted.ensureDeferred
async def test_openai_reasoning_model_gets_effort_and_no_temperature(fake_openai, upstream):
    """An o-series model gets reasoning_effort from the thinking budget and no temperature."""
    client = clients(upstream, fake_openai=fake_openai)["openai"]
    await send(client, "o3", stream=False)
    body = json.loads(fake_openai.requests[-1].body)
    assert body["reasoning_effort"] == "medium"
    assert "temperature" not in body and "stream" not in body
    assert body["max_completion_tokens"] == 32000
    assert fake_openai.requests[-1].header("openai-organization") is None


@pytest_twisted.ensureDeferred
async def test_gemini_stream_and_whole_urls_and_key_header(fake_gemini, upstream):
    """Gemini gets :streamGenerateContent?alt=sse or :generateContent, the key in x-goog-api-key only."""
    client = clients(upstream, fake_gemini=fake_gemini)["google-ai"]
    await send(client, "gemini-2.5-flash", stream=True)
    await send(client, "gemini-2.5-flash", stream=False)
    streamed, whole = fake_gemini.requests
    assert streamed.uri == b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert whole.uri == b"/v1beta/models/gemini-2.5-flash:generateContent"
    for recorded in (streamed, whole):
        assert recorded.header("x-goog-api-key") == "gemini-test-key"
        assert b"gemini-test-key" not in recorded.uri and recorded.header("authorization") is None
    body = json.loads(streamed.body)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert body["generationConfig"]["maxOutputTokens"] == 32000
    assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 10000, "includeThoughts": True}


def test_gemini_output_cap_follows_the_model_family(upstream):
    """gemini-2.0 models get maxOutputTokens capped at their 8192 limit."""
    client = clients(upstream)["google-ai"]
    prepared = client.prepare(dict(CLAUDE), "gemini-2.0-flash", False)
    assert json.loads(prepared.body)["generationConfig"]["maxOutputTokens"] == 8192


@pytest.mark.parametrize("name,setting", [("openai", "providers.openai.apiKey"),
                                          ("google-ai", "providers.google-ai.apiKey")])
def test_missing_key_fails_fast_naming_the_setting(upstream, name, setting):
    """A provider without an API key refuses to prepare a request and names where to configure one."""
    client = clients(upstream, openai_key=None, gemini_key=None)[name]
    assert not client.configured
    with pytest.raises(ProviderError) as caught:
        client.prepare(dict(CLAUDE), "m", False)
    assert caught.value.kind == "config" and setting in caught.value.message


def test_untranslatable_request_raises_translation_error(upstream):
    """A server tool Claude-only APIs know raises TranslationError before anything is sent."""
    claude = dict(CLAUDE, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    for client in clients(upstream).values():
        with pytest.raises(TranslationError) as caught:
            client.prepare(claude, "m", False)
        assert "web_search_20250305" in caught.value.message


@pytest_twisted.ensureDeferred
async def test_openai_error_status_message_and_retry_after(fake_openai, upstream):
    """A non-2xx OpenAI answer is a ProviderError with its status, message and Retry-After."""
    client = clients(upstream, fake_openai=fake_openai)["openai"]
    fake_openai.script(status=429, headers={"retry-after": "12"},
                       body=openai_error(429, "Rate limit reached for gpt-4o", "requests"))
    with pytest.raises(ProviderError) as caught:
        await send(client, "gpt-4o", stream=True)
    error = caught.value
    assert (error.kind, error.status, error.retry_after) == ("status", 429, "12")
    assert error.message == "Rate limit reached for gpt-4o"


@pytest_twisted.ensureDeferred
async def test_gemini_retry_delay_becomes_retry_after(fake_gemini, upstream):
    """Gemini's RetryInfo retryDelay (in the body) is read as the Retry-After, rounded up."""
    client = clients(upstream, fake_gemini=fake_gemini)["google-ai"]
    fake_gemini.script(status=429, body=gemini_error(429, "Resource exhausted", "RESOURCE_EXHAUSTED",
                                                     retry_delay="29.2s"))
    with pytest.raises(ProviderError) as caught:
        await send(client, "gemini-2.5-flash", stream=False)
    assert (caught.value.status, caught.value.retry_after) == (429, "30")
    assert caught.value.message == "Resource exhausted"


@pytest_twisted.ensureDeferred
async def test_html_error_body_is_not_shown_as_message(fake_openai, upstream):
    """An HTML error page is reported by its status phrase, not dumped into the message."""
    client = clients(upstream, fake_openai=fake_openai)["openai"]
    fake_openai.script(status=502, body=b"<html>bad gateway</html>", headers={"content-type": "text/html"})
    with pytest.raises(ProviderError) as caught:
        await send(client, "gpt-4o", stream=False)
    assert caught.value.status == 502 and "<html>" not in caught.value.message


@pytest_twisted.ensureDeferred
async def test_unreachable_provider_is_a_network_error(upstream):
    """A provider nobody listens for fails with kind network, naming the provider, never the key."""
    client = clients(upstream)["openai"]  # http://127.0.0.1:9: nothing listens there
    with pytest.raises(ProviderError) as caught:
        await send(client, "gpt-4o", stream=False)
    assert caught.value.kind == "network"
    assert caught.value.message.startswith("openai:") and "sk-openai-test" not in caught.value.message


def test_provider_names_match_router_names(upstream):
    """The clients are keyed by the provider names routes use."""
    built = clients(upstream)
    assert isinstance(built["openai"], OpenAIClient) and isinstance(built["google-ai"], GeminiClient)
