"""``GET /metrics`` (clproxy.observe.metrics) over a real loopback port, parsed with prometheus_client's parser."""

import json
import os
import re

import prometheus_client
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.web import resource, server

from clproxy.accounts.model import Account
from clproxy.observe.metrics import MAX_SERIES
from clproxy.observe.recorder import Observability
from clproxy.routing.policy import Verdict, classify
from clproxy.routing.pool import AccountPool
from clproxy.state.memory import MemoryStateStore

SUCCESS = Verdict("success", 200, "ok", None, 0)
DASHBOARD = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "grafana-dashboard.json")


def make_clock(at: float = 1_767_268_800.0) -> task.Clock:
    clock = task.Clock()
    clock.advance(at)
    return clock


async def scrape(metrics_resource, accept: bytes = b"") -> tuple:
    """Serve ``metrics_resource`` at /metrics on a free loopback port and GET it once."""
    root = resource.Resource()
    root.putChild(b"metrics", metrics_resource)
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    try:
        headers = {b"accept": [accept]} if accept else {}
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/metrics", headers=headers,
                                  persistent=False)
        body = await treq.content(response)
        return response, body.decode("utf-8")
    finally:
        await port.stopListening()


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


def traffic(obs: Observability, clock: task.Clock) -> None:
    """Three requests: a 429 then success with tokens, a translated substitution, a truncated stream."""
    record = obs.begin(request_id="r1", method=b"POST", path=b"/v1/messages", model="claude-sonnet-4-5",
                       stream=True, headers=[], body=None)
    limited = classify(429, {"retry-after": "30"}, b"", now=clock.seconds(), backoff_level=0, is_oauth=False)
    record.attempt(account_name="work", provider="anthropic", model="claude-sonnet-4-5", status=429,
                   verdict=limited, duration=0.2)
    record.refresh("home", ok=True)
    record.attempt(account_name="home", provider="anthropic", model="claude-sonnet-4-5", status=200,
                   verdict=SUCCESS, duration=0.3)
    clock.advance(0.4)
    record.first_byte()
    record.usage({"input_tokens": 100, "output_tokens": 1, "cache_read_input_tokens": 5000,
                  "cache_creation_input_tokens": 7})
    record.usage({"output_tokens": 50})
    clock.advance(2.6)
    record.finish(status=200, account_name="home", provider="anthropic", actual_model="claude-sonnet-4-5")

    record = obs.begin(request_id="r2", method=b"POST", path=b"/v1/messages", model="claude-opus-4-1",
                       stream=False, headers=[], body=None)
    record.attempt(account_name=None, provider="openai", model="gpt-4o", status=200, verdict=None, duration=1.0)
    record.first_byte()
    record.finish(status=200, account_name=None, provider="openai", actual_model="gpt-4o")

    record = obs.begin(request_id="r3", method=b"POST", path=b"/v1/messages", model="claude-sonnet-4-5",
                       stream=True, headers=[], body=None)
    record.attempt(account_name="home", provider="anthropic", model="claude-sonnet-4-5", status=None,
                   verdict=Verdict("next", None, "network", None, 0, "connection refused"), duration=0.05)
    record.finish(status=200, account_name="home", provider="anthropic", truncated=True)


@pytest_twisted.ensureDeferred
async def test_metrics_expose_requests_attempts_latency_and_tokens():
    """Counters and histograms by status, account, model and provider parse as Prometheus text."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    traffic(obs, clock)
    response, text = await scrape(obs.metrics_resource())
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    found = samples(text)
    assert value(found, "clproxy_requests_total", status="200", account="home", model="claude-sonnet-4-5",
                 provider="anthropic") == 2
    assert value(found, "clproxy_upstream_attempts_total", status="429", account="work", model="claude-sonnet-4-5",
                 provider="anthropic", classification="rate-limited") == 1
    assert value(found, "clproxy_upstream_attempts_total", status="network", account="home",
                 model="claude-sonnet-4-5", provider="anthropic", classification="network") == 1
    labels = dict(account="home", model="claude-sonnet-4-5", provider="anthropic")
    assert value(found, "clproxy_request_duration_seconds_count", **labels) == 2
    assert value(found, "clproxy_request_duration_seconds_sum", **labels) == 3.0
    assert value(found, "clproxy_request_duration_seconds_bucket", le="2.0", **labels) == 1
    assert value(found, "clproxy_request_duration_seconds_bucket", le="5.0", **labels) == 2
    assert value(found, "clproxy_time_to_first_byte_seconds_count", **labels) == 1
    assert value(found, "clproxy_time_to_first_byte_seconds_bucket", le="0.5", **labels) == 1
    assert value(found, "clproxy_tokens_total", type="input", **labels) == 100
    assert value(found, "clproxy_tokens_total", type="output", **labels) == 50
    assert value(found, "clproxy_tokens_total", type="cache_read", **labels) == 5000
    assert value(found, "clproxy_tokens_total", type="cache_creation", **labels) == 7
    assert value(found, "clproxy_oauth_refreshes_total", account="home", result="ok") == 1
    assert value(found, "clproxy_model_substitution_total", requested_model="claude-opus-4-1",
                 actual_model="gpt-4o", provider="openai") == 1
    assert value(found, "clproxy_truncated_streams_total", account="home", provider="anthropic") == 1
    assert value(found, "clproxy_account_cooldowns_total", account="work", classification="rate-limited") == 1
    assert value(found, "clproxy_requests_in_flight") == 0


@pytest_twisted.ensureDeferred
async def test_account_gauges_follow_attempt_verdicts():
    """Without a pool, cooling and backoff level per account come from the attempts' verdicts."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    traffic(obs, clock)
    found = samples((await scrape(obs.metrics_resource()))[1])
    assert value(found, "clproxy_account_cooling", account="work") == 1
    assert value(found, "clproxy_account_backoff_level", account="work") == 1
    assert value(found, "clproxy_account_cooldown_remaining_seconds", account="work") == 27  # 30 s, 3 s ago
    assert value(found, "clproxy_account_cooling", account="home") == 0
    clock.advance(30)
    found = samples((await scrape(obs.metrics_resource()))[1])
    assert value(found, "clproxy_account_cooling", account="work") == 0
    assert value(found, "clproxy_account_state", account="work", state="ok") == 1


@pytest_twisted.ensureDeferred
async def test_account_gauges_read_the_pools_snapshot():
    """With watch_pool, every scrape reads the pool: a cooldown set outside any attempt shows too."""
    clock = make_clock()
    store = MemoryStateStore()
    pool = AccountPool(store, clock=clock)
    work = Account(key="config:work", name="work", secret="k1")
    spare = Account(key="config:spare", name="spare", secret="k2", enabled=False)
    obs = Observability(clock=clock, logs_dir=None)
    metrics = obs.metrics_resource()  # made before the pool is watched, as tap.py may do
    obs.watch_pool(pool, lambda: [work, spare])
    await pool.record(work, classify(429, {}, b"", now=clock.seconds(), backoff_level=2, is_oauth=False))
    await pool.cool(work, 300)
    found = samples((await scrape(metrics))[1])
    assert value(found, "clproxy_account_cooling", account="work") == 1
    assert value(found, "clproxy_account_cooldown_remaining_seconds", account="work") == 300
    assert value(found, "clproxy_account_backoff_level", account="work") == 3
    assert value(found, "clproxy_account_state", account="spare", state="disabled") == 1
    assert value(found, "clproxy_account_cooling", account="spare") == 0


@pytest_twisted.ensureDeferred
async def test_openmetrics_is_served_when_asked_for():
    """A scraper that accepts OpenMetrics gets it (content negotiation by prometheus_client)."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    traffic(obs, clock)
    response, text = await scrape(obs.metrics_resource(), accept=b"application/openmetrics-text; version=1.0.0")
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


def test_metrics_use_their_own_registry():
    """Nothing of clproxy's is registered in prometheus_client's global registry."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    traffic(obs, clock)
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "clproxy_" not in global_text
    assert "clproxy_requests_total" in obs.metrics.render()[0].decode()


def test_label_cardinality_is_bounded():
    """Past MAX_SERIES label combinations, new ones fold into one 'other' series."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    for n in range(MAX_SERIES + 50):
        obs.begin(request_id=str(n), method="POST", path="/v1/messages", model=f"model-{n}", stream=False,
                  headers=[], body=None).finish(status=200, account_name="a", provider="anthropic")
    assert len(obs.metrics.requests) == MAX_SERIES + 1
    assert obs.metrics.requests[("other", "other", "other", "other")] == 50


def test_log_drop_counter_is_exposed(tmp_path):
    """clproxy_log_records_dropped_total counts records the writer could not keep."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), max_pending=1)
    traffic(obs, clock)
    found = samples(obs.metrics.render()[0].decode())
    assert value(found, "clproxy_log_records_dropped_total", reason="buffer-full") == obs.writer.dropped["buffer-full"] > 0


def test_dashboard_queries_only_metrics_that_exist(tmp_path):
    """Every metric the Grafana dashboard queries is exposed by /metrics (with logs and OTLP on)."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert len(exprs) >= 20
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the OTLP panels need the otlp extra")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path), otlp_endpoint="http://127.0.0.1:9",
                        environ={})
    traffic(obs, clock)
    # the routing panels' series exist once a request waited for a slot and a quota was seen
    obs.metrics.observe_queue_wait(0.2)
    obs.metrics.quota_source = lambda: {"work": {"five_hour": {"utilization": 0.4}}}
    exposed = set()
    for family in text_string_to_metric_families(obs.metrics.render()[0].decode()):
        exposed.update(sample.name for sample in family.samples)
    used = set()
    for expr in exprs:
        used.update(re.findall(r"\b(clproxy_[a-z_]+)", expr))
    assert used, "the dashboard queries no clproxy metric"
    missing = sorted(used - exposed)
    assert not missing, f"dashboard uses metrics /metrics does not expose: {missing}"
    titles = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert {"Traffic", "Failures", "Latency", "Routing per account", "Tokens",
            "Sessions, quota and prompt cache"} <= titles
    if obs.otlp is not None:
        obs.otlp.stop(timeout=0)


def test_quota_utilization_windows_are_the_quota_rules_windows():
    """``clproxy_account_quota_utilization{window}`` names exactly the windows the quota rule judges
    (and /status shows): one definition, not a copy that may drift."""
    from clproxy.observe.metrics import QUOTA_WINDOWS
    from clproxy.routing.headroom import RULE_WINDOWS
    assert QUOTA_WINDOWS is RULE_WINDOWS
