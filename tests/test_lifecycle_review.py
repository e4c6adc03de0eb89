"""The daemon's lifecycle as users meet it: stopping (drain bound, a second signal, requests that
arrive while draining), starting (a port in use, two starts at once)."""

import json

import pytest_twisted
from twisted.internet import defer, reactor, task

from clproxy import config as configuration
from clproxy.daemon.assemble import build_proxy, serve
from clproxy.daemon.drain import Drainer

CONFIG = {"accounts": {"anthropic": [{"name": "a", "apiKey": "key-a", "baseUrl": "http://127.0.0.1:9"}]},
          "server": {"drainTimeout": 30}}


def proxy_on(tmp_path, clock, config=CONFIG):
    """A whole daemon (not started) on ``clock``, listening on a free loopback port once started."""
    path = tmp_path / "proxy-config.json"
    path.write_text(json.dumps(config))
    cfg = configuration.parse_config(json.dumps(config), str(path), environ={}).config
    proxy = build_proxy(cfg, clock=clock, reactor=reactor, environ={}, home=str(tmp_path / "home"),
                        config_path=str(path))
    return serve(proxy, "tcp:0:interface=127.0.0.1", reactor)


def test_a_drain_that_gave_up_is_not_waited_for_again():
    """Every service that waits for the drain at stop shares its one deadline: a wait begun after
    the deadline fires at once instead of starting a second full timeout."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=30)
    drainer.track(defer.Deferred())  # a stream that never ends
    first = drainer.drain()
    clock.advance(20)
    second = drainer.drain()  # a later waiter: only the 10 s left
    clock.advance(10)
    assert first.result == 1 and second.result == 1
    third = drainer.drain()
    assert third.called and third.result == 1
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_daemon_stops_within_one_drain_timeout_with_a_stream_stuck(tmp_path):
    """A request that never ends holds the stop for server.drainTimeout, once: the usage ledger
    and the proxy's close each waited a whole timeout, so a stop took twice the bound (60 s by
    default: past systemd's TimeoutStopSec=45 and the supervisor's kill of a draining worker)."""
    clock = task.Clock()
    top = proxy_on(tmp_path, clock)
    top.startService()
    top.drainer.track(defer.Deferred())  # a stream whose upstream stalls
    stopped = defer.ensureDeferred(_stop(top))
    await _turns()
    clock.advance(30)
    await _turns()
    assert stopped.called, "still stopping one drain timeout after the stop"
    await stopped


async def _stop(top) -> None:
    await top.stopService()


async def _turns(count: int = 5) -> None:
    """Let the real reactor run ``count`` turns (the listener closes, the store's calls return)."""
    for _ in range(count):
        d = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        await d
