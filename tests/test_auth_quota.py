"""The quota book: snapshots go through the state store, the newest one wins, the file is a copy."""

import json

import pytest_twisted
from twisted.internet import task
from twisted.web.http_headers import Headers

from clproxy.routing.quota import QuotaBook
from clproxy.state.memory import MemoryStateStore


def quota_headers(utilization: str) -> Headers:
    """The unified rate-limit headers of one response with a 5-hour utilization."""
    return Headers({"anthropic-ratelimit-unified-status": ["allowed"],
                    "anthropic-ratelimit-unified-5h-utilization": [utilization]})


@pytest_twisted.ensureDeferred
async def test_snapshot_reaches_the_store_and_another_book(tmp_path):
    """What one book notes is in the store, so a second book on the same store reports it."""
    clock, store = task.Clock(), MemoryStateStore()
    first = QuotaBook(str(tmp_path / "a.json"), clock, store=store)
    second = QuotaBook(str(tmp_path / "b.json"), clock, store=store)
    first.note("k", quota_headers("0.5"))
    assert (await store.get_quotas(["k"]))["k"]["five_hour"]["utilization"] == 0.5
    assert (await second.latest(["k"]))["k"]["five_hour"]["utilization"] == 0.5


@pytest_twisted.ensureDeferred
async def test_the_newest_snapshot_wins(tmp_path):
    """Between the store's snapshot and this process's, the one taken later is reported."""
    clock, store = task.Clock(), MemoryStateStore()
    mine = QuotaBook(str(tmp_path / "a.json"), clock, store=store)
    other = QuotaBook(str(tmp_path / "b.json"), clock, store=store)
    mine.note("k", quota_headers("0.1"))
    clock.advance(10)
    other.note("k", quota_headers("0.7"))
    assert (await mine.latest(["k"]))["k"]["five_hour"]["utilization"] == 0.7
    clock.advance(10)
    await store.put_quota("k", {"updated_at": 1.0, "five_hour": {"utilization": 0.9}})
    mine.note("k", quota_headers("0.2"))  # taken after the stale shared one put above
    assert (await mine.latest(["k"]))["k"]["five_hour"]["utilization"] == 0.2


@pytest_twisted.ensureDeferred
async def test_a_failing_store_leaves_the_local_copy(tmp_path):
    """A store that fails (Redis down without a mirror) costs a warning; the book still answers."""
    from twisted.internet import defer

    class Broken(MemoryStateStore):
        def put_quota(self, key, snapshot):
            return defer.fail(RuntimeError("down"))

        def get_quotas(self, keys):
            return defer.fail(RuntimeError("down"))

    clock = task.Clock()
    book = QuotaBook(str(tmp_path / "q.json"), clock, store=Broken())
    book.note("k", quota_headers("0.3"))
    assert (await book.latest(["k"]))["k"]["five_hour"]["utilization"] == 0.3


def test_file_copy_is_written_after_the_delay(tmp_path):
    """The file is written once per flush delay (Clock-driven), not per response."""
    clock = task.Clock()
    path = tmp_path / "q.json"
    book = QuotaBook(str(path), clock, flush_delay=5.0, store=MemoryStateStore())
    book.note("k", quota_headers("0.4"))
    book.note("k", quota_headers("0.5"))
    assert not path.exists()
    clock.advance(5.0)
    assert json.loads(path.read_text())["k"]["five_hour"]["utilization"] == 0.5
