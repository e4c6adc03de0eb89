"""The dashboard's parts alone, on a ``task.Clock``: the activity ring, the login throttle and
sessions, the access rule, the state document and the live feed's fan-out."""

import json

import attr
import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from clproxy.dashboard.access import COOKIE, DashboardAccess, LoginSessions, LoginThrottle
from clproxy.dashboard.feed import DashboardFeed, dashboard_state
from clproxy.routing.headroom import percent
from clproxy.observe.activity import LATENCY_BOUNDS, Activity, quantile_ms
from clproxy.state.memory import MAX_LOGINS, MemoryStateStore
from clproxy.team.keys import KeyRing, KeyRecord, hash_key
from helpers import ProducerRequest


def finished(activity, at, status=200, duration=10.0, **extra):
    row = {"at": at, "status": status, "durationMs": duration, "id": f"r{activity.seq + 1}"}
    row.update(extra)
    activity.finished(row)
    return row


# --- the activity ring ------------------------------------------------------------------------

def test_traffic_counts_per_minute_with_errors_429s_and_quantiles():
    """One minute's bucket counts requests, errors (status >= 400 or truncated) and 429s met
    upstream, and reads p50/p95 from its histogram; quiet minutes are zeros."""
    clock = task.Clock()
    clock.advance(1_000_020)  # 20 s into a minute
    activity = Activity(clock)
    for duration in (10.0, 10.0, 10.0, 400.0):
        finished(activity, clock.seconds(), duration=duration)
    finished(activity, clock.seconds(), status=529)
    finished(activity, clock.seconds(), status=200, truncated=True)
    activity.rate_limited(clock.seconds())
    activity.rate_limited(clock.seconds())
    series = activity.traffic()
    assert len(series) == 60
    now = series[-1]
    assert now["t"] == 1_000_020 - 1_000_020 % 60
    assert (now["requests"], now["errors"], now["rateLimited"]) == (6, 2, 2)
    assert 10.0 <= now["p50Ms"] <= 12.5
    assert now["p95Ms"] >= 400.0
    assert all(m["requests"] == 0 and m["p50Ms"] is None for m in series[:-1])


def test_the_ring_keeps_one_hour_and_forgets_older_minutes():
    """The ring holds 60 minutes whatever the traffic, and the series always ends with the current
    minute."""
    clock = task.Clock()
    activity = Activity(clock)
    for minute in range(130):
        finished(activity, minute * 60.0 + 1)
    assert len(activity._ring) == 60
    clock.advance(129 * 60 + 30)
    series = activity.traffic()
    assert [m["requests"] for m in series] == [1] * 60
    assert series[0]["t"] == 70 * 60
    clock.advance(30 * 60)  # half an hour of silence: the quiet minutes read as zeros
    assert sum(m["requests"] for m in activity.traffic()) == 30


def test_recent_requests_are_bounded_newest_first_and_read_after_a_sequence():
    """The last 200 requests are kept, newest first; a feed reads only those after the sequence it
    sent."""
    clock = task.Clock()
    activity = Activity(clock, keep=200)
    for _ in range(250):
        finished(activity, 1.0)
    rows = activity.recent()
    assert len(rows) == 200 and rows[0]["seq"] == 250 and rows[-1]["seq"] == 51
    assert [r["seq"] for r in activity.recent(after=247)] == [250, 249, 248]
    assert activity.recent(after=250) == []


def test_quantiles_of_the_histogram():
    """Quantiles of the latency histogram: None when empty, the last bound (never infinity) for the
    overflow bucket."""
    histogram = [0] * (len(LATENCY_BOUNDS) + 1)
    assert quantile_ms(histogram, 0.5) is None
    histogram[0] = 1
    histogram[-1] = 1  # beyond the last bound: read as that bound, never infinity
    assert quantile_ms(histogram, 0.5) == LATENCY_BOUNDS[0]
    assert quantile_ms(histogram, 0.95) == LATENCY_BOUNDS[-1]


# --- throttle, sessions, access ---------------------------------------------------------------

def test_login_throttle_admits_five_per_peer_then_gives_a_true_wait():
    """Five failed attempts a minute per address; the sixth attempt is told exactly how long to
    wait, and is admitted then. Attempts that did not fail spend nothing."""
    clock = task.Clock()
    throttle = LoginThrottle(clock, per_peer=5, overall=30, window=60.0)
    for _ in range(10):
        assert throttle.admit("10.0.0.1") is None  # asking (a success) counts nothing
    for i in range(5):
        assert throttle.admit("10.0.0.1") is None
        assert throttle.admit_failure("10.0.0.1") is None
        clock.advance(1)
    assert throttle.admit("10.0.0.1") == pytest.approx(55.0)
    assert throttle.admit("10.0.0.2") is None  # another peer is not held up by the first
    clock.advance(55)
    assert throttle.admit("10.0.0.1") is None  # exactly when it said


def test_login_throttle_has_an_overall_cap_on_failures_and_remembers_a_bounded_number_of_peers():
    """Failures from many addresses together meet the overall cap; the addresses remembered are
    bounded."""
    clock = task.Clock()
    throttle = LoginThrottle(clock, per_peer=5, overall=3, window=60.0, max_peers=2)
    assert [throttle.admit_failure(f"p{i}") for i in range(3)] == [None, None, None]
    assert throttle.admit_failure() == pytest.approx(60.0)
    assert throttle.admit("p9") is None  # the overall cap never holds up an attempt by itself
    assert len(throttle._peers) == 2


def now_result(coroutine):
    """The result of a coroutine over the memory store (whose Deferreds have all fired)."""
    results = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "the coroutine waited on something that never fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_sessions_expire_and_are_kept_as_digests_in_the_store():
    """A session reads back until it expires; the store holds the token's digest, never the token;
    closing ends it."""
    clock = task.Clock()
    store = MemoryStateStore()
    sessions = LoginSessions(store, clock, ttl=100.0)
    token = now_result(sessions.open("h1"))
    assert now_result(sessions.key_hash(token)) == "h1"
    assert token not in repr(store._logins)  # only its digest is kept
    clock.advance(100)
    assert now_result(sessions.key_hash(token)) is None and not store._logins
    token = now_result(sessions.open("h2"))
    now_result(sessions.close(token))
    assert now_result(sessions.key_hash(token)) is None
    assert now_result(sessions.key_hash("x" * 500)) is None and now_result(sessions.key_hash("")) is None


def test_the_memory_store_keeps_a_bounded_number_of_sessions():
    """The memory store keeps at most MAX_LOGINS sessions, dropping the oldest."""
    store = MemoryStateStore()
    for i in range(MAX_LOGINS + 5):
        store.put_login(f"d{i}", "h", 100.0, 0.0)
    assert len(store._logins) == MAX_LOGINS
    assert now_result(store.get_login("d0", 1.0)) is None
    assert now_result(store.get_login(f"d{MAX_LOGINS + 4}", 1.0)) == "h"


def record(name, key, admin):
    return KeyRecord(name=name, hash=hash_key(key), prefix=key[:8], admin=admin)


class Request(DummyRequest):
    """A request with cookies, as twisted.web's real one has."""

    cookies: dict

    def getCookie(self, name):
        return getattr(self, "cookies", {}).get(name)


def with_headers(headers=None, cookie=None):
    request = Request([b""])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    if cookie is not None:
        request.cookies = {COOKIE: cookie.encode()}
    return request


def access(ring, host="127.0.0.1", allow=lambda: False):
    return DashboardAccess(ring, LoginSessions(MemoryStateStore(), task.Clock()), host, allow)


def test_access_is_open_on_loopback_without_keys_only():
    """Without any client key the dashboard is open where the relay is (loopback, or
    allowUnauthenticated)."""
    assert now_result(access(KeyRing(), "127.0.0.1").allowed(with_headers()))
    assert not now_result(access(KeyRing(), "0.0.0.0").allowed(with_headers()))
    assert now_result(access(KeyRing(), "0.0.0.0", lambda: True).allowed(with_headers()))


def test_access_needs_an_admin_key_and_a_revoked_key_ends_its_sessions():
    """With keys only an admin key (header or session) is let in; revoking that key ends its
    sessions."""
    admin_key, plain_key = "clp_" + "a" * 40, "clp_" + "b" * 40
    ring = KeyRing([record("boss", admin_key, True), record("alice", plain_key, False)])
    gate = access(ring)
    assert not now_result(gate.allowed(with_headers()))
    assert not now_result(gate.allowed(with_headers({b"authorization": b"Bearer " + plain_key.encode()})))
    assert now_result(gate.allowed(with_headers({b"authorization": b"Bearer " + admin_key.encode()})))

    assert now_result(gate.login(plain_key, "p"))[:1] == (403,)
    assert now_result(gate.login("clp_wrong", "p"))[:1] == (401,)
    status, message, token, _ = now_result(gate.login(admin_key, "p"))
    assert status == 200 and token and admin_key not in message
    assert now_result(gate.allowed(with_headers(cookie=token)))
    ring.replace([record("alice", plain_key, False)])  # the admin key is revoked
    assert not now_result(gate.allowed(with_headers(cookie=token)))


def test_login_attempts_are_throttled_with_the_wait():
    """Failed logins count: after five from one address even the right key gets a 429 and the wait."""
    gate = access(KeyRing([record("boss", "clp_" + "a" * 40, True)]))
    for _ in range(5):
        assert now_result(gate.login("clp_wrong", "1.2.3.4"))[0] == 401
    status, _, token, wait = now_result(gate.login("clp_" + "a" * 40, "1.2.3.4"))
    assert (status, token) == (429, None) and wait == pytest.approx(60.0)


def test_wrong_keys_from_many_addresses_never_lock_the_admin_out():
    """Thirty wrong keys a minute from six addresses fill the overall cap: another wrong key is
    429, but the right admin key from a fresh address logs in (its own address's limit still holds)."""
    admin_key = "clp_" + "a" * 40
    gate = access(KeyRing([record("boss", admin_key, True), record("alice", "clp_" + "b" * 40, False)]))
    for i in range(30):
        assert now_result(gate.login("clp_wrong", f"10.0.0.{i % 6}"))[0] == 401
    assert now_result(gate.login("clp_wrong", "192.168.1.9"))[::3] == (429, pytest.approx(60.0))
    assert now_result(gate.login("clp_" + "b" * 40, "192.168.1.8"))[0] == 429  # a plain key fails too
    status, _, token, _ = now_result(gate.login(admin_key, "192.168.1.5"))
    assert status == 200 and token
    assert now_result(gate.login(admin_key, "10.0.0.0"))[0] == 429  # that address used its five


# --- the state document -----------------------------------------------------------------------

STATUS = {
    "version": "0.1.0", "uptime": 12.5, "strategy": "fill-first",
    "counters": {"upstream_attempts": 7, "completed_requests": 5, "truncated_streams": 1},
    "sessionMoves": 2, "queueLength": 3, "pid": 4242, "observability": {"logs": {"dir": "/secret/path"}},
    "accounts": [
        {"key": "anthropic:work", "name": "work", "kind": "oauth", "state": "cooling", "cooling_until": 130.0,
         "backoff_level": 2, "attempts": 9, "successes": 6, "errors": 3, "rate_limits": 2,
         "last_error": "429 rate-limited", "last_error_at": 100.0, "inFlight": 1, "sessions": 4,
         "cacheHitRatio": 0.5,
         "quota": {"windows": {"5h": {"utilization": 0.625, "reset": 5000, "status": "allowed"},
                               "7d": {"utilization": 0.18, "reset": 90, "expired": True}}}},
        {"key": "anthropic:off", "name": "off", "kind": "api-key", "state": "disabled",
         "disabledReason": "organization disabled", "quota": {"windows": {}}},
    ],
    "keys": [{"name": "alice", "prefix": "clp_abcd", "admin": False, "limits": {"usd_per_day": 5.0},
              "today": {"tokens": 10, "usd": 0.5}, "month": {"tokens": 30, "usd": 1.5}}],
}


def test_the_state_takes_what_the_page_shows_and_nothing_else():
    """The state document picks the page's fields from /status: no key prefix, path or account key
    reaches it; an expired window is unknown."""
    state = dashboard_state(STATUS, now=120.0, traffic=[], fallback_chain=[{"provider": "openai", "model": "gpt"}])
    work, off = state["accounts"]
    assert work["state"] == "cooling" and work["coolingUntil"] == 130.0 and work["backoffLevel"] == 2
    assert work["quota"] == {"5h": {"percent": 63, "reset": 5000, "status": "allowed"}}  # 7d is over
    assert (work["attempts"], work["errors"], work["rateLimits"], work["inFlight"], work["sessions"]) == (9, 3, 2, 1, 4)
    assert off["state"] == "disabled" and off["disabledReason"] == "organization disabled" and off["quota"] == {}
    assert state["proxy"]["fallbackChain"] == [{"provider": "openai", "model": "gpt"}]
    assert (state["proxy"]["attempts"], state["proxy"]["completed"], state["proxy"]["truncated"]) == (7, 5, 1)
    assert state["keys"] == [{"name": "alice", "admin": False, "limits": {"usd_per_day": 5.0},
                              "today": {"tokens": 10, "usd": 0.5}, "month": {"tokens": 30, "usd": 1.5}}]
    text = json.dumps(state)
    assert "clp_abcd" not in text and "/secret/path" not in text and "anthropic:work" not in text


@pytest.mark.parametrize("value, expected", [(0.0, 0), (0.004, 0), (0.625, 63), (0.995, 100), (1.7, 170),
                                             (-1, 0), (float("nan"), None), (None, None), ("0.5", None),
                                             (True, None)])
def test_percent_is_an_integer_rounded_half_up_or_unknown(value, expected):
    """Utilization becomes an integer percent (half up, never below 0, above 100 when overdrawn), or
    None when it is not a finite number; the dashboard's bars stop at 100."""
    assert percent(value) == expected
    row = {"quota": {"windows": {"5h": {"utilization": value}}}}
    bar = dashboard_state({"accounts": [row]}, now=0, traffic=[], fallback_chain=[])["accounts"][0]["quota"]
    assert bar == ({} if expected is None else {"5h": {"percent": min(expected, 100), "reset": None, "status": None}})


# --- the feed ---------------------------------------------------------------------------------

class Page(ProducerRequest):
    """An open page's event stream (a request that keeps what is written and its producer)."""

    def frames(self):
        text = b"".join(self.written).decode()
        return [json.loads(block.split("data: ", 1)[1]) for block in text.split("\n\n") if "data: " in block]


def make_feed():
    clock = task.Clock()
    activity = Activity(clock)
    built = []

    def state():
        built.append(clock.seconds())
        return defer.succeed({"now": clock.seconds()})

    return clock, activity, DashboardFeed(state, activity, clock), built


def test_no_open_page_costs_nothing():
    """With no page open no document is built and no timer runs, however many requests pass."""
    clock, activity, feed, built = make_feed()
    for _ in range(100):
        finished(activity, clock.seconds())
        clock.advance(1)
    assert built == [] and clock.getDelayedCalls() == []


def test_twenty_pages_share_one_document_per_tick_and_get_only_new_requests():
    """Twenty pages: one document per tick, the same bytes to all, each carrying only the requests
    new since the last tick."""
    clock, activity, feed, built = make_feed()
    finished(activity, 0.0)
    pages = [Page() for _ in range(20)]
    for page in pages:
        feed.subscribe(page)
    for page in pages:
        assert page.frames()[0]["full"] and len(page.frames()[0]["requests"]) == 1
    built.clear()
    finished(activity, 0.5)
    clock.advance(1)
    assert len(built) == 1  # one document for twenty pages
    for page in pages:
        latest = page.frames()[-1]
        assert not latest["full"] and [r["id"] for r in latest["requests"]] == ["r2"]
    clock.advance(1)
    assert all(page.frames()[-1]["requests"] == [] for page in pages)
    assert len({bytes(page.written[-1]) for page in pages}) == 1  # the same bytes for all


def test_a_page_that_cannot_keep_up_is_skipped_then_sent_everything():
    """A page whose connection pushes back gets nothing queued, then a full frame when it can take
    more."""
    clock, activity, feed, built = make_feed()
    slow, quick = Page(), Page()
    feed.subscribe(slow)
    feed.subscribe(quick)
    slow.producer.pauseProducing()
    before = len(slow.written)
    finished(activity, 0.2)
    clock.advance(1)
    finished(activity, 1.2)
    clock.advance(1)
    assert len(slow.written) == before  # nothing queued for a page whose connection is full
    slow.producer.resumeProducing()
    clock.advance(1)
    latest = slow.frames()[-1]
    assert latest["full"] and [r["id"] for r in latest["requests"]] == ["r2", "r1"]
    assert [r["id"] for r in quick.frames()[-2]["requests"]] == ["r2"]


def test_the_tick_stops_with_the_last_page_and_stopping_closes_the_streams():
    """The tick stops with the last page; stopping the feed finishes every open stream and cancels
    its timer."""
    clock, activity, feed, built = make_feed()
    first, second = Page(), Page()
    feed.subscribe(first)
    feed.subscribe(second)
    first.processingFailed(Exception("gone"))  # a page closed by its reader
    clock.advance(1)
    assert feed.subscribers and clock.getDelayedCalls()
    feed.stopService()
    assert second.finished and not feed.subscribers and clock.getDelayedCalls() == []
    built.clear()
    clock.advance(5)
    assert built == []


def test_a_feed_ends_on_the_next_tick_once_what_let_it_in_is_gone():
    """Each open feed keeps what admitted it and is checked against the ring on every tick: revoking
    its admin key (or taking the admin right) ends that stream alone; an open dashboard's stream
    ends once a key exists."""
    admin_key, other_key, plain_key = "clp_" + "a" * 40, "clp_" + "c" * 40, "clp_" + "b" * 40
    boss, ops, alice = (record("boss", admin_key, True), record("ops", other_key, True),
                        record("alice", plain_key, False))
    ring = KeyRing([boss, ops, alice])
    gate = access(ring)
    clock, activity, feed, built = make_feed()
    pages = {}
    for name, key in (("boss", admin_key), ("ops", other_key)):
        admission = now_result(gate.admission(with_headers({b"x-api-key": key.encode()})))
        assert admission == hash_key(key)
        pages[name] = Page()
        feed.subscribe(pages[name], lambda admission=admission: gate.still_admits(admission))
    clock.advance(1)
    ring.replace([ops, alice])  # boss is revoked
    clock.advance(1)
    assert pages["boss"].finished and not pages["ops"].finished
    sent = len(pages["boss"].written)
    for _ in range(3):
        clock.advance(1)
    assert len(pages["boss"].written) == sent and len(pages["ops"].frames()) == 6
    ring.replace([attr.evolve(ops, admin=False), alice])  # ops is no admin any more
    clock.advance(1)
    assert pages["ops"].finished and not feed.subscribers and clock.getDelayedCalls() == []

    open_gate, open_ring = access(KeyRing()), KeyRing()
    open_gate.ring = open_ring
    admission = now_result(open_gate.admission(with_headers()))
    page = Page()
    feed.subscribe(page, lambda: open_gate.still_admits(admission))
    clock.advance(1)
    assert not page.finished
    open_ring.replace([alice])  # the first key: the dashboard is no longer open
    clock.advance(1)
    assert page.finished


def test_a_broken_install_answers_503_and_never_stops_the_daemon():
    """Without the page's files /dashboard and its assets say what is missing (503); the data
    routes stay."""
    from clproxy.dashboard.resources import DashboardRoot
    from clproxy.http.site import ErrorResource

    def missing(name):
        raise FileNotFoundError(2, "No such file or directory", name)

    clock, activity, feed, _ = make_feed()
    root = DashboardRoot(access(KeyRing()), feed, read=missing)
    assert isinstance(root.page, ErrorResource) and root.page.error.status == 503
    assert root.children[b"app.js"] is root.page and b"state" in root.children
