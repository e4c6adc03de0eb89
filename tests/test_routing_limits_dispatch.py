"""excludedModels and maxConcurrent through the dispatcher, in memory on a task.Clock (issue 13).

The pieces (clproxy.routing.limits) are tested alone in test_limits.py; here the dispatcher uses
them: a model an account excludes never reaches it, a model nobody may serve is a 404 with nothing
sent upstream, a busy account is skipped, and when every account is busy the request queues (FIFO,
bounded by queue_timeout, left at once by a client that hangs up).
"""

import json

import attr
from twisted.internet import defer

from clproxy.errors import ProxyError
from clproxy.proxy.dispatch import ProxyRequest
from clproxy.testing.anthropic import error_json, text_stream

from helpers import RecordingSink
from test_dispatch_memory import Harness, api, no_socket, run  # noqa: F401  (fixture)


def request_for(model: str, stream: bool = False) -> ProxyRequest:
    body = json.dumps({"model": model, "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"",
                        headers=[(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")],
                        body=body, model=model, stream=stream)


def start(h: Harness, request, out) -> defer.Deferred:
    d = defer.ensureDeferred(h.dispatcher.forward(request, out))
    h.agent.flush()
    return d


def step(h: Harness, seconds: float) -> None:
    h.clock.advance(seconds)
    h.agent.flush()


def test_an_excluded_model_skips_that_account():
    """An Opus request skips account a, which excludes claude-opus-*, and is served 200 by b; a Sonnet
    request still goes to a under fill-first."""
    h = Harness([api("a", excluded_models=("claude-opus-*",)), api("b")])
    out = RecordingSink()
    h.forward(request_for("claude-opus-4-1"), out)
    assert out.status == 200
    assert [r.credential for r in h.fake.requests] == ["sk-b"]
    h.forward(request_for("claude-sonnet-4-5"), RecordingSink())
    assert [r.credential for r in h.fake.requests] == ["sk-b", "sk-a"]  # fill-first: a serves sonnet


def test_a_model_no_account_may_serve_is_404_and_nothing_is_sent():
    """A model every account excludes is a 404 not_found_error naming the model and both patterns,
    and no request is sent upstream at all."""
    h = Harness([api("a", excluded_models=("claude-opus-*",)), api("b", excluded_models=("*opus*",))])
    out = RecordingSink()
    h.forward(request_for("claude-opus-4-1"), out)
    error = out.errors[0]
    assert out.status == 404 and error.error_type == "not_found_error"
    assert "claude-opus-4-1" in error.message and "claude-opus-*" in error.message and "*opus*" in error.message
    assert h.fake.requests == []


def test_a_busy_account_is_skipped_for_the_next():
    """With maxConcurrent 1, a second stream while a is busy goes to b: one in flight on each, and
    both counts back to 0 once the streams end."""
    h = Harness([api("a", max_concurrent=1), api("b", max_concurrent=1)])
    h.fake.script("sk-a", events=text_stream(["x"] * 4), pace=1.0)
    h.fake.script("sk-b", events=text_stream(["y"] * 4), pace=1.0)
    first, second = RecordingSink(), RecordingSink()
    d1 = start(h, request_for("claude-sonnet-4-5", stream=True), first)
    d2 = start(h, request_for("claude-sonnet-4-5", stream=True), second)
    assert [r.credential for r in h.fake.requests] == ["sk-a", "sk-b"]  # two streams, two accounts
    assert h.dispatcher.gate.in_flight("config:a") == 1 and h.dispatcher.gate.in_flight("config:b") == 1
    for _ in range(10):
        step(h, 1.0)
    assert d1.called and d2.called
    assert h.dispatcher.gate.in_flight("config:a") == 0 and h.dispatcher.gate.in_flight("config:b") == 0


def test_when_every_account_is_busy_the_request_waits_for_a_slot():
    """When the only account is at maxConcurrent 1, a second request is queued rather than failed, is
    served 200 once the stream ends, and its wait in the queue is observed in the metrics."""
    h = Harness([api("a", max_concurrent=1)], queue_timeout=30)
    h.fake.script("sk-a", events=text_stream(["x"] * 3), pace=1.0, times=1)
    first, waiting = RecordingSink(), RecordingSink()
    d1 = start(h, request_for("claude-sonnet-4-5", stream=True), first)
    d2 = start(h, request_for("claude-sonnet-4-5"), waiting)
    assert len(h.fake.requests) == 1 and h.dispatcher.gate.queue_length() == 1
    assert waiting.status is None  # not failed: queued
    for _ in range(20):
        step(h, 1.0)
    assert d1.called and d2.called
    assert waiting.status == 200 and len(h.fake.requests) == 2
    assert h.dispatcher.gate.queue_length() == 0
    assert h.dispatcher.obs.metrics.queue_wait.series[()][-1] > 0  # the wait was observed


def test_the_queue_times_out_with_a_429():
    """A request queued behind a busy account for longer than the 5 s queue timeout gets a 429
    rate_limit_error naming maxConcurrent and queue-timeout with Retry-After 1, and never goes upstream."""
    h = Harness([api("a", max_concurrent=1)], queue_timeout=5)
    h.fake.script("sk-a", events=text_stream(["x"] * 20), pace=1.0, times=1)
    busy, waiting = RecordingSink(), RecordingSink()
    start(h, request_for("claude-sonnet-4-5", stream=True), busy)
    d2 = start(h, request_for("claude-sonnet-4-5"), waiting)
    for _ in range(6):
        step(h, 1.0)
    assert d2.called and waiting.status == 429
    error = waiting.errors[0]
    assert isinstance(error, ProxyError) and error.error_type == "rate_limit_error"
    assert "maxConcurrent" in error.message and "queue-timeout" in error.message
    assert (b"retry-after", b"1") in error.headers
    assert h.dispatcher.gate.queue_length() == 0 and len(h.fake.requests) == 1


def test_a_client_that_hangs_up_leaves_the_queue_at_once():
    """A queued client that hangs up leaves the queue at once (2 waiting, then 1) and never reaches the
    upstream, while the request behind it is still served 200."""
    h = Harness([api("a", max_concurrent=1)], queue_timeout=30)
    h.fake.script("sk-a", events=text_stream(["x"] * 3), pace=1.0, times=1)
    busy, leaving, later = RecordingSink(), RecordingSink(), RecordingSink()
    start(h, request_for("claude-sonnet-4-5", stream=True), busy)
    d2 = start(h, request_for("claude-sonnet-4-5"), leaving)
    d3 = start(h, request_for("claude-sonnet-4-5"), later)
    assert h.dispatcher.gate.queue_length() == 2
    leaving.disconnect()
    assert h.dispatcher.gate.queue_length() == 1
    assert d2.called
    for _ in range(20):
        step(h, 1.0)
    assert d3.called and later.status == 200
    assert len(h.fake.requests) == 2  # the one who left never reached the upstream


def test_a_queued_request_is_not_sent_to_an_account_that_cooled_while_it_waited():
    """The request holding a's only slot gets a 429 (a cools for 30 s); the request queued behind it is
    handed that slot, but a is cooling now: nothing more is sent to a, the slot is given back, and the
    client gets the pool's 429 whose Retry-After is a's recovery (30 s), not the upstream's verdict
    spent on a second request."""
    h = Harness([api("a", max_concurrent=1)], queue_timeout=30)
    h.fake.script("sk-a", status=429, headers={"retry-after": "30"}, delay=2.0,
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    first, queued = RecordingSink(), RecordingSink()
    d1 = start(h, request_for("claude-sonnet-4-5"), first)
    d2 = start(h, request_for("claude-sonnet-4-5"), queued)
    assert h.dispatcher.gate.queue_length() == 1
    for _ in range(3):
        step(h, 1.0)
    assert d1.called and d2.called and first.status == 429
    assert len(h.fake.requests) == 1  # the queued request reached nobody
    assert queued.status == 429 and queued.header(b"retry-after") == b"30"  # a recovers 30 s after its 429
    assert "1 cooling down" in queued.errors[0].message
    assert h.dispatcher.gate.in_flight("config:a") == 0  # the slot it was handed is given back


def test_a_queued_request_is_not_sent_past_the_rate_limit():
    """rateLimit 1 and maxConcurrent 1: the request queued behind the first is handed a's slot, but a's one
    request of the minute is spent; it is not sent, and the client gets a 429."""
    h = Harness([api("a", max_concurrent=1, rate_limit=1)], queue_timeout=30)
    h.fake.script("sk-a", delay=2.0, times=1)
    first, queued = RecordingSink(), RecordingSink()
    d1 = start(h, request_for("claude-sonnet-4-5"), first)
    d2 = start(h, request_for("claude-sonnet-4-5"), queued)
    for _ in range(3):
        step(h, 1.0)
    assert d1.called and d2.called and first.status == 200
    assert len(h.fake.requests) == 1 and queued.status == 429
    assert h.dispatcher.gate.in_flight("config:a") == 0


def test_a_queued_request_takes_a_rate_slot_only_on_the_account_it_is_sent_to():
    """Both accounts (rateLimit 10) are busy with a stream; a third request queues for either and is
    served by a, whose stream ends first. It spent a rate slot of a only: b's count is its own stream's,
    1, not 2 (a slot taken at queue time for an account never sent to would hold b back for a minute)."""
    h = Harness([api("a", max_concurrent=1, rate_limit=10), api("b", max_concurrent=1, rate_limit=10)],
                queue_timeout=30)
    h.fake.script("sk-a", events=text_stream(["x"] * 2), pace=1.0, times=1)
    h.fake.script("sk-b", events=text_stream(["y"] * 8), pace=1.0, times=1)
    d1 = start(h, request_for("claude-sonnet-4-5", stream=True), RecordingSink())
    d2 = start(h, request_for("claude-sonnet-4-5", stream=True), RecordingSink())
    queued = RecordingSink()
    d3 = start(h, request_for("claude-sonnet-4-5"), queued)
    assert h.dispatcher.gate.queue_length() == 1
    for _ in range(25):
        step(h, 1.0)
    assert d1.called and d2.called and d3.called and queued.status == 200
    assert [r.credential for r in h.fake.requests] == ["sk-a", "sk-b", "sk-a"]
    now = h.clock.seconds()
    assert run(h.store.rate_usage("config:a", now, 60.0))[0] == 2
    assert run(h.store.rate_usage("config:b", now, 60.0))[0] == 1


def test_a_queued_request_is_not_sent_to_an_account_disabled_while_it_waited():
    """a is disabled (its organization, say) while a request waits for its slot: the request is not
    sent to it when the slot frees."""
    h = Harness([api("a", max_concurrent=1)], queue_timeout=30)
    h.fake.script("sk-a", delay=2.0, times=1)
    first, queued = RecordingSink(), RecordingSink()
    start(h, request_for("claude-sonnet-4-5"), first)
    d2 = start(h, request_for("claude-sonnet-4-5"), queued)
    h.accounts = [attr.evolve(a, enabled=False) for a in h.accounts]
    for _ in range(3):
        step(h, 1.0)
    assert first.status == 200 and d2.called
    assert len(h.fake.requests) == 1 and queued.status == 429
