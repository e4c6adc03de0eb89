"""Faults found in review of clproxy.observe: what a client's model name or path does to /metrics, the
console and OTLP span names, and how the JSONL writer survives a cut line or a removed directory."""

import json
import os
import resource
import signal

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web import server

from clproxy.observe import console, jsonl
from clproxy.observe.metrics import MetricsBook
from clproxy.observe.recorder import Observability
from clproxy.routing.policy import Verdict

from conftest import accounts_config
import helpers
from helpers import post

NOW = 1_767_268_800.0  # 2026-01-01T12:00:00Z
DAY = "2026-01-01"
SUCCESS = Verdict("success", 200, "ok", None, 0)
ANTHROPIC_KEY = "sk-ant-api03-MARKERmodelKEY0123456789abcdef"
MARKER = "MARKERmodelKEY"


def make_clock(at: float = NOW) -> task.Clock:
    return helpers.make_clock(at)


rows = helpers.jsonl_rows


@pytest.fixture
def events_seen():
    """Every twisted.logger event published globally while the test runs."""
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def console_info():
    """The daemon's console gate at info level for the test, restored after."""
    predicate = console._predicate
    default, ours = predicate.defaultLogLevel, predicate.logLevelForNamespace("clproxy")
    console.set_level(LogLevel.info)
    yield
    predicate.defaultLogLevel = default
    predicate.setLogLevelForNamespace("clproxy", ours)


def serve(obs, clock, count: int, first: int = 0, model: str = "m") -> None:
    for n in range(first, first + count):
        record = obs.begin(request_id=f"r{n}", method="POST", path="/v1/messages", model=model, stream=False,
                           headers=[], body=b"{}")
        record.attempt(account_name="a", provider="anthropic", model=model, status=200, verdict=SUCCESS,
                       duration=0.01)
        record.finish(status=200, account_name="a", provider="anthropic")


# --- /metrics label values -----------------------------------------------------------------------


async def scrape(url: str):
    """GET /metrics, given up after 30 s (a broken render used to leave the scrape hanging for ever)."""
    return await defer.ensureDeferred(post(url + "/metrics", None, method=b"GET")).addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_a_clients_model_name_cannot_break_or_leak_through_metrics(fake, start_proxy):
    """A model name with a lone surrogate escape, or holding a key, leaves /metrics parseable and keyless."""
    proxy = start_proxy(accounts_config(fake, "work"))
    for model in ('"\\ud800"', json.dumps(ANTHROPIC_KEY)):
        body = b'{"model": %s, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}' % (
            model.encode())
        status, _, _ = await post(proxy.url + "/v1/messages", body)
        assert status == 200
    status, _, body = await scrape(proxy.url)
    assert status == 200
    text = body.decode("utf-8")
    assert MARKER not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    models = {s.labels["model"] for s in families["clproxy_requests"].samples}
    assert len(models) == 2 and "sk-ant-[REDACTED]" in models


def test_a_huge_model_name_is_cut_in_metric_labels():
    """A 64 KiB model name (one request) does not repeat whole in every series line of every scrape."""
    book = MetricsBook(make_clock())
    book.request_finished(404, "a", "claude-" + "x" * 65536, "anthropic", 0.1, 0.05,
                          {"input_tokens": 1}, False)
    body, _ = book.render()
    assert len(body) < 64 * 1024
    [model] = {s.labels["model"] for f in text_string_to_metric_families(body.decode())
               for s in f.samples if "model" in s.labels}
    assert model.startswith("claude-xxx") and len(model) <= 256


def test_clean_model_names_keep_one_series_each():
    """Ordinary model names are labels as they are, and a sanitized name still counts into one series."""
    book = MetricsBook(make_clock())
    for model in ("claude-sonnet-4-5", "\ud800", "\ud800", ANTHROPIC_KEY, ANTHROPIC_KEY):
        book.request_finished(200, "a", model, "anthropic", 0.1, None, None, False)
    assert sorted(book.requests.values()) == [1, 2, 2]
    assert ("200", "a", "claude-sonnet-4-5", "anthropic") in book.requests


@pytest_twisted.ensureDeferred
async def test_a_metrics_render_that_fails_answers_500_instead_of_hanging(fake, start_proxy):
    """When rendering the exposition raises, the scrape gets a 500 at once (it used to never be answered)."""
    proxy = start_proxy(accounts_config(fake, "work"))

    def broken():
        raise RuntimeError("a metric source failed")
        yield  # a generator, like every source

    proxy.service.observability.metrics.extra.append(broken)
    status, _, body = await scrape(proxy.url)
    assert status == 500 and b"Traceback" not in body
    proxy.service.observability.metrics.extra.remove(broken)
    status, _, _ = await scrape(proxy.url)
    assert status == 200


# --- OTLP span names and the console echo ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_in_the_request_path_is_masked_in_the_otlp_span_name():
    """GET /v1/models/<a key> (a model id the route accepts): the request span's name has the key masked."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra")
    from test_observe_otlp import Collector, wait_for
    receiver = Collector()
    port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, otlp_endpoint=f"http://127.0.0.1:{port.getHost().port}",
                        environ={})
    try:
        record = obs.begin(request_id="req_path", method=b"GET", path=f"/v1/models/{ANTHROPIC_KEY}".encode(),
                           model=None, stream=False, headers=[], body=None)
        record.finish(status=404, account_name="a", provider="anthropic")
        await threads.deferToThread(obs.otlp.flush)
        await wait_for(lambda: receiver.spans and receiver.logs)
    finally:
        obs.otlp.stop(timeout=0)
        await port.stopListening()
    [span] = receiver.spans
    assert span.name == "GET /v1/models/sk-ant-[REDACTED]"
    assert not [raw for raw in receiver.raw if MARKER.encode() in raw]


def test_the_console_echo_of_a_record_masks_keys(events_seen, console_info):
    """With --debug (echo), a record's console line and fields hold no key from the model or path."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, echo=True, debug_bodies=False)
    record = obs.begin(request_id="r", method="POST", path=f"/v1/models/{ANTHROPIC_KEY}", model=ANTHROPIC_KEY,
                       stream=False, headers=[(b"x-api-key", ANTHROPIC_KEY.encode())], body=None)
    record.attempt(account_name="a", provider="anthropic", model=ANTHROPIC_KEY, status=401, verdict=SUCCESS,
                   duration=0.1)
    record.finish(status=401, account_name="a", provider="anthropic", error=f"bad key {ANTHROPIC_KEY}")
    ours = [e for e in events_seen if e.get("log_namespace", "").startswith("clproxy.observe.")]
    assert len(ours) == 2
    assert all(MARKER not in formatEvent(e) for e in ours)
    assert all(MARKER not in repr(e) for e in ours)
    assert formatEvent(ours[1]).startswith("POST /v1/models/sk-ant-[REDACTED] -> 401 model=sk-ant-[REDACTED]")


# --- the JSONL writer -------------------------------------------------------------------------------


def test_a_log_ending_in_a_cut_line_gets_the_next_row_on_a_line_of_its_own(tmp_path):
    """A file whose last line was cut (a crash or a full disk mid-write) does not swallow the next row."""
    (tmp_path / f"proxy-{DAY}.jsonl").write_bytes(b'{"ts":"2026-01-01T11:00:00.000Z","i":1}\n{"ts":"2026-01-0')
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    serve(obs, clock, 2)
    obs.flush()
    lines = (tmp_path / f"proxy-{DAY}.jsonl").read_bytes().split(b"\n")
    assert lines[1] == b'{"ts":"2026-01-0'
    assert [json.loads(line)["requestId"] for line in lines[2:] if line] == ["r0", "r1"]


def test_a_row_cut_by_a_full_disk_costs_that_row_only(tmp_path):
    """A write cut short by the file size limit (EFBIG, like ENOSPC) loses its rows, counted; the rows
    written once there is room again are each whole and parseable."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(tmp_path))
    serve(obs, clock, 1)
    obs.flush()
    path = tmp_path / f"proxy-{DAY}.jsonl"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    serve(obs, clock, 1, first=1)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 50, hard))
        obs.writer.sync()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert obs.writer.dropped[jsonl.WRITE_ERROR] >= 1 and "EFBIG" in obs.writer.last_error
    serve(obs, clock, 2, first=2)
    obs.flush()
    whole = []
    for line in path.read_bytes().splitlines():
        try:
            whole.append(json.loads(line)["requestId"])
        except ValueError:
            pass
    assert whole[0] == "r0" and whole[-2:] == ["r2", "r3"]


def test_a_logs_directory_removed_while_running_is_recreated(tmp_path):
    """Rows written after the logs directory was deleted land in a new file, not in the deleted one."""
    logs = tmp_path / "logs"
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=str(logs))
    serve(obs, clock, 1)
    obs.flush()
    for name in os.listdir(logs):
        os.unlink(logs / name)
    os.rmdir(logs)
    serve(obs, clock, 2, first=1)
    obs.flush()
    assert [row["requestId"] for row in rows(logs / f"proxy-{DAY}.jsonl")] == ["r1", "r2"]
    assert len(rows(logs / f"proxy-attempts-{DAY}.jsonl")) == 2


def test_body_captures_queued_for_a_dead_collector_are_bounded_in_bytes():
    """With --debug bodies and the collector down, queued captures stop at max_queue_bytes (the rest
    dropped and counted) instead of holding every request body until max_queue events."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra")
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None, debug_bodies=True, otlp_endpoint="http://127.0.0.1:9",
                        environ={})
    body = b'{"model":"m","pad":"' + b"x" * (1 << 20) + b'"}'
    try:
        for n in range(100):
            record = obs.begin(request_id=f"r{n}", method="POST", path="/v1/messages", model="m",
                               stream=False, headers=[], body=body)
            record.finish(status=200, account_name="a", provider="anthropic")
        queued = sum(len(event.get("body") or b"") for event in obs.otlp._queue)
        assert queued <= 64 * 1024 * 1024
        assert obs.otlp.dropped > 0 and obs.otlp.pending + obs.otlp.dropped == 200
    finally:
        obs.otlp.stop(timeout=0)
