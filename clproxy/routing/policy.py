"""What an upstream answer means for the account that got it: the verdict and its cooldown.

Pure functions of (status, headers, body, now, backoff level): no reactor, no I/O, no clock.
The pool applies the verdicts; dispatch acts on ``Verdict.action``.
"""

import email.utils
import json
import math
import re
from datetime import timezone
from typing import Any, Dict, Mapping, Optional

import attr

from clproxy.jsoncodec import object_reader

# What dispatch does next.
SUCCESS = "success"     # relay the answer; the account's backoff level goes back to 0
REFRESH = "refresh"     # OAuth 401: refresh the token and retry; no cooldown (see ``unrefreshable``)
COOL = "cool-and-next"  # cool the account for ``cooldown`` seconds, try the next account
NEXT = "next"           # transient: no cooldown, try the next account at once
RETURN = "return"       # the client's answer: relay it as is, no retry, no cooldown
DISABLE = "disable"     # the account can never serve again: take it out of the pool, try the next

ACTIONS = (SUCCESS, REFRESH, COOL, NEXT, RETURN, DISABLE)

# Why (``Verdict.reason``).
OK = "ok"
RATE_LIMITED = "rate-limited"
WINDOW_REJECTED = "window-rejected"
AUTH = "auth"
BILLING = "billing"
PERMISSION = "permission"
NOT_FOUND = "not-found"
CLIENT_ERROR = "client-error"
TRANSIENT = "transient"
OVERLOADED = "overloaded"
NETWORK = "network"
ORGANIZATION_DISABLED = "organization-disabled"
OAUTH_NOT_ALLOWED = "oauth-not-allowed"

#: What a DISABLE verdict's reason means, in words for ``/status`` and ``clproxy auth list``.
DISABLE_REASONS = {
    ORGANIZATION_DISABLED: "the organization is disabled",
    OAUTH_NOT_ALLOWED: "OAuth authentication is not allowed for the organization",
}

#: Cooldown after a 429 is capped here (seconds).
BACKOFF_CAP = 600.0
#: Base of the 429 backoff when Retry-After is absent, invalid or zero.
DEFAULT_RETRY_AFTER = 1.0
#: Cooldown after 401 (API key, or OAuth when refresh is not possible), 402 and 403.
AUTH_COOLDOWN = 300.0
#: A rejected subscription window cools the account until its reset, but no longer than this...
WINDOW_COOLDOWN_CAP = 24 * 3600.0
#: ...and no shorter than this (a reset already in the past still means "not now").
WINDOW_COOLDOWN_MIN = 1.0

#: Statuses that are nobody's fault and say nothing about the account (Cloudflare 520-526 included).
TRANSIENT_STATUSES = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524, 525, 526, 529})

#: The longest error detail kept in a verdict (it ends up in logs and /status).
_DETAIL_LIMIT = 200
#: 2 ** this already exceeds any cap; clamping keeps float arithmetic finite for huge levels.
_MAX_EXPONENT = 64

_NUMERIC_RETRY_AFTER = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")
# Used on a body prefix that is JSON-looking but cut short, so json.loads cannot help.
_ERROR_TYPE = re.compile(rb'"error"\s*:\s*\{\s*"type"\s*:\s*"([^"\\]{1,100})"')
_ERROR_MESSAGE = re.compile(rb'"message"\s*:\s*"((?:[^"\\]|\\.){0,400})')
# Upstream messages that no cooldown will ever fix ("This organization has been disabled.",
# "OAuth authentication is currently not allowed for this organization."): matched loosely (case,
# wording around the key phrase) because the exact text is Anthropic's to change.
_ACCOUNT_DEAD = (
    (re.compile(r"\borgani[sz]ation (?:has been|is|was) disabled\b", re.IGNORECASE), ORGANIZATION_DISABLED),
    (re.compile(r"\boauth authentication is (?:currently )?not allowed for this organi[sz]ation\b",
                re.IGNORECASE), OAUTH_NOT_ALLOWED),
)
#: Statuses whose error message is checked against ``_ACCOUNT_DEAD``. The issue names 403; Anthropic
#: has also been seen to send "This organization has been disabled." as a 400 invalid_request_error
#: and "OAuth authentication is currently not allowed..." as a 401, where retrying (relaying the 400
#: for every request, refreshing the token after a 401) can never help either.
_ACCOUNT_DEAD_STATUSES = frozenset({400, 401, 403})

# unified-* header window infix -> key in quota_from_headers() and representative-claim value.
_UNIFIED_WINDOWS = (("5h", "five_hour"), ("7d", "seven_day"), ("7d_oi", "seven_day_oi"))
_UNIFIED = "anthropic-ratelimit-unified-"


@attr.s(frozen=True, auto_attribs=True)
class Verdict:
    """The decision about one upstream attempt.

    ``action`` is one of SUCCESS, REFRESH, COOL, NEXT, RETURN, DISABLE (the account is dead for
    good: mark it disabled with :func:`disable_reason`, no cooldown, try the next). ``status`` is the HTTP status, or
    None for a network error. ``cooldown`` is how long (seconds) to cool the account, None for none.
    ``backoff_level`` is the account's 429 backoff level *after* this verdict (0 after a success).
    ``detail`` is a short human description of the upstream error (error type and message, or the
    network failure), None when there is nothing to add; it never holds a credential.
    """

    action: str
    status: Optional[int]
    reason: str
    cooldown: Optional[float]
    backoff_level: int
    detail: Optional[str] = None

    @property
    def applied_level(self) -> int:
        """The backoff level this verdict's cooldown was computed at (before a 429 raised it)."""
        if self.reason == RATE_LIMITED:
            return max(0, self.backoff_level - 1)
        return self.backoff_level

    def describe(self, account_name: str) -> str:
        """One log line in the seed's shape: ``<- 429 account=work backoff-level=2 cooldown=4s``.

        ``backoff-level`` is the level the cooldown was computed at (``1 * 2**2 = 4s`` above), so a
        third consecutive bare 429 reads exactly as the seed's example. Verdicts other than a plain
        rate limit add ``reason=``, ``action=`` and, when known, ``detail=`` (JSON-quoted).
        """
        head = "network-error" if self.status is None else str(self.status)
        line = "<- {} account={} backoff-level={} cooldown={}".format(
            head, account_name, self.applied_level, format_seconds(self.cooldown))
        if self.reason == RATE_LIMITED and self.action == COOL:
            return line
        line += " reason={} action={}".format(self.reason, self.action)
        if self.detail:
            line += " detail=" + json.dumps(self.detail[:_DETAIL_LIMIT], ensure_ascii=False)
        return line


def format_seconds(seconds: Optional[float]) -> str:
    """``4s``, ``1.5s``, ``0.25s``, ``600s``; ``none`` for no cooldown."""
    if seconds is None:
        return "none"
    if seconds >= 10:
        return "{}s".format(int(round(seconds)))
    text = "{:.2f}".format(seconds).rstrip("0").rstrip(".")
    return text + "s"


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds from ``now`` a ``Retry-After`` value asks to wait (>= 0), or None.

    Accepts delta-seconds (fractions too: ``1.5``) and HTTP-dates (a date in the past gives 0).
    None when the header is absent, empty, negative or not understood.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _NUMERIC_RETRY_AFTER.match(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def backoff(level: int, retry_after: Optional[float], cap: float = BACKOFF_CAP) -> float:
    """The cooldown after a 429: ``base * 2**level`` capped at ``cap``.

    ``base`` is ``retry_after`` when it is a positive number of seconds, else 1 s (a Retry-After of
    0 would otherwise cool for nothing and let the account be hammered at every level).
    """
    base = retry_after if retry_after is not None and retry_after > 0 else DEFAULT_RETRY_AFTER
    exponent = min(max(0, int(level)), _MAX_EXPONENT)
    return min(float(cap), base * (2.0 ** exponent))


def classify(status: int, headers: Mapping[str, str], body: bytes, *, now: float,
             backoff_level: int, is_oauth: bool) -> Verdict:
    """Decide what an upstream answer means for the account and for the request.

    ``headers`` maps lower-cased names to str values; ``body`` may be only the first few KB of the
    response, and must already be decoded from any content-encoding. ``now`` is seconds since the
    epoch (for HTTP-date Retry-After and the unified reset); ``backoff_level`` is the account's
    current 429 level (``AccountPool.backoff_level``).
    """
    level = backoff_level
    if 200 <= status < 300:
        # A 2xx is a success whatever its headers say (allowed_warning included).
        return Verdict(SUCCESS, status, OK, None, 0)
    if status in _ACCOUNT_DEAD_STATUSES:
        dead = _account_dead_reason(body)
        if dead is not None:
            # Not a 5-minute cooldown: it would come back every 5 minutes, forever, to fail again.
            return Verdict(DISABLE, status, dead, None, level, _error_detail(body))
    if status == 429:
        return _classify_rate_limit(headers, body, now, level)
    if status == 401:
        detail = _error_detail(body)
        if is_oauth:
            # No cooldown yet: a refresh usually fixes this within milliseconds, and cooling first
            # would turn every other request in flight into a "wait 300s" lie. Dispatch cools
            # (``unrefreshable``) only when the refresh is impossible or has failed.
            return Verdict(REFRESH, status, AUTH, None, level, detail)
        return Verdict(COOL, status, AUTH, AUTH_COOLDOWN, level, detail)
    if status == 402:
        return Verdict(COOL, status, BILLING, AUTH_COOLDOWN, level, _error_detail(body))
    if status == 403:
        return Verdict(COOL, status, PERMISSION, AUTH_COOLDOWN, level, _error_detail(body))
    if status == 404:
        return Verdict(RETURN, status, NOT_FOUND, None, level, _error_detail(body))
    if status == 400:
        return _classify_400(body, level)
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        _, error_type, _ = _parse_error(body)
        overloaded = status == 529 or error_type == "overloaded_error"
        return Verdict(NEXT, status, OVERLOADED if overloaded else TRANSIENT, None, level,
                       _error_detail(body))
    if 400 <= status < 500:
        # 413, 422 and every 4xx not named above: the request itself is at fault.
        return Verdict(RETURN, status, CLIENT_ERROR, None, level, _error_detail(body))
    # 1xx/3xx or nonsense from upstream: not the client's fault, not the account's; try another.
    return Verdict(NEXT, status, TRANSIENT, None, level, _error_detail(body))


def disable_reason(verdict: Verdict) -> str:
    """The text to store as the account's disabled reason for a DISABLE verdict, e.g.
    ``the organization is disabled (upstream 403: This organization has been disabled.)``.

    Never holds a credential (only the upstream's error type and message, as ``detail``)."""
    what = DISABLE_REASONS.get(verdict.reason, verdict.reason)
    status = "network error" if verdict.status is None else str(verdict.status)
    detail = verdict.detail or ""
    message = detail.partition(": ")[2] or detail  # detail is "error_type: message"
    return "{} (upstream {}{})".format(what, status, ": " + message if message else "")


def unrefreshable(verdict: Verdict) -> Verdict:
    """The verdict for an OAuth 401 that no refresh can fix (no refresher, no refresh token, the
    refresh failed, or the refreshed token was rejected too): cool the account like an API-key 401."""
    return attr.evolve(verdict, action=COOL, cooldown=AUTH_COOLDOWN)


def classify_network_error(reason: str, *, backoff_level: int) -> Verdict:
    """A connection failure or timeout: no cooldown, try the next account at once."""
    return Verdict(NEXT, None, NETWORK, None, backoff_level,
                   (reason or "network error")[:_DETAIL_LIMIT])


#: A 2xx status whose empty body is the answer itself ("No Content", "Reset Content").
_EMPTY_BY_DESIGN = frozenset({204, 205})
#: Bodies up to this size are parsed whole to tell a JSON object; larger ones (rare: a Messages API
#: answer is a few KB) are only checked for their braces, parsing them would cost more than it finds.
FULL_PARSE_LIMIT = 4 * 1024 * 1024


def classify_unusable_answer(status: int, content_type: Optional[str], body: bytes) -> Optional[str]:
    """Why a buffered (non-streaming) 2xx answer is of no use to the client, or None when it is.

    An empty 2xx body (but a 204/205, empty by design) and a JSON 2xx whose body is not a JSON
    object are what a broken edge or an upstream cut short sends: the SDKs fail to parse them, so
    they are a transient upstream failure (try the next account, no cooldown), never a success.
    ``content_type`` is the raw header value (None when absent). The reason reads after
    "upstream HOST returned ...": ``an empty 200 answer``.
    """
    if not 200 <= status < 300 or status in _EMPTY_BY_DESIGN:
        return None
    text = (body or b"").strip()
    if not text:
        return "an empty {} answer".format(status)
    if not _is_json_type(content_type):
        return None  # not claimed to be JSON: nothing to hold it to
    if _is_json_object(text):
        return None
    return "a {} answer whose body is not a JSON object ({} bytes)".format(status, len(body))


def unusable_answer(status: int, detail: str, *, backoff_level: int) -> Verdict:
    """The verdict for an answer ``classify_unusable_answer`` rejected: no cooldown, next account."""
    return Verdict(NEXT, status, TRANSIENT, None, backoff_level, detail[:_DETAIL_LIMIT])


def _is_json_type(content_type: Optional[str]) -> bool:
    """``application/json`` or any ``+json`` type, parameters ignored."""
    if not content_type:
        return False
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or main.endswith("+json")


#: Checks that bytes are one valid JSON object without building it (msgspec, when installed):
#: a tenth of a full parse; what it cannot vouch for gets the full parse below.
_OBJECT_CHECK = object_reader()


def _is_json_object(text: bytes) -> bool:
    """Whether ``text`` is exactly one JSON object, as Python's ``json`` reads it."""
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return False
    if len(text) > FULL_PARSE_LIMIT:
        return True
    if _OBJECT_CHECK(text) is not None:
        return True
    try:
        return isinstance(json.loads(text.decode("utf-8")), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def quota_from_headers(headers: Mapping[str, str]) -> Dict[str, Any]:
    """The subscription ("unified") rate-limit headers, parsed; only keys whose header is present.

    ``{"status": str, "reset": float|None, "representative_claim": str,
    "five_hour": {"status", "reset", "utilization", "surpassed_threshold"}, "seven_day": {...},
    "seven_day_oi": {...}, "fallback_percentage": float|None,
    "overage": {"status", "reset", "disabled_reason"}}``. Resets are epoch seconds; a value that
    does not parse is None.
    """
    quota: Dict[str, Any] = {}
    status = headers.get(_UNIFIED + "status")
    if status is not None:
        quota["status"] = status.strip()
    if _UNIFIED + "reset" in headers:
        quota["reset"] = _epoch(headers[_UNIFIED + "reset"])
    claim = headers.get(_UNIFIED + "representative-claim")
    if claim is not None:
        quota["representative_claim"] = claim.strip()
    if _UNIFIED + "fallback-percentage" in headers:
        quota["fallback_percentage"] = _number(headers[_UNIFIED + "fallback-percentage"])
    for infix, name in _UNIFIED_WINDOWS:
        window = _window(headers, _UNIFIED + infix + "-",
                         status="status", reset="reset", utilization="utilization",
                         surpassed_threshold="surpassed-threshold")
        if window:
            quota[name] = window
    overage = _window(headers, _UNIFIED + "overage-",
                      status="status", reset="reset", disabled_reason="disabled-reason")
    if overage:
        quota["overage"] = overage
    return quota


def _window(headers: Mapping[str, str], prefix: str, **fields: str) -> Dict[str, Any]:
    """The fields of one unified window present in ``headers``; numbers parsed."""
    window: Dict[str, Any] = {}
    for key, suffix in fields.items():
        value = headers.get(prefix + suffix)
        if value is None:
            continue
        if key == "reset":
            window[key] = _epoch(value)
        elif key in ("utilization", "surpassed_threshold"):
            window[key] = _number(value)
        else:
            window[key] = value.strip()
    return window


def _number(value: str) -> Optional[float]:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _epoch(value: str) -> Optional[float]:
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _classify_rate_limit(headers: Mapping[str, str], body: bytes, now: float,
                         level: int) -> Verdict:
    detail = _error_detail(body)
    reset = _rejected_window_reset(quota_from_headers(headers))
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    if reset is not None:
        # The subscription window is spent: retrying before its reset is pointless, and the
        # backoff level is about short bursts, so it stays where it is.
        until = reset - now
        if until <= 0 and retry_after is not None:
            # a reset already past (our clock and Anthropic's apart, a stale header) says nothing
            # of when it reopens: the upstream's own Retry-After does (it was 1 s, and told so)
            until = retry_after
        cooldown = min(WINDOW_COOLDOWN_CAP, max(WINDOW_COOLDOWN_MIN, until))
        return Verdict(COOL, 429, WINDOW_REJECTED, cooldown, level, detail)
    return Verdict(COOL, 429, RATE_LIMITED, backoff(level, retry_after), level + 1, detail)


def _rejected_window_reset(quota: Mapping[str, Any]) -> Optional[float]:
    """The epoch second a rejected subscription window reopens, or None when none is rejected
    (or no reset time is given, in which case the ordinary backoff applies)."""
    windows = {name: quota[name] for _, name in _UNIFIED_WINDOWS if name in quota}
    rejected = {name: w for name, w in windows.items() if w.get("status") == "rejected"}
    claim = quota.get("representative_claim")
    representative = windows.get(claim) if claim else None
    if quota.get("status") == "rejected":
        candidates = [quota.get("reset")]
        if representative is not None:
            candidates.append(representative.get("reset"))
        candidates.append(_latest(w.get("reset") for w in rejected.values()))
    elif representative is not None:
        if representative.get("status") != "rejected":
            return None
        candidates = [representative.get("reset"), quota.get("reset")]
    elif not claim and rejected:
        # No representative named: every rejected window must reopen before the account can serve.
        candidates = [_latest(w.get("reset") for w in rejected.values()), quota.get("reset")]
    else:
        return None
    for reset in candidates:
        if reset is not None:
            return reset
    return None


def _latest(resets) -> Optional[float]:
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _classify_400(body: bytes, level: int) -> Verdict:
    is_json, error_type, _ = _parse_error(body)
    detail = _error_detail(body)
    if not is_json:
        # An HTML page (Cloudflare) or nothing: the edge failed, not the request.
        return Verdict(NEXT, 400, TRANSIENT, None, level, detail or "non-JSON body")
    if error_type == "overloaded_error":
        return Verdict(NEXT, 400, OVERLOADED, None, level, detail)
    if error_type == "api_error":
        return Verdict(NEXT, 400, TRANSIENT, None, level, detail)
    return Verdict(RETURN, 400, CLIENT_ERROR, None, level, detail)


def _parse_error(body: bytes):
    """``(is_json, error_type, message)`` of an Anthropic error body, which may be cut short."""
    text = (body or b"").lstrip()
    if not text.startswith(b"{"):
        return False, None, None
    try:
        document = json.loads(text.decode("utf-8", "replace"))
    except ValueError:
        # A prefix of a JSON document: find what we can.
        match = _ERROR_TYPE.search(text)
        message = _ERROR_MESSAGE.search(text)
        return (True, match.group(1).decode("utf-8", "replace") if match else None,
                message.group(1).decode("utf-8", "replace") if message else None)
    if not isinstance(document, dict):
        return True, None, None
    error = document.get("error")
    if isinstance(error, dict):
        error_type, message = error.get("type"), error.get("message")
        return (True, error_type if isinstance(error_type, str) else None,
                message if isinstance(message, str) else None)
    return True, None, None


def _account_dead_reason(body: bytes) -> Optional[str]:
    """ORGANIZATION_DISABLED or OAUTH_NOT_ALLOWED when the error message says so, else None."""
    _, _, message = _parse_error(body)
    if not message:
        return None
    for pattern, reason in _ACCOUNT_DEAD:
        if pattern.search(message):
            return reason
    return None


def _error_detail(body: bytes) -> Optional[str]:
    is_json, error_type, message = _parse_error(body)
    if not is_json:
        return None
    parts = [p for p in (error_type, message) if p]
    return ": ".join(parts)[:_DETAIL_LIMIT] if parts else None
