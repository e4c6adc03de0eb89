"""The daemon gives the C heap's free pages back to the system once it has started (malloc_trim)."""

import ctypes
import platform

import pytest

from clproxy.daemon import assemble

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def resident_kib() -> int:
    """This process's resident set (VmRSS), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_pages_go_back_to_the_system():
    """Memory freed under a live allocation stays resident until release_freed_memory returns it."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MiB in 4 KiB blocks from the C heap, then one block above them that stays: glibc cannot
    # shrink its heap past a live block by itself, so the freed blocks stay resident
    blocks = [libc.malloc(4096) for _ in range(16384)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)  # touched: resident
    pin = libc.malloc(4096)
    try:
        for block in blocks:
            libc.free(block)
        before = resident_kib()
        assemble.release_freed_memory()
        after = resident_kib()
    finally:
        libc.free(pin)
    assert before - after > 32 * 1024, (before, after)


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    """Where the C library has no malloc_trim (musl, macOS) the call is a no-op, not an error."""
    class NoTrim:
        """A C library with no malloc_trim (reading it raises AttributeError)."""

        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoTrim)
    assemble.release_freed_memory()


def test_the_daemon_releases_memory_on_start(monkeypatch):
    """ProxyService.startService collects start-up's garbage first, then releases the freed pages."""
    calls = []
    monkeypatch.setattr(assemble, "tune_garbage_collector", lambda: calls.append("collect"))
    monkeypatch.setattr(assemble, "release_freed_memory", lambda: calls.append("release"))
    service = assemble.ProxyService(proxy=None, listener=None, reactor=None)
    service.startService()
    service.running = False
    assert calls == ["collect", "release"]
