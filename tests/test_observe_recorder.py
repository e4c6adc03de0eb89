"""The dispatcher-facing API (clproxy.observe.recorder): records, usage parsing, tee, service lifecycle."""

import json
import time

import pytest
from twisted.application.service import IService
from twisted.internet import task
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from clproxy.observe.recorder import (TRACE_HEADERS, Observability, model_from_message, usage_from_event,
                                      usage_from_message, usage_from_sse_tail)
from clproxy.routing.policy import Verdict

import helpers

SUCCESS = Verdict("success", 200, "ok", None, 0)
NOW = 1_767_268_800.0


def make_clock(at: float = NOW) -> task.Clock:
    return helpers.make_clock(at)


def sse(*events) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                    for name, data in events)


MESSAGE = json.dumps({
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"usage": {"input_tokens": 999}}},
                {"type": "text", "text": 'quoted "usage": {"input_tokens": 777}'}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4096,
              "output_tokens": 7, "server_tool_use": {"web_search_requests": 0}, "service_tier": "standard"},
}).encode()


def test_usage_from_a_message_is_the_top_level_one():
    """usage_from_message returns the response's own usage, not a look-alike in its content."""
    assert usage_from_message(MESSAGE) == {"input_tokens": 12, "cache_creation_input_tokens": 0,
                                           "cache_read_input_tokens": 4096, "output_tokens": 7}


def test_usage_from_a_message_only_reads_its_end():
    """A long answer is not parsed whole: only its last bytes are searched."""
    long_message = json.dumps({"model": "m", "content": [{"type": "text", "text": "x" * 1_000_000}],
                               "usage": {"input_tokens": 1, "output_tokens": 2}}).encode()
    started = time.perf_counter()
    assert usage_from_message(long_message) == {"input_tokens": 1, "output_tokens": 2}
    assert time.perf_counter() - started < 0.01


def test_usage_from_the_tail_of_a_stream():
    """The last message_delta's usage is found in the stream's tail, with message_stop after it."""
    stream = sse(
        ("message_start", {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 30,
                                                                                      "output_tokens": 1}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": 'say "usage": {"output_tokens": 5}'}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"input_tokens": 30, "cache_read_input_tokens": 100, "output_tokens": 321}}),
        ("message_stop", {"type": "message_stop"}))
    assert usage_from_sse_tail(stream[-1024:]) == {"input_tokens": 30, "cache_read_input_tokens": 100,
                                                   "output_tokens": 321}
    assert usage_from_sse_tail(b"event: ping\ndata: {}\n\n") == {}
    assert usage_from_sse_tail(b'data: {"usage": {"output_tokens": 3') == {}


def test_usage_and_model_of_one_event():
    """message_start data gives the input usage and the model actually answering."""
    data = json.dumps({"type": "message_start", "message": {"id": "msg", "model": "claude-opus-4-1-20250805",
                                                           "usage": {"input_tokens": 9, "output_tokens": 1}}})
    assert usage_from_event(data) == {"input_tokens": 9, "output_tokens": 1}
    assert model_from_message(data) == "claude-opus-4-1-20250805"
    assert model_from_message(MESSAGE) == "claude-sonnet-4-5-20250929"
    assert model_from_message(b"not json") is None


def test_usage_calls_merge_later_values_over_earlier(tmp_path):
    """Stream usage reported at start then at the end is merged: the final output count wins."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=True, headers=[],
                       body=None)
    record.usage({"input_tokens": 30, "output_tokens": 1, "cache_read_input_tokens": 5})
    record.usage({"output_tokens": 99, "cache_read_input_tokens": None})
    record.finish(status=200, account_name="a", provider="anthropic")
    obs.flush()
    row = json.loads((tmp_path / "proxy-2026-01-01.jsonl").read_text())
    assert (row["inputTokens"], row["outputTokens"], row["cacheReadInputTokens"]) == (30, 99, 5)


def test_each_attempt_gets_its_own_outbound_span():
    """Every outbound_headers() call names a new span id; the caller's traceparent is replaced."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
                       body=None)
    first = dict(record.outbound_headers())[b"traceparent"]
    second = dict(record.outbound_headers())[b"traceparent"]
    assert first != second
    assert first.split(b"-")[1] == second.split(b"-")[1] == b"0af7651916cd43dd8448eb211c80319c"
    assert b"b7ad6b7169203331" not in first + second
    assert TRACE_HEADERS == (b"traceparent", b"tracestate")


def test_tee_is_free_without_debug_bodies():
    """Without debug bodies tee() hands back the very same write function (no per-chunk work)."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, debug_bodies=True)  # nowhere to write: off
    record = obs.begin(request_id="r", method="POST", path="/", model="m", stream=True, headers=[], body=None)
    write = [].append
    assert record.tee(write) is write
    assert obs.debug_bodies is False


def test_tee_writes_through_and_captures_with_debug_bodies(tmp_path):
    """With debug bodies tee() still writes every chunk to the client, in order."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), debug_bodies=True)
    record = obs.begin(request_id="r", method="POST", path="/", model="m", stream=True, headers=[], body=None)
    sent = []
    write = record.tee(sent.append, status=200, headers=Headers({b"content-type": [b"text/event-stream"]}))
    write(b"a")
    write(b"b")
    assert sent == [b"a", b"b"]
    record.finish(status=200, account_name="a", provider="anthropic")
    obs.flush()
    index = [json.loads(line) for line in (tmp_path / "proxy-debug-2026-01-01.jsonl").read_text().splitlines()]
    assert index[-1]["bytes"] == 2 and index[-1]["headers"] == {"content-type": "text/event-stream"}


@pytest.mark.parametrize("provider, actual, expected", [
    ("openai", "gpt-4o", True),
    ("anthropic", "claude-sonnet-4-5-20250929", False),
    ("openai", "claude-sonnet-4-5", False),
    ("openai", None, False),
])
def test_model_substitution_rule(provider, actual, expected):
    """A different model counts as a substitution on fallback providers, not an Anthropic alias resolving."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    record = obs.begin(request_id="r", method="POST", path="/", model="claude-sonnet-4-5", stream=False,
                       headers=[], body=None)
    record.finish(status=200, account_name=None, provider=provider, actual_model=actual)
    assert bool(obs.metrics.substitutions) is expected


def test_explicit_substitution_flag_wins():
    """finish(substituted=True) counts a mapping within Anthropic too."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    record = obs.begin(request_id="r", method="POST", path="/", model="claude-opus-4-1", stream=False,
                       headers=[], body=None)
    record.finish(status=200, account_name="a", provider="anthropic", actual_model="claude-sonnet-4-5",
                  substituted=True)
    assert obs.metrics.substitutions == {("claude-opus-4-1", "claude-sonnet-4-5", "anthropic"): 1}


def test_attempt_without_a_verdict():
    """A translated provider's attempt has no policy verdict: classified ok/error from its status."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    record = obs.begin(request_id="r", method="POST", path="/", model="m", stream=False, headers=[], body=None)
    record.attempt(account_name=None, provider="openai", model="gpt-4o", status=200, verdict=None, duration=1)
    record.attempt(account_name=None, provider="google-ai", model="gemini", status=503, verdict=None, duration=1)
    assert set(obs.metrics.attempts) == {("200", "-", "gpt-4o", "openai", "ok"),
                                         ("503", "-", "gemini", "google-ai", "error")}


def test_service_is_a_multiservice_that_cancels_its_timers(tmp_path):
    """service() is an IService; stopping it cancels the retention and housekeeping timers."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    svc = obs.service()
    assert verifyObject(IService, svc)
    assert obs.service() is svc
    svc.startService()
    assert sorted(round(call.getTime() - NOW) for call in clock.getDelayedCalls()) == [5, 3600]
    svc.stopService()
    assert clock.getDelayedCalls() == []
    assert obs.writer._thread is None


def test_status_reports_the_logging_state(tmp_path):
    """status() gives /status the logs dir, counts and drops."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    obs.begin(request_id="r", method="GET", path="/", model=None, stream=False, headers=[],
              body=None).finish(status=200, account_name=None, provider="anthropic")
    obs.flush()
    logs = obs.status()["logs"]
    assert logs["dir"] == str(tmp_path) and logs["written"]["proxy"] == 1 and logs["pending"] == 0
    assert "otlp" not in obs.status()


def test_finish_defaults_to_what_the_record_learned(tmp_path):
    """Without arguments, finish() uses the last attempt's account and provider and the fields set on the record."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="claude-sonnet-4-5",
                       stream=True, headers=[], body=None)
    record.outbound_headers()
    clock.advance(0.75)
    record.attempt(account_name="work", provider="anthropic", model="claude-sonnet-4-5", status=200,
                   verdict=SUCCESS)
    record.actual_model = "claude-sonnet-4-5-20250929"
    record.truncated, record.error = True, "upstream went away"
    record.finish(status=200)
    obs.flush()
    row = json.loads((tmp_path / "proxy-2026-01-01.jsonl").read_text())
    assert (row["account"], row["provider"], row["actualModel"]) == ("work", "anthropic", "claude-sonnet-4-5-20250929")
    assert (row["truncated"], row["error"]) == (True, "upstream went away")
    attempt = json.loads((tmp_path / "proxy-attempts-2026-01-01.jsonl").read_text())
    assert attempt["durationMs"] == 750.0  # timed from outbound_headers()
