"""The one assembly of the daemon: :func:`build_proxy` makes every part and connects them.

``tap.makeService`` (``twistd -n claudeproxy`` and ``clproxy proxy start``) and the tests that need
a whole proxy call it; nothing else wires a dispatcher to a pool or a site to a dispatcher. Time is
the injected ``clock`` (a ``task.Clock`` in tests); I/O (upstream connections, Redis, signals) goes
through the injected ``reactor``.
"""

import gc
import os
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import attr
from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.client import Agent
from zope.interface import implementer

from clproxy import config as configuration
from clproxy.accounts.directory import AccountDirectory
from clproxy.accounts.model import Account
from clproxy.accounts.oauth import OAuthEndpoints
from clproxy.accounts.refresh import TokenRefresher
from clproxy.accounts.tokenstore import TokenStore, TokenStoreError, write_token_copy
from clproxy.daemon import fastpoll, runstate
from clproxy.daemon.drain import Drainer, ShuttingDown
from clproxy.daemon.reload import ConfigWatcher, restart_needed
from clproxy.daemon.upkeep import AccountUpkeep
from clproxy.dashboard.access import DashboardAccess, LoginSessions
from clproxy.dashboard.feed import DashboardFeed, dashboard_state
from clproxy.dashboard.resources import DashboardRoot
from clproxy.http.auth import ClientAuth
from clproxy.http.routes import build_routes
from clproxy.http.site import ProxySite, StatusReport
from clproxy.observe import console
from clproxy.observe.recorder import Observability
from clproxy.providers.translation import Translation
from clproxy.proxy.dispatch import DispatchSettings, Dispatcher
from clproxy.proxy.shaping import PluginLoadError, pipeline_from_config
from clproxy.proxy.upstream import UpstreamClient
from clproxy.routing.affinity import SessionAffinity
from clproxy.routing.pool import AccountPool
from clproxy.routing.quota import QUOTA_FILE, QuotaBook
from clproxy.routing.router import Router
from clproxy.state import open_store
from clproxy.state.memory import MemoryStateStore
from clproxy.state.probe import probe_store
from clproxy.team import usage as usage_ledger
from clproxy.team.keys import KeyRing
from clproxy.team.keystore import DEFAULT_WATCH_INTERVAL, KeyStore, KeyStoreError, KeyWatcher, LastUseRecorder
from clproxy.team.limits import KeyLimits, listen_check
from clproxy.team.pricing import Pricing, PricingError

log = console.logger(__name__)


def check_home(home: str) -> None:
    """Make sure ``CLPROXY_HOME`` is a directory this process can write (creating it, mode 0700);
    ``SystemExit`` with one line in words otherwise, before anything else tries to write there."""
    import errno
    import tempfile

    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=home, prefix=".clproxy-write-check."):
            pass
    except OSError as e:
        reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                   errno.EROFS: "read-only file system",
                   errno.ENOTDIR: "a part of that path is a file, not a directory",
                   errno.EEXIST: "it is a file, not a directory", errno.ENOSPC: "no space left"}
        reason = reasons.get(e.errno or 0) or (e.strerror or type(e).__name__).lower()
        raise SystemExit(f"clproxy: cannot write to {home} (CLPROXY_HOME): {reason}; "
                         f"set CLPROXY_HOME to a writable directory")


def cannot_listen(error) -> SystemExit:
    """The one line for a ``CannotListenError`` (the port is taken, the address is not this
    machine's), as a ``SystemExit`` twistd prints without a traceback."""
    socket_error = getattr(error, "socketError", None)
    reason = getattr(socket_error, "strerror", None) or str(socket_error or error)
    if "in use" in reason.lower():
        reason += " (another program has this port: pick another with --port, or stop it)"
    host = getattr(error, "interface", "") or "*"
    return SystemExit(f"clproxy: cannot listen on {host}:{getattr(error, 'port', '?')}: {reason}")


def effective_environment(options: Mapping, environ: Mapping[str, str]) -> dict:
    """The process environment plus the ``--env-file`` values (the real environment wins)."""
    merged = {}
    if options.get("env-file"):
        merged.update(configuration.load_env_file(options["env-file"]))
    merged.update(environ)
    return merged


def accounts_from_config(cfg) -> Tuple[Account, ...]:
    """The config file's ``accounts.anthropic`` entries as pool accounts (API keys)."""
    base = cfg.providers.anthropic.base_url
    return tuple(
        Account(key=f"config:{a.name}", name=a.name, kind="api-key", secret=a.api_key or "",
                base_url=a.base_url or base, weight=max(1, int(round(a.weight))), enabled=a.enabled,
                rate_limit=a.rate_limit, org_id=a.org_id, metadata=dict(a.metadata or {}),
                source="config", excluded_models=tuple(a.excluded_models), max_concurrent=a.max_concurrent)
        for a in cfg.accounts
    )


def make_affinity(routing, store, clock, previous: Optional[SessionAffinity] = None) -> Optional[SessionAffinity]:
    """Session affinity as ``routing.session-affinity`` asks (None when it is off). A reload that
    changes nothing keeps ``previous`` (its move counter); the bindings live in the store either way."""
    if not routing.session_affinity.enabled:
        return None
    ttl = routing.session_affinity.ttl
    if previous is not None and previous.ttl == ttl:
        return previous
    return SessionAffinity(store, clock, ttl=ttl)


def make_state_store(state_config, reactor, tokens: TokenStore):
    """The state store the config asks for. For Redis, Redis must answer now (SystemExit naming the
    URL, without its password, otherwise); rotated tokens it receives are also written to the
    token file, which stays the fallback copy."""
    try:
        store = open_store(state_config, reactor, on_token_write=lambda key, data:
                           write_token_copy(tokens, key, data))
    except ValueError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    problem = probe_store(state_config)
    if problem:
        raise SystemExit(f"clproxy: {problem}")
    return store


def tune_garbage_collector() -> None:
    """Move everything built at start-up out of the collector's sight: a full collection over every
    module and class paused streams for tens of milliseconds (see benchmarks/README.md).

    Young collections keep their default threshold (collecting them less often made each pause
    longer and, while requests still left reference cycles, let them pile up). What survives one
    goes to the old generation at the next (middle threshold 0) instead of waiting for ten more
    in the middle one: a stream's objects live ~1 s, far longer than either, so the middle
    generation only made the collector look at each of them twice (~200 per stream, 2.3 ms a
    middle collection at 1,000 streams); now once or twice, and the middle pauses are shorter.
    Full collections are made rare: under 1,000 streams the default ran one over every live
    stream about once a second, 100-150 ms each. A request leaves no reference cycle behind
    (tests/test_no_cycles.py), so rarer full collections hold no more garbage."""
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()
    young, _middle, _old = gc.get_threshold()
    gc.set_threshold(young, 0, FULL_COLLECTION_THRESHOLD)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system once start-up's garbage is collected.

    Imports, the config and the collection before this free a megabyte or two of the C heap that
    glibc keeps for later (it returns only the top of its heap by itself): resident for the
    daemon's whole life otherwise. ``malloc_trim(0)`` hands back every free page it can. A no-op
    where the C library has no ``malloc_trim`` (musl, macOS)."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (ImportError, OSError, AttributeError):
        return
    trim(0)


#: gc's third threshold: a full collection after this many middle-generation ones (default 10).
#: 100 took the 1,000-stream added per-event p99 from ~480 to ~200 ms; 1,000 took it to ~154 ms
#: (same run); none at all only to ~145 ms, so what is left is not the collector
#: (benchmarks/README.md, "Lever D"). With the middle threshold at 0 there are ~5.5x more middle
#: collections, so 5,000 keeps full ones as rare as 1,000 did ("Fourth pass").
FULL_COLLECTION_THRESHOLD = 5000


class SharedState(service.MultiService):
    """The state store's service: connects the store, imports the token file into it, then starts
    its children (the account upkeep: a refresh before the store is connected would not take the
    instance-wide lock). The store is closed by :class:`ProxyService`, after the drain: requests
    still in flight use it."""

    def __init__(self, store, tokens: TokenStore):
        super().__init__()
        self.setName("shared-state")
        self.store, self.tokens = store, tokens

    def startService(self):
        service.Service.startService(self)
        # build_proxy already proved a shared store answers; a loss from here on is served from
        # the store's local mirror until it reconnects (memory connects at once)
        d = defer.ensureDeferred(self._share_tokens())
        d.addErrback(lambda f: log.failure("shared state: connecting failed", f))
        d.addBoth(lambda _: [child.startService() for child in self if self.running])

    async def _share_tokens(self) -> None:
        """Connect, then import the token file (newer records win), so every instance sees it."""
        try:
            await self.store.connect()
        except Exception as e:
            log.error("shared state: {error}; serving from local state until it answers", error=str(e))
            return
        try:
            records = self.tokens.load()
        except TokenStoreError as e:
            log.warn("shared state: token file not imported: {error}", error=str(e))
            return
        for key, record in records.items():
            await self.store.import_token_record(key, record.to_json())


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """An endpoint that remembers the port it listens on (``--port 0`` picks one: the address
    tells it)."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.port = None

    def listen(self, factory):
        """Listen through the wrapped endpoint; remember the port."""
        def bound(port):
            self.port = port
            return port
        return self.endpoint.listen(factory).addCallback(bound)


@attr.s(auto_attribs=True, eq=False)
class Proxy:
    """What the daemon is made of, connected. :attr:`services` are the ones to run, in start order
    (they stop in reverse); the listener is the caller's (an endpoint service over :attr:`site`)."""

    config: Any
    environ: Mapping[str, str]
    home: str
    config_path: str
    tokens: TokenStore
    store: Any
    pool: AccountPool
    upstream: UpstreamClient
    directory: AccountDirectory
    refresher: TokenRefresher
    quotas: QuotaBook
    observability: Observability
    translation: Translation
    dispatcher: Dispatcher
    status: StatusReport
    drainer: Drainer
    root: Any
    site: ProxySite
    upkeep: AccountUpkeep
    shared_state: SharedState
    watcher: ConfigWatcher
    strategy_override: Optional[str] = None
    #: the config the daemon started with (its state store and logs run on it); ``config`` is the
    #: one in force, after reloads
    started_with: Any = None
    #: set by the daemon when it runs with a lifecycle (state file, Claude Code's settings)
    lifecycle: Any = None
    #: team mode's usage recording (:class:`UsageRecorder`): the ledger, prices, counters
    usage: Any = None
    #: team mode: the key file, the keys accepted now (kept current by ``key_watcher``, a child of
    #: the shared state) and the routes' check
    keys: Optional[KeyStore] = None
    ring: Optional[KeyRing] = None
    key_watcher: Optional[KeyWatcher] = None
    auth: Optional[ClientAuth] = None
    #: the keys' last uses, written to the key file every minute and at stop
    last_used: Optional[LastUseRecorder] = None
    #: the live dashboard's feed (a service: it closes open pages' streams before the drain)
    feed: Optional[DashboardFeed] = None

    @property
    def services(self) -> Tuple[service.IService, ...]:
        """The services to run, in start order: observability first (it stops, and flushes, last),
        the shared state (with the upkeep under it), then the reload watcher."""
        services: Tuple[service.IService, ...] = (self.observability.service(), self.shared_state,
                                                   self.watcher)
        if self.feed is not None:
            services += (self.feed,)
        # the usage ledger first: it stops last, after the drain, so the last requests are written
        return services if self.usage is None else (self.usage.service(self.drainer),) + services

    def apply(self, reloaded) -> list:
        """A reloaded config: accounts, routing, shaping, strategy and the server's limits and
        timeouts change; requests in flight finish with what they started with. Returns the
        changed keys that need a restart (the watcher's log line names them)."""
        new = reloaded.config
        shaping, router = reload_parts(new)  # raises before anything changes
        self.pool.strategy = self.strategy_override or new.routing.strategy
        self.dispatcher.shaping, self.dispatcher.router = shaping, router
        self.translation.reconfigure(new.providers)
        self.directory.set_config_accounts(accounts_from_config(new), new.providers.anthropic.base_url)
        # server.*: each holder reads its value per request (or per drain), so the next one uses these
        server = new.server
        self.dispatcher.settings = attr.evolve(self.dispatcher.settings,
                                               upstream_timeout=server.upstream_timeout,
                                               request_deadline=server.request_deadline,
                                               queue_timeout=new.routing.queue_timeout,
                                               switch_at=new.routing.quota.switch_at)
        self.dispatcher.affinity = make_affinity(new.routing, self.store, self.dispatcher.clock,
                                                 previous=self.dispatcher.affinity)
        self.translation.upstream_timeout = server.upstream_timeout
        self.translation.keepalive_interval = server.keepalive_interval
        self.site.max_body_bytes = server.max_body_bytes
        self.drainer.timeout = server.drain_timeout
        self.upstream.reconfigure(connect_timeout=server.connect_timeout,
                                  max_connections_per_host=server.max_connections_per_host)
        # against the config the daemon started with: that is what its state store and logs run on
        pending = restart_needed(self.started_with, new)
        self.config = new
        if self.usage is not None:
            self.usage.reconfigure(new)
        for warning in reloaded.warnings:
            log.warn("config: {warning}", warning=warning)
        if self.lifecycle is not None:
            self.lifecycle.config_reloaded(self.pool.strategy, new)
        return pending

    async def close(self) -> None:
        """After the listener stopped: let requests in flight finish, then flush and close."""
        if await self.drainer.drain():
            await self.cut_streams()
        await self.refreshes_landed()
        self.quotas.flush()
        await self.store.close()
        await self.upstream.close()

    async def cut_streams(self) -> None:
        """The drain gave up: end the streams still relayed with an error event that says so
        (left to the process's exit, their clients got a broken connection, or an error blaming
        the upstream), and give their last bytes up to :data:`CUT_GRACE` seconds to leave."""
        relays = list(self.dispatcher.streams)
        if not relays:
            return
        for relay in relays:
            relay.cut(SHUTDOWN_CUT)
        await _wait_while(self.dispatcher.clock, self.drainer.in_flight, CUT_GRACE)

    async def refreshes_landed(self) -> None:
        """Wait for the OAuth refreshes still in flight (a request the drain gave up on was
        waiting on one) to land: the token endpoint may already have spent the old refresh token,
        and the process must not exit before the new one is written. Bounded by the longest a
        refresh can take (:meth:`TokenRefresher.shared_lock_ttl`)."""
        await _wait_while(self.dispatcher.clock,
                          lambda: any(self.refresher.in_flight(a.key) for a in self.directory.current()),
                          self.refresher.shared_lock_ttl())


async def _wait_while(clock, busy: Callable[[], Any], seconds: float) -> None:
    """At stop: wait while ``busy()`` holds, looking every :data:`STOP_POLL` seconds, at most
    ``seconds``."""
    deadline = clock.seconds() + seconds
    while busy() and clock.seconds() < deadline:
        await task.deferLater(clock, STOP_POLL, lambda: None)


#: Seconds between two looks, at stop, at whether what the stop waits for has ended (a token
#: refresh in flight, a cut stream's request).
STOP_POLL = 0.05
#: What a stream still relayed when the drain gave up tells its client.
SHUTDOWN_CUT = ("clproxy is shutting down and its drain time (server.drainTimeout) is over: "
                "the stream was cut; retry the request")
#: Seconds the cut streams' error events and ends are given to reach their clients.
CUT_GRACE = 1.0


def reload_parts(new) -> Tuple[Any, Router]:
    """The parts a reloaded config ``new`` needs built before anything changes: its shaping pipeline
    and its router. Raises (a plugin that does not load, a bad route) when ``new`` cannot be
    served, so a bad reload changes nothing; the supervisor of ``--workers N`` checks with it too."""
    return pipeline_from_config(new.cloaking), Router.from_config(new.routing)


def build_proxy(cfg, *, clock, reactor, environ: Mapping[str, str], home: str,
                config_path: Optional[str] = None, strategy: Optional[str] = None,
                passthrough: bool = False, debug: bool = False, health_interval: float = 30.0,
                load_config: Optional[Callable[[str], Any]] = None,
                host: str = "127.0.0.1") -> Proxy:
    """Build and connect every part of the daemon for the validated config ``cfg``.

    ``environ`` is the effective environment (``--env-file`` merged), ``home`` is ``CLPROXY_HOME``;
    ``strategy`` and ``passthrough`` are the command line's overrides. ``load_config(path)`` is what
    a reload calls (default: the config loader with ``environ``); ``host`` is the interface the
    daemon will listen on. Raises ``SystemExit`` with one line when the config cannot be served (bad
    shaping plugin, unreachable Redis, a corrupt key file, a non-loopback ``host`` without a client
    key and without ``server.allowUnauthenticated``).
    """
    config_path = config_path or configuration.default_config_path(environ)
    keys, ring = load_client_keys(home)
    problem = listen_check(host, not ring.empty, cfg.server.allow_unauthenticated)
    if problem and not cfg.server.allow_unauthenticated:
        raise SystemExit(problem)
    if problem:
        log.warn("{warning}", warning=problem)
    tokens = TokenStore(home)
    store = make_state_store(cfg.state, reactor, tokens)
    pool = AccountPool(store, strategy=strategy or cfg.routing.strategy, clock=clock)
    upstream = UpstreamClient(reactor, connect_timeout=cfg.server.connect_timeout,
                              max_connections_per_host=cfg.server.max_connections_per_host)
    directory = AccountDirectory(
        store=tokens, clock=clock, environ=environ, config_accounts=accounts_from_config(cfg),
        base_url=cfg.providers.anthropic.base_url,
        on_changed_credential=lambda account: defer.ensureDeferred(pool.forget(account)))
    refresher = TokenRefresher(tokens, HTTPClient(Agent(reactor, pool=upstream.pool)),
                               OAuthEndpoints.from_config(cfg.providers.anthropic), clock,
                               refresh_before_expiry=cfg.providers.anthropic.refresh_before_expiry,
                               shared=store)
    quotas = QuotaBook(os.path.join(home, QUOTA_FILE), clock, store=store)
    try:
        shaping = pipeline_from_config(cfg.cloaking)
    except (PluginLoadError, ValueError) as e:
        raise SystemExit(f"clproxy: invalid configuration: cloaking: {e}")
    obs = Observability(
        clock=clock,
        logs_dir=os.path.expanduser(cfg.logging.dir) if cfg.logging.dir else os.path.join(home, "logs"),
        retention_days=cfg.logging.retention_days, max_total_mb=cfg.logging.max_total_mb,
        debug_bodies=debug or cfg.logging.debug_bodies, environ=environ, echo=debug)
    obs.watch_pool(pool, directory.current)
    obs.metrics.quota_source = lambda: {a.name: quotas.get(a.key) or {} for a in directory.current()}
    translation = Translation(clock=clock, upstream=upstream, providers=cfg.providers,
                              keepalive_interval=cfg.server.keepalive_interval,
                              upstream_timeout=cfg.server.upstream_timeout, store=store)
    settings = DispatchSettings(passthrough=passthrough, upstream_timeout=cfg.server.upstream_timeout,
                                request_deadline=cfg.server.request_deadline, config_path=config_path,
                                queue_timeout=cfg.routing.queue_timeout, switch_at=cfg.routing.quota.switch_at)
    dispatcher: Dispatcher = Dispatcher(clock=clock, upstream=upstream, pool=pool, store=store,
                            accounts=directory.current, settings=settings, shaping=shaping,
                            router=Router.from_config(cfg.routing), refresher=refresher,
                            quotas=quotas, on_refreshed=directory.updated, translation=translation,
                            fallback=translation.fallback_hook(lambda: dispatcher.router.fallback_chain),
                            observability=obs, affinity=make_affinity(cfg.routing, store, clock),
                            on_disabled=directory.disable,
                            key_limits=KeyLimits(store, clock, UsageSpent(store)))
    status = StatusReport(clock=clock, pool=pool, store=store, accounts=directory.current,
                          strategy=lambda: pool.strategy, started=clock.seconds(), quotas=quotas,
                          dispatcher=dispatcher, metrics=obs.metrics,
                          extra=lambda: {"pid": os.getpid(), "observability": obs.status()},
                          keys=lambda: key_records(proxy))
    drainer = Drainer(clock, cfg.server.drain_timeout)
    # the config in force decides (a reload may change it); read through ``proxy``, bound below
    last_used = LastUseRecorder(keys, clock)
    auth = ClientAuth(ring, host, lambda: bool(proxy.config.server.allow_unauthenticated),
                      last_used=last_used.times, now=clock.seconds)
    feed = DashboardFeed(lambda: dashboard_now(status, obs.activity, dispatcher, clock), obs.activity, clock)
    dashboard = DashboardRoot(DashboardAccess(ring, LoginSessions(store, clock), host,
                                              lambda: bool(proxy.config.server.allow_unauthenticated)), feed)
    root = build_routes(dispatcher, status, metrics=obs.metrics_resource(),
                        max_body_bytes=cfg.server.max_body_bytes, auth=auth, dashboard=dashboard)
    site = ProxySite(root, max_body_bytes=cfg.server.max_body_bytes, drainer=drainer)
    shared_state = SharedState(store, tokens)
    upkeep = AccountUpkeep(directory, refresher, clock, interval=health_interval, observability=obs)
    upkeep.setServiceParent(shared_state)
    # under the shared state: it publishes the file to the (connected) store and serves its keys
    key_watcher = KeyWatcher(keys, clock, ring.replace, interval=DEFAULT_WATCH_INTERVAL, shared=store)
    key_watcher.setServiceParent(shared_state)
    last_used.setServiceParent(shared_state)
    if load_config is None:
        def load_config(path):
            return configuration.load_config(path, environ)
    # the watcher calls back into the proxy it belongs to (``proxy`` is bound before any reload)
    watcher = ConfigWatcher(config_path, load_config, lambda reloaded: proxy.apply(reloaded), clock)
    proxy: Proxy = Proxy(config=cfg, environ=environ, home=home, config_path=config_path, tokens=tokens,
                  store=store, pool=pool, upstream=upstream, directory=directory, refresher=refresher,
                  quotas=quotas, observability=obs, translation=translation, dispatcher=dispatcher,
                  status=status, drainer=drainer, root=root, site=site, upkeep=upkeep,
                  shared_state=shared_state, watcher=watcher, strategy_override=strategy,
                  started_with=cfg, usage=make_usage(cfg, home, clock, store), keys=keys, ring=ring,
                  key_watcher=key_watcher, auth=auth, feed=feed, last_used=last_used)
    obs.usage_sink = proxy.usage.record
    proxy.usage.charged = dispatcher.key_limits.charged  # what a keyed request in flight is held at
    if not directory.current():
        log.warn("no Anthropic account yet: requests will be answered with 401 until you add one: "
                 "`clproxy auth login anthropic`, ANTHROPIC_API_KEY in the environment or --env-file, "
                 "or accounts.anthropic in {path}", path=config_path)
    return proxy


async def dashboard_now(status: StatusReport, activity, dispatcher, clock) -> dict:
    """The dashboard's state now: the ``/status`` document, the last hour's traffic and the
    fallback chain in force (:func:`clproxy.dashboard.feed.dashboard_state`)."""
    document = await status.status()
    now = clock.seconds()
    chain = [{"provider": t.provider, "model": t.model} for t in dispatcher.router.fallback_chain]
    return dashboard_state(document, now=now, traffic=activity.traffic(now), fallback_chain=chain)


def make_usage(cfg, home: str, clock, store) -> "UsageRecorder":
    """Team mode's usage recording: the ledger under ``home`` (retention
    ``logging.usageRetentionDays``), the prices (``pricing:``) and the store's per-key counters."""
    ledger = usage_ledger.UsageLedger(usage_ledger.ledger_path(home), clock,
                                      retention_days=cfg.logging.usage_retention_days)
    try:
        pricing = _pricing(cfg)
    except PricingError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    return UsageRecorder(ledger, store, pricing)


def _pricing(cfg) -> Pricing:
    return Pricing.from_config(cfg.pricing, warn=lambda message: log.warn("{message}", message=message))


def key_records(proxy: "Proxy") -> tuple:
    """The client keys' records for ``/status``: the daemon's key ring when it has one (kept current
    by the key watcher), else the key file read now. Never fails: ``()`` when it cannot be read."""
    ring = proxy.ring
    if ring is not None:
        return tuple(ring)
    try:
        return KeyStore(proxy.home).records()
    except (KeyStoreError, OSError):
        return ()


def utc_day(seconds: float) -> str:
    """``YYYY-MM-DD`` (UTC) of ``seconds``: the day of the usage counters."""
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


class UsageRecorder:
    """One :class:`~clproxy.team.usage.UsageRow` per finished request (the observability layer's
    ``usage_sink``): priced, queued for the ledger (written off the reactor thread) and added to
    the state store's per-key day/month counters that the limits read.

    A request without a client key (no keys exist) is recorded with key ``None`` (``clproxy usage
    --by key`` shows it as ``(none)``) and adds to no counter: no limit applies to it. A request
    that reported no usage (an error, ``/v1/models``) costs 0.0, priced or not, so an unpriced model
    is warned about only when it actually used tokens.
    """

    def __init__(self, ledger: usage_ledger.UsageLedger, store, pricing: Pricing):
        self.ledger = ledger
        self.store = store
        self.pricing = pricing
        self._service: Optional["UsageService"] = None
        #: told what each keyed request cost (the key limits' average of a request in flight)
        self.charged: Optional[Callable[[str, int, float], None]] = None

    def reconfigure(self, cfg) -> None:
        """A reloaded config: its ``pricing:`` from the next request on (validated already)."""
        try:
            self.pricing = _pricing(cfg)
        except PricingError as e:
            log.warn("config: pricing not reloaded: {error}", error=str(e))

    def record(self, fields: Mapping[str, Any]) -> None:
        """The usage sink: called on the reactor thread when a request is answered (no I/O)."""
        usage = fields.get("usage") or {}
        model = fields.get("model")
        cost = self.pricing.cost_usd(model, usage) if usage else 0.0
        row = usage_ledger.UsageRow.from_usage(
            key_name=fields.get("key_name"), account_name=fields.get("account_name"), model=model,
            usage=usage, cost_usd=cost, status=fields.get("status"), duration=fields.get("duration"),
            at=fields.get("at") or 0.0)
        self.ledger.record(row)
        if self.charged is not None and row.key_name is not None and usage:
            # only answers that spent something: refusals and errors (no usage) would pull the
            # average toward 0 and let the next burst past a nearly spent budget
            self.charged(row.key_name, row.tokens or 0, row.cost_usd or 0.0)
        if row.key_name is not None and (row.tokens or row.cost_usd):
            d = defer.maybeDeferred(self.store.add_usage, row.key_name, utc_day(row.at), row.tokens,
                                    row.cost_usd or 0.0)
            d.addErrback(lambda f: log.warn("usage counters: {error}", error=f.getErrorMessage()))

    def seed_counters(self, now: float) -> int:
        """Put this month's spending per key, read from the ledger, into a memory store's counters
        (a Redis store keeps its own across restarts), so the limits survive a restart. Blocking:
        called at start, before the listener. Returns the number of keys seeded."""
        if not isinstance(self.store, MemoryStateStore):
            return 0
        day_start, month_start = usage_ledger.utc_day_start(now), usage_ledger.utc_month_start(now)
        try:
            connection = usage_ledger.connect(self.ledger.path, create=False)
        except FileNotFoundError:
            return 0
        try:
            rows = connection.execute(
                "SELECT key_name, at >= ?, SUM(input_tokens + output_tokens + cache_creation_5m "
                "+ cache_creation_1h), SUM(cost_usd) FROM usage WHERE key_name IS NOT NULL AND at >= ? "
                "GROUP BY key_name, at >= ?", (day_start, month_start, day_start)).fetchall()
        finally:
            connection.close()
        today, first = utc_day(now), utc_day(month_start)
        seeded = set()
        for key_name, is_today, tokens, usd in rows:
            # earlier days of the month go to its first day: they count for the month, not today
            day = today if is_today else first
            if day == today and not is_today:
                continue  # (today is the 1st: nothing before it in this month)
            self.store.add_usage(key_name, day, int(tokens or 0), float(usd or 0.0))
            seeded.add(key_name)
        return len(seeded)

    def service(self, drainer: Drainer) -> service.IService:
        """The ledger's service (see :class:`UsageService`)."""
        if self._service is None:
            self._service = UsageService(self, drainer)
        return self._service


class UsageService(service.Service):
    """Opens the ledger and seeds the counters when started; logs the ledger's warnings every few
    seconds; when stopped, waits for the drain (requests in flight still record), then writes what
    is queued and closes the ledger."""

    NOTES_INTERVAL = 5.0

    def __init__(self, recorder: UsageRecorder, drainer: Drainer):
        self.recorder = recorder
        self.drainer = drainer
        self._notes: Optional[task.LoopingCall] = None

    def startService(self):
        super().startService()
        ledger = self.recorder.ledger
        try:
            ledger.start()
            seeded = self.recorder.seed_counters(ledger.clock.seconds())
            if seeded:
                log.info("usage: this month's spending of {count} key(s) read from {path}", count=seeded,
                         path=ledger.path)
        except Exception as e:  # an unusable ledger costs usage rows, never serving
            log.warn("usage: cannot open {path}: {error}; usage is not recorded", path=ledger.path,
                     error=f"{type(e).__name__}: {e}")
        self._notes = task.LoopingCall(self.log_notes)
        self._notes.clock = ledger.clock
        self._notes.start(self.NOTES_INTERVAL, now=False)

    def log_notes(self) -> None:
        """Log the ledger's warnings (each once), on the reactor thread."""
        for level, message in self.recorder.ledger.take_notes():
            getattr(log, level)("{message}", message=message)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._notes is not None and self._notes.running:
            self._notes.stop()
        self._notes = None
        yield self.drainer.drain()
        self.recorder.ledger.stop()
        self.log_notes()


def load_client_keys(home: str) -> Tuple[KeyStore, KeyRing]:
    """The key file of ``home`` and a ring of its keys, read once before the port opens (the
    watcher keeps it current afterwards); a corrupt file stops the start with one line."""
    keys = KeyStore(home)
    try:
        return keys, KeyRing(keys.records())
    except KeyStoreError as e:
        raise SystemExit(f"clproxy: {e}")


class UsageSpent:
    """What each client key spent, for :class:`clproxy.team.limits.KeyLimits`: an adapter over the
    state store's ``IUsageCounters`` (shared by every instance under Redis)."""

    def __init__(self, store):
        self.store = store

    def spent(self, key_name: str, day: str):
        """(tokens, usd) of ``key_name`` on the UTC day ``day``."""
        return self.store.get_usage(key_name, day)

    def spent_month(self, key_name: str, month: str):
        """(tokens, usd) of ``key_name`` in the UTC month ``month``."""
        return self.store.get_month_usage(key_name, month)


class ProxyService(service.MultiService):
    """The running daemon: the proxy's services and its listener; on stop, after the listener has
    stopped, the drain and the closing of the state store and the upstream connections.

    The parts are readable on it by name (``service.pool``, ``service.dispatcher``): the lifecycle
    and the tests read them."""

    def __init__(self, proxy: Proxy, listener: Optional[RecordingEndpoint] = None, reactor=None):
        super().__init__()
        self.proxy = proxy
        self.endpoint = listener
        #: the reactor the daemon runs on: given the lean event loop on start (None: left alone)
        self.reactor = reactor
        self._forget_hurry: Optional[Callable[[], None]] = None

    def __getattr__(self, name):
        # only reached for names the service itself lacks
        proxy = self.__dict__.get("proxy")
        if proxy is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(proxy, name)

    def startService(self):
        tune_garbage_collector()
        release_freed_memory()
        if self.reactor is not None:
            fastpoll.install(self.reactor)  # twisted's own loop stays where it is not a checked one
        proxy = self.proxy
        if proxy is not None:
            # a second SIGINT/SIGTERM while draining gives up the drain (the user means "now")
            self._forget_hurry = runstate.on_second_signal(proxy.drainer.hurry)
            proxy.site.resource = proxy.root  # (a service stopped before served ShuttingDown)
        super().startService()

    def privilegedStartService(self):
        """Bind the port (twistd does this before starting the services): a port in use is one
        line and an exit, not twistd's traceback."""
        from twisted.internet.error import CannotListenError

        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise cannot_listen(e) from None

    def address(self):
        """The (host, port) the daemon listens on (useful when started on port 0)."""
        port = self.endpoint.port if self.endpoint is not None else None
        if port is None:
            return None
        host = port.getHost()
        return host.host, host.port

    @defer.inlineCallbacks
    def stopService(self):
        # before the listener closes: what arrives on a connection kept alive from before is
        # refused from now on (it would start new upstream requests the drain must wait for)
        self.proxy.site.resource = ShuttingDown()
        try:
            yield defer.maybeDeferred(super().stopService)
            yield defer.ensureDeferred(self.proxy.close())
        finally:
            forget, self._forget_hurry = self._forget_hurry, None
            if forget is not None:
                forget()


def serve(proxy: Proxy, description: str, reactor) -> ProxyService:
    """The daemon's top service: ``proxy``'s services, then a listener on the endpoint string
    ``description`` (``tcp:55669:interface=127.0.0.1``) serving its site. Not started."""
    from twisted.application import internet
    from twisted.internet import endpoints

    endpoint = RecordingEndpoint(endpoints.serverFromString(reactor, description))
    top = ProxyService(proxy, endpoint, reactor)
    for child in proxy.services:
        child.setServiceParent(top)
    listener = internet.StreamServerEndpointService(endpoint, proxy.site)
    listener._raiseSynchronously = True  # as strports.service does: a port in use fails startService
    listener.setServiceParent(top)
    return top
