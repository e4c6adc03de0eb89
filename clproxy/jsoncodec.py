"""JSON for the hot paths: orjson when it is installed (the ``fast`` extra), else the standard ``json``.

Chosen once, at import. Debian does not package orjson, so the .deb runs on the standard parser;
benchmarks/json_cost.py measures what that costs on a realistic request body. Both backends take
and give the same values: ``loads`` accepts bytes or text, ``dumps`` returns compact UTF-8 bytes.
"""

import json
from typing import Any, Callable, Optional

try:
    import orjson
except ImportError:  # Debian, or a pip install without the ``fast`` extra
    orjson = None  # type: ignore[assignment]

#: "orjson" or "json": which backend this process uses (reported by the benchmark and tests).
BACKEND = "orjson" if orjson is not None else "json"

#: What ``loads`` raises on malformed input (both backends' errors are ValueErrors, as are the
#: UnicodeDecodeErrors the standard parser raises on bytes that are not UTF-8).
JSONDecodeError = ValueError


def _std_dumps(value: Any, default: Optional[Callable[[Any], Any]], newline: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=default)
    return text.encode("utf-8") + (b"\n" if newline else b"")


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
