"""The shared state store: every clproxy instance behind one Redis behaves as one proxy.

Read-through (every read asks Redis; no cache), atomic read-modify-writes as Lua scripts, and a
local mirror of the last known state that serves every call while Redis is unreachable.
"""

import itertools
import json
import math
from typing import Any, Callable, Dict, Optional

import attr

try:
    import txredisapi
except ImportError:  # Debian packages none: the unmodified copy clproxy ships (clproxy/_vendor)
    from clproxy._vendor import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clproxy.interfaces import (IAtomicCooldown, ILockProvider, IQuotaStore, ISharedTokens,
                                IStateLifecycle, IStateStore)
from clproxy.state.redis_url import RedisTarget, parse_redis_url
from clproxy.state.locks import LockToken, new_owner, poll_for_lock
from clproxy.state.memory import MemoryStateStore, token_version
from clproxy.state.model import (OUTCOME_SUCCESS, STAT_KEYS, TOKEN_VERSION_FIELD, AccountState,
                                 empty_stats, validate_outcome)

log = Logger()

#: A cooldown key outlives the end of its cooldown by this long (seconds), then vanishes.
COOLDOWN_GRACE = 3600.0
#: A 429 backoff level not raised again for this long (seconds) vanishes (reads as 0).
LEVEL_TTL = 24 * 3600.0
#: An account's stats hash not written for this long (seconds) vanishes.
STATS_TTL = 30 * 24 * 3600.0
#: A quota snapshot not replaced for this long (seconds) vanishes (longer than the 7-day window).
QUOTA_TTL = 8 * 24 * 3600.0
#: No key gets a longer TTL than this (seconds), whatever cooldown it holds.
MAX_TTL = 400 * 24 * 3600.0
#: Reconnection backoff: the first wait and the longest (seconds).
RECONNECT_FIRST = 0.5
RECONNECT_CAP = 30.0
#: How long a command or a connection attempt may take before Redis counts as unreachable.
DEFAULT_REPLY_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 5.0


# --- errors and backoff ---------------------------------------------------------------------------


class RedisUnavailable(Exception):
    """Redis could not be reached (or refused us) when the store connected; the message names the
    redacted URL and never a password."""


class TokenNotStored(Exception):
    """A token record reached neither Redis nor its file copy; it is kept in memory and written to
    Redis once it is reachable again. The message names the key, never the record."""


class _RedisDown(Exception):
    """One call could not be served by Redis; the store serves it from its local mirror."""


def reconnect_delay(attempt: int) -> float:
    """Seconds before reconnection attempt ``attempt + 1``: 0.5 s doubling up to 30 s."""
    return min(RECONNECT_CAP, RECONNECT_FIRST * (2.0 ** min(max(0, attempt), 16)))


def _scrub(text: str, target: RedisTarget) -> str:
    """An error text with the password (should a library ever echo it) removed."""
    text = str(text)
    if target.password:
        text = text.replace(target.password, "***")
    return text


# --- the connection -------------------------------------------------------------------------------


def txredisapi_connector(target: RedisTarget, reply_timeout: float, connect_timeout: float):
    """A zero-argument callable opening one txredisapi connection to ``target``.

    ``reconnect=False``: a txredisapi handler that reconnects by itself queues commands while
    disconnected (they would hang through an outage), so :class:`RedisLink` reconnects instead.
    """
    def connect() -> Deferred:
        tls: Any = False
        if target.tls:
            from twisted.internet import ssl
            tls = ssl.optionsForClientTLS(target.host)
        return txredisapi.Connection(
            host=target.host, port=target.port, dbid=target.db or None, reconnect=False,
            password=target.password, username=target.username, ssl_context_factory=tls,
            connectTimeout=connect_timeout, replyTimeout=reply_timeout, convertNumbers=False)
    return connect


class RedisLink:
    """One connection to Redis, its loss and its recovery.

    ``run(op)`` calls ``op(handler)`` on the live connection; it fails fast with ``_RedisDown``
    when there is none, when the connection is lost or a reply takes longer than the reply timeout
    (then the connection is dropped and reconnection starts with :func:`reconnect_delay` backoff on
    ``clock``), or when Redis answers with an error. An outage is logged once, its end once, and
    ``on_recovered`` runs after each reconnection.
    """

    def __init__(self, target: RedisTarget, clock, connector: Callable[[], Deferred], *,
                 delay: Callable[[int], float] = reconnect_delay,
                 on_recovered: Optional[Callable[[], Any]] = None):
        self.target = target
        self._clock = clock
        self._connector = connector
        self._delay = delay
        self._on_recovered = on_recovered
        self._handler = None
        self._retry = None
        self._connecting: Optional[Deferred] = None
        self._attempt = 0
        self._outage = False
        self._closed = False
        self._reported = set()
        #: Calls made through ``run``, and those Redis could not serve (diagnostics and tests).
        self.calls = 0
        self.failed_calls = 0

    @property
    def url(self) -> str:
        return self.target.redacted

    @property
    def up(self) -> bool:
        """True while a connection is open (the last command on it may still fail)."""
        return self._handler is not None

    @property
    def in_outage(self) -> bool:
        """True from a lost connection until the next successful reconnection."""
        return self._outage

    async def open(self) -> None:
        """Connect and PING once; raises :class:`RedisUnavailable` (no reconnection) on failure."""
        try:
            self._handler = await self._connect_and_ping()
        except Exception as e:  # any failure to connect is one answer: unavailable
            raise RedisUnavailable("redis unavailable at {}: {}".format(
                self.url, _scrub(_reason(e), self.target))) from None

    async def _connect_and_ping(self):
        handler = await self._connector()
        try:
            reply = await handler.ping()
            if reply != "PONG":
                raise txredisapi.RedisError("unexpected PING reply")
        except BaseException:
            _disconnect(handler)
            raise
        return handler

    def run(self, op: Callable[[Any], Deferred]) -> Deferred:
        """``op(handler)`` on the live connection; fails with ``_RedisDown`` when Redis cannot
        answer."""
        self.calls += 1
        handler = self._handler
        if handler is None:
            self.failed_calls += 1
            return defer.fail(_RedisDown("not connected"))
        return defer.maybeDeferred(op, handler).addErrback(self._failed, handler)

    def _failed(self, failure: Failure, handler) -> None:
        self.failed_calls += 1
        reason = _scrub(_reason(failure.value), self.target)
        if failure.check(txredisapi.ConnectionError):  # lost, refused or timed out
            self._lost(handler, reason)
            raise _RedisDown(reason)
        if failure.check(txredisapi.RedisError):  # an error reply (OOM, LOADING ...)
            kind = reason.split(" ", 1)[0][:40]
            if kind not in self._reported and len(self._reported) < 32:
                self._reported.add(kind)
                log.warn("redis error at {url}: {reason}; serving from local state",
                         url=self.url, reason=reason)
            raise _RedisDown(reason)
        failure.raiseException()

    def _lost(self, handler, reason: str) -> None:
        if self._handler is not handler:
            return  # another call already noticed this connection's loss
        self._handler = None
        _disconnect(handler)
        if not self._outage:
            self._outage = True
            log.warn("redis unavailable at {url}, serving from local state ({reason})",
                     url=self.url, reason=reason)
        self._schedule()

    def _schedule(self) -> None:
        if self._closed or self._retry is not None or self._connecting is not None:
            return
        delay = self._delay(self._attempt)
        self._attempt += 1
        self._retry = self._clock.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        self._connecting = Deferred.fromCoroutine(self._connect_and_ping())
        self._connecting.addCallbacks(self._reconnected, self._reconnect_failed)

    def _reconnected(self, handler) -> None:
        self._connecting = None
        if self._closed:
            _disconnect(handler)
            return
        self._handler = handler
        self._attempt = 0
        self._reported.clear()
        if self._outage:
            self._outage = False
            log.info("redis available again at {url}; shared state is used again", url=self.url)
        if self._on_recovered is not None:
            defer.maybeDeferred(self._on_recovered).addErrback(self._replay_failed)

    def _replay_failed(self, failure: Failure) -> None:
        if failure.check(_RedisDown):
            return  # lost again: the outage is logged, and the next recovery replays the rest
        log.error("redis at {url}: writing the changes made during the outage failed: {error}",
                  url=self.url, error=_scrub(_reason(failure.value), self.target))

    def _reconnect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._schedule()

    def close(self) -> Deferred:
        """Stop reconnecting and close the connection."""
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        # An attempt in progress is left to finish (txredisapi cannot cancel one): it sees
        # ``_closed`` and closes what it opened.
        handler, self._handler = self._handler, None
        return _disconnect(handler) if handler is not None else defer.succeed(None)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def _disconnect(handler) -> Deferred:
    try:
        d = defer.maybeDeferred(handler.disconnect)
    except Exception:  # a half-open handler: nothing left to close
        return defer.succeed(None)
    return d.addErrback(lambda _: None)


# --- Lua ------------------------------------------------------------------------------------------

# Every value crossing into a script is a string made by ``_num`` (repr of a float round-trips
# exactly through Redis's strtod); every time coming back is the stored string, never a Lua number
# (Lua would print it with 14 digits).

_SET_COOLDOWN = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

_EXTEND_COOLDOWN = """
local cur = redis.call('GET', KEYS[1])
local untilv = cur or '0'
if tonumber(ARGV[1]) > (tonumber(cur) or 0) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  untilv = ARGV[1]
end
local lvl = redis.call('GET', KEYS[2]) or '0'
if ARGV[3] ~= '' and tonumber(ARGV[3]) > tonumber(lvl) then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  lvl = ARGV[3]
end
return {untilv, lvl}
"""

_RECORD_ATTEMPT = """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_attempt_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RECORD_OUTCOME = """
if ARGV[1] == 'success' then
  redis.call('HINCRBY', KEYS[1], 'successes', 1)
  redis.call('DEL', KEYS[2], KEYS[3])
else
  local field = 'errors'
  if ARGV[1] == 'rate-limited' then field = 'rate_limits' end
  redis.call('HINCRBY', KEYS[1], field, 1)
  redis.call('HSET', KEYS[1], 'last_error_at', ARGV[2], 'last_error', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# ARGV: now, horizon (inclusive: a request at the horizon has left the window), limit, member, ttl
_TAKE_RATE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local limit = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n > limit then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - limit - 1)
  n = limit
end
if n >= limit then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# ARGV: '(' .. horizon (exclusive lower bound)
_RATE_USAGE = """
local first = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #first == 0 then return {0} end
return {redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf'), first[2]}
"""

# KEYS: stats, cooldown, level of each account in turn
_ACCOUNT_STATS = """
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('GET', KEYS[i + 1])
  out[#out + 1] = redis.call('GET', KEYS[i + 2])
end
return out
"""

# ARGV: record, its updated_at ('' when none), mode ('import': the stored record wins unless both
# are versioned and it is older; 'replay': the stored record wins only when both are versioned and
# it is newer)
_PUT_TOKEN_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local new = tonumber(ARGV[2])
  local old = nil
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' then old = tonumber(rec[ARGV[4]]) end
  if ARGV[3] == 'import' then
    if (not new) or (not old) or old >= new then return 0 end
  else
    if new and old and old > new then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _num(value) -> str:
    """A number as Redis and Lua read it back exactly."""
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN is not a time")
    return repr(value)


def _ms(seconds: float) -> str:
    """A TTL in whole milliseconds, at least 1 and at most ``MAX_TTL``."""
    if math.isnan(seconds):
        seconds = MAX_TTL
    return str(max(1, int(min(seconds, MAX_TTL) * 1000)))


def _eval(script: str, keys, args):
    """An ``op`` for ``RedisLink.run``: EVALSHA, falling back to EVAL (txredisapi keeps the SHA1s
    each connection has loaded)."""
    return lambda handler: handler.eval(script, keys, args)


# --- the local mirror -----------------------------------------------------------------------------


def _fired(deferred: Deferred):
    """The result of a Deferred that has already fired (the memory store's)."""
    box = []
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
        known = _fired(self.get_account_states(list(states)))
        for key, state in states.items():
            if known[key] != state:
                self.set_cooldown(key, state.cooling_until, state.backoff_level)

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


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(blob) -> Optional[dict]:
    if blob is None:
        return None
    value = json.loads(blob)
    return value if isinstance(value, dict) else None


# --- the store ------------------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class _PendingWrites:
    """What was written only to the mirror during an outage and must reach Redis on recovery
    (bounded by the account keys touched)."""

    forgets: set = attr.Factory(set)
    cooldowns: set = attr.Factory(set)
    tokens: set = attr.Factory(set)
    token_deletes: set = attr.Factory(set)
    quotas: set = attr.Factory(set)

    def __len__(self):
        return (len(self.forgets) + len(self.cooldowns) + len(self.tokens)
                + len(self.token_deletes) + len(self.quotas))


@implementer(IStateStore, IAtomicCooldown, ISharedTokens, IQuotaStore, ILockProvider, IStateLifecycle)
class RedisStateStore:
    """``IStateStore`` (and the shared tokens, quotas, cooldown extension and locks) in one Redis,
    shared by every instance that uses the same URL and ``prefix``.

    **Consistency.** Every read goes to Redis (no cache), every read-modify-write is one Lua script,
    so a change made through any instance is seen by every instance's next call: within one
    request. While Redis is unreachable each instance serves from its :class:`LocalMirror` (the last
    state it read or wrote, plus its own writes since) and diverges from the others until Redis is
    back; then cooldowns, quota snapshots and token records written meanwhile are written to Redis
    (counts made meanwhile stay local).

    **Keys** (``P`` is the prefix, ``K`` an account key): ``P:cd:K`` cooldown end (expires
    ``COOLDOWN_GRACE`` after it), ``P:lvl:K`` 429 level (``LEVEL_TTL``), ``P:stats:K`` hash of
    counts (``STATS_TTL`` since the last write), ``P:rate:K`` sorted set of request times (at most
    ``limit`` members, expires with the window), ``P:quota:K`` JSON (``QUOTA_TTL``), ``P:token:K``
    JSON (no TTL), ``P:lock:NAME`` owner token (the lock's TTL), ``P:counters:all`` hash.

    ``clock`` is the process's clock: times are passed in as everywhere, the clock only turns them
    into TTLs (so expiry never depends on the Redis host's clock) and paces reconnection.
    ``on_token_write(key, record)`` persists the file copy of a token record; it is called before
    a record is written to Redis, and when a read shows a record changed by another instance.
    """

    def __init__(self, url: str, clock, *, prefix: str = "clproxy",
                 on_token_write: Optional[Callable[[str, dict], Any]] = None,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect: Callable[[int], float] = reconnect_delay,
                 connector: Optional[Callable[[], Deferred]] = None):
        self.target = parse_redis_url(url)
        self._clock = clock
        self._prefix = prefix
        self._on_token_write = on_token_write
        self.mirror = LocalMirror()
        self._pending = _PendingWrites()
        self._link = RedisLink(
            self.target, clock,
            connector or txredisapi_connector(self.target, reply_timeout, connect_timeout),
            delay=reconnect, on_recovered=self._replay)
        # Members of rate windows must be unique across instances and calls.
        self._member_prefix = ":" + new_owner()[:12] + ":"
        self._sequence = itertools.count()

    @property
    def url(self) -> str:
        """The Redis URL with any password redacted (safe to log)."""
        return self.target.redacted

    @property
    def available(self) -> bool:
        """True while connected to Redis."""
        return self._link.up

    def connect(self) -> Deferred:
        """Connect and PING; fires with None, or fails with :class:`RedisUnavailable`."""
        return Deferred.fromCoroutine(self._link.open())

    def close(self) -> Deferred:
        """Stop reconnecting and close the connection (the mirror stays readable)."""
        return self._link.close()

    def _key(self, kind: str, key: str) -> str:
        return "{}:{}:{}".format(self._prefix, kind, key)

    def _ttl_until(self, until: float, grace: float) -> str:
        return _ms(max(0.0, float(until) - self._clock.seconds()) + grace)

    # IStateStore -------------------------------------------------------------------------------

    def get_account_states(self, keys):
        return Deferred.fromCoroutine(self._get_account_states(list(keys)))

    async def _get_account_states(self, keys):
        if not keys:
            return {}
        names = []
        for key in keys:
            names += [self._key("cd", key), self._key("lvl", key)]
        try:
            values = await self._link.run(lambda r: r.mget(names))
        except _RedisDown:
            return await self.mirror.get_account_states(keys)
        states = {}
        for index, key in enumerate(keys):
            until, level = values[2 * index], values[2 * index + 1]
            states[key] = AccountState(float(until) if until else 0.0, int(level) if level else 0)
        self.mirror.adopt_states(states)
        return states

    def set_cooldown(self, key, until, backoff_level):
        return Deferred.fromCoroutine(self._set_cooldown(key, until, backoff_level))

    async def _set_cooldown(self, key, until, backoff_level):
        args = [_num(until), self._ttl_until(until, COOLDOWN_GRACE), str(int(backoff_level)),
                _ms(LEVEL_TTL)]
        try:
            await self._link.run(_eval(_SET_COOLDOWN, [self._key("cd", key),
                                                       self._key("lvl", key)], args))
        except _RedisDown:
            self._pending.cooldowns.add(key)
        await self.mirror.set_cooldown(key, until, backoff_level)

    def record_attempt(self, key, now):
        return Deferred.fromCoroutine(self._record_attempt(key, now))

    async def _record_attempt(self, key, now):
        try:
            await self._link.run(_eval(_RECORD_ATTEMPT, [self._key("stats", key)],
                                       [_num(now), _ms(STATS_TTL)]))
        except _RedisDown:
            pass
        await self.mirror.record_attempt(key, now)

    def record_outcome(self, key, outcome, now, error=None):
        problem = validate_outcome(outcome)
        if problem is not None:
            return defer.fail(problem)
        return Deferred.fromCoroutine(self._record_outcome(key, outcome, now, error))

    async def _record_outcome(self, key, outcome, now, error):
        text = error if error is not None else outcome
        keys = [self._key("stats", key), self._key("cd", key), self._key("lvl", key)]
        try:
            await self._link.run(_eval(_RECORD_OUTCOME, keys,
                                       [outcome, _num(now), str(text), _ms(STATS_TTL)]))
        except _RedisDown:
            if outcome == OUTCOME_SUCCESS:
                self._pending.cooldowns.discard(key)
        await self.mirror.record_outcome(key, outcome, now, error)

    def take_rate_slot(self, key, now, limit, window=60.0):
        if limit < 1:
            return defer.succeed(False)
        return Deferred.fromCoroutine(self._take_rate_slot(key, now, int(limit), window))

    async def _take_rate_slot(self, key, now, limit, window):
        member = _num(now) + self._member_prefix + str(next(self._sequence))
        args = [_num(now), _num(now - window), str(limit), member, _ms(window + 1.0)]
        try:
            taken = await self._link.run(_eval(_TAKE_RATE_SLOT, [self._key("rate", key)], args))
        except _RedisDown:
            return await self.mirror.take_rate_slot(key, now, limit, window)
        if taken:
            # The mirror's window holds this instance's requests only (see the class docstring).
            await self.mirror.take_rate_slot(key, now, limit, window)
        return bool(taken)

    def rate_usage(self, key, now, window=60.0):
        return Deferred.fromCoroutine(self._rate_usage(key, now, window))

    async def _rate_usage(self, key, now, window):
        try:
            reply = await self._link.run(_eval(_RATE_USAGE, [self._key("rate", key)],
                                               ["(" + _num(now - window)]))
        except _RedisDown:
            return await self.mirror.rate_usage(key, now, window)
        if not reply or not reply[0]:
            return (0, None)
        return (int(reply[0]), float(reply[1]))

    def incr(self, counter, amount=1):
        return Deferred.fromCoroutine(self._incr(counter, amount))

    async def _incr(self, counter, amount):
        try:
            await self._link.run(
                lambda r: r.hincrby(self._key("counters", "all"), counter, int(amount)))
        except _RedisDown:
            pass
        await self.mirror.incr(counter, amount)

    def counters(self):
        return Deferred.fromCoroutine(self._counters())

    async def _counters(self):
        try:
            raw = await self._link.run(lambda r: r.hgetall(self._key("counters", "all")))
        except _RedisDown:
            return await self.mirror.counters()
        counters = {name: int(value) for name, value in raw.items()}
        self.mirror.adopt_counters(counters)
        return dict(counters)

    def account_stats(self, keys):
        return Deferred.fromCoroutine(self._account_stats(list(keys)))

    async def _account_stats(self, keys):
        if not keys:
            return {}
        names = []
        for key in keys:
            names += [self._key("stats", key), self._key("cd", key), self._key("lvl", key)]
        try:
            reply = await self._link.run(_eval(_ACCOUNT_STATS, names, []))
        except _RedisDown:
            return await self.mirror.account_stats(keys)
        stats = {}
        for index, key in enumerate(keys):
            flat, until, level = reply[3 * index:3 * index + 3]
            stats[key] = _stats_from(flat or [], until, level)
            self.mirror.adopt_stats(key, stats[key])
        return {key: dict(value) for key, value in stats.items()}

    def forget(self, key):
        return Deferred.fromCoroutine(self._forget(key))

    async def _forget(self, key):
        names = [self._key(kind, key) for kind in ("cd", "lvl", "stats", "rate", "quota")]
        try:
            await self._link.run(lambda r: r.delete(names))
        except _RedisDown:
            self._pending.forgets.add(key)
            self._pending.cooldowns.discard(key)
            self._pending.quotas.discard(key)
        await self.mirror.forget(key)

    # IAtomicCooldown ---------------------------------------------------------------------------

    def extend_cooldown(self, key, until, backoff_level=None):
        return Deferred.fromCoroutine(self._extend_cooldown(key, until, backoff_level))

    async def _extend_cooldown(self, key, until, backoff_level):
        args = [_num(until), self._ttl_until(until, COOLDOWN_GRACE),
                "" if backoff_level is None else str(int(backoff_level)), _ms(LEVEL_TTL)]
        try:
            reply = await self._link.run(_eval(_EXTEND_COOLDOWN, [self._key("cd", key),
                                                                  self._key("lvl", key)], args))
        except _RedisDown:
            self._pending.cooldowns.add(key)
            return await self.mirror.extend_cooldown(key, until, backoff_level)
        state = AccountState(float(reply[0]), int(reply[1]))
        self.mirror.adopt_states({key: state})
        return state

    # ISharedTokens -----------------------------------------------------------------------------

    def get_token_record(self, key):
        return Deferred.fromCoroutine(self._get_token_record(key))

    async def _get_token_record(self, key):
        try:
            blob = await self._link.run(lambda r: r.get(self._key("token", key)))
        except _RedisDown:
            return await self.mirror.get_token_record(key)
        record = _loads(blob)
        if key in self._pending.tokens:
            # Written here during an outage and not yet replayed: ours is the live one.
            return await self.mirror.get_token_record(key)
        if self.mirror.adopt_token(key, record) and record is not None:
            # Rotated by another instance: keep this instance's file copy current too.
            await self._write_file_copy(key, record)
        return None if record is None else json.loads(blob)

    def put_token_record(self, key, record):
        return Deferred.fromCoroutine(self._put_token_record(key, dict(record)))

    async def _put_token_record(self, key, record):
        file_error = await self._write_file_copy(key, record)
        blob = _json(record)
        try:
            await self._link.run(lambda r: r.set(self._key("token", key), blob))
        except _RedisDown:
            self._pending.tokens.add(key)
            self._pending.token_deletes.discard(key)
            self.mirror.adopt_token(key, json.loads(blob))
            if file_error is not None:
                raise TokenNotStored(
                    "the token record of {} is only in memory: redis at {} is unreachable and its "
                    "file copy failed ({}); it is written to redis once redis is back".format(
                        key, self.url, file_error)) from None
            return
        self.mirror.adopt_token(key, json.loads(blob))

    async def _write_file_copy(self, key, record) -> Optional[str]:
        """Call ``on_token_write``; the error's type name when it failed (logged), else None."""
        if self._on_token_write is None:
            return None
        try:
            await defer.maybeDeferred(self._on_token_write, key, json.loads(_json(record)))
        except Exception as e:  # the file copy is a fallback: report, never pass the record on
            log.error("could not write the file copy of the token record of {key} ({error})",
                      key=key, error=type(e).__name__)
            return type(e).__name__
        return None

    def import_token_record(self, key, record):
        return Deferred.fromCoroutine(self._put_token_if_newer(key, dict(record), "import"))

    async def _put_token_if_newer(self, key, record, mode):
        blob = _json(record)
        version = token_version(record)
        args = [blob, "" if version is None else _num(version), mode, TOKEN_VERSION_FIELD]
        try:
            stored = await self._link.run(_eval(_PUT_TOKEN_IF_NEWER, [self._key("token", key)],
                                                args))
        except _RedisDown:
            stored = await self.mirror.import_token_record(key, record)
            if stored:
                self._pending.tokens.add(key)
                self._pending.token_deletes.discard(key)
            return stored
        if stored:
            self.mirror.adopt_token(key, json.loads(blob))
        return bool(stored)

    def delete_token_record(self, key):
        return Deferred.fromCoroutine(self._delete_token_record(key))

    async def _delete_token_record(self, key):
        try:
            await self._link.run(lambda r: r.delete(self._key("token", key)))
        except _RedisDown:
            self._pending.token_deletes.add(key)
        self._pending.tokens.discard(key)
        await self.mirror.delete_token_record(key)

    # IQuotaStore -------------------------------------------------------------------------------

    def put_quota(self, key, snapshot):
        return Deferred.fromCoroutine(self._put_quota(key, dict(snapshot)))

    async def _put_quota(self, key, snapshot):
        blob = _json(snapshot)
        try:
            await self._link.run(
                lambda r: r.set(self._key("quota", key), blob, pexpire=_ms(QUOTA_TTL)))
        except _RedisDown:
            self._pending.quotas.add(key)
        self.mirror.adopt_quota(key, json.loads(blob))

    def get_quotas(self, keys):
        return Deferred.fromCoroutine(self._get_quotas(list(keys)))

    async def _get_quotas(self, keys):
        if not keys:
            return {}
        try:
            blobs = await self._link.run(lambda r: r.mget([self._key("quota", k) for k in keys]))
        except _RedisDown:
            return await self.mirror.get_quotas(keys)
        quotas = {}
        for key, blob in zip(keys, blobs):
            quotas[key] = _loads(blob)
            self.mirror.adopt_quota(key, _loads(blob))
        return quotas

    # ILockProvider -----------------------------------------------------------------------------

    def acquire(self, name, ttl_ms, wait, clock):
        ttl_ms = max(1, int(ttl_ms))

        async def try_once():
            owner = new_owner()
            try:
                reply = await self._link.run(lambda r: r.set(
                    self._key("lock", name), owner, pexpire=ttl_ms, only_if_not_exists=True))
            except _RedisDown:
                # Cut off from the other instances: exclusion within this process is all that
                # is left (see docs/redis.rst).
                return self.mirror.locks.try_acquire(name, ttl_ms, clock)
            return LockToken(name, owner, ttl_ms) if reply == "OK" else None

        return Deferred.fromCoroutine(poll_for_lock(try_once, wait, clock))

    def release(self, token):
        if token.local:
            return self.mirror.locks.release(token)
        return Deferred.fromCoroutine(self._release(token))

    async def _release(self, token):
        try:
            released = await self._link.run(_eval(_RELEASE_LOCK, [self._key("lock", token.name)],
                                                  [token.owner]))
        except _RedisDown:
            return False  # the lock ends with its TTL
        return bool(released)

    # Recovery ----------------------------------------------------------------------------------

    async def _replay(self):
        """Write to Redis what was written only to the mirror while it was unreachable."""
        pending = self._pending
        if not len(pending) and not self.mirror.token_keys():
            return
        count = len(pending)
        for key in sorted(pending.forgets):
            names = [self._key(kind, key) for kind in ("cd", "lvl", "stats", "rate", "quota")]
            await self._link.run(lambda r, names=names: r.delete(names))
            pending.forgets.discard(key)
        for key in sorted(pending.token_deletes):
            await self._link.run(lambda r, key=key: r.delete(self._key("token", key)))
            pending.token_deletes.discard(key)
        # Every token record known here goes back: the ones written during the outage win unless
        # Redis holds a newer one; the others only fill a Redis that lost them (restarted empty).
        for key in self.mirror.token_keys():
            record = _fired(self.mirror.get_token_record(key))
            mode = "replay" if key in pending.tokens else "import"
            blob = _json(record)
            version = token_version(record)
            await self._link.run(_eval(_PUT_TOKEN_IF_NEWER, [self._key("token", key)],
                                       [blob, "" if version is None else _num(version), mode,
                                        TOKEN_VERSION_FIELD]))
            pending.tokens.discard(key)
        for key in sorted(pending.quotas):
            snapshot = _fired(self.mirror.get_quotas([key]))[key]
            if snapshot is not None:
                blob = _json(snapshot)
                await self._link.run(lambda r, key=key, blob=blob: r.set(
                    self._key("quota", key), blob, pexpire=_ms(QUOTA_TTL)))
            pending.quotas.discard(key)
        for key in sorted(pending.cooldowns):
            state = _fired(self.mirror.get_account_states([key]))[key]
            await self._link.run(_eval(_EXTEND_COOLDOWN, [self._key("cd", key),
                                                          self._key("lvl", key)],
                                       [_num(state.cooling_until),
                                        self._ttl_until(state.cooling_until, COOLDOWN_GRACE),
                                        str(state.backoff_level), _ms(LEVEL_TTL)]))
            pending.cooldowns.discard(key)
        if count:
            log.info("redis at {url}: wrote {count} change(s) made during the outage",
                     url=self.url, count=count)

    def pending_count(self) -> int:
        """How many keys hold writes not yet in Redis (for tests and /status)."""
        return len(self._pending)


def _stats_from(flat, until, level) -> dict:
    fields = dict(zip(flat[::2], flat[1::2]))
    stats = empty_stats()
    for name in ("attempts", "successes", "errors", "rate_limits"):
        stats[name] = int(fields.get(name, 0))
    for name in ("last_attempt_at", "last_error_at"):
        stats[name] = float(fields[name]) if name in fields else None
    stats["last_error"] = fields.get("last_error")
    stats["cooling_until"] = float(until) if until else 0.0
    stats["backoff_level"] = int(level) if level else 0
    return stats
