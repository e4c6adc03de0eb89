"""Team mode's usage and cost through a real daemon (issue 14): one ledger row per answered request
with the tokens the upstream reported (cache writes split 5-minute/1-hour, cache reads), the cost the
formula gives, the per-key counters the limits read, and all of it surviving a restart.

The client key's record reaches the dispatcher through ``ProxyRequest.client_key`` (set by the
authentication layer); here a wrapper on the running dispatcher sets it, so these tests need only
the seam, not the authentication.
"""

import io
import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy.cli import usage as usage_cli
from clproxy.team import usage as usage_ledger
from clproxy.team.keystore import KeyStore
from clproxy.team.pricing import PRICE_TABLE, formula
from clproxy.testing.anthropic import error_json, message
from clproxy.testing.providers import listen_fake_gemini
from conftest import accounts_config
from helpers import post, request_body, stream, until

MODEL = "claude-sonnet-4-5"
USAGE = {"input_tokens": 100, "output_tokens": 40, "cache_creation_input_tokens": 3000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
         "cache_read_input_tokens": 50000}


def events_with(usage, model=MODEL):
    """An SSE answer whose message_start carries ``usage`` and whose message_delta ends it."""
    start_usage = dict(usage, output_tokens=1)
    return [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_u1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": usage["output_tokens"]}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def body_with(usage, model=MODEL) -> bytes:
    answer = message(model=model)
    answer["usage"] = dict(usage)
    return json.dumps(answer).encode()


def as_key(proxy, record):
    """Make every request to ``proxy`` arrive as authenticated by ``record`` (the auth seam)."""
    dispatcher = proxy.dispatcher
    forward = dispatcher.forward

    async def keyed(request, out):
        request.client_key = record
        return await forward(request, out)

    dispatcher.forward = keyed


def expected_cost(usage, model=MODEL):
    detail = usage.get("cache_creation") or {}
    return formula(PRICE_TABLE["claude-sonnet-4*"], usage["input_tokens"], usage["output_tokens"],
                   detail.get("ephemeral_5m_input_tokens", usage.get("cache_creation_input_tokens", 0)),
                   detail.get("ephemeral_1h_input_tokens", 0), usage.get("cache_read_input_tokens", 0))


def ledger_rows(home):
    connection = usage_ledger.connect(usage_ledger.ledger_path(str(home)), create=False)
    connection.row_factory = lambda cursor, row: {c[0]: v for c, v in zip(cursor.description, row)}
    try:
        return connection.execute("SELECT * FROM usage ORDER BY id").fetchall()
    finally:
        connection.close()


def today():
    return time.strftime("%Y-%m-%d", time.gmtime())


async def one_of_each(proxy):
    """A whole answer and a stream, both with cache writes of both kinds and cache reads."""
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    response, collected = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    assert response.code == 200
    await collected.done


@pytest_twisted.ensureDeferred
async def test_rows_equal_the_upstream_usage_and_cost(fake, start_proxy, tmp_path):
    """A whole answer and a stream through a key each leave a ledger row with Anthropic's exact usage
    and cost, and the key's daily counter holds twice 3,140 tokens (cache reads not counted)."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "a"))
    _, record = KeyStore(str(home)).create("alice")
    as_key(proxy, record)
    fake.script(body=body_with(USAGE), times=1)
    fake.script(events=events_with(USAGE), times=1)
    await one_of_each(proxy)
    store = proxy.service.store
    cost = expected_cost(USAGE)
    tokens = 100 + 40 + 1000 + 2000  # cache reads are not counted against tokens/day
    await until(lambda: store._usage_days.get(today(), {}).get("alice", [0])[0] == 2 * tokens)
    counted_tokens, counted_usd = await store.get_usage("alice", today())
    assert counted_tokens == 2 * tokens
    assert abs(counted_usd - 2 * cost) < 1e-9
    await proxy.service.stopService()
    rows = ledger_rows(home)
    assert len(rows) == 2
    for row in rows:
        assert (row["key_name"], row["account_name"], row["model"], row["status"]) == ("alice", "a", MODEL, 200)
        assert (row["input_tokens"], row["output_tokens"], row["cache_creation_5m"], row["cache_creation_1h"],
                row["cache_read_input_tokens"]) == (100, 40, 1000, 2000, 50000)
        assert abs(row["cost_usd"] - cost) < 1e-12
        assert row["duration"] >= 0
    # 100*3 + 40*15 + 1000*1.25*3 + 2000*2*3 + 50000*0.1*3, per million
    assert abs(cost - (300 + 600 + 3750 + 12000 + 15000) / 1e6) < 1e-12


@pytest_twisted.ensureDeferred
async def test_without_a_key_rows_have_no_key_and_no_counter(fake, start_proxy, tmp_path):
    """A request without a client key still gets a ledger row, with no key name and no per-key counter,
    and `clproxy usage --by key` shows it as (none)."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "a"))
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    store = proxy.service.store
    await proxy.service.stopService()
    rows = ledger_rows(home)
    assert [(r["key_name"], r["input_tokens"], r["output_tokens"]) for r in rows] == [(None, 12, 7)]
    assert store._usage_days == {}
    out = io.StringIO()
    assert usage_cli.main(["--by", "key"], stdout=out, environ={"CLPROXY_HOME": str(home)}) == 0
    assert "(none)" in out.getvalue()


@pytest_twisted.ensureDeferred
async def test_a_model_without_a_price_costs_null_with_one_warning(fake, start_proxy, tmp_path, logs):
    """A model with no known price is recorded with a null cost, not a wrong one, and its 2 requests
    log the "no price for model" warning only once."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "a"))
    unknown = "claude-mystery-9"
    for _ in range(2):
        fake.script(body=body_with({"input_tokens": 5, "output_tokens": 3}, model=unknown), times=1)
        status, _, _ = await post(proxy.url + "/v1/messages", request_body(model=unknown))
        assert status == 200
    await proxy.service.stopService()
    rows = ledger_rows(home)
    assert [(r["model"], r["cost_usd"], r["input_tokens"]) for r in rows] == [(unknown, None, 5)] * 2
    warnings = [line for line in logs if "no price for model" in line and unknown in line]
    assert len(warnings) == 1, logs


@pytest_twisted.ensureDeferred
async def test_usage_survives_a_restart(fake, start_proxy, tmp_path):
    """A key's daily and monthly usage survive a daemon restart, and `clproxy usage --by key` reports
    its 2 requests with their tokens and cost."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "a"))
    _, record = KeyStore(str(home)).create("bob")
    as_key(proxy, record)
    fake.script(body=body_with(USAGE), times=1)
    fake.script(events=events_with(USAGE), times=1)
    await one_of_each(proxy)
    await proxy.service.stopService()

    again = start_proxy(accounts_config(fake, "a"))
    tokens, usd = await again.service.store.get_usage("bob", today())
    assert tokens == 2 * (100 + 40 + 3000)
    assert abs(usd - 2 * expected_cost(USAGE)) < 1e-9
    month_tokens, month_usd = await again.service.store.get_month_usage("bob", today()[:7])
    assert (month_tokens, round(month_usd, 9)) == (tokens, round(usd, 9))
    out = io.StringIO()
    assert usage_cli.main(["--by", "key", "--format", "json"], stdout=out,
                          environ={"CLPROXY_HOME": str(home)}) == 0
    rows = json.loads(out.getvalue())["rows"]
    assert [(r["key"], r["requests"], r["input_tokens"], r["cache_creation_input_tokens"],
             r["cache_read_input_tokens"]) for r in rows] == [("bob", 2, 200, 6000, 100000)]
    assert abs(rows[0]["cost_usd"] - 2 * expected_cost(USAGE)) < 1e-9


@pytest_twisted.ensureDeferred
async def test_status_shows_each_keys_usage_and_no_key_text_is_stored(fake, start_proxy, tmp_path):
    """/status shows each key's limits and today's and this month's usage (3,140 tokens) to an admin,
    and no key's text or hash appears in it nor in any file under the home directory."""
    home = tmp_path / "home"
    proxy = start_proxy(accounts_config(fake, "a"))
    key, record = KeyStore(str(home)).create("carol", tokens_per_day=1000000, usd_per_day=5.0)
    admin_key, _ = KeyStore(str(home)).create("ops", admin=True)  # /status needs an admin key now
    as_key(proxy, record)
    await until(lambda: proxy.service.ring is not None and len(proxy.service.ring) == 2)  # the watcher
    fake.script(body=body_with(USAGE), times=1)
    status, _, _ = await post(proxy.url + "/v1/messages", request_body(), headers={b"x-api-key": [key.encode()]})
    assert status == 200
    await until(lambda: proxy.service.usage.ledger.pending == 0 and proxy.service.usage.ledger.written >= 1)
    status, _, body = await post(proxy.url + "/status", None, method=b"GET",
                                 headers={b"x-api-key": [admin_key.encode()]})
    assert status == 200
    document = json.loads(body)
    [row] = [r for r in document["keys"] if r["name"] == "carol"]
    assert row["name"] == "carol" and row["prefix"] == record.prefix and row["admin"] is False
    assert row["limits"]["tokens_per_day"] == 1000000 and row["limits"]["usd_per_day"] == 5.0
    assert row["today"]["tokens"] == 3140
    assert abs(row["today"]["usd"] - expected_cost(USAGE)) < 1e-6
    assert row["month"]["tokens"] == 3140
    assert key not in body.decode() and record.hash not in body.decode() and admin_key not in body.decode()
    await proxy.service.stopService()
    for directory, _, files in os.walk(home):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                assert key.encode() not in handle.read(), name


@pytest_twisted.ensureDeferred
async def test_usage_retention_comes_from_the_config(fake, start_proxy):
    """The usage ledger keeps logging.usageRetentionDays days (30 here), and 90 by default."""
    config = accounts_config(fake, "a", logging={"usageRetentionDays": 30})
    proxy = start_proxy(config)
    assert proxy.service.usage.ledger.retention_days == 30
    assert start_proxy(accounts_config(fake, "a")).service.usage.ledger.retention_days == 90


def _fallback_config(fake, gemini):
    config = accounts_config(fake, "a")
    config["providers"] = {"google-ai": {"baseUrl": gemini.url, "apiKey": "g-key"}}
    config["routing"] = {"fallback-chain": [{"provider": "google-ai", "model": "gemini-2.5-flash"}]}
    return config


async def _answered_by_gemini(fake, start_proxy, tmp_path):
    gemini = listen_fake_gemini(reactor)
    try:
        proxy = start_proxy(_fallback_config(fake, gemini))
        fake.script(status=429, headers={"retry-after": "30"}, body=error_json(429, "rate_limit_error", "limited"))
        status, _, _ = await post(proxy.url + "/v1/messages", request_body())
        assert status == 200 and len(gemini.requests) == 1
        await proxy.service.stopService()
    finally:
        await gemini.port.stopListening()
    return ledger_rows(tmp_path / "home")


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_records_a_row(fake, start_proxy, tmp_path):
    """An answer from the Gemini fallback after a 429 still records a ledger row, with Gemini's model,
    no Anthropic account and status 200."""
    rows = await _answered_by_gemini(fake, start_proxy, tmp_path)
    assert [(r["model"], r["account_name"], r["status"]) for r in rows] == [("gemini-2.5-flash", None, 200)]


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_records_the_providers_tokens(fake, start_proxy, tmp_path):
    """A Gemini fallback answer's row records the provider's own input and output token counts, not
    zeros."""
    rows = await _answered_by_gemini(fake, start_proxy, tmp_path)
    assert rows[0]["input_tokens"] > 0 and rows[0]["output_tokens"] > 0
