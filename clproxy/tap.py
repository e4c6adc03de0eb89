"""The daemon's command-line options and service wiring (``twistd -n claudeproxy``).

``makeService`` only wires: it loads the config, builds the pool, dispatcher and site, and returns
a ``MultiService`` whose ``stopService`` closes the upstream connection pool.
"""

import os
from typing import Mapping, Optional, Tuple

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python import usage

from . import config as configuration
from .auth.accounts import Account, accounts_from_environment
from .cloaking import PluginLoadError, pipeline_from_config
from .dispatch import DispatchSettings, Dispatcher
from .observe import console
from .pool import AccountPool
from .router import Router
from .state.memory import MemoryStateStore
from .upstream import UpstreamClient
from .web import ProxySite, StatusReport, build_root

log = console.logger(__name__)

STRATEGIES = ("fill-first", "round-robin")


class Options(usage.Options):
    """Options shared by ``twistd -n claudeproxy`` and ``clproxy proxy start``."""

    synopsis = "[options]"
    longdesc = ("Serve the Claude Messages API on a local port, pooling Anthropic accounts "
                "with refresh, failover and fallback.")
    optParameters = [
        ["port", "p", 55669, "Port to listen on.", int],
        ["host", "H", "127.0.0.1", "Host (interface) to bind to."],
        ["config", "c", None, "Config file (YAML or JSON). Default: $CLPROXY_HOME/proxy-config.yaml."],
        ["strategy", "s", None, "Account selection: fill-first or round-robin (overrides the config)."],
        ["env-file", None, None, "A KEY=VALUE file with provider keys (e.g. ANTHROPIC_API_KEY)."],
        ["health-interval", None, 30.0, "Seconds between account health checks.", float],
    ]
    optFlags = [
        ["debug", "d", "Debug output."],
        ["quiet", "q", "Only warnings and errors."],
        ["passthrough", None, "Transparent forwarding: one account, no retry, rotation or fallback."],
    ]

    def postOptions(self):
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"--port must be between 1 and 65535, got {self['port']}")
        if self["strategy"] is not None and self["strategy"] not in STRATEGIES:
            raise usage.UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, "
                                   f"got {self['strategy']!r}")
        if self["health-interval"] <= 0:
            raise usage.UsageError("--health-interval must be a positive number of seconds")
        if self["debug"] and self["quiet"]:
            raise usage.UsageError("--debug and --quiet contradict each other; pick one")


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
                base_url=a.base_url or base, weight=a.weight, enabled=a.enabled,
                rate_limit=a.rate_limit, org_id=a.org_id, metadata=dict(a.metadata or {}),
                source="config")
        for a in cfg.accounts
    )


def discover_accounts(cfg, environ: Mapping[str, str]) -> Tuple[Account, ...]:
    """Config accounts, else ``ANTHROPIC_API_KEY``."""
    accounts = accounts_from_config(cfg)
    if accounts:
        return accounts
    return accounts_from_environment(environ, base_url=cfg.providers.anthropic.base_url)


class ProxyService(service.MultiService):
    """The running daemon: the listening site plus what must be closed on stop."""

    def __init__(self, upstream: UpstreamClient):
        super().__init__()
        self.upstream = upstream

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
        yield self.upstream.close()


def makeService(options: Mapping, reactor=None, environ: Optional[Mapping[str, str]] = None):
    """Wire the daemon from parsed options; raises ``SystemExit`` with one line on a bad config."""
    if reactor is None:
        from twisted.internet import reactor
    environ = os.environ if environ is None else environ
    console.set_level(LogLevel.debug if options.get("debug") else
                      LogLevel.warn if options.get("quiet") else LogLevel.info)
    try:
        env = effective_environment(options, environ)
        loaded = configuration.load_config(options.get("config"), env)
    except configuration.ConfigError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    cfg = loaded.config
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    for note in loaded.notes:
        log.info("config: {note}", note=note)

    strategy = options.get("strategy") or cfg.routing.strategy
    store = MemoryStateStore()
    pool = AccountPool(store, strategy=strategy, clock=reactor)
    upstream = UpstreamClient(reactor, connect_timeout=cfg.server.connect_timeout,
                              max_connections_per_host=cfg.server.max_connections_per_host)
    accounts = discover_accounts(cfg, env)
    config_path = options.get("config") or configuration.default_config_path(env)
    if not accounts:
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
    dispatcher = Dispatcher(clock=reactor, upstream=upstream, pool=pool, store=store,
                            accounts=lambda: accounts, settings=settings, shaping=shaping,
                            router=Router.from_config(cfg.routing))
    status = StatusReport(clock=reactor, pool=pool, store=store, accounts=lambda: accounts,
                          strategy=lambda: pool.strategy, started=reactor.seconds())
    site = ProxySite(build_root(dispatcher, status), max_body_bytes=cfg.server.max_body_bytes)

    top = ProxyService(upstream)
    top.dispatcher, top.pool, top.store, top.site = dispatcher, pool, store, site
    listener = internet.TCPServer(int(options["port"]), site, interface=options["host"], backlog=1024)
    listener.setServiceParent(top)
    log.info("clproxy listening on http://{host}:{port} strategy={strategy} accounts={count}",
             host=options["host"], port=options["port"], strategy=strategy, count=len(accounts))
    return top


def main_options(argv) -> Options:
    """Parse ``argv`` as daemon options (used by ``clproxy proxy start``)."""
    options = Options()
    options.parseOptions(argv)
    return options


