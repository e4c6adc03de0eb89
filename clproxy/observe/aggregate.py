"""``/metrics`` under ``--workers N``: every worker publishes its own numbers to the shared state
store, and a scrape on any worker answers with the sums over every worker of the run.

Counters and histograms are summed over every worker the run ever had (a replaced worker's last
totals are retired into the sum by the store: ``IWorkerMetrics``), so they never go down.
Per-process gauges (:data:`PER_PROCESS_GAUGES`) are summed over the workers that reported within
:data:`GAUGE_TTL`. Every other gauge is read from the shared store or the config by the worker that
answers (cooldowns, quota utilization) and is told once, as it is. When the store cannot be read
the scrape still answers, with the worker's own numbers and ``clproxy_metrics_partial 1``.
"""

import json
from typing import Dict, Iterable, List, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Sample
from twisted.application import service
from twisted.internet import defer, task

from clproxy.observe.console import logger

log = logger(__name__)

#: Seconds between two reports of a worker.
PUBLISH_INTERVAL = 1.0
#: Seconds a worker's per-process gauges count after its report: a dead worker's in-flight
#: requests vanish from the sum this long after its last report.
GAUGE_TTL = 5.0
#: Metric types whose samples are running totals of a process (summed over the run's workers).
SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})
#: Gauges that are one process's own (summed over live workers); any other gauge is the same in
#: every worker (it is read from the shared store or the config) and is told once.
PER_PROCESS_GAUGES = frozenset({"clproxy_requests_in_flight", "clproxy_log_records_pending"})
#: Where a sample goes among its series' samples (Prometheus and OpenMetrics want buckets in order,
#: then the count and the sum).
_SUFFIX_ORDER = {"_bucket": 0, "_total": 0, "_count": 1, "_sum": 2}

Series = Dict[str, float]


def series_key(family: str, sample: Sample) -> str:
    """The store's name of one sample: its family, its own name and its labels (JSON: any label
    value round-trips)."""
    return json.dumps([family, sample.name, sorted(sample.labels.items())], separators=(",", ":"))


def split(families: Iterable[Metric]) -> Tuple[Series, Series]:
    """``(totals, gauges)`` of one process's collected families, flat as ``IWorkerMetrics`` keeps
    them; the gauges shared by every worker are in neither."""
    totals: Series = {}
    gauges: Series = {}
    for family in families:
        if family.type in SUMMED_TYPES:
            table = totals
        elif family.type == "gauge" and family.name in PER_PROCESS_GAUGES:
            table = gauges
        else:
            continue
        for sample in family.samples:
            table[series_key(family.name, sample)] = sample.value
    return totals, gauges


def _sample_order(sample: Sample):
    labels = sorted((k, v) for k, v in sample.labels.items() if k != "le")
    suffix = next((s for s in _SUFFIX_ORDER if sample.name.endswith(s)), "")
    le = sample.labels.get("le")
    return labels, _SUFFIX_ORDER.get(suffix, 3), float(le) if le is not None else 0.0, sample.name


def merge(families: Iterable[Metric], totals: Series, gauges: Series) -> List[Metric]:
    """``families`` (the answering worker's collection) with the samples of every summed family
    and per-process gauge replaced by the run's sums ``totals`` and ``gauges``."""
    by_family: Dict[str, List[Sample]] = {}
    for table in (totals, gauges):
        for key, value in table.items():
            family, name, labels = json.loads(key)
            by_family.setdefault(family, []).append(Sample(name, dict(labels), value))
    merged = []
    for family in families:
        if family.type in SUMMED_TYPES or (family.type == "gauge" and family.name in PER_PROCESS_GAUGES):
            summed = Metric(family.name, family.documentation, family.type, family.unit)
            summed.samples = sorted(by_family.get(family.name, ()), key=_sample_order)
            family = summed
        merged.append(family)
    return merged


def partial_family(partial: bool) -> GaugeMetricFamily:
    """``clproxy_metrics_partial``: whether this scrape holds one worker's numbers only."""
    return GaugeMetricFamily("clproxy_metrics_partial",
                             "1 when this scrape holds only the answering worker's numbers (the shared "
                             "state store could not be read), 0 when it sums every worker.",
                             value=1 if partial else 0)


class _Collected:
    """A collector over families already collected (so that they render as they are)."""

    def __init__(self, families: List[Metric]):
        self.families = families

    def collect(self):
        return self.families


def exposition(families: List[Metric], accept: Optional[str]) -> Tuple[bytes, str]:
    """The exposition of ``families`` (Prometheus text, or OpenMetrics when ``accept`` asks)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))  # type: ignore[arg-type]
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class WorkerMetrics(service.Service):
    """One worker's part: publishes its numbers every :data:`PUBLISH_INTERVAL` seconds on
    ``clock`` (and once more on stop, after the drain, with gauges that end at once), and renders a
    scrape with the sums over run ``run`` (:meth:`render`, :class:`MetricsResource`'s
    ``exposition``).

    ``book`` is the worker's :class:`~clproxy.observe.metrics.MetricsBook`, ``store`` provides
    ``IWorkerMetrics``, ``worker`` is this worker's index and ``incarnation`` this process's own id
    (a restarted worker has a new one). ``drained`` (None: nothing to wait for) fires when the
    requests in flight at stop have finished.
    """

    name = "worker-metrics"  # type: ignore[assignment]

    def __init__(self, book, store, clock, *, run: str, worker: int, incarnation: str,
                 drained=None, interval: float = PUBLISH_INTERVAL, ttl: float = GAUGE_TTL):
        self.book, self.store, self.clock = book, store, clock
        self.run, self.worker, self.incarnation = run, worker, incarnation
        self.drained = drained
        self.interval, self.ttl = interval, ttl
        #: reports stored; scrapes answered with every worker's numbers, and with this one's only
        self.published = 0
        self.aggregated = 0
        self.partial = 0
        self._failing = False
        self._loop: Optional[task.LoopingCall] = None

    def startService(self):
        """Publish now and every ``interval`` seconds."""
        super().startService()
        self._loop = task.LoopingCall(self.publish)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        """Stop publishing; after the drain, publish the last totals (gauges that end now)."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.drained is not None:
            yield self.drained()
        yield self.publish(ttl=0.0)

    def publish(self, families: Optional[List[Metric]] = None, ttl: Optional[float] = None):
        """Store this worker's numbers now (``families``: already collected); a Deferred that
        fires with True when stored, False when the store failed (said once per outage)."""
        if families is None:
            families = list(self.book.registry.collect())
        totals, gauges = split(families)
        d = defer.maybeDeferred(self.store.publish_worker_metrics, self.run, self.worker, self.incarnation,
                                totals, gauges, self.clock.seconds(), self.ttl if ttl is None else ttl)
        d.addCallbacks(self._stored, lambda failure: self._unreachable(failure.getErrorMessage()))
        return d

    def _stored(self, _) -> bool:
        self.published += 1
        return True

    def _unreachable(self, error: str) -> bool:
        if not self._failing:
            self._failing = True
            log.warn("worker metrics: cannot reach the shared state store ({error}); /metrics answers "
                     "with this worker's numbers only", error=error)
        return False

    async def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """The scrape's exposition: this worker's numbers published first (so they are current),
        then the run's sums; this worker's own with ``clproxy_metrics_partial 1`` when the store
        fails. Never raises for a store failure."""
        families = list(self.book.registry.collect())
        sums = None
        if await self.publish(families):
            try:
                sums = await self.store.read_worker_metrics(self.run, self.clock.seconds())
            except Exception as e:  # any failure of the store: the scrape is answered all the same
                self._unreachable(str(e) or type(e).__name__)
        if sums is None:
            self.partial += 1
            return exposition(families + [partial_family(True)], accept)
        self.aggregated += 1
        if self._failing:  # said when a scrape sums again (a report alone proves only half of it)
            self._failing = False
            log.info("worker metrics: the shared state store answers again; /metrics sums every worker")
        return exposition(merge(families, *sums) + [partial_family(False)], accept)

