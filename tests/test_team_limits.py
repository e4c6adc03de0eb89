"""Per-client-key limits (clproxy.team.limits) on a task.Clock: models patterns, the sliding rpm window
and its truthful Retry-After, the day and month budgets up to the UTC window's end, the subscription
rule, the open-relay check at listen time; and the rpm window shared by two Redis stores."""

import calendar

import attr
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.failure import Failure

from clproxy.accounts.model import API_KEY, OAUTH, Account
from clproxy.errors import ProxyError
from clproxy.state.memory import MemoryStateStore
from clproxy.state.redis import RedisStateStore
from clproxy.team.limits import (
    RATE_NAMESPACE, KeyLimits, day_of, is_loopback, listen_check, model_allowed, month_of,
    next_midnight, next_month_start, retry_after, subscription_allowed, usable_accounts,
)
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

SECRET = "clp_" + "s3cr3t" * 8


@attr.s(auto_attribs=True, kw_only=True)
class Record:
    """The shape of a key record the limits read (clproxy.team.keys.KeyRecord has these fields)."""

    name: str = "alice"
    models: tuple = ()
    rpm: object = None
    tokens_per_day: object = None
    usd_per_day: object = None
    usd_per_month: object = None
    allow_subscription: bool = False
    #: Not read by the limits; here to prove nothing of the key reaches a message.
    hash: str = "sha256:" + "ab" * 32
    prefix: str = SECRET[:8]


class FakeSpent:
    """An in-memory spent source: ``(tokens, usd)`` per (key name, UTC day) and (key name, month)."""

    def __init__(self):
        self.days = {}
        self.months = {}
        self.asked = []

    def add(self, name, day, month, tokens, usd):
        t, u = self.days.get((name, day), (0, 0.0))
        self.days[(name, day)] = (t + tokens, u + usd)
        t, u = self.months.get((name, month), (0, 0.0))
        self.months[(name, month)] = (t + tokens, u + usd)

    async def spent(self, key_name, day):
        self.asked.append(("day", key_name, day))
        return self.days.get((key_name, day), (0, 0.0))

    def spent_month(self, key_name, month):
        # A Deferred, as a store-backed source would return: both shapes must work.
        self.asked.append(("month", key_name, month))
        return defer.succeed(self.months.get((key_name, month), (0, 0.0)))


def at(*ymd_hms):
    """Epoch seconds of a UTC date-time."""
    return float(calendar.timegm(tuple(ymd_hms) + (0,) * (6 - len(ymd_hms))))


def clock_at(when):
    clock = task.Clock()
    clock.advance(when)
    return clock


def run(coroutine):
    """Run a coroutine whose awaits have all fired (memory store, fake spent); its outcome."""
    out = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out, "the check waited on something that never fired"
    return out[0]


def fired(deferred):
    """The result of a Deferred that has already fired (the memory store's)."""
    out = []
    deferred.addBoth(out.append)
    return out[0]


def refused(limits, record, model="claude-sonnet-4-5"):
    """The ProxyError ``check`` raised (fails the test when it passed)."""
    outcome = run(limits.check(record, model))
    assert isinstance(outcome, Failure) and outcome.check(ProxyError), f"expected a refusal, got {outcome!r}"
    return outcome.value


def passes(limits, record, model="claude-sonnet-4-5"):
    """``check`` let the request through; what it held is released (as the request's end does)."""
    outcome = run(limits.check(record, model))
    if isinstance(outcome, Failure):
        outcome.raiseException()
    if outcome is not None:
        outcome()
    return True


def retry(error):
    headers = dict(error.headers)
    return int(headers[b"retry-after"])


def assert_no_secret(error, record):
    """Nothing of the key (secret, hash, prefix, even the name) appears in the answer."""
    text = error.message + repr(error.headers) + error.body().decode()
    for needle in (SECRET, record.hash, record.prefix, record.name):
        assert needle not in text


def make(when, spent=None, store=None):
    clock = clock_at(when)
    spent = spent or FakeSpent()
    return clock, spent, KeyLimits(store or MemoryStateStore(), clock, spent)


NOON = at(2026, 3, 14, 12, 0, 0)


# --- models -----------------------------------------------------------------------------------------


def test_no_patterns_allow_every_model():
    """A key without model patterns may use any model at all, even one that is not Claude's."""
    assert model_allowed(Record(), "anything-at-all")
    _, _, limits = make(NOON)
    assert passes(limits, Record(), "gpt-4o")


def test_model_outside_the_patterns_is_403_naming_the_model():
    """A model outside the key's patterns is a 403 permission_error naming the model and no secret;
    patterns are case-sensitive and anchored, so Claude-Sonnet-4 and claude-haiku-4-5-x are refused."""
    record = Record(models=("claude-sonnet-*", "claude-haiku-4-5"))
    _, spent, limits = make(NOON)
    assert passes(limits, record, "claude-sonnet-4-5-20250929")
    assert passes(limits, record, "claude-haiku-4-5")
    error = refused(limits, record, "claude-opus-4-1")
    assert (error.status, error.error_type) == (403, "permission_error")
    assert "claude-opus-4-1" in error.message
    assert_no_secret(error, record)
    # Patterns are case-sensitive and anchored.
    assert not model_allowed(record, "Claude-Sonnet-4")
    assert not model_allowed(record, "claude-haiku-4-5-x")


def test_a_refused_model_takes_no_rpm_slot_and_reads_no_budget():
    """A refused model neither takes the key's one rpm slot nor reads its budget, so the next allowed
    request still passes."""
    record = Record(models=("a",), rpm=1, tokens_per_day=10)
    _, spent, limits = make(NOON)
    refused(limits, record, "b")
    assert spent.asked == []
    assert passes(limits, record, "a")


# --- rpm --------------------------------------------------------------------------------------------


def test_rpm_allows_exactly_the_limit_then_429_with_the_true_retry_after():
    """rpm 3 allows exactly 3 requests in the minute; the fourth at 34.75 s is a 429 with Retry-After
    26 (the oldest leaves at 60 s: 25.25 s, rounded up) and names "3 requests per minute"."""
    record = Record(rpm=3)
    clock, _, limits = make(NOON)
    assert passes(limits, record)            # t = 0
    clock.advance(10.5)
    assert passes(limits, record)            # t = 10.5
    clock.advance(20)
    assert passes(limits, record)            # t = 30.5: the third, exactly at the limit
    clock.advance(4.25)                      # t = 34.75
    error = refused(limits, record)
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    # The oldest (t = 0) leaves the window at 60: 25.25 s, rounded up.
    assert retry(error) == 26
    assert "3 requests per minute" in error.message
    assert_no_secret(error, record)


def test_rpm_window_slides_a_slot_frees_when_the_oldest_leaves():
    """The rpm window slides: with rpm 2, a slot frees exactly when the oldest request is 60 s old, and
    the Retry-After counts down to that moment (1 s at 59.5 s, 29 s at 61 s)."""
    record = Record(rpm=2)
    clock, _, limits = make(NOON)
    passes(limits, record)                   # t = 0
    clock.advance(30)
    passes(limits, record)                   # t = 30
    clock.advance(29.5)                      # t = 59.5
    assert retry(refused(limits, record)) == 1
    clock.advance(0.5)                       # t = 60: the first request has left the window
    assert passes(limits, record)
    # Now the window holds 30 and 60; the next slot frees at 90.
    clock.advance(1)                         # t = 61
    assert retry(refused(limits, record)) == 29
    clock.advance(29)
    assert passes(limits, record)


def test_refused_requests_take_no_slot():
    """Refusals do not extend the window: Retry-After is the truth for a client that honours it."""
    record = Record(rpm=1)
    clock, _, limits = make(NOON)
    passes(limits, record)
    for _ in range(5):
        clock.advance(10)
        refused(limits, record)
    assert retry(refused(limits, record)) == 10
    clock.advance(10)
    assert passes(limits, record)


def test_rpm_windows_are_per_key_and_apart_from_account_windows():
    """Each key has its own rpm window, and a key named "a" shares none with the account config:a,
    so one key's traffic never throttles another key or an account."""
    store = MemoryStateStore()
    clock, _, limits = make(NOON, store=store)
    passes(limits, Record(name="a", rpm=1))
    passes(limits, Record(name="b", rpm=1))
    refused(limits, Record(name="a", rpm=1))
    # An account called "a" (key "config:a") has its own window.
    assert fired(store.take_rate_slot("config:a", clock.seconds(), 1)) is True
    assert fired(store.rate_usage(RATE_NAMESPACE + "a", clock.seconds()))[0] == 1


def test_rpm_retry_after_is_at_least_one_second():
    """The rpm Retry-After is rounded up to whole seconds and never below 1, even when the slot frees
    now, and 1.01 s gives 2."""
    assert retry_after(100.0, 100.0) == 1
    assert retry_after(100.2, 100.0) == 1
    assert retry_after(101.0, 100.0) == 1
    assert retry_after(101.01, 100.0) == 2


# --- tokens and dollars per day / month -------------------------------------------------------------


def test_utc_windows():
    """Day and month windows are UTC: the next midnight and the next month's start are right across
    month ends, a leap-year February and December into January."""
    assert day_of(at(2026, 12, 31, 23, 59, 59)) == "2026-12-31"
    assert month_of(at(2026, 12, 31, 23, 59, 59)) == "2026-12"
    assert next_midnight(at(2026, 3, 14, 12)) == at(2026, 3, 15)
    assert next_midnight(at(2026, 3, 14)) == at(2026, 3, 15)
    assert next_month_start(at(2026, 2, 28, 23)) == at(2026, 3, 1)
    assert next_month_start(at(2028, 2, 29, 1)) == at(2028, 3, 1)
    assert next_month_start(at(2026, 12, 31, 23, 59, 59)) == at(2027, 1, 1)
    assert next_month_start(at(2026, 12, 1)) == at(2027, 1, 1)


def test_tokens_per_day_below_the_budget_passes_at_it_429_until_utc_midnight():
    """999 of 1,000 tokens per day passes, 1,000 is a 429 with Retry-After 1 h 44 min 30 s until UTC
    midnight, and at midnight the budget renews because only the new day's tokens are read."""
    record = Record(tokens_per_day=1000)
    when = at(2026, 3, 14, 22, 15, 30)
    clock, spent, limits = make(when)
    spent.add("alice", "2026-03-14", "2026-03", 999, 0.5)
    assert passes(limits, record)
    spent.add("alice", "2026-03-14", "2026-03", 1, 0.0)   # exactly at the limit: spent
    error = refused(limits, record)
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    assert retry(error) == 1 * 3600 + 44 * 60 + 30           # until 2026-03-15T00:00:00Z
    assert "1,000 of 1,000 tokens per day" in error.message
    assert_no_secret(error, record)
    # Yesterday's tokens do not count: at midnight the budget renews.
    clock.advance(retry(error))
    assert day_of(clock.seconds()) == "2026-03-15"
    assert passes(limits, record)
    assert ("day", "alice", "2026-03-15") in spent.asked


def held(limits, record, model="claude-sonnet-4-5"):
    """``check`` let the request through and it is still running: its release."""
    outcome = run(limits.check(record, model))
    if isinstance(outcome, Failure):
        outcome.raiseException()
    assert callable(outcome), "a request of a key with a budget holds part of it"
    return outcome


def test_requests_in_flight_hold_the_budget_they_may_spend():
    """One token left and many requests at once: they all passed the check (the spent amount is
    known only once each is answered) and the budget was overrun fifty times over. A request in
    flight now holds what the key's requests cost on average (at least 1 token): the next is a 429
    with Retry-After 1 s that says why, and once the first ends (its cost counted) the budget
    decides as before."""
    record = Record(tokens_per_day=1000)
    clock, spent, limits = make(NOON)
    spent.add("alice", "2026-03-14", "2026-03", 999, 0.0)
    release = held(limits, record)
    for _ in range(5):
        error = refused(limits, record)
        assert error.status == 429 and retry(error) == 1
        assert "1 request(s) of this API key are still running" in error.message
        assert "1,000 tokens per day" in error.message
        assert_no_secret(error, record)
    spent.add("alice", "2026-03-14", "2026-03", 300, 0.0)  # the first one's usage, then its end
    limits.charged("alice", 300, 0.0)
    release()
    release()  # twice: harmless
    error = refused(limits, record)
    assert retry(error) > 1 and "1,299 of 1,000" in error.message  # spent now: until midnight


def test_a_request_in_flight_is_held_at_the_keys_average_cost():
    """With 2,000 tokens left and requests costing 500 on average, four run at once and the fifth
    waits; dollars are held the same way against a monthly budget; a key without a budget holds
    nothing."""
    record = Record(tokens_per_day=10_000)
    clock, spent, limits = make(NOON)
    spent.add("alice", "2026-03-14", "2026-03", 8_000, 0.0)
    limits.charged("alice", 500, 0.0)
    releases = [held(limits, record) for _ in range(4)]
    refused(limits, record)
    releases.pop()()
    releases.append(held(limits, record))

    dollars = Record(name="bob", usd_per_month=10.0)
    spent.add("bob", "2026-03-14", "2026-03", 0, 9.0)
    limits.charged("bob", 100, 0.4)
    [held(limits, dollars) for _ in range(3)]  # $9.00 spent + 3 x $0.40 held: past $10
    assert "$10.00 per month" in refused(limits, dollars).message

    free = Record(name="carol", rpm=100)
    assert run(limits.check(free, "m")) is None


class SlowSlots:
    """A store whose rpm slots answer later (as Redis does, a round trip away)."""

    def __init__(self):
        self.pending = []

    def take_rate_slot(self, key, now, limit, window=60.0):
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def rate_usage(self, key, now, window=60.0):
        return defer.succeed((0, None))


def test_requests_checked_together_see_each_others_holds_across_the_rpm_round_trip():
    """A key with an rpm limit and a budget: the hold used to be taken only after the rpm slot's
    answer, so fifty checks waiting on their slots (Redis: a round trip) all passed one token left.
    Held before the slot is asked now, and released again when the slot is refused."""
    clock = clock_at(NOON)
    spent = FakeSpent()
    spent.add("alice", "2026-03-14", "2026-03", 999, 0.0)
    store = SlowSlots()
    limits = KeyLimits(store, clock, spent)
    record = Record(tokens_per_day=1000, rpm=1000)
    outcomes = []
    for _ in range(50):
        defer.Deferred.fromCoroutine(limits.check(record, "claude-sonnet-4-5")).addBoth(outcomes.append)
    assert len(store.pending) == 1  # the other 49 refused before asking for a slot
    store.pending[0].callback(False)  # and that one's slot is refused: its hold goes
    assert sum(1 for o in outcomes if callable(o)) == 0 and limits._held == {}


def test_tokens_over_the_budget_names_the_amount_spent():
    """A token budget overrun names the amount actually spent, "12,345 of 1,000", not just the limit."""
    record = Record(tokens_per_day=1000)
    _, spent, limits = make(NOON)
    spent.add("alice", day_of(NOON), month_of(NOON), 12345, 0.0)
    error = refused(limits, record)
    assert "12,345 of 1,000" in error.message


def test_usd_per_day_429_until_midnight():
    """A $5 daily budget passes at $4.99 and is a 429 at $5.00, with Retry-After 1 s half a second
    before UTC midnight (rounded up) and "$5.00 of $5.00 per day" in the message."""
    record = Record(usd_per_day=5)
    clock, spent, limits = make(at(2026, 3, 14, 23, 59, 59.5))
    spent.add("alice", "2026-03-14", "2026-03", 10, 4.99)
    assert passes(limits, record)
    spent.add("alice", "2026-03-14", "2026-03", 10, 0.01)
    error = refused(limits, record)
    assert (error.status, retry(error)) == (429, 1)
    assert "$5.00 of $5.00 per day" in error.message
    assert_no_secret(error, record)


def test_usd_per_month_429_until_the_first_of_next_month():
    """A $100 monthly budget at $120.50 spent is a 429 until 1 May 00:00 UTC (6 h away), and with no
    day budget only the month's spending is read."""
    record = Record(usd_per_month=100)
    when = at(2026, 4, 30, 18, 0, 0)
    _, spent, limits = make(when)
    spent.add("alice", "2026-04-02", "2026-04", 10, 120.5)
    error = refused(limits, record)
    assert (error.status, error.error_type) == (429, "rate_limit_error")
    assert retry(error) == 6 * 3600                          # until 2026-05-01T00:00:00Z
    assert "$120.50 of $100.00 per month" in error.message
    assert_no_secret(error, record)
    assert spent.asked == [("month", "alice", "2026-04")]    # no day budget: the day is not read


def test_usd_per_month_december_renews_on_january_first():
    """A monthly budget spent on 31 December renews on 1 January of the next year, 12 h later, when the
    request passes again."""
    record = Record(usd_per_month=1.5)
    when = at(2026, 12, 31, 12, 0, 0)
    clock, spent, limits = make(when)
    spent.add("alice", "2026-12-31", "2026-12", 10, 1.5)
    error = refused(limits, record)
    assert retry(error) == 12 * 3600                         # until 2027-01-01T00:00:00Z
    clock.advance(12 * 3600)
    assert month_of(clock.seconds()) == "2027-01"
    assert passes(limits, record)


def test_a_spent_budget_takes_no_rpm_slot():
    """A request refused for a spent token budget takes no rpm slot: 30 s later, on the next day, the
    key's one request a minute still passes."""
    record = Record(rpm=1, tokens_per_day=10)
    clock, spent, limits = make(at(2026, 3, 14, 23, 59, 30))
    spent.add("alice", "2026-03-14", "2026-03", 10, 0.0)
    refused(limits, record)
    clock.advance(30)                                        # the next day: budget renewed
    assert passes(limits, record)


def test_no_limits_reads_nothing_and_no_record_passes():
    """A key without limits passes without reading any usage, and a request with no key record at all
    passes the check."""
    _, spent, limits = make(NOON)
    assert passes(limits, Record())
    assert spent.asked == []
    assert run(limits.check(None, "x")) is None


# --- subscription accounts --------------------------------------------------------------------------


def acct(name, kind):
    return Account(key=f"config:{name}", name=name, kind=kind, secret="sk-" + name)


def test_subscription_allowed():
    """Subscription accounts are allowed for a key with allow_subscription, refused for a plain key,
    and allowed when there is no key record (no team mode)."""
    assert subscription_allowed(Record(allow_subscription=True))
    assert not subscription_allowed(Record())
    assert subscription_allowed(None)


def test_oauth_accounts_only_for_keys_with_allow_subscription():
    """A plain key may use only the API-key accounts of the pool; a key with allow_subscription, or no
    key record, may use them all, in the pool's order."""
    pool = [acct("max", OAUTH), acct("api", API_KEY), acct("pro", OAUTH), acct("api2", API_KEY)]
    assert usable_accounts(Record(allow_subscription=True), pool) == pool
    assert [a.name for a in usable_accounts(Record(), pool)] == ["api", "api2"]
    assert usable_accounts(None, pool) == pool
    assert usable_accounts(Record(), []) == []


def test_no_api_key_account_left_is_403_saying_why():
    """A plain key facing only OAuth accounts gets a 403 permission_error saying no API-key account is
    available and pointing at --allow-subscription, without any secret."""
    record = Record()
    with pytest.raises(ProxyError) as info:
        usable_accounts(record, [acct("max", OAUTH)])
    error = info.value
    assert (error.status, error.error_type) == (403, "permission_error")
    assert "subscription" in error.message and "--allow-subscription" in error.message
    assert "no API-key account is available" in error.message
    assert_no_secret(error, record)


# --- no open relay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "localhost",
                                  "LOCALHOST", "::1", "[::1]", "::ffff:127.0.0.1"])
def test_loopback_hosts_need_no_key(host):
    """Every loopback spelling (127.x, localhost in any case, ::1, [::1], IPv4-mapped 127.0.0.1) may
    listen without client keys."""
    assert is_loopback(host)
    assert listen_check(host, keys_exist=False, allow_unauthenticated=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "10.0.0.5", "fe80::1",
                                  "128.0.0.1", "example.com", "localhost.example.com"])
def test_other_hosts_without_keys_are_refused_with_one_line(host):
    """Any other host (wildcards, private or public addresses, names merely starting with localhost) is
    refused without keys, with one line saying why and how to fix it."""
    assert not is_loopback(host)
    message = listen_check(host, keys_exist=False, allow_unauthenticated=False)
    assert message == (
        f"clproxy: refusing to listen on {host} without client keys: anyone who reaches the port "
        "would spend your accounts; run `clproxy keys create NAME`, or set "
        "server.allowUnauthenticated: true")
    assert "\n" not in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.0.7"])
def test_other_hosts_with_keys_are_fine(host):
    """A public host with client keys may listen, whether or not allowUnauthenticated is set."""
    assert listen_check(host, keys_exist=True, allow_unauthenticated=False) is None
    assert listen_check(host, keys_exist=True, allow_unauthenticated=True) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.0.7"])
def test_allow_unauthenticated_turns_the_refusal_into_a_warning(host):
    """allowUnauthenticated turns the refusal into a one-line WARNING naming the host and still
    suggesting `clproxy keys create`."""
    warning = listen_check(host, keys_exist=False, allow_unauthenticated=True)
    assert warning.startswith("clproxy: WARNING: listening on " + host + " without client keys")
    assert "refusing" not in warning and "clproxy keys create" in warning and "\n" not in warning


# --- shared across instances (Redis) ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rpm_window_is_shared_by_two_redis_stores(redis_server):  # noqa: F811
    """Two instances (two stores, one prefix) on one redis-server hold one rpm window per key."""
    prefix = unique_prefix()
    clock = clock_at(NOON)
    stores = [RedisStateStore(redis_server.url, clock, prefix=prefix) for _ in range(2)]
    for store in stores:
        await store.connect()
    try:
        first, second = (KeyLimits(store, clock, FakeSpent()) for store in stores)
        record = Record(rpm=2)
        await first.check(record, "m")
        clock.advance(15)
        await second.check(record, "m")
        clock.advance(5)
        for limits in (first, second):
            with pytest.raises(ProxyError) as info:
                await limits.check(record, "m")
            assert (info.value.status, retry(info.value)) == (429, 40)
        assert [store._link.failed_calls for store in stores] == [0, 0]
        clock.advance(40)                                   # the first request left the window
        await second.check(record, "m")
        with pytest.raises(ProxyError):
            await first.check(record, "m")
    finally:
        for store in stores:
            await store.close()


# --- purity -----------------------------------------------------------------------------------------


def test_limits_module_is_checked_as_pure(tmp_path):
    """scripts/check_layout.py refuses a global reactor import in clproxy/team/limits.py."""
    import os
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    package = tmp_path / "clproxy" / "team"
    package.mkdir(parents=True)
    (tmp_path / "clproxy" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "limits.py").write_text("def late():\n    from twisted.internet import reactor\n")
    result = subprocess.run([sys.executable, os.path.join(root, "scripts", "check_layout.py"),
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "clproxy/team/limits.py" in result.stdout


def test_only_answers_that_spent_something_move_the_hold_average(tmp_path):
    """The usage sink told the limits of every keyed request, refusals and errors (no usage) as
    costing 0: twenty refused retries pulled the average a request is held at to ~1 token, and the
    next burst passed a nearly spent budget again. Only a request with usage moves it now."""
    from clproxy.daemon.assemble import UsageRecorder
    from clproxy.team.pricing import Pricing
    clock, spent, limits = make(NOON)
    recorder = UsageRecorder(type("Ledger", (), {"record": lambda self, row: None})(), MemoryStateStore(),
                             Pricing())
    recorder.charged = limits.charged
    recorder.record({"key_name": "alice", "model": "claude-sonnet-4-5", "at": NOON,
                     "usage": {"input_tokens": 400, "output_tokens": 100}})
    assert limits._average["alice"][0] == 500
    for _ in range(20):  # 429s, an upstream error, GET /v1/models: no usage
        recorder.record({"key_name": "alice", "model": "claude-sonnet-4-5", "usage": {}, "at": NOON})
    assert limits._average["alice"][0] == 500
