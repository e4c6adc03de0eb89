"""One upstream try (clproxy.proxy.attempt), in memory: each kind of upstream answer maps to its Outcome.

The fake Anthropic resource is served through ``clproxy.testing.memory.MemoryAgent`` on a
``task.Clock``; no socket is opened. Each test checks the value :meth:`Attempt.run` returns, that
its verdict was recorded once (request record and pool), and what the client's sink received.
"""

import json

import attr
import pytest
from twisted.internet import defer, task

from clproxy.accounts.model import API_KEY, OAUTH, Account
from clproxy.observe.recorder import Observability
from clproxy.proxy import attempt as attempt_module
from clproxy.proxy.attempt import (CLIENT_GONE, RELAYED, STREAMED, TRUNCATED, Answered, Attempt, Failure,
                                   NextAccount, RefreshAndRetry)
from clproxy.proxy.dispatch import ProxyRequest
from clproxy.proxy.shaping import CloakingPipeline
from clproxy.proxy.upstream import UpstreamClient, UpstreamError
from clproxy.routing import policy
from clproxy.routing.pool import AccountPool
from clproxy.state.memory import MemoryStateStore
from clproxy.testing.anthropic import FakeAnthropic, error_json, text_stream
from clproxy.testing.memory import MemoryAgent

from helpers import RecordingSink

BASE = "http://anthropic.memory"


class _Pool(AccountPool):
    """The real pool, also keeping every verdict it is told and counting its backoff-level reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verdicts = []
        self.level_reads = 0

    async def record(self, account, verdict, sent_at=None):
        self.verdicts.append(verdict)
        await super().record(account, verdict, sent_at=sent_at)

    async def backoff_level(self, account):
        self.level_reads += 1
        return await super().backoff_level(account)


class Try:
    """One Attempt over the fake Anthropic resource in memory, on one task.Clock."""

    def __init__(self, passthrough=False, upstream_timeout=600.0):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.fake = FakeAnthropic(reactor=self.clock)
        self.agent = MemoryAgent(self.fake, self.clock)
        self.store = MemoryStateStore()
        self.pool = _Pool(self.store, clock=self.clock)
        self.obs = Observability(clock=self.clock, logs_dir=None)
        self.attempt = Attempt(clock=self.clock, upstream=UpstreamClient(self.clock, agent=self.agent),
                               pool=self.pool, store=self.store, shaping=CloakingPipeline(),
                               passthrough=passthrough, upstream_timeout=upstream_timeout)

    def start(self, account, out, stream=False):
        """Start the try; returns (its Deferred, the request)."""
        body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"",
                               headers=[(b"content-type", b"application/json")], body=body,
                               model="claude-sonnet-4-5", stream=stream)
        request.record = self.obs.begin(request_id=request.request_id, method=request.method,
                                        path=request.path, model=request.model, stream=stream,
                                        headers=request.headers, body=body)
        d = defer.ensureDeferred(self.attempt.run(request, out, account, self.clock.seconds() + 900))
        self.agent.flush()
        return d, request

    def run(self, account, out, stream=False, advance=()):
        """The try's Outcome, once it ran to its end (``advance``: clock steps to take meanwhile)."""
        d, request = self.start(account, out, stream)
        for seconds in advance:
            self.clock.advance(seconds)
            self.agent.flush()
        assert d.called, "the attempt did not finish"
        outcome = d.result
        assert request.record.attempts == len(self.pool.verdicts)  # recorded in both, once per try
        return outcome


def api(name="work"):
    return Account(key=f"config:{name}", name=name, kind=API_KEY, secret=f"sk-{name}", base_url=BASE)


def oauth(name="max", secret="token"):
    return Account(key=f"anthropic:{name}", name=name, kind=OAUTH, secret=secret, base_url=BASE,
                   expires_at=2e9)


def test_a_whole_answer_is_relayed():
    """A 200 message is relayed whole to the client as Answered(RELAYED), with exactly one SUCCESS
    verdict recorded for the account."""
    t = Try()
    out = RecordingSink()
    assert t.run(api(), out) == Answered(RELAYED)
    assert [v.action for v in t.pool.verdicts] == [policy.SUCCESS]
    assert out.status == 200 and json.loads(out.body)["type"] == "message"


def test_a_rate_limit_goes_to_the_next_account_with_anthropics_answer_kept():
    """A 429 with Retry-After 30 yields NextAccount with a COOL/RATE_LIMITED verdict and keeps Anthropic's
    status, body and headers in the failure, while nothing at all reaches the client yet."""
    t = Try()
    body = error_json(429, "rate_limit_error", "rate limited")
    t.fake.script("sk-work", status=429, headers={"retry-after": "30"}, body=body)
    out = RecordingSink()
    outcome = t.run(api(), out)
    assert isinstance(outcome, NextAccount)
    assert (outcome.verdict.action, outcome.verdict.reason) == (policy.COOL, policy.RATE_LIMITED)
    failure = outcome.failure
    assert (failure.account_key, failure.status, failure.body, failure.network) == ("config:work", 429, body, None)
    assert (b"retry-after", [b"30"]) in [(n.lower(), v) for n, v in failure.headers]
    assert out.status is None and out.writes == []  # nothing reached the client
    assert t.pool.verdicts == [outcome.verdict]


def test_a_success_does_not_read_the_backoff_level():
    """A 2xx resets the account's backoff level, so neither a whole answer nor a stream reads it
    first: with the Redis store that read was one round trip of every request."""
    for stream, events in ((False, None), (True, text_stream(["a"]))):
        t = Try()
        t.store.set_cooldown("config:work", 0.0, 3)
        if events is not None:
            t.fake.script("sk-work", events=events)
        assert t.run(api(), RecordingSink(), stream=stream) in (Answered(RELAYED), Answered(STREAMED))
        assert t.pool.level_reads == 0
        assert t.pool.verdicts[0].backoff_level == 0


@pytest.mark.parametrize("how", ["429", "network", "unusable", "first-event"])
def test_a_failure_is_classified_at_the_accounts_stored_backoff_level(how):
    """Every verdict that is not a success reads the account's backoff level once, after the
    answer: a 429 at stored level 2 cools for 1 * 2**2 = 4 s and raises the level to 3; the other
    failures keep the stored level."""
    t = Try()
    t.store.set_cooldown("config:work", 0.0, 2)
    stream = False
    if how == "429":
        t.fake.script("sk-work", status=429, body=error_json(429, "rate_limit_error", "rate limited"))
    elif how == "network":
        t.fake.script("sk-work", reset=True)
    elif how == "unusable":
        t.fake.script("sk-work", body=b"")
    else:
        t.fake.script("sk-work", end_before_first=True)
        stream = True
    outcome = t.run(api(), RecordingSink(), stream=stream)
    assert isinstance(outcome, NextAccount)
    assert t.pool.level_reads == 1
    if how == "429":
        assert (outcome.verdict.cooldown, outcome.verdict.backoff_level) == (4, 3)
    else:
        assert outcome.verdict.backoff_level == 2


def test_overload_goes_to_the_next_account_without_cooling():
    """A 529 overload moves on to the next account with a NEXT verdict, not a cooldown: overload is
    Anthropic's state, not the account's fault."""
    t = Try()
    t.fake.script("sk-work", status=529, body=error_json(529, "overloaded_error", "Overloaded"))
    outcome = t.run(api(), RecordingSink())
    assert isinstance(outcome, NextAccount)
    assert (outcome.verdict.action, outcome.failure.status) == (policy.NEXT, 529)


def test_an_oauth_401_asks_for_a_refresh_and_a_retry():
    """A revoked OAuth token's 401 yields RefreshAndRetry with a REFRESH verdict and sends the client
    nothing, so the same account can be retried with a new token."""
    t = Try()
    t.fake.revoke("token")
    out = RecordingSink()
    outcome = t.run(oauth(), out)
    assert isinstance(outcome, RefreshAndRetry)
    assert (outcome.verdict.action, outcome.failure.status) == (policy.REFRESH, 401)
    assert out.status is None


def test_an_oauth_401_as_a_streams_first_event_asks_for_a_refresh():
    """An authentication_error arriving as a stream's first event counts as a 401 and asks for a refresh,
    before the client's stream has started."""
    t = Try()
    t.fake.script("token", events=[("error", {"type": "error", "error": {
        "type": "authentication_error", "message": "OAuth token has expired"}})])
    out = RecordingSink()
    outcome = t.run(oauth(), out, stream=True)
    assert isinstance(outcome, RefreshAndRetry)
    assert outcome.failure.status == 401
    assert json.loads(outcome.failure.body)["error"]["type"] == "authentication_error"
    assert out.started is False


def test_a_client_error_is_relayed_as_the_answer():
    """A 400 invalid_request_error is the client's fault: it is relayed as the answer with a RETURN verdict
    instead of trying another account."""
    t = Try()
    t.fake.script("sk-work", status=400, body=error_json(400, "invalid_request_error", "bad"))
    out = RecordingSink()
    assert t.run(api(), out) == Answered(RELAYED)
    assert [v.action for v in t.pool.verdicts] == [policy.RETURN]
    assert out.status == 400 and json.loads(out.body)["error"]["type"] == "invalid_request_error"


def test_in_passthrough_mode_a_rate_limit_is_relayed():
    """In passthrough mode a 429 is not failed over but relayed to the client as Answered(RELAYED) with
    its status 429."""
    t = Try(passthrough=True)
    t.fake.script("sk-work", status=429, body=error_json(429, "rate_limit_error", "rate limited"))
    out = RecordingSink()
    assert t.run(api(), out) == Answered(RELAYED)
    assert out.status == 429


def test_a_reset_connection_is_a_network_failure():
    """A connection reset before any answer is a NEXT/NETWORK failure with no status and an UpstreamError,
    and the client is sent nothing, so the request can go on to another account."""
    t = Try()
    t.fake.script("sk-work", reset=True)
    out = RecordingSink()
    outcome = t.run(api(), out)
    assert isinstance(outcome, NextAccount)
    assert (outcome.verdict.action, outcome.verdict.reason) == (policy.NEXT, policy.NETWORK)
    assert outcome.failure.status is None and isinstance(outcome.failure.network, UpstreamError)
    assert out.status is None


def test_a_silent_upstream_times_out():
    """An upstream that stays silent 60 s is given up after the 20 s upstream timeout: the outcome is
    NextAccount with a network failure of kind "timeout"."""
    t = Try(upstream_timeout=20.0)
    t.fake.script("sk-work", delay=60.0)
    outcome = t.run(api(), RecordingSink(), advance=[20.0])
    assert isinstance(outcome, NextAccount)
    assert outcome.failure.network.kind == "timeout"


@pytest.mark.parametrize("body", [b"", b"[]"], ids=["empty", "not-an-object"])
def test_an_unusable_success_is_a_network_failure(body):
    """A 200 whose body is empty or not a JSON object is treated as a network failure (no status, the
    client sent nothing), not relayed as if it were an answer."""
    t = Try()
    t.fake.script("sk-work", body=body)
    out = RecordingSink()
    outcome = t.run(api(), out)
    assert isinstance(outcome, NextAccount)
    assert outcome.failure.status is None and "returned" in outcome.failure.network.message
    assert out.status is None


def test_a_whole_stream_is_streamed():
    """A complete stream is relayed as Answered(STREAMED) ending in message_stop, and the attempt no
    longer lists it among its open streams afterwards."""
    t = Try()
    t.fake.script("sk-work", events=text_stream(["a", "b"]))
    out = RecordingSink()
    assert t.run(api(), out, stream=True) == Answered(STREAMED)
    assert [n for n, _ in out.events()][-1] == "message_stop"
    assert not t.attempt.streams  # no longer listed once relayed


def test_a_stream_cut_before_its_first_event_is_a_network_failure():
    """A stream that ends before its first event is a network failure for the next account, and the
    client's stream has not started, so a retry stays invisible to it."""
    t = Try()
    t.fake.script("sk-work", end_before_first=True)
    out = RecordingSink()
    outcome = t.run(api(), out, stream=True)
    assert isinstance(outcome, NextAccount) and outcome.failure.network is not None
    assert out.started is False


def test_a_stream_cut_after_commit_is_truncated():
    """A stream cut after 4 events is Answered(TRUNCATED): the client gets a final error event and an
    end, and the try still counts as a SUCCESS because it was already committed."""
    t = Try()
    t.fake.script("sk-work", cut_after=4)
    out = RecordingSink()
    assert t.run(api(), out, stream=True) == Answered(TRUNCATED)
    assert out.events()[-1][0] == "error" and out.finished
    assert [v.action for v in t.pool.verdicts] == [policy.SUCCESS]  # committed: the try succeeded


def test_the_client_leaving_mid_stream():
    """A client that disconnects one second into a paced 3-chunk stream ends the attempt as
    Answered(CLIENT_GONE) instead of leaving it waiting on the upstream."""
    t = Try()
    t.fake.script("sk-work", events=text_stream(["a", "b", "c"]), pace=1.0)
    out = RecordingSink()
    d, _ = t.start(api(), out, stream=True)
    t.clock.advance(1.0)
    t.agent.flush()
    assert out.started and not d.called
    out.disconnect()
    t.agent.flush()
    t.clock.advance(10.0)
    t.agent.flush()
    assert d.result == Answered(CLIENT_GONE)


def test_the_client_leaving_before_the_answer_records_nothing():
    """A client that leaves while the upstream is still silent (30 s delay) gives CLIENT_GONE with no
    verdict and no attempt recorded, so the account is not judged for it."""
    t = Try()
    t.fake.script("sk-work", delay=30.0)
    out = RecordingSink()
    d, request = t.start(api(), out)
    out.disconnect()
    t.agent.flush()
    assert d.result == Answered(CLIENT_GONE)
    assert t.pool.verdicts == [] and request.record.attempts == 0


def test_outcomes_are_values():
    """Outcomes and failures are frozen, comparable values (no assignment after creation) and no
    exception class carries the control flow between the attempt and its caller."""
    failure = Failure("config:a", status=429, headers=[], body=b"{}")
    verdict = policy.classify_network_error("refused", backoff_level=0)
    assert NextAccount(verdict, failure) == NextAccount(verdict, failure)
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        failure.status = 500  # type: ignore[misc]
    with pytest.raises(attr.exceptions.FrozenInstanceError):
        Answered(RELAYED).how = STREAMED  # type: ignore[misc]
    assert not hasattr(attempt_module, "_Answered")  # no exception carries control flow


class _GatedPool(_Pool):
    """A pool whose ``record`` waits for ``gate`` (a shared store on a slow Redis round trip)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = defer.Deferred()

    async def record(self, account, verdict, sent_at=None):
        await self.gate
        await super().record(account, verdict, sent_at=sent_at)


def test_a_success_is_delivered_while_its_verdict_is_recorded():
    """A success is relayed while the pool records it (on a shared store, a Redis round trip the
    client no longer waits for): the whole stream reaches the client before the record is done, and
    the attempt ends, STREAMED, only once it is."""
    t = Try()
    t.pool = t.attempt.pool = _GatedPool(t.store, clock=t.clock)
    t.fake.script("sk-work", events=text_stream(["a", "b"]))
    out = RecordingSink()
    d, request = t.start(api(), out, stream=True)
    t.agent.flush()
    names = [n for n, _ in out.events()]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "error" not in names
    assert out.finished
    assert not d.called and t.pool.verdicts == []  # delivered; the verdict is not recorded yet
    t.pool.gate.callback(None)
    t.agent.flush()
    assert d.called, "the attempt did not finish once its verdict was recorded"
    assert d.result == Answered(STREAMED)
    assert [v.action for v in t.pool.verdicts] == [policy.SUCCESS]
    assert request.record._usage["output_tokens"] == 2  # the final usage, read from the stream's tail


def test_a_stream_is_committed_before_its_try_is_recorded(monkeypatch):
    """A stream's success: its head and first events reach the client before the try's row and the
    pool's record (its time to first byte includes neither); the row is written once, the stream
    then relayed to its end."""
    from clproxy.observe.recorder import RequestRecord
    t = Try()
    out = RecordingSink()
    seen = []
    record_verdict = t.pool.record

    async def record(account, verdict, sent_at=None):
        seen.append(("pool", out.started and bool(out.writes)))
        await record_verdict(account, verdict, sent_at=sent_at)

    t.pool.record = record
    note_attempt = RequestRecord.attempt

    def attempt(self, **kwargs):
        seen.append(("row", out.started and bool(out.writes)))
        return note_attempt(self, **kwargs)

    monkeypatch.setattr(RequestRecord, "attempt", attempt)
    t.fake.script("sk-work", events=text_stream(["a", "b"]))
    d, request = t.start(api(), out, stream=True)
    t.agent.flush()
    assert d.called and d.result == Answered(STREAMED)
    assert seen == [("row", True), ("pool", True)]
    assert [n for n, _ in out.events()][-1] == "message_stop" and request.record.attempts == 1


def test_a_failure_is_recorded_before_anything_else_happens():
    """A verdict that is not a success (here a 429 and its cooldown) is recorded before the attempt
    returns, so the next account is chosen with the cooldown in place."""
    t = Try()
    t.pool = t.attempt.pool = _GatedPool(t.store, clock=t.clock)
    t.fake.script("sk-work", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "rate limited"))
    d, _ = t.start(api(), RecordingSink())
    t.agent.flush()
    assert not d.called
    t.pool.gate.callback(None)
    assert isinstance(d.result, NextAccount)
    states = []
    t.store.get_account_states(["config:work"]).addCallback(states.append)
    assert states[0]["config:work"].cooling_until == t.clock.seconds() + 30


def test_a_whole_answer_reaches_the_client_before_its_try_is_recorded(monkeypatch):
    """A whole 200 is sent first: when the pool records the success and the request's record gets
    the try's row, the client already has status and body (its latency does not include them); the
    usage and model are in the record before the attempt ends."""
    from clproxy.observe.recorder import RequestRecord
    t = Try()
    out = RecordingSink()
    seen = []
    record_verdict = t.pool.record

    async def record(account, verdict, sent_at=None):
        seen.append(("pool", out.finished))
        await record_verdict(account, verdict, sent_at=sent_at)

    t.pool.record = record
    note_attempt = RequestRecord.attempt

    def attempt(self, **kwargs):
        seen.append(("row", out.finished))
        return note_attempt(self, **kwargs)

    monkeypatch.setattr(RequestRecord, "attempt", attempt)
    d, request = t.start(api(), out)
    t.agent.flush()
    assert d.called and d.result == Answered(RELAYED)
    assert seen == [("row", True), ("pool", True)]
    assert out.status == 200 and json.loads(b"".join(out.writes))["type"] == "message"
    assert request.record.actual_model and "output_tokens" in request.record._usage
