"""Server-sent events: an incremental parser for upstream streams and a writer for ours.

The parser follows the WHATWG event-stream rules that matter here: ``event:``/``data:`` fields,
multi-line data, comments, and CR, LF or CRLF line ends split anywhere across chunks.
"""

import json
import re
from typing import Any, List, Optional, Tuple

import attr


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Event:
    """One dispatched event: its name (``message`` when none was given) and its data text."""

    name: str
    data: str

    def json(self) -> Any:
        """The data parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.data)


class SSEParser:
    """Feed bytes as they arrive; get back the events they completed.

    ``max_event_bytes`` bounds the memory one event may take: an upstream that never ends an event
    cannot grow the buffer without limit (``EventTooLarge`` is raised instead).
    """

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024):
        #: the unfinished last line, as the chunks that brought it (joined once its end arrives: a
        #: long line sent a byte per chunk must not be re-copied whole at every chunk)
        self._held: List[bytes] = []
        self._held_size = 0
        self._name: Optional[str] = None
        self._data: List[str] = []
        self._pending = 0
        self._max = max_event_bytes
        self._last_was_cr = False
        self._at_start = True  # a byte order mark may begin the stream (WHATWG: it is skipped)

    def feed(self, chunk: bytes) -> List[Event]:
        """Parse ``chunk`` and return the events it completed, in order."""
        if not chunk:
            return []  # (and it must not forget a CR that ended the chunk before)
        if self._at_start:
            chunk = b"".join(self._held) + chunk
            self._held, self._held_size = [], 0
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._held, self._held_size = [chunk], len(chunk)  # a BOM split across chunks
                return []
            self._at_start = False
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if self._last_was_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._last_was_cr = chunk.endswith(b"\r")
        if b"\n" not in chunk and b"\r" not in chunk:
            self._held.append(chunk)
            self._held_size += len(chunk)
            if self._pending + self._held_size > self._max:
                raise EventTooLarge(self._max)
            return []
        buffer = b"".join(self._held) + chunk if self._held else chunk
        events: List[Event] = []
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if not line:
                if self._data or self._name is not None:
                    events.append(Event(self._name or "message", "\n".join(self._data)))
                self._name, self._data, self._pending = None, [], 0
                continue
            self._field(line)
        rest = buffer[start:]
        self._held, self._held_size = ([rest], len(rest)) if rest else ([], 0)
        if self._pending + self._held_size > self._max:
            raise EventTooLarge(self._max)
        return events

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # a comment (keep-alive)
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            self._data.append(text)
            self._pending += len(value) + 1
        elif name == b"event":
            self._name = text
        # "id" and "retry" do not matter to a proxy relaying Anthropic streams.


_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")


class EventTooLarge(ValueError):
    """An upstream event grew beyond the parser's bound."""

    def __init__(self, limit: int):
        super().__init__(f"an upstream SSE event exceeded {limit} bytes")


def encode_event(name: Optional[str], data: Any) -> bytes:
    """One SSE frame. ``data`` that is not a string is written as compact JSON."""
    escaped = None
    if not isinstance(data, str):
        escaped = data
        data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    lines = "".join(f"data: {part}\n" for part in data.split("\n"))
    head = f"event: {name}\n" if name else ""
    try:
        return (head + lines + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate ("\ud800" read from an escape) has no UTF-8: JSON keeps it as its escape
        # (ASCII, no line break); text given as it is cannot, and gets U+FFFD in its place
        if escaped is not None:
            return encode_event(name, json.dumps(escaped, separators=(",", ":")))
        return _SURROGATE.sub("\ufffd", head + lines + "\n").encode("utf-8")


def encode_events(events: List[Tuple[str, Any]]) -> bytes:
    """Several SSE frames joined."""
    return b"".join(encode_event(name, data) for name, data in events)


KEEPALIVE = b": keep-alive\n\n"
