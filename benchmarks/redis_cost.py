"""What the Redis state store adds to each request, against the memory store, in one run.

One "request" is the sequence of store calls one successful request makes through ``AccountPool``:
``candidates`` (states of every account, plus rate usage when accounts have a rateLimit), ``admit``
(a rate slot when limited) and ``record`` (attempt, counter and outcome in one call; a success
does not read the backoff level). Each
scenario runs against a MemoryStateStore and a RedisStateStore (a fresh key prefix), one request
at a time (latency) and with many in flight (throughput), and prints both side by side with the
ratio.

Run: ``python benchmarks/redis_cost.py`` (starts a throwaway redis-server on a free port), or
``--url redis://host:port/db`` to measure against a running Redis (keys go under a random prefix
and are deleted afterwards).
"""

import argparse
import os
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from twisted.internet import defer, task  # noqa: E402

from clproxy.accounts.model import Account  # noqa: E402
from clproxy.routing.policy import SUCCESS, Verdict  # noqa: E402
from clproxy.routing.pool import AccountPool  # noqa: E402
from clproxy.state.memory import MemoryStateStore  # noqa: E402
from clproxy.state.redis import RedisStateStore  # noqa: E402

OK = Verdict(SUCCESS, 200, "ok", None, 0)


async def one_request(pool, accounts):
    """The store calls of one successful request through the pool."""
    candidates = await pool.candidates(accounts)
    account = candidates[0]
    if not await pool.admit(account):
        raise RuntimeError("rate limit reached during the benchmark")
    await pool.record(account, OK)


async def sequential(pool, accounts, count):
    """Seconds for ``count`` requests one after another."""
    started = time.perf_counter()
    for _ in range(count):
        await one_request(pool, accounts)
    return time.perf_counter() - started


async def concurrent(pool, accounts, count, in_flight):
    """Seconds for ``count`` requests with ``in_flight`` running at once."""
    per_worker = count // in_flight

    async def worker():
        for _ in range(per_worker):
            await one_request(pool, accounts)

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)])
    return time.perf_counter() - started, per_worker * in_flight


async def ping_round_trip(store, count):
    """µs per PING, one at a time, on the store's connection: the floor of one Redis call."""
    handler = store._link._handler
    started = time.perf_counter()
    for _ in range(count):
        await handler.ping()
    return (time.perf_counter() - started) / count * 1e6


def make_accounts(count, rate_limit):
    return [Account(key="bench:{}".format(i), name="bench{}".format(i), rate_limit=rate_limit)
            for i in range(count)]


async def measure(reactor, store, accounts, count, in_flight, repeats):
    """(µs per request one at a time, requests/s with ``in_flight``) for one store: the best of
    ``repeats`` runs (the machine's noise only ever slows a run down)."""
    pool = AccountPool(store, clock=reactor)
    await sequential(pool, accounts, max(50, count // 20))  # warm up: scripts loaded, caches hot
    latency, throughput = float("inf"), 0.0
    for _ in range(repeats):
        seconds = await sequential(pool, accounts, count)
        latency = min(latency, seconds / count * 1e6)
        seconds, done = await concurrent(pool, accounts, count, in_flight)
        throughput = max(throughput, done / seconds)
    return latency, throughput


async def redis_calls_per_request(reactor, store, accounts):
    """How many Redis commands one request sends (each is one round trip when alone)."""
    pool = AccountPool(store, clock=reactor)
    before = store._link.calls
    await sequential(pool, accounts, 10)
    return (store._link.calls - before) / 10


async def main(reactor, options):
    server = None
    url = options.url
    if url is None:
        from redis_server import RedisServer
        server = RedisServer(tempfile.mkdtemp(prefix="clproxy-bench-redis-"))
        server.start()
        url = server.url
    prefix = "clproxy-bench-" + uuid.uuid4().hex[:8]
    redis_store = RedisStateStore(url, reactor, prefix=prefix)
    await redis_store.connect()
    scenarios = [("no rateLimit", None), ("rateLimit on", 10 ** 9)]
    rows = []
    try:
        round_trip = await ping_round_trip(redis_store, options.requests)
        for title, limit in scenarios:
            accounts = make_accounts(options.accounts, limit)
            memory = await measure(reactor, MemoryStateStore(), accounts, options.requests,
                                   options.in_flight, options.repeats)
            for account in accounts:
                await redis_store.forget(account.key)
            shared = await measure(reactor, redis_store, accounts, options.requests,
                                   options.in_flight, options.repeats)
            calls = await redis_calls_per_request(reactor, redis_store, accounts)
            rows.append((title, memory, shared, calls))
            for account in accounts:
                await redis_store.forget(account.key)
        assert redis_store._link.failed_calls == 0, "some calls were not answered by Redis"
    finally:
        handler = redis_store._link._handler
        if handler is not None:
            await handler.delete(["{}:counters:all".format(prefix)])
        await redis_store.close()
        if server is not None:
            server.stop()

    print("store calls of one successful request through AccountPool "
          "(candidates, admit, record); {} accounts, {} requests, {} in flight, "
          "best of {}".format(options.accounts, options.requests, options.in_flight,
                              options.repeats))
    print("redis: {}; one PING round trip (txredisapi, one at a time): {:.1f} µs".format(
        redis_store.url, round_trip))
    header = "{:<14} {:>15} {:>15} {:>9}   {:>14} {:>14} {:>9}".format(
        "scenario", "memory µs/req", "redis µs/req", "ratio", "memory req/s", "redis req/s",
        "ratio")
    print(header)
    print("-" * len(header))
    for title, (m_lat, m_rps), (r_lat, r_rps), calls in rows:
        print("{:<14} {:>15.1f} {:>15.1f} {:>8.1f}x   {:>14,.0f} {:>14,.0f} {:>8.1f}x".format(
            title, m_lat, r_lat, r_lat / m_lat, m_rps, r_rps, m_rps / r_rps))
        print("{:<14} added by redis: {:.1f} µs per request one at a time; {:g} redis calls per "
              "request, {:.0f} µs each".format("", r_lat - m_lat, calls, (r_lat - m_lat) / calls))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Redis (default: start a throwaway redis-server)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; best kept")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
