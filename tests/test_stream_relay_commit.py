"""A stream relay whose upstream ended before the dispatcher committed it to the client.

Between a stream's first event and its commit the dispatcher records the account's verdict,
which may wait on a Redis round trip; a short stream can end (whole, cut, or without its
message_stop) in that gap. The relay must then write everything it held on commit and fire
``done`` with the same judgement it would have made had the end come after the commit.
"""

from twisted.internet import error, task
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone

from clproxy.proxy.sse import encode_event
from clproxy.proxy.upstream import StreamRelay

START = encode_event("message_start", {"type": "message_start"})
DELTA = encode_event("content_block_delta", {"type": "content_block_delta"})
STOP = encode_event("message_stop", {"type": "message_stop"})


class Transport:
    """The upstream body's transport as a relay sees it."""

    def stopProducing(self) -> None:
        pass


def ended_before_commit(chunks, reason):
    """A relay that received ``chunks``, then lost its connection with ``reason``, uncommitted."""
    relay = StreamRelay(task.Clock(), 20.0, "upstream.test")
    relay.makeConnection(Transport())
    for chunk in chunks:
        relay.dataReceived(chunk)
    assert relay.first_event.called
    relay.connectionLost(reason)
    assert not relay.done.called  # nobody committed it yet: nothing to judge for
    return relay


def commit(relay):
    """Commit ``relay``; returns (what the client got, the StreamOutcome)."""
    written, outcome = [], []
    relay.done.addCallback(outcome.append)
    relay.commit(written.append)
    assert outcome, "done never fired for a stream that had already ended"
    return b"".join(written), outcome[0]


def test_a_whole_stream_ended_before_commit_is_written_and_complete():
    """Every byte held is written on commit and the stream counts as complete."""
    relay = ended_before_commit([START, DELTA, STOP], Failure(ResponseDone()))
    written, outcome = commit(relay)
    assert written == START + DELTA + STOP
    assert not outcome.truncated and outcome.reason is None
    assert relay.tail.endswith(STOP)  # where the final usage is read from


def test_a_stream_broken_before_commit_is_truncated():
    """A connection lost mid-stream before the commit is a truncation, with its cause."""
    relay = ended_before_commit([START, DELTA], Failure(error.ConnectionLost()))
    written, outcome = commit(relay)
    assert written == START + DELTA
    assert outcome.truncated and "broke off the stream" in outcome.reason


def test_a_clean_end_without_message_stop_before_commit_is_truncated():
    """A clean close that never sent message_stop is still a truncation."""
    relay = ended_before_commit([START, DELTA], Failure(ResponseDone()))
    written, outcome = commit(relay)
    assert written == START + DELTA
    assert outcome.truncated and "before message_stop" in outcome.reason


def test_a_relay_abandoned_after_its_end_keeps_no_failure():
    """An ended relay the dispatcher never commits keeps why it ended as text, not the Failure
    (whose traceback would keep the frames that lost it alive as long as the relay)."""
    try:
        raise error.ConnectionLost()
    except error.ConnectionLost:
        reason = Failure()
    relay = ended_before_commit([START], reason)
    assert relay._ended_before_commit.startswith("ConnectionLost")
    assert not any(isinstance(v, Failure) for v in vars(relay).values())


def test_a_stream_lost_before_its_first_event_then_committed_is_judged_by_how_it_ended():
    """Passthrough mode commits without waiting for the first event: a stream that broke off
    before sending anything is then a truncation saying so (not a clean end), and done fires."""
    relay = StreamRelay(task.Clock(), 20.0, "upstream.test")
    relay.makeConnection(Transport())
    failed = []
    relay.first_event.addErrback(failed.append)
    relay.connectionLost(Failure(error.ConnectionLost()))
    assert failed and "ConnectionLost" in str(failed[0].value)
    written, outcome = commit(relay)
    assert written == b"" and outcome.truncated and "broke off the stream" in outcome.reason


class StoppableTransport(Transport):
    """A transport that remembers being stopped (the relay aborting its upstream)."""

    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class SmallBootstrapRelay(StreamRelay):
    """A relay whose first event may hold 64 bytes at most."""

    max_bootstrap_bytes = 64


def committed_before_any_event(relay_class=StreamRelay):
    """A relay committed (as ``--passthrough`` does) before its upstream sent anything; returns
    (relay, transport, what the client got, the first events seen)."""
    relay = relay_class(task.Clock(), 20.0, "upstream.test")
    transport = StoppableTransport()
    relay.makeConnection(transport)
    written, seen = [], []
    relay.first_event.addCallbacks(seen.append, seen.append)
    relay.commit(written.append)
    return relay, transport, written, seen


def test_a_relay_committed_before_its_first_event_still_reads_it_as_it_passes():
    """Committed with nothing received: the first event, split over three reads, is relayed at
    once and also parsed (its usage is recorded from it); nothing after it is parsed."""
    relay, transport, written, seen = committed_before_any_event()
    for piece in (START[:5], START[5:-1], START[-1:] + DELTA):
        relay.dataReceived(piece)
    assert b"".join(written) == START + DELTA
    assert [event.name for event in seen] == ["message_start"]
    assert relay._parser is None and not transport.stopped


def test_an_oversized_first_event_after_commit_fails_the_first_event_only():
    """After the commit a first event over the bootstrap limit fails ``first_event`` but neither
    aborts the upstream nor stops the relaying: the client has been answered already."""
    relay, transport, written, seen = committed_before_any_event(SmallBootstrapRelay)
    relay.dataReceived(b"data: " + b"x" * 100)
    relay.dataReceived(b"\n\n" + STOP)
    assert b"".join(written) == b"data: " + b"x" * 100 + b"\n\n" + STOP
    assert len(seen) == 1 and "FirstEventFailed" in repr(seen[0])
    assert not transport.stopped


class Cuttable(Transport):
    """A transport whose stopProducing loses the connection at once, as an abort does."""

    def __init__(self):
        self.relay = None

    def stopProducing(self) -> None:
        self.relay.connectionLost(Failure(error.ConnectionLost()))


def cut_after(chunks):
    """A committed relay that received ``chunks``, then was cut by the proxy; returns (what the
    client got, the StreamOutcome)."""
    relay = StreamRelay(task.Clock(), 20.0, "upstream.test")
    transport = Cuttable()
    transport.relay = relay
    relay.makeConnection(transport)
    written, outcome = [], []
    relay.done.addCallback(outcome.append)
    relay.dataReceived(chunks[0])
    relay.commit(written.append)
    for chunk in chunks[1:]:
        relay.dataReceived(chunk)
    relay.cut("clproxy is shutting down")
    assert outcome, "done never fired for a cut stream"
    return b"".join(written), outcome[0]


def test_a_stream_cut_by_the_proxy_says_why_not_that_the_upstream_broke_off():
    """A stream the stopping daemon cuts mid-answer is truncated with the proxy's own reason (the
    client's error event), not the lost connection's "upstream ... broke off"."""
    written, outcome = cut_after([START, DELTA])
    assert written == START + DELTA
    assert outcome.truncated and outcome.reason == "clproxy is shutting down"


def test_a_stream_cut_after_its_message_stop_is_whole():
    """Cut once its message_stop had come (only the upstream's last chunk was missing), the answer
    is whole: no error event is added after it."""
    written, outcome = cut_after([START, DELTA, STOP])
    assert written == START + DELTA + STOP
    assert not outcome.truncated and outcome.reason is None
