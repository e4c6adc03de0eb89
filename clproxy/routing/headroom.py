"""Quota-aware ordering: which account a NEW session should go to, from the accounts' quota windows.

Pure: the quota snapshots (the dicts :class:`clproxy.routing.quota.QuotaBook` keeps per account key,
as :func:`clproxy.routing.policy.quota_from_headers` parses them) and ``now`` come in, an order comes
out. No reactor, no I/O.

The rule (issue 13):

* An account whose utilization of any window (5h, 7d) is at or above ``switch_at``, or whose status is
  ``allowed_warning`` (or ``rejected``), is *full*: it goes after every account that is not. Sessions
  already bound to it are not this module's business (the affinity layer keeps them there).
* Unknown quota is neutral: an account never seen, or whose every window has reset since it was seen,
  counts as below ``switch_at`` but is never ranked as having more headroom than a known account --
  except by ``drain-soonest``, which tries it first to learn its quota.
* ``drain-soonest``: unknown accounts first (in the given order), then the accounts with headroom by
  soonest 5h reset (capacity that expires unused otherwise), then the full ones.
* Accounts of one organization share their windows: each member is judged by the group's worst
  (highest) utilization per window and worst status, so a hop between siblings buys no headroom.

The dispatcher calls :func:`order_for_new_session` on the pool's candidates (``AccountPool.candidates``,
already in strategy order) when the request starts a new session (no live binding), with the
snapshots of ``QuotaBook.latest`` for every account of the pool (siblings that are cooling still show
the shared window). ``/status`` shows :func:`quota_view` of each account's snapshot.
"""

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import attr

#: Default of ``routing.quota.switch-at``.
DEFAULT_SWITCH_AT = 0.9
#: The strategy whose ordering is quota-driven (see module docstring).
DRAIN_SOONEST = "drain-soonest"

#: The windows the rule looks at: snapshot key -> the name ``/status`` and metrics show. The weekly
#: model-scoped window (``seven_day_oi``) only limits some models, so it does not make an account
#: full for every request; it is still shown by :func:`quota_view`.
RULE_WINDOWS = (("five_hour", "5h"), ("seven_day", "7d"))
SHOWN_WINDOWS = RULE_WINDOWS + (("seven_day_oi", "7d_oi"),)

ALLOWED = "allowed"
ALLOWED_WARNING = "allowed_warning"
REJECTED = "rejected"
#: Worse statuses rank higher; statuses Anthropic may add are treated like allowed_warning (not ok,
#: not known to be rejected), so an account with a status nobody understands takes no new session.
_STATUS_RANK = {ALLOWED: 0, ALLOWED_WARNING: 1, REJECTED: 2}
_UNKNOWN_STATUS_RANK = 1

Snapshot = Mapping[str, Any]
T = TypeVar("T")


@attr.s(frozen=True, auto_attribs=True)
class Headroom:
    """What the rule knows of one account's quota (its organization's, when grouped).

    ``known`` is false when no window or status is known (never seen, or everything reset since).
    ``utilization`` maps the windows of :data:`RULE_WINDOWS` still current at ``now`` to a fraction
    (absent: not known). ``status`` is the worst current status, None when unknown.
    ``five_hour_reset`` is the epoch second the 5h window resets, None when unknown.
    """

    known: bool
    utilization: Mapping[str, float]
    status: Optional[str]
    five_hour_reset: Optional[float]

    def is_full(self, switch_at: float) -> bool:
        """At or above ``switch_at`` in any window, or a status other than ``allowed``."""
        if self.status is not None and self.status != ALLOWED:
            return True
        return any(u >= switch_at for u in self.utilization.values())

    @property
    def rejected(self) -> bool:
        """The account (or its organization) is known to be rejected right now."""
        return self.status == REJECTED


UNKNOWN = Headroom(known=False, utilization={}, status=None, five_hour_reset=None)


def headroom(snapshot: Optional[Snapshot], now: float) -> Headroom:
    """The current quota of one snapshot: windows whose reset is already past ``now`` are dropped
    (their utilization described a window that is over), as is the overall status past its reset."""
    if not snapshot:
        return UNKNOWN
    utilization: Dict[str, float] = {}
    statuses: List[str] = []
    five_hour_reset: Optional[float] = None
    for name, _shown in RULE_WINDOWS:
        window = snapshot.get(name)
        if not isinstance(window, Mapping) or _expired(window.get("reset"), now):
            continue
        value = _fraction(window.get("utilization"))
        if value is not None:
            utilization[name] = value
        if isinstance(window.get("status"), str) and window["status"]:
            statuses.append(window["status"])
        if name == "five_hour" and _number(window.get("reset")) is not None:
            five_hour_reset = float(window["reset"])
    overall = snapshot.get("status")
    if isinstance(overall, str) and overall and not _expired(snapshot.get("reset"), now):
        statuses.append(overall)
    status = _worst_status(statuses)
    if not utilization and status is None:
        return UNKNOWN
    return Headroom(known=True, utilization=utilization, status=status, five_hour_reset=five_hour_reset)


def group_headrooms(keys: Sequence[str], snapshots: Mapping[str, Optional[Snapshot]], now: float,
                    organizations: Optional[Mapping[str, Optional[str]]] = None) -> Dict[str, Headroom]:
    """The :class:`Headroom` each of ``keys`` is judged by: its own, or -- for an account whose
    organization (``organizations[key]``) is known -- the worst over every account of that
    organization that has a snapshot in ``snapshots`` (members outside ``keys`` count too: a cooling
    sibling still shows the shared window).

    Per window the highest utilization wins, the worst status wins, and the 5h reset is the one of
    the member with the highest 5h utilization (that member saw the window last, or most of it).
    """
    own = {key: headroom(snapshots.get(key), now) for key in set(keys) | set(snapshots)}
    organizations = organizations or {}
    members: Dict[str, List[Headroom]] = {}
    for key, org in organizations.items():
        if org and key in own:
            members.setdefault(org, []).append(own[key])
    merged = {org: _merge(group) for org, group in members.items()}
    result: Dict[str, Headroom] = {}
    for key in keys:
        org = organizations.get(key)
        result[key] = merged[org] if org and org in merged else own[key]
    return result


def order_for_new_session(candidates: Sequence[T], snapshots: Mapping[str, Optional[Snapshot]], *,
                          now: float, strategy: str, switch_at: float = DEFAULT_SWITCH_AT,
                          organizations: Optional[Mapping[str, Optional[str]]] = None,
                          key: Optional[Callable[[T], str]] = None) -> List[T]:
    """``candidates`` (in strategy order, e.g. ``AccountPool.candidates``) reordered for a NEW session.

    ``snapshots`` maps account key -> latest quota snapshot (or None); ``organizations`` maps account
    key -> organization id (missing or None: the account is its own group). ``key`` gives a
    candidate's account key (default: the candidate itself when it is a str, else ``.key``).

    Every strategy: accounts not full (see :meth:`Headroom.is_full`; unknown counts as not full) keep
    their order and come first; then the full ones in their order; rejected ones last.
    ``drain-soonest``: unknown first (given order), then known with headroom by soonest 5h reset
    (unknown reset after known ones; ties keep the given order), then full, then rejected.
    The result holds each candidate exactly once; nothing is dropped (a full account is still a
    failover target).
    """
    key_of = key or _default_key
    keys = [key_of(c) for c in candidates]
    rooms = group_headrooms(keys, snapshots, now, organizations)

    def rank(index: int) -> Tuple[Any, ...]:
        room = rooms[keys[index]]
        if room.rejected:
            tier = 3
        elif room.is_full(switch_at):
            tier = 2
        elif strategy == DRAIN_SOONEST and not room.known:
            tier = 0
        else:
            tier = 1
        if strategy == DRAIN_SOONEST and tier == 1:
            reset = room.five_hour_reset
            return (tier, reset is None, reset if reset is not None else 0.0, index)
        return (tier, False, 0.0, index)

    return [candidates[i] for i in sorted(range(len(candidates)), key=rank)]


def quota_view(snapshot: Optional[Snapshot], now: Optional[float] = None) -> Dict[str, Any]:
    """The quota fields ``/status`` shows for one account (JSON-ready, camelCase, never a secret).

    ``{"known": bool, "status": str|None, "reset": epoch|None, "representativeClaim": str|None,
    "updatedAt": epoch|None, "windows": {"5h": {"utilization", "status", "reset"}, "7d": {...},
    "7d_oi": {...}}}`` -- only windows present in the snapshot. With ``now``, a window whose reset
    is past also has ``"expired": true`` (its utilization describes a window that is over).
    """
    if not snapshot:
        return {"known": False, "status": None, "reset": None, "representativeClaim": None,
                "updatedAt": None, "windows": {}}
    windows: Dict[str, Dict[str, Any]] = {}
    for name, shown in SHOWN_WINDOWS:
        window = snapshot.get(name)
        if not isinstance(window, Mapping):
            continue
        view: Dict[str, Any] = {"utilization": _fraction(window.get("utilization")),
                                "status": window.get("status"), "reset": _number(window.get("reset"))}
        if now is not None:
            view["expired"] = _expired(window.get("reset"), now)
        windows[shown] = view
    return {"known": True, "status": snapshot.get("status"), "reset": _number(snapshot.get("reset")),
            "representativeClaim": snapshot.get("representative_claim"),
            "updatedAt": _number(snapshot.get("updated_at")), "windows": windows}


def current_windows(view: Any) -> Dict[str, Dict[str, Any]]:
    """The 5h and 7d windows of a :func:`quota_view` known now: with a utilization, and a reset not
    yet past (a window that is over says nothing of the new one). ``{"5h": {...}, ...}``, the
    windows as the view has them; what ``/session``, the dashboard and the status line show."""
    windows = view.get("windows") if isinstance(view, Mapping) else None
    current: Dict[str, Dict[str, Any]] = {}
    for _field, shown in RULE_WINDOWS:
        window = windows.get(shown) if isinstance(windows, Mapping) else None
        if isinstance(window, Mapping) and not window.get("expired") and percent(window.get("utilization")) is not None:
            current[shown] = dict(window)
    return current


def percent(utilization: Any) -> Optional[int]:
    """A utilization fraction as an integer percent, rounded half up as people read it (62.5% is
    63%), never below 0 (above 100 when the window is overdrawn); None when it is not a number."""
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)):
        return None
    if not math.isfinite(utilization):
        return None
    return int(max(float(utilization), 0.0) * 100 + 0.5)


def _merge(group: Sequence[Headroom]) -> Headroom:
    known = [room for room in group if room.known]
    if not known:
        return UNKNOWN
    utilization: Dict[str, float] = {}
    for room in known:
        for name, value in room.utilization.items():
            utilization[name] = max(value, utilization.get(name, value))
    status = _worst_status([room.status for room in known if room.status is not None])
    with_reset = [room for room in known if room.five_hour_reset is not None]
    reset = None
    if with_reset:
        fullest = max(with_reset, key=lambda room: room.utilization.get("five_hour", -1.0))
        reset = fullest.five_hour_reset
    return Headroom(known=True, utilization=utilization, status=status, five_hour_reset=reset)


def _worst_status(statuses: Sequence[str]) -> Optional[str]:
    if not statuses:
        return None
    return max(statuses, key=lambda s: _STATUS_RANK.get(s, _UNKNOWN_STATUS_RANK))


def _expired(reset: Any, now: float) -> bool:
    """A reset time at or before ``now``: the window it belongs to is over."""
    value = _number(reset)
    return value is not None and value <= now


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and value not in (float("inf"), float("-inf")) else None


def _fraction(value: Any) -> Optional[float]:
    """A utilization (a fraction; 1.01 is seen when exhausted) or None when absent or nonsense."""
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _default_key(candidate: Union[str, Any]) -> str:
    return candidate if isinstance(candidate, str) else candidate.key
