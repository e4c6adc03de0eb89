"""The contract every IStateStore implementation must meet, as a mixin of tests.

Subclass ``StateStoreContract`` in a ``Test*`` class and define ``make_store()``; tests ``await``
every call, so an asynchronous store (Redis) runs the same tests as the memory one.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from clproxy.interfaces import (IClientKeys, ILoginSessions, ISessionBindings, IStateStore, IUsageCounters,
                                IWorkerMetrics)
from clproxy.state.model import STAT_KEYS, AccountState


class StateStoreContract:
    """Contract tests for ``IStateStore``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_interface(self):
        """The store provides every member of IStateStore."""
        assert verifyObject(IStateStore, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_unknown_keys_have_default_state(self):
        """Keys with nothing recorded read as not cooling, level 0."""
        store = self.make_store()
        states = await store.get_account_states(["a", "b"])
        assert states == {"a": AccountState(), "b": AccountState()}

    @pytest_twisted.ensureDeferred
    async def test_no_keys_no_states(self):
        """Asking for no keys gives an empty dict."""
        assert await self.make_store().get_account_states([]) == {}

    @pytest_twisted.ensureDeferred
    async def test_set_cooldown_is_read_back(self):
        """set_cooldown stores the end of the cooldown and the level for that key only."""
        store = self.make_store()
        await store.set_cooldown("a", 130.5, 3)
        states = await store.get_account_states(["a", "b"])
        assert states["a"] == AccountState(cooling_until=130.5, backoff_level=3)
        assert states["b"] == AccountState()

    @pytest_twisted.ensureDeferred
    async def test_set_cooldown_last_write_wins(self):
        """A later set_cooldown replaces an earlier one, even a shorter one."""
        store = self.make_store()
        await store.set_cooldown("a", 500.0, 4)
        await store.set_cooldown("a", 10.0, 1)
        assert (await store.get_account_states(["a"]))["a"] == AccountState(10.0, 1)

    @pytest_twisted.ensureDeferred
    async def test_success_clears_cooldown_and_level(self):
        """A success outcome resets the backoff level to 0 and ends the cooldown."""
        store = self.make_store()
        await store.set_cooldown("a", 900.0, 5)
        await store.record_outcome("a", "success", 100.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState()

    @pytest_twisted.ensureDeferred
    async def test_error_keeps_cooldown_and_level(self):
        """Error and rate-limited outcomes leave cooldown and level as they were."""
        store = self.make_store()
        await store.set_cooldown("a", 900.0, 5)
        await store.record_outcome("a", "error", 100.0, error="503 transient")
        await store.record_outcome("a", "rate-limited", 101.0)
        assert (await store.get_account_states(["a"]))["a"] == AccountState(900.0, 5)

    @pytest_twisted.ensureDeferred
    async def test_unknown_keys_have_empty_stats(self):
        """Stats of a key with nothing recorded are zeros and Nones, with every documented key."""
        stats = await self.make_store().account_stats(["a"])
        assert set(stats["a"]) == set(STAT_KEYS)
        assert stats["a"] == {"attempts": 0, "successes": 0, "errors": 0, "rate_limits": 0,
                              "backoff_level": 0, "cooling_until": 0.0, "last_attempt_at": None,
                              "last_error_at": None, "last_error": None}

    @pytest_twisted.ensureDeferred
    async def test_stats_count_attempts_and_outcomes(self):
        """Attempts and each kind of outcome are counted, with the last attempt and error times."""
        store = self.make_store()
        for now in (10.0, 11.0, 12.0, 13.0):
            await store.record_attempt("a", now)
        await store.record_outcome("a", "success", 10.5)
        await store.record_outcome("a", "error", 11.5, error="503 transient")
        await store.record_outcome("a", "rate-limited", 12.5, error="429 rate-limited")
        await store.record_outcome("a", "success", 13.5)
        await store.set_cooldown("a", 99.0, 2)
        stats = (await store.account_stats(["a"]))["a"]
        assert stats == {"attempts": 4, "successes": 2, "errors": 1, "rate_limits": 1,
                         "backoff_level": 2, "cooling_until": 99.0, "last_attempt_at": 13.0,
                         "last_error_at": 12.5, "last_error": "429 rate-limited"}

    @pytest_twisted.ensureDeferred
    async def test_error_without_text_records_outcome_name(self):
        """An error outcome without an error text records the outcome name as last_error."""
        store = self.make_store()
        await store.record_outcome("a", "error", 5.0)
        stats = (await store.account_stats(["a"]))["a"]
        assert (stats["last_error"], stats["last_error_at"]) == ("error", 5.0)

    @pytest_twisted.ensureDeferred
    async def test_unknown_outcome_fails(self):
        """An outcome outside success/error/rate-limited fails the Deferred with ValueError."""
        store = self.make_store()
        with pytest.raises(ValueError):
            await store.record_outcome("a", "meh", 1.0)

    @pytest_twisted.ensureDeferred
    async def test_a_result_is_an_attempt_its_outcome_and_a_count(self):
        """record_result counts exactly what record_attempt, incr and record_outcome would: a
        success also ends the cooldown and resets the level; an error keeps both, with its text;
        no counter named, no counter changed."""
        store = self.make_store()
        await store.set_cooldown("a", 99.0, 2)
        await store.record_result("a", "rate-limited", 10.0, error="429 rate-limited", counter="upstream_attempts")
        stats = (await store.account_stats(["a"]))["a"]
        assert stats == {"attempts": 1, "successes": 0, "errors": 0, "rate_limits": 1,
                         "backoff_level": 2, "cooling_until": 99.0, "last_attempt_at": 10.0,
                         "last_error_at": 10.0, "last_error": "429 rate-limited"}
        await store.record_result("a", "success", 11.0, counter="upstream_attempts")
        await store.record_result("a", "error", 12.0)
        stats = (await store.account_stats(["a"]))["a"]
        assert stats == {"attempts": 3, "successes": 1, "errors": 1, "rate_limits": 1,
                         "backoff_level": 0, "cooling_until": 0.0, "last_attempt_at": 12.0,
                         "last_error_at": 12.0, "last_error": "error"}
        assert (await store.get_account_states(["a"]))["a"] == AccountState()
        assert await store.counters() == {"upstream_attempts": 2}

    @pytest_twisted.ensureDeferred
    async def test_a_result_with_an_unknown_outcome_records_nothing(self):
        """record_result with an outcome outside success/error/rate-limited fails with ValueError
        before counting anything: not the attempt, not the counter."""
        store = self.make_store()
        with pytest.raises(ValueError):
            await store.record_result("a", "meh", 1.0, counter="upstream_attempts")
        assert (await store.account_stats(["a"]))["a"]["attempts"] == 0
        assert await store.counters() == {}

    @pytest_twisted.ensureDeferred
    async def test_rate_slots_up_to_limit(self):
        """take_rate_slot admits ``limit`` requests in the window and refuses the next."""
        store = self.make_store()
        results = [await store.take_rate_slot("a", 100.0 + i, 3) for i in range(4)]
        assert results == [True, True, True, False]

    @pytest_twisted.ensureDeferred
    async def test_rate_window_slides(self):
        """A slot frees when its request leaves the window, one request at a time."""
        store = self.make_store()
        assert await store.take_rate_slot("a", 0.0, 2, window=60.0)
        assert await store.take_rate_slot("a", 30.0, 2, window=60.0)
        assert not await store.take_rate_slot("a", 59.9, 2, window=60.0)
        assert await store.take_rate_slot("a", 60.0, 2, window=60.0)
        assert not await store.take_rate_slot("a", 89.9, 2, window=60.0)
        assert await store.take_rate_slot("a", 90.0, 2, window=60.0)

    @pytest_twisted.ensureDeferred
    async def test_refused_slot_is_not_counted(self):
        """Refused requests do not count: after the window a full limit is available again."""
        store = self.make_store()
        for now in (0.0, 1.0):
            assert await store.take_rate_slot("a", now, 2)
        for now in range(2, 60):
            assert not await store.take_rate_slot("a", float(now), 2)
        assert await store.take_rate_slot("a", 61.0, 2)
        assert await store.take_rate_slot("a", 61.0, 2)
        assert not await store.take_rate_slot("a", 61.0, 2)

    @pytest_twisted.ensureDeferred
    async def test_rate_windows_are_per_key(self):
        """One key's rate window does not limit another key."""
        store = self.make_store()
        assert await store.take_rate_slot("a", 0.0, 1)
        assert not await store.take_rate_slot("a", 0.0, 1)
        assert await store.take_rate_slot("b", 0.0, 1)

    @pytest_twisted.ensureDeferred
    async def test_zero_limit_admits_nothing(self):
        """A limit below 1 admits no request."""
        assert not await self.make_store().take_rate_slot("a", 0.0, 0)

    @pytest_twisted.ensureDeferred
    async def test_rate_usage_reports_count_and_oldest(self):
        """rate_usage gives the requests in the window and the oldest one's time, taking nothing."""
        store = self.make_store()
        assert await store.rate_usage("a", 0.0) == (0, None)
        await store.take_rate_slot("a", 10.0, 5)
        await store.take_rate_slot("a", 20.0, 5)
        assert await store.rate_usage("a", 30.0) == (2, 10.0)
        assert await store.rate_usage("a", 30.0) == (2, 10.0)
        assert await store.rate_usage("a", 75.0) == (1, 20.0)
        assert await store.rate_usage("a", 80.0) == (0, None)

    @pytest_twisted.ensureDeferred
    async def test_counters(self):
        """incr adds to named counters starting at 0; counters() returns them all."""
        store = self.make_store()
        assert await store.counters() == {}
        await store.incr("upstream_attempts")
        await store.incr("upstream_attempts")
        await store.incr("completed_requests", 5)
        assert await store.counters() == {"upstream_attempts": 2, "completed_requests": 5}

    @pytest_twisted.ensureDeferred
    async def test_counters_returns_a_copy(self):
        """Changing the dict counters() returned does not change the store."""
        store = self.make_store()
        await store.incr("truncated_streams")
        snapshot = await store.counters()
        snapshot["truncated_streams"] = 100
        assert await store.counters() == {"truncated_streams": 1}

    @pytest_twisted.ensureDeferred
    async def test_forget_drops_one_account(self):
        """forget drops cooldown, level, stats and rate window of one key and leaves others."""
        store = self.make_store()
        for key in ("a", "b"):
            await store.set_cooldown(key, 500.0, 2)
            await store.record_attempt(key, 1.0)
            await store.record_outcome(key, "error", 1.0, error="boom")
            await store.take_rate_slot(key, 1.0, 1)
        await store.incr("upstream_attempts", 2)
        await store.forget("a")
        assert (await store.get_account_states(["a"]))["a"] == AccountState()
        stats = await store.account_stats(["a", "b"])
        assert stats["a"]["attempts"] == 0 and stats["a"]["last_error"] is None
        assert stats["b"]["attempts"] == 1
        assert await store.take_rate_slot("a", 2.0, 1)
        assert not await store.take_rate_slot("b", 2.0, 1)
        assert await store.counters() == {"upstream_attempts": 2}

    @pytest_twisted.ensureDeferred
    async def test_forget_unknown_key(self):
        """Forgetting a key nothing was recorded for is harmless."""
        store = self.make_store()
        await store.forget("nobody")
        assert (await store.get_account_states(["nobody"]))["nobody"] == AccountState()


class SessionBindingsContract:
    """Contract tests for ``ISessionBindings``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_session_bindings(self):
        """The store provides every member of ISessionBindings."""
        assert verifyObject(ISessionBindings, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_unknown_session_has_no_binding(self):
        """A session never bound reads as None, and touching it creates nothing."""
        store = self.make_store()
        assert await store.get_binding("s1", 0.0) is None
        assert await store.touch_binding("s1", 0.0, 60.0) is None
        assert await store.get_binding("s1", 0.0) is None
        assert await store.count_bindings(0.0, ["a"]) == {"a": 0}

    @pytest_twisted.ensureDeferred
    async def test_put_then_get(self):
        """A binding reads back with its account and last use; a first put replaces nothing."""
        store = self.make_store()
        assert await store.put_binding("s1", "a", 10.0, 60.0) is None
        assert await store.get_binding("s1", 20.0) == ("a", 10.0)
        assert await store.get_binding("s2", 20.0) is None

    @pytest_twisted.ensureDeferred
    async def test_put_reports_the_replaced_account(self):
        """put_binding gives the account of the live binding it replaced (itself on a refresh)."""
        store = self.make_store()
        await store.put_binding("s1", "a", 10.0, 60.0)
        assert await store.put_binding("s1", "a", 11.0, 60.0) == "a"
        assert await store.put_binding("s1", "b", 12.0, 60.0) == "a"
        assert await store.get_binding("s1", 13.0) == ("b", 12.0)
        assert await store.count_bindings(13.0, ["a", "b"]) == {"a": 0, "b": 1}

    @pytest_twisted.ensureDeferred
    async def test_touch_refreshes_last_use_and_ttl(self):
        """touch_binding gives the binding as it was and keeps it alive ``ttl`` from now."""
        store = self.make_store()
        await store.put_binding("s1", "a", 0.0, 60.0)
        assert await store.touch_binding("s1", 50.0, 60.0) == ("a", 0.0)
        assert await store.get_binding("s1", 100.0) == ("a", 50.0)
        assert await store.get_binding("s1", 110.0) is None

    @pytest_twisted.ensureDeferred
    async def test_binding_expires_after_ttl(self):
        """A binding not used for ``ttl`` seconds is gone: not read, not counted, not replaced."""
        store = self.make_store()
        await store.put_binding("s1", "a", 0.0, 60.0)
        assert await store.get_binding("s1", 59.9) == ("a", 0.0)
        assert await store.get_binding("s1", 60.0) is None
        assert await store.touch_binding("s1", 60.0, 60.0) is None
        assert await store.count_bindings(60.0, ["a"]) == {"a": 0}
        assert await store.put_binding("s1", "b", 61.0, 60.0) is None

    @pytest_twisted.ensureDeferred
    async def test_count_bindings(self):
        """Bindings are counted per account; keys None gives every bound account."""
        store = self.make_store()
        for index in range(3):
            await store.put_binding("s{}".format(index), "a", 1.0, 60.0)
        await store.put_binding("t", "b", 1.0, 60.0)
        assert await store.count_bindings(2.0, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
        assert await store.count_bindings(2.0) == {"a": 3, "b": 1}

    @pytest_twisted.ensureDeferred
    async def test_drop_bindings_of_one_account(self):
        """drop_bindings_of drops that account's bindings only and says how many."""
        store = self.make_store()
        await store.put_binding("s1", "a", 1.0, 60.0)
        await store.put_binding("s2", "a", 1.0, 60.0)
        await store.put_binding("s3", "b", 1.0, 60.0)
        assert await store.drop_bindings_of("a") == 2
        assert await store.drop_bindings_of("nobody") == 0
        assert await store.get_binding("s1", 2.0) is None
        assert await store.get_binding("s3", 2.0) == ("b", 1.0)
        assert await store.count_bindings(2.0, ["a", "b"]) == {"a": 0, "b": 1}

    @pytest_twisted.ensureDeferred
    async def test_moved_session_is_not_dropped_with_its_old_account(self):
        """A session moved away from an account survives dropping that account."""
        store = self.make_store()
        await store.put_binding("s1", "a", 1.0, 60.0)
        await store.put_binding("s1", "b", 2.0, 60.0)
        assert await store.drop_bindings_of("a") == 0
        assert await store.get_binding("s1", 3.0) == ("b", 2.0)

    @pytest_twisted.ensureDeferred
    async def test_forget_keeps_bindings(self):
        """forget (runtime state of an account) leaves its session bindings alone."""
        store = self.make_store()
        await store.put_binding("s1", "a", 1.0, 60.0)
        await store.forget("a")
        assert await store.get_binding("s1", 2.0) == ("a", 1.0)


class UsageCountersContract:
    """Contract tests for ``IUsageCounters``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_usage_counters(self):
        """The store provides every member of IUsageCounters."""
        assert verifyObject(IUsageCounters, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_nothing_added_reads_zero(self):
        """A key with no usage reads (0, 0.0) for any day and month."""
        store = self.make_store()
        assert await store.get_usage("alice", "2026-05-28") == (0, 0.0)
        assert await store.get_month_usage("alice", "2026-05") == (0, 0.0)

    @pytest_twisted.ensureDeferred
    async def test_add_sums_per_key_day_and_month(self):
        """Additions sum per key and day, and per key and month; other keys and days are apart."""
        store = self.make_store()
        await store.add_usage("alice", "2026-05-28", 100, 0.25)
        await store.add_usage("alice", "2026-05-28", 50, 0.5)
        await store.add_usage("alice", "2026-05-29", 7, 0.0)
        await store.add_usage("bob", "2026-05-28", 1, 1.0)
        assert await store.get_usage("alice", "2026-05-28") == (150, pytest.approx(0.75))
        assert await store.get_usage("alice", "2026-05-29") == (7, 0.0)
        assert await store.get_usage("bob", "2026-05-28") == (1, pytest.approx(1.0))
        assert await store.get_month_usage("alice", "2026-05") == (157, pytest.approx(0.75))
        assert await store.get_month_usage("alice", "2026-06") == (0, 0.0)
        tokens, usd = await store.get_usage("alice", "2026-05-28")
        assert isinstance(tokens, int) and isinstance(usd, float)

    @pytest_twisted.ensureDeferred
    async def test_months_are_apart(self):
        """A new month starts from zero."""
        store = self.make_store()
        await store.add_usage("alice", "2026-05-31", 10, 1.0)
        await store.add_usage("alice", "2026-06-01", 3, 0.5)
        assert await store.get_month_usage("alice", "2026-05") == (10, pytest.approx(1.0))
        assert await store.get_month_usage("alice", "2026-06") == (3, pytest.approx(0.5))


class ClientKeysContract:
    """Contract tests for ``IClientKeys``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_client_keys(self):
        """The store provides every member of IClientKeys."""
        assert verifyObject(IClientKeys, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_no_keys(self):
        """A fresh store has no key."""
        assert await self.make_store().all_keys() == {}

    @pytest_twisted.ensureDeferred
    async def test_put_then_all(self):
        """Records put are read back by hash, as given; a second put replaces the first."""
        store = self.make_store()
        first = {"name": "alice", "hash": "a" * 64, "rpm": 5, "models": ["claude-*"]}
        assert await store.put_key("a" * 64, first) is True
        assert await store.put_key("b" * 64, {"name": "bob", "hash": "b" * 64}) is True
        assert await store.put_key("a" * 64, dict(first, rpm=7)) is True
        assert await store.all_keys() == {"a" * 64: dict(first, rpm=7),
                                          "b" * 64: {"name": "bob", "hash": "b" * 64}}

    @pytest_twisted.ensureDeferred
    async def test_all_keys_returns_a_copy(self):
        """Changing what all_keys gave does not change the store."""
        store = self.make_store()
        await store.put_key("a" * 64, {"name": "alice"})
        snapshot = await store.all_keys()
        snapshot["a" * 64]["name"] = "mallory"
        snapshot.clear()
        assert await store.all_keys() == {"a" * 64: {"name": "alice"}}

    @pytest_twisted.ensureDeferred
    async def test_revoke_is_final(self):
        """A revoked hash is gone and can never be put again; revoking an unknown one is harmless."""
        store = self.make_store()
        await store.put_key("a" * 64, {"name": "alice"})
        await store.put_key("b" * 64, {"name": "bob"})
        await store.revoke_key("a" * 64)
        await store.revoke_key("c" * 64)
        assert await store.all_keys() == {"b" * 64: {"name": "bob"}}
        assert await store.put_key("a" * 64, {"name": "alice"}) is False
        assert await store.put_key("c" * 64, {"name": "carol"}) is False
        assert await store.all_keys() == {"b" * 64: {"name": "bob"}}


class LoginSessionsContract:
    """Contract tests for ``ILoginSessions``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_login_sessions(self):
        """The store provides every member of ILoginSessions."""
        assert verifyObject(ILoginSessions, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_a_session_is_read_back_until_it_expires(self):
        """A session put is read back with its key hash while now is before its expiry, not after."""
        store = self.make_store()
        now = reactor.seconds()
        await store.put_login("d" * 64, "k" * 64, now + 60, now)
        assert await store.get_login("d" * 64, now + 59) == "k" * 64
        assert await store.get_login("d" * 64, now + 60) is None
        assert await store.get_login("e" * 64, now) is None

    @pytest_twisted.ensureDeferred
    async def test_a_dropped_session_is_gone(self):
        """drop_login ends one session, leaves the others, and is harmless when unknown."""
        store = self.make_store()
        now = reactor.seconds()
        await store.put_login("a" * 64, "k1", now + 60, now)
        await store.put_login("b" * 64, "k2", now + 60, now)
        await store.drop_login("a" * 64)
        await store.drop_login("c" * 64)
        assert await store.get_login("a" * 64, now) is None
        assert await store.get_login("b" * 64, now) == "k2"


class WorkerMetricsContract:
    """Contract tests for ``IWorkerMetrics``; subclasses provide ``make_store()``."""

    def make_store(self):
        """A fresh, empty store."""
        raise NotImplementedError

    def test_provides_worker_metrics(self):
        """The store provides every member of IWorkerMetrics."""
        assert verifyObject(IWorkerMetrics, self.make_store())

    @pytest_twisted.ensureDeferred
    async def test_unknown_run_reads_empty(self):
        """A run nobody reported in reads as no totals and no gauges."""
        assert await self.make_store().read_worker_metrics("nobody", 10.0) == ({}, {})

    @pytest_twisted.ensureDeferred
    async def test_totals_and_live_gauges_sum_over_workers(self):
        """Totals and gauges sum per series over the workers; a report replaces its worker's last."""
        store = self.make_store()
        await store.publish_worker_metrics("r", 1, "a", {"req": 3, "sum": 0.25}, {"busy": 2}, 100.0, 5.0)
        await store.publish_worker_metrics("r", 2, "b", {"req": 4, "other": 1}, {"busy": 1}, 100.0, 5.0)
        await store.publish_worker_metrics("r", 1, "a", {"req": 5, "sum": 0.5}, {"busy": 0}, 101.0, 5.0)
        totals, gauges = await store.read_worker_metrics("r", 102.0)
        assert totals == {"req": 9.0, "sum": 0.5, "other": 1.0}
        assert gauges == {"busy": 1.0}

    @pytest_twisted.ensureDeferred
    async def test_gauges_vanish_after_their_ttl_totals_stay(self):
        """A report's gauges count until now + ttl; its totals count after that too."""
        store = self.make_store()
        await store.publish_worker_metrics("r", 1, "a", {"req": 3}, {"busy": 2}, 100.0, 5.0)
        await store.publish_worker_metrics("r", 2, "b", {"req": 4}, {"busy": 1}, 103.0, 5.0)
        assert await store.read_worker_metrics("r", 104.9) == ({"req": 7.0}, {"busy": 3.0})
        assert await store.read_worker_metrics("r", 105.0) == ({"req": 7.0}, {"busy": 1.0})
        assert await store.read_worker_metrics("r", 200.0) == ({"req": 7.0}, {})

    @pytest_twisted.ensureDeferred
    async def test_a_new_incarnation_retires_the_old_totals(self):
        """A worker index reporting as a new incarnation keeps its old totals in the sum (retired),
        so the sum never goes down; the same incarnation again replaces, never adds."""
        store = self.make_store()
        await store.publish_worker_metrics("r", 1, "first", {"req": 10, "t": 1.5}, {}, 100.0, 5.0)
        await store.publish_worker_metrics("r", 1, "second", {"req": 1}, {}, 110.0, 5.0)
        assert (await store.read_worker_metrics("r", 110.0))[0] == {"req": 11.0, "t": 1.5}
        await store.publish_worker_metrics("r", 1, "second", {"req": 2}, {}, 111.0, 5.0)
        await store.publish_worker_metrics("r", 1, "third", {"req": 0}, {}, 112.0, 5.0)
        assert (await store.read_worker_metrics("r", 112.0))[0] == {"req": 12.0, "t": 1.5}

    @pytest_twisted.ensureDeferred
    async def test_runs_are_apart(self):
        """Reports of one run never count in another's sums."""
        store = self.make_store()
        await store.publish_worker_metrics("r1", 1, "a", {"req": 3}, {"busy": 1}, 100.0, 5.0)
        await store.publish_worker_metrics("r2", 1, "b", {"req": 4}, {}, 100.0, 5.0)
        assert await store.read_worker_metrics("r1", 101.0) == ({"req": 3.0}, {"busy": 1.0})
        assert await store.read_worker_metrics("r2", 101.0) == ({"req": 4.0}, {})

    @pytest_twisted.ensureDeferred
    async def test_series_with_any_characters_round_trip(self):
        """Series are opaque strings: quotes, spaces, colons and non-ASCII come back as given."""
        store = self.make_store()
        series = '["clproxy_requests","total",[["account","Zoë: \\"a b\\""]]]'
        await store.publish_worker_metrics("r", 1, "a", {series: 2}, {series: 1}, 100.0, 5.0)
        assert await store.read_worker_metrics("r", 101.0) == ({series: 2.0}, {series: 1.0})
