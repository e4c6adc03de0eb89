"""Prometheus metrics: plain counters kept on the reactor thread, exposed by a custom collector.

Updating a metric is a dict increment (no locks, no label objects); prometheus-client's own
``CollectorRegistry`` (never the global one) renders them at scrape time for ``GET /metrics``.
"""

from bisect import bisect_left
from typing import Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.web import resource, server

from clproxy.observe.console import logger
from clproxy.observe.redact import redact_text
from clproxy.routing.headroom import RULE_WINDOWS

log = logger(__name__)

#: Whole-request latency buckets (seconds): LLM answers take from a second to many minutes.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
#: Time-to-first-byte buckets (seconds).
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
#: Upstream attempt duration buckets (seconds).
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
#: Seconds a request waited for a concurrency slot (maxConcurrent), from none to queue-timeout.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
#: The quota windows reported as ``clproxy_account_quota_utilization{window}``: those the quota
#: rule judges (one definition, :data:`clproxy.routing.headroom.RULE_WINDOWS`).
QUOTA_WINDOWS = RULE_WINDOWS
#: New label combinations past this many per metric are folded into one ``other`` series.
MAX_SERIES = 2000
#: A label value from a client or an upstream (a model name) is cut to this many characters.
LABEL_LIMIT = 200
TOKEN_TYPES = ("input", "output", "cache_creation", "cache_read")
_USAGE_KEYS = (("input", "input_tokens"), ("output", "output_tokens"),
               ("cache_creation", "cache_creation_input_tokens"),
               ("cache_read", "cache_read_input_tokens"))


class _Histogram:
    """Bucket counts per label tuple; ``observe`` is a bisect and three additions."""

    __slots__ = ("bounds", "series", "max_series")

    def __init__(self, bounds: Sequence[float], max_series: int):
        self.bounds = tuple(float(b) for b in bounds)
        self.series: Dict[tuple, list] = {}
        self.max_series = max_series

    def observe(self, key: tuple, value: float) -> None:
        row = self.series.get(key)
        if row is None:
            if len(self.series) >= self.max_series:
                key = ("other",) * len(key)
                row = self.series.get(key)
            if row is None:
                row = self.series[key] = [0] * (len(self.bounds) + 1) + [0.0]
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def family(self, name: str, documentation: str, labels: Sequence[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        edges = [_le(b) for b in self.bounds] + ["+Inf"]
        for key, row in self.series.items():
            cumulative, buckets = 0, []
            for edge, count in zip(edges, row[:-1]):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(list(key), buckets, sum_value=row[-1])
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


def _bump(table: Dict[tuple, float], key: tuple, amount: float, max_series: int) -> None:
    value = table.get(key)
    if value is None:
        if len(table) >= max_series:
            key = ("other",) * len(key)
            value = table.get(key, 0)
        else:
            value = 0
    table[key] = value + amount


#: model names found fit to be labels as they are: the same few come back on every request, and a
#: look-up replaces the checks. Only clean ones are kept; cleared when full (a client inventing names).
_CLEAN_LABELS: Dict[str, None] = {}
_CLEAN_LABELS_LIMIT = 1024


def label_value(text: str) -> str:
    """A label value from a client or an upstream (a model name) made safe for every scrape: a key in
    it masked (a client may paste one there), cut to :data:`LABEL_LIMIT` characters (each value is
    repeated in every line of its series), and a lone surrogate (a JSON ``"\\ud800"`` escape) written
    as that escape, since the exposition is UTF-8 and one such label failed every later scrape."""
    if text in _CLEAN_LABELS:
        return text
    safe = redact_text(text)
    if len(safe) > LABEL_LIMIT:
        safe = safe[:LABEL_LIMIT - 3] + "..."
    if not safe.isascii():
        safe = safe.encode("utf-8", "backslashreplace").decode("utf-8")
    if safe == text:
        if len(_CLEAN_LABELS) >= _CLEAN_LABELS_LIMIT:
            _CLEAN_LABELS.clear()
        _CLEAN_LABELS[text] = None
    return safe


def status_label(status: Optional[int]) -> str:
    """``"200"``, or ``"network"`` when there was no HTTP answer."""
    return "network" if status is None else str(status)


class MetricsBook:
    """Every clproxy metric, kept as plain numbers; a prometheus-client collector.

    All updates happen on the reactor thread, as do scrapes (``/metrics`` renders on it), so
    nothing here needs a lock. ``extra`` callables return further metric families (log drops,
    OTLP queue) read from their owners at scrape time.
    """

    def __init__(self, clock, max_series: int = MAX_SERIES):
        self.clock = clock
        self.max_series = max_series
        self.started = clock.seconds()
        self.requests: Dict[tuple, float] = {}       # (status, account, model, provider)
        self.attempts: Dict[tuple, float] = {}       # (status, account, model, provider, classification)
        self.tokens: Dict[tuple, float] = {}         # (type, account, model, provider)
        self.refreshes: Dict[tuple, float] = {}      # (account, result)
        self.substitutions: Dict[tuple, float] = {}  # (requested, actual, provider)
        self.truncated: Dict[tuple, float] = {}      # (account, provider)
        self.cooldowns: Dict[tuple, float] = {}      # (account, classification)
        self.latency = _Histogram(LATENCY_BUCKETS, max_series)     # (account, model, provider)
        self.ttfb = _Histogram(TTFB_BUCKETS, max_series)           # (account, model, provider)
        self.attempt_latency = _Histogram(ATTEMPT_BUCKETS, max_series)  # (account, provider)
        self.queue_wait = _Histogram(QUEUE_BUCKETS, 1)             # () : one series
        self.session_moves = 0
        #: () -> {account name: quota snapshot} (clproxy.routing.quota), read at scrape time
        self.quota_source: Optional[Callable[[], Mapping[str, dict]]] = None
        self.in_flight = 0
        #: account name -> (cooling_until or None, backoff level, state); from attempts, or from
        #: the pool's snapshot when ``set_accounts`` is fed one (the truth, refresh cooldowns too)
        self.accounts: Dict[str, Tuple[Optional[float], int, str]] = {}
        self.extra: List[Callable[[], Iterable]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # --- updates (hot path) ---------------------------------------------------------------------

    def request_finished(self, status: int, account: str, model: str, provider: str,
                         duration: float, ttfb: Optional[float], usage: Optional[dict],
                         truncated: bool) -> None:
        """One request answered."""
        n = self.max_series
        model = label_value(model)
        _bump(self.requests, (str(status), account, model, provider), 1, n)
        key = (account, model, provider)
        self.latency.observe(key, duration)
        if ttfb is not None:
            self.ttfb.observe(key, ttfb)
        if usage:
            for kind, field in _USAGE_KEYS:
                value = usage.get(field)
                if value:
                    _bump(self.tokens, (kind, account, model, provider), value, n)
        if truncated:
            _bump(self.truncated, (account, provider), 1, n)

    def attempt(self, status: Optional[int], account: str, model: str, provider: str,
                classification: str, cooldown: Optional[float], backoff_level: Optional[int],
                duration: float, now: float) -> None:
        """One upstream attempt with its verdict."""
        n = self.max_series
        model = label_value(model)
        _bump(self.attempts, (status_label(status), account, model, provider, classification), 1, n)
        self.attempt_latency.observe((account, provider), duration)
        if cooldown:
            _bump(self.cooldowns, (account, classification), 1, n)
        if backoff_level is not None and (account in self.accounts or len(self.accounts) < n):
            until = now + cooldown if cooldown else None
            previous = self.accounts.get(account)
            if until is None and previous is not None and previous[0] is not None and previous[0] > now:
                until = previous[0]  # a success elsewhere does not end a cooldown in progress
            self.accounts[account] = (until, backoff_level, "ok")

    def observe_queue_wait(self, seconds: float) -> None:
        """A request waited ``seconds`` for a concurrency slot (0 when one was free at once is not
        observed: only requests that found every account at its maxConcurrent)."""
        self.queue_wait.observe((), seconds)

    # --- reads (for /status) ----------------------------------------------------------------------

    def tokens_by_account(self) -> Dict[str, Dict[str, float]]:
        """Token totals per account name and type (every type of :data:`TOKEN_TYPES`, 0 when none),
        summed over models and providers; ``/status`` shows the cache ones and the hit ratio."""
        totals: Dict[str, Dict[str, float]] = {}
        for (token_type, account, _model, _provider), value in self.tokens.items():
            row = totals.setdefault(account, dict.fromkeys(TOKEN_TYPES, 0))
            row[token_type] = row.get(token_type, 0) + value
        return totals

    def session_moved(self) -> None:
        """A session was rebound to another account (its prompt cache is rebuilt there)."""
        self.session_moves += 1

    def refresh(self, account: str, ok: bool) -> None:
        """One OAuth refresh."""
        _bump(self.refreshes, (account, "ok" if ok else "failed"), 1, self.max_series)

    def substitution(self, requested: str, actual: str, provider: str) -> None:
        """A request was answered by another model than the one asked for."""
        _bump(self.substitutions, (label_value(requested), label_value(actual), provider), 1, self.max_series)

    def set_accounts(self, rows: Iterable[dict]) -> None:
        """Replace the per-account gauges with the pool's snapshot rows (``AccountPool.snapshot``)."""
        accounts = {}
        for row in rows:
            accounts[str(row.get("name") or row.get("key"))] = (
                row.get("cooling_until"), int(row.get("backoff_level") or 0), str(row.get("state") or "ok"))
        self.accounts = accounts

    # --- collection -----------------------------------------------------------------------------

    def describe(self):
        return []

    def collect(self):
        now = self.clock.seconds()
        yield _counter("clproxy_requests", "Requests answered, by status, account, model and provider.",
                       ("status", "account", "model", "provider"), self.requests)
        yield _counter("clproxy_upstream_attempts",
                       "Upstream attempts, by status (network: no answer), account, model, provider "
                       "and classification.",
                       ("status", "account", "model", "provider", "classification"), self.attempts)
        yield self.latency.family("clproxy_request_duration_seconds",
                                  "Whole-request latency, from arrival to the last byte.",
                                  ("account", "model", "provider"))
        yield self.ttfb.family("clproxy_time_to_first_byte_seconds",
                               "Time from a request's arrival to the first byte sent to the client.",
                               ("account", "model", "provider"))
        yield self.attempt_latency.family("clproxy_upstream_attempt_duration_seconds",
                                          "Duration of one upstream attempt (to its verdict).",
                                          ("account", "provider"))
        yield _counter("clproxy_tokens", "Tokens reported by the upstream, by type "
                                         "(input, output, cache_creation, cache_read).",
                       ("type", "account", "model", "provider"), self.tokens)
        yield _counter("clproxy_oauth_refreshes", "OAuth token refreshes, by result.",
                       ("account", "result"), self.refreshes)
        yield _counter("clproxy_model_substitution", "Requests answered by another model than requested.",
                       ("requested_model", "actual_model", "provider"), self.substitutions)
        yield _counter("clproxy_truncated_streams", "Streams that ended before message_stop.",
                       ("account", "provider"), self.truncated)
        yield _counter("clproxy_account_cooldowns", "Cooldowns applied to accounts, by classification.",
                       ("account", "classification"), self.cooldowns)
        yield from self._routing_families()
        yield GaugeMetricFamily("clproxy_requests_in_flight", "Requests being answered now.",
                                value=self.in_flight)
        yield GaugeMetricFamily("clproxy_start_time_seconds", "When the proxy started (epoch seconds).",
                                value=self.started)
        cooling = GaugeMetricFamily("clproxy_account_cooling", "1 while the account is cooling down.",
                                    labels=("account",))
        remaining = GaugeMetricFamily("clproxy_account_cooldown_remaining_seconds",
                                      "Seconds until the account is usable again (0 when it is).",
                                      labels=("account",))
        level = GaugeMetricFamily("clproxy_account_backoff_level", "The account's 429 backoff level.",
                                  labels=("account",))
        state = GaugeMetricFamily("clproxy_account_state", "1 for the account's current state.",
                                  labels=("account", "state"))
        for name, (until, backoff, row_state) in sorted(self.accounts.items()):
            is_cooling = until is not None and until > now
            if row_state != "disabled":
                row_state = "cooling" if is_cooling else "ok"
            cooling.add_metric([name], 1 if is_cooling else 0)
            remaining.add_metric([name], max(0.0, until - now) if is_cooling else 0)
            level.add_metric([name], backoff)
            for candidate in ("ok", "cooling", "disabled"):
                state.add_metric([name, candidate], 1 if candidate == row_state else 0)
        yield cooling
        yield remaining
        yield level
        yield state
        for source in self.extra:
            yield from source()

    def _routing_families(self):
        """What routing does to prompt caches and quota windows (issue 13's metrics)."""
        yield self.queue_wait.family("clproxy_queue_wait_seconds",
                                     "Time a request waited for a concurrency slot (maxConcurrent).", ())
        moves = CounterMetricFamily("clproxy_session_moves", "Sessions rebound to another account "
                                                             "(each rebuilds its prompt cache).")
        moves.add_metric([], self.session_moves)
        yield moves
        per_account = self.tokens_by_account()
        for kind, name in (("cache_read", "clproxy_cache_read_tokens"),
                           ("cache_creation", "clproxy_cache_creation_tokens")):
            family = CounterMetricFamily(name, f"Prompt-cache {kind.replace('_', ' ')} tokens, by account.",
                                         labels=("account",))
            for account, totals in sorted(per_account.items()):
                if totals[kind]:
                    family.add_metric([account], totals[kind])
            yield family
        utilization = GaugeMetricFamily("clproxy_account_quota_utilization",
                                        "Utilization (0-1) of the account's subscription window, from the "
                                        "last unified rate-limit headers seen.", labels=("account", "window"))
        quotas = self.quota_source() if self.quota_source is not None else {}
        for account, quota in sorted(quotas.items()):
            for field, window in QUOTA_WINDOWS:
                value = ((quota or {}).get(field) or {}).get("utilization")
                if isinstance(value, (int, float)):
                    utilization.add_metric([account, window], float(value))
        yield utilization

    def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def cache_hit_ratio(cache_read: float, cache_creation: float, input_tokens: float) -> Optional[float]:
    """The share of prompt tokens served from the prompt cache: ``cache_read / (cache_read +
    cache_creation + input)`` -- every prompt token is read from the cache, written to it, or
    neither (``input_tokens`` counts only those after the last cache breakpoint). 0 to 1, rounded
    to 4 places; None before any prompt token was counted (no ratio is not a 0 % ratio).
    The one definition: ``/status`` ``cacheHitRatio`` and the Grafana hit-ratio panel use it."""
    total = cache_read + cache_creation + input_tokens
    if total <= 0:
        return None
    return round(cache_read / total, 4)


def _counter(name: str, documentation: str, labels: Sequence[str], table: Dict[tuple, float]):
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in table.items():
        family.add_metric(list(key), value)
    return family


class MetricsResource(resource.Resource):
    """``GET /metrics``: refreshes the account gauges from the pool (when one is watched), then renders
    the book, or asks :attr:`exposition` (a worker of ``--workers N``: the sums over every worker)."""

    isLeaf = True

    def __init__(self, book: MetricsBook, snapshot: Optional[Callable[[], object]] = None):
        super().__init__()
        self.book = book
        #: () -> None (no pool), or the pool's snapshot rows (a list, Deferred or coroutine)
        self.snapshot = snapshot
        #: (accept) -> (body, content type), a coroutine; None: the book renders itself
        self.exposition: Optional[Callable[[Optional[str]], Awaitable[Tuple[bytes, str]]]] = None

    def render_GET(self, request):
        pending = self.snapshot() if self.snapshot is not None else None
        if pending is None and self.exposition is None:
            return self._write(request, *self.book.render(self._accept(request)))
        gone = []
        request.notifyFinish().addErrback(gone.append)
        if pending is None:
            d = defer.succeed(None)
        else:
            d = defer.succeed(pending) if isinstance(pending, (list, tuple)) else defer.ensureDeferred(pending)
            d.addCallback(self.book.set_accounts)
            d.addErrback(lambda f: log.failure("account snapshot for /metrics failed", f))
        d.addCallback(lambda _: self._rendered(request))

        def done(rendered):
            if not gone:
                request.write(self._write(request, *rendered))
                request.finish()

        d.addCallback(done)
        d.addErrback(self._failed, request, gone)
        return server.NOT_DONE_YET

    @staticmethod
    def _failed(failure, request, gone) -> None:
        """A render that raised still answers (a 500), or the scraper would wait for ever."""
        log.failure("/metrics could not be rendered", failure)
        if not gone and not request.finished:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"clproxy could not render its metrics; see the daemon's log\n")
            request.finish()

    def _rendered(self, request):
        accept = self._accept(request)
        if self.exposition is None:
            return self.book.render(accept)

        def own_numbers(failure):
            log.failure("/metrics: the workers' sums failed; answering with this process's own", failure)
            return self.book.render(accept)
        return defer.ensureDeferred(self.exposition(accept)).addErrback(own_numbers)

    def render_HEAD(self, request):
        return self.render_GET(request)

    @staticmethod
    def _accept(request) -> Optional[str]:
        accept = request.getHeader(b"accept")
        return accept.decode("latin-1") if accept else None

    @staticmethod
    def _write(request, body: bytes, content_type: str) -> bytes:
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
