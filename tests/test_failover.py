"""Integration: failover across accounts through the real daemon, driven by the anthropic SDK."""

import json
import math
import random

import anthropic
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from clproxy.testing import anthropic as testing
from clproxy.proxy.sse import encode_event
from conftest import accounts_config
from helpers import error_of, in_thread, post, request_body, sdk, stream


def ask(client):
    return client.messages.create(model="claude-sonnet-4-5", max_tokens=10,
                                  messages=[{"role": "user", "content": "hi"}])


@pytest_twisted.ensureDeferred
async def test_429_on_first_account_is_answered_by_second(fake, start_proxy):
    """A 429 on account A is answered by B; A then cools and the next request goes straight to B."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", status=429, headers={"retry-after": "30"},
                body=testing.error_json(429, "rate_limit_error", "slow down"))
    answer = await in_thread(ask, sdk(proxy))
    assert answer.content[0].type == "text"
    assert [r.credential for r in fake.requests] == ["key-a", "key-b"]
    await in_thread(ask, sdk(proxy))
    assert [r.credential for r in fake.requests] == ["key-a", "key-b", "key-b"]


@pytest_twisted.ensureDeferred
async def test_all_cooling_gives_429_with_truthful_retry_after(fake, start_proxy):
    """When every account is rate-limited the client gets 429 with Retry-After = earliest recovery."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", status=429, headers={"retry-after": "40"},
                body=testing.error_json(429, "rate_limit_error", "a is limited"))
    fake.script("key-b", status=429, headers={"retry-after": "25"},
                body=testing.error_json(429, "rate_limit_error", "b is limited"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await in_thread(ask, sdk(proxy))
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 24 <= retry_after <= 25
    message = caught.value.body["error"]["message"]
    assert "2 accounts" in message and "2 cooling" in message
    # while they cool, nothing is sent upstream and the Retry-After keeps telling the truth
    before = len(fake.requests)
    status, headers, body = await post(proxy.url + "/v1/messages", request_body())
    assert status == 429 and len(fake.requests) == before
    assert 23 <= int(headers.getRawHeaders(b"retry-after")[0]) <= 25


@pytest_twisted.ensureDeferred
async def test_transient_error_rotates_without_cooldown(fake, start_proxy):
    """A 529 on A is answered by B at once, and A is tried first again on the next request."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", status=529, body=testing.error_json(529, "overloaded_error", "busy"), times=1)
    await in_thread(ask, sdk(proxy))
    await in_thread(ask, sdk(proxy))
    assert [r.credential for r in fake.requests] == ["key-a", "key-b", "key-a"]


@pytest_twisted.ensureDeferred
async def test_connection_reset_rotates(fake, start_proxy):
    """A connection reset on A is answered by B."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", reset=True, times=1)
    answer = await in_thread(ask, sdk(proxy))
    assert answer.content and fake.requests[-1].credential == "key-b"


# Answers that look like a success (or start like one) but give the client nothing it can use.
UNUSABLE_ANSWERS = {
    "empty-200": (dict(body=b""), "an empty 200 answer"),
    "empty-200-no-content-type": (dict(body=b"", headers={"content-type": "text/plain"}), "an empty 200 answer"),
    "json-array": (dict(body=b"[]"), "not a JSON object"),
    "json-null": (dict(body=b"null"), "not a JSON object"),
    "json-cut": (dict(body=b'{"type": "message", "content": [', headers={"connection": "close"}),
                 "not a JSON object"),
    "cut-at-content-length": (dict(body_cut_at=25), "closed the connection after 25 bytes"),
    "cut-before-body": (dict(body_cut_at=0), "closed the connection after 0 bytes"),
    "chunked-cut": (dict(body_cut_at=25, chunked=True), "closed the connection after 25 bytes"),
}


async def _account_rows(proxy):
    _, _, status = await post(proxy.url + "/status", None, method=b"GET")
    return {row["name"]: row for row in json.loads(status)["accounts"]}


@pytest.mark.parametrize("fault", sorted(UNUSABLE_ANSWERS))
@pytest_twisted.ensureDeferred
async def test_unusable_answer_is_answered_by_next_account_without_cooldown(fake, start_proxy, fault):
    """An empty or non-object 200, or a body cut short, on A is answered by B; A does not cool."""
    script, _ = UNUSABLE_ANSWERS[fault]
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", times=1, **script)
    status, _, content = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200 and json.loads(content)["type"] == "message"
    assert [r.credential for r in fake.requests] == ["key-a", "key-b"]
    rows = await _account_rows(proxy)
    assert rows["a"]["state"] == "ok" and rows["a"]["cooling_until"] is None
    assert rows["a"]["errors"] == 1 and rows["b"]["successes"] == 1
    # no cooldown: fill-first tries A first again
    await post(proxy.url + "/v1/messages", request_body())
    assert [r.credential for r in fake.requests] == ["key-a", "key-b", "key-a"]


@pytest.mark.parametrize("fault", sorted(UNUSABLE_ANSWERS))
@pytest_twisted.ensureDeferred
async def test_unusable_answer_on_the_only_account_is_502_naming_the_upstream(fake, start_proxy, fault):
    """With no account left, an unusable answer is a 502 api_error naming the upstream; no cooldown."""
    script, words = UNUSABLE_ANSWERS[fault]
    proxy = start_proxy(accounts_config(fake, "a"))
    fake.script("key-a", times=1, **script)
    status, _, content = await post(proxy.url + "/v1/messages", request_body())
    kind, message = error_of(content)
    host = fake.url.split("://", 1)[1]
    assert (status, kind) == (502, "api_error"), (status, content)
    assert f"upstream {host}" in message and words in message
    assert "key-a" not in message
    rows = await _account_rows(proxy)
    assert rows["a"]["state"] == "ok" and rows["a"]["cooling_until"] is None
    assert words in rows["a"]["last_error"]
    # the account was not cooled: the next request is answered by it
    status, _, content = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200 and json.loads(content)["type"] == "message"


@pytest_twisted.ensureDeferred
async def test_empty_200_in_passthrough_mode_is_502(fake, start_proxy):
    """--passthrough relays upstream errors as they are, but an empty 200 is no answer: 502."""
    proxy = start_proxy(accounts_config(fake, "a", "b"), passthrough=True)
    fake.script("key-a", times=1, body=b"")
    status, _, content = await post(proxy.url + "/v1/messages", request_body())
    assert status == 502 and "an empty 200 answer" in error_of(content)[1]
    assert [r.credential for r in fake.requests] == ["key-a"]


@pytest_twisted.ensureDeferred
async def test_all_transient_failures_return_last_upstream_error(fake, start_proxy):
    """When every account fails transiently, the client gets the upstream's own error, not a made-up one."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script(status=529, body=testing.error_json(529, "overloaded_error", "busy everywhere"))
    status, _, body = await post(proxy.url + "/v1/messages", request_body())
    assert status == 529 and error_of(body) == ("overloaded_error", "busy everywhere")


@pytest_twisted.ensureDeferred
async def test_bad_keys_everywhere_return_the_upstream_401(fake, start_proxy):
    """If every account's credential is rejected now, the client sees Anthropic's 401, not a 429."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script(status=401, body=testing.error_json(401, "authentication_error", "invalid x-api-key"))
    with pytest.raises(anthropic.AuthenticationError):
        await in_thread(ask, sdk(proxy))
    assert len(fake.requests) == 2


@pytest_twisted.ensureDeferred
async def test_stream_cut_before_message_start_is_retried_on_next_account(fake, start_proxy):
    """A stream that ends or breaks before its first event is retried on B; the client sees one clean stream."""
    proxy = start_proxy(accounts_config(fake, "a", "b", "c"))
    fake.script("key-a", events=testing.text_stream(), end_before_first=True)
    fake.script("key-b", events=testing.text_stream(), cut_after=0)
    events = testing.text_stream(parts=["only", " from", " c"])
    fake.script("key-c", events=events)
    response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    assert response.code == 200
    assert await body.done
    assert body.body == b"".join(encode_event(n, d) for n, d in events)
    assert [r.credential for r in fake.requests] == ["key-a", "key-b", "key-c"]


@pytest_twisted.ensureDeferred
async def test_error_event_first_is_retried(fake, start_proxy):
    """An upstream whose stream opens with event: error (overloaded) is retried on B."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", events=[("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                        "message": "Overloaded"}})])
    client = sdk(proxy)

    def consume():
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            return s.get_final_text()

    assert await in_thread(consume) == "Hello from the fake."
    assert [r.credential for r in fake.requests] == ["key-a", "key-b"]


@pytest_twisted.ensureDeferred
async def test_stream_cut_after_message_start_ends_in_error_event(fake, start_proxy):
    """A stream cut after it was committed ends with an Anthropic event: error and counts as truncated."""
    proxy = start_proxy(accounts_config(fake, "a", "b"))
    fake.script("key-a", events=testing.text_stream(parts=["x"] * 10), cut_after=4)
    response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    await body.done
    names = [e.name for _, e in body.events]
    assert names[:4] == ["message_start", "content_block_start", "ping", "content_block_delta"]
    assert names[-1] == "error" and "message_stop" not in names
    assert json.loads(body.events[-1][1].data)["error"]["type"] == "api_error"
    assert [r.credential for r in fake.requests] == ["key-a"]  # committed: no retry on B
    _, _, status = await post(proxy.url + "/status", None, method=b"GET")
    assert json.loads(status)["counters"]["truncated_streams"] == 1

    client = sdk(proxy)
    fake.script("key-a", events=testing.text_stream(parts=["x"] * 10), cut_after=4)

    def consume():
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            return s.get_final_text()

    with pytest.raises(anthropic.APIStatusError):
        await in_thread(consume)


@pytest_twisted.ensureDeferred
async def test_passthrough_mode_does_not_rotate(fake, start_proxy):
    """--passthrough returns A's 429 as is and never tries B."""
    proxy = start_proxy(accounts_config(fake, "a", "b"), passthrough=True)
    fake.script("key-a", status=429, headers={"retry-after": "7"},
                body=testing.error_json(429, "rate_limit_error", "limited"))
    status, headers, body = await post(proxy.url + "/v1/messages", request_body())
    assert status == 429 and headers.getRawHeaders(b"retry-after") == [b"7"]
    assert [r.credential for r in fake.requests] == ["key-a"]


@pytest_twisted.ensureDeferred
async def test_round_robin_alternates(fake, start_proxy):
    """round-robin spreads consecutive requests over the accounts."""
    proxy = start_proxy(accounts_config(fake, "a", "b"), strategy="round-robin")
    for _ in range(4):
        await post(proxy.url + "/v1/messages", request_body())
    assert [r.credential for r in fake.requests] == ["key-a", "key-b", "key-a", "key-b"]


@pytest_twisted.ensureDeferred
async def test_rate_limit_skips_account_before_trying_it(fake, start_proxy):
    """An account at its rateLimit (requests per minute) is skipped without an upstream attempt."""
    config = accounts_config(fake, "a", "b")
    config["accounts"]["anthropic"][0]["rateLimit"] = 2
    proxy = start_proxy(config)
    for _ in range(3):
        await post(proxy.url + "/v1/messages", request_body())
    assert [r.credential for r in fake.requests] == ["key-a", "key-a", "key-b"]


@pytest_twisted.ensureDeferred
async def test_soak_random_faults_every_request_ends_truthfully(fake, start_proxy):
    """200 concurrent requests over 3 accounts with random faults: each ends in success or a truthful error."""
    rng = random.Random(7)
    proxy = start_proxy(accounts_config(fake, "a", "b", "c", server={"upstreamTimeout": 2}))
    faults = [
        dict(status=429, headers={"retry-after": "0.2"}, body=testing.error_json(429, "rate_limit_error", "x")),
        dict(status=529, body=testing.error_json(529, "overloaded_error", "busy")),
        dict(status=500, body=b"<html>oops</html>", headers={"content-type": "text/html"}),
        dict(reset=True),
        dict(events=testing.text_stream(), cut_after=0),
        dict(events=testing.text_stream(parts=["y"] * 6), cut_after=3),
        dict(delay=0.05),
        dict(body=b""),
        dict(body=b"[]"),
        dict(body_cut_at=30),
        dict(body_cut_at=30, chunked=True),
    ]
    for key in ("key-a", "key-b", "key-c"):
        for _ in range(150):
            if rng.random() < 0.5:
                fake.script(key, times=1, **rng.choice(faults))
            else:
                fake.script(key, times=1)
    outcomes = []

    async def one(i):
        streaming = i % 2 == 0
        if streaming:
            response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
            await body.done
            if response.code == 200:
                names = [e.name for _, e in body.events]
                assert names[0] == "message_start"
                assert names[-1] in ("message_stop", "error"), names
                outcomes.append("ok" if names[-1] == "message_stop" else "truncated")
            else:
                outcomes.append(_check_error(response.code, response.headers, body.body))
        else:
            status, headers, content = await post(proxy.url + "/v1/messages", request_body())
            if status == 200:
                assert json.loads(content)["type"] == "message"
                outcomes.append("ok")
            else:
                outcomes.append(_check_error(status, headers, content))

    work = defer.gatherResults([defer.ensureDeferred(one(i)) for i in range(200)], consumeErrors=True)
    timeout = reactor.callLater(60, work.cancel)
    await work
    timeout.cancel()
    assert len(outcomes) == 200
    assert outcomes.count("ok") > 100
    footprint = proxy.service.pool.footprint()
    assert footprint["written_keys"] <= 3 and footprint["round_robin_weights"] <= 3
    _, _, status = await post(proxy.url + "/status", None, method=b"GET")
    document = json.loads(status)
    assert document["counters"]["completed_requests"] == 200
    assert len(document["accounts"]) == 3


def _check_error(status, headers, body):
    """A non-200 answer must be an Anthropic error with a truthful shape (429 carries Retry-After).

    A 429 may be the upstream's own, relayed with its Retry-After as sent (``0.2``: delta-seconds
    with a fraction); the proxy's own "all accounts unavailable" 429 says whole seconds, at least 1.
    """
    kind, message = error_of(body) if body.startswith(b"{") else ("html", "")
    assert status in (429, 500, 502, 504, 529), status
    if status == 429:
        value = headers.getRawHeaders(b"retry-after")[0].decode("ascii")
        seconds = float(value)
        assert math.isfinite(seconds) and seconds >= 0, value
        if "accounts are unavailable" in message:
            assert value.isdigit() and int(value) >= 1, value
    return f"error-{status}"


@pytest_twisted.ensureDeferred
async def test_model_mapping_within_anthropic_renames_the_model(fake, start_proxy):
    """A mapping to another Anthropic model renames it in the body; other requests stay byte for byte."""
    proxy = start_proxy(accounts_config(fake, "a", routing={"model-mappings": [
        {"from": "claude-old", "to": "claude-sonnet-4-5", "provider": "anthropic"}]}))
    await post(proxy.url + "/v1/messages", request_body(model="claude-old"))
    renamed = json.loads(fake.requests[-1].body)
    assert renamed["model"] == "claude-sonnet-4-5"
    assert renamed["messages"] == [{"role": "user", "content": "héllo \u2603"}]
    body = request_body(model="claude-sonnet-4-5")
    await post(proxy.url + "/v1/messages", body)
    assert fake.requests[-1].body == body


@pytest_twisted.ensureDeferred
async def test_thinking_from_a_fallback_provider_is_dropped_before_anthropic(fake, start_proxy):
    """Thinking blocks with a fallback provider's signature are removed; genuine ones stay byte for byte."""
    proxy = start_proxy(accounts_config(fake, "a"))
    history = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "gemini:abc"},
                                                 {"type": "text", "text": "a"}]},
               {"role": "user", "content": "next"}]
    await post(proxy.url + "/v1/messages", request_body(messages=history))
    sent = json.loads(fake.requests[-1].body)
    assert sent["messages"][1]["content"] == [{"type": "text", "text": "a"}]
    genuine = json.loads(json.dumps(history))
    genuine[1]["content"][0]["signature"] = "EqQBCgIYAhIM"
    body = request_body(messages=genuine)
    await post(proxy.url + "/v1/messages", body)
    assert fake.requests[-1].body == body
