"""The proxy's configuration file: read YAML or JSON, interpolate ``${VAR}``, validate, freeze.

Everything here is pure (no reactor, no network); errors name the key path, never a secret. The
package is split by concern: :mod:`.schema` (names, defaults, frozen types), :mod:`.paths`
(``$CLPROXY_HOME``), :mod:`.load` (YAML/JSON, ``${VAR}``, env files) and :mod:`.validate`. Callers
use the names re-exported here (``from clproxy import config as configuration``).
"""

from clproxy.config.load import load_config, load_env_file, parse_config
from clproxy.config.paths import clproxy_home, default_config_path
from clproxy.config.schema import (
    CLOAKING_MODES, CONFIG_FILE_NAME, MAX_WORKERS, PROVIDER_ALIASES, PROVIDERS, STATE_BACKENDS, STRATEGIES, STRATEGY_ALIASES,
    AccountConfig, AnthropicProvider, CloakingConfig, Config, ConfigError, FallbackTarget, GoogleProvider,
    LoadedConfig, LoggingConfig, ModelMapping, OpenAIProvider, ProvidersConfig, QuotaRoutingConfig, RoutingConfig,
    ServerConfig, SessionAffinityConfig, StateConfig, parse_strategy,
)

__all__ = [
    "ConfigError", "LoadedConfig", "Config", "AccountConfig", "ModelMapping", "FallbackTarget",
    "RoutingConfig", "SessionAffinityConfig", "QuotaRoutingConfig", "CloakingConfig", "AnthropicProvider", "OpenAIProvider", "GoogleProvider",
    "ProvidersConfig", "ServerConfig", "StateConfig", "LoggingConfig",
    "load_config", "parse_config", "load_env_file", "default_config_path", "clproxy_home",
    "PROVIDERS", "PROVIDER_ALIASES", "STRATEGIES", "STRATEGY_ALIASES", "CLOAKING_MODES", "STATE_BACKENDS",
    "CONFIG_FILE_NAME", "MAX_WORKERS", "parse_strategy",
]
