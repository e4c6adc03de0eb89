"""``GET /session/{session_id}``: which account serves one Claude Code session, and how full its windows are.

What ``clproxy statusline`` reads. The binding is the dispatcher's session affinity (read without
refreshing it), the account's state the pool's snapshot, the windows
:func:`clproxy.routing.headroom.quota_view` of the account's latest quota snapshot: the same sources
``/status`` reads. Never a secret, never another session's id.
"""

from typing import Any, Dict, Optional

from clproxy.routing.affinity import valid_session_id
from clproxy.routing.headroom import current_windows, quota_view
from clproxy.http.site import Node, answer_json_later, not_found

class SessionNode(Node):
    """``/session``: its only children are valid session ids; anything else is an Anthropic-shaped 404."""

    def __init__(self, status):
        super().__init__()
        #: the daemon's :class:`clproxy.http.site.StatusReport` (pool, accounts, quotas, dispatcher)
        self.status = status

    def getChild(self, path, request):
        session = valid_session_id(path)
        if session is None or request.postpath:
            return not_found(request)
        return SessionResource(self.status, session)


class SessionResource(Node):
    """``GET /session/{session_id}`` for one (valid) session id."""

    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, status, session: str):
        super().__init__()
        self.status = status
        self.session = session

    def render_GET(self, request):
        return answer_json_later(request, session_document(self.status, self.session), "session")


async def session_document(status, session: str) -> Dict[str, Any]:
    """``{"session", "account": {"name", "kind", "state"} | None, "quota": {"5h": {"utilization",
    "reset"}, "7d": {...}}, "pool": {"ready", "total"}}``.

    ``account`` is None while the session has no live binding (or affinity is off, or its account
    is no longer configured). ``quota`` holds only the windows known and not yet over
    (``utilization`` a fraction, ``reset`` an epoch second or None). ``pool``: accounts in state
    ``ok`` and all accounts.
    """
    accounts = list(status.accounts())
    rows = await status.pool.snapshot(accounts)
    affinity = getattr(status.dispatcher, "affinity", None)  # read each time: a reload may replace it
    bound = await affinity.peek(session) if affinity is not None else None
    row = next((r for r in rows if r["key"] == bound), None) if bound is not None else None
    quota: Dict[str, Dict[str, Any]] = {}
    if row is not None and status.quotas is not None:
        snapshots = await status.quotas.latest([row["key"]])
        quota = _windows(snapshots.get(row["key"]), status.clock.seconds())
    return {
        "session": session,
        "account": None if row is None else {"name": row["name"], "kind": row["kind"], "state": row["state"]},
        "quota": quota,
        "pool": {"ready": sum(1 for r in rows if r["state"] == "ok"), "total": len(rows)},
    }


def _windows(snapshot: Optional[Dict[str, Any]], now: float) -> Dict[str, Dict[str, Any]]:
    return {name: {"utilization": window["utilization"], "reset": window.get("reset")}
            for name, window in current_windows(quota_view(snapshot, now)).items()}
