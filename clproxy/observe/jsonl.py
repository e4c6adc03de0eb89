"""The JSONL log families on disk: a twisted.logger observer that buffers, a thread that writes.

The observer only appends the event to a bounded in-memory queue (no encoding, no I/O on the
reactor thread); a writer thread redacts, encodes and appends lines, writes debug body captures,
and prunes old files. A full disk or an unwritable directory costs records (counted), never serving.
"""

import collections
import errno
import gzip
import json
import os
import re
import threading
import time
from typing import Dict, List, Optional, Tuple

import attr
from twisted.logger import ILogObserver
from zope.interface import implementer

from clproxy import jsoncodec
from clproxy.proxy.sse import SSEParser
from clproxy.observe.redact import (REDACTED, collect_secrets, redact_headers, redact_json_bytes, redact_raw, redact_text,
                     redact_value)

#: The namespaces of the events this module writes, and the family (file prefix) of each.
REQUEST_NAMESPACE = "clproxy.observe.request"
ATTEMPT_NAMESPACE = "clproxy.observe.attempt"
BODY_NAMESPACE = "clproxy.observe.body"
FAMILIES = {
    REQUEST_NAMESPACE: "proxy",
    ATTEMPT_NAMESPACE: "proxy-attempts",
    BODY_NAMESPACE: "proxy-debug",
}
BODIES_DIR = "bodies"
_OWN_FILE = re.compile(r"^proxy(?:-attempts|-debug)?-\d{4}-\d{2}-\d{2}\.jsonl$")
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.\-]")

REDACTED_BYTES = REDACTED.encode("ascii")
BUFFER_FULL = "buffer-full"
WRITE_ERROR = "write-error"


def utc_day(seconds: float) -> str:
    """``YYYY-MM-DD`` of an epoch time, in UTC (the date in every log file name)."""
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


_second_cache = [None, ""]


def iso_time(seconds: float) -> str:
    """``2025-01-31T12:34:56.789Z``."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    cache = _second_cache
    if cache[0] != whole:  # records come in bursts within one second: format it once
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        cache[0] = whole
    return cache[1] + ".%03dZ" % millis


def event_fields(event: dict) -> dict:
    """The named fields of a Logger event (its ``log_*`` keys left out)."""
    return {key: value for key, value in event.items() if not key.startswith("log_")}


_PLAIN = (int, float, bool, type(None))
_SKIPPED = frozenset({"log_logger", "log_level", "log_namespace", "log_source", "log_format", "log_time",
                      "log_trace", "time"})

def _dumps_line(row: dict) -> bytes:
    return jsoncodec.dumps(row, default=str, newline=True)


def _encode_row(ts: str, fields: dict) -> bytes:
    """One JSONL line: ``ts`` first, then the named fields (not the keys Logger adds, not ``time``),
    every string redacted."""
    row = {"ts": ts}
    for key, value in fields.items():
        if key in _SKIPPED:  # the keys Logger (and RecordLogger) add, and our own ``time``
            continue
        kind = type(value)
        if kind is str:
            value = redact_text(value)
        elif kind not in _PLAIN:
            value = redact_value(value)
        row[key] = value
    return _dumps_line(row)


@implementer(ILogObserver)
class JsonlWriter:
    """Observer of the ``clproxy.observe.*`` events; writes them under ``logs_dir`` from its own thread.

    ``max_pending`` bounds the queued events and ``max_pending_bytes`` the queued body captures:
    beyond either, new events are dropped and counted (``dropped``). ``sync()`` writes what is
    queued now, in the caller's thread; the writer thread calls it every ``interval`` seconds.
    """

    def __init__(self, logs_dir: str, *, max_pending: int = 100_000,
                 max_pending_bytes: int = 64 * 1024 * 1024, interval: float = 0.2,
                 yield_every: int = 64):
        self.logs_dir = logs_dir
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.interval = interval
        self.yield_every = yield_every
        self._queue = collections.deque()
        # Body bytes queued = added (reactor thread only) - removed (writer only): no shared counter.
        self._bytes_added = 0
        self._bytes_removed = 0
        #: records lost, by reason (buffer-full, write-error)
        self.dropped: Dict[str, int] = {BUFFER_FULL: 0, WRITE_ERROR: 0}
        #: lines written, by family
        self.written: Dict[str, int] = {family: 0 for family in FAMILIES.values()}
        self.last_error: Optional[str] = None
        self._overflowing = False
        self._failing = False
        self._notes = collections.deque(maxlen=64)  # (level, message) for the reactor thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._files: Dict[Tuple[str, str], object] = {}
        self._identities: Dict[Tuple[str, str], Tuple[int, int]] = {}  # (device, inode) of each
        self._prune_request = None
        self.last_prune: Optional["PruneResult"] = None
        self._day_cache = (None, None)

    # --- the reactor side -----------------------------------------------------------------------

    def __call__(self, event: dict) -> None:
        family = FAMILIES.get(event.get("log_namespace"))
        if family is None:
            return
        queue = self._queue
        if len(queue) >= self.max_pending:
            self._overflow()
            return
        if family == "proxy-debug":
            size = len(event.get("body") or b"")
            if self._bytes_added - self._bytes_removed + size > self.max_pending_bytes:
                self._overflow()
                return
            self._bytes_added += size
        elif self._overflowing and len(queue) < self.max_pending // 2:
            self._overflowing = False
        queue.append((family, event))

    def _overflow(self) -> None:
        self.dropped[BUFFER_FULL] += 1
        if not self._overflowing:
            self._overflowing = True
            self._notes.append(("warn", "log buffer full ({} records queued): dropping log records "
                                        "until the writer catches up".format(len(self._queue))))

    @property
    def pending(self) -> int:
        """Events queued and not yet written."""
        return len(self._queue)

    @property
    def dropped_total(self) -> int:
        """Records lost for any reason."""
        return sum(self.dropped.values())

    def take_notes(self) -> List[Tuple[str, str]]:
        """Warnings (and recoveries) to log, each once; called from the reactor thread."""
        notes = []
        while self._notes:
            notes.append(self._notes.popleft())
        return notes

    def request_prune(self, now: float, retention_days: float, max_total_bytes: int) -> None:
        """Ask the writer thread to apply retention as of ``now`` (done by the next ``sync``)."""
        self._prune_request = (now, retention_days, max_total_bytes)
        self._wake.set()

    # --- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clproxy-jsonl-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, then write what is still queued and close the files."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
        self.sync()
        with self._lock:
            self._close_files()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.sync()
            except Exception as e:  # never let the thread die: logging would stop silently
                self._notes.append(("warn", "log writer error: {}: {}".format(type(e).__name__, e)))

    def sync(self) -> None:
        """Apply a requested prune and write every queued event, in the calling thread."""
        with self._lock:
            prune, self._prune_request = self._prune_request, None
            if prune is not None:
                self._close_files()  # a pruned file must not be written to through an old handle
                try:
                    self.last_prune = prune_logs(self.logs_dir, *prune)
                except OSError as e:
                    self._notes.append(("warn", "log retention failed: {}".format(e)))
            self._drain()

    def _drain(self) -> None:
        queue = self._queue
        groups: Dict[Tuple[str, str], List[bytes]] = {}
        count = 0
        for _ in range(len(queue)):  # what is queued now; later events wait for the next pass
            family, event = queue.popleft()
            count += 1
            if count % self.yield_every == 0:
                time.sleep(0)  # let the reactor thread have the GIL between batches
            try:
                moment = event.get("time")
                if moment is None:
                    moment = event.get("log_time") or time.time()
                day = self._day(moment)
                if family == "proxy-debug":
                    fields = event_fields(event)
                    fields.pop("time", None)
                    body = fields.pop("body", None) or b""
                    self._bytes_removed += len(body)
                    event = self._write_bodies(day, fields, body)
                line = _encode_row(iso_time(moment), event)
            except OSError as e:
                self._write_failed(1, e)
                continue
            except Exception as e:
                self.dropped[WRITE_ERROR] += 1
                self._notes.append(("warn", "log record dropped: {}: {}".format(type(e).__name__, e)))
                continue
            groups.setdefault((family, day), []).append(line)
        for (family, day), lines in groups.items():
            self._append(family, day, lines)

    def _day(self, moment: float) -> str:
        key = int(moment // 86400)
        cached_key, cached_day = self._day_cache
        if key != cached_key:
            cached_day = utc_day(moment)
            self._day_cache = (key, cached_day)
        return cached_day

    def _append(self, family: str, day: str, lines: List[bytes]) -> None:
        key = (family, day)
        path = os.path.join(self.logs_dir, "{}-{}.jsonl".format(family, day))
        try:
            handle = self._files.get(key)
            if handle is not None and not self._still_there(key, path):
                self._forget(key)  # deleted (the directory removed): its rows would go nowhere
                handle = None
            if handle is None:
                if len(self._files) >= 6:  # a new day: yesterday's files are done
                    self._close_files()
                handle = self._open(key, path)
                if _ends_cut(handle.fileno()):
                    # a line cut by a crash or a full disk: the next row must not be glued to it
                    handle.write(b"\n")
            handle.write(b"".join(lines))
            handle.flush()
        except OSError as e:
            self._forget(key)
            self._write_failed(len(lines), e)
            return
        self.written[family] += len(lines)
        if self._failing:
            self._failing = False
            self._notes.append(("info", "log writing to {} works again".format(self.logs_dir)))

    def _open(self, key, path: str):
        os.makedirs(self.logs_dir, mode=0o700, exist_ok=True)
        # read too: _ends_cut looks at the last byte
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        handle = self._files[key] = os.fdopen(fd, "ab")
        stat = os.fstat(fd)
        self._identities[key] = (stat.st_dev, stat.st_ino)
        return handle

    def _still_there(self, key, path: str) -> bool:
        """Whether the file open for ``key`` is still the one at ``path`` (one stat per batch)."""
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return False
        return self._identities.get(key) == (stat.st_dev, stat.st_ino)

    def _write_failed(self, count: int, error: OSError) -> None:
        self.dropped[WRITE_ERROR] += count
        self.last_error = "{}: {}".format(errno.errorcode.get(error.errno, "error"), error.strerror or error)
        if not self._failing:
            self._failing = True
            self._notes.append(("warn", "cannot write logs under {} ({}); log records are dropped and "
                                        "counted, serving goes on".format(self.logs_dir, self.last_error)))

    def _forget(self, key) -> None:
        self._identities.pop(key, None)
        handle = self._files.pop(key, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass

    def _close_files(self) -> None:
        for key in list(self._files):
            self._forget(key)

    # --- debug body captures --------------------------------------------------------------------

    def _write_bodies(self, day: str, fields: dict, body: bytes) -> dict:
        """Write one capture's files (gzip, 0600) and return the index row's fields."""
        request_id = _SAFE_ID.sub("_", str(fields.get("requestId") or "unknown"))[:100] or "unknown"
        folder = os.path.join(self.logs_dir, BODIES_DIR, day, request_id)
        phase = fields.get("phase") or "response"
        seq = fields.pop("seq", 1) or 1
        stem = phase if seq <= 1 or phase == "request" else "{}-{}".format(phase, seq)
        outputs = []
        if phase == "response" and fields.get("streamed"):
            raw, message = redact_stream(body)
            if raw is not None:
                outputs.append((stem + ".sse.gz", raw))
            else:
                fields["rawOmitted"] = ("a secret was split across events; "
                                        "only the reassembled message is kept")
            outputs.append((stem + ".json.gz", json.dumps(message, ensure_ascii=False).encode("utf-8")))
        else:
            outputs.append((stem + ".json.gz", redact_json_bytes(body) if body else b""))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        files = []
        for name, data in outputs:
            path = os.path.join(folder, name)
            write_gzip(path, data)
            files.append(os.path.relpath(path, self.logs_dir))
        headers = fields.get("headers")
        if headers is not None:
            merged: Dict[str, str] = {}
            for name, value in redact_headers(headers):
                name = name.lower()
                merged[name] = merged[name] + ", " + value if name in merged else value
            fields["headers"] = merged
        fields["bytes"] = len(body)
        fields["files"] = files
        return fields


def _ends_cut(fd: int) -> bool:
    """Whether the file open as ``fd`` is not empty and its last byte is not a line end."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def write_gzip(path: str, data: bytes) -> None:
    """Write ``data`` gzip-compressed to a new file readable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
            compressed.write(data)


def redact_stream(raw: bytes) -> Tuple[Optional[bytes], dict]:
    """A captured SSE stream made safe: ``(raw bytes redacted, reassembled message redacted)``.

    The raw bytes stay byte-exact except for the masked spans. A secret can be split across
    events (two text deltas); then no pattern sees it in the raw bytes, so the secrets found in
    the reassembled message are masked in the raw bytes too, and if one still shows after
    reassembling the redacted stream, the raw bytes are withheld (None).
    """
    message = reassemble_stream(raw)
    secrets = collect_secrets(message)
    redacted = redact_raw(raw)
    split = False
    for secret in sorted(secrets, key=len, reverse=True):
        forms = {secret.encode("utf-8"), json.dumps(secret)[1:-1].encode("utf-8")}
        # not whole in the raw bytes: split across events (or escaped otherwise). Its first piece
        # may be key-shaped on its own ("sk-ant-api03-Zq8") and masked, so the check below would
        # no longer see the secret whole while its tail stays readable: withhold the raw bytes.
        split = split or not any(form in raw for form in forms)
        for form in forms:
            redacted = redacted.replace(form, REDACTED_BYTES)
    if split:
        redacted = None
    elif secrets:
        check = json.dumps(reassemble_stream(redacted), ensure_ascii=False)
        if any(_shows(secret, check) for secret in secrets):
            redacted = None
    return redacted, redact_value(message)


def _shows(secret: str, text: str) -> bool:
    """Whether ``secret``, or a piece of it of 17 characters or more, is in ``text`` (a secret also
    written whole elsewhere can have a split copy whose masked first piece hides the rest)."""
    if len(secret) < 18:
        return secret in text
    return any(secret[start:start + 12] in text for start in range(0, len(secret) - 11, 6))


def reassemble_stream(raw: bytes) -> dict:
    """The Message a Messages API SSE stream describes, tolerant of a cut or failed stream.

    Text, thinking, signatures, citations and tool input are joined in order; what could not be
    completed is reported under ``_clproxy`` (``truncated``, ``error``, ``events``).
    """
    parser = SSEParser(max_event_bytes=max(16 * 1024 * 1024, len(raw) + 1))
    try:
        events = parser.feed(raw)
    except ValueError as e:
        return {"_clproxy": {"error": "unparsable stream: {}".format(e), "events": 0}}
    message: Optional[dict] = None
    partial: Dict[int, List[str]] = {}
    notes: Dict[str, object] = {"events": len(events), "truncated": True}
    for event in events:
        try:
            data = json.loads(event.data)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        kind = data.get("type", event.name)
        try:
            if kind == "message_start":
                message = dict(data.get("message") or {})
                message["content"] = list(message.get("content") or [])
            elif message is None:
                if kind == "error":
                    notes["error"] = data.get("error")
                continue
            elif kind == "content_block_start":
                index = data.get("index", len(message["content"]))
                while len(message["content"]) <= index:
                    message["content"].append(None)
                message["content"][index] = dict(data.get("content_block") or {})
            elif kind == "content_block_delta":
                block = message["content"][data["index"]]
                delta = data.get("delta") or {}
                dtype = delta.get("type")
                if dtype == "text_delta":
                    block["text"] = block.get("text", "") + delta.get("text", "")
                elif dtype == "thinking_delta":
                    block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
                elif dtype == "signature_delta":
                    block["signature"] = delta.get("signature")
                elif dtype == "input_json_delta":
                    partial.setdefault(data["index"], []).append(delta.get("partial_json", ""))
                elif dtype == "citations_delta":
                    block.setdefault("citations", []).append(delta.get("citation"))
            elif kind == "content_block_stop":
                _close_tool_input(message, partial, data.get("index"))
            elif kind == "message_delta":
                message.update(data.get("delta") or {})
                message["usage"] = dict(message.get("usage") or {}, **(data.get("usage") or {}))
            elif kind == "message_stop":
                notes["truncated"] = False
            elif kind == "error":
                notes["error"] = data.get("error")
        except (KeyError, IndexError, TypeError, AttributeError):
            notes.setdefault("problems", 0)
            notes["problems"] += 1
    if message is None:
        return {"_clproxy": notes}
    for index in list(partial):
        _close_tool_input(message, partial, index)
    message["_clproxy"] = notes
    return message


def _close_tool_input(message: dict, partial: Dict[int, List[str]], index) -> None:
    pieces = partial.pop(index, None)
    if pieces is None:
        return
    text = "".join(pieces)
    try:
        message["content"][index]["input"] = json.loads(text) if text else {}
    except ValueError:
        message["content"][index]["input_partial_json"] = text


# --- retention ------------------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class PruneResult:
    """What one retention pass removed and what is left."""

    deleted: int
    freed_bytes: int
    remaining_bytes: int


def prune_logs(logs_dir: str, now: float, retention_days: float, max_total_bytes: float) -> PruneResult:
    """Delete this module's files older than ``retention_days``, then the oldest until the rest
    weighs at most ``max_total_bytes``. A limit of 0 disables that limit. Other files are left alone."""
    files = []
    try:
        top = os.listdir(logs_dir)
    except FileNotFoundError:
        return PruneResult(0, 0, 0)
    for name in top:
        if _OWN_FILE.match(name):
            _stat_into(files, os.path.join(logs_dir, name))
    bodies = os.path.join(logs_dir, BODIES_DIR)
    for folder, _dirs, names in os.walk(bodies):
        for name in names:
            _stat_into(files, os.path.join(folder, name))
    deleted = freed = 0
    kept = []
    horizon = now - retention_days * 86400 if retention_days > 0 else None
    for mtime, size, path in files:
        if horizon is not None and mtime < horizon:
            if _unlink(path):
                deleted, freed = deleted + 1, freed + size
                continue
        kept.append((mtime, size, path))
    total = sum(size for _, size, _ in kept)
    if max_total_bytes > 0 and total > max_total_bytes:
        kept.sort()  # oldest first
        for _mtime, size, path in kept:
            if total <= max_total_bytes:
                break
            if _unlink(path):
                deleted, freed, total = deleted + 1, freed + size, total - size
    _remove_empty_dirs(bodies)
    return PruneResult(deleted, freed, total)


def _stat_into(files: list, path: str) -> None:
    try:
        stat = os.lstat(path)
    except OSError:
        return
    files.append((stat.st_mtime, stat.st_size, path))


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _remove_empty_dirs(top: str) -> None:
    for folder, dirs, names in os.walk(top, topdown=False):
        if folder != top and not names and not os.listdir(folder):
            try:
                os.rmdir(folder)
            except OSError:
                pass
