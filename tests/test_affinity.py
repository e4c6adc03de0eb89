"""Session affinity (``clproxy.routing.affinity``): finding a request's session, and keeping a
session on one account, on a ``task.Clock`` over the memory store and over a real Redis."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from clproxy.routing.affinity import SessionAffinity, session_of
from clproxy.state.memory import MemoryStateStore
from clproxy.state.redis import RedisStateStore
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

SID = "2c4e1cf0-7a67-4d2e-9a4b-1d16d3f44752"


def run(coroutine):
    """The result of a coroutine over the memory store (whose Deferreds have all fired)."""
    results = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    assert results, "did not finish"
    assert not isinstance(results[0], Failure), results[0]
    return results[0]


def json_user_id(session=SID):
    return json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": session})


# session_of ------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    Headers({b"x-claude-code-session-id": [SID.encode()]}),
    {"X-Claude-Code-Session-Id": SID},
    {b"x-claude-code-session-id": SID.encode()},
    {"x-claude-code-session-id": [SID]},
    [(b"content-type", b"application/json"), (b"x-claude-code-session-id", SID.encode())],
])
def test_session_from_header_forms(headers):
    """The header is found in Twisted Headers, mappings (any case) and pairs."""
    assert session_of(headers, {}) == SID


def test_header_wins_over_body():
    """The header comes first; the body's session only when there is no usable header."""
    body = {"metadata": {"user_id": json_user_id("from-body")}}
    assert session_of({"x-claude-code-session-id": "from-header"}, body) == "from-header"
    assert session_of({"x-claude-code-session-id": "x" * 201}, body) == "from-body"


@pytest.mark.parametrize("body", [
    {"metadata": {"user_id": json_user_id()}},
    json.dumps({"metadata": {"user_id": json_user_id()}}).encode(),
    json.dumps({"metadata": {"user_id": json_user_id()}}),
    {"metadata": {"user_id": "user_" + "ab" * 32 + "_account__session_" + SID}},
    {"metadata": {"user_id": "user_" + "ab" * 32 + "_account_" + "0f" * 8 + "_session_" + SID}},
])
def test_session_from_body_forms(body):
    """metadata.user_id as Claude Code's JSON string, parsed or raw, and the older string form."""
    assert session_of(None, body) == SID


@pytest.mark.parametrize("headers, body", [
    (None, None),
    ({}, {}),
    ({}, b""),
    ({}, b"not json"),
    ({}, b"[1, 2]"),
    ({}, b"[" * 100000 + b"]" * 100000),
    ({}, {"metadata": "x"}),
    ({}, {"metadata": {"user_id": 12}}),
    ({}, {"metadata": {"user_id": None}}),
    ({}, {"metadata": {"user_id": "plain-user-id"}}),
    ({}, {"metadata": {"user_id": "{not json"}}),
    ({}, {"metadata": {"user_id": "[1]"}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": 7})}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": ["a"]})}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": "s" * 201})}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": "a b\r\nX-Evil: 1"})}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": ""})}}),
    ({}, {"metadata": {"user_id": json.dumps({"session_id": "caf\u00e9"})}}),
    ({}, {"metadata": {"user_id": json.dumps({"pad": "p" * 5000, "session_id": "ok"})}}),
    ({}, {"metadata": {"user_id": "user_x_account__session_" + "s" * 201}}),
    ({"x-claude-code-session-id": 42}, {}),
    ({"x-claude-code-session-id": b"\xff\xfe"}, {}),
    ({"x-claude-code-session-id": []}, {}),
    ({"x-claude-code-session-id": "s" * 201}, {}),
    ({"x-claude-code-session-id": "two words"}, {}),
    ([("x-claude-code-session-id",)], {}),
    (42, {}),
    (Headers(), {"metadata": [1]}),
])
def test_malformed_and_hostile_input_has_no_session(headers, body):
    """Anything malformed, oversized or odd gives None and never raises."""
    assert session_of(headers, body) is None


def test_session_id_at_the_length_bound():
    """200 characters is still a session; 201 is not."""
    assert session_of({"x-claude-code-session-id": "s" * 200}, None) == "s" * 200
    assert session_of({"x-claude-code-session-id": "s" * 201}, None) is None


# SessionAffinity over the memory store --------------------------------------------------------

def make(ttl=3600.0, max_sessions=10000, enabled=True):
    clock = task.Clock()
    store = MemoryStateStore()
    return SessionAffinity(store, clock, ttl=ttl, max_sessions=max_sessions,
                           enabled=enabled), clock, store


def test_affinity_across_many_requests():
    """A bound session gets its account on every request, and each request keeps it alive."""
    affinity, clock, _ = make(ttl=60.0)
    assert run(affinity.account_for("s1")) is None
    assert run(affinity.bind("s1", "a")) is False
    for _ in range(100):
        clock.advance(30.0)  # well past the TTL in total; each request refreshes the binding
        assert run(affinity.account_for("s1")) == "a"
        assert run(affinity.bind("s1", "a")) is False
    assert affinity.moves == 0
    assert run(affinity.sessions_by_account(["a", "b"])) == {"a": 1, "b": 0}


def test_binding_expires_ttl_after_last_request():
    """A session idle for ttl seconds has no binding any more; binding it again is no move."""
    affinity, clock, _ = make(ttl=60.0)
    run(affinity.bind("s1", "a"))
    clock.advance(50.0)
    assert run(affinity.account_for("s1")) == "a"
    clock.advance(59.0)
    assert run(affinity.account_for("s1")) == "a"
    clock.advance(60.0)
    assert run(affinity.account_for("s1")) is None
    assert run(affinity.sessions_by_account()) == {}
    assert run(affinity.bind("s1", "b")) is False
    assert affinity.moves == 0


def test_failover_keeps_new_binding_and_never_flaps_back():
    """Bound to the account that answered after a failover, the session stays there: asking again
    (the first account recovered) does not move it back; the move is reported once."""
    affinity, clock, _ = make()
    run(affinity.bind("s1", "a"))
    assert run(affinity.bind("s1", "b")) is True
    assert affinity.moves == 1
    for _ in range(20):
        clock.advance(10.0)
        assert run(affinity.account_for("s1")) == "b"
        assert run(affinity.bind("s1", "b")) is False
    assert affinity.moves == 1
    assert run(affinity.sessions_by_account(["a", "b"])) == {"a": 0, "b": 1}


def test_lru_cap_evicts_oldest_binding():
    """Past max_sessions the least recently used session loses its binding first."""
    affinity, clock, store = make(max_sessions=3)
    for session in ("s1", "s2", "s3"):
        run(affinity.bind(session, "a"))
        clock.advance(1.0)
    assert run(affinity.account_for("s1")) == "a"  # s1 is now the most recent
    run(affinity.bind("s4", "b"))
    assert run(affinity.account_for("s2")) is None
    assert [run(affinity.account_for(s)) for s in ("s1", "s3", "s4")] == ["a", "a", "b"]
    assert store.binding_footprint()["bindings"] == 3


def test_forget_account_unbinds_its_sessions():
    """Forgetting an account drops its sessions' bindings (they pick afresh), and only theirs."""
    affinity, _, _ = make()
    run(affinity.bind("s1", "a"))
    run(affinity.bind("s2", "b"))
    assert run(affinity.forget_account("a")) == 1
    assert run(affinity.account_for("s1")) is None
    assert run(affinity.account_for("s2")) == "b"


def test_disabled_or_sessionless_binds_nothing():
    """With affinity off, or a request without session, nothing is bound or reported."""
    affinity, _, store = make(enabled=False)
    assert run(affinity.bind("s1", "a")) is False
    assert run(affinity.account_for("s1")) is None
    on, _, store_on = make()
    assert run(on.bind(None, "a")) is False
    assert run(on.account_for(None)) is None
    assert store.binding_footprint()["bindings"] == 0
    assert store_on.binding_footprint()["bindings"] == 0


# Shared through Redis --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_binding_shared_between_instances(redis_server):  # noqa: F811
    """A binding made through one store instance is seen, refreshed and moved through another on
    the same redis-server, and counted alike by both."""
    prefix = unique_prefix()
    one = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    two = RedisStateStore(redis_server.url, reactor, prefix=prefix)
    await one.connect()
    await two.connect()
    try:
        clock = task.Clock()
        clock.advance(1000.0)
        first = SessionAffinity(one, clock, ttl=60.0)
        second = SessionAffinity(two, clock, ttl=60.0)
        assert await first.bind("s1", "a") is False
        assert await second.account_for("s1") == "a"
        assert await second.bind("s1", "b") is True
        assert await first.account_for("s1") == "b"
        assert await first.sessions_by_account(["a", "b"]) == {"a": 0, "b": 1}
        assert await second.sessions_by_account() == {"b": 1}
        clock.advance(61.0)
        assert await first.account_for("s1") is None
    finally:
        await one.close()
        await two.close()
