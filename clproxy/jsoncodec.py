"""JSON for the hot paths: orjson when it is installed (the ``fast`` extra), else the standard ``json``.

Chosen once, at import. Debian does not package orjson, so the .deb runs on the standard parser;
benchmarks/json_cost.py measures what that costs on a realistic request body. Both backends take
and give the same values: ``loads`` accepts bytes or text, ``dumps`` returns compact UTF-8 bytes.

``object_reader`` reads a few top-level fields of a JSON object: with msgspec (also in the
``fast`` extra) it checks the whole document but builds only those fields' values, a fraction of
a full parse on Claude Code's 20+ KB bodies; without it, it parses in full with ``loads``.
"""

import json
from typing import Any, Callable, Optional, Tuple

try:
    import orjson
except ImportError:  # Debian, or a pip install without the ``fast`` extra
    orjson = None  # type: ignore[assignment]

try:
    import msgspec
except ImportError:  # Debian, or a pip install without the ``fast`` extra
    msgspec = None  # type: ignore[assignment]

#: "orjson" or "json": which backend this process uses (reported by the benchmark and tests).
BACKEND = "orjson" if orjson is not None else "json"

#: What ``loads`` raises on malformed input (both backends' errors are ValueErrors, as are the
#: UnicodeDecodeErrors the standard parser raises on bytes that are not UTF-8).
JSONDecodeError = ValueError


def _std_dumps(value: Any, default: Optional[Callable[[Any], Any]], newline: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=default)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (json reads one from a client's "\udc00" escape) has no UTF-8: write it
        # as the escape it came as, or a log row holding it would be dropped
        data = json.dumps(value, separators=(",", ":"), default=default).encode("ascii")
    return data + (b"\n" if newline else b"")


def std_dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON written by Python's json (the bytes a re-encoded request
    body has always had); a lone surrogate stays the escape it came as."""
    return _std_dumps(value, None, False)

if orjson is not None:
    loads = orjson.loads

    def dumps(value: Any, default: Optional[Callable[[Any], Any]] = None, newline: bool = False) -> bytes:
        """``value`` as compact UTF-8 JSON bytes, ``default`` converting what JSON cannot hold."""
        try:
            return orjson.dumps(value, default=default, option=orjson.OPT_APPEND_NEWLINE if newline else 0)
        except TypeError:  # what orjson refuses but json writes, e.g. an integer beyond 64 bits
            return _std_dumps(value, default, newline)
else:
    loads = json.loads

    def dumps(value: Any, default: Optional[Callable[[Any], Any]] = None, newline: bool = False) -> bytes:
        """``value`` as compact UTF-8 JSON bytes, ``default`` converting what JSON cannot hold."""
        return _std_dumps(value, default, newline)


def std_loads(body: bytes) -> Any:
    """``body`` parsed by Python's json as UTF-8 text (a UTF-8 byte-order mark allowed, as json
    allows it). ``json.loads`` of bytes also takes UTF-16 and UTF-32 (guessed from where the zero
    bytes are) and UTF-8-encoded surrogates, none of which a Claude or OpenAI endpoint reads; a
    request body goes upstream as it came, so those are refused here like any bytes that are not
    UTF-8. Raises ``UnicodeDecodeError`` or ``json.JSONDecodeError`` (both ValueErrors), or
    ``RecursionError``."""
    return json.loads(body.decode("utf-8-sig"))


def loads_or_none(text) -> Any:
    """``text`` (bytes or str) parsed, or None when it is not JSON (broken, not UTF-8, nested
    past json's depth). What the fast parser refuses but Python's json takes (a lone surrogate
    escape, NaN) gets json's answer. For the short documents of the hot path (a session id's
    JSON), at a tenth of json's cost; the one difference left is orjson's: an integer beyond 64
    bits comes back as a float."""
    try:
        return loads(text)
    except JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


#: What an ``object_reader`` gives: the named fields' values, in the order named.
Fields = Tuple[Any, ...]


def object_reader(*names: str) -> Callable[[bytes], Optional[Fields]]:
    """A reader of the top-level fields ``names`` of a JSON object in UTF-8 bytes.

    The reader gives the fields' values in the order named (None for a field that is absent, the
    last one for a repeated name, as ``loads`` does), or None when it cannot vouch for the bytes:
    not one valid JSON object, or something its parser does not take although Python's json does
    (msgspec and orjson refuse a lone surrogate escape, NaN, a byte-order mark). On None the
    caller parses in full, and that parse accepts the body or says what is wrong with it. So a
    reader never accepts what ``loads`` refuses, and what it declines gets the full parse.
    """
    if msgspec is None:
        return lambda body: _fields_by_parsing(body, names)
    # the struct lists only the fields wanted: msgspec checks everything else and skips it, so
    # none of the body's other objects are built
    shape = msgspec.defstruct("Fields", [(name, Any, None) for name in names])
    decode = msgspec.json.Decoder(shape).decode
    fields_of = msgspec.structs.astuple  # the struct's fields in the order named
    problems = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)

    def read(body: bytes) -> Optional[Fields]:
        try:
            if not body.isascii():
                # msgspec does not check the UTF-8 of the strings it skips; loads refuses bad UTF-8
                body.decode("utf-8")
            found = decode(body)
        except problems:
            return None
        return fields_of(found)

    return read


def _fields_by_parsing(body: bytes, names: Tuple[str, ...]) -> Optional[Fields]:
    try:
        parsed = loads(body)
    except (JSONDecodeError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return tuple(parsed.get(name) for name in names)
