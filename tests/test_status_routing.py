"""Issue 13's visible effect: /status per account (quota view, inFlight, bound sessions, cache tokens
and hit ratio, disabled reason), proxy-wide sessionMoves, queueLength and organization groups; the
``clproxy proxy status`` text; the Grafana routing panels. Through a real daemon and fake upstream."""

import io
import json
import os
import re
import time

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task, threads

from clproxy.cli import status as status_cli
from clproxy.daemon.tap import Options
from clproxy.observe.metrics import MetricsBook, cache_hit_ratio
from clproxy.testing.anthropic import error_json, message

from conftest import accounts_config
from helpers import post, request_body, until

DASHBOARD = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "grafana-dashboard.json")


def answer(five_hour: float, seven_day: float, reset: int, *, read: int, creation: int, input_tokens: int):
    """A fake 200 carrying unified rate-limit headers and a usage with prompt-cache tokens."""
    body = message()
    body["usage"].update(input_tokens=input_tokens, cache_read_input_tokens=read,
                         cache_creation_input_tokens=creation)
    return dict(body=json.dumps(body).encode(), times=1, headers={
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-5h-utilization": str(five_hour),
        "anthropic-ratelimit-unified-5h-reset": str(reset),
        "anthropic-ratelimit-unified-7d-utilization": str(seven_day),
        "anthropic-ratelimit-unified-7d-reset": str(reset + 5 * 86400),
        "anthropic-ratelimit-unified-representative-claim": "five_hour"})


def in_session(session: str) -> dict:
    return {b"x-claude-code-session-id": [session.encode()]}


async def get_status(proxy) -> dict:
    code, _, body = await post(proxy.url + "/status", None, method=b"GET")
    assert code == 200
    return json.loads(body)


async def run_cli(argv) -> str:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await threads.deferToThread(status_cli.main, argv, stdout=stdout, stderr=stderr,
                                       environ={"CLPROXY_HOME": "/nonexistent"}, now=time.time)
    assert (code, stderr.getvalue()) == (0, "")
    return stdout.getvalue()


@pytest_twisted.ensureDeferred
async def test_status_shows_quota_sessions_cache_moves_and_organizations(fake, start_proxy):
    """Two accounts of one organization; a session moved by a 429; the document and the CLI show it."""
    config = accounts_config(fake, "a", "b")
    for account in config["accounts"]["anthropic"]:
        account["orgId"] = "org-shared"
    proxy = start_proxy(config)
    reset = int(time.time()) + 3600
    fake.script("key-a", **answer(0.62, 0.18, reset, read=300, creation=100, input_tokens=100))
    fake.script("key-a", **answer(0.62, 0.18, reset, read=300, creation=100, input_tokens=100))
    assert (await post(proxy.url + "/v1/messages", request_body(), in_session("s1")))[0] == 200
    assert (await post(proxy.url + "/v1/messages", request_body(), in_session("s2")))[0] == 200
    fake.script("key-a", status=429, headers={"retry-after": "30"},
                body=error_json(429, "rate_limit_error", "slow down"), times=1)
    fake.script("key-b", **answer(0.3, 0.5, reset + 600, read=0, creation=200, input_tokens=50))
    assert (await post(proxy.url + "/v1/messages", request_body(), in_session("s1")))[0] == 200

    document = await get_status(proxy)
    rows = {row["name"]: row for row in document["accounts"]}
    a, b = rows["a"], rows["b"]
    assert a["quota"]["known"] is True and a["quota"]["representativeClaim"] == "five_hour"
    assert a["quota"]["windows"]["5h"] == {"utilization": 0.62, "status": None, "reset": float(reset),
                                           "expired": False}
    assert a["quota"]["windows"]["7d"]["utilization"] == 0.18
    assert a["quota"]["five_hour"]["utilization"] == 0.62  # the snapshot's own fields stay readable
    assert b["quota"]["windows"]["7d"]["utilization"] == 0.5
    assert (a["sessions"], b["sessions"]) == (1, 1)  # s2 stays on a; s1 moved to b
    assert (a["inFlight"], b["inFlight"]) == (0, 0)
    assert (a["cacheReadTokens"], a["cacheCreationTokens"], a["cacheHitRatio"]) == (600, 200, 0.6)
    assert (b["cacheReadTokens"], b["cacheCreationTokens"], b["cacheHitRatio"]) == (0, 200, 0.0)
    assert "disabledReason" not in a
    assert document["sessionMoves"] == 1
    assert document["queueLength"] == 0
    (group,) = document["organizations"]
    assert group["id"] == "org-shared" and group["accounts"] == ["a", "b"]
    # the group is judged by its worst window each: a's 5h, b's 7d
    assert group["quota"]["windows"]["5h"] == {"utilization": 0.62, "reset": float(reset)}
    assert group["quota"]["windows"]["7d"] == {"utilization": 0.5}
    assert "key-a" not in json.dumps(document) and "key-b" not in json.dumps(document)

    out = await run_cli(["--url", proxy.url])
    line_a = next(line for line in out.splitlines() if "5h" in line and line.strip().startswith("a "))
    line_b = next(line for line in out.splitlines() if "5h" in line and line.strip().startswith("b "))
    clock_a = time.strftime("%H:%M", time.localtime(reset))
    assert f"5h 62% (resets {clock_a}) \u00b7 7d 18%" in line_a
    assert line_a.split()[-3:] == ["1", "0", "60%"]  # sessions, in flight, cache hits
    assert "5h 30%" in line_b and "7d 50%" in line_b and line_b.split()[-3:] == ["1", "0", "0%"]
    assert "1 session move(s), 0 request(s) queued" in out
    assert re.search(r"org-shared: a, b -- 5h 62% \(resets \d\d:\d\d\) \u00b7 7d 50%", out)
    assert "key-a" not in out and "key-b" not in out


@pytest_twisted.ensureDeferred
async def test_status_shows_in_flight_and_the_queue_while_busy(fake, start_proxy):
    """maxConcurrent 1: two requests in flight, a third queued; all drain to 0 after."""
    config = accounts_config(fake, "a", "b")
    for account in config["accounts"]["anthropic"]:
        account["maxConcurrent"] = 1
    proxy = start_proxy(config)
    fake.pause()
    requests = [defer.ensureDeferred(post(proxy.url + "/v1/messages", request_body())) for _ in range(3)]
    await until(lambda: len(fake.requests) == 2 and proxy.dispatcher.gate.queue_length() == 1)
    busy = await get_status(proxy)
    assert [row["inFlight"] for row in busy["accounts"]] == [1, 1]
    assert busy["queueLength"] == 1
    assert busy["sessionMoves"] == 0 and busy["organizations"] == []
    assert all(row["quota"]["known"] is False and row["sessions"] == 0 for row in busy["accounts"])
    assert all(row["cacheHitRatio"] is None for row in busy["accounts"])  # nothing counted yet
    fake.resume()
    await until(lambda: len(fake.requests) == 3)
    fake.resume()
    assert [(await r)[0] for r in requests] == [200, 200, 200]
    after = await get_status(proxy)
    assert [row["inFlight"] for row in after["accounts"]] == [0, 0] and after["queueLength"] == 0
    out = await run_cli(["--url", proxy.url])
    assert "5h \u2013 \u00b7 7d \u2013" in out  # unknown quota


@pytest_twisted.ensureDeferred
async def test_disabled_reason_is_shown(fake, start_proxy):
    """An account the upstream says is disabled shows why, in /status and in the CLI."""
    proxy = start_proxy(accounts_config(fake, "dead", "live"))
    fake.script("key-dead", status=403, times=1,
                body=error_json(403, "permission_error", "This organization has been disabled."))
    assert (await post(proxy.url + "/v1/messages", request_body()))[0] == 200
    rows = {row["name"]: row for row in (await get_status(proxy))["accounts"]}
    assert "disabled" in rows["dead"]["disabledReason"]
    assert rows["dead"]["disabledReason"] == rows["dead"]["disabled_reason"]
    out = await run_cli(["--url", proxy.url])
    assert "disabled: " + rows["dead"]["disabledReason"] in out


def test_cache_hit_ratio_is_read_over_every_prompt_token():
    """The cache hit ratio is cache reads over every prompt token (read, written and uncached): 300 of
    500 is 0.6, none at all is None, and it is rounded to 4 places (0.3333)."""
    assert cache_hit_ratio(300, 100, 100) == 0.6
    assert cache_hit_ratio(0, 0, 0) is None
    assert cache_hit_ratio(1, 0, 2) == 0.3333


def test_strategy_help_lists_every_strategy():
    """The --strategy option's help lists all three strategies: round-robin, fill-first and
    drain-soonest."""
    (help_text,) = [p[3] for p in Options.optParameters if p[0] == "strategy"]
    assert "drain-soonest" in help_text and "round-robin" in help_text and "fill-first" in help_text


def test_config_reexports_the_routing_sections():
    """clproxy.config re-exports SessionAffinityConfig and QuotaRoutingConfig from its schema and lists
    them in __all__, so callers import them from one place."""
    from clproxy import config
    from clproxy.config.schema import QuotaRoutingConfig, SessionAffinityConfig
    assert config.SessionAffinityConfig is SessionAffinityConfig and config.QuotaRoutingConfig is QuotaRoutingConfig
    assert {"SessionAffinityConfig", "QuotaRoutingConfig"} <= set(config.__all__)


def test_grafana_routing_panels_query_exposed_metrics():
    """The dashboard's routing panels exist and query only what /metrics exposes for routing."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    exprs = {panel["title"]: [t["expr"] for t in panel.get("targets", [])]
             for panel in dashboard["panels"] if panel["type"] != "row"}
    wanted = {"clproxy_session_moves_total", "clproxy_account_quota_utilization",
              "clproxy_cache_read_tokens_total", "clproxy_cache_creation_tokens_total",
              "clproxy_queue_wait_seconds_bucket"}
    used = {name for targets in exprs.values() for expr in targets
            for name in re.findall(r"\b(clproxy_[a-z_]+)", expr)}
    assert wanted <= used
    every = " ".join(expr for targets in exprs.values() for expr in targets)
    assert "histogram_quantile(0.5" in every and "histogram_quantile(0.95" in every
    assert re.search(r"clproxy_cache_read_tokens_total.*/.*clproxy_cache_creation_tokens_total", every, re.S)
    book = MetricsBook(task.Clock())
    book.request_finished(200, "a", "m", "anthropic", 1.0, 0.1,
                          {"input_tokens": 1, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 3},
                          False)
    book.observe_queue_wait(0.2)
    book.session_moved()
    book.quota_source = lambda: {"a": {"five_hour": {"utilization": 0.5}, "seven_day": {"utilization": 0.1}}}
    exposed = {sample.name for family in text_string_to_metric_families(book.render()[0].decode())
               for sample in family.samples}
    routing = {name for name in used if name in wanted or "queue_wait" in name}
    assert not routing - exposed, routing - exposed
