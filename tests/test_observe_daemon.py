"""The observability layer inside a real daemon (conftest's start_proxy) in front of the fake Anthropic.

These tests need dispatch/web/tap to be wired to clproxy.observe.recorder (see docs/observability.rst);
until ``GET /metrics`` exists they skip, and they fail as soon as the wiring is incomplete.
"""

import json
import os
import re

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from clproxy.testing.anthropic import text_stream

from conftest import accounts_config
from helpers import post

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def get(url: str):
    return await post(url, None, method=b"GET")


async def wired(proxy) -> str:
    """The daemon's /metrics text; skips the test when observability is not wired yet."""
    status, _, body = await get(proxy.url + "/metrics")
    if status == 404:
        pytest.skip("GET /metrics is not wired into the daemon yet")
    assert status == 200
    return body.decode()


def logs_of(proxy, tmp_path):
    obs = getattr(proxy.service, "observability", None)
    if obs is not None:
        obs.flush()
    return tmp_path / "home" / "logs"


def read_rows(folder, family):
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(family + "-2") and name.endswith(".jsonl"):
            with open(folder / name, "rb") as f:
                rows.extend(json.loads(line) for line in f)
    return rows


@pytest_twisted.ensureDeferred
async def test_streamed_request_is_logged_counted_and_traced(fake, start_proxy, tmp_path):
    """A streamed answer: summary and attempt rows, metrics, and the caller's trace continued upstream."""
    proxy = start_proxy(accounts_config(fake, "work"))
    await wired(proxy)
    fake.script(events=text_stream(["Hel", "lo"]))
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, _ = await post(proxy.url + "/v1/messages", body, {
        b"traceparent": [f"00-{CALLER_TRACE}-{CALLER_SPAN}-01".encode()],
        b"x-clproxy-session-id": [b"sess-1"]})
    assert status == 200
    upstream = fake.requests[-1].header("traceparent")
    assert upstream is not None and upstream.split("-")[1] == CALLER_TRACE
    assert CALLER_SPAN not in upstream  # the proxy's attempt span is the parent upstream sees
    # the caller's own traceparent made way for it: one traceparent upstream, not two
    assert [k.lower() for k, _ in fake.requests[-1].headers].count(b"traceparent") == 1

    logs = logs_of(proxy, tmp_path)
    [summary] = read_rows(logs, "proxy")
    assert summary["status"] == 200 and summary["account"] == "work" and summary["stream"] is True
    assert summary["traceId"] == CALLER_TRACE and summary["parentSpanId"] == CALLER_SPAN
    assert summary["sessionId"] == "sess-1"
    assert summary["inputTokens"] == 12 and summary["outputTokens"] == 2
    assert summary["ttfbMs"] is not None and summary["truncated"] is False
    [attempt] = read_rows(logs, "proxy-attempts")
    assert attempt["spanId"] == upstream.split("-")[2] and attempt["classification"] == "ok"
    # the request id is readable (not masked as a client key) and the same in both families
    assert re.fullmatch(r"req_clp_[0-9a-f]{24}", summary["requestId"])
    assert attempt["requestId"] == summary["requestId"]

    text = await wired(proxy)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("clproxy_requests_total", (("account", "work"), ("model", "claude-sonnet-4-5"),
                                      ("provider", "anthropic"), ("status", "200")))
    assert found[key] == 1


@pytest_twisted.ensureDeferred
async def test_failover_attempts_are_rows_and_the_status_counts_them(fake, start_proxy, tmp_path):
    """A 429 then a success: two attempt rows (cooldown on the first), one summary, metrics per account."""
    proxy = start_proxy(accounts_config(fake, "first", "second"))
    await wired(proxy)
    fake.script("key-first", status=429, headers={"retry-after": "7"},
                body=b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}')
    fake.script("key-second", status=200, body=json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 4}}).encode(),
        headers={"content-type": "application/json"})
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, _ = await post(proxy.url + "/v1/messages", body)
    assert status == 200
    logs = logs_of(proxy, tmp_path)
    attempts = read_rows(logs, "proxy-attempts")
    assert [(a["account"], a["status"], a["cooldownS"]) for a in attempts] == [("first", 429, 7.0),
                                                                              ("second", 200, None)]
    [summary] = read_rows(logs, "proxy")
    assert (summary["account"], summary["attempts"], summary["outputTokens"]) == ("second", 2, 4)
    text = await wired(proxy)
    assert 'clproxy_account_cooling{account="first"} 1.0' in text


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_front_door_request_is_logged_counted_and_measured(fake, start_proxy, tmp_path, logs,
                                                                 stream):
    """POST /v1/chat/completions is bookkept like /v1/messages: one JSONL summary, the request
    metric, completed_requests counted, and no traceback in the log (issue 11, item 4)."""
    proxy = start_proxy(accounts_config(fake, "work"))
    await wired(proxy)
    if stream:
        fake.script(events=text_stream(["Hel", "lo"]))
    body = json.dumps({"model": "claude-sonnet-4-5", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, answer = await post(proxy.url + "/v1/chat/completions", body)
    assert status == 200 and (b"[DONE]" in answer if stream else json.loads(answer)["choices"])

    [summary] = read_rows(logs_of(proxy, tmp_path), "proxy")
    assert summary["status"] == 200 and summary["account"] == "work"
    assert summary["path"] == "/v1/chat/completions"
    text = await wired(proxy)
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("clproxy_requests_total", (("account", "work"), ("model", "claude-sonnet-4-5"),
                                      ("provider", "anthropic"), ("status", "200")))
    assert found[key] == 1
    _, _, status_body = await get(proxy.url + "/status")
    assert json.loads(status_body)["counters"]["completed_requests"] == 1
    assert not [line for line in logs if "Traceback" in line or "AttributeError" in line]
