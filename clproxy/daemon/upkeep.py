"""Account upkeep: keep OAuth tokens fresh and the account list current, in the background.

At start (the first check only), one refresh for each expired OAuth account (disabled if it fails);
then, every ``--health-interval`` seconds, re-discovery and a refresh of tokens about to expire, so
requests seldom wait on one (a failure there is counted, see ``TokenRefresher``). A
``TimerService``: a check in flight when the daemon stops is waited for, so a refresh is never cut
between the token endpoint's answer and the token file's write.
"""

from twisted.application.internet import TimerService
from twisted.internet import defer

from clproxy.observe import console

log = console.logger(__name__)


class AccountUpkeep(TimerService):
    """Runs :meth:`check` every ``interval`` seconds on ``clock`` (the first one at start)."""

    def __init__(self, directory, refresher, clock, interval: float, observability=None):
        super().__init__(interval, self._tick)
        self.clock = clock
        self.directory, self.refresher, self.interval = directory, refresher, interval
        self.observability = observability
        #: the start-up check ran: later ticks (after a laptop resumed with expired tokens and no
        #: network yet, say) must not disable an account for one passing failure
        self.startup_checked = False

    def _tick(self):
        # LoopingCall waits on the Deferred: no overlap, and stopService waits for it
        return defer.ensureDeferred(self.check())

    async def check(self) -> None:
        """Refresh what is expired or about to expire (the first call: :meth:`startup_check` too);
        never raises."""
        try:
            if not self.startup_checked:
                self.startup_checked = True
                await self.refresher.startup_check(self.directory.current())
            for account in self.directory.current():
                if account.is_oauth and account.enabled:
                    try:
                        refreshed = await self.refresher.fresh(account)
                    except Exception as e:
                        log.warn("upkeep: {name} could not be refreshed: {error}", name=account.name,
                                 error=str(e))
                        self._count_refresh(account, False)
                        continue
                    if refreshed is not account:
                        self.directory.updated(refreshed)
                        self._count_refresh(account, True)
            self.directory.refresh()
        except Exception:
            log.failure("account upkeep failed")

    def stopService(self):
        """Stop the timer; the Deferred fires once a check in flight has finished. Stopping a
        service that never started (the daemon stopped before the shared state connected) is a
        no-op."""
        if not self.running:
            return defer.succeed(None)
        return super().stopService()

    def _count_refresh(self, account, ok: bool) -> None:
        if self.observability is not None:
            self.observability.refresh(account.name, ok)
