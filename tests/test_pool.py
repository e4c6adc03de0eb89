"""Account selection, rate limits and cooldown bookkeeping of AccountPool over the memory store."""

import collections
import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from clproxy.accounts.model import API_KEY, OAUTH, Account
from clproxy.routing import policy
from clproxy.routing.policy import (NEXT, RETURN, SUCCESS, Verdict, classify, classify_network_error)
from clproxy.routing.pool import AccountPool
from clproxy.state.memory import MemoryStateStore

SECRET = "sk-ant-api03-test-secret-never-shown"
U = "anthropic-ratelimit-unified-"


def run(awaitable):
    """The result of a pool coroutine or store Deferred that must finish at once (the memory
    store never waits)."""
    results = []
    defer.ensureDeferred(awaitable).addBoth(results.append)
    assert results, "coroutine is still waiting"
    assert not isinstance(results[0], Failure), results[0]
    return results[0]


def account(name, **kwargs):
    """An account keyed ``config:<name>``."""
    kwargs.setdefault("secret", SECRET + "-" + name)
    return Account(key="config:" + name, name=name, **kwargs)


def make_pool(strategy="fill-first"):
    """A pool over a fresh memory store with a Clock at 1000 s."""
    clock = Clock()
    clock.advance(1000)
    store = MemoryStateStore()
    return AccountPool(store, strategy=strategy, clock=clock), store, clock


def names(accounts):
    """The names of accounts, in order."""
    return [a.name for a in accounts]


def answer(pool, acct, status, headers=None, body=b""):
    """Classify an upstream answer for ``acct`` with its current level and record it."""
    level = run(pool.backoff_level(acct))
    result = classify(status, headers or {}, body, now=pool._clock.seconds(),
                      backoff_level=level, is_oauth=acct.is_oauth)
    run(pool.record(acct, result))
    return result


def serve(pool, accounts, respond):
    """One request as dispatch runs it: try candidates in order until one answers for good.

    ``respond(account)`` gives (status, headers) or None for a network error. Returns the names
    of the accounts tried.
    """
    tried = []
    for acct in run(pool.candidates(accounts)):
        if not run(pool.admit(acct)):
            continue
        tried.append(acct.name)
        response = respond(acct)
        if response is None:
            level = run(pool.backoff_level(acct))
            result = classify_network_error("connection refused", backoff_level=level)
            run(pool.record(acct, result))
        else:
            result = answer(pool, acct, *response)
        if result.action in (SUCCESS, RETURN):
            break
    return tried


# -- fill-first --------------------------------------------------------------------------------

def test_fill_first_always_first():
    """fill-first offers every usable account in configured order, the first one every time."""
    pool, _, _ = make_pool()
    accounts = [account("a"), account("b"), account("c")]
    for _ in range(5):
        assert names(run(pool.candidates(accounts))) == ["a", "b", "c"]


def test_fill_first_is_the_default():
    """A pool made without a strategy is fill-first."""
    assert AccountPool(MemoryStateStore(), clock=Clock()).strategy == "fill-first"


def test_drain_soonest_is_accepted_and_keeps_configured_order():
    """drain-soonest is a pool strategy (also by hot reload) whose base order is fill-first's; the
    quota reordering is the headroom module's."""
    pool, _, _ = make_pool("drain-soonest")
    accounts = [account("a"), account("b"), account("c")]
    for _ in range(3):
        assert names(run(pool.candidates(accounts))) == ["a", "b", "c"]
    pool.strategy = "round-robin"
    pool.strategy = "drain-soonest"
    assert pool.strategy == "drain-soonest"


def test_fill_first_switches_on_429_and_comes_back():
    """After a 429 the first account cools and the second serves, until the cooldown ends."""
    pool, _, clock = make_pool()
    accounts = [account("a"), account("b")]
    a = accounts[0]
    tried = serve(pool, accounts, lambda acct: (429, {}) if acct is a else (200, {}))
    assert tried == ["a", "b"]
    assert names(run(pool.candidates(accounts))) == ["b"]
    clock.advance(0.99)
    assert names(run(pool.candidates(accounts))) == ["b"]
    clock.advance(0.02)
    assert names(run(pool.candidates(accounts))) == ["a", "b"]


def test_fill_first_backoff_doubles_on_repeated_429():
    """Each consecutive 429 of the first account doubles its cooldown (1, 2, 4 s)."""
    pool, _, clock = make_pool()
    accounts = [account("a"), account("b")]
    for expected in (1.0, 2.0, 4.0):
        result = answer(pool, accounts[0], 429)
        assert result.cooldown == expected
        assert run(pool.earliest_recovery(accounts)) == clock.seconds() + expected
        clock.advance(expected)
        assert names(run(pool.candidates(accounts)))[0] == "a"
    answer(pool, accounts[0], 200)
    assert run(pool.backoff_level(accounts[0])) == 0
    assert answer(pool, accounts[0], 429).cooldown == 1.0


def test_window_rejected_cools_until_reset():
    """A rejected subscription window keeps the account out until the reset time."""
    pool, _, clock = make_pool()
    accounts = [account("a", kind=OAUTH), account("b")]
    headers = {U + "status": "rejected", U + "reset": str(clock.seconds() + 3600)}
    answer(pool, accounts[0], 429, headers)
    clock.advance(3599)
    assert names(run(pool.candidates(accounts))) == ["b"]
    clock.advance(1)
    assert names(run(pool.candidates(accounts))) == ["a", "b"]


def test_transient_errors_rotate_without_cooldown():
    """A 503 or a network error moves to the next account but leaves the first usable."""
    pool, _, _ = make_pool()
    accounts = [account("a"), account("b"), account("c")]
    replies = {"a": (503, {}), "b": None, "c": (200, {})}
    assert serve(pool, accounts, lambda acct: replies[acct.name]) == ["a", "b", "c"]
    assert names(run(pool.candidates(accounts))) == ["a", "b", "c"]


def test_client_error_stops_the_request():
    """A client error ends the request at the first account, which stays usable."""
    pool, _, _ = make_pool()
    accounts = [account("a"), account("b")]
    body = json.dumps({"type": "error", "error": {"type": "invalid_request_error"}}).encode()
    assert serve(pool, accounts, lambda acct: (400, {}, body)) == ["a"]
    assert names(run(pool.candidates(accounts))) == ["a", "b"]


def test_each_account_tried_once():
    """When every account fails, each is tried exactly once, even if listed twice."""
    pool, _, _ = make_pool()
    a, b = account("a"), account("b")
    assert names(run(pool.candidates([a, b, a]))) == ["a", "b"]
    assert serve(pool, [a, b, a], lambda acct: (529, {})) == ["a", "b"]


@pytest.mark.parametrize("strategy", ["fill-first", "round-robin"])
def test_disabled_accounts_never_picked(strategy):
    """Disabled accounts are never candidates, whatever the strategy."""
    pool, _, _ = make_pool(strategy)
    accounts = [account("a", enabled=False), account("b"), account("c", enabled=False)]
    for _ in range(20):
        assert names(run(pool.candidates(accounts))) == ["b"]


def test_all_cooling_no_candidates():
    """When every account cools, there is no candidate and earliest_recovery says when."""
    pool, _, clock = make_pool()
    accounts = [account("a"), account("b")]
    answer(pool, accounts[0], 401)
    answer(pool, accounts[1], 429, {"retry-after": "30"})
    assert run(pool.candidates(accounts)) == []
    assert run(pool.earliest_recovery(accounts)) == clock.seconds() + 30


# -- round-robin -------------------------------------------------------------------------------

def test_round_robin_rotates():
    """Plain round-robin starts each request at the next account, the rest following in order."""
    pool, _, _ = make_pool("round-robin")
    accounts = [account("a"), account("b"), account("c")]
    orders = [names(run(pool.candidates(accounts))) for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_smooth_weighted_sequence():
    """Weights 5, 1, 1 give nginx's smooth sequence a a b a c a a."""
    pool, _, _ = make_pool("round-robin")
    accounts = [account("a", weight=5), account("b"), account("c")]
    firsts = [run(pool.candidates(accounts))[0].name for _ in range(7)]
    assert firsts == ["a", "a", "b", "a", "c", "a", "a"]


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (1, 1, 1), (1, 4, 2)])
def test_weighted_distribution(weights):
    """Over N picks each account is picked in exact proportion to its weight."""
    pool, _, _ = make_pool("round-robin")
    accounts = [account(n, weight=w) for n, w in zip("abc", weights)]
    rounds = 50
    picks = collections.Counter(run(pool.candidates(accounts))[0].name
                                for _ in range(rounds * sum(weights)))
    assert picks == {n: rounds * w for n, w in zip("abc", weights)}


def test_round_robin_skips_cooling():
    """A cooling account drops out of the rotation and rejoins when its cooldown ends."""
    pool, _, clock = make_pool("round-robin")
    accounts = [account("a"), account("b"), account("c")]
    answer(pool, accounts[1], 403)
    firsts = [run(pool.candidates(accounts))[0].name for _ in range(6)]
    assert "b" not in firsts and collections.Counter(firsts) == {"a": 3, "c": 3}
    clock.advance(300)
    firsts = [run(pool.candidates(accounts))[0].name for _ in range(6)]
    assert collections.Counter(firsts) == {"a": 2, "b": 2, "c": 2}


def test_strategy_hot_reload():
    """The strategy can be changed at runtime; an unknown one is refused."""
    pool, _, _ = make_pool()
    accounts = [account("a"), account("b")]
    assert [run(pool.candidates(accounts))[0].name for _ in range(2)] == ["a", "a"]
    pool.strategy = "round-robin"
    assert sorted(run(pool.candidates(accounts))[0].name for _ in range(2)) == ["a", "b"]
    with pytest.raises(ValueError):
        pool.strategy = "random"
    assert pool.strategy == "round-robin"


# -- rateLimit ---------------------------------------------------------------------------------

def test_rate_limit_skips_then_refills():
    """An account at its rateLimit is skipped before it is tried and returns after the window."""
    pool, _, clock = make_pool()
    accounts = [account("a", rate_limit=2), account("b")]
    a = accounts[0]
    assert serve(pool, accounts, lambda acct: (200, {})) == ["a"]
    clock.advance(10)
    assert serve(pool, accounts, lambda acct: (200, {})) == ["a"]
    clock.advance(10)
    assert names(run(pool.candidates(accounts))) == ["b"]
    assert not run(pool.admit(a))
    assert serve(pool, accounts, lambda acct: (200, {})) == ["b"]
    assert run(pool.earliest_recovery(accounts)) == 1060.0
    clock.advance(40)
    assert names(run(pool.candidates(accounts))) == ["a", "b"]
    assert serve(pool, accounts, lambda acct: (200, {})) == ["a"]


def test_candidates_take_no_rate_slot():
    """Listing candidates does not use up the rate limit; admit does."""
    pool, _, _ = make_pool()
    a = account("a", rate_limit=1)
    for _ in range(10):
        assert names(run(pool.candidates([a]))) == ["a"]
    assert run(pool.admit(a))
    assert run(pool.candidates([a])) == []


def test_admit_without_rate_limit():
    """Accounts without a rateLimit are always admitted and leave no rate window behind."""
    pool, store, _ = make_pool()
    a = account("a")
    assert all(run(pool.admit(a)) for _ in range(1000))
    assert store.footprint()["rate_windows"] == 0


def test_admitted_attempt_raced_past_limit():
    """Two requests listing the same last slot: the second admit is refused."""
    pool, _, _ = make_pool()
    accounts = [account("a", rate_limit=1), account("b")]
    first = run(pool.candidates(accounts))
    second = run(pool.candidates(accounts))
    assert run(pool.admit(first[0])) and not run(pool.admit(second[0]))


# -- record ------------------------------------------------------------------------------------

def test_record_counts_each_attempt_once():
    """record counts one attempt per verdict, per account and in upstream_attempts."""
    pool, store, clock = make_pool()
    a, b = account("a"), account("b")
    answer(pool, a, 200)
    answer(pool, a, 429)
    clock.advance(5)
    answer(pool, a, 503)
    run(pool.record(b, classify_network_error("timeout", backoff_level=0)))
    stats = run(store.account_stats([a.key, b.key]))
    assert {k: stats[a.key][k] for k in ("attempts", "successes", "errors", "rate_limits")} == \
        {"attempts": 3, "successes": 1, "errors": 1, "rate_limits": 1}
    assert stats[a.key]["last_attempt_at"] == 1005.0
    assert stats[a.key]["last_error"] == "503 transient"
    assert (stats[b.key]["attempts"], stats[b.key]["errors"]) == (1, 1)
    assert stats[b.key]["last_error"] == "network-error network: timeout"
    assert run(store.counters()) == {"upstream_attempts": 4}


def test_record_success_ends_cooldown():
    """A success recorded for a cooling account ends its cooldown and resets its level."""
    pool, store, _ = make_pool()
    a = account("a")
    answer(pool, a, 429)
    answer(pool, a, 429)
    assert run(pool.backoff_level(a)) == 2
    answer(pool, a, 200)
    assert run(pool.backoff_level(a)) == 0
    assert run(pool.cooling([a])) == []


def test_oauth_401_refresh_verdict_does_not_cool():
    """An OAuth 401 ("refresh") recorded as is does not cool the account: the other requests in
    flight must be able to retry after the refresh (issue 11 item 1); dispatch cools it for 5 min
    only when no refresh can help (policy.unrefreshable)."""
    pool, _, clock = make_pool()
    a = account("a", kind=OAUTH)
    result = answer(pool, a, 401)
    assert result.action == "refresh"
    assert run(pool.cooling([a])) == []
    run(pool.cool(a, policy.unrefreshable(result).cooldown))
    assert run(pool.cooling([a])) == [(a, clock.seconds() + 300)]


def test_api_key_401_cools():
    """An API-key 401 cools the account 5 min."""
    pool, _, clock = make_pool()
    a = account("a", kind=API_KEY)
    answer(pool, a, 401)
    assert run(pool.cooling([a])) == [(a, clock.seconds() + 300)]


def test_cool_counts_no_attempt():
    """cool cools the account, keeps its level and counts no attempt."""
    pool, store, clock = make_pool()
    a = account("a")
    answer(pool, a, 429)
    run(pool.cool(a, 300))
    assert run(pool.cooling([a])) == [(a, clock.seconds() + 300)]
    assert run(pool.backoff_level(a)) == 1
    assert run(store.account_stats([a.key]))[a.key]["attempts"] == 1
    assert run(store.counters()) == {"upstream_attempts": 1}
    run(pool.cool(a, 1))
    assert run(pool.cooling([a])) == [(a, clock.seconds() + 300)]


def test_short_cooldown_does_not_cut_long_one():
    """A 1 s cooldown recorded while a 1 h cooldown runs keeps the 1 h one."""
    pool, _, clock = make_pool()
    a = account("a", kind=OAUTH)
    answer(pool, a, 429, {U + "status": "rejected", U + "reset": str(clock.seconds() + 3600)})
    answer(pool, a, 429)
    assert run(pool.cooling([a])) == [(a, clock.seconds() + 3600)]
    assert run(pool.backoff_level(a)) == 1


def test_record_does_not_cool_without_cooldown():
    """Transient, 404 and client-error verdicts cool nothing."""
    pool, _, _ = make_pool()
    a = account("a")
    for verdict in (Verdict(NEXT, 502, "transient", None, 0),
                    Verdict(RETURN, 404, "not-found", None, 0),
                    Verdict(RETURN, 422, "client-error", None, 0)):
        run(pool.record(a, verdict))
    assert run(pool.cooling([a])) == []
    assert run(pool.earliest_recovery([a])) is None


# -- cooling / earliest_recovery / snapshot ----------------------------------------------------

def test_earliest_recovery():
    """earliest_recovery is the soonest cooldown end of enabled accounts, None when none cools."""
    pool, _, clock = make_pool()
    a, b, c = account("a"), account("b"), account("c")
    assert run(pool.earliest_recovery([a, b, c])) is None
    answer(pool, a, 429, {"retry-after": "100"})
    answer(pool, b, 429, {"retry-after": "40"})
    assert run(pool.earliest_recovery([a, b, c])) == 1040.0
    clock.advance(40)
    assert run(pool.earliest_recovery([a, b, c])) == 1100.0
    clock.advance(60)
    assert run(pool.earliest_recovery([a, b, c])) is None


def test_earliest_recovery_ignores_disabled():
    """A disabled account's cooldown is not a recovery time."""
    pool, _, _ = make_pool()
    a = account("a")
    answer(pool, a, 429, {"retry-after": "10"})
    disabled = account("a", enabled=False)
    assert run(pool.earliest_recovery([disabled])) is None
    assert run(pool.cooling([disabled])) == []


def test_cooling_lists_accounts_with_until():
    """cooling gives the enabled cooling accounts with the end of each cooldown, in order."""
    pool, _, _ = make_pool()
    a, b, c = account("a"), account("b"), account("c")
    answer(pool, c, 402)
    answer(pool, a, 429, {"retry-after": "2"})
    assert run(pool.cooling([a, b, c])) == [(a, 1002.0), (c, 1300.0)]


def test_snapshot_contents():
    """snapshot reports each account's state, cooldown, level and stats, and never a secret."""
    pool, _, clock = make_pool()
    a = account("a", weight=2)
    b = account("b", kind=OAUTH, rate_limit=10)
    c = account("c", enabled=False)
    answer(pool, a, 429, {"retry-after": "5"})
    run(pool.admit(b))
    answer(pool, b, 200)
    rows = run(pool.snapshot([a, b, c]))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[0] == {"key": "config:a", "name": "a", "kind": "api-key", "enabled": True,
                       "weight": 2, "rate_limit": None, "state": "cooling",
                       "cooling_until": 1005.0, "backoff_level": 1, "attempts": 1,
                       "successes": 0, "errors": 0, "rate_limits": 1, "last_attempt_at": 1000.0,
                       "last_error_at": 1000.0, "last_error": "429 rate-limited",
                       "rate_used": None}
    assert (rows[1]["state"], rows[1]["kind"], rows[1]["successes"], rows[1]["rate_used"]) == \
        ("ok", "oauth", 1, 1)
    assert (rows[2]["state"], rows[2]["enabled"], rows[2]["attempts"]) == ("disabled", False, 0)
    clock.advance(5)
    rows = run(pool.snapshot([a]))
    assert (rows[0]["state"], rows[0]["cooling_until"], rows[0]["backoff_level"]) == ("ok", None, 1)
    assert SECRET not in json.dumps(rows)
    assert "secret" not in rows[0]


# -- forgetting and boundedness ----------------------------------------------------------------

def test_forget_account():
    """forget drops one account's cooldown and stats."""
    pool, store, _ = make_pool()
    a = account("a")
    answer(pool, a, 429)
    run(pool.forget(a))
    assert run(pool.cooling([a])) == []
    assert run(store.account_stats([a.key]))[a.key]["attempts"] == 0


def test_retain_drops_removed_accounts():
    """retain forgets every account the pool wrote state for that is no longer configured."""
    pool, store, _ = make_pool("round-robin")
    a, b, c = account("a", rate_limit=5), account("b"), account("c")
    serve(pool, [a, b, c], lambda acct: (503, {}))
    run(pool.candidates([a, b, c]))
    run(pool.retain([b]))
    assert store.footprint()["accounts"] == 1
    assert store.footprint()["rate_windows"] == 0
    assert pool.footprint() == {"round_robin_weights": 1, "written_keys": 1}


def test_round_robin_state_follows_configured_accounts():
    """Round-robin weights of accounts no longer passed in are dropped."""
    pool, _, _ = make_pool("round-robin")
    run(pool.candidates([account("a"), account("b"), account("c")]))
    run(pool.candidates([account("a")]))
    assert pool.footprint()["round_robin_weights"] == 1


@pytest.mark.parametrize("strategy", ["fill-first", "round-robin"])
def test_memory_bounded_over_many_requests(strategy):
    """10,000 simulated requests over 3 accounts leave the store and pool sizes bounded."""
    pool, store, clock = make_pool(strategy)
    accounts = [account("a", rate_limit=30, weight=3), account("b", kind=OAUTH),
                account("c", rate_limit=5)]
    script = [(200, {})] * 12 + [(429, {}), (503, {}), None, (529, {}),
                                 (429, {"retry-after": "2"}), (404, {})]
    count = 0

    def respond(acct):
        nonlocal count
        count += 1
        return script[count % len(script)]

    peak = collections.Counter()
    for _ in range(10_000):
        serve(pool, accounts, respond)
        clock.advance(0.5)
        for name, size in store.footprint().items():
            peak[name] = max(peak[name], size)
    assert count > 5_000
    assert peak == {"accounts": 3, "rate_windows": 2, "rate_stamps": 35, "counters": 1}
    assert pool.footprint()["round_robin_weights"] <= 3
    assert pool.footprint()["written_keys"] == 3
    stats = run(store.account_stats([a.key for a in accounts]))
    assert run(store.counters()) == {"upstream_attempts": count}
    assert sum(s["attempts"] for s in stats.values()) == count
    for s in stats.values():
        assert s["attempts"] == s["successes"] + s["errors"] + s["rate_limits"]
