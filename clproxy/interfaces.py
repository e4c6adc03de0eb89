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

    def record_outcome(key, outcome, now, error=None, sent_at=None):
        """Count how one attempt ended.

        :param outcome: ``"success"``, ``"error"`` or ``"rate-limited"`` (anything else fails the
            Deferred with ValueError). ``"success"`` also resets the backoff level to 0 and ends
            any cooldown, unless the attempt was sent no later than the latest cooldown decision
            (``IAtomicCooldown.extend_cooldown``'s ``at``): then it leaves both alone (a slow
            request sent before a 429 must not end that 429's cooldown; see
            ``clproxy.state.model.success_clears``). ``"error"`` and ``"rate-limited"`` set
            ``last_error`` (``error``, or the outcome name) and ``last_error_at`` (``now``); they
            leave cooldown and level alone.
        :param sent_at: when the attempt was sent (the same clock as ``now``); None (unknown)
            lets a success clear whatever cooldown there is.
        :return: Deferred firing with None.
        """

    def record_result(key, outcome, now, error=None, counter=None, sent_at=None):
        """Count one upstream attempt and how it ended, in one step: what ``record_attempt(key,
        now)`` then ``record_outcome(key, outcome, now, error, sent_at)`` do, and ``incr(counter)``
        when a counter is named. A networked store does it in one round trip, and no reader ever sees
        the attempt without its outcome.

        :return: Deferred firing with None; an unknown ``outcome`` fails it with ValueError and
            records nothing.
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
        ``"completed_requests"``, ``"truncated_streams"`` ...); a counter starts at 0. A shared
        store may pass the increment on to the other instances a moment later (the Redis store
        gathers them for ``COUNTER_FLUSH_DELAY``); this instance's ``counters()`` includes it at once.

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
    """One step of request shaping (``clproxy.proxy.shaping``), run in order on each upstream attempt.

    Shaping may only add what an account needs to be used; a plugin must not forge another
    client's identity (DESIGN.md, principle 7). Plugins are registered in code or named in
    ``cloaking.plugins`` of the config (``module:attribute`` of an object providing this interface).
    """

    name = Attribute("A short name, used in logs and in the config's ``cloaking.plugins``.")

    def applies(context):
        """Whether this plugin should run for ``context`` (a ``clproxy.proxy.shaping.ShapingContext``).

        :return: bool
        """

    def apply(context):
        """Shape ``context`` in place: ``context.headers`` (a list of ``(name, value)`` bytes pairs,
        names lower-case) and, rarely, ``context.body`` (changing it costs prompt caching; say so).

        :return: None
        """


class IAtomicCooldown(Interface):
    """A cooldown that only ever grows, decided where the state lives: two instances that cool one
    account at once keep the longer cooldown, whatever order their writes arrive in (a read in one
    process followed by ``IStateStore.set_cooldown`` cannot promise that across processes).
    """

    def extend_cooldown(key, until, backoff_level=None, at=None):
        """Cool one account until ``until`` unless it already cools longer, in one atomic step.

        :param until: absolute time in seconds (the pool's clock).
        :param backoff_level: when given, the 429 level becomes the larger of the stored one and
            this; None leaves the level alone.
        :param at: when this cooldown was decided (the pool's clock); the account's decision time
            becomes the latest one given, even when ``until`` does not extend the cooldown, and a
            success sent no later than it leaves cooldown and level alone
            (``IStateStore.record_outcome``). None leaves the decision time alone.
        :return: Deferred firing with the resulting ``AccountState``.
        """


class ISharedTokens(Interface):
    """OAuth token records shared by every instance: one JSON-able dict per account key.

    A record is whatever the token store serialises for one account (it holds credentials: an
    implementation never logs it or puts it in an error). When records carry a numeric
    ``tokens_at`` (when the tokens were obtained; ``updated_at`` in a record without it) it orders
    them (``import_token_record`` keeps the newer).
    """

    def get_token_record(key):
        """The record stored for ``key``.

        :return: Deferred firing with a new dict, or None when there is none.
        """

    def put_token_record(key, record):
        """Store ``record`` for ``key``, replacing any (the caller holds the refresh lock).

        Implementations that keep a file copy write it before anything else, so a rotated
        refresh token is durable before the new access token is used.
        :return: Deferred firing with None once the record is stored.
        """

    def import_token_record(key, record):
        """Store ``record`` unless the stored one is at least as new: for importing a file copy.

        A stored record wins when both have a version (``tokens_at``, else ``updated_at``) and its
        own is not older, or when either lacks one (an import never replaces what it cannot compare).
        :return: Deferred firing with True when ``record`` was stored, False when kept out.
        """

    def delete_token_record(key):
        """Drop the record of ``key`` (logged out or removed); harmless when there is none.

        :return: Deferred firing with None.
        """


class IQuotaStore(Interface):
    """The latest subscription quota snapshot per account (``policy.quota_from_headers``)."""

    def put_quota(key, snapshot):
        """Replace the quota snapshot of ``key`` with ``snapshot`` (a JSON-able dict).

        :return: Deferred firing with None.
        """

    def get_quotas(keys):
        """The latest snapshot of several accounts.

        :return: Deferred firing with ``{key: dict or None}`` for every key asked (None: no
            snapshot). Reading never creates state.
        """


class ILockProvider(Interface):
    """Named mutual-exclusion locks with a time to live: the per-account refresh lock, so exactly
    one holder (across every instance sharing the provider) refreshes while the others wait and
    then read the result. A holder that dies blocks nobody longer than the lock's TTL.
    """

    def acquire(name, ttl_ms, wait, clock):
        """Take lock ``name`` for at most ``ttl_ms`` milliseconds, waiting up to ``wait`` seconds.

        Polls with a bounded backoff on ``clock`` (an ``IReactorTime``); ``wait`` 0 tries once.
        :return: Deferred firing with a :class:`clproxy.state.locks.LockToken`, or None when the
            lock was still held when the wait ended.
        """

    def release(token):
        """Release the lock ``token`` proves holding, only if it still holds it (its TTL has not
        passed and nobody took it since).

        :return: Deferred firing with True when released, False when it was no longer held.
        """


class IStateLifecycle(Interface):
    """How the daemon opens and closes its state store, whatever the backend.

    The daemon calls ``connect`` once when it starts (before token upkeep) and ``close`` once when
    it stops; it never asks which backend it has.
    """

    def connect():
        """Get ready to serve; a Deferred that fires when ready. It may fail (the store is then
        served from local state until the backend answers, where the backend can do that)."""

    def close():
        """Release connections and timers; a Deferred that fires when done."""


class IResponseSink(Interface):
    """Where the dispatcher writes one client's answer (``Dispatcher.forward(request, out)``).

    The dispatcher, the translation path and the fallback chain write only through this; an
    implementation turns it into bytes on a connection (``clproxy.http.site.ClientResponse``),
    another API's shapes (``clproxy.http.openai.OpenAIResponseAdapter``) or an answer kept in
    memory (``clproxy.http.openai.CapturedResponse``). A sink knows nothing of the request's
    record: the dispatcher keeps and times that itself.

    An answer is either whole (``send`` or ``send_error``) or a stream (``start``, any number of
    ``write``, ``finish``). Once the client went away, or the answer is finished, every writing
    method does nothing: callers may call them without checking first.
    """

    disconnected = Attribute(
        "True once nothing more can reach the client: it went away, or the answer was finished. "
        "The dispatcher checks it before each new attempt and stops when it is True.")
    started = Attribute(
        "True once the status line went out (``start``, ``send``): from then on an error can only "
        "be told as an error event inside the answer.")
    status = Attribute(
        "The status the client was answered with (an int), None until the answer started; the "
        "dispatcher reads it when the request ends (None then means the client left first: 499).")

    def on_disconnect(cancel):
        """Call ``cancel()`` (no arguments) if the client goes away from now on.

        Each call replaces the previous callback: the dispatcher registers the cancel of the
        upstream step in progress (the request, the body read, the stream relay).
        """

    def start(status, headers):
        """Begin a streamed answer: the status line and headers (a list of ``(name, [values])``).

        The answer is committed from here on (``started`` True, ``status`` set).
        """

    def write(data):
        """Write body bytes of a streamed answer, as they are and in call order."""

    def finish():
        """End the streamed answer (``disconnected`` becomes True)."""

    def send(status, headers, body):
        """A whole answer in one go: status, headers (``(name, [values])``) and body bytes."""

    def send_error(error):
        """Answer with ``error`` (a :class:`clproxy.errors.ProxyError`) in the sink's API shape.

        Before ``start``: a whole error answer with ``error.status`` and its headers
        (``Retry-After`` ...). After ``start``: an error event in the stream, then the end.
        """

    def register_producer(producer):
        """Let the client's side pause ``producer`` (the upstream's ``IPushProducer``) when it
        cannot keep up (backpressure); a sink without a connection ignores it."""

    def unregister_producer():
        """Undo :meth:`register_producer` (before ``finish``)."""


class IUpstream(Interface):
    """The HTTP client the dispatcher and the translation providers send through
    (:class:`clproxy.proxy.upstream.UpstreamClient`; in memory: the same client over
    :class:`clproxy.testing.memory.MemoryAgent`)."""

    def send(method, url, headers, body, timeout, clock):
        """Send one request as raw bytes (``headers``: twisted ``Headers``, or ``(name, value)``
        byte pairs sent in their order); a Deferred that fires with the response once its headers
        arrived (what callers use of an ``IResponse``: ``code``, ``phrase``, ``headers`` as twisted
        ``Headers``, ``length``, ``deliverBody``, whose protocol's transport pauses, resumes and
        stops the upstream connection; :class:`clproxy.proxy.http1.Response`), or fails with :class:`clproxy.proxy.upstream.UpstreamError` (the words say
        what happened: refused by host:port, timeout after N s, closed before answering)."""

    def reconfigure(*, connect_timeout=None, max_connections_per_host=None):
        """New limits after a config reload; connections already open stay as they are."""

    def close():
        """Close every cached connection; a Deferred that fires once they are closed."""


class IRequestObserver(Interface):
    """Where requests are recorded (:class:`clproxy.observe.recorder.Observability`): JSONL, metrics,
    OTLP. The dispatcher opens one record per request and never asks where it goes."""

    def begin(*, request_id, method, path, model, stream, headers, body):
        """Open the record of one request (an :class:`IRequestRecord`), as soon as it is parsed."""


class IRequestRecord(Interface):
    """One request's record, written through by the dispatcher as the request goes; every method is
    cheap and never raises on the hot path."""

    error = Attribute("What failed, in words (no secret), or None.")
    truncated = Attribute("True when a committed stream ended early.")

    def outbound_headers():
        """Trace headers for the next upstream attempt; marks the attempt's start."""

    def attempt(*, account_name, provider, model, status, verdict, duration=None):
        """One upstream attempt got its verdict."""

    def first_byte():
        """The client gets its first byte now."""

    def usage(usage):
        """Merge an Anthropic ``usage`` dict (later values win)."""

    def tee(write, status=None, headers=None):
        """``write``, or with debug bodies a ``write`` that also keeps the chunks."""

    def response_body(status, headers, body, streamed):
        """Capture a response body (only with debug bodies)."""

    def refresh(account_name, ok):
        """An OAuth refresh happened for this request."""

    def finish(*, status, account_name=None, provider=None, actual_model=None, truncated=None, error=None,
               substituted=None):
        """The request is answered: write its summary, count it. Later calls do nothing."""


class ISessionBindings(Interface):
    """Which account each conversation (session) is bound to, so its prompt cache stays warm.

    A binding is ``session -> (account key, last_used)`` and lives ``ttl`` seconds after its last
    use; an expired binding reads as absent. Times are passed in, as everywhere (a store never
    reads a clock). Session ids are short opaque strings (``clproxy.routing.affinity.session_of``
    bounds them); they are not secrets but never credentials either. Under Redis every instance
    sees the same bindings; in memory they are bounded by an LRU cap (:meth:`limit_bindings`).
    """

    def touch_binding(session, now, ttl):
        """The live binding of ``session``, refreshed in the same step: its last use becomes
        ``now`` and it lives ``ttl`` seconds from now. The account does not change.

        :return: Deferred firing with ``(key, last_used)`` as it was before the refresh, or None
            (nothing refreshed, nothing created) when the session has no live binding.
        """

    def get_binding(session, now):
        """The live binding of ``session`` without refreshing it.

        :return: Deferred firing with ``(key, last_used)`` or None. Reading never creates state.
        """

    def put_binding(session, key, now, ttl):
        """Bind ``session`` to account ``key`` (last used ``now``, live ``ttl`` seconds), replacing
        any binding it had, in one atomic step.

        :return: Deferred firing with the account key of the live binding it replaced (which may
            be ``key`` itself), or None when there was none.
        """

    def drop_bindings_of(key):
        """Drop every binding to account ``key`` (the account was removed or disabled).

        :return: Deferred firing with how many bindings were dropped.
        """

    def count_bindings(now, keys=None):
        """How many live bindings each account has, for /status.

        :param keys: the account keys to count (each one appears, 0 when it has none); None:
            every account with a binding.
        :return: Deferred firing with a new ``{key: int}`` dict.
        """

    def limit_bindings(cap):
        """Keep at most ``cap`` bindings in this process's memory, evicting the least recently
        used first (a shared backend keeps its own bound, the TTL, and applies the cap to its
        local copy).

        :return: None.
        """


class IUsageCounters(Interface):
    """What each client key spent per UTC day and month, for the team limits (tokens/day,
    usd/day, usd/month).

    ``day`` is ``YYYY-MM-DD`` (UTC) and ``month`` ``YYYY-MM``, both computed by the caller from
    its clock (a store never reads a clock). ``add_usage`` adds to the day and to its month in one
    step. Under Redis every instance adds to and reads the same sums (a day's sums expire after
    the day is over, a month's after the month); in memory only the latest days and months are
    kept. Key *names* only: a client key itself is never a counter's name.
    """

    def add_usage(key_name, day, tokens, usd):
        """Add ``tokens`` (int) and ``usd`` (float; 0.0 for an unpriced request) to the sums of
        ``key_name`` for ``day`` and for the month holding it.

        :return: Deferred firing with None.
        """

    def get_usage(key_name, day):
        """The sums of ``key_name`` for ``day``.

        :return: Deferred firing with ``(tokens: int, usd: float)``; ``(0, 0.0)`` when nothing
            was added.
        """

    def get_month_usage(key_name, month):
        """The sums of ``key_name`` for ``month`` (``YYYY-MM``).

        :return: Deferred firing with ``(tokens: int, usd: float)``; ``(0, 0.0)`` when nothing
            was added.
        """


class IClientKeys(Interface):
    """Client keys (team mode) shared by every instance: one JSON-able record per key hash.

    Only hashes and limits are stored, never a key (``clproxy.team.keys.KeyRecord.to_json``).
    A revoked hash leaves a tombstone: it is never accepted again, so an instance whose key file
    still lists it cannot bring it back (keys are random; a revoked hash never legitimately
    returns). Tombstones are 64 characters each and only grow with revocations.
    """

    def put_key(key_hash, record):
        """Store ``record`` (a dict) under ``key_hash``, replacing any, unless it was revoked.

        :return: Deferred firing with True when stored, False when the hash is revoked.
        """

    def revoke_key(key_hash):
        """Drop the record of ``key_hash`` and refuse it from now on (harmless if unknown).

        :return: Deferred firing with None.
        """

    def all_keys():
        """Every live key.

        :return: Deferred firing with a new ``{key_hash: record dict}`` (no revoked hash).
        """


class ILoginSessions(Interface):
    """The dashboard's login sessions, shared by every process that serves it (workers, instances
    on one Redis): a page logged in on one is let in by all.

    A session is stored under the SHA-256 digest of its token (the token itself lives only in the
    browser's cookie) with the hash of the admin key it was opened with and its expiry. Times are
    passed in (a store never reads a clock). In memory at most ``MAX_LOGINS`` are kept (the
    oldest dropped first); under Redis each expires by its TTL.
    """

    def put_login(digest, key_hash, expires, now):
        """Store the session ``digest`` for the key with ``key_hash`` until ``expires`` (epoch s).

        :return: Deferred firing with None.
        """

    def get_login(digest, now):
        """The key hash of the live session ``digest``.

        :return: Deferred firing with the key hash, or None (unknown or expired).
        """

    def drop_login(digest):
        """End the session ``digest`` (harmless if unknown).

        :return: Deferred firing with None.
        """


class IWorkerMetrics(Interface):
    """The metric totals of the worker processes of one ``--workers N`` run, so that a scrape of
    ``/metrics`` on any worker answers for all of them (:mod:`clproxy.observe.aggregate`).

    A *run* is one supervisor's life (an opaque id it gives its workers); a *worker* is an index
    (1..N) in it; an *incarnation* is one process of that index (a restarted worker is a new one).
    A report is flat: ``{series: number}``, a series being an opaque string (a metric's name and
    labels: never a secret). *Totals* are a process's running sums since it started (within one
    incarnation they only grow); *gauges* are its values now (requests in flight). Times are passed
    in (a store never reads a clock). Under Redis every worker reads and writes the same reports,
    and a run's reports vanish a while after its last report; in memory only the latest runs are kept.
    """

    def publish_worker_metrics(run, worker, incarnation, totals, gauges, now, ttl):
        """Replace the report of ``worker`` of ``run`` with ``totals`` and ``gauges``.

        When the totals stored for ``worker`` are another incarnation's, they are first added to
        the run's *retired* totals, in the same atomic step, so a sum over the run never goes down
        when a worker dies and is replaced.
        :param ttl: seconds the gauges count from ``now`` (a worker that stops reporting has its
            gauges vanish; its totals stay, and are retired when its index reports again).
        :return: Deferred firing with None; it fails when the report could not be stored.
        """

    def read_worker_metrics(run, now):
        """The sums over every worker of ``run``.

        :return: Deferred firing with ``(totals, gauges)``, two new dicts: per series, the retired
            totals plus the latest totals of every worker (alive or not), and the sum of the gauges
            of the reports still live at ``now``; ``({}, {})`` for an unknown run. It fails when the
            shared reports cannot be read (the caller's answer would be one worker's only).
        """
