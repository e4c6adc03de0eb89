"""Hot reload of the configuration file: on SIGHUP, and when the file's content changes.

:class:`ConfigWatcher` polls the file's mtime and size on the injected clock, waits for writes to
settle (debounce), and reloads only when the content hash differs; a bad new config keeps the old one.
"""

import hashlib
import os
import signal
from typing import Any, Callable, Optional, Tuple

from twisted.application import service
from twisted.internet import task

from .observe import console

log = console.logger(__name__)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


class ConfigWatcher(service.Service):
    """Reloads the config at ``path`` when it changes (or on :meth:`reload_now`).

    ``load(path)`` returns the new configuration and may raise (``config.ConfigError``); ``apply(new)``
    installs it. A failure of either keeps the configuration in force and logs one line saying why.
    """

    name = "config-watcher"

    def __init__(self, path: str, load: Callable[[str], Any], apply: Callable[[Any], None], clock,
                 interval: float = 1.0, debounce: float = 0.15):
        self.path = path
        self.load = load
        self.apply = apply
        self.clock = clock
        self.interval = interval
        self.debounce = debounce
        #: content hash of the configuration in force (``None``: no file was read)
        self.digest: Optional[str] = None
        self.reloads = 0
        self.failures = 0
        self._signature: Optional[Tuple[int, int]] = None
        self._loop: Optional[task.LoopingCall] = None
        self._pending = None

    # -- file observation --

    def _stat(self) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _read_digest(self) -> Optional[str]:
        try:
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return None

    def startService(self):
        """Remember the current file and poll it every ``interval`` seconds."""
        super().startService()
        self._signature = self._stat()
        self.digest = self._read_digest()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Stop polling and drop a pending (debounced) check."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return super().stopService()

    def poll(self) -> None:
        """One look at the file's mtime and size; a change schedules a settled check."""
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        if self._pending is not None and self._pending.active():
            self._pending.reset(self.debounce)
        else:
            self._pending = self.clock.callLater(self.debounce, self._settled)

    def _settled(self) -> None:
        self._pending = None
        signature = self._stat()
        if signature != self._signature:  # still being written: wait again
            self._signature = signature
            self._pending = self.clock.callLater(self.debounce, self._settled)
            return
        if signature is None:
            log.warn("config file {path} disappeared; keeping the configuration in force", path=self.path)
            return
        digest = self._read_digest()
        if digest is None or digest == self.digest:
            return  # touched, not changed
        self._reload(digest, "file changed")

    # -- reloading --

    def reload_now(self, reason: str = "SIGHUP") -> None:
        """Reload now, whether or not the file changed (an explicit request)."""
        self._signature = self._stat()
        self._reload(self._read_digest(), reason)

    def _reload(self, digest: Optional[str], reason: str) -> None:
        try:
            new = self.load(self.path)
        except Exception as e:
            self._failed(digest, e)
            return
        try:
            self.apply(new)
        except Exception as e:
            self._failed(digest, e)
            return
        self.digest = digest
        self.reloads += 1
        log.info("config reloaded from {path} ({reason})", path=self.path, reason=reason)

    def _failed(self, digest: Optional[str], error: BaseException) -> None:
        # Remember the bad content too, so it is not retried (and re-logged) until it changes again.
        self.digest = digest
        self.failures += 1
        log.error("config reload failed, keeping the previous one: {reason}", reason=_one_line(error))


def install_sighup(watcher: ConfigWatcher, reactor) -> None:
    """Make SIGHUP reload ``watcher``'s config (on the reactor thread); a no-op where SIGHUP does not exist."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return

    def handler(signum, frame):
        reactor.callFromThread(watcher.reload_now, "SIGHUP")

    try:
        signal.signal(sighup, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        log.warn("SIGHUP reload is unavailable (not running in the main thread)")
