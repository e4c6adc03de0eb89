"""``IWorkerMetrics`` in Redis: each worker's latest metric report, and the totals of the workers
a run replaced, so that ``/metrics`` on any worker of ``--workers N`` answers for all of them.

Unlike the rest of the store nothing is served from the local mirror: a worker that cannot reach
Redis has only its own numbers, and the failure tells its caller so (``RedisDown``).
"""

import json
from typing import Any

from clproxy.state.model import add_series
from clproxy.state.redis.scripts import num, px_ttl, script_op

#: A run's reports vanish this long (seconds) after its last report (a supervisor gone for good).
RUN_TTL = 7 * 24 * 3600.0

# KEYS: workers set, retired hash, the worker's incarnation, totals hash, gauges.
# ARGV: worker, incarnation, run ttl (ms), gauges blob, key prefix of the run, series, value ...
# Another incarnation's totals are added to the retired ones before being replaced: one step, so
# a reader never sees them in neither place (or in both). Every key of the run, every worker's
# too, lives RUN_TTL from now: a run's sums never lose a part while any of its workers reports.
PUBLISH_WORKER_METRICS = """
local cur = redis.call('GET', KEYS[3])
if cur and cur ~= ARGV[2] then
  local old = redis.call('HGETALL', KEYS[4])
  for i = 1, #old, 2 do redis.call('HINCRBYFLOAT', KEYS[2], old[i], old[i + 1]) end
end
redis.call('DEL', KEYS[4])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  redis.call('PEXPIRE', ARGV[5] .. 'totals:' .. w, ARGV[3])
  redis.call('PEXPIRE', ARGV[5] .. 'inc:' .. w, ARGV[3])
  redis.call('PEXPIRE', ARGV[5] .. 'gauges:' .. w, ARGV[3])
end
return 1
"""

# KEYS: workers set, retired hash. ARGV: key prefix of the run.
# Returns the retired totals, then each worker's totals and gauges blob (nil when none).
READ_WORKER_METRICS = """
local out = {redis.call('HGETALL', KEYS[2])}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. 'totals:' .. w)
  out[#out + 1] = redis.call('GET', ARGV[1] .. 'gauges:' .. w) or false
end
return out
"""


def _pairs(flat):
    return zip(flat[::2], flat[1::2])


class RedisWorkerMetrics:
    """``IWorkerMetrics`` for :class:`~clproxy.state.redis.store.RedisStateStore` (a mixin over its
    ``_link`` and ``_prefix``).

    **Keys** (``R`` is ``P:wm:RUN``, ``W`` a worker index): ``R:workers`` the set of indexes that
    reported, ``R:inc:W`` the incarnation whose totals ``R:totals:W`` (hash series -> value) holds,
    ``R:gauges:W`` JSON ``{"until", "gauges"}``, ``R:retired`` hash of the totals of incarnations
    replaced. Values cross as strings and are summed in Python (Lua would print 14 digits).
    """

    _link: Any
    _prefix: str

    def _run_prefix(self, run) -> str:
        return "{}:wm:{}:".format(self._prefix, run)

    def publish_worker_metrics(self, run, worker, incarnation, totals, gauges, now, ttl):
        prefix, index = self._run_prefix(run), str(int(worker))
        keys = [prefix + "workers", prefix + "retired", prefix + "inc:" + index,
                prefix + "totals:" + index, prefix + "gauges:" + index]
        blob = json.dumps({"until": float(now) + float(ttl), "gauges": add_series({}, gauges)},
                          sort_keys=True, separators=(",", ":"))
        args = [index, str(incarnation), px_ttl(RUN_TTL), blob, prefix]
        for series, value in totals.items():
            args += [series, num(value)]
        op = script_op(PUBLISH_WORKER_METRICS, keys, args)
        return self._link.run(op).addCallback(lambda _: None)

    def read_worker_metrics(self, run, now):
        prefix = self._run_prefix(run)
        op = script_op(READ_WORKER_METRICS, [prefix + "workers", prefix + "retired"], [prefix])
        return self._link.run(op).addCallback(_sums, float(now))


def _sums(reply, now: float):
    totals = add_series({}, _pairs(reply[0] or []))
    gauges: dict = {}
    for flat, blob in _pairs(reply[1:]):
        add_series(totals, _pairs(flat or []))
        report = json.loads(blob) if blob else None
        if isinstance(report, dict) and float(report.get("until") or 0) > now:
            add_series(gauges, report.get("gauges") or {})
    return totals, gauges

