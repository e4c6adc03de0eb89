"""The dispatcher, unit-tested in memory: the fake Anthropic resource behind an in-memory agent, a task.Clock.

No socket is opened (the reactor's listen/connect methods are made to fail for every test here):
the upstream client's Agent talks HTTP/1.1 bytes to ``clproxy.testing.anthropic.FakeAnthropic``
through ``clproxy.testing.memory.MemoryAgent``. Each test asserts the verdicts the dispatcher
reached, attempt by attempt, and what the client's sink received.
"""

import json
import math

import attr
import pytest
from twisted.internet import defer, reactor, task

from clproxy.accounts.model import API_KEY, OAUTH, Account
from clproxy.errors import ProxyError
from clproxy.http.openai import OpenAIResponseAdapter
from clproxy.observe.recorder import Observability
from clproxy.proxy.dispatch import DispatchSettings, Dispatcher, ProxyRequest
from clproxy.proxy.upstream import UpstreamClient
from clproxy.routing import policy
from clproxy.routing.pool import AccountPool
from clproxy.state.memory import MemoryStateStore
from clproxy.state.model import AccountState
from clproxy.testing.anthropic import FakeAnthropic, error_json, text_stream, unified_headers
from clproxy.testing.memory import MemoryAgent

from helpers import RecordingSink

BASE = "http://anthropic.memory"


@pytest.fixture(autouse=True)
def no_socket(monkeypatch):
    """Any attempt to listen or connect on the real reactor fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test of the dispatcher in memory opened a socket")
    for name in ("listenTCP", "connectTCP", "listenUNIX", "connectUNIX", "listenSSL", "connectSSL"):
        monkeypatch.setattr(reactor, name, refuse, raising=False)


class _Pool(AccountPool):
    """The real pool, also keeping every verdict it is told, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verdicts = []

    async def record(self, account, verdict, sent_at=None):
        self.verdicts.append((account.name, verdict))
        await super().record(account, verdict, sent_at=sent_at)


class StubRefresher:
    """The refresher's interface (``fresh(account, force)``): a forced refresh hands out the next token."""

    def __init__(self, tokens):
        self._tokens = list(tokens)
        self.calls = []

    async def fresh(self, account, force=False):
        self.calls.append((account.name, force))
        if not force:
            return account
        return attr.evolve(account, secret=self._tokens.pop(0))


class Harness:
    """A dispatcher over the fake Anthropic resource in memory, on one task.Clock."""

    def __init__(self, accounts, refresher=None, **settings):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)  # a realistic "now", so absolute cooldowns are large numbers
        self.fake = FakeAnthropic(reactor=self.clock)
        self.agent = MemoryAgent(self.fake, self.clock)
        self.store = MemoryStateStore()
        self.pool = _Pool(self.store, clock=self.clock)
        self.accounts = accounts
        self.dispatcher = Dispatcher(
            clock=self.clock, upstream=UpstreamClient(self.clock, agent=self.agent), pool=self.pool,
            store=self.store, accounts=lambda: self.accounts, settings=DispatchSettings(**settings),
            refresher=refresher, observability=Observability(clock=self.clock, logs_dir=None))

    def forward(self, request, out, advance=()):
        """Run one request to its end; ``advance``: clock steps (seconds) to take while it runs."""
        d = defer.ensureDeferred(self.dispatcher.forward(request, out))
        self.agent.flush()
        for seconds in advance:
            self.clock.advance(seconds)
            self.agent.flush()
        assert d.called, "the dispatcher did not finish"
        failures = []
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()

    def verdicts(self):
        """(account name, action, status, reason) per attempt, in order."""
        return [(name, v.action, v.status, v.reason) for name, v in self.pool.verdicts]

    async def states(self):
        return await self.store.get_account_states([a.key for a in self.accounts])


def api(name, secret=None, **kwargs):
    return Account(key=f"config:{name}", name=name, kind=API_KEY, secret=secret or f"sk-{name}",
                   base_url=BASE, **kwargs)


def oauth(name, secret, **kwargs):
    return Account(key=f"anthropic:{name}", name=name, kind=OAUTH, secret=secret, base_url=BASE,
                   expires_at=2e9, **kwargs)


def messages(stream=False) -> ProxyRequest:
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"",
                        headers=[(b"content-type", b"application/json"),
                                 (b"anthropic-version", b"2023-06-01")],
                        body=body, model="claude-sonnet-4-5", stream=stream)


def run(coroutine):
    """Run a coroutine that only awaits Deferreds already fired (the memory store's)."""
    d = defer.ensureDeferred(coroutine)
    assert d.called
    return d.result


def test_no_socket_guard_is_armed():
    """The no-socket guard is in force: listening on the real reactor fails with "opened a socket", so
    every test in this file really runs in memory."""
    with pytest.raises(AssertionError, match="opened a socket"):
        reactor.listenTCP(0, None)


def test_a_whole_answer_in_memory():
    """One API-key account answers 200 through the in-memory agent: one SUCCESS verdict, the message
    relayed whole, its key sent upstream, a TTFB of 0.0 recorded and exactly one upstream request."""
    h = Harness([api("work")])
    out = RecordingSink()
    request = messages()
    h.forward(request, out)
    assert h.verdicts() == [("work", policy.SUCCESS, 200, policy.OK)]
    assert out.status == 200 and out.finished
    assert json.loads(out.body)["type"] == "message"
    assert h.fake.requests[0].credential == "sk-work"
    assert request.record.ttfb == 0.0 and request.record.finished
    assert h.agent.requests == 1


def test_429_fails_over_to_the_next_account_and_cools_the_first():
    """A 429 with Retry-After 30 on the first account fails over to the second, which answers 200; the
    first is cooled for exactly 30 s and the second is not cooled at all."""
    h = Harness([api("first"), api("second")])
    h.fake.script("sk-first", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "Number of requests has exceeded your rate limit"))
    out = RecordingSink()
    h.forward(messages(), out)
    assert h.verdicts() == [("first", policy.COOL, 429, policy.RATE_LIMITED),
                            ("second", policy.SUCCESS, 200, policy.OK)]
    assert h.pool.verdicts[0][1].cooldown == 30.0
    assert out.status == 200 and json.loads(out.body)["type"] == "message"
    states = run(h.states())
    assert states["config:first"].cooling_until == h.clock.seconds() + 30.0
    assert states["config:second"].cooling_until <= h.clock.seconds()


def test_a_late_success_of_a_request_sent_before_a_429_keeps_its_cooldown():
    """Request X reaches account a and is slow (10 s); request Y reaches a next, gets a 429 whose
    5-hour window is rejected and fails over to b. X's success, 10 s later, must not end a's
    cooldown nor reset its level: the next request goes to b. A request sent to a once the
    cooldown is over succeeds and does end it (level included)."""
    h = Harness([api("a"), api("b")])
    now = h.clock.seconds()
    h.fake.script("sk-a", delay=10.0, times=1)
    h.fake.script("sk-a", status=429, times=1,
                  headers=dict(unified_headers(five_hour=1.0, status="rejected", reset=now + 5 * 3600),
                               **{"retry-after": "60"}),
                  body=error_json(429, "rate_limit_error", "5h limit reached"))
    x, y = RecordingSink(), RecordingSink()
    slow = defer.ensureDeferred(h.dispatcher.forward(messages(), x))
    h.agent.flush()  # X is on its way to a
    h.forward(messages(), y)
    assert y.status == 200 and [r.credential for r in h.fake.requests] == ["sk-a", "sk-a", "sk-b"]
    cooled = run(h.states())["config:a"]
    assert cooled.cooling_until > now + 4 * 3600
    for _ in range(11):
        h.clock.advance(1)
        h.agent.flush()
    assert slow.called and x.status == 200
    assert h.verdicts()[-1] == ("a", policy.SUCCESS, 200, policy.OK)
    assert run(h.states())["config:a"] == cooled  # cooldown and level as the 429 left them
    h.forward(messages(), RecordingSink())
    assert h.fake.requests[-1].credential == "sk-b"
    # once the window has reset, a request sent then (after the 429) ends the cooldown
    h.clock.advance(5 * 3600)
    h.forward(messages(), RecordingSink())
    assert h.fake.requests[-1].credential == "sk-a"
    assert run(h.states())["config:a"] == AccountState()


def test_401_refreshes_and_retries_the_same_account_with_the_new_token():
    """An OAuth 401 forces one refresh and a retry on the same account with the new token, which
    succeeds; one refresh is recorded and the account is not cooled for it."""
    refresher = StubRefresher(["token-new"])
    h = Harness([oauth("max", "token-old"), api("spare")], refresher=refresher)
    h.fake.revoke("token-old")
    out = RecordingSink()
    request = messages()
    h.forward(request, out)
    assert h.verdicts() == [("max", policy.REFRESH, 401, policy.AUTH),
                            ("max", policy.SUCCESS, 200, policy.OK)]
    assert refresher.calls == [("max", False), ("max", True)]
    assert [r.credential for r in h.fake.requests] == ["token-old", "token-new"]
    assert out.status == 200
    assert request.record.refreshes == 1
    assert run(h.states())["anthropic:max"].cooling_until <= h.clock.seconds()  # a refresh is no cooldown


def test_a_first_attempt_whose_fresh_connection_breaks_is_retried_on_the_next_account():
    """A connection reset before any response sends the request on to the second account at once: two
    upstream connections, a 200 for the client, and no account cooled."""
    # the bootstrap of an attempt: its connection is reset before any response; nothing reached
    # the client, so the request goes on at once to the next account, and nobody is cooled
    h = Harness([api("first"), api("second")])
    h.fake.script("sk-first", reset=True, times=1)
    out = RecordingSink()
    h.forward(messages(), out)
    [(name, action, status, reason), second] = h.verdicts()
    assert (name, action, status, reason) == ("first", policy.NEXT, None, policy.NETWORK)
    assert second == ("second", policy.SUCCESS, 200, policy.OK)
    assert h.agent.requests == 2  # two connections: the broken one and the next account's
    assert out.status == 200
    assert all(s.cooling_until <= h.clock.seconds() for s in run(h.states()).values())


def test_an_upstream_silent_past_the_timeout_is_left_for_the_next_account():
    """An account silent for 60 s is left after the 20 s timeout (NEXT/NETWORK, "timeout after 20 s")
    and the next account answers the client with 200."""
    h = Harness([api("slow"), api("quick")], upstream_timeout=20.0)
    h.fake.script("sk-slow", delay=60.0)
    out = RecordingSink()
    h.forward(messages(), out, advance=[20.0])
    assert h.verdicts() == [("slow", policy.NEXT, None, policy.NETWORK),
                            ("quick", policy.SUCCESS, 200, policy.OK)]
    assert "timeout after 20 s" in h.pool.verdicts[0][1].detail
    assert out.status == 200


def test_a_body_that_stalls_after_its_head_is_left_for_the_next_account():
    """An account whose 200 sends its head and 10 bytes of body, then nothing: after 20 s of silence
    (upstream_timeout; at most 25 s, the idle sweeper's bound) the read fails as a timeout
    (NEXT/NETWORK), its connection is dropped and its maxConcurrent slot freed, and the next account
    answers the client with 200."""
    h = Harness([api("stalls", max_concurrent=1), api("quick")], upstream_timeout=20.0,
                request_deadline=900)
    h.fake.script("sk-stalls", body_stall_at=10, times=1)
    out = RecordingSink()
    d = defer.ensureDeferred(h.dispatcher.forward(messages(), out))
    h.agent.flush()
    for _ in range(19):  # second by second: the sweeps run on time, as on a real reactor
        h.clock.advance(1.0)
        h.agent.flush()
    assert not d.called and h.dispatcher.gate.in_flight("config:stalls") == 1  # not before 20 s
    for _ in range(6):
        h.clock.advance(1.0)
        h.agent.flush()
    assert d.called and out.status == 200
    assert h.verdicts() == [("stalls", policy.NEXT, None, policy.NETWORK),
                            ("quick", policy.SUCCESS, 200, policy.OK)]
    assert "timeout after 20 s waiting for the rest of the body" in h.pool.verdicts[0][1].detail
    assert h.dispatcher.gate.in_flight("config:stalls") == 0
    assert h.clock.getDelayedCalls() == []  # no sweep left behind


def test_the_wait_for_a_streams_first_event_ends_with_the_request_deadline():
    """A stream whose head comes at once and its first event 300 s later, with a 20 s request
    deadline and a 600 s upstream timeout: the wait for the first event ends with the deadline
    (between 20 and 25 s, the idle sweeper's bound), not after 600 s; it is the first-event
    timeout it always was (NEXT/NETWORK), and the client gets its error, not a stream."""
    h = Harness([api("slow"), api("spare")], request_deadline=20, upstream_timeout=600)
    h.fake.script("sk-slow", first_event_delay=300.0)
    out = RecordingSink()
    d = defer.ensureDeferred(h.dispatcher.forward(messages(stream=True), out))
    h.agent.flush()
    for _ in range(19):  # second by second: the sweeps run on time, as on a real reactor
        h.clock.advance(1.0)
        h.agent.flush()
    assert not d.called
    for _ in range(6):
        h.clock.advance(1.0)
        h.agent.flush()
    assert d.called, "still waiting for the first event past the request deadline"
    assert h.verdicts() == [("slow", policy.NEXT, None, policy.NETWORK)]  # no time left for spare
    assert "timed out before its first event" in h.pool.verdicts[0][1].detail
    assert out.status == 502 and not out.events()
    assert h.dispatcher.gate.in_flight("config:slow") == 0


def test_a_streams_first_event_may_take_its_upstream_timeout_when_the_deadline_allows():
    """The same stream (first event after 300 s) with the default deadline and a 600 s upstream
    timeout is waited for and relayed whole."""
    h = Harness([api("slow")], request_deadline=900, upstream_timeout=600)
    h.fake.script("sk-slow", first_event_delay=300.0)
    out = RecordingSink()
    h.forward(messages(stream=True), out, advance=[1.0] * 300)
    assert h.verdicts() == [("slow", policy.SUCCESS, 200, policy.OK)]
    assert [name for name, _ in out.events()][-1] == "message_stop"


@pytest.mark.parametrize("cut", [dict(end_before_first=True), dict(cut_after=0)],
                         ids=["ended-cleanly", "connection-closed"])
def test_a_stream_cut_before_its_first_event_goes_to_the_next_account(cut):
    """A stream that ends or closes before its first event goes to the next account, and the client
    sees one whole stream only: a single message_start through message_stop."""
    h = Harness([api("first"), api("second")])
    h.fake.script("sk-first", times=1, **cut)
    out = RecordingSink()
    h.forward(messages(stream=True), out)
    assert h.verdicts() == [("first", policy.NEXT, None, policy.NETWORK),
                            ("second", policy.SUCCESS, 200, policy.OK)]
    assert "before its first event" in h.pool.verdicts[0][1].detail
    # the client saw one stream only: the second account's, whole
    assert out.status == 200
    names = [name for name, _ in out.events()]
    assert names[0] == "message_start" and names[-1] == "message_stop" and names.count("message_start") == 1


def test_a_stream_truncated_after_commit_ends_with_an_error_event():
    """A stream cut after 4 good events is not retried elsewhere: the client keeps those events, then an
    api_error event and no message_stop, and the record and counters count one truncated stream."""
    h = Harness([api("first"), api("second")])
    h.fake.script("sk-first", cut_after=4)  # message_start, block start, ping, one delta
    out = RecordingSink()
    request = messages(stream=True)
    h.forward(request, out)
    # committed: the first event was good, so the account's attempt is a success and no other
    # account is tried (the client already has part of this answer)
    assert h.verdicts() == [("first", policy.SUCCESS, 200, policy.OK)]
    events = out.events()
    assert [name for name, _ in events[:4]] == ["message_start", "content_block_start", "ping",
                                               "content_block_delta"]
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "broke off the stream" in data["error"]["message"]
    assert "message_stop" not in [n for n, _ in events]
    assert out.status == 200 and out.finished
    assert request.record.truncated
    assert run(h.store.counters())["truncated_streams"] == 1


def test_a_whole_stream_reaches_the_client_in_order():
    """A 3-chunk stream reaches the client with its deltas in order, and the backpressure producer is
    unregistered before the end."""
    h = Harness([api("work")])
    h.fake.script("sk-work", events=text_stream(["one", " two", " three"]))
    out = RecordingSink()
    h.forward(messages(stream=True), out)
    deltas = [d["delta"]["text"] for n, d in out.events() if n == "content_block_delta"]
    assert deltas == ["one", " two", " three"]
    assert out.producer is None  # registered for backpressure, then unregistered before the end


def test_exhaustion_answers_429_with_the_earliest_recovery_as_retry_after():
    """When both accounts answer 429 (Retry-After 40 and 25), the client gets a 429 whose Retry-After is
    25, the earliest recovery, and a message saying all 2 accounts are cooling down."""
    h = Harness([api("a"), api("b")])
    for name, wait in (("sk-a", "40"), ("sk-b", "25")):
        h.fake.script(name, status=429, headers={"retry-after": wait},
                      body=error_json(429, "rate_limit_error", "rate limited"))
    out = RecordingSink()
    h.forward(messages(), out)
    assert h.verdicts() == [("a", policy.COOL, 429, policy.RATE_LIMITED),
                            ("b", policy.COOL, 429, policy.RATE_LIMITED)]
    assert out.status == 429
    [error] = out.errors
    assert isinstance(error, ProxyError) and error.error_type == "rate_limit_error"
    states = run(h.states())
    earliest = min(s.cooling_until for s in states.values())
    assert out.header(b"retry-after") == str(math.ceil(earliest - h.clock.seconds())).encode() == b"25"
    assert "all 2 accounts are unavailable (2 cooling down" in json.loads(out.body)["error"]["message"]


def test_exhaustion_by_overload_relays_anthropics_529():
    """When both accounts are overloaded, Anthropic's own 529 and Retry-After 3 are relayed and no
    account is cooled, since the overload is not theirs."""
    h = Harness([api("a"), api("b")])
    for name in ("sk-a", "sk-b"):
        h.fake.script(name, status=529, headers={"retry-after": "3"},
                      body=error_json(529, "overloaded_error", "Overloaded"))
    out = RecordingSink()
    h.forward(messages(), out)
    assert h.verdicts() == [("a", policy.NEXT, 529, policy.OVERLOADED),
                            ("b", policy.NEXT, 529, policy.OVERLOADED)]
    # overload cools nobody: the truth is Anthropic's own answer, with its Retry-After
    assert out.status == 529 and out.header(b"retry-after") == b"3"
    assert json.loads(out.body)["error"]["type"] == "overloaded_error"


def test_the_client_leaving_mid_stream_cancels_the_upstream():
    """A client leaving one second into a paced stream ends the forward and closes the upstream connection
    (none left open), so a departed client does not leak connections."""
    h = Harness([api("work")])
    h.fake.script("sk-work", events=text_stream(["a", "b", "c", "d"]), pace=1.0)
    out = RecordingSink()
    request = messages(stream=True)
    d = defer.ensureDeferred(h.dispatcher.forward(request, out))
    h.agent.flush()
    h.clock.advance(1.0)
    h.agent.flush()
    assert out.started and not d.called
    out.disconnect()
    h.agent.flush()
    h.clock.advance(10.0)
    h.agent.flush()
    assert d.called
    assert h.agent.open_connections == 0  # the upstream connection was closed, not leaked
    assert out.status == 200 and not out.finished


def test_the_openai_adapter_gets_its_time_to_first_byte_recorded():
    """A request answered through the OpenAI adapter gets a chat.completion and a recorded time to first
    byte, which it once lacked because the record never reached the inner response."""
    # the record was attached to the adapter before, whose inner response never saw it: an
    # OpenAI front-door request had no time to first byte
    h = Harness([api("work")])
    inner = RecordingSink()
    request = messages()
    h.forward(request, OpenAIResponseAdapter(inner, "claude-sonnet-4-5", False, now=lambda: 0.0))
    assert inner.status == 200 and json.loads(inner.body)["object"] == "chat.completion"
    assert request.record.ttfb is not None


def test_the_memory_agent_serves_a_resource_byte_for_byte():
    """The in-memory agent delivers a request's path and binary body byte for byte, only once flushed,
    and leaves no connection open: the harness every other test relies on."""
    import treq
    from twisted.web.resource import Resource

    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request):
            request.setHeader(b"content-type", b"text/plain")
            return request.path + b" " + request.content.read()

    clock = task.Clock()
    agent = MemoryAgent(Echo(), clock)
    from clproxy.proxy.upstream import BytesProducer
    d = agent.request(b"POST", b"http://any.host:1234/v1/x", None, BytesProducer(b"\x00body\xff"))
    responses = []
    d.addCallback(responses.append)
    assert responses == []  # nothing moves until flushed
    agent.flush()
    [response] = responses
    assert response.code == 200
    body = treq.content(response)
    agent.flush()
    assert body.result == b"/v1/x \x00body\xff"
    assert agent.open_connections == 0


# -- the loop reading the attempts' outcomes: refresh retries, skipped accounts, the final answer ----

class FailingRefresher:
    """A refresher whose every refresh fails (e.g. the refresh token was revoked)."""

    async def fresh(self, account, force=False):
        raise RuntimeError("refresh rejected")


def test_an_account_whose_refresh_fails_is_cooled_and_skipped_without_an_attempt():
    """An OAuth account whose refresh fails is cooled for AUTH_COOLDOWN and skipped without being sent
    any request; the spare API-key account answers 200."""
    h = Harness([oauth("max", "token"), api("spare")], refresher=FailingRefresher())
    out = RecordingSink()
    request = messages()
    h.forward(request, out)
    assert h.verdicts() == [("spare", policy.SUCCESS, 200, policy.OK)]
    assert [r.credential for r in h.fake.requests] == ["sk-spare"]
    assert run(h.states())["anthropic:max"].cooling_until == h.clock.seconds() + policy.AUTH_COOLDOWN
    assert out.status == 200 and request.record.refreshes == 1


def test_refresh_retries_spent_cool_the_account_and_the_loop_goes_on():
    """With max_refresh_retries 2, three 401s in a row (two forced refreshes) cool the OAuth account for
    AUTH_COOLDOWN, and the request goes on to the spare account, which answers 200."""
    refresher = StubRefresher(["token-2", "token-3"])
    h = Harness([oauth("max", "token-1"), api("spare")], refresher=refresher, max_refresh_retries=2)
    for token in ("token-1", "token-2", "token-3"):
        h.fake.revoke(token)
    out = RecordingSink()
    h.forward(messages(), out)
    assert h.verdicts() == [("max", policy.REFRESH, 401, policy.AUTH)] * 3 + [
        ("spare", policy.SUCCESS, 200, policy.OK)]
    assert refresher.calls == [("max", False), ("max", True), ("max", True)]
    assert run(h.states())["anthropic:max"].cooling_until == h.clock.seconds() + policy.AUTH_COOLDOWN
    assert out.status == 200


def test_every_credential_rejected_relays_anthropics_401_not_a_429():
    """When both accounts' keys are rejected, the client gets Anthropic's own 401 ("invalid x-api-key"),
    not a made-up 429, so a bad key is reported as what it is."""
    h = Harness([api("a"), api("b")])
    for key in ("sk-a", "sk-b"):
        h.fake.script(key, status=401, body=error_json(401, "authentication_error", "invalid x-api-key"))
    out = RecordingSink()
    h.forward(messages(), out)
    assert [a for _, a, _, _ in h.verdicts()] == [policy.COOL, policy.COOL]
    assert out.status == 401 and out.errors == []
    assert json.loads(out.body)["error"]["message"] == "invalid x-api-key"


def test_a_rejected_credential_then_a_broken_retry_still_relays_the_401():
    """A 401 followed by a retry whose connection breaks still relays Anthropic's 401, the last real
    answer, rather than the network failure with no status."""
    # the last try of the request broke (no status): the answer to relay is the last one Anthropic
    # gave, not the network failure (the shared mutable failure once sent a status of None here)
    refresher = StubRefresher(["token-new"])
    h = Harness([oauth("max", "token-old")], refresher=refresher, max_refresh_retries=1)
    h.fake.revoke("token-old")
    h.fake.script("token-new", reset=True)
    out = RecordingSink()
    h.forward(messages(), out)
    assert [(a, s) for _, a, s, _ in h.verdicts()] == [(policy.REFRESH, 401), (policy.NEXT, None)]
    assert out.status == 401
    assert json.loads(out.body)["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("script, status", [(dict(reset=True), 502), (dict(delay=60.0), 504),
                                            (dict(body_stall_at=10), 504)],
                         ids=["reset", "timeout", "stalled-body"])
def test_exhaustion_by_network_failures_answers_502_or_504(script, status):
    """A lone account that fails by network gives the client a 502 for a reset and a 504 for a timeout
    (no answer, or a body that stalls after its head), and the account is not cooled for it."""
    h = Harness([api("only")], upstream_timeout=20.0)
    h.fake.script("sk-only", **script)
    out = RecordingSink()
    # a stalled body is given up between 20 and 25 s of silence (the idle sweeper's bound)
    h.forward(messages(), out, advance=[1.0] * 25)
    assert [a for _, a, _, _ in h.verdicts()] == [policy.NEXT]
    assert out.status == status
    [error] = out.errors
    assert error.status == status
    assert run(h.states())["config:only"].cooling_until <= h.clock.seconds()


class PendingRefresher:
    """A refresher whose refreshes (all, or only the forced ones) wait until the test fires them;
    each hands out the next token."""

    def __init__(self, tokens, only_forced=False):
        self._tokens = list(tokens)
        self.only_forced = only_forced
        self.pending = []

    async def fresh(self, account, force=False):
        if self.only_forced and not force:
            return account
        d = defer.Deferred()
        self.pending.append(d)
        await d
        return attr.evolve(account, secret=self._tokens.pop(0))


def test_a_client_gone_during_the_token_refresh_is_sent_nothing():
    """The client hangs up while its OAuth account's token is being refreshed, before the first try:
    once the refresh is done, nothing is sent upstream for it and its concurrency slot is free."""
    refresher = PendingRefresher(["token-new"])
    h = Harness([oauth("max", "token-old")], refresher=refresher)
    out = RecordingSink()
    d = defer.ensureDeferred(h.dispatcher.forward(messages(), out))
    h.agent.flush()
    assert len(refresher.pending) == 1 and h.fake.requests == []
    out.disconnect()
    refresher.pending[0].callback(None)
    h.agent.flush()
    assert d.called and h.fake.requests == [] and h.verdicts() == []
    assert h.dispatcher.gate.in_flight("anthropic:max") == 0


def test_a_client_gone_during_the_refresh_after_a_401_gets_no_retry():
    """A 401, then the forced refresh; the client hangs up meanwhile: the retry with the new token is
    not sent (one upstream request in all), and the spare account is not tried either."""
    refresher = PendingRefresher(["token-new"], only_forced=True)
    h = Harness([oauth("max", "token-old"), api("spare")], refresher=refresher)
    h.fake.revoke("token-old")
    out = RecordingSink()
    d = defer.ensureDeferred(h.dispatcher.forward(messages(), out))
    h.agent.flush()
    assert [r.credential for r in h.fake.requests] == ["token-old"] and len(refresher.pending) == 1
    out.disconnect()
    refresher.pending[0].callback(None)
    h.agent.flush()
    assert d.called and [r.credential for r in h.fake.requests] == ["token-old"]
    assert out.status is None and h.dispatcher.gate.in_flight("anthropic:max") == 0


def test_the_retry_after_a_refresh_takes_its_own_rate_slot():
    """rateLimit 2: a 401, the refresh, the retry with the new token; two requests were sent, and both
    are counted in the account's rate window."""
    h = Harness([oauth("max", "token-old", rate_limit=2)], refresher=StubRefresher(["token-new"]))
    h.fake.revoke("token-old")
    out = RecordingSink()
    h.forward(messages(), out)
    assert out.status == 200 and [r.credential for r in h.fake.requests] == ["token-old", "token-new"]
    assert run(h.store.rate_usage("anthropic:max", h.clock.seconds(), 60.0))[0] == 2


def test_a_retry_after_a_refresh_past_the_rate_limit_goes_to_the_next_account():
    """rateLimit 1: the 401 spent the minute's one request, so the retry with the refreshed token is
    not sent; the spare account answers."""
    h = Harness([oauth("max", "token-old", rate_limit=1), api("spare")],
                refresher=StubRefresher(["token-new"]))
    h.fake.revoke("token-old")
    out = RecordingSink()
    h.forward(messages(), out)
    assert out.status == 200 and [r.credential for r in h.fake.requests] == ["token-old", "sk-spare"]
    assert run(h.store.rate_usage("anthropic:max", h.clock.seconds(), 60.0))[0] == 1


def test_a_lone_account_refreshed_but_at_its_rate_limit_answers_the_pools_429():
    """rateLimit 1 on the only account: the 401's token was replaced, the retry is refused by the rate
    limit; the client gets the pool's 429 saying so, with the true wait (the window's 60 s), not
    Anthropic's 401 about the token no longer used."""
    h = Harness([oauth("max", "token-old", rate_limit=1)], refresher=StubRefresher(["token-new"]))
    h.fake.revoke("token-old")
    out = RecordingSink()
    h.forward(messages(), out)
    assert [r.credential for r in h.fake.requests] == ["token-old"]
    assert out.status == 429 and out.header(b"retry-after") == b"60"
    assert "1 at their rateLimit" in out.errors[0].message


def test_a_last_429_answers_with_the_pools_earliest_recovery():
    """a answers 429 (Retry-After 30; its backoff cools it 60 s) while b is at its rateLimit and usable
    again in 5 s: the client is told 5 s, the pool's earliest recovery, in the pool's 429 saying why,
    not the upstream's 30 s that is true of no account."""
    h = Harness([api("a"), api("b", rate_limit=1)])
    h.fake.script("sk-a", status=429, headers={"retry-after": "2"},
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    h.forward(messages(), RecordingSink())  # a: 429 (backoff level 1); b answers, its one request a minute
    assert [r.credential for r in h.fake.requests] == ["sk-a", "sk-b"]
    h.clock.advance(55)  # a usable again; b's request leaves its window in 5 s
    h.fake.script("sk-a", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    out = RecordingSink()
    h.forward(messages(), out)
    assert run(h.states())["config:a"].cooling_until - h.clock.seconds() > 30
    assert out.status == 429 and out.header(b"retry-after") == b"5"
    assert "(1 cooling down, 1 at their rateLimit)" in out.errors[0].message


def test_a_last_429_with_another_account_usable_is_relayed_with_retry_after_1():
    """a is overloaded (529, no cooldown: usable for the next request), then b answers 429 with
    Retry-After 30: b's answer is relayed, but its Retry-After says 1, since a is usable now."""
    h = Harness([api("a"), api("b")])
    h.fake.script("sk-a", status=529, body=error_json(529, "overloaded_error", "Overloaded"), times=1)
    h.fake.script("sk-b", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    out = RecordingSink()
    h.forward(messages(), out)
    assert out.status == 429 and out.errors == []
    assert [v for n, v in out.headers if n.lower() == b"retry-after"] == [[b"1"]]
    assert json.loads(out.body)["error"]["message"] == "slow down"
