"""The workers' board of open client connections (clproxy.daemon.shares): one file, a slot per
worker, written by its worker, read by all, cleared by the supervisor when a worker is gone."""

import os

import pytest

from clproxy.daemon.shares import NOT_SERVING, SLOT_BYTES, ConnectionBoard


def test_every_process_sees_each_workers_count_and_how_far_ahead_it_is():
    """Three workers' mappings and the supervisor's see the same counts; each worker knows how far
    ahead of the least loaded other it is; a cleared slot does not serve; the supervisor counts
    nothing."""
    supervisor, handle = ConnectionBoard.create(3)
    try:
        assert os.fstat(handle.fileno()).st_size == 3 * SLOT_BYTES
        # each worker maps the same file through its own descriptor, as the inherited one
        workers = [ConnectionBoard(os.dup(handle.fileno()), 3, index) for index in (1, 2, 3)]
        for worker in workers:
            worker.serve()
        for _ in range(5):
            workers[0].add(1)
        workers[1].add(1)
        workers[1].add(1)
        workers[1].add(-1)
        assert supervisor.counts() == [5, 1, 0]
        assert [w.ahead() for w in workers] == [5, 1, -1]  # against the least loaded other worker
        supervisor.clear(3)  # worker 3 died: its connections with it
        assert not supervisor.serving(3) and supervisor.serving(1)
        assert workers[0].ahead() == 4  # against worker 2 now: worker 3 takes nothing
        assert supervisor.ahead() == 0  # the supervisor has no slot of its own
        with pytest.raises(ValueError):
            supervisor.add(1)
        with pytest.raises(ValueError):
            supervisor.serve()
        for w in workers:
            w.close()
    finally:
        supervisor.close()
        handle.close()


def test_a_worker_that_does_not_serve_yet_is_neither_given_connections_nor_the_least_loaded():
    """Until a worker listens (seconds of imports at each start, or dead and waiting for its
    restart), its slot says so: a worker far ahead of it does not pause to leave it connections
    it cannot take (with a count of 0 there, every live worker would pause on every other
    wake-up for the whole restart backoff)."""
    supervisor, handle = ConnectionBoard.create(2)
    try:
        assert [supervisor.serving(i) for i in (1, 2)] == [False, False]
        first = ConnectionBoard(os.dup(handle.fileno()), 2, 1)
        first.serve()
        for _ in range(10):
            first.add(1)
        assert first.ahead() == 0  # worker 2 still starting
        second = ConnectionBoard(os.dup(handle.fileno()), 2, 2)
        second.serve()
        assert first.ahead() == 10 and supervisor.serving(2)
        supervisor.clear(2)  # worker 2 died
        assert first.ahead() == 0
        first.close()
        second.close()
    finally:
        supervisor.close()
        handle.close()


def test_a_lone_worker_is_never_ahead_and_bad_indexes_are_refused():
    """One worker has no one to leave connections to; a worker index outside 1..count is refused."""
    board, handle = ConnectionBoard.create(1)
    try:
        alone = ConnectionBoard(handle.fileno(), 1, 1)
        alone.serve()
        alone.add(7)
        assert alone.ahead() == 0
        alone.close()
        for count, index in ((1, 2), (2, 0), (0, None)):
            with pytest.raises(ValueError):
                ConnectionBoard(handle.fileno(), count, index)
    finally:
        board.close()
        handle.close()


def test_a_worker_maps_only_the_descriptor_its_supervisor_named():
    """Without the supervisor's variable a worker has no board (one started by hand never maps
    whatever its descriptor 4 happens to be); with it, the board the supervisor made."""
    from clproxy.daemon.shares import BOARD_FD_VARIABLE
    from clproxy.daemon.worker import _inherited_board
    supervisor, handle = ConnectionBoard.create(2)
    try:
        assert _inherited_board({}, 2, 1) is None
        assert _inherited_board({BOARD_FD_VARIABLE: "not a number"}, 2, 1) is None
        board = _inherited_board({BOARD_FD_VARIABLE: str(handle.fileno())}, 2, 2)
        board.serve()
        board.add(1)
        assert supervisor.counts() == [NOT_SERVING, 1]
        board.close()
    finally:
        supervisor.close()
        handle.close()
