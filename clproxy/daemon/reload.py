"""Hot reload of the configuration file: on SIGHUP, and when the file's content changes.

:class:`ConfigWatcher` polls the file's mtime and size on the injected clock, waits for writes to
settle (debounce), and reloads only when the content hash differs; a bad new config keeps the old one.
:func:`restart_needed` names what a reload changed that only a restart can take over.
"""

import hashlib
import os
import signal
from typing import Any, Callable, List, Optional, Sequence, Tuple

import attr
from twisted.application import service
from twisted.internet import task

from clproxy.observe import console

log = console.logger(__name__)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


#: Config keys (or sections, ending in ".") a running daemon cannot take over: the state store is
#: connected and the JSONL logs opened once, at start; the token refresher keeps its OAuth client.
#: ``server.workers`` is the supervisor's, which spawns the workers once. Everything else is applied
#: by a reload (the rest of ``server.*`` included). The port and host are options of the command
#: line, not config keys.
RESTART_ONLY = ("state.", "logging.", "server.workers", "providers.anthropic.oauthTokenUrl",
                "providers.anthropic.clientId", "providers.anthropic.refreshBeforeExpiry")


def _spelled(name: str) -> str:
    """A config field as the docs and the example config spell it (``upstream_timeout`` ->
    ``upstreamTimeout``; the one provider with a dash keeps it)."""
    if name == "google_ai":
        return "google-ai"
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def changed_keys(old: Any, new: Any, prefix: str = "") -> List[str]:
    """The dotted names (``server.maxBodyBytes``) of the settings that differ between two configs
    (attrs classes, walked down to their leaves; lists and mappings compare whole)."""
    if not (attr.has(type(old)) and type(old) is type(new)):
        return [] if old == new else [prefix.rstrip(".")]
    changed = []
    for field in attr.fields(type(old)):
        changed.extend(changed_keys(getattr(old, field.name), getattr(new, field.name),
                                    f"{prefix}{_spelled(field.name)}."))
    return changed


def restart_needed(old: Any, new: Any) -> List[str]:
    """The changed keys (see :func:`changed_keys`) that only take effect after a restart."""
    return [key for key in changed_keys(old, new)
            if any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in RESTART_ONLY)]


class ConfigWatcher(service.Service):
    """Reloads the config at ``path`` when it changes (or on :meth:`reload_now`).

    ``load(path)`` returns the new configuration and may raise (``config.ConfigError``); ``apply(new)``
    installs it and may return the keys it could not apply (they need a restart; the reload's log
    line names them). A failure of either keeps the configuration in force and logs one line saying why.
    """

    name = "config-watcher"

    def __init__(self, path: str, load: Callable[[str], Any],
                 apply: Callable[[Any], Optional[Sequence[str]]], clock,
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
        #: False: reload only when told (a worker of ``--workers N``: its supervisor watches the file)
        self.polling = True
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
        if not self.polling:
            return
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
            pending = self.apply(new)
        except Exception as e:
            self._failed(digest, e)
            return
        self.digest = digest
        self.reloads += 1
        if pending:
            log.warn("config reloaded from {path} ({reason}); restart needed for: {keys}",
                     path=self.path, reason=reason, keys=", ".join(pending))
        else:
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
