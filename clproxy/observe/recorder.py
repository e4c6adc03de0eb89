"""What the dispatcher tells the observability layer about one request, and where it goes.

``Observability.begin`` opens a :class:`RequestRecord`; its ``attempt`` and ``finish`` each emit one
``Logger`` event with named fields, observed by the JSONL writer and the OTLP exporter (both
off-thread) and counted in the metrics. Nothing here encodes JSON or touches a file.
"""

import json
import os
import re
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger, LogLevel

from clproxy.observe import console
from clproxy.observe.activity import Activity
from clproxy.observe.jsonl import ATTEMPT_NAMESPACE, BODY_NAMESPACE, REQUEST_NAMESPACE, JsonlWriter
from clproxy.observe.metrics import MetricsBook, MetricsResource
from clproxy.observe.redact import redact_value
from clproxy.observe.trace import format_traceparent, new_span_id, new_trace_id, read_inbound
from zope.interface import implementer

from clproxy.interfaces import IRequestObserver, IRequestRecord

log = console.logger(__name__)

#: Header names the proxy owns upstream: remove the client's before adding ``outbound_headers()``.
TRACE_HEADERS = (b"traceparent", b"tracestate")
#: A streamed response captured for debugging is kept up to this many bytes.
CAPTURE_LIMIT = 32 * 1024 * 1024
RETENTION_INTERVAL = 3600.0
HOUSEKEEPING_INTERVAL = 5.0

_INFO = LogLevel.info
_DEBUG = LogLevel.debug
_REQUEST_FORMAT = "{method} {path} -> {status} model={model} account={account} {durationMs}ms"
_ATTEMPT_FORMAT = "attempt {attempt} {requestId} account={account} -> {status} {classification}"
_BODY_FORMAT = "captured {phase} body of {requestId} ({streamed})"


class RecordLogger(Logger):
    """A ``Logger`` for the per-request records: the same events, minus ``Logger.emit``'s per-call
    check that ``level`` is a ``LogLevel`` (the levels used here are constants; the check costs
    more than the rest of the emit)."""

    def emit(self, level, format=None, **kwargs):
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        self.observer(kwargs)


def fan_out(observers):
    """One observer calling each of ``observers``; a failing one never reaches the caller."""
    observers = tuple(observers)

    def observe(event):
        for observer in observers:
            try:
                observer(event)
            except Exception:
                pass  # an observer only queues; serving must not pay for its bug

    return observe


#: Fields of a record never echoed to the console: a body capture's raw bytes and headers.
_NOT_ECHOED = frozenset({"body", "headers"})


def echo_to_console(event: dict) -> None:
    """Pass a record to the console (``--debug``) as a copy with every field redacted and no
    captured body or headers: the JSONL and OTLP observers redact what they write, but the console
    (twistd's log file, or any observer a user adds there) would get a client's key in a model name
    or a path as it came. Only with ``--debug``: the copy costs nothing otherwise."""
    console.gate({key: value if key.startswith("log_") else redact_value(value)
                  for key, value in event.items() if key not in _NOT_ECHOED})


@implementer(IRequestObserver)
class Observability:
    """The request log families, metrics, trace context and OTLP export of one daemon.

    ``usage_sink(fields)``, when set, is called once per finished request with a dict of
    ``key_name, account_name, provider, model, usage, status, duration, at`` (see
    :meth:`RequestRecord.finish`); its failure is logged, never the request's.

    ``clock`` (``IReactorTime``) gives every timestamp and drives retention; ``logs_dir`` None
    disables the JSONL files. ``otlp_endpoint`` (else ``OTEL_EXPORTER_OTLP_ENDPOINT`` in ``environ``)
    turns on OTLP export when the ``otlp`` extra is installed; ``otlp_timeout`` bounds one export
    (and how long ``stopService`` waits for the last one). ``echo`` also sends the records to the
    console (at info level: use it with ``--debug``).
    """

    def __init__(self, *, clock, logs_dir: Optional[str], retention_days: float = 7,
                 max_total_mb: float = 500, debug_bodies: bool = False,
                 otlp_endpoint: Optional[str] = None, environ: Mapping[str, str] = os.environ,
                 echo: bool = False, max_pending: int = 100_000, otlp_timeout: float = 5.0,
                 usage_sink: Optional[Callable[[dict], None]] = None):
        self.clock = clock
        #: told once per finished request (``RequestRecord.finish``) with its usage fields: the team
        #: usage ledger and counters (None: nobody listens). Settable after construction.
        self.usage_sink = usage_sink
        self.logs_dir = logs_dir
        self.retention_days = retention_days
        self.max_total_bytes = int(max_total_mb * 1024 * 1024)
        self.metrics = MetricsBook(clock)
        #: the last hour of traffic and the last requests, for the dashboard (bounded, in memory)
        self.activity = Activity(clock)
        self.writer = JsonlWriter(logs_dir, max_pending=max_pending) if logs_dir else None
        self.otlp = None
        self.otlp_timeout = otlp_timeout
        self.otlp_endpoint = (otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")).strip() or None
        #: why OTLP export is off although an endpoint is set (None when it is on or not asked for)
        self.otlp_problem: Optional[str] = None
        if self.otlp_endpoint:
            from clproxy.observe import otlp
            try:
                self.otlp = otlp.from_environment(self.otlp_endpoint, environ, timeout=otlp_timeout)
            except otlp.OtlpUnavailable as e:
                self.otlp_problem = str(e)
                log.warn("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({why}); "
                         "spans and log records are not exported. Install it with "
                         "`pip install 'clproxy[otlp]'`.", why=self.otlp_problem)
        observers = [o for o in (self.writer, self.otlp) if o is not None]
        #: body captures need somewhere to go (a logs dir or OTLP)
        self.debug_bodies = bool(debug_bodies) and bool(observers)
        if echo:
            observers.append(echo_to_console)
        self._emitting = bool(observers)
        self._observe = fan_out(observers)
        self._request_log = RecordLogger(namespace=REQUEST_NAMESPACE, observer=self._observe)
        self._attempt_log = RecordLogger(namespace=ATTEMPT_NAMESPACE, observer=self._observe)
        self._body_log = RecordLogger(namespace=BODY_NAMESPACE, observer=self._observe)
        self.metrics.extra.append(self._own_metrics)
        self._snapshot: Optional[Callable[[], object]] = None
        self._service: Optional[service.MultiService] = None
        self._metrics_resource: Optional[MetricsResource] = None

    # --- wiring ---------------------------------------------------------------------------------

    def service(self) -> service.IService:
        """A service that starts the writer and exporter threads, applies retention at start and
        hourly, and flushes and stops everything on ``stopService``."""
        if self._service is None:
            self._service = _ObservabilityService(self)
        return self._service

    def metrics_resource(self) -> MetricsResource:
        """The ``GET /metrics`` resource (a leaf: ``root.putChild(b"metrics", ...)``); one per daemon,
        so that a worker of ``--workers N`` can give it the sums over every worker."""
        if self._metrics_resource is None:
            self._metrics_resource = MetricsResource(self.metrics, self._pool_snapshot)
        return self._metrics_resource

    def watch_pool(self, pool, accounts: Callable[[], Sequence]) -> None:
        """Read the per-account gauges from ``pool.snapshot(accounts())`` at every scrape (without
        it they follow the attempts' verdicts, and miss cooldowns applied outside an attempt)."""
        self._snapshot = lambda: pool.snapshot(list(accounts()))

    def _pool_snapshot(self):
        return None if self._snapshot is None else self._snapshot()

    def status(self) -> dict:
        """Observability state for ``/status`` (``{"logs": ..., "otlp": ...}``)."""
        document = {}
        if self.writer is not None:
            document["logs"] = {"dir": self.logs_dir, "pending": self.writer.pending,
                                "written": dict(self.writer.written), "dropped": dict(self.writer.dropped),
                                "lastError": self.writer.last_error, "debugBodies": self.debug_bodies}
        if self.otlp is not None:
            document["otlp"] = {"endpoint": self.otlp_endpoint, "pending": self.otlp.pending,
                                "dropped": self.otlp.dropped, "exported": dict(self.otlp.exported),
                                "failedBatches": dict(self.otlp.failures)}
        return document

    def refresh(self, account_name: Optional[str], ok: bool) -> None:
        """An OAuth refresh outside any request (startup check, health loop): counted in metrics."""
        self.metrics.refresh(account_name or "-", ok)

    def flush(self) -> None:
        """Write and export everything queued, in the calling thread. For tests and tools: it blocks
        on disk and on the collector, so the daemon never calls it on the reactor thread."""
        if self.writer is not None:
            self.writer.sync()
        if self.otlp is not None:
            self.otlp.flush()
        self.housekeeping()

    def housekeeping(self) -> None:
        """Log the writer's and exporter's warnings (each once) from the reactor thread."""
        for source in (self.writer, self.otlp):
            if source is not None:
                for level, message in source.take_notes():
                    getattr(log, level)("{message}", message=message)

    def prune(self) -> None:
        """Apply retention now (in the writer thread; ``flush`` does it at once)."""
        if self.writer is not None:
            self.writer.request_prune(self.clock.seconds(), self.retention_days, self.max_total_bytes)

    def _own_metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        if self.writer is not None:
            dropped = CounterMetricFamily("clproxy_log_records_dropped",
                                          "Log records lost (buffer full or write error).",
                                          labels=("reason",))
            for reason, count in self.writer.dropped.items():
                dropped.add_metric([reason], count)
            yield dropped
            yield GaugeMetricFamily("clproxy_log_records_pending", "Log records queued for the writer.",
                                    value=self.writer.pending)
        if self.otlp is not None:
            yield CounterMetricFamily("clproxy_otlp_records_dropped",
                                      "Spans/log events dropped because the export queue was full.",
                                      value=self.otlp.dropped)
            failures = CounterMetricFamily("clproxy_otlp_export_failures",
                                           "OTLP batches that failed to export.", labels=("signal",))
            for signal, count in self.otlp.failures.items():
                failures.add_metric([signal], count)
            yield failures

    # --- the hot path ---------------------------------------------------------------------------

    def begin(self, *, request_id: str, method, path, model: Optional[str], stream: bool,
              headers: Sequence[Tuple[bytes, bytes]], body: Optional[bytes]) -> "RequestRecord":
        """Open the record of one request (call as soon as it is parsed)."""
        record = RequestRecord(self, request_id, method, path, model, stream, headers)
        self.metrics.in_flight += 1
        if self.debug_bodies:
            record._capture("request", 0, headers, body or b"", False)
        return record


@implementer(IRequestRecord)
class RequestRecord:
    """One request's trace ids, timings, usage and attempts; ``finish`` writes its summary.

    What the answer turned out to be can be set as it becomes known, and ``finish`` uses it unless
    told otherwise: ``account`` and ``provider`` (the last attempt's, set by ``attempt``),
    ``actual_model``, ``truncated`` and ``error``.
    """

    __slots__ = ("_obs", "request_id", "method", "path", "model", "stream", "started", "trace_id",
                 "span_id", "parent_span_id", "trace_flags", "tracestate", "session_id", "user_id",
                 "conversation_id", "claude_session_id", "ttfb", "_usage", "attempts", "refreshes",
                 "_next_attempt_span", "_attempt_started", "finished", "_chunks", "_chunk_bytes",
                 "_chunk_meta", "_responses", "account", "provider", "actual_model", "truncated", "error",
                 "key_name", "attempt_rows")

    def __init__(self, obs: Observability, request_id: str, method, path, model, stream: bool,
                 headers: Sequence[Tuple[bytes, bytes]]):
        self._obs = obs
        self.request_id = request_id
        self.method = method.decode("latin-1") if isinstance(method, bytes) else method
        self.path = path.decode("latin-1") if isinstance(path, bytes) else path
        self.model = model
        self.stream = stream
        self.started = obs.clock.seconds()
        inbound = read_inbound(headers)
        self.trace_id = inbound.trace_id or new_trace_id()
        self.parent_span_id = inbound.parent_span_id
        self.trace_flags = inbound.flags
        self.tracestate = inbound.tracestate
        self.span_id = new_span_id()
        self.session_id = inbound.session_id
        self.user_id = inbound.user_id
        self.conversation_id = inbound.conversation_id
        self.claude_session_id = inbound.claude_session_id
        self.ttfb: Optional[float] = None
        self._usage: Optional[dict] = None
        self.attempts = 0
        self.refreshes = 0
        self._next_attempt_span: Optional[str] = None
        self._attempt_started: Optional[float] = None
        self.finished = False
        self._chunks: Optional[list] = None
        self._chunk_bytes = 0
        self._chunk_meta = None
        self._responses = 0
        self.account: Optional[str] = None
        self.provider = "anthropic"
        self.actual_model: Optional[str] = None
        self.truncated = False
        self.error: Optional[str] = None
        #: the client key's name (team mode; never the key), set by the dispatcher; None without keys
        self.key_name: Optional[str] = None
        #: each attempt's dashboard row (account, provider, status, classification, durationMs)
        self.attempt_rows: List[dict] = []

    def outbound_headers(self) -> List[Tuple[bytes, bytes]]:
        """``traceparent`` (and ``tracestate``) for the next upstream attempt; call once per attempt,
        right before sending, after removing the client's :data:`TRACE_HEADERS`."""
        span = self._next_attempt_span = new_span_id()
        self._attempt_started = self._obs.clock.seconds()
        headers = [(b"traceparent", format_traceparent(self.trace_id, span, self.trace_flags))]
        if self.tracestate:
            headers.append((b"tracestate", self.tracestate.encode("ascii")))
        return headers

    def attempt(self, *, account_name: Optional[str], provider: str, model: Optional[str],
                status: Optional[int], verdict, duration: Optional[float] = None) -> None:
        """One upstream attempt got its verdict (``clproxy.routing.policy.Verdict``, or None when there is
        none, e.g. a translated provider). ``duration`` in seconds; None means since the last
        ``outbound_headers()`` call (the attempt's start)."""
        obs = self._obs
        now = obs.clock.seconds()
        if duration is None:
            duration = now - self._attempt_started if self._attempt_started is not None else 0.0
        self._attempt_started = None
        self.attempts += 1
        self.account, self.provider = account_name, provider
        span = self._next_attempt_span or new_span_id()
        self._next_attempt_span = None
        if verdict is not None:
            classification, action = verdict.reason, verdict.action
            cooldown, level, detail = verdict.cooldown, verdict.backoff_level, verdict.detail
        else:
            ok = status is not None and status < 400
            classification, action = ("ok", "success") if ok else ("error", "next")
            cooldown = level = detail = None
        account = account_name or "-"
        model = model or self.model
        if obs._emitting:
            obs._attempt_log.emit(
                _INFO, _ATTEMPT_FORMAT, requestId=self.request_id, attempt=self.attempts, account=account,
                provider=provider, model=model, status=status, classification=classification,
                action=action, cooldownS=cooldown, backoffLevel=level,
                durationMs=round(duration * 1000, 3), detail=detail, traceId=self.trace_id,
                spanId=span, parentSpanId=self.span_id, traceFlags=self.trace_flags,
                sessionId=self.session_id, userId=self.user_id, conversationId=self.conversation_id,
                claudeSessionId=self.claude_session_id, time=now)
        obs.metrics.attempt(status, account, model or "-", provider, classification, cooldown, level,
                            duration, now)
        self.attempt_rows.append({"account": account_name, "provider": provider, "status": status,
                                  "classification": classification,
                                  "durationMs": round(duration * 1000, 3)})
        if status == 429:
            obs.activity.rate_limited(now)

    def first_byte(self) -> None:
        """The client gets its first byte now (status line of a stream, or a whole answer)."""
        if self.ttfb is None:
            self.ttfb = self._obs.clock.seconds() - self.started

    def usage(self, usage: Optional[dict]) -> None:
        """Merge an Anthropic ``usage`` dict (later values win: message_start, then message_delta)."""
        if not usage:
            return
        if self._usage is None:
            self._usage = {}
        for key, value in usage.items():
            if value is not None:
                self._usage[key] = value

    def output_at_least(self, tokens: int) -> None:
        """Count at least ``tokens`` output tokens (an estimate for a stream cut before its final
        usage; an exact count already higher stays)."""
        if self._usage is None:
            self._usage = {}
        if tokens > (self._usage.get("output_tokens") or 0):
            self._usage["output_tokens"] = tokens

    def tee(self, write: Callable[[bytes], None], status: Optional[int] = None,
            headers=None) -> Callable[[bytes], None]:
        """``write`` itself, or (with debug bodies) a ``write`` that also keeps the chunks, up to
        :data:`CAPTURE_LIMIT`, for the streamed response capture written by ``finish``."""
        if not self._obs.debug_bodies:
            return write
        self._chunks = []
        self._chunk_meta = (status, headers)

        def capture(data: bytes) -> None:
            if self._chunk_bytes < CAPTURE_LIMIT:
                self._chunks.append(data)
                self._chunk_bytes += len(data)
            write(data)

        return capture

    def response_body(self, status: int, headers, body: bytes, streamed: bool) -> None:
        """Capture a response body (only with debug bodies; SSE bytes when ``streamed``)."""
        if self._obs.debug_bodies:
            self._responses += 1
            self._capture("response", self._responses, headers, body or b"", streamed, status)

    def refresh(self, account_name: Optional[str], ok: bool) -> None:
        """An OAuth refresh happened for this request (counted in its summary and in metrics)."""
        self.refreshes += 1
        self._obs.refresh(account_name, ok)

    def finish(self, *, status: int, account_name: Optional[str] = None, provider: Optional[str] = None,
               actual_model: Optional[str] = None, truncated: Optional[bool] = None,
               error: Optional[str] = None, substituted: Optional[bool] = None) -> None:
        """The request is answered: write its summary, end its span, count it. Later calls are
        ignored. Arguments left None take the record's fields (``account``, ``provider``,
        ``actual_model``, ``truncated``, ``error``). ``substituted`` None means: a model other than
        the requested one answered on a provider other than Anthropic (an Anthropic alias resolving
        to a dated id is no substitution)."""
        if self.finished:
            return
        self.finished = True
        account_name = self.account if account_name is None else account_name
        provider = self.provider if provider is None else provider
        actual_model = self.actual_model if actual_model is None else actual_model
        truncated = self.truncated if truncated is None else truncated
        error = self.error if error is None else error
        obs = self._obs
        now = obs.clock.seconds()
        duration = now - self.started
        obs.metrics.in_flight -= 1
        if self._chunks is not None:
            self._responses += 1
            meta_status, meta_headers = self._chunk_meta
            self._capture("response", self._responses, meta_headers, b"".join(self._chunks), True,
                          meta_status or status)
            self._chunks = None
        usage = self._usage or {}
        account = account_name or "-"
        requested = self.model or "-"
        if substituted is None:
            substituted = bool(actual_model and self.model and actual_model != self.model
                               and provider != "anthropic")
        if obs._emitting:
            ttfb = self.ttfb
            obs._request_log.emit(
                _INFO, _REQUEST_FORMAT, requestId=self.request_id, method=self.method, path=self.path,
                model=self.model, actualModel=actual_model, substituted=substituted, provider=provider,
                account=account, status=status, durationMs=round(duration * 1000, 3),
                ttfbMs=None if ttfb is None else round(ttfb * 1000, 3), stream=self.stream,
                truncated=truncated, attempts=self.attempts, refreshes=self.refreshes,
                inputTokens=usage.get("input_tokens"), outputTokens=usage.get("output_tokens"),
                cacheCreationInputTokens=usage.get("cache_creation_input_tokens"),
                cacheReadInputTokens=usage.get("cache_read_input_tokens"), error=error,
                traceId=self.trace_id, spanId=self.span_id, parentSpanId=self.parent_span_id,
                traceFlags=self.trace_flags, sessionId=self.session_id, userId=self.user_id,
                conversationId=self.conversation_id, claudeSessionId=self.claude_session_id, time=now)
        metrics = obs.metrics
        metrics.request_finished(status, account, requested, provider, duration, self.ttfb, usage, truncated)
        if substituted and actual_model:
            metrics.substitution(requested, actual_model, provider)
        obs.activity.finished({
            "at": now, "started": self.started, "id": self.request_id, "key": self.key_name,
            "model": actual_model or self.model, "requestedModel": self.model, "account": account_name,
            "provider": provider, "status": status, "durationMs": round(duration * 1000, 3),
            "ttfbMs": None if self.ttfb is None else round(self.ttfb * 1000, 3), "stream": self.stream,
            "truncated": bool(truncated), "error": error,
            "tokens": {"input": usage.get("input_tokens"), "output": usage.get("output_tokens"),
                       "cacheRead": usage.get("cache_read_input_tokens"),
                       "cacheCreation": usage.get("cache_creation_input_tokens")},
            "attempts": self.attempt_rows})
        sink = obs.usage_sink
        if sink is not None:
            try:
                sink({"key_name": self.key_name, "account_name": account_name, "provider": provider,
                      "model": actual_model or self.model, "usage": usage, "status": status,
                      "duration": duration, "at": now})
            except Exception:
                log.failure("usage recording failed for {requestId}", requestId=self.request_id)

    def _capture(self, phase: str, seq: int, headers, body: bytes, streamed: bool,
                 status: Optional[int] = None) -> None:
        obs = self._obs
        obs._body_log.emit(
            _DEBUG, _BODY_FORMAT, requestId=self.request_id, phase=phase, seq=seq, status=status,
            method=self.method, path=self.path, streamed=streamed, headers=_header_pairs(headers),
            body=body, traceId=self.trace_id, spanId=self.span_id, traceFlags=self.trace_flags,
            time=obs.clock.seconds())


def _header_pairs(headers) -> List[Tuple[bytes, bytes]]:
    """Raw pairs from a list of pairs, ``[(name, [values])]`` or a twisted ``Headers``."""
    if headers is None:
        return []
    if hasattr(headers, "getAllRawHeaders"):
        headers = list(headers.getAllRawHeaders())
    pairs = []
    for name, value in headers:
        if isinstance(value, (list, tuple)):
            pairs.extend((name, v) for v in value)
        else:
            pairs.append((name, value))
    return pairs


class _ObservabilityService(service.MultiService):
    """Starts the threads and timers of an :class:`Observability`; flushes and stops them."""

    def __init__(self, obs: Observability):
        super().__init__()
        self.obs = obs
        self._loops: List[task.LoopingCall] = []

    def startService(self):
        super().startService()
        obs = self.obs
        if obs.writer is not None:
            obs.writer.start()
        if obs.otlp is not None:
            obs.otlp.start()
        for interval, call in ((RETENTION_INTERVAL, obs.prune), (HOUSEKEEPING_INTERVAL, obs.housekeeping)):
            loop = task.LoopingCall(call)
            loop.clock = obs.clock
            loop.start(interval, now=True).addErrback(
                lambda f: log.failure("observability timer failed", f))
            self._loops.append(loop)

    def stopService(self):
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        obs = self.obs
        if obs.writer is not None:
            obs.writer.stop()
        if obs.otlp is not None:
            obs.otlp.stop(timeout=min(3.0, obs.otlp_timeout))
        obs.housekeeping()
        return super().stopService()


# --- usage and model from Anthropic responses (cheap: a bytes search and a bounded JSON decode) -----

_AFTER_USAGE = re.compile(rb'\s*:\s*\{')
_AFTER_MODEL = re.compile(rb'\s*:\s*"((?:[^"\\]|\\.){1,200})"')
_DECODER = json.JSONDecoder()
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_CACHE_TTL_FIELDS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
#: How much of the end of a response is searched for its usage.
TAIL_BYTES = 4096
#: A usage object is decoded from at most this many bytes (it is a few hundred).
_USAGE_WINDOW = 2048


#: The most tokens one usage field may count: far beyond any context window. A larger (or a
#: negative) number is no usage but a broken or hostile upstream's, and would corrupt the ledger's
#: sums, the limits and the metrics (a Python int of 400 digits cannot even become a float).
_MAX_TOKENS = 10 ** 9
#: What may follow the top-level object's last ``usage`` member: scalar members, then its end.
_TOP_LEVEL_END = re.compile(r'\s*(?:,\s*"(?:[^"\\]|\\.)*"\s*:\s*(?:null|true|false|-?[0-9][0-9.eE+-]*'
                            r'|"(?:[^"\\]|\\.)*"))*\s*\}\s*\Z')


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value <= _MAX_TOKENS  # not bool, float, str, negative, huge


def _clean(value: dict) -> dict:
    """The token counts of a decoded usage object (anything else in it ignored)."""
    found = {k: value[k] for k in _USAGE_FIELDS if _is_count(value.get(k))}
    detail = value.get("cache_creation")
    if isinstance(detail, dict):  # the 5-minute / 1-hour split of the cache writes (usage ledger)
        split = {k: detail[k] for k in _CACHE_TTL_FIELDS if _is_count(detail.get(k))}
        if split:
            found["cache_creation"] = split
    return found


def _decode(text: str):
    """``(value, end)`` of the JSON value at the start of ``text``; None when there is none.
    RecursionError too: a deeply nested value must not escape to the caller (the reactor)."""
    try:
        return _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None


def _usages(data: bytes, end: int):
    """The ``"usage": {...}`` objects of a JSON text (not ones quoted inside a string), last first,
    as ``(decoded object, where its key starts)``; stops at the first that does not decode."""
    while True:
        at = data.rfind(b'"usage"', 0, end)
        if at < 0:
            return
        end = at
        if at and data[at - 1] == 0x5C:  # \"usage\": inside a JSON string, not a key
            continue
        match = _AFTER_USAGE.match(data, at + 7)
        if match is None:
            continue
        start = match.end() - 1
        decoded = _decode(data[start:start + _USAGE_WINDOW].decode("utf-8", "replace"))
        if decoded is None:
            decoded = _decode(data[start:].decode("utf-8", "replace"))
        if decoded is None or not isinstance(decoded[0], dict):
            return
        yield decoded[0], at


def _last_usage(data: bytes) -> dict:
    """The last ``"usage": {...}`` object of a JSON text (not one quoted inside a string)."""
    for value, _ in _usages(data, len(data)):
        return _clean(value)
    return {}


def usage_from_sse_tail(tail: bytes) -> dict:
    """The usage in the end of an SSE stream: its ``message_start``'s (when still in it) merged
    with its last ``message_delta``'s, later values winning.

    Pass the last ~1-4 KiB; only the last ``TAIL_BYTES`` are looked at. ``{}`` when none is there.
    """
    tail = tail[-TAIL_BYTES:]
    found = _usages(tail, len(tail))
    last = next(found, None)
    if last is None:
        return {}
    usage = _clean(last[0])
    # a message_delta may carry output_tokens only: the input and cache counts of a short stream
    # are then in its message_start, also in the tail (in passthrough mode nothing else reads them)
    started = tail.rfind(b'"message_start"', 0, last[1])
    earlier = next(found, None) if started >= 0 else None
    if earlier is not None and earlier[1] > started:
        merged = _clean(earlier[0])
        merged.update(usage)
        usage = merged
    return usage


def usage_from_message(body: bytes) -> dict:
    """The usage of a non-streaming Messages API response.

    Cheap when, as Anthropic sends it, ``usage`` is the answer's last object member (only the
    end is searched); otherwise the answer is decoded whole: a ``"usage"`` key in a tool's input
    is not the answer's usage.
    """
    tail = body[-TAIL_BYTES:]
    at = tail.rfind(b'"usage"')
    match = _AFTER_USAGE.match(tail, at + 7) if at >= 0 and (at == 0 or tail[at - 1] != 0x5C) else None
    if match is not None:
        text = tail[match.end() - 1:].decode("utf-8", "replace")
        decoded = _decode(text)
        if decoded is not None and isinstance(decoded[0], dict) and _TOP_LEVEL_END.match(text, decoded[1]):
            return _clean(decoded[0])
    decoded = _decode(body.decode("utf-8", "replace").strip())
    usage = decoded[0].get("usage") if decoded is not None and isinstance(decoded[0], dict) else None
    return _clean(usage) if isinstance(usage, dict) else {}


def usage_from_event(data) -> dict:
    """The usage in one SSE event's data: ``message_start`` (``message.usage``) or ``message_delta``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _last_usage(data)


def model_from_message(data) -> Optional[str]:
    """The ``model`` of a Messages API response or of a ``message_start`` event's data (its start)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    at = data.find(b'"model"', 0, 2048)
    while at >= 0:
        if not at or data[at - 1] != 0x5C:
            match = _AFTER_MODEL.match(data, at + 7)
            if match is not None:
                raw = match.group(1)
                if b"\\" not in raw:
                    return raw.decode("utf-8", "replace")
                try:
                    return json.loads(b'"' + raw + b'"')
                except ValueError:
                    return None
        at = data.find(b'"model"', at + 7, 2048)
    return None
