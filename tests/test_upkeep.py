"""Account upkeep as a TimerService: when it checks, and that stopping waits for a check in flight."""

import attr
from twisted.application.internet import TimerService
from twisted.internet import defer, task

from clproxy.daemon.upkeep import AccountUpkeep


@attr.s(auto_attribs=True)
class FakeAccount:
    """An OAuth account as upkeep sees it."""

    name: str = "work"
    is_oauth: bool = True
    enabled: bool = True


class FakeDirectory:
    """One account; counts re-discoveries and updates."""

    def __init__(self):
        self.account = FakeAccount()
        self.refreshes = 0
        self.updates = []

    def current(self):
        return [self.account]

    def refresh(self):
        self.refreshes += 1

    def updated(self, account):
        self.updates.append(account)


class FakeRefresher:
    """Answers each ``fresh`` with the Deferred the test hands it (fired at once by default)."""

    def __init__(self):
        self.calls = 0
        self.startup_checks = 0
        self.pending = None

    async def startup_check(self, accounts):
        self.startup_checks += 1
        return None

    async def fresh(self, account):
        self.calls += 1
        if self.pending is not None:
            return await self.pending
        return FakeAccount(name=account.name)


def make(interval=30.0):
    clock, directory, refresher = task.Clock(), FakeDirectory(), FakeRefresher()
    return AccountUpkeep(directory, refresher, clock, interval), clock, directory, refresher


def test_checks_at_start_and_every_interval():
    """One check when the service starts, then one per interval on the given clock."""
    upkeep, clock, directory, refresher = make(interval=30.0)
    assert isinstance(upkeep, TimerService)
    upkeep.startService()
    assert (refresher.calls, directory.refreshes) == (1, 1)
    assert len(directory.updates) == 1  # the refreshed account replaced the old one
    clock.advance(29.0)
    assert refresher.calls == 1
    clock.advance(1.0)
    assert (refresher.calls, directory.refreshes) == (2, 2)
    upkeep.stopService()
    clock.advance(300.0)
    assert refresher.calls == 2


def test_stop_waits_for_the_check_in_flight():
    """Stopping while a refresh is in flight fires only once that refresh has landed (a refresh is
    never cut between the token endpoint's answer and the token file's write)."""
    upkeep, clock, directory, refresher = make()
    refresher.pending = defer.Deferred()
    upkeep.startService()
    stopped = upkeep.stopService()
    assert not stopped.called
    refresher.pending.callback(FakeAccount())
    assert stopped.called and not upkeep.running
    assert directory.refreshes == 1


def test_a_check_in_flight_is_not_overlapped():
    """A check that outlasts the interval is not started again until it has finished."""
    upkeep, clock, directory, refresher = make(interval=10.0)
    refresher.pending = defer.Deferred()
    upkeep.startService()
    clock.advance(35.0)
    assert refresher.calls == 1
    refresher.pending, pending = None, refresher.pending
    pending.callback(FakeAccount())
    clock.advance(10.0)
    assert refresher.calls == 2
    upkeep.stopService()


def test_stopping_a_service_that_never_started_is_harmless():
    """The daemon may stop before the shared state connected and upkeep started."""
    upkeep, *_ = make()
    assert upkeep.stopService().called


def test_a_failing_refresh_is_counted_and_does_not_stop_the_timer():
    """A refresh that raises is logged and counted as failed; the next interval checks again."""
    upkeep, clock, directory, refresher = make(interval=10.0)
    counted = []
    upkeep.observability = type("O", (), {"refresh": lambda self, name, ok: counted.append((name, ok))})()

    async def broken(account):
        refresher.calls += 1
        raise RuntimeError("token endpoint down")

    refresher.fresh = broken
    upkeep.startService()
    clock.advance(10.0)
    assert refresher.calls == 2 and counted == [("work", False), ("work", False)]
    assert directory.refreshes == 2
    upkeep.stopService()


def test_the_startup_check_runs_at_start_only():
    """The start-up check (which disables an expired account on any failed refresh) runs with the
    first check only: a later tick (a laptop resumed, its tokens expired and the network not up
    yet) only refreshes, and a passing failure there is counted, not a disable."""
    upkeep, clock, directory, refresher = make(interval=30.0)
    upkeep.startService()
    assert (refresher.startup_checks, refresher.calls) == (1, 1)
    clock.advance(30.0)
    clock.advance(10 * 3600.0)
    assert refresher.startup_checks == 1 and refresher.calls == 3
    upkeep.stopService()
