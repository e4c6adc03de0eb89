"""Quota capture: the subscription ("unified") rate-limit headers of every response, per account.

Each snapshot goes to the state store (``IQuotaStore``), so under the Redis backend every instance
sees the quota any instance last saw. A local copy is kept in memory and written to
``$CLPROXY_HOME/account-quotas.json`` (atomic, 0600) at most once per ``flush_delay`` seconds, so a
busy proxy does not write a file per response; that file survives a restart of a memory-backed
daemon and is what ``clproxy auth list`` reads.
"""

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional

from twisted.web.http_headers import Headers

from clproxy.routing import policy
from clproxy.observe.console import logger
from clproxy.accounts.tokenstore import atomic_write

log = logger(__name__)

QUOTA_FILE = "account-quotas.json"
_MARKERS = (b"anthropic-ratelimit-unified-status", b"anthropic-ratelimit-unified-5h-utilization",
            b"anthropic-ratelimit-unified-7d-utilization")


def has_quota_headers(headers: Headers) -> bool:
    """Cheap check: does this response carry any unified rate-limit header worth parsing?"""
    return any(headers.hasHeader(name) for name in _MARKERS)


class QuotaBook:
    """The latest quota snapshot per account key, persisted with a short delay."""

    def __init__(self, path: str, clock, flush_delay: float = 5.0, store=None):
        self.path = path
        self._clock = clock
        self._delay = flush_delay
        #: the state store's IQuotaStore side (None: this process's copy only)
        self._store = store
        self._quotas: Dict[str, Dict[str, Any]] = self._load()
        self._pending = None

    def _load(self) -> Dict[str, Dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warn("quota: ignoring unreadable {path} ({error}); it will be rewritten",
                     path=self.path, error=type(e).__name__)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def note(self, key: str, headers: Headers) -> None:
        """Record the quota headers of one response for account ``key``."""
        flat = {name.lower().decode("latin-1"): values[0].decode("latin-1")
                for name, values in headers.getAllRawHeaders()
                if values and name.lower().startswith(b"anthropic-ratelimit-unified")}
        quota = policy.quota_from_headers(flat)
        if not quota:
            return
        quota["updated_at"] = self._clock.seconds()
        self._quotas[key] = quota
        if self._store is not None:
            self._store.put_quota(key, quota).addErrback(
                lambda f: log.warn("quota: not shared for {key}: {error}", key=key,
                                   error=f.getErrorMessage()))
        if self._pending is None or not self._pending.active():
            self._pending = self._clock.callLater(self._delay, self.flush)

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        """The latest snapshot for ``key``, if any."""
        return self._quotas.get(key)

    async def latest(self, keys: Iterable[str]) -> Dict[str, Optional[Dict[str, Any]]]:
        """The newest snapshot of each of ``keys``: the store's (another instance may have seen a
        newer one) or this process's, whichever was taken later; None when neither has one."""
        keys = list(keys)
        shared: Mapping[str, Optional[Dict[str, Any]]] = {}
        if self._store is not None:
            try:
                shared = await self._store.get_quotas(keys)
            except Exception as e:
                log.warn("quota: shared snapshots unavailable: {error}", error=str(e))
        found: Dict[str, Optional[Dict[str, Any]]] = {}
        for key in keys:
            candidates = [q for q in (shared.get(key), self._quotas.get(key)) if q]
            found[key] = max(candidates, key=lambda q: q.get("updated_at") or 0) if candidates else None
        return found

    def snapshot(self) -> Mapping[str, Dict[str, Any]]:
        """Every account's latest snapshot."""
        return dict(self._quotas)

    def retain(self, keys: Iterable[str]) -> None:
        """Forget accounts that are gone (keeps memory bounded by the pool)."""
        keep = set(keys)
        for key in [k for k in self._quotas if k not in keep]:
            del self._quotas[key]

    def flush(self) -> None:
        """Write the snapshots now (a failure is logged; serving goes on)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
            atomic_write(self.path, json.dumps(self._quotas, indent=1, sort_keys=True).encode("utf-8"))
        except OSError as e:
            log.warn("quota: could not write {path}: {error}", path=self.path, error=str(e))
