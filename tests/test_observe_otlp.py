"""OTLP/HTTP export (clproxy.observe.otlp) to a real loopback collector that decodes the protobuf it receives."""

import gzip
import sys
import time

import pytest
import pytest_twisted

pytest.importorskip("opentelemetry.sdk", reason="needs the otlp extra")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra")

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (ExportLogsServiceRequest,
                                                                    ExportLogsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet import protocol, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from clproxy.observe import otlp
from clproxy.observe.recorder import Observability
from clproxy.routing.policy import Verdict, classify

SUCCESS = Verdict("success", 200, "ok", None, 0)
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Collector(resource.Resource):
    """An OTLP/HTTP receiver: keeps the raw payloads and the decoded spans and log records."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.raw = []
        self.spans = []
        self.logs = []

    def render_POST(self, request):
        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"") == b"gzip":
            body = gzip.decompress(body)
        self.raw.append(body)
        request.setHeader(b"content-type", b"application/x-protobuf")
        if request.path == b"/v1/traces":
            message = ExportTraceServiceRequest.FromString(body)
            for resource_spans in message.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            return ExportTraceServiceResponse().SerializeToString()
        if request.path == b"/v1/logs":
            message = ExportLogsServiceRequest.FromString(body)
            for resource_logs in message.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    self.logs.extend(scope_logs.log_records)
            return ExportLogsServiceResponse().SerializeToString()
        request.setResponseCode(404)
        return b""


@pytest.fixture
def collector():
    """A Collector listening on a free loopback port; ``collector.url`` is its base URL."""
    receiver = Collector()
    port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
    receiver.url = f"http://127.0.0.1:{port.getHost().port}"
    yield receiver
    pytest_twisted.blockon(port.stopListening())


async def wait_for(condition, timeout: float = 10.0) -> None:
    """Let the reactor run (it serves the collector) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the collector"
        await task.deferLater(reactor, 0.02, lambda: None)


def make_clock(at: float = 1_767_268_800.0) -> task.Clock:
    clock = task.Clock()
    clock.advance(at)
    return clock


def hexid(raw: bytes) -> str:
    return raw.hex()


def attributes(item) -> dict:
    values = {}
    for attribute in item.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind) if kind else None
    return values


def one_request(obs, clock, headers):
    record = obs.begin(request_id="req_otlp", method=b"POST", path=b"/v1/messages", model="claude-sonnet-4-5",
                       stream=True, headers=headers, body=b'{"model":"claude-sonnet-4-5"}')
    record.outbound_headers()
    clock.advance(0.1)
    limited = classify(429, {}, b"", now=clock.seconds(), backoff_level=0, is_oauth=False)
    record.attempt(account_name="work", provider="anthropic", model="claude-sonnet-4-5", status=429,
                   verdict=limited, duration=0.1)
    record.outbound_headers()
    clock.advance(0.3)
    record.attempt(account_name="home", provider="anthropic", model="claude-sonnet-4-5", status=200,
                   verdict=SUCCESS, duration=0.3)
    record.first_byte()
    record.usage({"input_tokens": 10, "output_tokens": 20})
    clock.advance(1.0)
    record.finish(status=200, account_name="home", provider="anthropic", actual_model="claude-sonnet-4-5")
    return record


@pytest_twisted.ensureDeferred
async def test_spans_for_request_and_attempts_reach_the_collector(collector, tmp_path):
    """A request span (child of the caller's span) and one client span per attempt arrive with their attributes."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), otlp_endpoint=collector.url, environ={})
    assert obs.otlp is not None
    svc = obs.service()
    svc.startService()
    try:
        record = one_request(obs, clock, [
            (b"traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01".encode()),
            (b"x-neurolink-session-id", b"sess-1"), (b"x-clproxy-user-id", b"user-1"),
            (b"x-clproxy-conversation-id", b"conv-1")])
        await threads.deferToThread(obs.otlp.flush)
        await wait_for(lambda: len(collector.spans) >= 3 and len(collector.logs) >= 3)
    finally:
        await threads.deferToThread(svc.stopService)
    by_kind = {}
    for span in collector.spans:
        by_kind.setdefault(span.kind, []).append(span)
    [request_span] = by_kind[Span.SPAN_KIND_SERVER]
    attempts = sorted(by_kind[Span.SPAN_KIND_CLIENT], key=lambda s: s.start_time_unix_nano)
    assert hexid(request_span.trace_id) == CALLER_TRACE == record.trace_id
    assert hexid(request_span.parent_span_id) == CALLER_SPAN
    assert hexid(request_span.span_id) == record.span_id
    assert request_span.name == "POST /v1/messages"
    assert request_span.end_time_unix_nano - request_span.start_time_unix_nano == pytest.approx(1.4e9, rel=1e-6)
    attrs = attributes(request_span)
    assert attrs["session.id"] == "sess-1" and attrs["enduser.id"] == "user-1"
    assert attrs["gen_ai.conversation.id"] == "conv-1"
    assert attrs["http.response.status_code"] == 200 and attrs["clproxy.account"] == "home"
    assert attrs["gen_ai.usage.output_tokens"] == 20 and attrs["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert [attributes(s)["clproxy.account"] for s in attempts] == ["work", "home"]
    assert all(hexid(s.parent_span_id) == record.span_id and hexid(s.trace_id) == CALLER_TRACE for s in attempts)
    assert attributes(attempts[0])["clproxy.classification"] == "rate-limited"
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert attributes(attempts[1])["session.id"] == "sess-1"


@pytest_twisted.ensureDeferred
async def test_log_records_carry_event_names_and_trace_context(collector):
    """Summary and attempt records are exported as OTLP log records correlated with their spans."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, otlp_endpoint=collector.url, environ={})
    record = one_request(obs, clock, [])
    await threads.deferToThread(obs.otlp.flush)
    await wait_for(lambda: len(collector.logs) >= 3)
    names = sorted(log.event_name for log in collector.logs)
    assert names == ["proxy.attempt", "proxy.attempt", "proxy.request"]
    [summary] = [log for log in collector.logs if log.event_name == "proxy.request"]
    assert hexid(summary.trace_id) == record.trace_id and hexid(summary.span_id) == record.span_id
    assert attributes(summary)["requestId"] == "req_otlp"
    assert "POST /v1/messages -> 200" in summary.body.string_value
    obs.otlp.stop(timeout=0)


@pytest_twisted.ensureDeferred
async def test_unsampled_caller_trace_exports_logs_but_no_spans(collector):
    """A caller trace with the sampled flag off gets no spans; its log records are still exported."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, otlp_endpoint=collector.url, environ={})
    one_request(obs, clock, [(b"traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-00".encode())])
    await threads.deferToThread(obs.otlp.flush)
    await wait_for(lambda: len(collector.logs) >= 3)
    assert collector.spans == []
    obs.otlp.stop(timeout=0)


@pytest_twisted.ensureDeferred
async def test_debug_body_captures_are_exported_as_log_events(collector, tmp_path):
    """With debug bodies, captures become proxy.body_capture log records (redacted)."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), debug_bodies=True, otlp_endpoint=collector.url,
                        environ={})
    record = obs.begin(request_id="req_b", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[(b"x-api-key", b"sk-ant-api03-PLANTEDplanted0123456789")],
                       body=b'{"model":"m","api_key":"planted-in-body"}')
    record.response_body(200, [], b'{"type":"message"}', streamed=False)
    record.finish(status=200, account_name="a", provider="anthropic")
    await threads.deferToThread(obs.otlp.flush)
    await wait_for(lambda: len([l for l in collector.logs if l.event_name == "proxy.body_capture"]) == 2)
    captures = [l for l in collector.logs if l.event_name == "proxy.body_capture"]
    assert sorted(attributes(c)["phase"] for c in captures) == ["request", "response"]
    payload = b"".join(collector.raw)
    assert b"planted-in-body" not in payload and b"PLANTEDplanted" not in payload
    obs.otlp.stop(timeout=0)


class Blackhole(protocol.Protocol):
    """Accepts a connection and never answers."""

    def dataReceived(self, data):
        pass


@pytest_twisted.ensureDeferred
async def test_unresponsive_collector_never_slows_finish(tmp_path):
    """With the export thread stuck on a collector that never answers, begin/attempt/finish never wait.

    The property is structural, not a wall-clock bound (shared CI machines are noisy): the export
    queue is bounded, and once it is full while the worker is stuck, further events are dropped and
    counted instead of waiting for room.  The 60 s guard only catches a hang.
    """
    factory = protocol.Factory.forProtocol(Blackhole)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), otlp_endpoint=f"http://127.0.0.1:{port.getHost().port}",
                        environ={}, otlp_timeout=1.0)
    obs.otlp.max_queue = 300  # small, so 2000 requests overflow it while the worker is stuck
    svc = obs.service()
    svc.startService()
    try:
        one_request(obs, clock, [])
        obs.otlp._wake.set()
        await task.deferLater(reactor, 0.2, lambda: None)  # the worker is now blocked in an export
        started = time.perf_counter()
        for n in range(2000):
            record = obs.begin(request_id=str(n), method="POST", path="/v1/messages", model="m", stream=False,
                               headers=[], body=None)
            record.attempt(account_name="a", provider="anthropic", model="m", status=200, verdict=SUCCESS,
                           duration=0.01)
            record.finish(status=200, account_name="a", provider="anthropic")
        elapsed = time.perf_counter() - started
        assert elapsed < 60.0, f"2000 requests took {elapsed:.3f}s with a dead collector (a hang)"
        assert obs.otlp.pending <= 300
        assert obs.otlp.dropped > 0, "a full export queue must drop (and count), never wait"
        assert obs.metrics.requests[("200", "a", "m", "anthropic")] == 2000
    finally:
        started = time.perf_counter()
        await threads.deferToThread(svc.stopService)
        assert time.perf_counter() - started < 30.0  # stop gives the stuck export its timeout, then leaves
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_collector_is_one_warning_and_counted_failures(tmp_path):
    """A collector that refuses connections costs failed batches (counted) and one warning; files are still written."""
    placeholder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{placeholder.getHost().port}"
    await placeholder.stopListening()  # now nothing listens there
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = make_clock()
        obs = Observability(clock=clock, logs_dir=str(tmp_path), otlp_endpoint=url, environ={}, otlp_timeout=1.0)
        for _ in range(2):
            one_request(obs, clock, [])
            await threads.deferToThread(obs.flush)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert obs.otlp.failures["spans"] >= 1 and obs.otlp.failures["logs"] >= 1
    assert obs.otlp.exported == {"spans": 0, "logs": 0}
    failures = [e for e in seen if "OTLP export to" in str(e.get("message", ""))]
    assert len(failures) == 1
    assert len(list(tmp_path.glob("proxy-*.jsonl"))) == 2
    obs.otlp.stop(timeout=0)


def test_full_export_queue_drops_and_counts():
    """Past max_queue, events are dropped (counted) instead of growing memory."""
    exporter = otlp.from_environment("http://127.0.0.1:9", {}, max_queue=5)
    for n in range(10):
        exporter({"log_namespace": "clproxy.observe.request", "requestId": str(n), "time": 1.0})
    exporter({"log_namespace": "clproxy.proxy.dispatch", "log_format": "not ours"})
    assert exporter.pending == 5 and exporter.dropped == 5
    exporter.stop(timeout=0)


def test_missing_packages_mean_one_warning_and_unaffected_serving(tmp_path, monkeypatch):
    """With the endpoint set but OpenTelemetry not importable: one warning, no exporter, requests still served."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = make_clock()
        obs = Observability(clock=clock, logs_dir=str(tmp_path), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
        svc = obs.service()
        svc.startService()
        one_request(obs, clock, [])
        svc.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert obs.otlp is None and obs.otlp_problem
    warnings = [e for e in seen if "OpenTelemetry is not installed" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert len(list(tmp_path.glob("proxy-*.jsonl"))) == 2


def test_endpoint_comes_from_the_environment_and_signal_paths_are_appended():
    """OTEL_EXPORTER_OTLP_ENDPOINT gives /v1/traces and /v1/logs; per-signal variables win."""
    assert otlp.signal_endpoint("http://c:4318/", {}, "traces") == "http://c:4318/v1/traces"
    assert otlp.signal_endpoint("http://c:4318", {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://l/x"}, "logs") == "http://l/x"
    assert otlp.parse_headers("a=1, B=x%20y,broken") == {"a": "1", "b": "x y"}
    clock = make_clock()
    assert Observability(clock=clock, logs_dir=None, environ={}).otlp is None
    obs = Observability(clock=clock, logs_dir=None, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert obs.otlp is not None and obs.otlp.endpoint == "http://127.0.0.1:9"
    obs.otlp.stop(timeout=0)
