"""The stream relays' idle watchdog: one shared sweeper per clock instead of a timer per stream.

Relays here get a stand-in transport whose ``stopProducing`` loses the connection at once (the
hardest case for the sweeper: a relay leaves while a sweep is aborting it), and everything runs
on a ``task.Clock``: no sleeps, the times asserted are exact.
"""

import gc
import weakref

from twisted.internet import error, task
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone

from clproxy.proxy.sse import encode_event
from clproxy.proxy.upstream import SWEEPS_PER_TIMEOUT, FirstEventFailed, StreamRelay, _IdleSweeper

FIRST = encode_event("message_start", {"type": "message_start"})
DELTA = encode_event("content_block_delta", {"type": "content_block_delta"})


class Upstream:
    """The upstream body's transport as a relay sees it: stopping it loses the connection now."""

    def __init__(self, relay: StreamRelay):
        self.relay = relay
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True
        self.relay.connectionLost(Failure(error.ConnectionLost()))


def connected(clock, idle_timeout=20.0, committed=True):
    """A relay on ``clock`` whose connection is made and, when ``committed``, whose first event
    arrived and was committed to a client (so silence from now on is "mid-stream")."""
    relay = StreamRelay(clock, idle_timeout, "upstream.test")
    relay.makeConnection(Upstream(relay))
    if committed:
        relay.dataReceived(FIRST)
        relay.commit(lambda data: None)
    return relay


def outcome_of(relay):
    """The relay's StreamOutcome reason once it ended (None while it runs or when clean)."""
    seen = []
    relay.done.addCallback(seen.append)
    return seen[0].reason if seen else None


def advance_until_lost(clock, relay, step, limit):
    """Advance ``clock`` by ``step`` until ``relay`` has lost its connection: the time it took."""
    start = clock.seconds()
    while not relay._lost:
        assert clock.seconds() - start <= limit, "never aborted"
        clock.advance(step)
    return clock.seconds() - start


def test_a_thousand_streams_share_one_timer():
    """1,000 live relays put exactly one DelayedCall on the clock (not one each), still one after
    sweeps while data flows, and none once they have all ended."""
    clock = task.Clock()
    relays = [connected(clock) for _ in range(1000)]
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(10):
        for relay in relays:
            relay.dataReceived(DELTA)
        clock.advance(5.0)
        assert len(clock.getDelayedCalls()) == 1
    assert not any(relay._lost for relay in relays)
    for relay in relays:
        relay.connectionLost(Failure(ResponseDone()))
    assert clock.getDelayedCalls() == []
    assert clock not in _IdleSweeper._by_clock  # nothing kept for a clock with no stream


def test_a_silent_stream_among_flowing_ones_is_aborted_within_the_bound():
    """Of ten streams (idle timeout 20 s), the one that stops sending at 3 s is aborted no sooner
    than 20 s and at most 20 * (1 + 1/N) s after its last data, as silent mid-stream; the nine
    that keep sending are not."""
    clock = task.Clock()
    flowing = [connected(clock) for _ in range(9)]
    silent = connected(clock)
    for _ in range(3):
        for relay in flowing + [silent]:
            relay.dataReceived(DELTA)
        clock.advance(1.0)
    last_data = clock.seconds() - 1.0
    while not silent._lost:
        assert clock.seconds() - last_data < 20 * (1 + 1 / SWEEPS_PER_TIMEOUT) + 1, "never aborted"
        for relay in flowing:
            relay.dataReceived(DELTA)
        clock.advance(0.5)
    took = clock.seconds() - last_data  # the sweep that aborted it ran in the last 0.5 s
    assert 20.0 <= took and took - 0.5 <= 20 * (1 + 1 / SWEEPS_PER_TIMEOUT)
    assert outcome_of(silent) == "upstream upstream.test went silent for 20s mid-stream"
    assert silent.transport.stopped
    assert not any(relay._lost for relay in flowing)
    assert len(clock.getDelayedCalls()) == 1  # the others are still watched


def test_the_abort_moment_with_one_timeout():
    """With a single idle timeout T the sweeps fall on it: a stream whose last data came right
    after a sweep is aborted exactly T + T/N later (the upper bound), and one silent from its
    start exactly T later (the lower bound)."""
    clock = task.Clock()
    early = connected(clock, 20.0, committed=False)
    late = connected(clock, 20.0)
    clock.advance(5.0)  # the first sweep (every 20 / 4 s)
    late.dataReceived(DELTA)  # just after it: the next sweep, at 10 s, is the first to see it
    assert advance_until_lost(clock, early, 0.25, 30.0) + 5.0 == 20.0
    assert isinstance(early.first_event.result.value, FirstEventFailed)
    assert "timed out before its first event" in str(early.first_event.result.value)
    early.first_event.addErrback(lambda failure: None)
    assert not late._lost
    advance_until_lost(clock, late, 0.25, 30.0)
    assert clock.seconds() == 5.0 + 20.0 + 5.0  # its last data at 5 s, seen by the sweep at 10 s
    assert clock.getDelayedCalls() == []


def test_the_wait_for_the_first_event_is_bounded_by_the_shorter_first_event_timeout():
    """A relay whose first event may take at most 20 s (what was left of the request's deadline)
    of a 600 s idle timeout: silent from its start, it times out before its first event 20 s later
    (the sweeps fall on the shorter timeout), not 600 s later."""
    clock = task.Clock()
    relay = StreamRelay(clock, 600.0, "upstream.test", first_event_timeout=20.0)
    relay.makeConnection(Upstream(relay))
    assert advance_until_lost(clock, relay, 0.25, 30.0) == 20.0
    assert isinstance(relay.first_event.result.value, FirstEventFailed)
    assert "timed out before its first event" in str(relay.first_event.result.value)
    relay.first_event.addErrback(lambda failure: None)
    assert clock.getDelayedCalls() == []


def test_after_its_first_event_a_stream_gets_its_whole_idle_timeout():
    """The first-event bound ends with the first event: the committed stream may then stay silent
    for its idle timeout (600 s), as any stream, and the sweeps go back to 600 / N apart."""
    clock = task.Clock()
    relay = StreamRelay(clock, 600.0, "upstream.test", first_event_timeout=20.0)
    relay.makeConnection(Upstream(relay))
    clock.advance(10.0)
    relay.dataReceived(FIRST)
    relay.commit(lambda data: None)
    clock.advance(10.0)  # the sweep that sees the first event
    clock.advance(40.0)  # twice the first-event bound of silence
    assert not relay._lost
    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() <= 600.0 / SWEEPS_PER_TIMEOUT
    took = advance_until_lost(clock, relay, 5.0, 800.0)
    assert outcome_of(relay) == "upstream upstream.test went silent for 600s mid-stream"
    assert 600.0 <= took + 40.0 <= 600.0 * (1 + 2 / SWEEPS_PER_TIMEOUT) + 5.0


def test_a_first_event_timeout_no_shorter_than_the_idle_timeout_changes_nothing():
    """A first-event bound at or above the idle timeout leaves the idle timeout in charge."""
    clock = task.Clock()
    relay = StreamRelay(clock, 20.0, "upstream.test", first_event_timeout=600.0)
    relay.makeConnection(Upstream(relay))
    assert advance_until_lost(clock, relay, 0.25, 30.0) == 20.0
    relay.first_event.addErrback(lambda failure: None)


def test_float_rounding_does_not_cost_a_sweep():
    """With a clock not at 0 and a timeout that is no round binary number (1.3 s), N sweeps of T/N
    may add up to a hair under T: the stream is still aborted on the Nth sweep after the one that
    saw its last data, not one sweep later (beyond the bound)."""
    clock = task.Clock()
    clock.advance(0.1)
    relay = connected(clock, 1.3)  # its first event arrived: the first sweep sees it
    sweeps = 0
    while not relay._lost:
        [call] = clock.getDelayedCalls()
        clock.advance(call.getTime() - clock.seconds())  # to the sweep exactly, as a reactor would
        sweeps += 1
        assert sweeps <= 1 + SWEEPS_PER_TIMEOUT, "a sweep late"
    assert sweeps == 1 + SWEEPS_PER_TIMEOUT


def test_an_ended_stream_leaves_the_sweeper():
    """A relay whose stream ended is no longer watched (nor referred to) by the sweeper; the
    last one ending cancels the timer and drops the sweeper."""
    clock = task.Clock()
    first, second = connected(clock), connected(clock)
    sweeper = _IdleSweeper._by_clock[clock]
    first.connectionLost(Failure(ResponseDone()))
    assert sweeper._relays == {second} and first._sweeper is None
    assert len(clock.getDelayedCalls()) == 1
    second.connectionLost(Failure(ResponseDone()))
    assert sweeper._relays == set() and clock.getDelayedCalls() == []
    assert clock not in _IdleSweeper._by_clock


def test_the_sweeper_keeps_no_ended_stream_alive():
    """Once its connection is lost, nothing the sweeper holds refers to a relay: it is freed by
    reference counting alone (no cycle through the sweeper waits for a full collection)."""
    clock = task.Clock()
    other = connected(clock)  # keeps the sweeper (and its timer) alive meanwhile
    relay = StreamRelay(clock, 20.0, "upstream.test")
    relay.makeConnection(object())  # a transport that does not refer back to the relay
    gone = weakref.ref(relay)
    gc.disable()
    try:
        relay.connectionLost(Failure(ResponseDone()))
        relay.first_event.addErrback(lambda failure: None)
        del relay
        assert gone() is None
    finally:
        gc.enable()
    assert len(clock.getDelayedCalls()) == 1
    other.connectionLost(Failure(ResponseDone()))


def test_an_aborted_stream_leaves_the_sweeper_and_is_not_called_silent():
    """A relay aborted for another reason (its client left) leaves the sweeper at once, so its
    outcome says why it ended, never that it went silent."""
    clock = task.Clock()
    relay = connected(clock)
    relay.abort()
    assert clock.getDelayedCalls() == []
    assert outcome_of(relay).startswith("upstream upstream.test broke off the stream")


def test_each_stream_is_judged_by_its_own_timeout():
    """Two streams silent from the start, one with a 10 s idle timeout and one with 40 s (a
    reload changed it in between): each is aborted no sooner than its own timeout and within
    the documented bound, and the sweeps slow down once only the longer one is left."""
    clock = task.Clock()
    short = connected(clock, 10.0)
    long = connected(clock, 40.0)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [10.0 / SWEEPS_PER_TIMEOUT]
    took_short = advance_until_lost(clock, short, 0.5, 20.0)
    assert 10.0 <= took_short <= 10.0 * (1 + 1 / SWEEPS_PER_TIMEOUT)
    assert not long._lost
    # the next sweep is a 40 s sweep interval away, no longer a 10 s one
    assert [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()] == [40.0 / SWEEPS_PER_TIMEOUT]
    took_long = took_short + advance_until_lost(clock, long, 0.5, 60.0)
    assert 40.0 <= took_long <= 40.0 * (1 + 2 / SWEEPS_PER_TIMEOUT)
    assert outcome_of(long) == "upstream upstream.test went silent for 40s mid-stream"
    assert clock.getDelayedCalls() == []


def test_a_shorter_timeout_brings_the_next_sweep_forward():
    """A relay with a shorter idle timeout than those watched does not wait for the pending
    (longer) sweep: the one timer is moved to its own interval."""
    clock = task.Clock()
    connected(clock, 100.0)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [25.0]
    clock.advance(1.0)
    short = connected(clock, 8.0)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [1.0 + 8.0 / SWEEPS_PER_TIMEOUT]
    assert 8.0 <= advance_until_lost(clock, short, 0.5, 20.0) <= 8.0 * (1 + 1 / SWEEPS_PER_TIMEOUT)


def test_no_idle_timeout_means_no_watchdog():
    """An idle timeout of 0 (or less) registers nothing: no sweeper, no timer, and the stream is
    never aborted for silence."""
    clock = task.Clock()
    relays = [connected(clock, 0.0), connected(clock, -1.0)]
    assert clock.getDelayedCalls() == [] and clock not in _IdleSweeper._by_clock
    assert all(relay._sweeper is None for relay in relays)
    clock.advance(10_000.0)
    assert not any(relay._lost for relay in relays)
