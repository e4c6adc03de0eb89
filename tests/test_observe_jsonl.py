"""The JSONL log families, debug body captures, retention and degraded writing (real files, task.Clock)."""

import gzip
import json
import os
import stat

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from clproxy.observe import console, jsonl
from clproxy.observe.recorder import Observability, usage_from_sse_tail
from clproxy.routing.policy import Verdict, classify

import helpers


@pytest.fixture
def events():
    """Every twisted.logger event published globally while the test runs."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


NOW = 1_767_268_800.0  # 2026-01-01T12:00:00Z
DAY = "2026-01-01"
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SUCCESS = Verdict("success", 200, "ok", None, 0)


def make_clock(at: float = NOW) -> task.Clock:
    return helpers.make_clock(at)


rows = helpers.jsonl_rows


def sse(*events) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                    for name, data in events)


STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 25, "output_tokens": 1,
                                       "cache_creation_input_tokens": 3, "cache_read_input_tokens": 400}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hel"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "lo"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 42}}),
    ("message_stop", {"type": "message_stop"}),
)


def one_request(obs, clock, *, request_id="req_1", headers=None, status=200, stream=True, body=b'{"model":"m"}'):
    """A request with one 429 attempt then one success, streamed."""
    headers = headers if headers is not None else [
        (b"traceparent", TRACEPARENT), (b"x-clproxy-session-id", b"sess-9"),
        (b"x-neurolink-user-id", b"user-9"), (b"x-clproxy-conversation-id", b"conv-9")]
    record = obs.begin(request_id=request_id, method=b"POST", path=b"/v1/messages", model="claude-sonnet-4-5",
                       stream=stream, headers=headers, body=body)
    record.outbound_headers()
    clock.advance(0.25)
    limited = classify(429, {"retry-after": "2"}, b"", now=clock.seconds(), backoff_level=1, is_oauth=False)
    record.attempt(account_name="work", provider="anthropic", model="claude-sonnet-4-5", status=429,
                   verdict=limited, duration=0.25)
    record.outbound_headers()
    clock.advance(0.5)
    record.attempt(account_name="home", provider="anthropic", model="claude-sonnet-4-5", status=200,
                   verdict=SUCCESS, duration=0.5)
    record.first_byte()
    record.usage({"input_tokens": 25, "output_tokens": 1, "cache_creation_input_tokens": 3,
                  "cache_read_input_tokens": 400})
    write = record.tee(lambda data: None, status=200, headers=[(b"content-type", b"text/event-stream")])
    for start in range(0, len(STREAM), 100):
        write(STREAM[start:start + 100])
    record.usage(usage_from_sse_tail(STREAM[-1024:]))
    clock.advance(1.25)
    record.finish(status=status, account_name="home", provider="anthropic", actual_model="claude-sonnet-4-5")
    return record


def test_summary_row_has_every_field(tmp_path):
    """proxy-<day>.jsonl gets one summary per request with ids, models, account, timings, tokens and trace."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = one_request(obs, clock)
    obs.flush()
    [row] = rows(tmp_path / f"proxy-{DAY}.jsonl")
    assert row["requestId"] == "req_1" and row["method"] == "POST" and row["path"] == "/v1/messages"
    assert row["model"] == "claude-sonnet-4-5" and row["actualModel"] == "claude-sonnet-4-5"
    assert row["provider"] == "anthropic" and row["account"] == "home" and row["status"] == 200
    assert row["durationMs"] == pytest.approx(2000.0) and row["ttfbMs"] == pytest.approx(750.0)
    assert (row["inputTokens"], row["outputTokens"]) == (25, 42)
    assert (row["cacheCreationInputTokens"], row["cacheReadInputTokens"]) == (3, 400)
    assert row["stream"] is True and row["truncated"] is False and row["attempts"] == 2
    assert row["traceId"] == "0af7651916cd43dd8448eb211c80319c" == record.trace_id
    assert row["spanId"] == record.span_id and row["parentSpanId"] == "b7ad6b7169203331"
    assert (row["sessionId"], row["userId"], row["conversationId"]) == ("sess-9", "user-9", "conv-9")
    assert row["ts"] == "2026-01-01T12:00:02.000Z"


def test_attempt_rows_have_verdict_cooldown_and_backoff(tmp_path):
    """proxy-attempts-<day>.jsonl gets one row per upstream attempt with its classification and cooldown."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = one_request(obs, clock)
    obs.flush()
    first, second = rows(tmp_path / f"proxy-attempts-{DAY}.jsonl")
    assert (first["account"], first["status"], first["classification"]) == ("work", 429, "rate-limited")
    assert first["action"] == "cool-and-next" and first["cooldownS"] == 4.0 and first["backoffLevel"] == 2
    assert first["durationMs"] == 250.0 and first["attempt"] == 1 and first["requestId"] == "req_1"
    assert (second["account"], second["status"], second["classification"]) == ("home", 200, "ok")
    assert second["cooldownS"] is None and second["attempt"] == 2
    assert first["parentSpanId"] == second["parentSpanId"] == record.span_id
    assert first["spanId"] != second["spanId"] and first["traceId"] == record.trace_id
    assert first["sessionId"] == "sess-9"


def test_outbound_traceparent_continues_the_callers_trace(tmp_path):
    """Upstream gets the caller's trace id with the attempt's own span id (the one in its attempt row)."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[(b"traceparent", TRACEPARENT), (b"tracestate", b"vendor=1")], body=None)
    headers = dict(record.outbound_headers())
    version, trace_id, span_id, flags = headers[b"traceparent"].decode().split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert headers[b"tracestate"] == b"vendor=1"
    record.attempt(account_name="a", provider="anthropic", model="m", status=200, verdict=SUCCESS, duration=0.1)
    record.finish(status=200, account_name="a", provider="anthropic")
    obs.flush()
    [attempt] = rows(tmp_path / f"proxy-attempts-{DAY}.jsonl")
    assert attempt["spanId"] == span_id


def test_malformed_traceparent_starts_a_new_trace(tmp_path):
    """A broken traceparent is ignored: a fresh trace id, no parent, no error, no tracestate."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[(b"traceparent", b"00-zz-yy-01"), (b"tracestate", b"a=b")], body=None)
    assert len(record.trace_id) == 32 and record.parent_span_id is None
    assert [name for name, _ in record.outbound_headers()] == [b"traceparent"]
    record.finish(status=200, account_name=None, provider="anthropic")
    obs.flush()
    [row] = rows(tmp_path / f"proxy-{DAY}.jsonl")
    assert row["parentSpanId"] is None and row["traceId"] == record.trace_id


def test_finish_is_recorded_once(tmp_path):
    """A second finish() is ignored: one summary row, the in-flight gauge back to zero."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[], body=None)
    record.finish(status=200, account_name="a", provider="anthropic")
    record.finish(status=500, account_name="a", provider="anthropic", error="again")
    obs.flush()
    assert len(rows(tmp_path / f"proxy-{DAY}.jsonl")) == 1
    assert obs.metrics.in_flight == 0


def test_truncated_stream_and_error_are_in_the_summary(tmp_path):
    """A cut stream says truncated=true and carries its error text."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=True,
                       headers=[], body=None)
    record.finish(status=200, account_name="a", provider="anthropic", truncated=True,
                  error="upstream closed mid-stream")
    obs.flush()
    [row] = rows(tmp_path / f"proxy-{DAY}.jsonl")
    assert row["truncated"] is True and row["error"] == "upstream closed mid-stream"
    assert row["ttfbMs"] is None


def test_no_debug_family_without_debug_bodies(tmp_path):
    """Without debug bodies there is no proxy-debug file and no bodies directory."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    one_request(obs, clock)
    obs.flush()
    assert sorted(os.listdir(tmp_path)) == sorted([f"proxy-attempts-{DAY}.jsonl", f"proxy-{DAY}.jsonl"])


def test_debug_bodies_are_captured_gzipped_0600_and_reassembled(tmp_path):
    """With debug bodies: an index row per capture, request JSON, raw SSE byte-exact and the reassembled message."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), debug_bodies=True)
    body = b'{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    one_request(obs, clock, body=body)
    obs.flush()
    index = rows(tmp_path / f"proxy-debug-{DAY}.jsonl")
    assert [r["phase"] for r in index] == ["request", "response"]
    folder = tmp_path / "bodies" / DAY / "req_1"
    assert sorted(os.listdir(folder)) == ["request.json.gz", "response.json.gz", "response.sse.gz"]
    for name in os.listdir(folder):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600
    assert json.loads(gzip.decompress((folder / "request.json.gz").read_bytes())) == json.loads(body)
    assert gzip.decompress((folder / "response.sse.gz").read_bytes()) == STREAM
    message = json.loads(gzip.decompress((folder / "response.json.gz").read_bytes()))
    assert message["content"][0] == {"type": "text", "text": "Hello"}
    assert message["content"][1]["input"] == {"city": "Paris"}
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 42
    assert message["_clproxy"]["truncated"] is False
    response_row = index[1]
    assert response_row["streamed"] is True and response_row["status"] == 200
    assert response_row["bytes"] == len(STREAM)
    assert sorted(response_row["files"]) == [f"bodies/{DAY}/req_1/response.json.gz",
                                             f"bodies/{DAY}/req_1/response.sse.gz"]
    assert response_row["headers"] == {"content-type": "text/event-stream"}


def test_non_streamed_response_capture(tmp_path):
    """response_body() of a JSON answer is stored as response.json.gz; a second one gets its own file."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), debug_bodies=True)
    record = obs.begin(request_id="req_2", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[], body=b"{}")
    record.response_body(529, [(b"content-type", [b"application/json"])], b'{"type":"error"}', streamed=False)
    record.response_body(200, [], b'{"type":"message"}', streamed=False)
    record.finish(status=200, account_name="a", provider="anthropic")
    obs.flush()
    folder = tmp_path / "bodies" / DAY / "req_2"
    assert sorted(os.listdir(folder)) == ["request.json.gz", "response-2.json.gz", "response.json.gz"]
    assert json.loads(gzip.decompress((folder / "response-2.json.gz").read_bytes())) == {"type": "message"}


def test_truncated_stream_is_reassembled_as_far_as_it_goes():
    """A stream cut mid-block still reassembles its text and says it was truncated."""
    message = jsonl.reassemble_stream(STREAM[:STREAM.index(b"content_block_stop")])
    assert message["content"][0]["text"] == "Hello"
    assert message["_clproxy"]["truncated"] is True


@pytest.fixture
def console_info():
    """The daemon's console gate at info level for the test (other tests may have quieted it)."""
    predicate = console._predicate  # the gate itself, to assert it is restored
    default, ours = predicate.defaultLogLevel, predicate.logLevelForNamespace("clproxy")
    console.set_level(LogLevel.info)
    yield
    predicate.defaultLogLevel = default
    predicate.setLogLevelForNamespace("clproxy", ours)


def test_summary_and_attempt_events_are_logger_events(events, console_info):
    """Records are twisted.logger events with named fields; with echo they reach the global log too."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, echo=True)
    record = obs.begin(request_id="r", method="POST", path="/p", model="m", stream=False, headers=[], body=None)
    record.attempt(account_name="a", provider="anthropic", model="m", status=200, verdict=SUCCESS, duration=0.1)
    record.finish(status=200, account_name="a", provider="anthropic")
    ours = [e for e in events if e.get("log_namespace", "").startswith("clproxy.observe.")]
    assert [e["log_namespace"] for e in ours] == [jsonl.ATTEMPT_NAMESPACE, jsonl.REQUEST_NAMESPACE]
    assert ours[1]["status"] == 200 and ours[1]["requestId"] == "r"
    assert formatEvent(ours[1]) == "POST /p -> 200 model=m account=a 0.0ms"


# --- retention ----------------------------------------------------------------------------------


def plant(path, size: int, age_days: float, now: float = NOW) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_days * 86400, now - age_days * 86400))


def test_retention_at_start_deletes_old_files_then_the_oldest_over_the_cap(tmp_path):
    """At start: files older than 7 days go, then the oldest until the total fits; others are untouched."""
    plant(tmp_path / "proxy-2025-12-20.jsonl", 100, 12)
    plant(tmp_path / "bodies" / "2025-12-20" / "req_a" / "request.json.gz", 100, 12)
    plant(tmp_path / "proxy-2025-12-28.jsonl", 600, 4)
    plant(tmp_path / "proxy-attempts-2025-12-30.jsonl", 600, 2)
    plant(tmp_path / "proxy-debug-2025-12-31.jsonl", 600, 1)
    plant(tmp_path / "unrelated.txt", 5000, 30)
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), retention_days=7, max_total_mb=1300 / 1024 / 1024)
    svc = obs.service()
    svc.startService()
    try:
        obs.flush()
        remaining = sorted(os.listdir(tmp_path))
        assert remaining == ["bodies", "proxy-attempts-2025-12-30.jsonl", "proxy-debug-2025-12-31.jsonl",
                             "unrelated.txt"]
        assert os.listdir(tmp_path / "bodies") == []  # emptied day folders are removed too
        assert obs.writer.last_prune.deleted == 3
    finally:
        svc.stopService()


def test_retention_runs_again_every_hour_on_the_injected_clock(tmp_path):
    """After an hour of the (fake) clock the next pass deletes files that aged past the limit."""
    clock = make_clock()
    plant(tmp_path / "proxy-2025-12-26.jsonl", 10, 6.99)
    obs = Observability(clock=clock, logs_dir=str(tmp_path), retention_days=7)
    svc = obs.service()
    svc.startService()
    try:
        obs.flush()
        assert (tmp_path / "proxy-2025-12-26.jsonl").exists()
        clock.advance(1800)
        obs.flush()
        assert (tmp_path / "proxy-2025-12-26.jsonl").exists()
        clock.advance(1800)
        obs.flush()
        assert not (tmp_path / "proxy-2025-12-26.jsonl").exists()
    finally:
        svc.stopService()


def test_pruned_current_file_is_recreated(tmp_path):
    """When retention deletes the file being written, the next records go to a new file, not a lost inode."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), max_total_mb=1 / 1024 / 1024)
    for n in range(3):
        obs.begin(request_id=f"r{n}", method="GET", path="/", model=None, stream=False, headers=[],
                  body=None).finish(status=200, account_name=None, provider="anthropic")
    obs.flush()
    obs.prune()
    obs.flush()
    assert not (tmp_path / f"proxy-{DAY}.jsonl").exists()
    obs.begin(request_id="after", method="GET", path="/", model=None, stream=False, headers=[],
              body=None).finish(status=200, account_name=None, provider="anthropic")
    obs.flush()
    assert [r["requestId"] for r in rows(tmp_path / f"proxy-{DAY}.jsonl")] == ["after"]


def test_retention_limits_of_zero_disable_them(tmp_path):
    """retentionDays 0 and maxTotalMb 0 keep everything."""
    plant(tmp_path / "proxy-2020-01-01.jsonl", 10_000, 2000)
    result = jsonl.prune_logs(str(tmp_path), NOW, 0, 0)
    assert result.deleted == 0 and (tmp_path / "proxy-2020-01-01.jsonl").exists()


# --- degraded writing ---------------------------------------------------------------------------


@pytest.fixture
def warnings(events):
    """Warnings logged through twisted.logger while the test runs."""
    return _Filtered(events)


class _Filtered:
    def __init__(self, events):
        self.events = events

    def __iter__(self):
        return iter([e for e in self.events if e.get("log_level") is not None
                     and e["log_level"].name in ("warn", "error")])


def serve(obs, clock, count: int) -> None:
    for n in range(count):
        record = obs.begin(request_id=f"r{n}", method="POST", path="/v1/messages", model="m", stream=False,
                           headers=[], body=b"{}")
        record.attempt(account_name="a", provider="anthropic", model="m", status=200, verdict=SUCCESS,
                       duration=0.01)
        record.finish(status=200, account_name="a", provider="anthropic")


def test_unwritable_directory_drops_and_counts_with_one_warning(tmp_path, warnings):
    """A logs dir that cannot be created costs the records (counted, one warning), never a request."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(blocker / "logs"))
    serve(obs, clock, 5)
    obs.flush()
    serve(obs, clock, 5)
    obs.flush()
    assert obs.writer.dropped[jsonl.WRITE_ERROR] == 20
    assert len([w for w in warnings if "cannot write logs" in str(w.get("message", ""))]) == 1
    assert obs.metrics.requests[("200", "a", "m", "anthropic")] == 10
    assert obs.status()["logs"]["dropped"]["write-error"] == 20


def test_full_disk_drops_one_family_and_keeps_the_others(tmp_path, warnings):
    """ENOSPC on the summary file (a link to /dev/full) drops its lines; attempt rows are still written."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    os.symlink("/dev/full", tmp_path / f"proxy-{DAY}.jsonl")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    serve(obs, clock, 4)
    obs.flush()
    assert obs.writer.dropped[jsonl.WRITE_ERROR] == 4
    assert len(rows(tmp_path / f"proxy-attempts-{DAY}.jsonl")) == 4
    assert "ENOSPC" in obs.writer.last_error
    assert len([w for w in warnings if "cannot write logs" in str(w.get("message", ""))]) == 1


def test_writing_recovers_after_a_failure(tmp_path, warnings):
    """Once the directory is usable again, records are written and a recovery note is logged."""
    blocker = tmp_path / "logs"
    blocker.write_text("in the way")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(blocker))
    serve(obs, clock, 1)
    obs.flush()
    blocker.unlink()
    serve(obs, clock, 1)
    obs.flush()
    assert len(rows(blocker / f"proxy-{DAY}.jsonl")) == 1
    assert obs.writer.dropped[jsonl.WRITE_ERROR] == 2


def test_full_buffer_drops_and_counts_without_raising(tmp_path, warnings):
    """With the writer behind, events beyond the bound are dropped and counted, one warning."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), max_pending=6)
    serve(obs, clock, 10)  # 20 events
    assert obs.writer.pending == 6
    assert obs.writer.dropped[jsonl.BUFFER_FULL] == 14
    obs.flush()
    assert len([w for w in warnings if "log buffer full" in str(w.get("message", ""))]) == 1
    written = len(rows(tmp_path / f"proxy-{DAY}.jsonl")) + len(rows(tmp_path / f"proxy-attempts-{DAY}.jsonl"))
    assert written == 6


def test_a_broken_observer_never_reaches_the_caller(tmp_path, monkeypatch):
    """An exception inside an observer is swallowed: begin/attempt/finish still return normally."""
    def broken(self, event):
        raise RuntimeError("observer bug")

    monkeypatch.setattr(jsonl.JsonlWriter, "__call__", broken)
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    serve(obs, clock, 2)
    assert obs.metrics.requests[("200", "a", "m", "anthropic")] == 2


def test_writer_thread_writes_without_an_explicit_flush(tmp_path):
    """The service's writer thread writes queued lines by itself within its interval."""
    import time as wall
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    svc = obs.service()
    svc.startService()
    try:
        serve(obs, clock, 3)
        deadline = wall.monotonic() + 5
        path = tmp_path / f"proxy-{DAY}.jsonl"
        while wall.monotonic() < deadline and not (path.exists() and len(rows(path)) == 3):
            wall.sleep(0.02)
        assert len(rows(path)) == 3
    finally:
        svc.stopService()


def test_stop_service_flushes_what_is_queued(tmp_path):
    """stopService writes the records still queued and cancels the timers."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    svc = obs.service()
    svc.startService()
    obs.writer.interval = 3600  # the thread will not wake by itself
    serve(obs, clock, 2)
    svc.stopService()
    assert len(rows(tmp_path / f"proxy-{DAY}.jsonl")) == 2
    assert clock.getDelayedCalls() == []
