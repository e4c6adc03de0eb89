"""``/metrics`` summed over the workers of ``--workers N`` (clproxy.observe.aggregate), on a
``task.Clock`` with the memory store standing in for Redis: several ``Observability`` objects are
the workers, each with its own ``WorkerMetrics``."""

import pytest
import pytest_twisted
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from twisted.internet import defer

from clproxy.observe.aggregate import GAUGE_TTL, PUBLISH_INTERVAL, WorkerMetrics, exposition, merge, split
from clproxy.observe.recorder import Observability
from clproxy.state.memory import MemoryStateStore
from helpers import post
from test_observe_metrics import make_clock, samples, scrape, traffic, value

HOME = dict(account="home", model="claude-sonnet-4-5", provider="anthropic")


def requests(found: dict) -> float:
    """clproxy_requests_total of status 200 on the account "home" (2 per ``traffic``)."""
    return value(found, "clproxy_requests_total", status="200", **HOME)


class Run:
    """Workers of one run sharing ``store`` on ``clock``."""

    def __init__(self, store=None, clock=None):
        self.clock = clock or make_clock()
        self.store = store if store is not None else MemoryStateStore()

    async def two_busy_workers(self):
        """Workers 1 and 2 after two requests on the first and four on the second (``traffic``
        twice), the second's published: ``(first, its metrics, second, its metrics)``."""
        first, first_metrics = self.worker(1, "a")
        second, second_metrics = self.worker(2, "b")
        traffic(first, self.clock)
        traffic(second, self.clock)
        traffic(second, self.clock)
        await second_metrics.publish()
        return first, first_metrics, second, second_metrics

    def worker(self, index: int, incarnation: str, **kwargs):
        obs = Observability(clock=self.clock, logs_dir=None)
        metrics = WorkerMetrics(obs.metrics, self.store, self.clock, run="run-1", worker=index,
                                incarnation=incarnation, **kwargs)
        return obs, metrics


async def render(metrics: WorkerMetrics) -> dict:
    body, content_type = await metrics.render()
    assert content_type.startswith("text/plain")
    return samples(body.decode("utf-8"))


@pytest_twisted.ensureDeferred
async def test_a_worker_publishes_at_start_every_second_and_not_after_stop():
    """Published at start and every PUBLISH_INTERVAL on the clock (with what was counted since);
    nothing after stop but the last report."""
    run = Run()
    obs, metrics = run.worker(1, "a")

    async def stored_requests():
        totals, _ = await run.store.read_worker_metrics("run-1", run.clock.seconds())
        return sum(v for k, v in totals.items() if k.startswith('["clproxy_requests","clproxy_requests_total"'))

    traffic(obs, run.clock)
    metrics.startService()
    assert metrics.published == 1 and await stored_requests() == 3
    obs.metrics.request_finished(200, "home", "claude-sonnet-4-5", "anthropic", 0.3, 0.1, None, False)
    run.clock.advance(PUBLISH_INTERVAL * 0.9)
    assert metrics.published == 1 and await stored_requests() == 3
    run.clock.advance(PUBLISH_INTERVAL * 0.1)
    assert metrics.published == 2 and await stored_requests() == 4
    run.clock.advance(PUBLISH_INTERVAL)
    assert metrics.published == 3
    await metrics.stopService()
    assert metrics.published == 4  # the last one, on stop
    run.clock.advance(10 * PUBLISH_INTERVAL)
    assert metrics.published == 4 and not run.clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_scrape_sums_counters_and_histograms_over_workers_and_counts_shared_gauges_once():
    """Counters and histogram buckets, sums and counts are the workers' sums on whichever worker is
    scraped; a gauge read from the shared store (account cooling) is told once, not per worker."""
    run = Run()
    first, first_metrics, second, second_metrics = await run.two_busy_workers()
    for obs in (first, second):
        obs.metrics.set_accounts([{"name": "work", "cooling_until": run.clock.seconds() + 60, "backoff_level": 1}])
    for metrics in (first_metrics, second_metrics):
        found = await render(metrics)
        assert requests(found) == 6
        assert value(found, "clproxy_request_duration_seconds_count", **HOME) == 6
        assert value(found, "clproxy_request_duration_seconds_sum", **HOME) == 9.0
        assert value(found, "clproxy_request_duration_seconds_bucket", le="2.0", **HOME) == 3
        assert value(found, "clproxy_tokens_total", type="cache_read", **HOME) == 15000
        assert value(found, "clproxy_session_moves_total") == 0
        assert value(found, "clproxy_account_cooling", account="work") == 1
        assert value(found, "clproxy_account_backoff_level", account="work") == 1
        assert value(found, "clproxy_metrics_partial") == 0
    assert (first_metrics.aggregated, second_metrics.aggregated) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_the_sums_render_as_valid_openmetrics():
    """Series known to one worker only, merged with the answering worker's, still form valid
    OpenMetrics (each series' buckets in order, then count and sum)."""
    run = Run()
    first, first_metrics = run.worker(1, "a")
    second, second_metrics = run.worker(2, "b")
    traffic(second, run.clock)
    first.metrics.request_finished(200, "work", "claude-haiku-4-5", "anthropic", 0.3, 0.1, None, False)
    await second_metrics.publish()
    body, content_type = await first_metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode("utf-8"))}
    durations = families["clproxy_request_duration_seconds"].samples
    assert {s.labels["account"] for s in durations} == {"-", "home", "work"}


def test_merged_samples_are_ordered_whatever_order_the_store_gives():
    """The store's sums come in any order (Redis hashes have none): merged, each histogram series
    still has its buckets in order, then its count and sum, so OpenMetrics parses it."""
    clock = make_clock()
    obs = Observability(clock=clock, logs_dir=None)
    traffic(obs, clock)
    families = list(obs.metrics.registry.collect())
    totals, gauges = split(families)
    shuffled = dict(reversed(list(totals.items())))  # every bucket after the one above it
    merged = merge(families, shuffled, gauges)
    body, _ = exposition(merged, "application/openmetrics-text; version=1.0.0")
    own, _ = obs.metrics.render("application/openmetrics-text; version=1.0.0")

    def by_family(text: bytes) -> dict:
        return {f.name: sorted(map(repr, f.samples)) for f in openmetrics_families(text.decode("utf-8"))}
    assert by_family(body) == by_family(own)


@pytest_twisted.ensureDeferred
async def test_per_process_gauges_sum_over_live_workers_and_vanish_after_the_ttl():
    """Requests in flight are summed over workers whose report is younger than GAUGE_TTL; a worker
    that stopped reporting (dead) leaves the sum then, its counters stay."""
    run = Run()
    first, first_metrics = run.worker(1, "a")
    second, second_metrics = run.worker(2, "b")
    first.metrics.in_flight, second.metrics.in_flight = 1, 2
    traffic(second, run.clock)
    await second_metrics.publish()  # its last report
    run.clock.advance(GAUGE_TTL - 0.01)
    found = await render(first_metrics)
    assert value(found, "clproxy_requests_in_flight") == 3
    run.clock.advance(0.02)
    found = await render(first_metrics)
    assert value(found, "clproxy_requests_in_flight") == 1
    assert requests(found) == 2


@pytest_twisted.ensureDeferred
async def test_a_replaced_worker_never_makes_a_counter_go_down():
    """Worker 2 dies and a new incarnation starts from zero: its predecessor's last totals are
    retired into the run's, so every scrape's request count is at least the one before."""
    run = Run()
    first, first_metrics, _, _ = await run.two_busy_workers()
    seen = [requests(await render(first_metrics))]
    assert seen == [6]
    reborn, reborn_metrics = run.worker(2, "c")  # worker 2's new process, nothing counted yet
    reborn_metrics.startService()
    seen.append(requests(await render(first_metrics)))
    traffic(reborn, run.clock)
    seen.append(requests(await render(reborn_metrics)))
    seen.append(requests(await render(first_metrics)))
    assert seen == [6, 6, 8, 8]
    reborn_metrics.stopService()


class FailingStore(MemoryStateStore):
    """A store whose worker metrics fail as Redis does when it is unreachable (the rest works)."""

    def __init__(self, fail_publish: bool = True):
        super().__init__()
        self.fail_publish = fail_publish
        self.down = True

    def publish_worker_metrics(self, *args):
        if self.down and self.fail_publish:
            return defer.fail(ConnectionError("redis is down"))
        return super().publish_worker_metrics(*args)

    def read_worker_metrics(self, run, now):
        if self.down:
            return defer.fail(ConnectionError("redis is down"))
        return super().read_worker_metrics(run, now)


@pytest.mark.parametrize("fail_publish", [True, False])
@pytest_twisted.ensureDeferred
async def test_an_unreachable_store_gives_own_numbers_and_the_partial_flag(fail_publish, logs):
    """With the store failing (publishing, or only reading) a scrape answers this worker's own
    numbers with clproxy_metrics_partial 1, never an error; the failure is logged once, and so is
    the first scrape that sums again once the store answers."""
    run = Run(store=FailingStore(fail_publish))
    obs, metrics = run.worker(1, "a")
    traffic(obs, run.clock)
    metrics.startService()
    run.clock.advance(3 * PUBLISH_INTERVAL)
    for _ in range(2):
        found = await render(metrics)
        assert requests(found) == 2
        assert value(found, "clproxy_metrics_partial") == 1
    assert metrics.partial == 2
    assert len([line for line in logs if "cannot reach the shared state store" in line]) == 1
    run.store.down = False
    for _ in range(2):
        assert value(await render(metrics), "clproxy_metrics_partial") == 0
    assert len([line for line in logs if "answers again" in line]) == 1
    metrics.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_publishes_the_last_totals_after_the_drain_with_gauges_that_end_now():
    """On stop the worker waits for its requests to finish, then reports totals that include them
    and gauges that no longer count."""
    run = Run()
    first, first_metrics = run.worker(1, "a")
    drained = defer.Deferred()
    second, second_metrics = run.worker(2, "b", drained=lambda: drained)
    second_metrics.startService()
    second.metrics.in_flight = 1
    stopped = second_metrics.stopService()
    traffic(second, run.clock)  # the requests in flight finish during the drain
    second.metrics.in_flight = 0
    assert not stopped.called
    drained.callback(None)
    assert stopped.called
    found = await render(first_metrics)
    assert requests(found) == 2 and value(found, "clproxy_requests_in_flight") == 0


@pytest_twisted.ensureDeferred
async def test_metrics_resource_answers_the_sums_and_its_own_numbers_when_they_fail():
    """GET /metrics on a worker answers WorkerMetrics' sums; should the sums themselves raise, it
    answers the worker's own numbers (200, never an error page)."""
    run = Run()
    first, first_metrics = run.worker(1, "a")
    second, second_metrics = run.worker(2, "b")
    traffic(first, run.clock)
    traffic(second, run.clock)
    await second_metrics.publish()
    resource = first.metrics_resource()
    assert resource is first.metrics_resource()  # one per daemon: the worker wires this one
    resource.exposition = first_metrics.render
    response, text = await scrape(resource)
    assert response.code == 200 and requests(samples(text)) == 4
    assert value(samples(text), "clproxy_metrics_partial") == 0

    async def broken(accept):
        raise RuntimeError("a bug")
    resource.exposition = broken
    response, text = await scrape(resource)
    assert response.code == 200 and requests(samples(text)) == 2
    assert "clproxy_metrics_partial" not in text


@pytest_twisted.ensureDeferred
async def test_a_single_daemon_renders_its_own_numbers_with_no_store_traffic(start_proxy):
    """Without a supervisor /metrics is the book's own exposition, as before: no partial gauge and
    nothing published to the state store."""
    proxy = start_proxy({})
    store = proxy.service.store
    calls = []
    store.publish_worker_metrics = lambda *args: calls.append(args)
    store.read_worker_metrics = lambda *args: calls.append(args)
    code, _, body = await post(proxy.url + "/metrics", b"", method=b"GET")
    text = body.decode("utf-8")
    assert code == 200 and "clproxy_requests_in_flight" in text
    assert "clproxy_metrics_partial" not in text and calls == []
