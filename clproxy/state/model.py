"""The values state stores hand back: an account's runtime state and its statistics.

Plain frozen records, shared by every ``IStateStore`` implementation so that they compare equal.
"""

from typing import Optional

import attr

#: The outcomes ``IStateStore.record_outcome`` accepts.
OUTCOME_SUCCESS = "success"
OUTCOME_ERROR = "error"
OUTCOME_RATE_LIMITED = "rate-limited"
OUTCOMES = frozenset({OUTCOME_SUCCESS, OUTCOME_ERROR, OUTCOME_RATE_LIMITED})

#: The keys of one account's entry in ``IStateStore.account_stats``.
STAT_KEYS = ("attempts", "successes", "errors", "rate_limits", "backoff_level", "cooling_until",
             "last_attempt_at", "last_error_at", "last_error")

#: The field that orders two token records (``ISharedTokens.import_token_record``): when the tokens
#: were obtained (a login or a rotation). Not ``updated_at``, which edits that leave the tokens as
#: they are also bump: a stale copy edited later must not count as newer than the live rotation.
TOKEN_VERSION_FIELD = "tokens_at"
#: What orders a record written before ``tokens_at`` existed.
TOKEN_VERSION_FALLBACK = "updated_at"


@attr.s(frozen=True, auto_attribs=True)
class AccountState:
    """What selection needs to know about one account: until when it cools, and its 429 level.

    ``cooling_until`` is an absolute time in seconds (the pool's clock); 0.0 means never cooled.
    """

    cooling_until: float = 0.0
    backoff_level: int = 0

    def is_cooling(self, now: float) -> bool:
        """True while the cooldown has not ended at ``now``."""
        return self.cooling_until > now


def empty_stats() -> dict:
    """The statistics of an account nothing has been recorded for."""
    return {"attempts": 0, "successes": 0, "errors": 0, "rate_limits": 0, "backoff_level": 0,
            "cooling_until": 0.0, "last_attempt_at": None, "last_error_at": None,
            "last_error": None}


def validate_outcome(outcome: str) -> Optional[ValueError]:
    """The error to report for an outcome ``record_outcome`` does not know, else None."""
    if outcome in OUTCOMES:
        return None
    return ValueError("unknown outcome {!r}; expected one of {}".format(
        outcome, ", ".join(sorted(OUTCOMES))))


def success_clears(cooled_at: Optional[float], sent_at: Optional[float]) -> bool:
    """Whether a success ends the cooldown and resets the 429 level (``IStateStore.record_outcome``).

    Only an attempt sent after the latest cooldown was decided (``cooled_at``) proves the account
    serves again: a slow request sent before a 429 that succeeds after it says nothing of the limit
    that 429 reported. A tie keeps the cooldown (the 429 may have come first). Without a send time
    (an old caller) or a known decision time (one made without it), a success clears, as it always has.
    The Redis store's RECORD script makes the same decision.
    """
    return sent_at is None or cooled_at is None or cooled_at < sent_at


def add_series(sums: dict, report) -> dict:
    """Add a report of the worker metrics (``IWorkerMetrics``: a ``{series: number}`` dict, or
    ``(series, number)`` pairs with numbers as strings, as Redis gives them) into ``sums``."""
    for series, value in (report.items() if isinstance(report, dict) else report):
        sums[series] = sums.get(series, 0.0) + float(value)
    return sums
