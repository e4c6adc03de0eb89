"""The shared state store: every clproxy instance behind one Redis behaves as one proxy.

Read-through (every read asks Redis; no cache), atomic read-modify-writes as Lua scripts, and a
local mirror of the last known state that serves every call while Redis is unreachable.
"""

import itertools
import json
from typing import Any, Callable, Optional

import attr
from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from clproxy.interfaces import (IAtomicCooldown, IClientKeys, ILockProvider, ILoginSessions, IQuotaStore,
                                ISessionBindings, ISharedTokens, IStateLifecycle, IStateStore, IUsageCounters,
                                IWorkerMetrics)
from clproxy.state.locks import LockToken, new_owner, poll_for_lock
from clproxy.state.memory import token_version
from clproxy.state.model import (OUTCOME_SUCCESS, TOKEN_VERSION_FALLBACK, TOKEN_VERSION_FIELD,
                                 AccountState, empty_stats, validate_outcome)
from clproxy.state.redis.link import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_REPLY_TIMEOUT, RedisDown,
                                      RedisLink, reconnect_delay, redis_endpoint)
from clproxy.state.redis.mirror import LocalMirror, fired
from clproxy.state.redis.scripts import (ACCOUNT_STATS, EXTEND_COOLDOWN, PUT_TOKEN_IF_NEWER,
                                         RATE_USAGE, RECORD, RELEASE_LOCK,
                                         SET_COOLDOWN, TAKE_RATE_SLOT, num, px_ttl, script_op)
from clproxy.state.redis.url import parse_redis_url
from clproxy.state.redis.workermetrics import RedisWorkerMetrics

# One namespace for the whole Redis store, whatever module logs (operators filter on it).
log = Logger(namespace="clproxy.state.redis")

#: The kinds of key held per account (``P:KIND:K``), all dropped by ``forget``.
ACCOUNT_KINDS = ("cd", "lvl", "cdat", "stats", "rate", "quota")
#: A cooldown key outlives the end of its cooldown by this long (seconds), then vanishes.
COOLDOWN_GRACE = 3600.0
#: A 429 backoff level not raised again for this long (seconds) vanishes (reads as 0).
LEVEL_TTL = 24 * 3600.0
#: An account's stats hash not written for this long (seconds) vanishes.
STATS_TTL = 30 * 24 * 3600.0
#: Proxy-wide counter increments (a completed request, a truncated stream ...) are added up here
#: for this long (seconds), then sent as one HINCRBY per counter: a request on the Redis path
#: makes one round trip less. Another instance's ``counters()`` sees them at most this late, and an
#: instance that dies loses at most this long's counts (statistics, not state).
COUNTER_FLUSH_DELAY = 0.1
#: A quota snapshot not replaced for this long (seconds) vanishes (longer than the 7-day window).
QUOTA_TTL = 8 * 24 * 3600.0
#: A session binding's keys outlive its expiry by this long (seconds) before Redis reclaims them
#: (expiry itself is decided by the times passed in, so a late reclaim is never a late expiry).
BINDING_GRACE = 60.0
#: A day's usage sums (the team limits) vanish this long (seconds) after their last addition:
#: past the day's end, whatever the clocks' skew.
USAGE_DAY_TTL = 2 * 24 * 3600.0
#: A month's usage sums vanish this long after their last addition.
USAGE_MONTH_TTL = 32 * 24 * 3600.0

# KEYS: day hash, month hash. ARGV: tokens, usd, day ttl (ms), month ttl (ms). One step, so a
# crash between the two never leaves the day and the month disagreeing.
ADD_USAGE = """
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], 'tokens', ARGV[1])
  redis.call('HINCRBYFLOAT', KEYS[i], 'usd', ARGV[2])
  redis.call('PEXPIRE', KEYS[i], ARGV[2 + i])
end
return 1
"""


# The Lua scripts of the session bindings (ISessionBindings), next to their only user. A binding
# is the hash ``P:bind:SESSION`` {account, last, exp}; each account's bound sessions are the
# sorted set ``P:bound:ACCOUNT`` scored by expiry time (counted without a scan);
# ``P:bindings:accounts`` is the set of accounts that have one. Expiry is decided by the times
# passed in (``exp <= now``: gone); the key TTLs only reclaim memory. The scripts name keys
# derived from values (the old account of a moved session), as a single Redis allows.

# KEYS: binding. ARGV: now, new expiry, ttl (ms), bound-set prefix, session, accounts set
TOUCH_BINDING = """
local v = redis.call('HMGET', KEYS[1], 'account', 'last', 'exp')
if not v[1] or not v[3] or tonumber(v[3]) <= tonumber(ARGV[1]) then return false end
redis.call('HSET', KEYS[1], 'last', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local bound = ARGV[4] .. v[1]
redis.call('ZADD', bound, ARGV[2], ARGV[5])
redis.call('PEXPIRE', bound, ARGV[3])
redis.call('SADD', ARGV[6], v[1])
return {v[1], v[2]}
"""

# KEYS: binding. ARGV: now, expiry, ttl (ms), bound-set prefix, session, account, accounts set.
# Returns the account of the live binding replaced, or nil.
PUT_BINDING = """
local v = redis.call('HMGET', KEYS[1], 'account', 'exp')
local replaced = false
if v[1] then
  if v[2] and tonumber(v[2]) > tonumber(ARGV[1]) then replaced = v[1] end
  if v[1] ~= ARGV[6] then redis.call('ZREM', ARGV[4] .. v[1], ARGV[5]) end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'account', ARGV[6], 'last', ARGV[1], 'exp', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local bound = ARGV[4] .. ARGV[6]
redis.call('ZREMRANGEBYSCORE', bound, '-inf', ARGV[1])
redis.call('ZADD', bound, ARGV[2], ARGV[5])
redis.call('PEXPIRE', bound, ARGV[3])
redis.call('SADD', ARGV[7], ARGV[6])
return replaced
"""

# KEYS: the account's bound set. ARGV: binding prefix, account, accounts set.
# Drops the bindings that still point to the account; returns how many.
DROP_BINDINGS = """
local sessions = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = 0
for _, s in ipairs(sessions) do
  local k = ARGV[1] .. s
  if redis.call('HGET', k, 'account') == ARGV[2] then
    redis.call('DEL', k)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[3], ARGV[2])
return n
"""

# ARGV: now, bound-set prefix, accounts set, 'all' or 'keys', then the account keys.
# Returns account, count, account, count ... (expired members dropped first).
COUNT_BINDINGS = """
local accounts = {}
if ARGV[4] == 'all' then
  accounts = redis.call('SMEMBERS', ARGV[3])
else
  for i = 5, #ARGV do accounts[#accounts + 1] = ARGV[i] end
end
local out = {}
for _, a in ipairs(accounts) do
  local z = ARGV[2] .. a
  redis.call('ZREMRANGEBYSCORE', z, '-inf', ARGV[1])
  local n = redis.call('ZCARD', z)
  if n == 0 then redis.call('SREM', ARGV[3], a) end
  out[#out + 1] = a
  out[#out + 1] = n
end
return out
"""


# The client keys (IClientKeys): ``P:ckeys:live`` hash of key hash -> JSON record,
# ``P:ckeys:revoked`` set of revoked hashes (tombstones, checked in the same step as the write).

# KEYS: live hash, revoked set. ARGV: key hash, record JSON. Returns 1 stored, 0 revoked.
PUT_CLIENT_KEY = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: live hash, revoked set. ARGV: key hash.
REVOKE_CLIENT_KEY = """
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class TokenNotStored(Exception):
    """A token record reached neither Redis nor its file copy; it is kept in memory and written to
    Redis once it is reachable again. The message names the key, never the record."""


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(blob) -> Optional[dict]:
    if blob is None:
        return None
    value = json.loads(blob)
    return value if isinstance(value, dict) else None


@attr.s(auto_attribs=True)
class _PendingWrites:
    """What was written only to the mirror during an outage and must reach Redis on recovery
    (bounded by the account keys touched)."""

    forgets: set = attr.Factory(set)
    cooldowns: set = attr.Factory(set)
    tokens: set = attr.Factory(set)
    token_deletes: set = attr.Factory(set)
    quotas: set = attr.Factory(set)
    client_keys: set = attr.Factory(set)
    client_key_revokes: set = attr.Factory(set)

    def __len__(self):
        return (len(self.forgets) + len(self.cooldowns) + len(self.tokens)
                + len(self.token_deletes) + len(self.quotas) + len(self.client_keys)
                + len(self.client_key_revokes))


@implementer(IStateStore, IAtomicCooldown, ISharedTokens, IQuotaStore, ILockProvider, IStateLifecycle,
             ISessionBindings, IUsageCounters, IClientKeys, ILoginSessions, IWorkerMetrics)
class RedisStateStore(RedisWorkerMetrics, service.Service):
    """``IStateStore`` (and the shared tokens, quotas, cooldown extension and locks) in one Redis,
    shared by every instance that uses the same URL and ``prefix``.

    **Consistency.** Every read goes to Redis (no cache), every read-modify-write is one Lua script,
    so a change made through any instance is seen by every instance's next call: within one
    request. Proxy-wide counters are the exception: each instance adds up its increments and
    sends them within ``COUNTER_FLUSH_DELAY`` (and when it stops); its own ``counters()`` includes
    those not sent yet. While Redis is unreachable each instance serves from its :class:`LocalMirror` (the last
    state it read or wrote, plus its own writes since) and diverges from the others until Redis is
    back; then cooldowns, quota snapshots and token records written meanwhile are written to Redis
    (counts made meanwhile stay local).

    **Keys** (``P`` is the prefix, ``K`` an account key): ``P:cd:K`` cooldown end (expires
    ``COOLDOWN_GRACE`` after it), ``P:lvl:K`` 429 level (``LEVEL_TTL``), ``P:cdat:K`` when the
    latest cooldown was decided (as long as the cooldown or the level; a success sent before it
    leaves both in place), ``P:stats:K`` hash of
    counts (``STATS_TTL`` since the last write), ``P:rate:K`` sorted set of request times (at most
    ``limit`` members, expires with the window), ``P:quota:K`` JSON (``QUOTA_TTL``), ``P:token:K``
    JSON (no TTL), ``P:lock:NAME`` owner token (the lock's TTL), ``P:counters:all`` hash;
    session bindings: ``P:bind:S`` hash {account, last, exp} of session ``S``, ``P:bound:K`` sorted
    set of the sessions bound to ``K`` scored by expiry (counted with no scan), and
    ``P:bindings:accounts`` the set of accounts with bindings (each key expires ``BINDING_GRACE``
    after the binding's TTL). Bindings made while Redis is unreachable stay in this instance's
    mirror (a binding is soft state: at worst a session picks an account afresh). Usage sums of
    the team limits: ``P:usage:day:DAY:NAME`` and ``P:usage:month:MONTH:NAME`` hashes {tokens,
    usd} (``USAGE_DAY_TTL``/``USAGE_MONTH_TTL`` after the last addition; ``NAME`` is a client
    key's name, never the key); additions made while Redis is unreachable stay local.
    mirror (a binding is soft state: at worst a session picks an account afresh).
    Client keys: ``P:ckeys:live`` hash of key hash -> JSON record (hashes and limits only, never a
    key), ``P:ckeys:revoked`` set of revoked hashes (no TTL: a revocation must outlive everything);
    puts and revocations made during an outage are written on recovery, revocations first.
    Worker metrics (``--workers N``): ``P:wm:RUN:...``, see :class:`RedisWorkerMetrics`; never
    served from the mirror (a worker alone knows only its own numbers).

    ``clock`` is the process's clock: times are passed in as everywhere, the clock only turns them
    into TTLs (so expiry never depends on the Redis host's clock) and paces reconnection.
    ``on_token_write(key, record)`` persists the file copy of a token record; it is called before
    a record is written to Redis, and when a read shows a record changed by another instance.

    **Lifecycle.** A service: ``startService`` connects (a :class:`RedisLink`, on Twisted's
    ``ClientService``), ``stopService`` stops reconnecting and closes the connection;
    ``connect``/``close`` (``IStateLifecycle``) do the same and ``connect`` waits for Redis.
    """

    def __init__(self, url: str, clock, *, prefix: str = "clproxy",
                 on_token_write: Optional[Callable[[str, dict], Any]] = None,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect: Callable[[int], float] = reconnect_delay,
                 endpoint=None):
        self.target = parse_redis_url(url)
        self._clock = clock
        self._prefix = prefix
        self._on_token_write = on_token_write
        self.mirror = LocalMirror()
        self._pending = _PendingWrites()
        self._unsent_counts: dict = {}  # counter -> amount added here and not yet sent to Redis
        self._counts_flush = None  # the delayed call that sends them
        # counter -> every amount handed to a flush so far: a counters() read adds what was
        # flushed after its HGETALL left (sent behind it, so not in its reply)
        self._flushed_counts: dict = {}
        self._link = RedisLink(
            self.target, clock,
            endpoint if endpoint is not None else redis_endpoint(self.target, connect_timeout),
            retry=reconnect, reply_timeout=reply_timeout, on_recovered=self._replay)
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

    def startService(self) -> None:
        """Start connecting (and reconnecting whenever the connection is lost)."""
        service.Service.startService(self)
        if not self._link.running:
            self._link.startService()

    def stopService(self) -> Deferred:
        """Send the counts not sent yet, then stop reconnecting and close the connection (the
        mirror stays readable)."""
        service.Service.stopService(self)
        flushed = self.flush_counters()
        if not self._link.running:
            return flushed
        return flushed.addCallback(lambda _: self._link.stopService())

    def connect(self) -> Deferred:
        """Start the service if it is not running and wait for the first connection (PINGed);
        fires with None, or fails with :class:`RedisUnavailable` at the first failed attempt
        (reconnection goes on: calls are served from the mirror until Redis answers)."""
        waiting = self._link.connect()
        if not self.running:
            service.Service.startService(self)
        return waiting

    def close(self) -> Deferred:
        """:meth:`stopService`, for ``IStateLifecycle``."""
        return self.stopService() if self.running else defer.succeed(None)

    def _key(self, kind: str, key: str) -> str:
        return "{}:{}:{}".format(self._prefix, kind, key)

    def _ttl_until(self, until: float, grace: float) -> str:
        return px_ttl(max(0.0, float(until) - self._clock.seconds()) + grace)

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
        except RedisDown:
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
        args = [num(until), self._ttl_until(until, COOLDOWN_GRACE), str(int(backoff_level)),
                px_ttl(LEVEL_TTL)]
        try:
            await self._link.run(script_op(SET_COOLDOWN, [self._key("cd", key),
                                                       self._key("lvl", key)], args))
        except RedisDown:
            self._pending.cooldowns.add(key)
        await self.mirror.set_cooldown(key, until, backoff_level)

    def record_attempt(self, key, now):
        return Deferred.fromCoroutine(self._record(key, now, attempt=True))

    def record_outcome(self, key, outcome, now, error=None, sent_at=None):
        problem = validate_outcome(outcome)
        if problem is not None:
            return defer.fail(problem)
        return Deferred.fromCoroutine(self._record(key, now, outcome=outcome, error=error, sent_at=sent_at))

    def record_result(self, key, outcome, now, error=None, counter=None, sent_at=None):
        problem = validate_outcome(outcome)
        if problem is not None:
            return defer.fail(problem)
        return Deferred.fromCoroutine(self._record(key, now, attempt=True, outcome=outcome, error=error,
                                                  counter=counter, sent_at=sent_at))

    async def _record(self, key, now, *, attempt: bool = False, outcome: Optional[str] = None,
                      error: Optional[str] = None, counter: Optional[str] = None,
                      sent_at: Optional[float] = None):
        """The RECORD script: an attempt, an outcome and a counter, each when asked, in one
        round trip; then the same in the mirror."""
        text = error if error is not None else (outcome or "")
        keys = [self._key("stats", key), self._key("cd", key), self._key("lvl", key),
                self._key("counters", "all"), self._key("cdat", key)]
        args = ["1" if attempt else "", outcome or "", num(now), str(text), px_ttl(STATS_TTL), counter or "",
                "" if sent_at is None else num(sent_at)]
        down = False
        try:
            await self._link.run(script_op(RECORD, keys, args))
        except RedisDown:
            down = True
        if attempt:
            await self.mirror.record_attempt(key, now)
        if counter is not None:
            await self.mirror.incr(counter)
        if outcome is not None:
            await self.mirror.record_outcome(key, outcome, now, error, sent_at=sent_at)
        if down and outcome == OUTCOME_SUCCESS and not self.mirror.holds_cooldown(key):
            # the success ended the cooldown written during the outage: nothing left to replay
            # (a late success, sent before that cooldown, left it in place, still to be written)
            self._pending.cooldowns.discard(key)

    def take_rate_slot(self, key, now, limit, window=60.0):
        if limit < 1:
            return defer.succeed(False)
        return Deferred.fromCoroutine(self._take_rate_slot(key, now, int(limit), window))

    async def _take_rate_slot(self, key, now, limit, window):
        member = num(now) + self._member_prefix + str(next(self._sequence))
        args = [num(now), num(now - window), str(limit), member, px_ttl(window + 1.0)]
        try:
            taken = await self._link.run(script_op(TAKE_RATE_SLOT, [self._key("rate", key)], args))
        except RedisDown:
            return await self.mirror.take_rate_slot(key, now, limit, window)
        if taken:
            # The mirror's window holds this instance's requests only (see the class docstring).
            await self.mirror.take_rate_slot(key, now, limit, window)
        return bool(taken)

    def rate_usage(self, key, now, window=60.0):
        return Deferred.fromCoroutine(self._rate_usage(key, now, window))

    async def _rate_usage(self, key, now, window):
        try:
            reply = await self._link.run(script_op(RATE_USAGE, [self._key("rate", key)],
                                               ["(" + num(now - window)]))
        except RedisDown:
            return await self.mirror.rate_usage(key, now, window)
        if not reply or not reply[0]:
            return (0, None)
        return (int(reply[0]), float(reply[1]))

    def incr(self, counter, amount=1):
        # counted in the mirror at once (what this instance serves while Redis is unreachable) and
        # sent to Redis with the others of the next COUNTER_FLUSH_DELAY
        amount = int(amount)
        unsent = self._unsent_counts
        unsent[counter] = unsent.get(counter, 0) + amount
        if self._counts_flush is None:
            self._counts_flush = self._clock.callLater(COUNTER_FLUSH_DELAY, self.flush_counters)
        return self.mirror.incr(counter, amount)

    def flush_counters(self) -> Deferred:
        """Send to Redis the counter increments made here since the last flush (one HINCRBY per
        counter); fires with None once they are sent, or dropped if Redis is unreachable (counts
        made during an outage stay in this instance's mirror, as they always have)."""
        if self._counts_flush is not None and self._counts_flush.active():
            self._counts_flush.cancel()
        self._counts_flush = None
        unsent, self._unsent_counts = self._unsent_counts, {}
        if not unsent:
            return defer.succeed(None)
        flushed = self._flushed_counts
        for counter, amount in unsent.items():
            flushed[counter] = flushed.get(counter, 0) + amount
        return Deferred.fromCoroutine(self._send_counts(unsent))

    async def _send_counts(self, counts: dict) -> None:
        name = self._key("counters", "all")
        # all sent before any answer: a counters() read made meanwhile queues behind every one
        sent = [self._link.run(lambda r, counter=counter, amount=amount: r.hincrby(name, counter, amount))
                for counter, amount in counts.items()]
        for ok, result in await defer.DeferredList(sent, consumeErrors=True):
            if not ok and not result.check(RedisDown):
                result.raiseException()

    def counters(self):
        return Deferred.fromCoroutine(self._counters())

    async def _counters(self):
        flushed_before = dict(self._flushed_counts)
        try:
            raw = await self._link.run(lambda r: r.hgetall(self._key("counters", "all")))
        except RedisDown:
            return await self.mirror.counters()
        counters = {name: int(value) for name, value in raw.items()}
        # this instance's counts missing from the reply: not sent yet, or flushed (and so sent
        # behind the HGETALL) while it was on its way
        for counter, amount in self._unsent_counts.items():
            counters[counter] = counters.get(counter, 0) + amount
        for counter, amount in self._flushed_counts.items():
            since = amount - flushed_before.get(counter, 0)
            if since:
                counters[counter] = counters.get(counter, 0) + since
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
            reply = await self._link.run(script_op(ACCOUNT_STATS, names, []))
        except RedisDown:
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
        names = [self._key(kind, key) for kind in ACCOUNT_KINDS]
        try:
            await self._link.run(lambda r: r.delete(names))
        except RedisDown:
            self._pending.forgets.add(key)
            self._pending.cooldowns.discard(key)
            self._pending.quotas.discard(key)
        await self.mirror.forget(key)

    # IAtomicCooldown ---------------------------------------------------------------------------

    def extend_cooldown(self, key, until, backoff_level=None, at=None):
        return Deferred.fromCoroutine(self._extend_cooldown(key, until, backoff_level, at))

    def _cooldown_keys(self, key: str) -> list:
        """The KEYS of EXTEND_COOLDOWN: cooldown, level, decision time."""
        return [self._key("cd", key), self._key("lvl", key), self._key("cdat", key)]

    async def _extend_cooldown(self, key, until, backoff_level, at):
        args = [num(until), self._ttl_until(until, COOLDOWN_GRACE),
                "" if backoff_level is None else str(int(backoff_level)), px_ttl(LEVEL_TTL),
                "" if at is None else num(at)]
        try:
            reply = await self._link.run(script_op(EXTEND_COOLDOWN, self._cooldown_keys(key), args))
        except RedisDown:
            self._pending.cooldowns.add(key)
            return await self.mirror.extend_cooldown(key, until, backoff_level, at)
        state = AccountState(float(reply[0]), int(reply[1]))
        self.mirror.adopt_states({key: state})
        self.mirror.adopt_cooled_at(key, float(reply[2]) if len(reply) > 2 and reply[2] else None)
        return state

    # ISharedTokens -----------------------------------------------------------------------------

    def get_token_record(self, key):
        return Deferred.fromCoroutine(self._get_token_record(key))

    async def _get_token_record(self, key):
        try:
            blob = await self._link.run(lambda r: r.get(self._key("token", key)))
        except RedisDown:
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
        except RedisDown:
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
        args = [blob, "" if version is None else num(version), mode, TOKEN_VERSION_FIELD,
                TOKEN_VERSION_FALLBACK]
        try:
            stored = await self._link.run(script_op(PUT_TOKEN_IF_NEWER, [self._key("token", key)],
                                                args))
        except RedisDown:
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
        except RedisDown:
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
                lambda r: r.set(self._key("quota", key), blob, pexpire=px_ttl(QUOTA_TTL)))
        except RedisDown:
            self._pending.quotas.add(key)
        self.mirror.adopt_quota(key, json.loads(blob))

    def get_quotas(self, keys):
        return Deferred.fromCoroutine(self._get_quotas(list(keys)))

    async def _get_quotas(self, keys):
        if not keys:
            return {}
        try:
            blobs = await self._link.run(lambda r: r.mget([self._key("quota", k) for k in keys]))
        except RedisDown:
            return await self.mirror.get_quotas(keys)
        quotas = {}
        for key, blob in zip(keys, blobs):
            quotas[key] = _loads(blob)
            self.mirror.adopt_quota(key, _loads(blob))
        return quotas

    # ISessionBindings --------------------------------------------------------------------------

    def _binding_args(self, session, now, ttl):
        return [num(now), num(now + ttl), px_ttl(float(ttl) + BINDING_GRACE),
                self._key("bound", ""), session]

    def touch_binding(self, session, now, ttl):
        return Deferred.fromCoroutine(self._touch_binding(session, now, ttl))

    async def _touch_binding(self, session, now, ttl):
        args = self._binding_args(session, now, ttl) + [self._key("bindings", "accounts")]
        try:
            reply = await self._link.run(script_op(TOUCH_BINDING, [self._key("bind", session)],
                                                   args))
        except RedisDown:
            return await self.mirror.touch_binding(session, now, ttl)
        if not reply:
            return None
        key, last = reply[0], float(reply[1])
        await self.mirror.put_binding(session, key, now, ttl)
        return (key, last)

    def get_binding(self, session, now):
        return Deferred.fromCoroutine(self._get_binding(session, now))

    async def _get_binding(self, session, now):
        try:
            key, last, expires = await self._link.run(
                lambda r: r.hmget(self._key("bind", session), ["account", "last", "exp"]))
        except RedisDown:
            return await self.mirror.get_binding(session, now)
        if key is None or last is None or expires is None or float(expires) <= now:
            return None
        return (key, float(last))

    def put_binding(self, session, key, now, ttl):
        return Deferred.fromCoroutine(self._put_binding(session, key, now, ttl))

    async def _put_binding(self, session, key, now, ttl):
        args = self._binding_args(session, now, ttl) + [key, self._key("bindings", "accounts")]
        try:
            replaced = await self._link.run(script_op(PUT_BINDING, [self._key("bind", session)],
                                                      args))
        except RedisDown:
            return await self.mirror.put_binding(session, key, now, ttl)
        await self.mirror.put_binding(session, key, now, ttl)
        return replaced or None

    def drop_bindings_of(self, key):
        return Deferred.fromCoroutine(self._drop_bindings_of(key))

    async def _drop_bindings_of(self, key):
        try:
            dropped = await self._link.run(script_op(
                DROP_BINDINGS, [self._key("bound", key)],
                [self._key("bind", ""), key, self._key("bindings", "accounts")]))
        except RedisDown:
            return await self.mirror.drop_bindings_of(key)
        await self.mirror.drop_bindings_of(key)
        return int(dropped)

    def count_bindings(self, now, keys=None):
        return Deferred.fromCoroutine(self._count_bindings(now, None if keys is None else list(keys)))

    async def _count_bindings(self, now, keys):
        args = [num(now), self._key("bound", ""), self._key("bindings", "accounts"),
                "all" if keys is None else "keys"] + ([] if keys is None else keys)
        try:
            reply = await self._link.run(script_op(COUNT_BINDINGS, [], args))
        except RedisDown:
            return await self.mirror.count_bindings(now, keys)
        counts = {name: int(count) for name, count in zip(reply[::2], reply[1::2])}
        if keys is None:
            counts = {name: count for name, count in counts.items() if count}
        return counts

    def limit_bindings(self, cap):
        # Redis bounds its bindings by their TTL; the cap bounds this instance's copy.
        self.mirror.limit_bindings(cap)

    # IUsageCounters ----------------------------------------------------------------------------

    def _usage_key(self, kind: str, period: str, key_name: str) -> str:
        return "{}:usage:{}:{}:{}".format(self._prefix, kind, period, key_name)

    def add_usage(self, key_name, day, tokens, usd):
        return Deferred.fromCoroutine(self._add_usage(key_name, day, int(tokens), float(usd)))

    async def _add_usage(self, key_name, day, tokens, usd):
        keys = [self._usage_key("day", day, key_name), self._usage_key("month", day[:7], key_name)]
        args = [str(tokens), num(usd), px_ttl(USAGE_DAY_TTL), px_ttl(USAGE_MONTH_TTL)]
        try:
            await self._link.run(script_op(ADD_USAGE, keys, args))
        except RedisDown:
            pass  # counted locally only, like the other counts made during an outage
        await self.mirror.add_usage(key_name, day, tokens, usd)
        return None

    def get_usage(self, key_name, day):
        return Deferred.fromCoroutine(self._get_usage("day", day, key_name))

    def get_month_usage(self, key_name, month):
        return Deferred.fromCoroutine(self._get_usage("month", month, key_name))

    async def _get_usage(self, kind, period, key_name):
        try:
            tokens, usd = await self._link.run(
                lambda r: r.hmget(self._usage_key(kind, period, key_name), ["tokens", "usd"]))
        except RedisDown:
            if kind == "day":
                return await self.mirror.get_usage(key_name, period)
            return await self.mirror.get_month_usage(key_name, period)
        return (int(tokens or 0), float(usd or 0.0))

    # ILoginSessions ----------------------------------------------------------------------------
    # One string per session, "KEYHASH EXPIRES", living until it expires (Redis drops it then).
    # During an outage the mirror holds the sessions opened meanwhile; they are not replayed:
    # at worst a person logs in again.

    def put_login(self, digest, key_hash, expires, now):
        return Deferred.fromCoroutine(self._put_login(digest, key_hash, float(expires), float(now)))

    async def _put_login(self, digest, key_hash, expires, now):
        await self.mirror.put_login(digest, key_hash, expires, now)
        value = "{} {}".format(key_hash, num(expires))
        try:
            await self._link.run(lambda r: r.set(self._key("login", digest), value,
                                                 pexpire=int(px_ttl(expires - now))))
        except RedisDown:
            pass

    def get_login(self, digest, now):
        return Deferred.fromCoroutine(self._get_login(digest, float(now)))

    async def _get_login(self, digest, now):
        try:
            value = await self._link.run(lambda r: r.get(self._key("login", digest)))
        except RedisDown:
            return await self.mirror.get_login(digest, now)
        if not isinstance(value, (str, bytes)):
            return None
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        key_hash, _, expires = value.partition(" ")
        try:
            return key_hash if float(expires) > now else None
        except ValueError:
            return None

    def drop_login(self, digest):
        return Deferred.fromCoroutine(self._drop_login(digest))

    async def _drop_login(self, digest):
        await self.mirror.drop_login(digest)
        try:
            await self._link.run(lambda r: r.delete(self._key("login", digest)))
        except RedisDown:
            pass

    # ILockProvider -----------------------------------------------------------------------------

    def acquire(self, name, ttl_ms, wait, clock):
        ttl_ms = max(1, int(ttl_ms))

        async def try_once():
            owner = new_owner()
            try:
                reply = await self._link.run(lambda r: r.set(
                    self._key("lock", name), owner, pexpire=ttl_ms, only_if_not_exists=True))
            except RedisDown:
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
            released = await self._link.run(script_op(RELEASE_LOCK, [self._key("lock", token.name)],
                                                  [token.owner]))
        except RedisDown:
            return False  # the lock ends with its TTL
        return bool(released)

    # IClientKeys -------------------------------------------------------------------------------

    def _client_key_names(self):
        return [self._key("ckeys", "live"), self._key("ckeys", "revoked")]

    def put_key(self, key_hash, record):
        return Deferred.fromCoroutine(self._put_key(key_hash, dict(record)))

    async def _put_key(self, key_hash, record):
        blob = _json(record)
        try:
            stored = await self._link.run(script_op(PUT_CLIENT_KEY, self._client_key_names(),
                                                    [key_hash, blob]))
        except RedisDown:
            stored = await self.mirror.put_key(key_hash, record)
            if stored:
                self._pending.client_keys.add(key_hash)
            return stored
        if stored:
            await self.mirror.put_key(key_hash, record)
        else:
            await self.mirror.revoke_key(key_hash)
        return bool(stored)

    def revoke_key(self, key_hash):
        return Deferred.fromCoroutine(self._revoke_key(key_hash))

    async def _revoke_key(self, key_hash):
        try:
            await self._link.run(script_op(REVOKE_CLIENT_KEY, self._client_key_names(), [key_hash]))
        except RedisDown:
            self._pending.client_key_revokes.add(key_hash)
        self._pending.client_keys.discard(key_hash)
        await self.mirror.revoke_key(key_hash)

    def all_keys(self):
        return Deferred.fromCoroutine(self._all_keys())

    async def _all_keys(self):
        try:
            raw = await self._link.run(lambda r: r.hgetall(self._key("ckeys", "live")))
        except RedisDown:
            return await self.mirror.all_keys()
        records = {}
        for key_hash, blob in (raw or {}).items():
            record = _loads(blob)
            if record is not None:
                records[key_hash] = record
        # puts made here during an outage and not yet replayed are live too
        mine = await self.mirror.all_keys()
        for key_hash in self._pending.client_keys:
            if key_hash in mine:
                records.setdefault(key_hash, mine[key_hash])
        for key_hash in self._pending.client_key_revokes:
            records.pop(key_hash, None)
        self.mirror.adopt_client_keys(records)
        return records

    # Recovery ----------------------------------------------------------------------------------

    async def _replay(self):
        """Write to Redis what was written only to the mirror while it was unreachable."""
        pending = self._pending
        if not len(pending) and not self.mirror.token_keys():
            return
        count = len(pending)
        for key in sorted(pending.forgets):
            names = [self._key(kind, key) for kind in ACCOUNT_KINDS]
            await self._link.run(lambda r, names=names: r.delete(names))
            pending.forgets.discard(key)
        for key in sorted(pending.token_deletes):
            await self._link.run(lambda r, key=key: r.delete(self._key("token", key)))
            pending.token_deletes.discard(key)
        # Every token record known here goes back: the ones written during the outage win unless
        # Redis holds a newer one; the others only fill a Redis that lost them (restarted empty).
        for key in self.mirror.token_keys():
            record = fired(self.mirror.get_token_record(key))
            mode = "replay" if key in pending.tokens else "import"
            blob = _json(record)
            version = token_version(record)
            await self._link.run(script_op(PUT_TOKEN_IF_NEWER, [self._key("token", key)],
                                       [blob, "" if version is None else num(version), mode,
                                        TOKEN_VERSION_FIELD, TOKEN_VERSION_FALLBACK]))
            pending.tokens.discard(key)
        for key in sorted(pending.quotas):
            snapshot = fired(self.mirror.get_quotas([key]))[key]
            if snapshot is not None:
                blob = _json(snapshot)
                await self._link.run(lambda r, key=key, blob=blob: r.set(
                    self._key("quota", key), blob, pexpire=px_ttl(QUOTA_TTL)))
            pending.quotas.discard(key)
        for key in sorted(pending.cooldowns):
            state = fired(self.mirror.get_account_states([key]))[key]
            at = self.mirror.cooled_at(key)
            await self._link.run(script_op(EXTEND_COOLDOWN, self._cooldown_keys(key),
                                       [num(state.cooling_until),
                                        self._ttl_until(state.cooling_until, COOLDOWN_GRACE),
                                        str(state.backoff_level), px_ttl(LEVEL_TTL),
                                        "" if at is None else num(at)]))
            pending.cooldowns.discard(key)
        for key_hash in sorted(pending.client_key_revokes):
            await self._link.run(script_op(REVOKE_CLIENT_KEY, self._client_key_names(), [key_hash]))
            pending.client_key_revokes.discard(key_hash)
        mine = fired(self.mirror.all_keys())
        for key_hash in sorted(pending.client_keys):
            if key_hash in mine:
                await self._link.run(script_op(PUT_CLIENT_KEY, self._client_key_names(),
                                               [key_hash, _json(mine[key_hash])]))
            pending.client_keys.discard(key_hash)
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
