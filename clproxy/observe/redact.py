"""Redaction: what must never reach a log file, a body capture or an OTLP collector.

Pure functions. Secret-bearing headers and JSON keys (at any depth) lose their values; key-shaped
strings (``sk-ant-...``, OpenAI ``sk-...``, Google ``AIza...``, clproxy's ``clp_...``, ``Bearer ...``,
``Basic`` credentials) are masked anywhere, and so are the values of ``api_key=...`` pairs (a query
string, a form body, an environment line) whatever their shape, and a URL's password.
"""

import binascii
import json
import re
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

REDACTED = "[REDACTED]"

#: Header names whose values are credentials (compared lower-cased).
SENSITIVE_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie",
    "set-cookie", "x-auth-token", "x-amz-security-token",
})

# JSON keys compared with case, "-" and "_" folded away: access_token, accessToken and
# Access-Token are one key.
_SENSITIVE_KEYS = frozenset({
    "authorization", "proxyauthorization", "xapikey", "apikey", "xgoogapikey", "accesstoken",
    "refreshtoken", "idtoken", "clientsecret", "cookie", "cookies", "setcookie", "password",
    "secret", "privatekey", "sessiontoken", "bearertoken",
})

# Key shapes. Each pattern is anchored on a boundary so ordinary words ("task-ant-farm") stay.
_KEY_SHAPE_SOURCES = [
    (r"(?<![A-Za-z0-9])sk-ant-[A-Za-z0-9_\-]{6,}", "sk-ant-" + REDACTED),
    (r"(?<![A-Za-z0-9])sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_\-]{20,}", "sk-" + REDACTED),
    (r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{30,}", "AIza" + REDACTED),
    (r"(?i)\bBearer\s+[A-Za-z0-9\-._~+/]+=*", "Bearer " + REDACTED),
    # clproxy's own client keys (clproxy.team.keys: ``clp_`` + 43 url-safe characters), not its
    # request ids (``req_clp_`` + 24 hex digits, which no key is): every log row carries one
    (r"(?<![A-Za-z0-9])clp_(?![0-9a-f]{24}(?![A-Za-z0-9_\-]))[A-Za-z0-9_\-]{20,}", "clp_" + REDACTED),
]
_KEY_SHAPES = [(re.compile(source), replacement) for source, replacement in _KEY_SHAPE_SOURCES]


def _after_escape_too(source: str) -> str:
    """``source`` also matching right after a JSON escape: in text holding JSON (a tool result's
    serialised output, a cut body) a key after a newline reads ``\\nsk-ant-...``, and that "n"
    (or \\t, \\r...) must not hide it behind the boundary."""
    for boundary in (r"(?<![A-Za-z0-9])", r"\b"):
        if boundary in source:
            head, body = source.split(boundary, 1)
            return head + r"(?:" + boundary + r"|(?<=\\[nrtbf]))" + body
    return source


# Used where a backslash is present (text) and on raw bytes; the plain set keeps the common case
# (no backslash in a log row's strings) at its old cost.
_KEY_SHAPES_ESCAPED = [(re.compile(_after_escape_too(source)), replacement)
                       for source, replacement in _KEY_SHAPE_SOURCES]
#: Each shape with the literal it starts with, which is its replacement's (None: matched in any
#: case, so no literal test can rule it out).
_KEY_SHAPES_BY_START = [(pattern, replacement,
                         None if pattern.flags & re.IGNORECASE else replacement[:-len(REDACTED)])
                        for pattern, replacement in _KEY_SHAPES]
_KEY_SHAPES_ESCAPED_BY_START = [(pattern, replacement, start) for (pattern, replacement), (_, _, start)
                                in zip(_KEY_SHAPES_ESCAPED, _KEY_SHAPES_BY_START)]
_KEY_SHAPES_B = [(re.compile(p.pattern.encode("ascii"), p.flags & re.IGNORECASE), r.encode("ascii"))
                 for p, r in _KEY_SHAPES_ESCAPED]

# For text that is not parsed (raw SSE, truncated JSON): "key": "value" and its escaped form
# \"key\": \"value\" (JSON inside a JSON string, e.g. tool input).
_KEY_WORDS = (r"authorization|proxy[-_]?authorization|x[-_]?api[-_]?key|api[-_]?key|apikey|"
              r"x[-_]?goog[-_]?api[-_]?key|access[-_]?token|refresh[-_]?token|id[-_]?token|"
              r"client[-_]?secret|cookies?|set[-_]?cookie|password|secret|private[-_]?key|"
              r"session[-_]?token|bearer[-_]?token")
_KEY_ALTERNATION = r"(?:" + _KEY_WORDS + r")"
_RAW_PAIR = re.compile(
    (r'(?i)("' + _KEY_ALTERNATION + r'"\s*:\s*")(?:[^"\\]|\\.)*(")').encode("ascii"))
_RAW_ESCAPED_PAIR = re.compile(
    (r'(?i)(\\"' + _KEY_ALTERNATION + r'\\"\s*:\s*\\")(?:(?!\\").)*?(\\")').encode("ascii"))
_RAW_REPLACEMENT = rb"\g<1>" + REDACTED.encode("ascii") + rb"\g<2>"
_TEXT_PAIR = re.compile(_RAW_PAIR.pattern.decode("ascii"))
_TEXT_ESCAPED_PAIR = re.compile(_RAW_ESCAPED_PAIR.pattern.decode("ascii"))
_TEXT_REPLACEMENT = _RAW_REPLACEMENT.decode("ascii")
_TEXT_VALUE = re.compile(r'(?i)\\?"' + _KEY_ALTERNATION + r'\\?"\s*:\s*\\?"((?:[^"\\]|\\[^"])*)')

# key=value as in a query string, a form body or a log line (``?api_key=...``, ``token=...``,
# ``ANTHROPIC_API_KEY=...``), for credentials that have no shape of their own: the value, up to the
# next separator, goes. A name ending in one of the words counts (``x_key``, up to eight words
# before it, bounded so that a hostile run of words costs little); ``max_tokens`` does not. Run on
# text holding "=" only.
_QUERY_PAIR_SOURCE = (r"(?i)((?<![A-Za-z0-9_\-])(?:[A-Za-z0-9]{1,40}[-_]){0,8}(?:" + _KEY_WORDS
                      + r"|key|token)\s*=\s*)"
                      r"[^\s&\"'#;,<>\\]+")
_QUERY_PAIR = re.compile(_QUERY_PAIR_SOURCE)
_QUERY_PAIR_B = re.compile(_QUERY_PAIR_SOURCE.encode("ascii"))
_QUERY_REPLACEMENT = r"\g<1>" + REDACTED
_QUERY_REPLACEMENT_B = _QUERY_REPLACEMENT.encode("ascii")


# HTTP Basic credentials (base64 of "user:password"), in an echoed header or an error's text: masked
# when the word after "Basic" decodes to text with a colon, so that "Basic instructions" stays
_BASIC = re.compile(r"(?i)(?<![A-Za-z0-9])(basic\s+)([A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=])")
_BASIC_B = re.compile(_BASIC.pattern.encode("ascii"))

# a password in a URL's userinfo (https://user:password@host/...): the password goes, user and host stay
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]{0,20}://[^\s/?#@:]{0,200}:)[^\s/?#@]{1,400}@")
_USERINFO_B = re.compile(_USERINFO.pattern.encode("ascii"))
_USERINFO_REPLACEMENT = r"\g<1>" + REDACTED + "@"
_USERINFO_REPLACEMENT_B = _USERINFO_REPLACEMENT.encode("ascii")


def _basic_credentials(word) -> bool:
    """Whether ``word`` (str or bytes) is base64 of "user:password" (printable text with a colon:
    an ordinary word that happens to be base64 decodes to bytes that are not)."""
    try:
        decoded = binascii.a2b_base64(word if isinstance(word, bytes) else word.encode("ascii"),
                                      strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return ":" in decoded and decoded.isprintable()


def _mask_basic(match):
    """A ``_BASIC`` or ``_BASIC_B`` match with its credentials masked (in the match's own type)."""
    head, word = match.group(1, 2)
    if not _basic_credentials(word):
        return match.group(0)
    return head + (REDACTED if isinstance(head, str) else REDACTED.encode("ascii"))


_KEY_VERDICTS = {}  # key -> bool; JSON documents reuse a small set of keys
_KEY_VERDICTS_LIMIT = 8192


def is_sensitive_key(key: Any) -> bool:
    """True when a JSON key or header name names a credential."""
    verdict = _KEY_VERDICTS.get(key)
    if verdict is None:
        folded = key.lower().replace("-", "").replace("_", "") if isinstance(key, str) else ""
        # ...api_key names a credential whoever issued it: ANTHROPIC_API_KEY, openai_api_key, an
        # "anthropic-api-key" header (verdicts are cached, so the suffix test costs nothing per row)
        verdict = folded in _SENSITIVE_KEYS or folded.endswith("apikey")
        if len(_KEY_VERDICTS) < _KEY_VERDICTS_LIMIT:
            _KEY_VERDICTS[key] = verdict
    return verdict


#: short texts redaction left as they were: a log row's model, account, path, client and stop reason
#: come back on every request, and a look-up replaces the dozen tests. Only texts found clean are
#: kept (never one that held a secret); cleared when full, since every row's request id is new.
_CLEAN: Dict[str, None] = {}
_CLEAN_LIMIT = 4096
_CLEAN_LONGEST = 200


def redact_text(text: str) -> str:
    """``text`` with key-shaped strings masked, and the values of ``"api_key": "..."`` pairs of
    JSON held in the text and of ``api_key=...`` pairs (a query string) replaced (cheap when there
    is nothing to mask)."""
    if text in _CLEAN:
        return text
    redacted = _redact_text(text)
    if len(text) <= _CLEAN_LONGEST and redacted == text:
        if len(_CLEAN) >= _CLEAN_LIMIT:
            _CLEAN.clear()
        _CLEAN[text] = None
    return redacted


def _redact_text(text: str) -> str:
    if '"' in text:
        text = _TEXT_PAIR.sub(_TEXT_REPLACEMENT, text)
        text = _TEXT_ESCAPED_PAIR.sub(_TEXT_REPLACEMENT, text)
    if "=" in text:
        text = _QUERY_PAIR.sub(_QUERY_REPLACEMENT, text)
    if "@" in text and "://" in text:
        text = _USERINFO.sub(_USERINFO_REPLACEMENT, text)
    # Bearer in any case: "bEaReR x" holds neither "earer" nor "EARER" (the old quick test)
    lowered = text.lower()
    if "basic" in lowered:
        text = _BASIC.sub(_mask_basic, text)
    bearer = "bearer" in lowered
    if "sk-" not in text and "AIza" not in text and "clp_" not in text and not bearer:
        return text
    for pattern, replacement, start in (_KEY_SHAPES_ESCAPED_BY_START if "\\" in text
                                        else _KEY_SHAPES_BY_START):
        # a shape whose literal start is absent cannot match (every log row's request id holds
        # "clp_", which alone used to run all five); Bearer's case-blind shape runs when the
        # lower-cased text holds "bearer"
        if (bearer if start is None else start in text):
            text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value: sensitive keys' values replaced, every string masked."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, dict):
        # keys are strings too ({"sk-ant-...": ...} must not keep the key)
        return {(redact_text(key) if isinstance(key, str) else key):
                (REDACTED if is_sensitive_key(key) and item is not None else redact_value(item))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    # Anything else (an exception in an ``error`` field, a set, a dataclass) would be written as
    # its str() by the encoder's default, or natively by orjson, past redaction: its text, redacted
    return redact_text(str(value))


def collect_secrets(value: Any, found: Optional[Set[str]] = None) -> Set[str]:
    """The strings redaction would remove from a JSON-like value: values under sensitive keys and
    key-shaped substrings (shorter than 6 characters are ignored: too common to mask)."""
    if found is None:
        found = set()
    if isinstance(value, str):
        for pattern, _ in _KEY_SHAPES_ESCAPED:
            found.update(m.group(0) for m in pattern.finditer(value))
        if '"' in value:
            for match in _TEXT_VALUE.finditer(value):
                found.add(match.group(1))
    elif isinstance(value, dict):
        for key, item in value.items():
            if is_sensitive_key(key) and isinstance(item, str):
                found.add(item)
            collect_secrets(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            collect_secrets(item, found)
    return {s for s in found if len(s) >= 6 and s != REDACTED}


Header = Tuple[Union[bytes, str], Union[bytes, str]]


def redact_headers(headers: Iterable[Header]) -> List[Tuple[str, str]]:
    """Header pairs as text, in order: credentials replaced, other values masked for key shapes."""
    redacted = []
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if name.lower() in SENSITIVE_HEADERS or is_sensitive_key(name):
            redacted.append((name, REDACTED))
        else:
            redacted.append((name, redact_text(value)))
    return redacted


def redact_raw(data: bytes) -> bytes:
    """Bytes redacted without parsing (raw SSE, a cut JSON prefix): everything else byte-exact."""
    if not data:
        return data
    data = _RAW_PAIR.sub(_RAW_REPLACEMENT, data)
    data = _RAW_ESCAPED_PAIR.sub(_RAW_REPLACEMENT, data)
    data = _QUERY_PAIR_B.sub(_QUERY_REPLACEMENT_B, data)
    data = _USERINFO_B.sub(_USERINFO_REPLACEMENT_B, data)
    data = _BASIC_B.sub(_mask_basic, data)
    for pattern, replacement in _KEY_SHAPES_B:
        data = pattern.sub(replacement, data)
    return data


def redact_json_bytes(data: bytes) -> bytes:
    """A JSON body redacted key by key (any depth); a body that is not JSON is redacted raw."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return redact_raw(data)
    return json.dumps(redact_value(document), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")
