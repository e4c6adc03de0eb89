"""The configuration's shape: names the file accepts, defaults, and the frozen attrs types.

Pure data: nothing here reads a file or the environment. ``STRATEGIES`` and :func:`parse_strategy`
are the one definition of the account-selection strategies, used by the file's ``routing.strategy``
and by ``--strategy`` alike, so the two cannot disagree.
"""

import types
from typing import Any, Mapping, Optional, Tuple, Union

import attr

CONFIG_FILE_NAME = "proxy-config.yaml"

#: Provider names a model mapping or fallback target may use, and the aliases that normalize to them.
PROVIDERS = ("anthropic", "openai", "google-ai")
PROVIDER_ALIASES = {"gemini": "google-ai", "google": "google-ai", "vertex": "google-ai",
                    "google_ai": "google-ai", "googleai": "google-ai"}
#: ``drain-soonest`` orders like fill-first; the quota rule (clproxy.routing.headroom) then sends a new
#: session to the account whose 5h window resets soonest.
STRATEGIES = ("fill-first", "round-robin", "drain-soonest")
# Round-robin already honours each account's weight, so "weighted" is the same strategy.
STRATEGY_ALIASES = {"weighted-round-robin": "round-robin", "weighted": "round-robin"}
CLOAKING_MODES = ("auto", "always", "never")
STATE_BACKENDS = ("memory", "redis")


def parse_strategy(value: Any) -> str:
    """``value`` as a canonical strategy name (case, ``_``/``-`` and aliases normalized).

    Raises ``ValueError`` whose message says what is allowed (``"must be one of ..."``) but never
    repeats the value: the caller shows it in the way its context allows.
    """
    if isinstance(value, str):
        normalized = value.strip().lower().replace("_", "-")
        normalized = STRATEGY_ALIASES.get(normalized, normalized)
        if normalized in STRATEGIES:
            return normalized
    names = ", ".join(f'"{n}"' for n in STRATEGIES)
    raise ValueError(f"must be one of {names} (aliases: {', '.join(sorted(STRATEGY_ALIASES))})")


class ConfigError(Exception):
    """The configuration cannot be used: ``path`` says where (a key path or ``file:line``), ``problem`` what.

    ``str(error)`` is ``"<path>: <problem>"``, or just the problem when there is no path. Messages never
    contain a secret value.
    """

    def __init__(self, path: str, problem: str, source: Optional[str] = None):
        self.path = path
        self.problem = problem
        #: The file (or other source) being parsed when the error was found, when known.
        self.source = source
        super().__init__(f"{path}: {problem}" if path else problem)


# --- the configuration, as frozen attrs classes ---------------------------------------------------


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AccountConfig:
    """One Anthropic account from ``accounts.anthropic[]``; ``api_key`` never appears in ``repr``.

    An enabled account always has a non-empty ``api_key``. ``weight`` is an ``int`` when integral,
    else a ``float``.
    """

    name: str
    api_key: Optional[str] = attr.ib(default=None, repr=False)
    base_url: Optional[str] = None
    org_id: Optional[str] = None
    weight: Union[int, float] = 1
    enabled: bool = True
    #: Requests per minute this account may be sent; ``None`` means no local limit.
    rate_limit: Optional[int] = None
    metadata: Mapping[str, Any] = attr.ib(factory=lambda: types.MappingProxyType({}), hash=False)
    #: ``excludedModels``: fnmatch patterns of models this account is never sent.
    excluded_models: Tuple[str, ...] = ()
    #: ``maxConcurrent``: requests in flight at once on this account; ``None`` means no cap.
    max_concurrent: Optional[int] = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ModelMapping:
    """Requests for ``from_model`` are sent to ``provider`` as ``to_model``."""

    from_model: str
    to_model: str
    provider: str


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class FallbackTarget:
    """One step of the fallback chain, tried when every Claude account is cooling down."""

    provider: str
    model: str


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class SessionAffinityConfig:
    """``routing.session-affinity``: keep a session on one account (its prompt cache stays warm).

    ``ttl`` is seconds since the session's last request after which its binding is forgotten.
    """

    enabled: bool = True
    ttl: float = 3600.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class QuotaRoutingConfig:
    """``routing.quota``: an account whose utilization of any window is at or above ``switch_at``
    (a fraction, ``0 < switch_at <= 1``) takes no new session while another account is below it."""

    switch_at: float = 0.9


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class RoutingConfig:
    """How accounts are picked and which models go where.

    ``queue_timeout`` is how many seconds a request may wait for a concurrency slot (``> 0``).
    """

    strategy: str = "fill-first"
    model_mappings: Tuple[ModelMapping, ...] = ()
    fallback_chain: Tuple[FallbackTarget, ...] = ()
    passthrough_models: Tuple[str, ...] = ()
    session_affinity: SessionAffinityConfig = attr.Factory(SessionAffinityConfig)
    quota: QuotaRoutingConfig = attr.Factory(QuotaRoutingConfig)
    queue_timeout: float = 30.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class CloakingConfig:
    """Request transformation for OAuth accounts: the mode and per-plugin settings (read-only mapping)."""

    mode: str = "auto"
    plugins: Mapping[str, Any] = attr.ib(factory=lambda: types.MappingProxyType({}), hash=False)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class AnthropicProvider:
    """Anthropic's API and OAuth endpoints; ``refresh_before_expiry`` is in seconds."""

    base_url: str = "https://api.anthropic.com"
    oauth_token_url: str = "https://platform.claude.com/v1/oauth/token"
    authorize_url: str = "https://claude.ai/oauth/authorize"
    client_id: str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    redirect_uri: str = "https://platform.claude.com/oauth/code/callback"
    scopes: Tuple[str, ...] = ("org:create_api_key", "user:profile", "user:inference",
                               "user:sessions:claude_code", "user:mcp_servers", "user:file_upload")
    refresh_before_expiry: float = 3600.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class OpenAIProvider:
    """The OpenAI fallback provider; ``api_key`` defaults to ``$OPENAI_API_KEY`` when loaded from a file."""

    base_url: str = "https://api.openai.com/v1"
    api_key: Optional[str] = attr.ib(default=None, repr=False)
    org_id: Optional[str] = None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class GoogleProvider:
    """The Gemini fallback provider; ``api_key`` defaults to ``$GEMINI_API_KEY``, else ``$GOOGLE_API_KEY``."""

    base_url: str = "https://generativelanguage.googleapis.com"
    api_key: Optional[str] = attr.ib(default=None, repr=False)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ProvidersConfig:
    """Per-provider endpoints and keys (YAML keys ``anthropic``, ``openai``, ``google-ai``)."""

    anthropic: AnthropicProvider = attr.Factory(AnthropicProvider)
    openai: OpenAIProvider = attr.Factory(OpenAIProvider)
    google_ai: GoogleProvider = attr.Factory(GoogleProvider)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ServerConfig:
    """Limits and timeouts of the HTTP side; durations are seconds.

    ``upstream_timeout`` is how long the upstream may stay silent; ``request_deadline`` is the overall
    budget of one client request across all its attempts.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    upstream_timeout: float = 600.0
    connect_timeout: float = 10.0
    request_deadline: float = 900.0
    max_connections_per_host: int = 1024
    drain_timeout: float = 30.0
    keepalive_interval: float = 15.0
    #: Serve a non-loopback host with no client key (an open relay: anyone who reaches the port spends
    #: the accounts). Off by default; when on, the daemon warns at every start.
    allow_unauthenticated: bool = False
    #: Worker processes serving the one listening port (1: a single process, as before; more
    #: needs ``state.backend: redis``, see clproxy/daemon/workers.py). ``--workers`` wins.
    workers: int = 1


#: The most worker processes ``server.workers`` / ``--workers`` accept.
MAX_WORKERS = 64


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class StateConfig:
    """Where shared state lives: in this process (``memory``) or in Redis."""

    backend: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "clproxy"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class LoggingConfig:
    """JSONL logs: ``dir`` ``None`` means ``$CLPROXY_HOME/logs`` (callers resolve it)."""

    dir: Optional[str] = None
    retention_days: float = 7.0
    max_total_mb: float = 500.0
    debug_bodies: bool = False
    #: days of rows kept in the usage ledger (``$CLPROXY_HOME/usage.sqlite3``); 0 keeps them all
    usage_retention_days: float = 90.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    version: int = 1
    accounts: Tuple[AccountConfig, ...] = ()
    routing: RoutingConfig = attr.Factory(RoutingConfig)
    cloaking: CloakingConfig = attr.Factory(CloakingConfig)
    providers: ProvidersConfig = attr.Factory(ProvidersConfig)
    server: ServerConfig = attr.Factory(ServerConfig)
    state: StateConfig = attr.Factory(StateConfig)
    logging: LoggingConfig = attr.Factory(LoggingConfig)
    #: ``pricing:`` overrides of the shipped price table: model name or fnmatch pattern ->
    #: ``{"input": USD per million tokens, "output": ...}`` (see ``clproxy.team.pricing``).
    pricing: Mapping[str, Mapping[str, float]] = attr.ib(factory=lambda: types.MappingProxyType({}), hash=False)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class LoadedConfig:
    """A configuration with what loading it had to say: ``warnings`` (fix these) and ``notes`` (FYI).

    ``source`` is the file it came from, or ``None`` when no file was found. ``text`` is what was
    parsed (``""`` without a file): a supervisor hands the text it accepted to the workers it
    starts later. It may hold secrets: never in a repr.
    """

    config: Config
    warnings: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    source: Optional[str] = None
    text: Optional[str] = attr.ib(default=None, repr=False, eq=False)
