"""The quota rule for new sessions (clproxy.routing.headroom): switch-at, unknown quota, statuses,
drain-soonest, organization groups, and the /status view. Pure: snapshots are the dicts QuotaBook
stores (built here from real headers with policy.quota_from_headers), time is a task.Clock."""

import itertools
import json
import os
import subprocess
import sys

import pytest
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from clproxy.accounts.model import Account
from clproxy.routing import headroom, policy
from clproxy.routing.headroom import order_for_new_session, quota_view
from clproxy.routing.quota import QuotaBook

U = "anthropic-ratelimit-unified-"
NOW = 1_800_000_000.0
STRATEGIES = ("fill-first", "round-robin", "drain-soonest")


def snap(five=None, seven=None, status="allowed", five_reset=NOW + 3600, seven_reset=NOW + 86400,
         five_status=None, reset=None, oi=None):
    """A snapshot as QuotaBook stores it, parsed from unified headers (None: header absent)."""
    headers = {}
    if status is not None:
        headers[U + "status"] = status
    if reset is not None:
        headers[U + "reset"] = str(int(reset))
    if five is not None:
        headers[U + "5h-utilization"] = str(five)
        headers[U + "5h-reset"] = str(int(five_reset))
    if five_status is not None:
        headers[U + "5h-status"] = five_status
    if seven is not None:
        headers[U + "7d-utilization"] = str(seven)
        headers[U + "7d-reset"] = str(int(seven_reset))
    if oi is not None:
        headers[U + "7d_oi-utilization"] = str(oi)
        headers[U + "7d_oi-reset"] = str(int(seven_reset))
    quota = policy.quota_from_headers(headers)
    quota["updated_at"] = NOW - 10
    return quota


def order(snapshots, names="abcd", strategy="fill-first", switch_at=0.9, now=NOW, organizations=None):
    """The new-session order of accounts ``names`` (keys = names) as a string."""
    return "".join(order_for_new_session(list(names), snapshots, now=now, strategy=strategy,
                                         switch_at=switch_at, organizations=organizations))


# -- switch-at ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_below_switch_at_keeps_the_strategy_order(strategy):
    """Known accounts all below switch-at, with one 5h reset: every strategy keeps the given order
    (lower utilization is not "more headroom" to be preferred: that would move sessions around)."""
    snapshots = {"a": snap(0.5, 0.2), "b": snap(0.1, 0.1), "c": snap(0.3, 0.8)}
    assert order(snapshots, "abc", strategy) == "abc"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("five, seven, full", [
    (0.9, 0.1, True),           # exactly switch-at: full ("at or above")
    (0.899, 0.1, False),
    (0.1, 0.9, True),           # the 7d window counts as much as the 5h one
    (0.1, 0.8999, False),
    (1.01, 0.5, True),          # over 1 is seen when exhausted
    (0.95, None, True),
    (None, 0.95, True),
])
def test_switch_at_boundaries(strategy, five, seven, full):
    """An account at or above switch-at in any window goes after one below it."""
    snapshots = {"a": snap(five, seven), "b": snap(0.5, 0.5)}
    assert order(snapshots, "ab", strategy) == ("ba" if full else "ab")


def test_switch_at_is_configurable():
    """switch-at 1.0: 0.95 is still headroom; switch-at 0.5: 0.5 is full."""
    snapshots = {"a": snap(0.95, 0.1), "b": snap(0.5, 0.1)}
    assert order(snapshots, "ab", switch_at=1.0) == "ab"
    assert order(snapshots, "ab", switch_at=0.5) == "ab"  # both full: order kept
    assert order({"a": snap(0.5, 0.1), "b": snap(0.4, 0.1)}, "ab", switch_at=0.5) == "ba"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_allowed_warning_counts_as_full(strategy):
    """status allowed_warning (overall or of a window) takes no new session while another is below."""
    assert order({"a": snap(0.2, 0.2, status="allowed_warning"), "b": snap(0.5, 0.5)}, "ab", strategy) == "ba"
    assert order({"a": snap(0.2, 0.2, five_status="allowed_warning"), "b": snap(0.5, 0.5)}, "ab",
                 strategy) == "ba"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rejected_goes_last_after_full(strategy):
    """A rejected account comes after the full ones (it cannot serve until its reset)."""
    snapshots = {"a": snap(1.0, 0.2, status="rejected", reset=NOW + 600), "b": snap(0.95, 0.2),
                 "c": snap(0.2, 0.2)}
    assert order(snapshots, "abc", strategy) == "cba"


def test_unknown_status_value_is_not_headroom():
    """A status Anthropic may add (queueing_soft) is not "allowed": no new session there."""
    assert order({"a": snap(0.1, 0.1, status="queueing_soft"), "b": snap(0.5, 0.5)}, "ab") == "ba"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_full_keeps_order_and_drops_nobody(strategy):
    """When every account is full the order is the strategy's and nobody is dropped (failover)."""
    snapshots = {"a": snap(0.95, 0.1), "b": snap(0.91, 0.1), "c": snap(0.1, 0.99)}
    assert order(snapshots, "abc", strategy) == "abc"


# -- unknown quota -----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["fill-first", "round-robin"])
def test_every_mix_of_known_and_unknown(strategy):
    """Unknown is neutral: below switch-at (ahead of full ones) but never ahead of a known account
    with headroom by virtue of being unknown -- every mix of unknown/low/full over three accounts
    keeps the given order within "not full", full after."""
    kinds = {"unknown": None, "low": snap(0.3, 0.3), "full": snap(0.95, 0.3)}
    for mix in itertools.product(kinds, repeat=3):
        snapshots = {name: kinds[kind] for name, kind in zip("abc", mix)}
        not_full = "".join(n for n, k in zip("abc", mix) if k != "full")
        full = "".join(n for n, k in zip("abc", mix) if k == "full")
        assert order(snapshots, "abc", strategy) == not_full + full, mix


def test_unknown_is_never_full_and_never_infinite():
    """An unknown account after a known one with headroom stays after it; before a full one it
    stays before it."""
    assert order({"a": snap(0.5, 0.5)}, "ab") == "ab"
    assert order({"a": snap(0.5, 0.5)}, "ba") == "ba"
    assert order({"a": snap(0.95, 0.5)}, "ab") == "ba"


def test_snapshot_without_windows_or_status_is_unknown():
    """A snapshot with only a representative claim says nothing about headroom."""
    quota = policy.quota_from_headers({U + "representative-claim": "five_hour"})
    assert headroom.headroom(quota, NOW) == headroom.UNKNOWN
    assert headroom.headroom(None, NOW) == headroom.UNKNOWN and headroom.headroom({}, NOW).known is False


def test_windows_past_their_reset_are_forgotten():
    """A full 5h window whose reset has passed is over: the account has headroom again (and its
    quota is unknown when nothing else is current). Time comes from the caller's clock."""
    clock = Clock()
    clock.advance(NOW)
    snapshots = {"a": snap(0.97, None, status=None, five_reset=NOW + 60), "b": snap(0.5, 0.5)}
    assert order(snapshots, "ab", now=clock.seconds()) == "ba"
    clock.advance(60)
    assert order(snapshots, "ab", now=clock.seconds()) == "ab"
    assert headroom.headroom(snapshots["a"], clock.seconds()).known is False
    # The overall status expires with the overall reset the same way.
    warned = snap(0.1, None, status="allowed_warning", reset=NOW + 120)
    assert order({"a": warned, "b": snap(0.5, 0.5)}, "ab", now=NOW + 119) == "ba"
    assert order({"a": warned, "b": snap(0.5, 0.5)}, "ab", now=NOW + 120) == "ab"


def test_nonsense_utilization_is_ignored():
    """A utilization that does not parse (None in the snapshot) or is negative is not known."""
    quota = {"five_hour": {"utilization": None, "reset": NOW + 10}, "seven_day": {"utilization": -1}}
    assert headroom.headroom(quota, NOW).known is False


# -- drain-soonest -----------------------------------------------------------------------------

def test_drain_soonest_unknown_first_then_soonest_reset_then_full():
    """Unknown accounts first in configured order, then headroom by soonest 5h reset, then full."""
    snapshots = {
        "a": snap(0.2, 0.2, five_reset=NOW + 4000),
        "b": None,                                       # unknown
        "c": snap(0.5, 0.2, five_reset=NOW + 100),
        "d": snap(0.95, 0.2, five_reset=NOW + 10),       # full: soonest reset does not matter
        "e": snap(0.1, 0.1, five_reset=NOW + 2000),
        "f": None,                                       # unknown
    }
    assert order(snapshots, "abcdef", "drain-soonest") == "bfcead"


def test_drain_soonest_known_without_5h_reset_comes_after_known_resets():
    """Headroom known only from the 7d window (no 5h reset) ranks after accounts whose 5h reset is known."""
    snapshots = {"a": snap(None, 0.2), "b": snap(0.3, 0.2, five_reset=NOW + 9000)}
    assert order(snapshots, "ab", "drain-soonest") == "ba"


def test_drain_soonest_ties_keep_configured_order():
    """Equal resets keep the given order."""
    snapshots = {"a": snap(0.3, 0.1, five_reset=NOW + 50), "b": snap(0.1, 0.1, five_reset=NOW + 50)}
    assert order(snapshots, "ab", "drain-soonest") == "ab"
    assert order(snapshots, "ba", "drain-soonest") == "ba"


def test_drain_soonest_every_unknown_is_configured_order():
    """No quota known at all: the configured order."""
    assert order({}, "dcba", "drain-soonest") == "dcba"


def test_other_strategies_do_not_sort_by_reset():
    """fill-first and round-robin never reorder accounts with headroom by their reset."""
    snapshots = {"a": snap(0.2, 0.2, five_reset=NOW + 4000), "b": snap(0.2, 0.2, five_reset=NOW + 10)}
    assert order(snapshots, "ab", "fill-first") == "ab"
    assert order(snapshots, "ab", "round-robin") == "ab"
    assert order(snapshots, "ab", "drain-soonest") == "ba"


# -- organization groups -----------------------------------------------------------------------

def test_organization_shares_its_worst_window():
    """a and b are one organization: b's 0.95 makes a full too (a hop buys no headroom), c is alone."""
    snapshots = {"a": snap(0.2, 0.2), "b": snap(0.95, 0.2), "c": snap(0.5, 0.5)}
    orgs = {"a": "org-1", "b": "org-1"}
    assert order(snapshots, "abc", organizations=orgs) == "cab"
    assert order(snapshots, "abc") == "acb"  # without groups a has headroom


def test_organization_worst_is_per_window():
    """The group's worst 5h and worst 7d may come from different members."""
    snapshots = {"a": snap(0.85, 0.1), "b": snap(0.1, 0.92), "c": snap(0.5, 0.5)}
    orgs = {"a": "o", "b": "o"}
    assert order(snapshots, "abc", organizations=orgs) == "cab"
    rooms = headroom.group_headrooms(["a", "b"], snapshots, NOW, orgs)
    assert dict(rooms["a"].utilization) == {"five_hour": 0.85, "seven_day": 0.92}


def test_organization_member_without_snapshot_uses_the_groups():
    """An account never seen, whose organization a sibling has shown full, is full (not unknown)."""
    snapshots = {"a": snap(0.97, 0.2), "c": snap(0.5, 0.5)}
    orgs = {"a": "o", "b": "o"}
    assert order(snapshots, "bc", organizations=orgs) == "cb"
    assert order(snapshots, "bc", "drain-soonest", organizations=orgs) == "cb"


def test_organization_sibling_outside_the_candidates_still_counts():
    """A cooling sibling (not a candidate) still shows the shared window."""
    snapshots = {"cooling": snap(1.0, 0.3, status="rejected", reset=NOW + 300), "b": snap(0.1, 0.1),
                 "c": snap(0.5, 0.5)}
    orgs = {"cooling": "o", "b": "o"}
    assert order(snapshots, "bc", organizations=orgs) == "cb"


def test_organization_status_is_the_worst():
    """allowed_warning on one member makes the whole organization full."""
    snapshots = {"a": snap(0.1, 0.1), "b": snap(0.1, 0.1, status="allowed_warning"), "c": snap(0.5, 0.5)}
    assert order(snapshots, "abc", organizations={"a": "o", "b": "o", "c": None}) == "cab"


def test_drain_soonest_group_reset_is_the_fullest_members():
    """A grouped account's 5h reset for drain-soonest is the one of the member with the highest 5h use."""
    snapshots = {"a": snap(0.1, 0.1, five_reset=NOW + 5000), "b": snap(0.6, 0.1, five_reset=NOW + 50),
                 "c": snap(0.2, 0.1, five_reset=NOW + 1000)}
    assert order(snapshots, "ac", "drain-soonest") == "ca"
    assert order(snapshots, "ac", "drain-soonest", organizations={"a": "o", "b": "o"}) == "ac"


def test_unknown_organization_keeps_accounts_separate():
    """Missing or None organization: every account is its own group."""
    snapshots = {"a": snap(0.2, 0.2), "b": snap(0.95, 0.2)}
    assert order(snapshots, "ab", organizations={"a": None}) == "ab"


# -- candidates, keys, the QuotaBook -----------------------------------------------------------

def test_accounts_and_a_key_function():
    """Candidates may be Account objects (their .key) or anything with a key function."""
    a = Account(key="config:a", name="a", secret="s-a")
    b = Account(key="config:b", name="b", secret="s-b")
    snapshots = {"config:a": snap(0.95, 0.1), "config:b": snap(0.1, 0.1)}
    assert order_for_new_session([a, b], snapshots, now=NOW, strategy="fill-first") == [b, a]
    pairs = [("x", 1), ("y", 2)]
    assert order_for_new_session(pairs, {"x": snap(0.99, 0.1)}, now=NOW, strategy="fill-first",
                                 key=lambda p: p[0]) == [("y", 2), ("x", 1)]


def test_with_quotabook_snapshots(tmp_path):
    """The snapshots QuotaBook records from real response headers drive the order."""
    clock = Clock()
    clock.advance(NOW)
    book = QuotaBook(str(tmp_path / "q.json"), clock)
    book.note("a", Headers({U + "status": ["allowed"], U + "5h-utilization": ["0.93"],
                            U + "5h-reset": [str(int(NOW + 600))]}))
    book.note("b", Headers({U + "status": ["allowed"], U + "5h-utilization": ["0.40"],
                            U + "5h-reset": [str(int(NOW + 900))]}))
    assert order(book.snapshot(), "ab", now=clock.seconds()) == "ba"
    assert order(book.snapshot(), "abc", "drain-soonest", now=clock.seconds()) == "cba"


# -- /status view ------------------------------------------------------------------------------

def test_quota_view_fields():
    """quota_view shows utilization/status/reset per window, the overall status/reset and claim."""
    quota = snap(0.42, 0.91, status="allowed_warning", reset=NOW + 600, five_status="allowed", oi=0.1)
    quota["representative_claim"] = "seven_day"
    view = quota_view(quota, now=NOW)
    assert view == {
        "known": True, "status": "allowed_warning", "reset": NOW + 600, "representativeClaim": "seven_day",
        "updatedAt": NOW - 10,
        "windows": {
            "5h": {"utilization": 0.42, "status": "allowed", "reset": NOW + 3600, "expired": False},
            "7d": {"utilization": 0.91, "status": None, "reset": NOW + 86400, "expired": False},
            "7d_oi": {"utilization": 0.1, "status": None, "reset": NOW + 86400, "expired": False},
        },
    }
    json.dumps(view)  # JSON-ready
    assert "expired" not in quota_view(quota)["windows"]["5h"]
    assert quota_view(quota, now=NOW + 3600)["windows"]["5h"]["expired"] is True


def test_quota_view_of_nothing():
    """No snapshot: known false, every field present and null."""
    assert quota_view(None) == {"known": False, "status": None, "reset": None, "representativeClaim": None,
                                "updatedAt": None, "windows": {}}


def test_headroom_is_pure():
    """Importing headroom pulls in neither the global reactor nor treq."""
    code = ("import sys, clproxy.routing.headroom; "
            "bad = [m for m in ('twisted.internet.reactor', 'treq') if m in sys.modules]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_current_windows_are_the_known_5h_and_7d_ones_not_yet_over():
    """What /session, the dashboard and the status line show: 5h and 7d with a utilization and a
    reset not past; an expired window, one without a utilization and the model-scoped 7d_oi are left out."""
    from clproxy.routing.headroom import current_windows

    view = {"windows": {"5h": {"utilization": 0.5, "reset": 200.0, "expired": False},
                        "7d": {"utilization": 0.2, "reset": 50.0, "expired": True},
                        "7d_oi": {"utilization": 0.9, "reset": 900.0}}}
    assert current_windows(view) == {"5h": {"utilization": 0.5, "reset": 200.0, "expired": False}}
    assert current_windows({"windows": {"5h": {"utilization": None}}}) == {}
    assert current_windows(None) == {} and current_windows({"windows": "broken"}) == {}
