"""Session affinity, the quota rule and the disabling 403 through the dispatcher, in memory (issue 13).

The pieces (clproxy.routing.affinity, headroom) are tested alone; here the dispatcher uses them, over
the fake Anthropic resource on a task.Clock: a session stays on its account under round-robin, a
failover moves it for good, a binding expires, an account near its quota takes no new session, and
an account whose organization is disabled leaves the pool with its bindings.
"""

import json

import attr
import pytest
from twisted.internet import defer

from clproxy.proxy import dispatch
from clproxy.proxy.dispatch import SESSION_MOVES, Dispatcher, ProxyRequest
from clproxy.routing import policy
from clproxy.routing.affinity import SessionAffinity
from clproxy.routing.quota import QuotaBook
from clproxy.testing.anthropic import error_json, text_stream, unified_headers

from helpers import RecordingSink
from test_dispatch_memory import Harness, api, no_socket, run  # noqa: F401  (fixture)
from test_routing_limits_dispatch import start, step

TTL = 600.0


class RoutingHarness(Harness):
    """The in-memory harness with session affinity, the quota book and a disabling directory.

    ``on_disabled`` does what the account directory does: the account leaves the list at once
    (marked disabled), and the call is recorded.
    """

    def __init__(self, accounts, tmp_path, strategy="round-robin", ttl=TTL, affinity=True, quotas=True,
                 **settings):
        super().__init__(accounts, **settings)
        self.pool.strategy = strategy
        self.affinity = SessionAffinity(self.store, self.clock, ttl=ttl) if affinity else None
        self.quotas = QuotaBook(str(tmp_path / "quotas.json"), self.clock) if quotas else None
        self.disabled = []
        old = self.dispatcher
        self.dispatcher = Dispatcher(
            clock=self.clock, upstream=old.upstream, pool=self.pool, store=self.store,
            accounts=lambda: self.accounts, settings=old.settings, observability=old.obs,
            affinity=self.affinity, quotas=self.quotas, on_disabled=self.disable)

    def disable(self, account, reason):
        self.disabled.append((account.name, reason))
        self.accounts = [attr.evolve(a, enabled=False) if a.key == account.key else a
                         for a in self.accounts]

    def ask(self, session=None, user_id=None):
        """One non-streamed request of ``session`` (header) or ``user_id`` (metadata); the
        credential that answered it."""
        before = len(self.fake.requests)
        out = RecordingSink()
        self.forward(conversation(session, user_id), out)
        assert out.status == 200, out.errors
        return self.fake.requests[-1].credential if len(self.fake.requests) > before else None

    def bound(self, session):
        return run(self.affinity.account_for(session))


def conversation(session=None, user_id=None, model="claude-sonnet-4-5", stream=False) -> ProxyRequest:
    body = {"model": model, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}
    if user_id is not None:
        body["metadata"] = {"user_id": user_id}
    headers = [(b"content-type", b"application/json"), (b"anthropic-version", b"2023-06-01")]
    if session is not None:
        headers.append((b"x-claude-code-session-id", session.encode()))
    return ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"", headers=headers,
                        body=json.dumps(body).encode(), model=model, stream=stream)


def test_the_fake_sends_unified_headers():
    """The fake Anthropic sends the unified rate-limit headers it is scripted with (5h utilization
    0.95, its reset, status allowed), which the quota-routing tests rely on."""
    h = RoutingHarness([api("a")], tmp_path=None, quotas=False)
    reset = h.clock.seconds() + 3600
    h.fake.script("sk-a", headers=unified_headers(five_hour=0.95, seven_day=0.5, reset=reset))
    out = RecordingSink()
    h.forward(conversation("s"), out)
    assert out.header(b"anthropic-ratelimit-unified-5h-utilization") == b"0.95"
    assert out.header(b"anthropic-ratelimit-unified-5h-reset") == str(int(reset)).encode()
    assert out.header(b"anthropic-ratelimit-unified-status") == b"allowed"


def test_a_header_session_stays_on_one_account_under_round_robin(tmp_path):
    """Under round-robin, a session named in a header stays on one account for all 20 of its requests,
    interleaved with another session, while requests without a session still rotate."""
    h = RoutingHarness([api("a"), api("b")], tmp_path)
    served = {"one": [], "two": []}
    for i in range(20):  # irregular interleaving, so the rotation alone cannot look like affinity
        served["one"].append(h.ask("one"))
        if i % 3 == 0:
            served["two"].append(h.ask("two"))
    assert len(served["one"]) == 20 and set(served["one"]) == {"sk-a"}
    assert len(set(served["two"])) == 1
    assert h.ask() != h.ask()  # requests without a session still rotate


def test_a_metadata_user_id_session_stays_on_one_account(tmp_path):
    """A session taken from metadata.user_id, in both the JSON form and the legacy
    "user_..._session_..." form, stays on one account and is bound under its session id."""
    h = RoutingHarness([api("a"), api("b")], tmp_path)
    current = json.dumps({"device_id": "d", "account_uuid": "", "session_id": "sess-json"})
    legacy = "user_0abc_account__session_sess-legacy"
    served = {current: [], legacy: []}
    for i in range(20):
        served[current].append(h.ask(user_id=current))
        if i % 3 == 0:
            served[legacy].append(h.ask(user_id=legacy))
    assert set(served[current]) == {"sk-a"} and len(set(served[legacy])) == 1
    assert h.bound("sess-json") == "config:a"
    assert h.bound("sess-legacy") == "config:" + served[legacy][0][3:]


def test_a_429_moves_the_session_and_it_stays_moved(tmp_path):
    """A 429 moves the session from a to b (one session move counted), and it stays on b for 10 more
    requests after a's cooldown: 13 upstream requests in all, no flapping back."""
    h = RoutingHarness([api("a"), api("b")], tmp_path)
    assert h.ask("s") == "sk-a"
    h.fake.script("sk-a", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    assert h.ask("s") == "sk-b"  # the rotation says b, the binding a: a is tried, 429, b serves
    assert [r.credential for r in h.fake.requests] == ["sk-a", "sk-a", "sk-b"]
    assert h.bound("s") == "config:b"
    assert run(h.store.counters())[SESSION_MOVES] == 1
    h.clock.advance(60)  # a's cooldown is over: round-robin would hand it every other request
    assert [h.ask("s") for _ in range(10)] == ["sk-b"] * 10
    assert len(h.fake.requests) == 13  # one upstream request each: no flap back to a
    assert h.affinity.moves == 1


def test_a_request_for_a_model_its_account_excludes_does_not_move_the_session(tmp_path):
    """The session's conversation lives on a, which excludes haiku (Claude Code's background model):
    a haiku request of the session is served by b, but the session stays bound to a (no move
    counted) and its next request goes to a."""
    h = RoutingHarness([api("a", excluded_models=("claude-haiku-*",)), api("b")], tmp_path,
                       strategy="fill-first")
    served = []
    for model in ["claude-opus-4-1", "claude-haiku-4-5", "claude-opus-4-1"]:
        out = RecordingSink()
        h.forward(conversation("s", model=model), out)
        assert out.status == 200
        served.append(h.fake.requests[-1].credential)
    assert served == ["sk-a", "sk-b", "sk-a"]
    assert h.bound("s") == "config:a" and h.affinity.moves == 0
    assert run(h.store.counters()).get(SESSION_MOVES, 0) == 0


def test_an_account_at_its_max_concurrent_for_a_moment_keeps_its_session(tmp_path):
    """A stream of the session holds a's only slot; a parallel request of the session (a subagent)
    overflows to b, but the session stays bound to a, and goes back to a once it is free."""
    h = RoutingHarness([api("a", max_concurrent=1), api("b", max_concurrent=1)], tmp_path,
                       strategy="fill-first")
    assert h.ask("s") == "sk-a"
    h.fake.script("sk-a", events=text_stream(["x"] * 3), pace=1.0, times=1)
    streaming = start(h, conversation("s", stream=True), RecordingSink())
    assert h.ask("s") == "sk-b"  # a is busy: b serves without waiting
    assert h.bound("s") == "config:a" and h.affinity.moves == 0
    for _ in range(10):
        step(h, 1.0)
    assert streaming.called and h.dispatcher.gate.in_flight("config:a") == 0
    assert h.ask("s") == "sk-a"


def test_a_bound_account_at_its_rate_limit_moves_the_session(tmp_path):
    """An account at its rateLimit is not usable (unlike one merely at its maxConcurrent): the session
    fails over to b and stays there, as after a 429."""
    h = RoutingHarness([api("a", rate_limit=2), api("b")], tmp_path, strategy="fill-first")
    assert [h.ask("s"), h.ask("s")] == ["sk-a", "sk-a"]
    assert h.ask("s") == "sk-b"
    assert h.bound("s") == "config:b" and h.affinity.moves == 1


def test_a_binding_expires_after_its_ttl(tmp_path):
    """A session binding with a TTL of 100 s holds when touched at 99 s, but after 101 s idle it is gone
    and the session goes where the rotation sends it."""
    h = RoutingHarness([api("a"), api("b")], tmp_path, ttl=100)
    assert h.ask("s") == "sk-a"  # rotation: a
    h.clock.advance(99)
    assert h.ask("s") == "sk-a"  # rotation says b; the binding (touched now) says a
    h.clock.advance(101)
    assert h.ask() == "sk-a"  # rotation: a (no session)
    assert h.ask("s") == "sk-b"  # rotation: b, and the binding is gone
    assert h.bound("s") == "config:b"


def test_a_binding_is_written_only_when_it_is_made_or_moved(tmp_path):
    """A session's binding is written when it is first made and when the session moves; a request
    served by the account it is bound to only refreshes it on the way in (no second write, which
    was a Redis round trip per request), and that refresh still keeps it alive a TTL longer."""
    h = RoutingHarness([api("a"), api("b")], tmp_path, ttl=100)
    writes = []
    put = h.store.put_binding

    def counted(session, key, now, ttl):
        writes.append((session, key))
        return put(session, key, now, ttl)

    h.store.put_binding = counted
    assert [h.ask("s") for _ in range(5)] == ["sk-a"] * 5
    assert writes == [("s", "config:a")]
    for _ in range(3):  # each request refreshes the binding: 99 s apart it never lapses
        h.clock.advance(99)
        assert h.ask("s") == "sk-a"
    assert writes == [("s", "config:a")]
    h.fake.script("sk-a", status=429, headers={"retry-after": "30"},
                  body=error_json(429, "rate_limit_error", "slow down"), times=1)
    assert h.ask("s") == "sk-b"
    assert writes == [("s", "config:a"), ("s", "config:b")]
    assert h.bound("s") == "config:b"


def test_the_binding_and_the_account_states_are_asked_for_together(tmp_path):
    """The session's binding is read before the accounts' states have come back (a shared store
    answers both in one round trip); a failing state read still fails the request cleanly."""
    h = RoutingHarness([api("a"), api("b")], tmp_path)
    assert h.ask("s") == "sk-a"
    calls, gate = [], defer.Deferred()
    states, touch = h.store.get_account_states, h.store.touch_binding

    def held_states(keys):
        calls.append("states")
        return gate.addCallback(lambda _: states(keys))

    def counted_touch(*args):
        calls.append("binding")
        return touch(*args)

    h.store.get_account_states, h.store.touch_binding = held_states, counted_touch
    out = RecordingSink()
    d = defer.ensureDeferred(h.dispatcher.forward(conversation("s"), out))
    h.agent.flush()
    assert calls == ["binding", "states"] and not d.called  # both asked; the states held
    gate.callback(None)
    h.agent.flush()
    assert d.called and out.status == 200 and h.fake.requests[-1].credential == "sk-a"
    h.store.get_account_states = lambda keys: defer.fail(RuntimeError("store broke"))
    with pytest.raises(RuntimeError):
        h.forward(conversation("s"), RecordingSink())


def test_an_account_near_its_quota_takes_no_new_session_but_keeps_its_own(tmp_path):
    """An account at 95% of its 5-hour quota takes no new session nor sessionless request but keeps
    its bound session, and takes new sessions again once the window resets after 3601 s."""
    h = RoutingHarness([api("a"), api("b")], tmp_path, strategy="fill-first")
    reset = h.clock.seconds() + 3600
    h.fake.script("sk-a", headers=unified_headers(five_hour=0.95, reset=reset))
    assert h.ask("old") == "sk-a"  # a was unknown: fill-first takes it, and learns it is at 0.95
    assert h.ask("new") == "sk-b"  # fill-first would say a; a is full for new sessions
    assert h.ask() == "sk-b"  # a request without a session is new too
    assert {h.ask("old") for _ in range(5)} == {"sk-a"}  # the bound session stays
    h.clock.advance(3601)  # the 5h window reset: a has headroom again
    assert h.ask("newer") == "sk-a"


def test_drain_soonest_sends_a_new_session_to_the_unknown_account_first(tmp_path):
    """drain-soonest sends new sessions to accounts whose quota is unknown first, then to the one
    with the soonest 5-hour reset that has headroom (b in 1 h before c in 2 h and a in 4 h)."""
    h = RoutingHarness([api("a"), api("b"), api("c")], tmp_path, strategy="drain-soonest")
    now = h.clock.seconds()
    h.fake.script("sk-a", headers=unified_headers(five_hour=0.1, reset=now + 4 * 3600))
    h.fake.script("sk-b", headers=unified_headers(five_hour=0.5, reset=now + 3600))
    assert h.ask("one") == "sk-a"  # all unknown: the given order
    assert h.ask("two") == "sk-b"  # a is known now, b and c are not
    assert h.ask("three") == "sk-c"
    # all known (c unknown headers: none sent, so c stays unknown and goes first)
    assert h.ask("four") == "sk-c"
    h.fake.script("sk-c", headers=unified_headers(five_hour=0.2, reset=now + 2 * 3600))
    assert h.ask("five") == "sk-c"  # learns c's quota
    assert h.ask("six") == "sk-b"  # then the soonest 5h reset with headroom: b (1h), c (2h), a (4h)


def test_a_disabled_organization_takes_the_account_out_with_its_bindings(tmp_path):
    """A 403 "organization has been disabled" disables account a once, without a cooldown loop, drops
    its session bindings, and no later request ever reaches a again."""
    h = RoutingHarness([api("a"), api("b")], tmp_path)
    assert h.ask("s") == "sk-a"
    assert h.ask("other") == "sk-b"
    assert h.ask("t") == "sk-a"
    h.fake.script("sk-a", status=403,
                  body=error_json(403, "permission_error", "This organization has been disabled."))
    assert h.ask("s") == "sk-b"  # a answers 403 once; b serves
    assert [(name, reason.split(" (")[0]) for name, reason in h.disabled] == \
        [("a", "the organization is disabled")]
    assert "This organization has been disabled." in h.disabled[0][1]
    assert [v for v in h.verdicts() if v[0] == "a"][-1][1] == policy.DISABLE
    assert not run(h.states())["config:a"].is_cooling(h.clock.seconds())  # no cooldown loop
    assert h.bound("t") is None  # a's other session was dropped: it picks afresh
    assert h.bound("s") == "config:b"
    sent = len(h.fake.for_credential("sk-a"))
    assert {h.ask(session) for session in ("s", "t", "u", None, None)} == {"sk-b"}
    assert len(h.fake.for_credential("sk-a")) == sent  # the next requests never reach a
    assert len(h.disabled) == 1


# The session of a request, read without parsing its body (dispatch.session_of_request) ----------

SID = "6b1f3c2e-9d4a-4c8b-a1e2-7f5d3c9b8a10"
JSON_USER_ID = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": SID})
LEGACY_USER_ID = "user_" + "ab" * 32 + "_account__session_" + SID

USER_ID_BODIES = [
    b'{"metadata":{"user_id":' + json.dumps(JSON_USER_ID).encode() + b'}}',  # escaped quotes
    b'{"metadata": {"user_id" : "' + LEGACY_USER_ID.encode() + b'"}}',
    b'{"metadata":{"user_id":"' + b"a" * 400 + b'"}}',   # 400 bytes: the fast window's edge
    b'{"metadata":{"user_id":"' + b"a" * 401 + b'"}}',   # 401 characters: no session
    b'{"metadata":{"user_id":"' + b'\\"' * 300 + b'"}}',  # 600 bytes but 300 characters
    b'{"metadata":{"user_id":"' + b'\\"' * 401 + b'"}}',  # 401 escapes: no session
    b'{"metadata":{"user_id":"a\\\\"}}',                  # an escaped backslash before the end
    b'{"metadata":{"user_id":"a\\\nb"}}',                 # a backslash before a raw line end
    b'{"metadata":{"user_id":7},"x":{"user_id":"' + LEGACY_USER_ID.encode() + b'"}}',  # the next one
    b'{"metadata":{"user_id":"' + b"a" * 500 + b'","user_id":"' + LEGACY_USER_ID.encode() + b'"}}',
    b'{"metadata":{"user_id":"unterminated',
    b'{"metadata":{"user_id":"' + b"\\" * 5000,          # hostile: backslashes to the end
    b'{"metadata":{}}',
    b'{"metadata":{"user_id":""}}',
]


@pytest.mark.parametrize("body", USER_ID_BODIES)
def test_the_user_id_is_found_as_the_bounded_pattern_finds_it(body):
    """The fast search for ``metadata.user_id`` gives exactly what the bounded pattern it replaces
    gives (at most 400 characters or escapes; the next member when one is not a string)."""
    at = body.rfind(b'"metadata"')
    expected = dispatch._USER_ID.search(body, at)
    assert dispatch._user_id_literal(body, at) == (expected.group(1) if expected else None)


@pytest.mark.parametrize("user_id, session", [
    (JSON_USER_ID, SID), (LEGACY_USER_ID, SID), ("plain", None), ("a" * 401, None)])
def test_a_request_without_the_header_has_its_metadata_session(user_id, session):
    """Both forms of ``metadata.user_id`` Claude Code sends give the session; others none."""
    assert dispatch.session_of_request(conversation(user_id=user_id)) == session


def test_the_session_header_decides_when_present():
    """The header's session wins over the body's; a header that is not a valid session id gives
    none (the body is not read then), as session_of gives for the header alone."""
    other = "0f" * 16
    assert dispatch.session_of_request(conversation(session=other, user_id=LEGACY_USER_ID)) == other
    assert dispatch.session_of_request(conversation(session="two words", user_id=LEGACY_USER_ID)) is None
    assert dispatch.session_of_request(conversation(session="s" * 201)) is None
    request = attr.evolve(conversation(), headers=[(b"X-Claude-Code-Session-Id", b"\xff\xfe")])
    assert dispatch.session_of_request(request) is None
