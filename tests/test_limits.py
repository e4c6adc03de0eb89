"""Model and concurrency limits (clproxy.routing.limits): excludedModels patterns and the
maxConcurrent gate with its FIFO queue, all on a task.Clock."""

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from clproxy.accounts.model import Account
from clproxy.routing.limits import (
    ConcurrencyGate, Exclusion, QueueTimeout, excluded, not_served_message, serving,
)


def account(name, excluded_models=(), max_concurrent=None):
    return Account(key=f"config:{name}", name=name, secret="sk-test", excluded_models=excluded_models,
                   max_concurrent=max_concurrent)


def results(d):
    """What a Deferred fired with so far: [] (pending), [value] or [Failure]."""
    out = []
    d.addBoth(out.append)
    return out


# --- excludedModels -------------------------------------------------------------------------------


def test_exact_pattern_matches_only_that_model():
    """A pattern without wildcards excludes only that exact model: neither a dated variant of it nor
    another model is barred, so a precise rule cannot catch too much."""
    a = account("a", ["claude-opus-4-1"])
    assert excluded(a, "claude-opus-4-1") == "claude-opus-4-1"
    assert excluded(a, "claude-opus-4-1-20250805") is None
    assert excluded(a, "claude-sonnet-4") is None


def test_wildcard_patterns():
    """Shell-style wildcards work: * spans any run of characters and ? exactly one, so "*-haiku-?"
    bars claude-3-haiku-5 but not claude-3-haiku-20240307; the rule that matched is named."""
    a = account("a", ["claude-opus-*", "*-haiku-?"])
    assert excluded(a, "claude-opus-4-1-20250805") == "claude-opus-*"
    assert excluded(a, "claude-3-haiku-5") == "*-haiku-?"
    assert excluded(a, "claude-3-haiku-20240307") is None
    assert excluded(a, "claude-sonnet-4-5") is None


def test_matching_is_case_sensitive():
    """Model patterns match case-sensitively: "claude-opus-*" bars claude-opus-4 but not
    Claude-Opus-4, as Anthropic's model names are lower case."""
    a = account("a", ["claude-opus-*"])
    assert excluded(a, "Claude-Opus-4") is None
    assert excluded(a, "claude-opus-4") == "claude-opus-*"


def test_no_patterns_excludes_nothing():
    """An account without exclusion patterns may serve every model."""
    assert excluded(account("a"), "claude-opus-4") is None


def test_serving_keeps_order_and_names_the_rules():
    """serving() keeps the accounts in their configured order and names each rule that barred one
    (account key, name, pattern); a model no rule matches leaves all three accounts and no rules."""
    a = account("a", ["claude-opus-*"])
    b = account("b")
    c = account("c", ["*opus*"])
    allowed, rules = serving([a, b, c], "claude-opus-4")
    assert allowed == (b,)
    assert rules == (Exclusion("config:a", "a", "claude-opus-*"), Exclusion("config:c", "c", "*opus*"))
    allowed, rules = serving([a, b, c], "claude-sonnet-4")
    assert allowed == (a, b, c) and rules == ()


def test_serving_none_and_the_404_message():
    """When no account may serve a model the 404 message names the model, the pattern and the account,
    and a request with no model is barred by no rule."""
    a = account("a", ["claude-opus-*"])
    allowed, rules = serving([a], "claude-opus-4")
    assert allowed == ()
    message = not_served_message("claude-opus-4", rules)
    assert "claude-opus-4" in message and '"claude-opus-*"' in message and '"a"' in message
    # a request without a model is barred by no rule
    assert serving([a], None) == ((a,), ())


# --- the concurrency gate ---------------------------------------------------------------------------


def test_cap_and_release():
    """With max_concurrent 2 a third slot is refused until one is released; a slot taken at once reports
    a wait of 0, and releasing every slot brings the count in flight back to 0."""
    gate = ConcurrencyGate(Clock())
    a = account("a", max_concurrent=2)
    s1, s2 = gate.try_acquire(a), gate.try_acquire(a)
    assert s1 is not None and s2 is not None
    assert gate.in_flight(a.key) == 2
    assert gate.try_acquire(a) is None
    s1.release()
    assert gate.in_flight(a.key) == 1
    s3 = gate.try_acquire(a)
    assert s3 is not None and s3.waited == 0
    s2.release()
    s3.release()
    assert gate.in_flight(a.key) == 0


def test_no_cap_always_gives_a_slot_and_counts_it():
    """An account without a cap hands out all 50 slots asked for, still counting them in flight (50,
    then 0 once released) so the figures stay true."""
    gate = ConcurrencyGate(Clock())
    a = account("a")
    slots = [gate.try_acquire(a) for _ in range(50)]
    assert all(s is not None for s in slots)
    assert gate.in_flight(a.key) == 50
    for s in slots:
        s.release()
    assert gate.in_flight(a.key) == 0


def test_release_twice_is_harmless():
    """Releasing a slot twice frees it only once: a stale release must not free the slot another request
    holds, which would let a capped account exceed max_concurrent 1."""
    gate = ConcurrencyGate(Clock())
    a = account("a", max_concurrent=1)
    s1 = gate.try_acquire(a)
    s1.release()
    s2 = gate.try_acquire(a)
    s1.release()  # must not free s2's slot
    assert gate.in_flight(a.key) == 1
    assert gate.try_acquire(a) is None
    s2.release()
    s2.release()
    assert gate.in_flight(a.key) == 0


def test_wait_fires_at_once_when_a_slot_is_free():
    """Waiting on accounts a and b while only a is full fires at once with b and a wait of 0, leaving
    nothing in the queue."""
    gate = ConcurrencyGate(Clock())
    a, b = account("a", max_concurrent=1), account("b", max_concurrent=1)
    held = gate.try_acquire(a)
    got = results(gate.wait_for_slot([a, b], timeout=30))
    assert len(got) == 1 and got[0][0] is b and got[0][1].waited == 0
    assert gate.queue_length() == 0
    held.release()


def test_waiters_are_served_fifo_and_report_the_wait():
    """Two waiters on a full account are served first come first served, reporting waits of 3 s and 2 s,
    and a handed-over slot stays counted so a newcomer cannot jump the queue."""
    clock = Clock()
    gate = ConcurrencyGate(clock)
    a = account("a", max_concurrent=1)
    held = gate.try_acquire(a)
    first = results(gate.wait_for_slot([a], timeout=30))
    clock.advance(1)
    second = results(gate.wait_for_slot([a], timeout=30))
    assert gate.queue_length() == 2 and first == [] and second == []
    clock.advance(2)
    held.release()
    assert len(first) == 1 and second == []
    got_account, slot = first[0]
    assert got_account is a and slot.waited == 3
    # the handed-over slot kept the count at the cap: a newcomer cannot overtake the queue
    assert gate.in_flight(a.key) == 1 and gate.try_acquire(a) is None
    slot.release()
    assert len(second) == 1 and second[0][1].waited == 2
    second[0][1].release()
    assert gate.in_flight(a.key) == 0 and gate.queue_length() == 0


def test_a_waiter_is_served_by_any_of_its_accounts():
    """A freed slot on b goes to the first waiter that can use b, overtaking an earlier waiter that only
    accepts a, which is then served when a frees."""
    gate = ConcurrencyGate(Clock())
    a, b = account("a", max_concurrent=1), account("b", max_concurrent=1)
    ha, hb = gate.try_acquire(a), gate.try_acquire(b)
    only_a = results(gate.wait_for_slot([a], timeout=30))
    either = results(gate.wait_for_slot([a, b], timeout=30))
    hb.release()  # b frees: the first waiter cannot use b, the second can
    assert only_a == [] and len(either) == 1 and either[0][0] is b
    ha.release()
    assert len(only_a) == 1 and only_a[0][0] is a


def test_timeout_errbacks_and_leaves_the_queue():
    """A waiter still waiting at 30 s (not at 29.9) fails with QueueTimeout reporting the 30 s waited,
    leaves the queue, and takes no slot and leaves no timer behind."""
    clock = Clock()
    gate = ConcurrencyGate(clock)
    a = account("a", max_concurrent=1)
    held = gate.try_acquire(a)
    got = results(gate.wait_for_slot([a], timeout=30))
    clock.advance(29.9)
    assert got == []
    clock.advance(0.1)
    assert len(got) == 1
    got[0].trap(QueueTimeout)
    assert got[0].value.waited == pytest.approx(30) and got[0].value.timeout == 30
    assert gate.queue_length() == 0
    held.release()
    assert gate.in_flight(a.key) == 0  # nobody took the slot: no leak
    assert not clock.getDelayedCalls()


def test_cancel_leaves_at_once_and_does_not_steal_a_later_slot():
    """A cancelled waiter (the client hung up) leaves the queue at once, and the next freed slot goes
    to the waiter behind it; no slot leaks and both timers are gone."""
    clock = Clock()
    gate = ConcurrencyGate(clock)
    a = account("a", max_concurrent=1)
    held = gate.try_acquire(a)
    gone_d = gate.wait_for_slot([a], timeout=30)
    gone = results(gone_d)
    later = results(gate.wait_for_slot([a], timeout=30))
    gone_d.cancel()  # the client hung up
    assert len(gone) == 1 and gone[0].check(CancelledError)
    assert gate.queue_length() == 1
    held.release()
    assert len(later) == 1 and later[0][0] is a
    later[0][1].release()
    assert gate.in_flight(a.key) == 0
    assert not clock.getDelayedCalls()  # both timers are gone


def test_served_waiter_timer_is_cancelled():
    """A waiter served before its 30 s timeout gets no late QueueTimeout when the clock moves on 60 s:
    its timer was cancelled when it was served."""
    clock = Clock()
    gate = ConcurrencyGate(clock)
    a = account("a", max_concurrent=1)
    held = gate.try_acquire(a)
    got = results(gate.wait_for_slot([a], timeout=30))
    held.release()
    assert len(got) == 1
    clock.advance(60)  # no late timeout on a served waiter
    assert not isinstance(got[0], Exception) and len(got) == 1
    got[0][1].release()


def test_many_waiters_all_served_in_order_without_leaks():
    """100 waiters on an account capped at 2 are all served in arrival order, each releasing from its
    callback, ending with an empty queue, nothing in flight and no timer left."""
    clock = Clock()
    gate = ConcurrencyGate(clock)
    a = account("a", max_concurrent=2)
    held = [gate.try_acquire(a), gate.try_acquire(a)]
    order = []
    waits = []
    for i in range(100):
        d = gate.wait_for_slot([a], timeout=1000)
        d.addCallback(lambda pair, i=i: (order.append(i), pair[1]))
        waits.append(d)
    assert gate.queue_length() == 100
    for slot in held:
        slot.release()
    # each served waiter releases at once (re-entering the gate from its callback)
    for d in waits:
        d.addCallback(lambda pair: pair[1].release())
    assert order == list(range(100))
    assert gate.queue_length() == 0 and gate.in_flight(a.key) == 0
    assert not clock.getDelayedCalls()


def test_release_inside_a_waiter_callback_passes_the_slot_on():
    """A waiter that releases its slot inside its own callback passes it straight on to the next waiter,
    keeping exactly one slot in flight at the cap of 1."""
    gate = ConcurrencyGate(Clock())
    a = account("a", max_concurrent=1)
    held = gate.try_acquire(a)
    first = gate.wait_for_slot([a], timeout=30)
    first.addCallback(lambda pair: pair[1].release())
    second = results(gate.wait_for_slot([a], timeout=30))
    held.release()
    assert len(second) == 1 and gate.in_flight(a.key) == 1
    second[0][1].release()
    assert gate.in_flight(a.key) == 0
