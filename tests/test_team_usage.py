"""The usage ledger (clproxy.team.usage): a real SQLite file written by the writer thread."""

import os
import sqlite3
import stat
import time

import pytest
from twisted.internet import task

from clproxy.team.usage import (BUFFER_FULL, UsageLedger, UsageRow, billable_tokens, connect, ledger_path,
                                parse_since, query_summary, utc_day_start, utc_month_start)

DAY = 86400.0
T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z


def row(key="alice", account="acct1", model="claude-sonnet-4-5", at=T0, inp=10, out=20, c5=3, c1=4, read=100,
        cost=0.5, status=200):
    return UsageRow(key, account, model, inp, out, c5, c1, read, cost, status, 1.5, at)


def wait_for(predicate, timeout=10.0):
    """Poll the writer thread's progress (a real thread: no Clock can drive it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the writer thread did not write in time"
        time.sleep(0.01)


@pytest.fixture
def ledger(tmp_path):
    made = UsageLedger(ledger_path(str(tmp_path)), task.Clock(), interval=0.05)
    yield made
    made.stop()


def all_rows(path):
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT at, key_name, account_name, model, input_tokens, output_tokens, "
                                  "cache_creation_5m, cache_creation_1h, cache_read_input_tokens, cost_usd, "
                                  "status, duration FROM usage ORDER BY id").fetchall()
    finally:
        connection.close()


def test_writer_thread_writes_what_was_recorded(ledger):
    """Rows recorded on the reactor side reach the file through the writer thread, unchanged."""
    ledger.start()
    rows = [row(at=T0 + i, inp=i, cost=None if i == 2 else i / 10) for i in range(5)]
    for one in rows:
        assert ledger.record(one) is True
    wait_for(lambda: ledger.written == 5)
    assert all_rows(ledger.path) == [one.values() for one in rows]
    assert ledger.pending == 0 and ledger.dropped_total == 0


def test_file_is_private_and_wal(ledger):
    """The database (and its WAL files) are 0600, in WAL mode."""
    ledger.start()
    ledger.record(row())
    wait_for(lambda: ledger.written == 1)
    folder = os.path.dirname(ledger.path)
    for name in os.listdir(folder):
        if name.startswith("usage.sqlite3"):
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
    connection = sqlite3.connect(ledger.path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_rows_survive_reopening(tmp_path):
    """Stop writes what is queued; a new ledger on the same file sees every row."""
    path = ledger_path(str(tmp_path))
    first = UsageLedger(path, task.Clock(), interval=60.0)
    first.start()
    first.record(row(key="a"))
    first.record(row(key="b"))
    first.stop()  # the thread never woke: stop flushes
    second = UsageLedger(path, task.Clock())
    second.start()
    second.record(row(key="c"))
    second.stop()
    assert [r[1] for r in all_rows(path)] == ["a", "b", "c"]
    assert UsageLedger(path, task.Clock()).spent("a", 0) == (billable_tokens(10, 20, 7), 0.5)


def test_retention_prunes_on_the_clock(tmp_path):
    """Rows older than the retention go at start and then every hour of the injected clock."""
    clock = task.Clock()
    clock.advance(T0)
    ledger = UsageLedger(ledger_path(str(tmp_path)), clock, retention_days=2, interval=60.0)
    ledger.open()
    ledger.record(row(key="old", at=T0 - 3 * DAY))
    ledger.record(row(key="edge", at=T0 - 1.5 * DAY))
    ledger.record(row(key="new", at=T0))
    ledger.sync()
    ledger.start()  # the first retention pass is requested now
    ledger.sync()
    assert [r[1] for r in all_rows(ledger.path)] == ["edge", "new"]
    clock.advance(DAY)  # "edge" is now 2.5 days old
    ledger.sync()
    assert [r[1] for r in all_rows(ledger.path)] == ["new"]
    assert ledger.pruned == 2
    ledger.stop()


def test_full_queue_drops_and_counts(tmp_path):
    """Beyond max_pending rows are dropped and counted, with one warning, never waited for."""
    ledger = UsageLedger(ledger_path(str(tmp_path)), task.Clock(), max_pending=3)
    ledger.open()
    results = [ledger.record(row(at=T0 + i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert ledger.dropped[BUFFER_FULL] == 2
    notes = ledger.take_notes()
    assert len(notes) == 1 and "full" in notes[0][1]
    ledger.sync()
    assert len(all_rows(ledger.path)) == 3
    ledger.stop()


def test_write_error_costs_rows_not_serving(tmp_path):
    """An unwritable database drops the batch (counted) and the ledger goes on."""
    ledger = UsageLedger(ledger_path(str(tmp_path)), task.Clock())
    ledger.open()
    ledger._connection.execute("DROP TABLE usage")  # any SQLite error on insert
    ledger.record(row())
    ledger.sync()
    assert ledger.dropped["write-error"] == 1
    assert "cannot write usage" in ledger.take_notes()[0][1]
    ledger.stop()


def filled(tmp_path):
    ledger = UsageLedger(ledger_path(str(tmp_path)), task.Clock())
    ledger.open()
    ledger.record(row(key="alice", account="a1", model="claude-sonnet-4-5", at=T0, cost=0.25))
    ledger.record(row(key="alice", account="a2", model="claude-opus-4-5", at=T0 + DAY, cost=None))
    ledger.record(row(key="bob", account="a1", model="claude-sonnet-4-5", at=T0 + DAY, inp=1, out=2, c5=0, c1=0,
                      read=0, cost=0.5))
    ledger.record(row(key=None, account=None, model="gpt-4o", at=T0 + 2 * DAY, cost=None))
    ledger.stop()
    return ledger


def test_summary_by_each_dimension(tmp_path):
    """Sums per key, account, model and UTC day, with the issue's field names."""
    ledger = filled(tmp_path)
    by_key = ledger.summary("key")
    assert by_key == [
        {"key": None, "requests": 1, "input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 7,
         "cache_read_input_tokens": 100, "cost_usd": None},
        {"key": "alice", "requests": 2, "input_tokens": 20, "output_tokens": 40, "cache_creation_input_tokens": 14,
         "cache_read_input_tokens": 200, "cost_usd": 0.25},
        {"key": "bob", "requests": 1, "input_tokens": 1, "output_tokens": 2, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": 0, "cost_usd": 0.5},
    ]
    assert [(r["account"], r["requests"]) for r in ledger.summary("account")] == [(None, 1), ("a1", 2), ("a2", 1)]
    assert [(r["model"], r["requests"]) for r in ledger.summary("model")] == [
        ("claude-opus-4-5", 1), ("claude-sonnet-4-5", 2), ("gpt-4o", 1)]
    assert [(r["day"], r["requests"]) for r in ledger.summary("day")] == [
        ("2026-05-28", 1), ("2026-05-29", 2), ("2026-05-30", 1)]
    assert [r["key"] for r in ledger.summary("key", since=T0 + DAY)] == [None, "alice", "bob"]
    assert [r["requests"] for r in ledger.summary("day", since=T0 + 1.5 * DAY)] == [1]
    with pytest.raises(ValueError, match="--by"):
        ledger.summary("color")


def test_spent_counts_written_and_queued(tmp_path):
    """spent(): billable tokens (no cache reads) and USD since a time, queued rows included."""
    ledger = filled(tmp_path)
    assert ledger.spent("alice", 0) == (2 * (10 + 20 + 7), 0.25)
    assert ledger.spent("alice", T0 + 1) == (37, 0.0)
    ledger.record(row(key="bob", at=T0 + DAY, inp=5, out=0, c5=0, c1=0, read=1000, cost=1.0))
    assert ledger.spent("bob", T0) == (3 + 5, 1.5)


def test_from_usage_splits_cache_writes():
    """A row from an Anthropic usage object: 5m/1h from cache_creation, else all 5-minute."""
    split = UsageRow.from_usage(key_name="k", account_name="a", model="m", cost_usd=None, status=200,
                                duration=0.1, at=T0,
                                usage={"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 3,
                                       "cache_creation_input_tokens": 9,
                                       "cache_creation": {"ephemeral_5m_input_tokens": 4,
                                                          "ephemeral_1h_input_tokens": 5}})
    assert (split.cache_creation_5m, split.cache_creation_1h, split.cache_read_input_tokens) == (4, 5, 3)
    assert split.tokens == 1 + 2 + 9
    flat = UsageRow.from_usage(key_name="k", account_name="a", model="m", cost_usd=None, status=200,
                               duration=0.1, at=T0, usage={"cache_creation_input_tokens": 9})
    assert (flat.cache_creation_5m, flat.cache_creation_1h) == (9, 0)


def test_parse_since():
    """``YYYY-MM-DD`` is midnight UTC; ``Nd`` is N days back from now; anything else is an error."""
    assert parse_since("2026-05-28", T0) == utc_day_start(T0)
    assert parse_since("7d", T0) == T0 - 7 * DAY
    assert parse_since("0d", T0) == T0
    for bad in ("yesterday", "7", "2026-13-01", "-3d", ""):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad, T0)


def test_windows():
    """The limit windows start at midnight UTC of the day and of the month's first day."""
    assert time.gmtime(utc_day_start(T0))[:6] == (2026, 5, 28, 0, 0, 0)
    assert time.gmtime(utc_month_start(T0))[:6] == (2026, 5, 1, 0, 0, 0)


def test_reader_never_creates(tmp_path):
    """Reading a ledger that does not exist does not create one."""
    path = ledger_path(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        connect(path, create=False)
    assert not os.path.exists(path)
    connection = connect(path, create=True)
    assert query_summary(connection, "model") == []
    connection.close()


def test_no_client_key_in_any_file(tmp_path):
    """The ledger holds key names only: a client key's text appears in no file it writes."""
    secret = "clp_" + "s3cr3t" * 8
    ledger = UsageLedger(ledger_path(str(tmp_path)), task.Clock())
    ledger.start()
    ledger.record(UsageRow.from_usage(key_name="alice", account_name="a", model="m", usage={"input_tokens": 1},
                                      cost_usd=None, status=200, duration=0.1, at=T0))
    ledger.stop()
    assert secret not in repr(ledger.__dict__)
    for folder, _dirs, names in os.walk(str(tmp_path)):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            assert b"clp_" not in data and secret.encode() not in data, name
