"""The local mirror: the last known shared state, which serves every call while Redis is
unreachable."""

from typing import Dict, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clproxy.state.memory import MemoryStateStore
from clproxy.state.model import STAT_KEYS, AccountState, empty_stats


def fired(deferred: Deferred):
    """The result of a Deferred that has already fired (the memory store's)."""
    box: list = []
    deferred.addBoth(box.append)
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class LocalMirror(MemoryStateStore):
    """The last known shared state, in this process: a ``MemoryStateStore`` (which provides every
    state interface) that can also adopt what Redis said.

    A Redis store updates it on every successful call and serves every call from it while Redis is
    unreachable. ``adopt_*`` overwrite entries with what Redis said (they reach into the memory
    store's tables; the memory store's own contract tests keep those tables honest).
    """

    # What Redis said, made the last known state.
    def adopt_states(self, states: Dict[str, AccountState]) -> None:
        known = fired(self.get_account_states(list(states)))
        for key, state in states.items():
            if known[key] != state:
                self.set_cooldown(key, state.cooling_until, state.backoff_level)

    def adopt_cooled_at(self, key: str, at: Optional[float]) -> None:
        """Remember when Redis says the cooldown of ``key`` was last decided (None: unknown)."""
        record = self._accounts.get(key)
        if record is not None:
            record.cooled_at = at
        elif at is not None:
            self._record(key).cooled_at = at

    def cooled_at(self, key: str) -> Optional[float]:
        """When the cooldown of ``key`` was last decided, as far as this mirror knows (None: unknown)."""
        record = self._accounts.get(key)
        return None if record is None else record.cooled_at

    def holds_cooldown(self, key: str) -> bool:
        """True when the mirror has a cooldown end or a 429 level for ``key``."""
        record = self._accounts.get(key)
        return record is not None and (record.cooling_until > 0 or record.backoff_level > 0)

    def adopt_stats(self, key: str, stats: dict) -> None:
        if stats == empty_stats() and key not in self._accounts:
            return
        record = self._record(key)
        for name in STAT_KEYS:
            setattr(record, name, stats[name])

    def adopt_counters(self, counters: Dict[str, int]) -> None:
        self._counters.clear()
        self._counters.update(counters)

    def adopt_token(self, key: str, record: Optional[dict]) -> bool:
        """Remember ``record`` as the token of ``key``; True when it differs from the one known."""
        if record is None:
            return self._tokens.pop(key, None) is not None
        changed = self._tokens.get(key) != record
        self._tokens[key] = record
        return changed

    def adopt_quota(self, key: str, snapshot: Optional[dict]) -> None:
        if snapshot is None:
            self._quotas.pop(key, None)
        else:
            self._quotas[key] = snapshot
