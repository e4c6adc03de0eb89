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

# KEYS: cooldown, level, decision time. ARGV: until, its TTL, level ('' to keep it), level TTL,
# when this cooldown was decided ('' when unknown: the decision time is left alone). The decision
# time is kept as long as the cooldown or the level, whichever lasts longer (a success reads it).
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
local at = redis.call('GET', KEYS[3])
if ARGV[5] ~= '' then
  if not at or tonumber(ARGV[5]) > tonumber(at) then at = ARGV[5] end
  local ttl = math.max(redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
  if ttl > 0 then redis.call('SET', KEYS[3], at, 'PX', ttl) end
end
return {untilv, lvl, at}
"""

# One attempt's bookkeeping, any part of it: KEYS stats, cooldown, level, counters, cooldown
# decision time; ARGV count an attempt ('1' or ''), outcome ('' for none), now, error text, stats
# TTL, counter ('' for none), when the attempt was sent ('' when unknown). The attempt, its outcome
# and the proxy-wide counter in one script are one round trip, not three. A success ends the
# cooldown and resets the level only when it was sent after the cooldown was decided
# (``clproxy.state.model.success_clears``): a slow request sent before a 429 must not undo it.
RECORD = """
if ARGV[1] == '1' then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'last_attempt_at', ARGV[3])
end
if ARGV[2] == 'success' then
  redis.call('HINCRBY', KEYS[1], 'successes', 1)
  local at = ARGV[7] ~= '' and redis.call('GET', KEYS[5])
  if not at or tonumber(at) < tonumber(ARGV[7]) then
    redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
  end
elseif ARGV[2] ~= '' then
  local field = 'errors'
  if ARGV[2] == 'rate-limited' then field = 'rate_limits' end
  redis.call('HINCRBY', KEYS[1], field, 1)
  redis.call('HSET', KEYS[1], 'last_error_at', ARGV[3], 'last_error', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
end
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

# ARGV: record, its version ('' when none), mode ('import': the stored record wins unless both
# are versioned and it is older; 'replay': the stored record wins only when both are versioned and
# it is newer), the version field (TOKEN_VERSION_FIELD) and the one a record without it is ordered
# by (TOKEN_VERSION_FALLBACK), as token_version reads them
PUT_TOKEN_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local new = tonumber(ARGV[2])
  local old = nil
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' then old = tonumber(rec[ARGV[4]]) or tonumber(rec[ARGV[5]]) end
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
