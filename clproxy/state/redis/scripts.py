"""The Lua scripts of the Redis store (each one read-modify-write, atomic in Redis) and how
values cross into them.
"""

import math

#: No key gets a longer TTL than this (seconds), whatever cooldown it holds.
MAX_TTL = 400 * 24 * 3600.0

# Every value crossing into a script is a string made by ``num`` (repr of a float round-trips
# exactly through Redis's strtod); every time coming back is the stored string, never a Lua number
# (Lua would print it with 14 digits).

SET_COOLDOWN = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

EXTEND_COOLDOWN = """
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

RECORD_ATTEMPT = """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'last_attempt_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

RECORD_OUTCOME = """
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
TAKE_RATE_SLOT = """
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
RATE_USAGE = """
local first = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #first == 0 then return {0} end
return {redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf'), first[2]}
"""

# KEYS: stats, cooldown, level of each account in turn
ACCOUNT_STATS = """
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
PUT_TOKEN_IF_NEWER = """
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

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def num(value) -> str:
    """A number as Redis and Lua read it back exactly."""
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN is not a time")
    return repr(value)


def px_ttl(seconds: float) -> str:
    """A TTL in whole milliseconds, at least 1 and at most ``MAX_TTL``."""
    if math.isnan(seconds):
        seconds = MAX_TTL
    return str(max(1, int(min(seconds, MAX_TTL) * 1000)))


def script_op(script: str, keys, args):
    """An ``op`` for ``RedisLink.run``: EVALSHA, falling back to EVAL (txredisapi keeps the SHA1s
    each connection has loaded)."""
    return lambda handler: handler.eval(script, keys, args)


# Session bindings (ISessionBindings). A binding is the hash ``P:bind:SESSION`` {account, last,
# exp}; each account's bound sessions are the sorted set ``P:bound:ACCOUNT`` scored by expiry time
# (counted without a scan); ``P:bindings:accounts`` is the set of accounts that have one. Expiry
# is decided by the times passed in (``exp <= now``: gone); the key TTLs only reclaim memory.
# The scripts name keys derived from values (the old account of a moved session), as a single
# Redis allows.

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
