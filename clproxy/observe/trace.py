"""W3C trace context and the caller's session identity, read from one request's headers.

Pure: a caller's ``traceparent`` becomes the parent of the request span (a malformed one is
ignored and a new trace begins); ``x-clproxy-*`` / ``x-neurolink-*`` ids are carried along.
"""

import random
import re
from typing import Iterable, Optional, Tuple

import attr

from clproxy.observe.redact import redact_text

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: W3C: a tracestate longer than this may be dropped; so do we.
TRACESTATE_LIMIT = 512
#: Identity header values are cut to this length before they reach records and spans.
IDENTITY_LIMIT = 200

# Lower-cased header name -> the field it fills.
_IDENTITY_HEADERS = {
    b"x-clproxy-session-id": "session_id",
    b"x-neurolink-session-id": "session_id",
    b"x-clproxy-user-id": "user_id",
    b"x-neurolink-user-id": "user_id",
    b"x-clproxy-conversation-id": "conversation_id",
    b"x-neurolink-conversation-id": "conversation_id",
    b"x-claude-code-session-id": "claude_session_id",
}
_TRACE_HEADERS = {b"traceparent": "traceparent", b"tracestate": "tracestate"}
_WANTED = {**_IDENTITY_HEADERS, **_TRACE_HEADERS}
# Raw header name (any case) -> field or None. Clients send a small set of names, so one dict
# lookup per header replaces a lower() and a lookup; bounded in case a client invents names.
_NAME_CACHE = {}
_NAME_CACHE_LIMIT = 4096
_getrandbits = random.getrandbits


def new_trace_id() -> str:
    """32 lower-case hex digits, never all zero."""
    value = _getrandbits(128)
    while not value:
        value = _getrandbits(128)
    return "%032x" % value


def new_span_id() -> str:
    """16 lower-case hex digits, never all zero."""
    value = _getrandbits(64)
    while not value:
        value = _getrandbits(64)
    return "%016x" % value


def parse_traceparent(value) -> Optional[Tuple[str, str, str]]:
    """``(trace_id, parent_span_id, flags)`` of a valid ``traceparent``, None otherwise.

    Follows W3C Trace Context level 1: version ``ff`` is invalid, version ``00`` has exactly four
    fields, higher versions may append fields; all-zero ids are invalid.
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > 512:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags


def clean_tracestate(value) -> Optional[str]:
    """The ``tracestate`` to pass on, or None when it is empty, too long or not printable ASCII."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if not value or len(value) > TRACESTATE_LIMIT or not value.isprintable():
        return None
    return value


def format_traceparent(trace_id: str, span_id: str, flags: str = "01") -> bytes:
    """A version-00 ``traceparent`` header value."""
    return ("00-%s-%s-%s" % (trace_id, span_id, flags)).encode("ascii")


@attr.s(slots=True, auto_attribs=True)
class Inbound:
    """What one request's headers say about its trace and its caller."""

    trace_id: Optional[str] = None
    parent_span_id: Optional[str] = None
    flags: str = "01"
    tracestate: Optional[str] = None
    session_id: Optional[str] = None
    user_id: Optional[str] = None
    conversation_id: Optional[str] = None
    claude_session_id: Optional[str] = None

    @property
    def sampled(self) -> bool:
        """The caller's sampled flag (True when there is no caller trace)."""
        try:
            return bool(int(self.flags, 16) & 1)
        except ValueError:
            return True


def read_inbound(headers: Iterable[Tuple[bytes, bytes]]) -> Inbound:
    """Trace context and identity from raw header pairs; the first occurrence of each wins."""
    found = {}
    cache = _NAME_CACHE
    for name, value in headers:
        field = cache.get(name, False)
        if field is False:
            field = _WANTED.get(name.lower())
            if len(cache) < _NAME_CACHE_LIMIT:
                cache[name] = field
        if field is not None and field not in found:
            found[field] = value
    inbound = Inbound()
    if not found:
        return inbound
    parent = found.get("traceparent")
    if parent is not None:
        parsed = parse_traceparent(parent)
        if parsed is not None:
            inbound.trace_id, inbound.parent_span_id, inbound.flags = parsed
            state = found.get("tracestate")
            if state is not None:
                inbound.tracestate = clean_tracestate(state)
    for field in ("session_id", "user_id", "conversation_id", "claude_session_id"):
        value = found.get(field)
        if value is not None:
            text = value.decode("utf-8", "replace").strip()[:IDENTITY_LIMIT]
            if text:
                setattr(inbound, field, redact_text(text))
    return inbound
