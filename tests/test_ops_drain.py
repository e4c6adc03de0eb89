"""Graceful drain: requests in flight are waited for, up to the drain timeout."""

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.web import resource, server

from clproxy.daemon.drain import Drainer


def test_nothing_in_flight_drains_at_once():
    """With no request in flight, drain fires immediately with 0 cut."""
    drainer = Drainer(task.Clock(), timeout=30)
    d = drainer.drain()
    assert d.called and d.result == 0 and drainer.draining


def test_drain_waits_for_the_last_request():
    """drain fires when the last tracked request ends, and cancels its timer."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=30)
    first, second = defer.Deferred(), defer.Deferred()
    drainer.track(first)
    drainer.track(second)
    assert drainer.in_flight() == 2
    d = drainer.drain()
    clock.advance(10)
    first.callback(None)
    assert not d.called and drainer.in_flight() == 1
    second.callback(None)
    assert d.result == 0 and drainer.in_flight() == 0
    assert clock.getDelayedCalls() == []


def test_drain_timeout_cuts_and_says_how_many(logs):
    """At the timeout drain fires with the number of requests still in flight, and logs it."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=30)
    stuck = defer.Deferred()
    drainer.track(stuck)
    d = drainer.drain()
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    assert d.result == 1
    assert any("drain timeout after 30s: 1 request(s) still in flight were cut" in line for line in logs)
    stuck.callback(None)  # ending afterwards is harmless
    assert drainer.in_flight() == 0


def test_a_client_disconnect_ends_a_request():
    """notifyFinish errbacks on a disconnect: that ends the request and no error is left unhandled."""
    clock = task.Clock()
    drainer = Drainer(clock, timeout=5)
    finished = defer.Deferred()
    drainer.track(finished)
    d = drainer.drain()
    finished.errback(ConnectionError("client went away"))
    assert d.result == 0
    assert finished.result is None  # consumed


class SlowResource(resource.Resource):
    """Answers after ``delay`` seconds of the real reactor."""

    isLeaf = True

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def render_GET(self, request):
        def finish():
            request.write(b"done")
            request.finish()
        reactor.callLater(self.delay, finish)
        return server.NOT_DONE_YET


class DrainingSite(server.Site):
    """The wiring asked of web.ProxySite: every request is tracked as it is routed."""

    def __init__(self, root, drainer):
        super().__init__(root)
        self.drainer = drainer

    def getResourceFor(self, request):
        self.drainer.track(request.notifyFinish())
        return super().getResourceFor(request)


@pytest_twisted.ensureDeferred
async def test_stop_listening_then_drain_lets_a_request_finish():
    """Stopping the port and draining lets a request in flight complete with its full body."""
    drainer = Drainer(reactor, timeout=10)
    port = reactor.listenTCP(0, DrainingSite(SlowResource(0.3), drainer), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/"
    response_d = treq.get(url, persistent=False)
    for _ in range(500):  # at most 5 s for the request to arrive
        if drainer.in_flight():
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert drainer.in_flight() == 1
    await port.stopListening()
    cut = await drainer.drain()
    response = await response_d
    assert cut == 0 and response.code == 200 and await response.content() == b"done"
