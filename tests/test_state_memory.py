"""The in-memory state store: the shared contract, and that its memory stays bounded."""

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from clproxy.interfaces import IStateStore
from clproxy.state.memory import MemoryStateStore
from store_contract import (ClientKeysContract, SessionBindingsContract, StateStoreContract,
                            UsageCountersContract, WorkerMetricsContract)


def fired(deferred):
    """The result of a Deferred that must already have fired successfully."""
    results = []
    deferred.addBoth(results.append)
    assert results, "Deferred has not fired"
    result = results[0]
    assert not isinstance(result, Failure), result
    return result


class TestMemoryStateStore(StateStoreContract):
    """The memory store meets the IStateStore contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


class TestMemoryUsageCounters(UsageCountersContract):
    """The memory store meets the IUsageCounters contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


class TestMemoryWorkerMetrics(WorkerMetricsContract):
    """The memory store meets the IWorkerMetrics contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


def test_worker_metrics_keep_only_the_latest_runs():
    """A memory store keeps the reports of the latest few runs only, however many runs report."""
    from clproxy.state.memory import WORKER_METRIC_RUNS_KEPT
    store = MemoryStateStore()
    for run in range(50):
        store.publish_worker_metrics(str(run), 1, "a", {"req": run}, {}, 1.0, 5.0)
    assert len(store._worker_runs) == WORKER_METRIC_RUNS_KEPT
    assert fired(store.read_worker_metrics("49", 1.0)) == ({"req": 49.0}, {})
    assert fired(store.read_worker_metrics("0", 1.0)) == ({}, {})


def test_usage_counters_stay_bounded():
    """Only the latest days and months of usage sums are kept, however many days pass."""
    from clproxy.state.memory import USAGE_PERIODS_KEPT
    store = MemoryStateStore()
    for day in range(1, 29):
        store.add_usage("alice", "2026-02-{:02d}".format(day), 1, 0.1)
    for month in range(1, 13):
        store.add_usage("alice", "2026-{:02d}-01".format(month), 1, 0.1)
    assert len(store._usage_days) == USAGE_PERIODS_KEPT
    assert len(store._usage_months) == USAGE_PERIODS_KEPT
    assert fired(store.get_usage("alice", "2026-12-01")) == (1, 0.1)
    assert fired(store.get_usage("alice", "2026-02-01")) == (0, 0.0)


class TestMemorySessionBindings(SessionBindingsContract):
    """The memory store meets the ISessionBindings contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


class TestMemoryClientKeys(ClientKeysContract):
    """The memory store meets the IClientKeys contract."""

    def make_store(self):
        """A fresh memory store."""
        return MemoryStateStore()


def test_bindings_lru_cap_evicts_least_recently_used():
    """Past the cap the least recently used binding goes first; a touch makes one recent."""
    store = MemoryStateStore(max_bindings=3)
    for index in range(3):
        fired(store.put_binding("s{}".format(index), "a", float(index), 600.0))
    assert fired(store.touch_binding("s0", 5.0, 600.0)) == ("a", 0.0)
    fired(store.put_binding("s3", "b", 6.0, 600.0))
    assert fired(store.get_binding("s1", 7.0)) is None
    assert [fired(store.get_binding(s, 7.0)) is not None for s in ("s0", "s2", "s3")] == [True] * 3
    assert fired(store.count_bindings(7.0)) == {"a": 2, "b": 1}
    assert store.binding_footprint() == {"bindings": 3, "bound_accounts": 2}


def test_bindings_memory_bounded_under_churn():
    """However many sessions come and go, memory holds at most the cap."""
    store = MemoryStateStore(max_bindings=50)
    for index in range(5000):
        fired(store.put_binding("s{}".format(index), "k{}".format(index % 7), float(index), 1e6))
    assert store.binding_footprint() == {"bindings": 50, "bound_accounts": 7}
    store.limit_bindings(10)
    assert store.binding_footprint()["bindings"] == 10
    assert fired(store.get_binding("s4999", 5000.0)) == ("k1", 4999.0)


def test_expired_bindings_are_freed():
    """Expired bindings leave memory once the store is next written or counted."""
    store = MemoryStateStore()
    for index in range(100):
        fired(store.put_binding("s{}".format(index), "a", 0.0, 60.0))
    fired(store.put_binding("late", "b", 100.0, 60.0))
    assert store.binding_footprint() == {"bindings": 1, "bound_accounts": 1}
    assert fired(store.count_bindings(200.0)) == {}
    assert store.binding_footprint() == {"bindings": 0, "bound_accounts": 0}


def test_verify_object():
    """MemoryStateStore provides IStateStore."""
    assert verifyObject(IStateStore, MemoryStateStore())


def test_deferreds_already_fired():
    """Every method returns a Deferred that has already fired."""
    store = MemoryStateStore()
    calls = [store.get_account_states(["a"]), store.set_cooldown("a", 1.0, 1),
             store.record_attempt("a", 1.0), store.record_outcome("a", "success", 1.0),
             store.take_rate_slot("a", 1.0, 1), store.rate_usage("a", 1.0), store.incr("x"),
             store.counters(), store.account_stats(["a"]), store.forget("a")]
    for call in calls:
        assert isinstance(call, defer.Deferred)
        fired(call)


def test_reads_create_nothing():
    """Reading states, stats and rate usage of unknown keys allocates nothing."""
    store = MemoryStateStore()
    keys = ["k{}".format(i) for i in range(100)]
    fired(store.get_account_states(keys))
    fired(store.account_stats(keys))
    for key in keys:
        fired(store.rate_usage(key, 0.0))
    assert store.footprint() == {"accounts": 0, "rate_windows": 0, "rate_stamps": 0, "counters": 0}


def test_rate_window_bounded_by_limit():
    """A rate window never holds more than ``limit`` timestamps, however many are refused."""
    store = MemoryStateStore()
    for i in range(1000):
        fired(store.take_rate_slot("a", i * 0.01, 5))
    assert store.footprint()["rate_stamps"] == 5


def test_lowered_limit_trims_window():
    """Lowering the limit at runtime trims the window to the new limit."""
    store = MemoryStateStore()
    for i in range(10):
        assert fired(store.take_rate_slot("a", float(i), 10))
    assert not fired(store.take_rate_slot("a", 10.0, 3))
    assert store.footprint()["rate_stamps"] == 3


def test_expired_window_is_removed():
    """A rate window whose requests have all left it is removed."""
    store = MemoryStateStore()
    fired(store.take_rate_slot("a", 0.0, 5))
    assert fired(store.rate_usage("a", 120.0)) == (0, None)
    assert store.footprint()["rate_windows"] == 0


def test_forget_frees_memory():
    """forget removes the key's record and rate window from memory."""
    store = MemoryStateStore()
    fired(store.record_attempt("a", 0.0))
    fired(store.take_rate_slot("a", 0.0, 5))
    fired(store.forget("a"))
    assert store.footprint() == {"accounts": 0, "rate_windows": 0, "rate_stamps": 0, "counters": 0}


def test_memory_backend_imports_nothing_of_redis():
    """Opening the memory backend loads neither the Redis store nor txredisapi (a single instance
    needs neither, and the Debian package may lack the client)."""
    import subprocess
    import sys
    code = ("import sys; from clproxy.config import StateConfig; from clproxy.state import open_store;"
            "store = open_store(StateConfig(backend='memory'), None);"
            "print(sorted(m for m in sys.modules if 'redis' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_memory_store_provides_every_state_interface():
    """One memory store is the whole state of a single instance: every interface, verified."""
    from clproxy.interfaces import (IAtomicCooldown, ILockProvider, IQuotaStore, ISessionBindings,
                                    ISharedTokens, IStateLifecycle, IUsageCounters)
    store = MemoryStateStore()
    for interface in (IStateStore, IAtomicCooldown, ISharedTokens, IQuotaStore, ILockProvider,
                      IStateLifecycle, ISessionBindings, IUsageCounters):
        assert verifyObject(interface, store)
    assert fired(store.connect()) is None and fired(store.close()) is None
