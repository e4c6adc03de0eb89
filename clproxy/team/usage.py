"""The usage ledger: one row per answered request (who, which account, which model, tokens, cost),
in an SQLite database under ``CLPROXY_HOME``, written off the reactor thread in batches.

The reactor side only appends a :class:`UsageRow` to a bounded in-memory queue (:meth:`UsageLedger.record`,
no I/O); a writer thread inserts the queued rows every ``interval`` seconds (or as soon as
``batch_rows`` are queued) in one transaction, applies retention when asked, and writes what is left
when stopped. A full queue drops rows and counts them, never waits; an unwritable database costs
rows (counted), never serving. The database is in WAL mode, so ``clproxy usage`` reads it while
the daemon writes. Nothing secret is stored: a key appears only by its name.

**Tokens for the limits** (:func:`billable_tokens`): input + output + cache writes (5-minute and
1-hour). Cache reads are left out: Claude Code re-reads its whole cached prompt on every turn, so
counting reads would spend a tokens/day budget ten times faster than the money it measures (reads
cost a tenth of input); their cost is in ``cost_usd``, which the USD limits use.
"""

import collections
import calendar
import os
import re
import sqlite3
import threading
import time
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple

import attr
from twisted.internet import task

from clproxy.team.pricing import cache_split

#: The file name of the ledger under ``CLPROXY_HOME``.
LEDGER_FILE = "usage.sqlite3"
DEFAULT_RETENTION_DAYS = 90.0
#: How often (seconds of the injected clock) retention is applied.
PRUNE_INTERVAL = 3600.0
BUFFER_FULL = "buffer-full"
WRITE_ERROR = "write-error"

#: ``--by`` dimension -> (its field in the JSON rows, the SQL expression grouped on).
DIMENSIONS: Dict[str, Tuple[str, str]] = {
    "key": ("key", "key_name"),
    "account": ("account", "account_name"),
    "model": ("model", "model"),
    "day": ("day", "strftime('%Y-%m-%d', at, 'unixepoch')"),
}
#: The sums of every summary row, in order (the JSON field names of ``clproxy usage``).
SUM_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
              "cache_read_input_tokens", "cost_usd")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    key_name TEXT,
    account_name TEXT,
    model TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_5m INTEGER NOT NULL DEFAULT 0,
    cache_creation_1h INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL,
    status INTEGER,
    duration REAL
);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE INDEX IF NOT EXISTS usage_key_at ON usage (key_name, at);
"""
_COLUMNS = ("at", "key_name", "account_name", "model", "input_tokens", "output_tokens", "cache_creation_5m",
            "cache_creation_1h", "cache_read_input_tokens", "cost_usd", "status", "duration")
_INSERT = "INSERT INTO usage ({}) VALUES ({})".format(", ".join(_COLUMNS), ", ".join("?" * len(_COLUMNS)))


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return 0
    return int(value)


@attr.s(auto_attribs=True, frozen=True)
class UsageRow:
    """One answered request. ``key_name`` is the client key's name (never the key), None when
    the proxy runs without keys; ``account_name`` None when no account served it; ``cost_usd``
    None when the model has no price; ``at`` epoch seconds; ``duration`` seconds."""

    key_name: Optional[str]
    account_name: Optional[str]
    model: Optional[str]
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: Optional[float] = None
    status: Optional[int] = None
    duration: Optional[float] = None
    at: float = 0.0

    @classmethod
    def from_usage(cls, *, key_name: Optional[str], account_name: Optional[str], model: Optional[str],
                   usage: Optional[Mapping[str, Any]], cost_usd: Optional[float], status: Optional[int],
                   duration: Optional[float], at: float) -> "UsageRow":
        """A row from an Anthropic ``usage`` object (a stream's final, merged usage): the cache
        writes split 5-minute/1-hour as :func:`clproxy.team.pricing.cache_split` does."""
        usage = usage or {}
        cache_5m, cache_1h = cache_split(usage)
        return cls(key_name, account_name, model, _count(usage.get("input_tokens")),
                   _count(usage.get("output_tokens")), cache_5m, cache_1h,
                   _count(usage.get("cache_read_input_tokens")), cost_usd, status, duration, float(at))

    @property
    def tokens(self) -> int:
        """The tokens this row counts against a tokens/day limit (:func:`billable_tokens`)."""
        return billable_tokens(self.input_tokens, self.output_tokens, self.cache_creation_5m + self.cache_creation_1h)

    def values(self) -> tuple:
        """The row in ``_COLUMNS`` order."""
        return (self.at, self.key_name, self.account_name, self.model, self.input_tokens, self.output_tokens,
                self.cache_creation_5m, self.cache_creation_1h, self.cache_read_input_tokens, self.cost_usd,
                self.status, self.duration)


def billable_tokens(input_tokens: int, output_tokens: int, cache_creation_tokens: int) -> int:
    """Tokens counted against a tokens/day limit: input + output + cache writes (cache reads are
    not: see the module docstring)."""
    return int(input_tokens) + int(output_tokens) + int(cache_creation_tokens)


def ledger_path(home: str) -> str:
    """The ledger's path under ``CLPROXY_HOME``."""
    return os.path.join(home, LEDGER_FILE)


def utc_day_start(seconds: float) -> float:
    """Midnight UTC of the day holding ``seconds`` (the start of a per-day limit window)."""
    return float(int(seconds // 86400) * 86400)


def utc_month_start(seconds: float) -> float:
    """Midnight UTC of the first day of the month holding ``seconds``."""
    moment = time.gmtime(seconds)
    return float(calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0)))


_SINCE_DAYS = re.compile(r"^(\d{1,5})d$")
_SINCE_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_since(text: str, now: float) -> float:
    """``--since``: ``YYYY-MM-DD`` is that day's midnight UTC; ``Nd`` the last N days
    (``now - N × 86400``; ``0d`` is now). ValueError with a readable message otherwise."""
    text = (text or "").strip()
    days = _SINCE_DAYS.match(text)
    if days:
        return float(now) - int(days.group(1)) * 86400.0
    if _SINCE_DATE.match(text):
        try:
            parsed = time.strptime(text, "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"--since {text!r}: not a valid date") from None
        return float(calendar.timegm(parsed))
    raise ValueError(f"--since {text!r}: expected YYYY-MM-DD or a number of days like 7d")


def create_file(path: str) -> None:
    """Create the database file owner-only (0600) before SQLite opens it (SQLite gives its WAL and
    shared-memory files the database's permissions), and tighten an existing one."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def connect(path: str, *, create: bool) -> sqlite3.Connection:
    """A connection to the ledger (WAL, schema ensured). ``create=False`` never creates a file:
    FileNotFoundError when there is none."""
    if create:
        create_file(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(path)
    connection = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint, never corrupt
    connection.executescript(_SCHEMA)
    return connection


def query_summary(connection: sqlite3.Connection, by: str, since: Optional[float] = None,
                  until: Optional[float] = None) -> List[Dict[str, Any]]:
    """The summary rows of ``clproxy usage --by BY``: one per value of the dimension, each with the
    dimension's field and :data:`SUM_FIELDS` (``cost_usd`` None when no request in it was priced),
    ordered by that field (None first)."""
    if by not in DIMENSIONS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(DIMENSIONS)}")
    field, expression = DIMENSIONS[by]
    where, args = _window(since, until)
    sql = ("SELECT {expr} AS dim, COUNT(*), SUM(input_tokens), SUM(output_tokens), "
           "SUM(cache_creation_5m + cache_creation_1h), SUM(cache_read_input_tokens), SUM(cost_usd) "
           "FROM usage{where} GROUP BY dim ORDER BY dim").format(expr=expression, where=where)
    rows = []
    for dim, *sums in connection.execute(sql, args):
        row: Dict[str, Any] = {field: dim}
        for name, value in zip(SUM_FIELDS, sums):
            row[name] = value if name == "cost_usd" else int(value or 0)
        rows.append(row)
    return rows


def query_spent(connection: sqlite3.Connection, key_name: str, since: float) -> Tuple[int, float]:
    """``(tokens, usd)`` the key spent from ``since`` on (tokens as :func:`billable_tokens`)."""
    tokens, usd = connection.execute(
        "SELECT SUM(input_tokens + output_tokens + cache_creation_5m + cache_creation_1h), SUM(cost_usd) "
        "FROM usage WHERE key_name = ? AND at >= ?", (key_name, float(since))).fetchone()
    return int(tokens or 0), float(usd or 0.0)


def _window(since: Optional[float], until: Optional[float]) -> Tuple[str, list]:
    clauses, args = [], []
    if since is not None:
        clauses.append("at >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("at < ?")
        args.append(float(until))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


class UsageLedger:
    """The daemon's usage database at ``path`` (see the module docstring).

    Lifecycle: :meth:`start` (opens the database, starts the writer thread and the hourly
    retention on ``clock``), :meth:`record` once per answered request from the reactor thread,
    :meth:`stop` on shutdown (writes everything queued). :meth:`summary` and :meth:`spent` read
    the database in the calling thread: from the reactor, call them through ``deferToThread``.
    """

    def __init__(self, path: str, clock, *, retention_days: float = DEFAULT_RETENTION_DAYS,
                 max_pending: int = 100_000, batch_rows: int = 500, interval: float = 1.0):
        self.path = path
        self.clock = clock
        self.retention_days = retention_days
        self.max_pending = max_pending
        self.batch_rows = batch_rows
        self.interval = interval
        self._queue: Deque[UsageRow] = collections.deque()
        #: rows lost, by reason (buffer-full, write-error)
        self.dropped: Dict[str, int] = {BUFFER_FULL: 0, WRITE_ERROR: 0}
        self.written = 0
        self.pruned = 0
        self.last_error: Optional[str] = None
        self._notes: Deque[Tuple[str, str]] = collections.deque(maxlen=64)
        self._overflowing = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._connection: Optional[sqlite3.Connection] = None
        self._prune_request: Optional[float] = None
        self._pruner: Optional[task.LoopingCall] = None

    # --- the reactor side -----------------------------------------------------------------------

    def record(self, row: UsageRow) -> bool:
        """Queue ``row`` for writing (no I/O). False when the queue is full: the row is dropped
        and counted (``dropped["buffer-full"]``), never waited for."""
        queue = self._queue
        if len(queue) >= self.max_pending:
            self.dropped[BUFFER_FULL] += 1
            if not self._overflowing:
                self._overflowing = True
                self._notes.append(("warn", "usage buffer full ({} rows queued): dropping usage rows until "
                                            "the writer catches up".format(len(queue))))
            return False
        if self._overflowing and len(queue) < self.max_pending // 2:
            self._overflowing = False
        queue.append(row)
        if len(queue) >= self.batch_rows:
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        """Rows queued and not yet written."""
        return len(self._queue)

    @property
    def dropped_total(self) -> int:
        """Rows lost for any reason."""
        return sum(self.dropped.values())

    def take_notes(self) -> List[Tuple[str, str]]:
        """Warnings to log, each once (``(level, message)``); call from the reactor thread."""
        notes = []
        while self._notes:
            notes.append(self._notes.popleft())
        return notes

    def request_prune(self, now: Optional[float] = None) -> None:
        """Ask the writer to delete rows older than the retention as of ``now`` (default: the
        clock's now); done by the next :meth:`sync`."""
        self._prune_request = self.clock.seconds() if now is None else float(now)
        self._wake.set()

    # --- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating, 0600) the database; idempotent. OSError/sqlite3.Error when it cannot."""
        with self._lock:
            if self._connection is None:
                self._connection = connect(self.path, create=True)

    def start(self) -> None:
        """Open the database, start the writer thread and the hourly retention (on ``clock``)."""
        self.open()
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="clproxy-usage-writer", daemon=True)
            self._thread.start()
        if self._pruner is None and self.retention_days > 0:
            self._pruner = task.LoopingCall(self.request_prune)
            self._pruner.clock = self.clock
            self._pruner.start(PRUNE_INTERVAL, now=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and the retention, write what is still queued, close the database."""
        if self._pruner is not None:
            if self._pruner.running:
                self._pruner.stop()
            self._pruner = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
        self.sync()
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.sync()
            except Exception as e:  # never let the thread die: usage would stop silently
                self._notes.append(("warn", "usage writer error: {}: {}".format(type(e).__name__, e)))

    def sync(self) -> None:
        """Apply a requested prune and write every queued row, in the calling thread."""
        with self._lock:
            connection = self._connection
            if connection is None:
                return
            batch = [self._queue.popleft() for _ in range(len(self._queue))]
            if batch:
                try:
                    with _transaction(connection):
                        connection.executemany(_INSERT, [row.values() for row in batch])
                    self.written += len(batch)
                except sqlite3.Error as e:
                    self.dropped[WRITE_ERROR] += len(batch)
                    self.last_error = "{}: {}".format(type(e).__name__, e)
                    self._notes.append(("warn", "cannot write usage to {} ({}); {} rows dropped, serving goes "
                                                "on".format(self.path, self.last_error, len(batch))))
            now, self._prune_request = self._prune_request, None
            if now is not None and self.retention_days > 0:
                try:
                    with _transaction(connection):
                        cursor = connection.execute("DELETE FROM usage WHERE at < ?",
                                                    (now - self.retention_days * 86400.0,))
                    self.pruned += max(0, cursor.rowcount)
                except sqlite3.Error as e:
                    self._notes.append(("warn", "usage retention failed: {}".format(e)))

    # --- queries (blocking: off the reactor) ----------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        return connect(self.path, create=False)

    def summary(self, by: str, since: Optional[float] = None) -> List[Dict[str, Any]]:
        """:func:`query_summary` on what has been written (rows still queued are not in it)."""
        connection = self._reader()
        try:
            return query_summary(connection, by, since)
        finally:
            connection.close()

    def spent(self, key_name: str, since: float) -> Tuple[int, float]:
        """``(tokens, usd)`` spent by ``key_name`` from ``since`` on: what is written plus what is
        still queued (tokens as :func:`billable_tokens`, unpriced rows add no USD)."""
        # Under the writer's lock, so a batch being written is counted exactly once.
        connection = self._reader()
        try:
            with self._lock:
                tokens, usd = query_spent(connection, key_name, since)
                queued = list(self._queue)
        finally:
            connection.close()
        for row in queued:
            if row.key_name == key_name and row.at >= since:
                tokens += row.tokens
                usd += row.cost_usd or 0.0
        return tokens, usd


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def __enter__(self):
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    def __exit__(self, kind, value, traceback):
        self.connection.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
