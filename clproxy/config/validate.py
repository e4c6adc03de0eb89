"""Validation: turn the parsed, interpolated document into a frozen :class:`Config`.

Errors name the key path as written (``accounts.anthropic[1].weight``) and never show a secret;
unknown keys and plaintext keys become warnings.
"""

import json
import math
import re
import types
from difflib import get_close_matches
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union, overload

import attr

from clproxy.config.schema import (
    CLOAKING_MODES, MAX_WORKERS, PROVIDER_ALIASES, PROVIDERS, STATE_BACKENDS, AccountConfig, AnthropicProvider,
    CloakingConfig, Config, ConfigError, FallbackTarget, GoogleProvider, LoggingConfig, ModelMapping,
    OpenAIProvider, ProvidersConfig, QuotaRoutingConfig, RoutingConfig, ServerConfig, SessionAffinityConfig,
    StateConfig, parse_strategy,
)


class _Interpolated(str):
    """A string value that contained ``${`` in the file: it came (partly) from the environment."""


_SECRET_KEYS = frozenset({"api_key", "token", "access_token", "refresh_token", "secret", "client_secret",
                          "password"})
_ABSENT = object()


def _canonical(key: str) -> str:
    """``apiKey``, ``api-key``, ``api_key`` and ``APIKey`` all become ``api_key``."""
    key = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", key.strip())
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return key.replace("-", "_").lower()


def _camel(canonical: str) -> str:
    head, *rest = canonical.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_secret_path(path: str) -> bool:
    last = re.split(r"[.\[]", path)[-1]
    return _canonical(last) in _SECRET_KEYS


# Anthropic (sk-ant-), OpenAI (sk-, sk-proj-) and Google (AIza) key shapes, to catch a key pasted
# in the wrong place (e.g. `providers: {openai: sk-...}`), where the path alone does not say "secret".
_LOOKS_LIKE_KEY = re.compile(r"(?:^|[^A-Za-z0-9])(?:sk-[A-Za-z0-9_-]{6,}|AIza[A-Za-z0-9_-]{10,})")


def _shown(value: Any, path: str) -> str:
    """How an offending value appears in an error: literally, unless it is (or looks like) a secret."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        kind, literal = "a boolean", "true" if value else "false"
    elif isinstance(value, (int, float)):
        kind, literal = "a number", repr(value)
    elif isinstance(value, str):
        if _LOOKS_LIKE_KEY.search(value):
            return "a string that looks like an API key"
        shown = value if len(value) <= 80 else value[:77] + "..."
        kind, literal = "a string", json.dumps(str(shown), ensure_ascii=False)
    else:
        return f"a {type(value).__name__}"
    return kind if _is_secret_path(path) else literal


# The user:password@ of a URL, after its scheme if it has one.
_URL_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?/*)[^/]*@")


def _shown_url(value: Any, path: str) -> str:
    """How a rejected URL appears in an error: without its ``user:password@`` or ``?query``, either of
    which may carry a secret (a Redis password, Gemini's ``?key=``)."""
    if not isinstance(value, str):
        return _shown(value, path)
    text, query, _ = str(value).partition("?")
    text = _URL_USERINFO.sub(r"\1***@", text) + ("?..." if query else "")
    return _shown(text, path)


def _quoted_list(names: Tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' for n in names)


class _Keys:
    """The keys of one mapping, spelling-normalized; what nobody asks for is reported as unknown."""

    def __init__(self, mapping: Dict[Any, Any], path: str, warnings: List[str]):
        self.path = path
        self._warnings = warnings
        self._found: Dict[str, Tuple[str, Any]] = {}
        self._asked: List[str] = []
        self._strays: List[Any] = []
        for key, value in mapping.items():
            if not isinstance(key, str):
                self._strays.append(key)
                continue
            canonical = _canonical(key)
            if canonical in self._found:
                raise ConfigError(_join(path, key),
                                  f'same key as "{self._found[canonical][0]}" (spelled differently)')
            self._found[canonical] = (key, value)

    def get(self, canonical: str, spelling: Optional[str] = None) -> Tuple[Any, str]:
        """``(value, path)`` of a key; value is ``_ABSENT`` when missing or null.

        The path uses the key as written, or ``spelling`` (default: camelCase) when it is missing.
        """
        self._asked.append(canonical)
        if canonical in self._found:
            written, value = self._found[canonical]
            return (_ABSENT if value is None else value), _join(self.path, written)
        return _ABSENT, _join(self.path, spelling or _camel(canonical))

    def take_alias(self, canonical: str, aliases: Tuple[str, ...], spelling: str) -> Tuple[Any, str]:
        """Like :meth:`get`, also accepting other names for the same key (at most one may be used)."""
        present = [name for name in (canonical,) + aliases if name in self._found]
        if len(present) > 1:
            first, second = (self._found[name][0] for name in present[:2])
            raise ConfigError(_join(self.path, second), f'same key as "{first}" (an alias); give only one')
        self._asked.extend(aliases)
        return self.get(present[0] if present else canonical, spelling)

    def finish(self) -> None:
        """Warn about every key that was not asked for."""
        where = self.path or "top level"
        known = sorted(set(self._asked))
        for canonical, (written, _value) in self._found.items():
            if canonical in self._asked:
                continue
            hint = get_close_matches(canonical, known, n=1)
            suggestion = f' (did you mean "{_camel(hint[0])}"?)' if hint else ""
            self._warnings.append(f'unknown key "{written}" at {where}{suggestion}')
        for key in self._strays:
            self._warnings.append(f"unknown key {key!r} at {where}")


class _Reader:
    """Turns the interpolated document into :class:`Config`, collecting warnings."""

    def __init__(self, environ: Mapping[str, str], warnings: List[str]):
        self.environ = environ
        self.warnings = warnings

    # -- value checks --

    def keys(self, value: Any, path: str) -> _Keys:
        if value is _ABSENT or value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {_shown(value, path)}")
        return _Keys(value, path, self.warnings)

    def items(self, value: Any, path: str) -> List[Any]:
        if value is _ABSENT:
            return []
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {_shown(value, path)}")
        return value

    @staticmethod
    def string(value: Any, path: str, default: Any = _ABSENT, empty_means_default: bool = True) -> Any:
        """A non-empty string; missing gives ``default`` (required when there is none).

        An empty string also gives ``default`` (so ``${VAR:-}`` can leave an optional field unset)
        unless ``empty_means_default`` is false.
        """
        if value is _ABSENT:
            if default is _ABSENT:
                raise ConfigError(path, "is required")
            return default
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_shown(value, path)}")
        value = str(value).strip()
        if not value:
            if default is _ABSENT or not empty_means_default:
                raise ConfigError(path, "must not be empty")
            return default
        return value

    @staticmethod
    def boolean(value: Any, path: str, default: bool) -> bool:
        if value is _ABSENT:
            return default
        if isinstance(value, _Interpolated) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {_shown(value, path)}")
        return value

    @staticmethod
    def _numeric(value: Any) -> Optional[Union[int, float]]:
        """``value`` as a number when it is one (not a bool), or a string from the environment that is one."""
        if isinstance(value, _Interpolated):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    @overload
    def positive_int(self, value: Any, path: str, default: int) -> int: ...

    @overload
    def positive_int(self, value: Any, path: str, default: None) -> Optional[int]: ...

    def positive_int(self, value: Any, path: str, default: Optional[int]) -> Optional[int]:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number <= 0 or number != int(number):
            raise ConfigError(path, f"must be a positive integer, got {_shown(value, path)}")
        return int(number)

    def worker_count(self, value: Any, path: str, default: int) -> int:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number != int(number) or not 1 <= number <= MAX_WORKERS:
            raise ConfigError(path, f"must be an integer from 1 to {MAX_WORKERS}, got {_shown(value, path)}")
        return int(number)

    def positive_number(self, value: Any, path: str, default: Union[int, float]) -> Union[int, float]:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number <= 0:
            raise ConfigError(path, f"must be a positive number, got {_shown(value, path)}")
        return int(number) if number == int(number) else float(number)

    def non_negative(self, value: Any, path: str, default: float) -> float:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number < 0:
            raise ConfigError(path, f"must be a non-negative number, got {_shown(value, path)}")
        return float(number)

    def duration(self, value: Any, path: str, default: float, positive: bool = False) -> float:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number < 0 or (positive and number == 0):
            what = "a positive" if positive else "a non-negative"
            raise ConfigError(path, f"must be {what} number of seconds, got {_shown(value, path)}")
        return float(number)

    def url(self, value: Any, path: str, default: Any, schemes: Tuple[str, ...] = ("http", "https"),
            strip_slash: bool = False) -> Any:
        if value is _ABSENT:
            return default
        text = self.string(value, path, default=default)
        if text is None:
            return None
        if not any(text.lower().startswith(f"{s}://") and len(text) > len(s) + 3 for s in schemes):
            wanted = " or ".join(f"{s}://" for s in schemes)
            raise ConfigError(path, f"must be a {wanted} URL, got {_shown_url(value, path)}")
        return text.rstrip("/") if strip_slash else text

    def choice(self, value: Any, path: str, default: str, allowed: Tuple[str, ...],
               aliases: Optional[Mapping[str, str]] = None) -> str:
        if value is _ABSENT:
            return default
        if isinstance(value, str):
            normalized = str(value).strip().lower().replace("_", "-")
            normalized = (aliases or {}).get(normalized, normalized)
            if normalized in allowed:
                return normalized
        alias_text = f" (aliases: {', '.join(sorted(aliases))})" if aliases else ""
        raise ConfigError(path, f"must be one of {_quoted_list(allowed)}{alias_text}, "
                                f"got {_shown(value, path)}")

    @staticmethod
    def strategy(value: Any, path: str) -> str:
        if value is _ABSENT:
            return RoutingConfig().strategy
        try:
            return parse_strategy(value)
        except ValueError as e:
            raise ConfigError(path, f"{e}, got {_shown(value, path)}") from None

    def provider(self, value: Any, path: str) -> str:
        if value is _ABSENT:
            raise ConfigError(path, "is required")
        if isinstance(value, str):
            normalized = str(value).strip().lower()
            normalized = PROVIDER_ALIASES.get(normalized, normalized)
            if normalized in PROVIDERS:
                return normalized
        raise ConfigError(path, f"unknown provider {_shown(value, path)}; expected one of "
                                f"{_quoted_list(PROVIDERS)} (aliases: gemini, google, vertex)")

    def api_key(self, value: Any, path: str) -> Optional[str]:
        """A secret: never echoed; a literal one in the file earns a warning."""
        if value is _ABSENT:
            return None
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_shown(value, path)}")
        key = str(value).strip()
        if key and not isinstance(value, _Interpolated):
            self.warnings.append(f"{path}: plaintext API key in config file; prefer ${{ENV_VAR}}")
        return key or None

    # -- sections --

    def config(self, document: Any) -> Config:
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError("", f"the top level of the config file must be a mapping, got "
                                  f"{_shown(document, '')}")
        top = _Keys(document, "", self.warnings)
        version, path = top.get("version")
        if version is not _ABSENT and (isinstance(version, bool) or version != 1):
            raise ConfigError(path, f"unsupported version {_shown(version, path)}; this clproxy reads "
                                    f"version 1")
        config = Config(
            version=1,
            accounts=self.accounts(*top.get("accounts")),
            routing=self.routing(*top.get("routing")),
            cloaking=self.cloaking(*top.get("cloaking")),
            providers=self.providers(*top.get("providers")),
            server=self.server(*top.get("server")),
            state=self.state(*top.get("state")),
            logging=self.logging(*top.get("logging")),
            pricing=self.pricing(*top.get("pricing")),
        )
        top.finish()
        return config

    def pricing(self, value: Any, path: str) -> Mapping[str, Mapping[str, float]]:
        """``pricing: {MODEL_OR_PATTERN: {input: X, output: Y}}``, USD per million tokens (>= 0)."""
        if value is _ABSENT:
            return types.MappingProxyType({})
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping of model (or pattern) to {{input, output}}, got "
                                    f"{_shown(value, path)}")
        prices: Dict[str, Mapping[str, float]] = {}
        # Model names are kept as written: they are matched against model ids, not config keys.
        for model, entry in value.items():
            where = _join(path, model)
            if not isinstance(model, str) or not model.strip():
                raise ConfigError(where, "a model name or pattern must be a non-empty string")
            if not isinstance(entry, dict):
                raise ConfigError(where, f"must be {{input: USD_PER_MTOK, output: USD_PER_MTOK}}, got "
                                         f"{_shown(entry, where)}")
            keys = self.keys(entry, where)
            price = {}
            for name in ("input", "output"):
                number, number_path = keys.get(name)
                if number is _ABSENT:
                    raise ConfigError(number_path, "required: USD per million tokens")
                price[name] = self.non_negative(number, number_path, 0.0)
            keys.finish()
            prices[model.strip()] = types.MappingProxyType(price)
        return types.MappingProxyType(prices)

    def accounts(self, value: Any, path: str) -> Tuple[AccountConfig, ...]:
        section = self.keys(value, path)
        entries, list_path = section.get("anthropic")
        section.finish()
        accounts: List[AccountConfig] = []
        names: Dict[str, int] = {}
        for index, entry in enumerate(self.items(entries, list_path)):
            account = self.account(entry, f"{list_path}[{index}]", index)
            if account.name in names:
                raise ConfigError(f"{list_path}[{index}].name", f'duplicate account name "{account.name}" '
                                  f"(also {list_path}[{names[account.name]}])")
            names[account.name] = index
            accounts.append(account)
        return tuple(accounts)

    def account(self, value: Any, path: str, index: int) -> AccountConfig:
        keys = self.keys(value, path)
        name = self.string(*keys.get("name"), default=f"unnamed-{index}")
        raw_key, key_path = keys.get("api_key")
        api_key = self.api_key(raw_key, key_path)
        enabled = self.boolean(*keys.get("enabled"), default=True)
        metadata, metadata_path = keys.get("metadata")
        if metadata is not _ABSENT and not isinstance(metadata, dict):
            raise ConfigError(metadata_path, f"must be a mapping, got {_shown(metadata, metadata_path)}")
        account = AccountConfig(
            name=name,
            api_key=api_key,
            base_url=self.url(*keys.get("base_url"), default=None, strip_slash=True),
            org_id=self.string(*keys.get("org_id"), default=None),
            weight=self.positive_number(*keys.get("weight"), default=1),
            enabled=enabled,
            rate_limit=self.positive_int(*keys.get("rate_limit"), default=None),
            metadata=_freeze({} if metadata is _ABSENT else metadata),
            excluded_models=self.patterns(*keys.get("excluded_models")),
            max_concurrent=self.positive_int(*keys.get("max_concurrent"), default=None),
        )
        keys.finish()
        if enabled and api_key is None:
            if isinstance(raw_key, _Interpolated):
                # The environment left it empty (already warned): run without it rather than refuse to start.
                self.warnings.append(f'{path}: account "{name}" disabled because its apiKey is empty')
                return attr.evolve(account, enabled=False)
            raise ConfigError(key_path, "is required for an enabled account (or set enabled: false)")
        return account

    def patterns(self, value: Any, path: str) -> Tuple[str, ...]:
        """A list of non-empty fnmatch patterns (``excludedModels``); a lone string is one pattern."""
        if isinstance(value, str):
            value = [value]
        return tuple(self.string(item, f"{path}[{index}]")
                     for index, item in enumerate(self.items(value, path)))

    def routing(self, value: Any, path: str) -> RoutingConfig:
        keys = self.keys(value, path)
        strategy = self.strategy(*keys.get("strategy"))
        raw_mappings, mappings_path = keys.get("model_mappings", "model-mappings")
        mappings: List[ModelMapping] = []
        seen: Dict[str, int] = {}
        for index, entry in enumerate(self.items(raw_mappings, mappings_path)):
            item_path = f"{mappings_path}[{index}]"
            item = self.keys(entry, item_path)
            from_value, from_path = item.take_alias("from", ("from_model",), "from")
            mapping = ModelMapping(
                from_model=self.string(from_value, from_path),
                to_model=self.string(*item.take_alias("to", ("to_model",), "to")),
                provider=self.provider(*item.get("provider")),
            )
            item.finish()
            if mapping.from_model in seen:
                raise ConfigError(from_path, f'duplicate mapping for "{mapping.from_model}" '
                                             f"(also {mappings_path}[{seen[mapping.from_model]}])")
            seen[mapping.from_model] = index
            mappings.append(mapping)
        raw_chain, chain_path = keys.get("fallback_chain", "fallback-chain")
        chain: List[FallbackTarget] = []
        for index, entry in enumerate(self.items(raw_chain, chain_path)):
            item = self.keys(entry, f"{chain_path}[{index}]")
            chain.append(FallbackTarget(provider=self.provider(*item.get("provider")),
                                        model=self.string(*item.get("model"))))
            item.finish()
        raw_passthrough, passthrough_path = keys.get("passthrough_models", "passthrough-models")
        passthrough = tuple(self.string(model, f"{passthrough_path}[{index}]")
                            for index, model in enumerate(self.items(raw_passthrough, passthrough_path)))
        affinity = self.session_affinity(*keys.get("session_affinity", "session-affinity"))
        quota = self.routing_quota(*keys.get("quota"))
        queue_timeout = self.duration(*keys.get("queue_timeout", "queue-timeout"),
                                      default=RoutingConfig().queue_timeout, positive=True)
        keys.finish()
        return RoutingConfig(strategy=strategy, model_mappings=tuple(mappings), fallback_chain=tuple(chain),
                             passthrough_models=passthrough, session_affinity=affinity, quota=quota,
                             queue_timeout=queue_timeout)

    def session_affinity(self, value: Any, path: str) -> SessionAffinityConfig:
        """``routing.session-affinity``: ``enabled`` (bool) and ``ttl`` (positive seconds)."""
        keys = self.keys(value, path)
        defaults = SessionAffinityConfig()
        enabled = self.boolean(*keys.get("enabled"), default=defaults.enabled)
        ttl = self.duration(*keys.get("ttl"), default=defaults.ttl, positive=True)
        keys.finish()
        return SessionAffinityConfig(enabled=enabled, ttl=ttl)

    def routing_quota(self, value: Any, path: str) -> QuotaRoutingConfig:
        """``routing.quota``: ``switch-at``, a utilization fraction with ``0 < x <= 1``."""
        keys = self.keys(value, path)
        raw, switch_path = keys.get("switch_at", "switch-at")
        switch_at = QuotaRoutingConfig().switch_at
        if raw is not _ABSENT:
            number = self._numeric(raw)
            if number is None or not 0 < number <= 1:
                raise ConfigError(switch_path, "must be a number greater than 0 and at most 1 "
                                               f"(a fraction of the window), got {_shown(raw, switch_path)}")
            switch_at = float(number)
        keys.finish()
        return QuotaRoutingConfig(switch_at=switch_at)

    def cloaking(self, value: Any, path: str) -> CloakingConfig:
        keys = self.keys(value, path)
        mode = self.choice(*keys.get("mode"), default="auto", allowed=CLOAKING_MODES)
        plugins, plugins_path = keys.get("plugins")
        if plugins is not _ABSENT and not isinstance(plugins, dict):
            raise ConfigError(plugins_path, f"must be a mapping, got {_shown(plugins, plugins_path)}")
        keys.finish()
        return CloakingConfig(mode=mode, plugins=_freeze({} if plugins is _ABSENT else plugins))

    def providers(self, value: Any, path: str) -> ProvidersConfig:
        keys = self.keys(value, path)
        anthropic = self.anthropic_provider(*keys.get("anthropic"))
        openai = self.openai_provider(*keys.get("openai"))
        google = self.google_provider(*keys.take_alias("google_ai", ("gemini", "google"), "google-ai"))
        keys.finish()
        return ProvidersConfig(anthropic=anthropic, openai=openai, google_ai=google)

    def anthropic_provider(self, value: Any, path: str) -> AnthropicProvider:
        keys = self.keys(value, path)
        default = AnthropicProvider()
        raw_scopes, scopes_path = keys.get("scopes")
        if raw_scopes is _ABSENT:
            scopes = default.scopes
        elif isinstance(raw_scopes, str):
            scopes = tuple(str(raw_scopes).split())
        else:
            scopes = tuple(self.string(s, f"{scopes_path}[{i}]")
                           for i, s in enumerate(self.items(raw_scopes, scopes_path)))
        provider = AnthropicProvider(
            base_url=self.url(*keys.get("base_url"), default=default.base_url, strip_slash=True),
            oauth_token_url=self.url(*keys.get("oauth_token_url"), default=default.oauth_token_url),
            authorize_url=self.url(*keys.get("authorize_url"), default=default.authorize_url),
            client_id=self.string(*keys.get("client_id"), default=default.client_id,
                                  empty_means_default=False),
            redirect_uri=self.url(*keys.get("redirect_uri"), default=default.redirect_uri),
            scopes=scopes,
            refresh_before_expiry=self.duration(*keys.get("refresh_before_expiry"),
                                                default=default.refresh_before_expiry),
        )
        keys.finish()
        return provider

    def openai_provider(self, value: Any, path: str) -> OpenAIProvider:
        keys = self.keys(value, path)
        default = OpenAIProvider()
        api_key = self.api_key(*keys.get("api_key"))
        provider = OpenAIProvider(
            base_url=self.url(*keys.get("base_url"), default=default.base_url, strip_slash=True),
            api_key=api_key or _env_key(self.environ, "OPENAI_API_KEY"),
            org_id=self.string(*keys.get("org_id"), default=None),
        )
        keys.finish()
        return provider

    def google_provider(self, value: Any, path: str) -> GoogleProvider:
        keys = self.keys(value, path)
        default = GoogleProvider()
        api_key = self.api_key(*keys.get("api_key"))
        provider = GoogleProvider(
            base_url=self.url(*keys.get("base_url"), default=default.base_url, strip_slash=True),
            api_key=api_key or _env_key(self.environ, "GEMINI_API_KEY", "GOOGLE_API_KEY"),
        )
        keys.finish()
        return provider

    def server(self, value: Any, path: str) -> ServerConfig:
        keys = self.keys(value, path)
        d = ServerConfig()
        server = ServerConfig(
            max_body_bytes=self.positive_int(*keys.get("max_body_bytes"), default=d.max_body_bytes),
            # A zero timeout would fail every request; zero is only meaningful for drain and keep-alive.
            upstream_timeout=self.duration(*keys.get("upstream_timeout"), default=d.upstream_timeout,
                                           positive=True),
            connect_timeout=self.duration(*keys.get("connect_timeout"), default=d.connect_timeout,
                                          positive=True),
            request_deadline=self.duration(*keys.get("request_deadline"), default=d.request_deadline,
                                           positive=True),
            max_connections_per_host=self.positive_int(*keys.get("max_connections_per_host"),
                                                       default=d.max_connections_per_host),
            drain_timeout=self.duration(*keys.get("drain_timeout"), default=d.drain_timeout),
            keepalive_interval=self.duration(*keys.get("keepalive_interval"),
                                             default=d.keepalive_interval),
            allow_unauthenticated=self.boolean(*keys.get("allow_unauthenticated"),
                                               default=d.allow_unauthenticated),
            workers=self.worker_count(*keys.get("workers"), default=d.workers),
        )
        keys.finish()
        return server

    def state(self, value: Any, path: str) -> StateConfig:
        keys = self.keys(value, path)
        d = StateConfig()
        state = StateConfig(
            backend=self.choice(*keys.get("backend"), default=d.backend, allowed=STATE_BACKENDS),
            url=self.url(*keys.get("url"), default=d.url, schemes=("redis", "rediss", "unix")),
            prefix=self.string(*keys.get("prefix"), default=d.prefix, empty_means_default=False),
        )
        keys.finish()
        return state

    def logging(self, value: Any, path: str) -> LoggingConfig:
        keys = self.keys(value, path)
        d = LoggingConfig()
        logging = LoggingConfig(
            dir=self.string(*keys.get("dir"), default=None),
            retention_days=self.non_negative(*keys.get("retention_days"), default=d.retention_days),
            max_total_mb=self.non_negative(*keys.get("max_total_mb"), default=d.max_total_mb),
            debug_bodies=self.boolean(*keys.get("debug_bodies"), default=d.debug_bodies),
            usage_retention_days=self.non_negative(*keys.get("usage_retention_days"),
                                                   default=d.usage_retention_days),
        )
        keys.finish()
        return logging


def validate_document(document: Any, environ: Mapping[str, str], warnings: List[str]) -> Config:
    """The :class:`Config` that ``document`` (parsed and interpolated) describes; warnings are appended."""
    return _Reader(environ, warnings).config(document)


def _env_key(environ: Mapping[str, str], *names: str) -> Optional[str]:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become ``MappingProxyType``, lists tuples, strings plain ``str``."""
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, str):
        return str(value)
    return value
