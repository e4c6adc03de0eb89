"""The daemon's command-line options and service (``twistd -n claudeproxy``).

``makeService`` builds nothing itself: it loads the config, calls
:func:`clproxy.daemon.assemble.build_proxy` (the one assembly), and adds its services and a
listener on an endpoint string (``tcp:55669:interface=127.0.0.1``) to a ``MultiService``.
"""

import os
from typing import Mapping, Optional

from twisted.internet import endpoints
from twisted.logger import LogLevel
from twisted.python import usage

from clproxy import config as configuration
from clproxy.daemon import runstate, workers
from clproxy.daemon.assemble import build_proxy, check_home, effective_environment, serve
from clproxy.daemon.reload import install_sighup
from clproxy.integrations import claude_settings
from clproxy.observe import console

__all__ = ["Options", "makeService", "main_options", "parse_port", "listen_description",
           "check_home", "effective_environment"]

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
        # the names come from the one list the config parser accepts, so the help never lags behind
        ["strategy", "s", None, "Account selection: " + " | ".join(configuration.STRATEGIES)
         + " (overrides the config)."],
        ["env-file", None, None, "A KEY=VALUE file with provider keys (e.g. ANTHROPIC_API_KEY)."],
        ["health-interval", None, 30.0, "Seconds between account health checks.", float],
        ["workers", "w", None, "Worker processes serving the one port (default: the config's "
         "server.workers, else 1; more than 1 needs state.backend: redis)."],
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
        if self["workers"] is not None:
            self["workers"] = parse_workers(self["workers"])
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


def parse_workers(value) -> int:
    """``--workers``' value as a count; a :class:`usage.UsageError` of one line otherwise."""
    try:
        count = int(str(value).strip())
    except ValueError:
        count = None
    if count is None or not 1 <= count <= configuration.MAX_WORKERS:
        raise usage.UsageError(f"--workers must be a number from 1 to {configuration.MAX_WORKERS}, "
                               f"not {str(value)!r}")
    return count


def listen_description(host: str, port: int) -> str:
    """The endpoint string the daemon listens on (``tcp:55669:interface=127.0.0.1:backlog=1024``)."""
    return f"tcp:{int(port)}:interface={endpoints.quoteStringArgument(host)}:backlog=1024"


def load(options: Mapping, environ: Mapping[str, str], config_text: Optional[str] = None):
    """``(effective environment, CLPROXY_HOME, loaded config)`` for parsed options, the log level
    set; ``SystemExit`` with one line on a bad config or home. ``config_text``: parse that (the
    config its supervisor accepted, for a worker) instead of reading the file."""
    console.set_level(LogLevel.debug if options.get("debug") else
                      LogLevel.warn if options.get("quiet") else LogLevel.info)
    try:
        env = effective_environment(options, environ)
        home = configuration.clproxy_home(env)
        check_home(home)  # once, early: one line instead of a traceback
        if config_text is not None:
            source = options.get("config") or configuration.default_config_path(env)
            loaded = configuration.parse_config(config_text, source, env)
        else:
            loaded = configuration.load_config(options.get("config"), env)
    except configuration.ConfigError as e:
        raise SystemExit(f"clproxy: invalid configuration: {e}")
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    for note in loaded.notes:
        log.info("config: {note}", note=note)
    return env, home, loaded


def makeService(options: Mapping, reactor=None, environ: Optional[Mapping[str, str]] = None):
    """The daemon from parsed options: load the config, :func:`build_proxy`, add its services and a
    listener (or, with more than one worker, a supervisor of worker processes); raises
    ``SystemExit`` with one line on a bad config."""
    if reactor is None:
        from twisted.internet import reactor
    environ = os.environ if environ is None else environ
    runstate.quiet_signal_stops(reactor)
    env, home, loaded = load(options, environ)
    count = workers.worker_count(options, loaded.config)
    if count > 1:
        return workers.supervise(options, loaded.config, count, reactor=reactor, environ=env, home=home,
                                 config_text=loaded.text)
    proxy = build_proxy(loaded.config, clock=reactor, reactor=reactor, environ=env, home=home,
                        config_path=options.get("config"), strategy=options.get("strategy"),
                        passthrough=bool(options.get("passthrough")), debug=bool(options.get("debug")),
                        health_interval=float(options.get("health-interval") or 30.0),
                        host=options["host"])
    top = serve(proxy, listen_description(options["host"], options["port"]), reactor)
    install_sighup(proxy.watcher, reactor)
    # after the listener: the lifecycle starts once the port is bound and stops first (Claude
    # Code's settings restored before the port closes)
    proxy.lifecycle = runstate.attach_lifecycle(top, options, env,
                                                fallback_chain=lambda: runstate.chain_of(proxy.config),
                                                config_path=options.get("config"))
    if proxy.lifecycle is not None and proxy.lifecycle.settings_path:
        # Claude Code pointed at a proxy without a usable account gets 401 on every request:
        # its settings wait for an account (after the lifecycle: starts after it, stops before it)
        # and, with client keys, wait for a key in them
        claude_settings.SetOnceUsable(proxy.lifecycle, proxy.directory, reactor,
                                      keys_exist=lambda: not proxy.ring.empty).setServiceParent(top)
    log.info("clproxy listening on http://{host}:{port} strategy={strategy} accounts={count}",
             host=options["host"], port=options["port"], strategy=proxy.pool.strategy,
             count=len(proxy.directory.current()))
    return top


def main_options(argv) -> Options:
    """Parse ``argv`` as daemon options (used by ``clproxy proxy start``)."""
    options = Options()
    options.parseOptions(argv)
    return options


