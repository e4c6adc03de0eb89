"""Session affinity: a conversation stays on the account that holds its prompt cache.

``session_of`` finds the session of a request (the ``x-claude-code-session-id`` header, else the
``session_id`` inside ``metadata.user_id``); ``SessionAffinity`` remembers which account each
session is bound to, through the state store (``ISessionBindings``), so every instance behind one
Redis keeps a session on one account.

Pure: no reactor (time comes from the injected clock), no I/O besides the store's Deferreds.

How the dispatcher uses it, per request::

    session = session_of(request_headers, body)
    bound = await affinity.account_for(session)     # None: no session, or no live binding
    # ... prefer ``bound`` while it is usable; else pick by the strategy ...
    # once an account ANSWERED (any non-retried response), unless the bound account only sat
    # this request out (a model it excludes, its maxConcurrent reached for a moment):
    if await affinity.bind(session, answered_key):  # True: the session moved
        ...count sessionMoves...

A binding changes only through ``bind`` with the account that answered: a session that failed
over stays on its new account and never flaps back when the first one recovers (each move
rebuilds the prompt cache). A request its account may not take, or not at once, is answered
elsewhere without a ``bind``: the account is healthy and the conversation's cache is there.
"""

import json
import re
from typing import Any, Dict, Iterable, Mapping, Optional

from clproxy import jsoncodec

#: The header Claude Code sends with its session id.
SESSION_HEADER = "x-claude-code-session-id"
#: A session id longer than this is ignored (a real one is a 36-character UUID).
MAX_SESSION_LENGTH = 200
#: A JSON ``metadata.user_id`` longer than this is not parsed (Claude Code's is ~150 characters).
MAX_USER_ID_LENGTH = 2000
#: A request body longer than this is not parsed for its session when given as bytes (the
#: dispatcher passes the parsed body when it has one; a huge body is not parsed twice).
MAX_BODY_PARSE = 32 * 1024 * 1024

# Visible ASCII only: a session id becomes part of a Redis key and of log lines.
_SESSION_RE = re.compile(r"[\x21-\x7e]{1,%d}\Z" % MAX_SESSION_LENGTH)
# The older ``metadata.user_id`` form: ``user_<hash>_account_<uuid or empty>_session_<uuid>``.
_LEGACY_RE = re.compile(r"user_[0-9A-Za-z]*_account_[0-9A-Za-z-]*_session_([\x21-\x7e]+)\Z")


def _valid(value: Any) -> Optional[str]:
    """``value`` as a session id when it is a bounded string of visible ASCII, else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _SESSION_RE.match(value) else None


#: The check every reader of a session id shares (``GET /session/{id}``, ``clproxy statusline``).
valid_session_id = _valid


def _header(headers: Any, name: str) -> Any:
    """The first value of header ``name`` in Twisted ``Headers``, a mapping (any key case, str or
    bytes keys) or a sequence of ``(name, value)`` pairs; None when absent or unreadable."""
    if headers is None:
        return None
    raw = getattr(headers, "getRawHeaders", None)
    if callable(raw):
        values = raw(name.encode("ascii"))
        return values[0] if values else None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    try:
        for key, value in pairs:
            if isinstance(key, bytes):
                key = key.decode("latin-1")
            if isinstance(key, str) and key.lower() == name:
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                return value
    except (TypeError, ValueError):
        return None
    return None


def _from_user_id(user_id: Any) -> Optional[str]:
    """The session inside a ``metadata.user_id`` string: JSON (``{"session_id": ...}``) as Claude
    Code sends it now, or the older ``user_..._account_..._session_<id>`` string."""
    if not isinstance(user_id, str) or len(user_id) > MAX_USER_ID_LENGTH:
        return None
    text = user_id.strip()
    if text.startswith("{"):
        parsed = jsoncodec.loads_or_none(text)
        return _valid(parsed.get("session_id")) if isinstance(parsed, dict) else None
    legacy = _LEGACY_RE.match(text)
    return _valid(legacy.group(1)) if legacy else None


def session_of(headers: Any, body: Any) -> Optional[str]:
    """The session of a request, or None when it has none.

    :param headers: the request's headers: Twisted ``Headers``, a mapping, or ``(name, value)``
        pairs (names and values str or bytes).
    :param body: the request body, parsed (a dict) or raw (bytes/str JSON).
    :return: the ``x-claude-code-session-id`` header; else the ``session_id`` inside
        ``metadata.user_id``; else None. Values that are not strings, longer than
        ``MAX_SESSION_LENGTH`` or hold anything but visible ASCII are ignored. Never raises on
        malformed input.
    """
    try:
        found = _valid(_header(headers, SESSION_HEADER))
        if found is not None:
            return found
        if isinstance(body, (bytes, bytearray, str)):
            if len(body) > MAX_BODY_PARSE:
                return None
            try:
                body = json.loads(body)
            except (ValueError, RecursionError):
                return None
        if not isinstance(body, dict):
            return None
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            return None
        return _from_user_id(metadata.get("user_id"))
    except Exception:  # hostile input must never fail a request: no session, route as usual
        return None


class SessionAffinity:
    """Which account each session is bound to, kept in the state store (``ISessionBindings``).

    :param store: the state store (it provides ``ISessionBindings``).
    :param clock: an ``IReactorTime`` (``task.Clock`` in tests); only ``seconds()`` is used.
    :param ttl: a binding expires this many seconds after the session's last request.
    :param max_sessions: the most bindings kept in this process's memory (LRU; the memory store
        and the Redis store's local copy are limited to it through ``limit_bindings``).
    :param enabled: False turns affinity off: no session is ever bound (``account_for`` gives
        None, ``bind`` does nothing).

    ``moves`` counts the sessions this instance moved to another account (``bind`` returned True).
    """

    def __init__(self, store, clock, ttl: float = 3600.0, max_sessions: int = 10000,
                 enabled: bool = True):
        self._store = store
        self._clock = clock
        self.ttl = float(ttl)
        self.enabled = bool(enabled)
        self.moves = 0
        store.limit_bindings(max_sessions)

    async def account_for(self, session: Optional[str]) -> Optional[str]:
        """The account key ``session`` is bound to, refreshing the binding's last use (its TTL
        starts again); None when affinity is off, the request has no session, or the session
        has no live binding."""
        if not self.enabled or session is None:
            return None
        binding = await self._store.touch_binding(session, self._clock.seconds(), self.ttl)
        return None if binding is None else binding[0]

    async def peek(self, session: Optional[str]) -> Optional[str]:
        """The account key ``session`` is bound to, without refreshing the binding (a reader such
        as the status line must not keep a session alive); None as for :meth:`account_for`."""
        if not self.enabled or session is None:
            return None
        binding = await self._store.get_binding(session, self._clock.seconds())
        return None if binding is None else binding[0]

    async def bind(self, session: Optional[str], account_key: str) -> bool:
        """Bind ``session`` to ``account_key`` (the account that answered it).

        :return: True when this moved a live binding from another account (the caller counts
            ``sessionMoves``); False for a new binding, a refresh of the same one, no session, or
            affinity off.
        """
        if not self.enabled or session is None:
            return False
        replaced = await self._store.put_binding(session, account_key, self._clock.seconds(),
                                                 self.ttl)
        moved = replaced is not None and replaced != account_key
        if moved:
            self.moves += 1
        return moved

    async def forget_account(self, key: str) -> int:
        """Drop every binding to account ``key`` (removed, disabled, credential changed): its
        sessions pick an account afresh. Returns how many were dropped."""
        return int(await self._store.drop_bindings_of(key))

    async def sessions_by_account(self, keys: Optional[Iterable[str]] = None) -> Dict[str, int]:
        """Live bound sessions per account (for ``/status``): every key in ``keys`` (0 when it
        has none), or every account with a binding when ``keys`` is None."""
        counts = await self._store.count_bindings(self._clock.seconds(),
                                                  None if keys is None else list(keys))
        return dict(counts)
