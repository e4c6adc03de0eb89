"""The seams of clproxy: what each pluggable part promises, as zope.interface interfaces.

Implementations say ``@implementer(...)``; tests call ``verifyObject`` and run the shared contract
tests against every implementation.
"""

from zope.interface import Attribute, Interface


class IStateStore(Interface):
    """Where runtime account state (cooldowns, backoff levels, stats, rate windows) and proxy-wide
    counters live: in memory for one daemon, in Redis when several share accounts.

    Every method returns a Deferred (a networked store is asynchronous); an in-memory store returns
    Deferreds that have already fired. Time is always passed in (seconds, one clock for the whole
    process); a store never reads a clock itself. Keys are ``Account.key`` values. A store keeps
    data only for keys it has been told something about, and drops them on ``forget``.
    Values are :class:`clproxy.state.model.AccountState` and plain dicts, never credentials.
    """

    def get_account_states(keys):
        """The selection state of several accounts.

        :param keys: a sequence of account keys.
        :return: Deferred firing with ``{key: AccountState}`` for every key asked; a key with
            nothing recorded gets ``AccountState()`` (not cooling, level 0). Reading never creates
            state.
        """

    def set_cooldown(key, until, backoff_level):
        """Cool one account until an absolute time and set its 429 backoff level (last write wins).

        :param until: absolute time in seconds; the account is cooling while ``until > now``.
        :param backoff_level: the level to keep (0 or more).
        :return: Deferred firing with None.
        """

    def record_attempt(key, now):
        """Count one upstream attempt with this account and remember when it was made.

        :return: Deferred firing with None.
        """

    def record_outcome(key, outcome, now, error=None):
        """Count how one attempt ended.

        :param outcome: ``"success"``, ``"error"`` or ``"rate-limited"`` (anything else fails the
            Deferred with ValueError). ``"success"`` also resets the backoff level to 0 and ends
            any cooldown. ``"error"`` and ``"rate-limited"`` set ``last_error`` (``error``, or the
            outcome name) and ``last_error_at`` (``now``); they leave cooldown and level alone.
        :return: Deferred firing with None.
        """

    def take_rate_slot(key, now, limit, window=60.0):
        """Admit one request under a sliding-window rate limit.

        A request taken at time ``t`` counts while ``t > now - window``.
        :param limit: the most requests allowed within ``window`` seconds (below 1: none).
        :return: Deferred firing with True, having counted the request, when fewer than ``limit``
            requests count at ``now``; False, counting nothing, otherwise. The memory kept per key
            is bounded by ``limit``.
        """

    def rate_usage(key, now, window=60.0):
        """How much of a sliding rate window is used, without taking a slot.

        :return: Deferred firing with ``(count, oldest)``: the requests counted at ``now`` and the
            time the oldest of them was taken (None when count is 0). The window frees a slot at
            ``oldest + window``.
        """

    def incr(counter, amount=1):
        """Add ``amount`` to a proxy-wide counter (``"upstream_attempts"``,
        ``"completed_requests"``, ``"truncated_streams"`` ...); a counter starts at 0.

        :return: Deferred firing with None.
        """

    def counters():
        """All proxy-wide counters.

        :return: Deferred firing with a new ``{name: int}`` dict (changing it changes nothing).
        """

    def account_stats(keys):
        """Per-account statistics, for /status.

        :return: Deferred firing with ``{key: {"attempts", "successes", "errors", "rate_limits",
            "backoff_level", "cooling_until", "last_attempt_at", "last_error_at", "last_error"}}``
            for every key asked; a key with nothing recorded gets zeros, ``cooling_until`` 0.0 and
            None times/error. Reading never creates state.
        """

    def forget(key):
        """Drop every piece of runtime state of one account (its credential changed or it was
        removed): cooldown, level, stats and rate window.

        :return: Deferred firing with None.
        """


class ICloakingPlugin(Interface):
    """One step of request shaping (``clproxy.cloaking``), run in order on each upstream attempt.

    Shaping may only add what an account needs to be used; a plugin must not forge another
    client's identity (DESIGN.md, principle 7). Plugins are registered in code or named in
    ``cloaking.plugins`` of the config (``module:attribute`` of an object providing this interface).
    """

    name = Attribute("A short name, used in logs and in the config's ``cloaking.plugins``.")

    def applies(context):
        """Whether this plugin should run for ``context`` (a ``clproxy.cloaking.ShapingContext``).

        :return: bool
        """

    def apply(context):
        """Shape ``context`` in place: ``context.headers`` (a list of ``(name, value)`` bytes pairs,
        names lower-case) and, rarely, ``context.body`` (changing it costs prompt caching; say so).

        :return: None
        """
