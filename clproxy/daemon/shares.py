"""Each worker's share of the client connections, where every worker can see it (``--workers``).

All workers wait on one listening socket, and the kernel wakes every one of them for a new
connection: the one already running takes it before a sleeping one is scheduled. A client that
opens its keep-alive connections at once (wrk's 32; Claude Code's few) could land on a single
worker while another sat idle (measured: 102% against 0.4% CPU, 1.19x for two workers). So each
worker counts its open client connections in a slot of a small file the supervisor creates and
every worker maps (:class:`ConnectionBoard`); a worker more than :data:`ACCEPT_SLACK` connections
ahead of the least loaded one leaves the next connection to the others for :data:`ACCEPT_PAUSE`
(:class:`clproxy.daemon.worker.OneAcceptPort`). The pause is bounded, so a worker that is stalled
or dead (its slot not yet cleared) never holds a connection back for longer than that.

The file is unlinked from the start (``tempfile.TemporaryFile``) and passed to the workers as an
inherited descriptor; each slot is a machine word written by its worker alone (and cleared by the
supervisor once that worker is gone), read by the others without a lock: a count a moment stale
only makes the balance a moment less exact. A slot reads :data:`NOT_SERVING` until its worker
listens (a worker still starting, or dead and not yet restarted): the others neither leave it
connections it cannot take nor count it as the least loaded, and the supervisor sends a reload
(SIGHUP) only to a worker that serves, whose handler is installed by then.
"""

import mmap
import os
import tempfile
from typing import BinaryIO, Optional

#: connections a worker may be ahead of the least loaded one and still accept the next at once
ACCEPT_SLACK = 2
#: how long (seconds) a worker that is further ahead leaves the listening socket to the others
ACCEPT_PAUSE = 0.002
#: the bytes of one worker's slot (a signed machine word)
SLOT_BYTES = 8
#: the descriptor number the board's file has in a worker (the listening socket is 3)
WORKER_BOARD_FD = 4
#: the environment variable by which the supervisor tells a worker that descriptor holds the board
#: (a worker never maps a descriptor it was not told about)
BOARD_FD_VARIABLE = "CLPROXY_WORKER_BOARD_FD"
#: what a slot holds while its worker does not serve (starting, or gone)
NOT_SERVING = -1


class ConnectionBoard:
    """The open client connections of each of ``count`` workers, in the file ``fd`` (mapped).

    ``index`` is this process's worker (1 to ``count``), or None for the supervisor, which only
    clears the slot of a worker that is gone.
    """

    def __init__(self, fd: int, count: int, index: Optional[int] = None):
        if count < 1 or (index is not None and not 1 <= index <= count):
            raise ValueError(f"worker {index} of {count}")
        self._map = mmap.mmap(fd, count * SLOT_BYTES)
        self._slots = memoryview(self._map).cast("q")
        self._own = -1 if index is None else index - 1  # (the supervisor has no slot of its own)

    @classmethod
    def create(cls, count: int) -> "tuple[ConnectionBoard, BinaryIO]":
        """A new board for ``count`` workers (none serving yet) and its file, whose descriptor
        the workers inherit; the file is closed when the supervisor closes it."""
        handle = tempfile.TemporaryFile()
        os.ftruncate(handle.fileno(), count * SLOT_BYTES)
        board = cls(handle.fileno(), count)
        for index in range(1, count + 1):
            board.clear(index)
        return board, handle

    def serve(self) -> None:
        """This worker listens from now on, with no connection yet."""
        self._slots[self._own_slot()] = 0

    def add(self, delta: int) -> None:
        """This worker opened (1) or closed (-1) a client connection."""
        self._slots[self._own_slot()] += delta

    def _own_slot(self) -> int:
        if self._own < 0:
            raise ValueError("the supervisor holds no connections")
        return self._own

    def ahead(self) -> int:
        """How many connections this worker holds beyond the least loaded other worker that
        serves (0 when no other serves: there is no one to leave a connection to)."""
        slots = self._slots
        own = self._own
        if own < 0:
            return 0
        others = [slots[i] for i in range(len(slots)) if i != own and slots[i] != NOT_SERVING]
        return slots[own] - min(others) if others else 0

    def serving(self, index: int) -> bool:
        """Whether worker ``index`` listens (and so has its signal handlers)."""
        return self._slots[index - 1] != NOT_SERVING

    def clear(self, index: int) -> None:
        """Worker ``index`` is gone, and its connections with it (or is not serving yet)."""
        self._slots[index - 1] = NOT_SERVING

    def counts(self) -> list:
        """Every worker's count, in worker order."""
        return list(self._slots)

    def close(self) -> None:
        """Unmap the file."""
        self._slots.release()
        self._map.close()
