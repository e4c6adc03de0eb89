"""The daemon's command-line options and service wiring (``twistd -n claudeproxy``).

``makeService`` only wires: it loads the config, builds the pool, dispatcher and site, and returns
a ``MultiService`` whose ``stopService`` closes the upstream connection pool.
"""

import gc
import os
from typing import Mapping, Optional, Tuple

import attr
from twisted.application import internet, service
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.web.client import Agent
from twisted.logger import LogLevel
from twisted.python import usage

from clproxy import config as configuration
from clproxy.daemon import runstate
from clproxy.accounts.model import Account
from clproxy.accounts.directory import AccountDirectory
from clproxy.accounts.oauth import OAuthEndpoints
from clproxy.routing.quota import QUOTA_FILE, QuotaBook
from clproxy.accounts.refresh import TokenRefresher
from clproxy.accounts.tokenstore import StoredCredential, TokenStore, TokenStoreError
from clproxy.integrations import claude_settings
from clproxy.proxy.shaping import PluginLoadError, pipeline_from_config
from clproxy.proxy.dispatch import DispatchSettings, Dispatcher
from clproxy.daemon.drain import Drainer
from clproxy.daemon.upkeep import AccountUpkeep
from clproxy.observe import console
from clproxy.observe.recorder import Observability
from clproxy.routing.pool import AccountPool
from clproxy.daemon.reload import ConfigWatcher, install_sighup, restart_needed
from clproxy.http.openai import install as install_front_door
from clproxy.routing.router import Router
from clproxy.providers.translation import Translation
from clproxy.state import open_store
from clproxy.state.probe import probe_store
from clproxy.proxy.upstream import UpstreamClient
from clproxy.http.site import ProxySite, StatusReport, build_root

log = console.logger(__name__)


class Options(usage.Options):
    """Options shared by ``twistd -n claudeproxy`` and ``clproxy proxy start``."""

    synopsis = "[options]"
    longdesc = ("Serve the Claude Messages API on a local port, pooling Anthropic accounts "
                "with refresh, failover and fallback.")
    optParameters = [
        ["port", "p", 55669, "Port to listen on."],  # checked in postOptions: one clear line
        ["host", "H", "127.0.0.1", "Host (interface) to bind to."],
        ["config", "c", None, "Config file (YAML or JSON). Default: $CLPROXY_HOME/proxy-config.yaml."],
        ["strategy", "s", None, "Account selection: fill-first or round-robin (overrides the config)."],
        ["env-file", None, None, "A KEY=VALUE file with provider keys (e.g. ANTHROPIC_API_KEY)."],
        ["health-interval", None, 30.0, "Seconds between account health checks.", float],
    ] + runstate.OPTION_PARAMETERS
    optFlags = [
        ["debug", "d", "Debug output."],
        ["quiet", "q", "Only warnings and errors."],
        ["passthrough", None, "Transparent forwarding: one account, no retry, rotation or fallback."],
    ] + runstate.OPTION_FLAGS

    def opt_version(self):
        """Print clproxy's version (not Twisted's) and exit."""
        from clproxy import version_line
        print(version_line())
        raise SystemExit(0)

    def postOptions(self):
        self["port"] = parse_port(self["port"])
        if self["strategy"] is not None:
            # The file's routing.strategy and --strategy share one parser, so they accept the same names.
            try:
                self["strategy"] = configuration.parse_strategy(self["strategy"])
            except ValueError as e:
                raise usage.UsageError(f"--strategy {e}, got {self['strategy']!r}") from None
        if self["health-interval"] <= 0:
            raise usage.UsageError("--health-interval must be a positive number of seconds")
        if self["debug"] and self["quiet"]:
            raise usage.UsageError("--debug and --quiet contradict each other; pick one")


def parse_port(value) -> int:
    """``--port``'s value as a port number; a :class:`usage.UsageError` of one line otherwise."""
    try:
        port = int(str(value).strip())
    except ValueError:
        port = None
    if port is None or not 0 < port < 65536:
        raise usage.UsageError(f"--port must be a number from 1 to 65535, not {str(value)!r}")
    return port


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
        reason = reasons.get(e.errno) or (e.strerror or type(e).__name__).lower()
        raise SystemExit(f"clproxy: cannot write to {home} (CLPROXY_HOME): {reason}; "
                         f"set CLPROXY_HOME to a writable directory")


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
                source="config")
        for a in cfg.accounts
    )


def make_state_store(state_config, clock, tokens: TokenStore):
    """The state store the config asks for. For Redis, Redis must answer now (SystemExit naming the
    URL, without its password, otherwise); rotated tokens it receives are also written to the
    token file, which stays the fallback copy."""
    try:
        store = open_store(state_config, clock, on_token_write=lambda key, data:
                           _write_token_copy(tokens, key, data))
    except ValueError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    problem = probe_store(state_config)
    if problem:
        raise SystemExit(f"clproxy: {problem}")
    return store


def _write_token_copy(tokens: TokenStore, key: str, data: dict) -> None:
    """Keep the token file in step with a token record another instance rotated."""
    record = StoredCredential.from_json(key, data, "shared state")
    current = tokens.get(key)
    if current is None or (record.updated_at or 0) > (current.updated_at or 0):
        if tokens.held():
            # Called back from this process's own refresh (it read the rotation from Redis while
            # holding the lock): taking the lock again would time out; write under the held one.
            tokens.write_while_held(record)
            return
        with tokens.locked(5.0) as tx:
            tx.write(record)


def tune_garbage_collector() -> None:
    """Move everything built at start-up out of the collector's sight: a full collection over every
    module and class paused streams for tens of milliseconds (see benchmarks/README.md). The
    default thresholds stay: collecting young objects less often let the few reference cycles each
    request leaves pile up (peak RSS at 1,000 streams 250 MB instead of 135 MB, for no throughput)."""
    gc.collect()
    if hasattr(gc, "freeze"):
        gc.freeze()


class ProxyService(service.MultiService):
    """The running daemon: the listening site plus what must be closed on stop."""

    def __init__(self, upstream: UpstreamClient, quotas=None, store=None, tokens=None, drainer=None):
        super().__init__()
        self.upstream = upstream
        self.drainer = drainer
        self.quotas = quotas
        self.store = store
        self.tokens = tokens

    #: services that must not start before the shared state is connected (token upkeep: a refresh
    #: before that would not take the instance-wide lock)
    after_connect = ()

    def startService(self):
        tune_garbage_collector()
        waiting = set(self.after_connect)
        service.Service.startService(self)
        for child in self:
            if child not in waiting:
                child.startService()
        # makeService already proved a shared store answers; a loss from here on is served from
        # the store's local mirror until it reconnects (memory connects at once)
        d = defer.ensureDeferred(self._share_tokens())
        d.addErrback(lambda f: log.failure("shared state: connecting failed", f))
        d.addBoth(lambda _: [child.startService() for child in waiting if self.running])

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

    def address(self):
        """The (host, port) the daemon listens on (useful when started on port 0)."""
        for child in self:
            port = getattr(child, "_port", None)
            if port is not None:
                host = port.getHost()
                return host.host, host.port
        return None

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.maybeDeferred(super().stopService)
        if self.drainer is not None:
            yield self.drainer.drain()  # the listener has stopped: let in-flight requests finish
        if self.quotas is not None:
            self.quotas.flush()
        yield self.store.close()
        yield self.upstream.close()


def makeService(options: Mapping, reactor=None, environ: Optional[Mapping[str, str]] = None):
    """Wire the daemon from parsed options; raises ``SystemExit`` with one line on a bad config."""
    if reactor is None:
        from twisted.internet import reactor
    environ = os.environ if environ is None else environ
    runstate.quiet_signal_stops(reactor)
    console.set_level(LogLevel.debug if options.get("debug") else
                      LogLevel.warn if options.get("quiet") else LogLevel.info)
    try:
        env = effective_environment(options, environ)
        check_home(configuration.clproxy_home(env))  # once, early: one line instead of a traceback
        loaded = configuration.load_config(options.get("config"), env)
    except configuration.ConfigError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    cfg = loaded.config
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    for note in loaded.notes:
        log.info("config: {note}", note=note)

    strategy = options.get("strategy") or cfg.routing.strategy
    home = configuration.clproxy_home(env)
    tokens = TokenStore(home)
    store = make_state_store(cfg.state, reactor, tokens)
    pool = AccountPool(store, strategy=strategy, clock=reactor)
    upstream = UpstreamClient(reactor, connect_timeout=cfg.server.connect_timeout,
                              max_connections_per_host=cfg.server.max_connections_per_host)
    directory = AccountDirectory(
        store=tokens, clock=reactor, environ=env, config_accounts=accounts_from_config(cfg),
        base_url=cfg.providers.anthropic.base_url,
        on_changed_credential=lambda account: defer.ensureDeferred(pool.forget(account)))
    refresher = TokenRefresher(tokens, HTTPClient(Agent(reactor, pool=upstream.pool)),
                               OAuthEndpoints.from_config(cfg.providers.anthropic), reactor,
                               refresh_before_expiry=cfg.providers.anthropic.refresh_before_expiry,
                               shared=store)
    quotas = QuotaBook(os.path.join(home, QUOTA_FILE), reactor, store=store)
    config_path = options.get("config") or configuration.default_config_path(env)
    if not directory.current():
        log.warn("no Anthropic account yet: requests will be answered with 401 until you add one: "
                 "`clproxy auth login anthropic`, ANTHROPIC_API_KEY in the environment or --env-file, "
                 "or accounts.anthropic in {path}", path=config_path)
    settings = DispatchSettings(
        passthrough=bool(options.get("passthrough")),
        upstream_timeout=cfg.server.upstream_timeout,
        request_deadline=cfg.server.request_deadline,
        config_path=config_path,
    )
    try:
        shaping = pipeline_from_config(cfg.cloaking)
    except (PluginLoadError, ValueError) as e:
        raise SystemExit(f"clproxy: invalid configuration: cloaking: {e}")
    obs = Observability(
        clock=reactor,
        logs_dir=os.path.expanduser(cfg.logging.dir) if cfg.logging.dir else os.path.join(home, "logs"),
        retention_days=cfg.logging.retention_days, max_total_mb=cfg.logging.max_total_mb,
        debug_bodies=bool(options.get("debug")) or cfg.logging.debug_bodies,
        environ=env, echo=bool(options.get("debug")))
    obs.watch_pool(pool, directory.current)
    translation = Translation(clock=reactor, upstream=upstream, providers=cfg.providers,
                              keepalive_interval=cfg.server.keepalive_interval,
                              upstream_timeout=cfg.server.upstream_timeout, store=store)
    dispatcher = Dispatcher(clock=reactor, upstream=upstream, pool=pool, store=store,
                            accounts=directory.current, settings=settings, shaping=shaping,
                            router=Router.from_config(cfg.routing), refresher=refresher,
                            quotas=quotas, on_refreshed=directory.updated, translation=translation,
                            fallback=translation.fallback_hook(lambda: dispatcher.router.fallback_chain),
                            observability=obs)
    status = StatusReport(clock=reactor, pool=pool, store=store, accounts=directory.current,
                          strategy=lambda: pool.strategy, started=reactor.seconds(), quotas=quotas,
                          extra=lambda: {"pid": os.getpid(), "observability": obs.status()})
    drainer = Drainer(reactor, cfg.server.drain_timeout)
    root = build_root(dispatcher, status, metrics=obs.metrics_resource())
    install_front_door(root.children[b"v1"], dispatcher, None, cfg.server.max_body_bytes)
    site = ProxySite(root, max_body_bytes=cfg.server.max_body_bytes, drainer=drainer)

    top = ProxyService(upstream, quotas=quotas, store=store, tokens=tokens, drainer=drainer)
    top.config = cfg
    top.dispatcher, top.pool, top.store, top.site, top.directory = dispatcher, pool, store, site, directory
    top.refresher, top.quotas, top.observability = refresher, quotas, obs
    obs.service().setServiceParent(top)  # before the listener: starts first, stops (flushes) last
    upkeep = AccountUpkeep(directory, refresher, reactor,
                           interval=float(options.get("health-interval") or 30.0), observability=obs)
    upkeep.setServiceParent(top)
    top.after_connect = (upkeep,)
    listener = internet.TCPServer(int(options["port"]), site, interface=options["host"], backlog=1024)
    listener.setServiceParent(top)

    def apply(reloaded):
        """A reloaded config: accounts, routing, shaping, strategy and the server's limits and
        timeouts change; requests in flight finish with what they started with. Returns the
        changed keys that need a restart (the watcher's log line names them)."""
        new = reloaded.config
        shaping = pipeline_from_config(new.cloaking)  # raises before anything changes
        router = Router.from_config(new.routing)
        pool.strategy = options.get("strategy") or new.routing.strategy
        dispatcher.shaping, dispatcher.router = shaping, router
        translation.reconfigure(new.providers)
        directory.set_config_accounts(accounts_from_config(new), new.providers.anthropic.base_url)
        # server.*: each holder reads its value per request (or per drain), so the next one uses these
        server = new.server
        dispatcher.settings = attr.evolve(dispatcher.settings, upstream_timeout=server.upstream_timeout,
                                          request_deadline=server.request_deadline)
        translation.upstream_timeout = server.upstream_timeout
        translation.keepalive_interval = server.keepalive_interval
        site.max_body_bytes = server.max_body_bytes
        drainer.timeout = server.drain_timeout
        upstream.reconfigure(connect_timeout=server.connect_timeout,
                             max_connections_per_host=server.max_connections_per_host)
        # against the config the daemon started with: that is what its state store and logs run on
        pending = restart_needed(cfg, new)
        top.config = new
        for warning in reloaded.warnings:
            log.warn("config: {warning}", warning=warning)
        if getattr(top, "lifecycle", None) is not None:
            top.lifecycle.update(strategy=pool.strategy, fallbackChain=runstate.chain_of(new))
        return pending

    top.watcher = ConfigWatcher(config_path, lambda path: configuration.load_config(path, env), apply,
                                reactor)
    top.watcher.setServiceParent(top)
    install_sighup(top.watcher, reactor)
    # last child: it starts once the port is bound and stops first (Claude settings restored)
    lifecycle = runstate.attach_lifecycle(top, options, env,
                                          fallback_chain=lambda: runstate.chain_of(top.config),
                                          config_path=options.get("config"))
    if lifecycle is not None and lifecycle.settings_path:
        # Claude Code pointed at a proxy without a usable account gets 401 on every request:
        # its settings wait for an account (after the lifecycle: starts after it, stops before it)
        claude_settings.SetOnceUsable(lifecycle, directory, reactor).setServiceParent(top)
    log.info("clproxy listening on http://{host}:{port} strategy={strategy} accounts={count}",
             host=options["host"], port=options["port"], strategy=strategy,
             count=len(directory.current()))
    return top


def main_options(argv) -> Options:
    """Parse ``argv`` as daemon options (used by ``clproxy proxy start``)."""
    options = Options()
    options.parseOptions(argv)
    return options


