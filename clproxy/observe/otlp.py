"""OTLP/HTTP export of request and attempt spans and of the log records, off the reactor thread.

Optional (the ``otlp`` extra: opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http). The
observer only queues the ``clproxy.observe.*`` events (bounded; drops are counted); a worker thread
turns them into spans and log records and exports batches, so a slow or dead collector never
touches serving.
"""

import collections
import json
import logging
import threading
import time
import types
from typing import Dict, List, Mapping, Optional, Tuple

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

from clproxy import __version__
from clproxy.observe.jsonl import ATTEMPT_NAMESPACE, BODY_NAMESPACE, REQUEST_NAMESPACE, event_fields, redact_stream
from clproxy.observe.redact import redact_headers, redact_json_bytes, redact_text

#: A captured body is exported up to this many bytes (the full one is on disk).
BODY_EXPORT_LIMIT = 64 * 1024
DEFAULT_TIMEOUT = 5.0
_EVENT_NAMES = {REQUEST_NAMESPACE: "proxy.request", ATTEMPT_NAMESPACE: "proxy.attempt",
                BODY_NAMESPACE: "proxy.body_capture"}

# Record field -> span attribute (request and attempt spans share the identity ones).
_IDENTITY_ATTRIBUTES = (("sessionId", "session.id"), ("userId", "enduser.id"),
                        ("conversationId", "gen_ai.conversation.id"),
                        ("claudeSessionId", "clproxy.claude_session_id"),
                        ("requestId", "clproxy.request_id"))
_REQUEST_ATTRIBUTES = (("method", "http.request.method"), ("path", "url.path"),
                       ("status", "http.response.status_code"), ("model", "gen_ai.request.model"),
                       ("actualModel", "gen_ai.response.model"), ("provider", "clproxy.provider"),
                       ("account", "clproxy.account"), ("stream", "clproxy.stream"),
                       ("truncated", "clproxy.truncated"), ("attempts", "clproxy.attempts"),
                       ("refreshes", "clproxy.refreshes"), ("ttfbMs", "clproxy.ttfb_ms"),
                       ("durationMs", "clproxy.duration_ms"), ("substituted", "clproxy.model_substituted"),
                       ("inputTokens", "gen_ai.usage.input_tokens"),
                       ("outputTokens", "gen_ai.usage.output_tokens"),
                       ("cacheCreationInputTokens", "gen_ai.usage.cache_creation_input_tokens"),
                       ("cacheReadInputTokens", "gen_ai.usage.cache_read_input_tokens"),
                       ("error", "error.message")) + _IDENTITY_ATTRIBUTES
_ATTEMPT_ATTRIBUTES = (("attempt", "clproxy.attempt"), ("account", "clproxy.account"),
                       ("provider", "clproxy.provider"), ("model", "gen_ai.request.model"),
                       ("status", "http.response.status_code"),
                       ("classification", "clproxy.classification"), ("action", "clproxy.action"),
                       ("cooldownS", "clproxy.cooldown_s"), ("backoffLevel", "clproxy.backoff_level"),
                       ("durationMs", "clproxy.duration_ms"),
                       ("detail", "error.message")) + _IDENTITY_ATTRIBUTES


class OtlpUnavailable(Exception):
    """The OpenTelemetry packages are not installed (``pip install clproxy[otlp]``)."""


def load_sdk() -> types.SimpleNamespace:
    """The OpenTelemetry classes this module uses; raises :class:`OtlpUnavailable` without them."""
    try:
        from opentelemetry import trace as trace_api
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk._logs import ReadableLogRecord
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    except ImportError as e:
        raise OtlpUnavailable(str(e)) from e
    return types.SimpleNamespace(
        trace_api=trace_api, LogRecord=LogRecord, SeverityNumber=SeverityNumber,
        OTLPLogExporter=OTLPLogExporter, OTLPSpanExporter=OTLPSpanExporter,
        ReadableLogRecord=ReadableLogRecord, Resource=Resource, ReadableSpan=ReadableSpan,
        InstrumentationScope=InstrumentationScope, SpanContext=SpanContext, SpanKind=SpanKind,
        Status=Status, StatusCode=StatusCode, TraceFlags=TraceFlags)


def quiet_sdk_logging() -> None:
    """Keep the SDK's per-batch retry and failure messages off stderr (Python's last-resort handler):
    clproxy reports export trouble itself, once. A handler configured by the user still gets them."""
    sdk_logger = logging.getLogger("opentelemetry")
    if not any(isinstance(h, logging.NullHandler) for h in sdk_logger.handlers):
        sdk_logger.addHandler(logging.NullHandler())


def parse_headers(value: str) -> Dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value,key2=value2`` (URL-encoded values)."""
    from urllib.parse import unquote
    headers = {}
    for item in (value or "").split(","):
        if "=" in item:
            key, _, val = item.partition("=")
            if key.strip():
                headers[key.strip().lower()] = unquote(val.strip())
    return headers


def signal_endpoint(endpoint: str, environ: Mapping[str, str], signal: str) -> str:
    """The URL for ``traces`` or ``logs``: its own variable, else ``<endpoint>/v1/<signal>``."""
    specific = environ.get("OTEL_EXPORTER_OTLP_{}_ENDPOINT".format(signal.upper()), "").strip()
    if specific:
        return specific
    return endpoint.rstrip("/") + "/v1/" + signal


def from_environment(endpoint: str, environ: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT,
                     **options) -> "OtlpExport":
    """An exporter for ``endpoint`` (``OTEL_EXPORTER_OTLP_ENDPOINT``); raises OtlpUnavailable."""
    sdk = load_sdk()
    quiet_sdk_logging()
    headers = parse_headers(environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    spans = sdk.OTLPSpanExporter(endpoint=signal_endpoint(endpoint, environ, "traces"),
                                 headers=headers, timeout=timeout)
    logs = sdk.OTLPLogExporter(endpoint=signal_endpoint(endpoint, environ, "logs"),
                               headers=headers, timeout=timeout)
    resource = sdk.Resource.create({
        "service.name": environ.get("OTEL_SERVICE_NAME", "").strip() or "clproxy",
        "service.version": __version__,
    })
    return OtlpExport(sdk, spans, logs, resource, endpoint=endpoint, **options)


@implementer(ILogObserver)
class OtlpExport:
    """Observer of the ``clproxy.observe.*`` events; exports them from a worker thread.

    ``max_queue`` bounds the queued events and ``max_queue_bytes`` the queued body captures
    (beyond either: dropped, counted in ``dropped``); batches of up to ``batch_size`` are sent
    every ``interval`` seconds or as soon as a batch is full.
    """

    def __init__(self, sdk, span_exporter, log_exporter, resource, *, endpoint: str = "",
                 max_queue: int = 8192, batch_size: int = 512, interval: float = 1.0,
                 max_queue_bytes: int = 64 * 1024 * 1024):
        self.sdk = sdk
        self.span_exporter = span_exporter
        self.log_exporter = log_exporter
        self.resource = resource
        self.endpoint = endpoint
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        # Body bytes queued = added (reactor thread only) - removed (worker only): no shared counter.
        self._bytes_added = 0
        self._bytes_removed = 0
        self.batch_size = batch_size
        self.interval = interval
        self.scope = sdk.InstrumentationScope("clproxy", __version__)
        self._queue = collections.deque()
        self.dropped = 0
        self.exported = {"spans": 0, "logs": 0}
        self.failures = {"spans": 0, "logs": 0}
        self._failing = False
        self._notes = collections.deque(maxlen=64)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # --- the reactor side -----------------------------------------------------------------------

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") not in _EVENT_NAMES:
            return
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        if event["log_namespace"] == BODY_NAMESPACE:
            # a capture holds a whole body (up to 32 MiB): with the collector down, a count alone
            # let the queue hold thousands of them
            size = len(event.get("body") or b"")
            if self._bytes_added - self._bytes_removed + size > self.max_queue_bytes:
                self.dropped += 1
                return
            self._bytes_added += size
        queue.append(event)
        if len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def take_notes(self) -> List[Tuple[str, str]]:
        """Warnings to log, each once; called from the reactor thread."""
        notes = []
        while self._notes:
            notes.append(self._notes.popleft())
        return notes

    @property
    def pending(self) -> int:
        """Events queued and not yet exported."""
        return len(self._queue)

    # --- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clproxy-otlp-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Export what is queued (for at most ``timeout`` seconds), then shut the exporters down."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
        for exporter in (self.span_exporter, self.log_exporter):
            try:
                exporter.shutdown()
            except Exception:
                pass

    def flush(self) -> None:
        """Export everything queued now, in the calling thread (tests, shutdown)."""
        with self._lock:
            while self._queue:
                self._export_batch()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception as e:  # never let the worker die
                self._notes.append(("warn", "OTLP export error: {}: {}".format(type(e).__name__, e)))
            if self._stopping:
                return

    def _export_batch(self) -> None:
        spans, logs = [], []
        queue = self._queue
        for n in range(min(self.batch_size, len(queue))):
            event = queue.popleft()
            if event["log_namespace"] == BODY_NAMESPACE:
                self._bytes_removed += len(event.get("body") or b"")
            if n % 64 == 63:
                time.sleep(0)  # let the reactor thread have the GIL between conversions
            try:
                self._convert(event, spans, logs)
            except Exception as e:
                self._notes.append(("warn", "OTLP record skipped: {}: {}".format(type(e).__name__, e)))
        if spans:
            self._send("spans", self.span_exporter, spans)
        if logs:
            self._send("logs", self.log_exporter, logs)

    def _send(self, signal: str, exporter, batch: list) -> None:
        try:
            result = exporter.export(batch)
            ok = getattr(result, "name", str(result)) == "SUCCESS"
        except Exception:
            ok = False
        if ok:
            self.exported[signal] += len(batch)
            if self._failing:
                self._failing = False
                self._notes.append(("info", "OTLP export to {} works again".format(self.endpoint)))
            return
        self.failures[signal] += 1
        if not self._failing:
            self._failing = True
            self._notes.append(("warn", "OTLP export to {} failed; spans and log records are dropped "
                                        "while the collector is unreachable".format(self.endpoint)))

    # --- conversion -----------------------------------------------------------------------------

    def _convert(self, event: dict, spans: list, logs: list) -> None:
        namespace = event["log_namespace"]
        fields = event_fields(event)
        sampled = fields.get("traceFlags", "01") != "00"
        if namespace == REQUEST_NAMESPACE:
            if sampled:
                spans.append(self._request_span(fields))
        elif namespace == ATTEMPT_NAMESPACE:
            if sampled:
                spans.append(self._attempt_span(fields))
        logs.append(self._log_record(namespace, event, fields))

    def _context(self, trace_id: str, span_id: str, remote: bool = False):
        sdk = self.sdk
        return sdk.SpanContext(trace_id=int(trace_id, 16), span_id=int(span_id, 16), is_remote=remote,
                               trace_flags=sdk.TraceFlags(sdk.TraceFlags.SAMPLED))

    def _span(self, name: str, kind, fields: dict, attributes: dict, error: bool, parent_id,
              remote_parent: bool):
        sdk = self.sdk
        end = fields["time"]
        start = end - (fields.get("durationMs") or 0) / 1000.0
        parent = self._context(fields["traceId"], parent_id, remote=remote_parent) if parent_id else None
        status = sdk.Status(sdk.StatusCode.ERROR) if error else sdk.Status(sdk.StatusCode.UNSET)
        return sdk.ReadableSpan(
            name=name, context=self._context(fields["traceId"], fields["spanId"]), parent=parent,
            resource=self.resource, attributes=attributes, kind=kind, status=status,
            start_time=_ns(start), end_time=_ns(end), instrumentation_scope=self.scope)

    def _request_span(self, fields: dict):
        attributes = _attributes(fields, _REQUEST_ATTRIBUTES)
        status = fields.get("status") or 0
        error = status >= 500 or bool(fields.get("error")) or bool(fields.get("truncated"))
        # its parent, when there is one, is the caller's span (remote): the caller's trace goes on
        # the path is the client's (/v1/models/{id} takes any model id, a pasted key too): redacted
        # like the url.path attribute
        name = redact_text("{} {}".format(fields.get("method"), fields.get("path")))
        return self._span(name, self.sdk.SpanKind.SERVER, fields, attributes, error, fields.get("parentSpanId"),
                          True)

    def _attempt_span(self, fields: dict):
        attributes = _attributes(fields, _ATTEMPT_ATTRIBUTES)
        error = fields.get("classification") != "ok"
        # its parent is this process's request span
        return self._span("upstream {}".format(fields.get("provider") or "attempt"),
                          self.sdk.SpanKind.CLIENT, fields, attributes, error, fields.get("parentSpanId"),
                          False)

    def _log_record(self, namespace: str, event: dict, fields: dict):
        sdk = self.sdk
        severity, text = _severity(namespace, fields, sdk.SeverityNumber)
        flat = {}
        for key, value in fields.items():
            if value is None or key in _NOT_ATTRIBUTES:
                continue
            flat[key] = _safe_attribute(value)
        if namespace == BODY_NAMESPACE:
            body = fields.get("body") or b""
            if fields.get("headers") is not None:
                pairs = redact_headers(fields["headers"])
                flat["headers"] = "; ".join("{}: {}".format(n, v) for n, v in pairs)
            flat["bytes"] = len(body)
            if fields.get("streamed"):
                raw, assembled = redact_stream(body)
                safe = raw if raw is not None else json.dumps(assembled, ensure_ascii=False).encode("utf-8")
            else:
                safe = redact_json_bytes(body)
            message = safe[:BODY_EXPORT_LIMIT].decode("utf-8", "replace")
        else:
            message = redact_text(_message(event, fields))
        context = None
        if fields.get("traceId") and fields.get("spanId"):
            context = sdk.trace_api.set_span_in_context(
                sdk.trace_api.NonRecordingSpan(self._context(fields["traceId"], fields["spanId"])))
        moment = _ns(fields.get("time") or event.get("log_time") or time.time())
        record = sdk.LogRecord(timestamp=moment, observed_timestamp=moment, context=context,
                               severity_text=text, severity_number=severity, body=message,
                               attributes=flat, event_name=_EVENT_NAMES[namespace])
        return sdk.ReadableLogRecord(log_record=record, resource=self.resource,
                                     instrumentation_scope=self.scope)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


_PRIMITIVE = (int, float, bool)
_NOT_ATTRIBUTES = frozenset({"body", "headers", "time"})


def _safe_attribute(value):
    """An OTLP attribute value: numbers and booleans as they are, anything else as redacted text."""
    kind = type(value)
    if kind is str:
        return redact_text(value)
    if kind in _PRIMITIVE:
        return value
    if isinstance(value, (bytes, bytearray)):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    return redact_text(str(value))


def _attributes(fields: dict, names) -> dict:
    attributes = {}
    for field, attribute in names:
        value = fields.get(field)
        if value is not None:
            attributes[attribute] = _safe_attribute(value)
    return attributes


def _message(event: dict, fields: dict) -> str:
    """The event's format string filled in (plain ``str.format``: these formats name fields only)."""
    try:
        return event["log_format"].format(**fields)
    except Exception:
        return formatEvent(event)


def _severity(namespace: str, fields: dict, numbers) -> Tuple[object, str]:
    if namespace == BODY_NAMESPACE:
        return numbers.DEBUG, "DEBUG"
    if namespace == ATTEMPT_NAMESPACE:
        return (numbers.INFO, "INFO") if fields.get("classification") == "ok" else (numbers.WARN, "WARN")
    status = fields.get("status") or 0
    if status >= 500 or fields.get("error"):
        return numbers.ERROR, "ERROR"
    if status >= 400 or fields.get("truncated"):
        return numbers.WARN, "WARN"
    return numbers.INFO, "INFO"
