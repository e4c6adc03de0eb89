"""The proxy's configuration file: read YAML or JSON, interpolate ``${VAR}``, validate, freeze.

Everything here is pure (no reactor, no network); errors name the key path, never a secret.
"""

import json
import math
import os
import re
import types
from difflib import get_close_matches
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import attr
import yaml

__all__ = [
    "ConfigError", "LoadedConfig", "Config", "AccountConfig", "ModelMapping", "FallbackTarget",
    "RoutingConfig", "CloakingConfig", "AnthropicProvider", "OpenAIProvider", "GoogleProvider",
    "ProvidersConfig", "ServerConfig", "StateConfig", "LoggingConfig",
    "load_config", "parse_config", "load_env_file", "default_config_path", "clproxy_home",
    "PROVIDERS", "STRATEGIES", "CLOAKING_MODES", "STATE_BACKENDS",
]

CONFIG_FILE_NAME = "proxy-config.yaml"

#: Provider names a model mapping or fallback target may use, and the aliases that normalize to them.
PROVIDERS = ("anthropic", "openai", "google-ai")
PROVIDER_ALIASES = {"gemini": "google-ai", "google": "google-ai", "vertex": "google-ai",
                    "google_ai": "google-ai", "googleai": "google-ai"}
STRATEGIES = ("fill-first", "round-robin")
# Round-robin already honours each account's weight, so "weighted" is the same strategy.
STRATEGY_ALIASES = {"weighted-round-robin": "round-robin", "weighted": "round-robin"}
CLOAKING_MODES = ("auto", "always", "never")
STATE_BACKENDS = ("memory", "redis")


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
class RoutingConfig:
    """How accounts are picked and which models go where."""

    strategy: str = "fill-first"
    model_mappings: Tuple[ModelMapping, ...] = ()
    fallback_chain: Tuple[FallbackTarget, ...] = ()
    passthrough_models: Tuple[str, ...] = ()


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


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class LoadedConfig:
    """A configuration with what loading it had to say: ``warnings`` (fix these) and ``notes`` (FYI).

    ``source`` is the file it came from, or ``None`` when no file was found.
    """

    config: Config
    warnings: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    source: Optional[str] = None


# --- locations and env files ----------------------------------------------------------------------


def clproxy_home(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME`` (``~`` expanded), or ``~/.clproxy`` when it is unset or empty."""
    home = environ.get("CLPROXY_HOME", "").strip()
    if home:
        return _expand_user(home, environ)
    return _expand_user(os.path.join("~", ".clproxy"), environ)


def default_config_path(environ: Mapping[str, str] = os.environ) -> str:
    """Where the configuration file is looked for when none is named: ``$CLPROXY_HOME/proxy-config.yaml``."""
    return os.path.join(clproxy_home(environ), CONFIG_FILE_NAME)


def _expand_user(path: str, environ: Mapping[str, str]) -> str:
    # Honour the given environ's HOME so tests and callers need not touch os.environ.
    if path == "~" or path.startswith("~" + os.sep) or path.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return home + path[1:]
    return os.path.expanduser(path)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def load_env_file(path: str) -> Dict[str, str]:
    """Read ``KEY=VALUE`` lines (``export`` prefix, ``#`` comments, quotes and blank lines allowed).

    A line that is not of that shape raises ``ConfigError("<path>:<line>", "expected KEY=VALUE")``;
    the line itself is never quoted, since it may hold a secret.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError("", f"env file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read env file: {_os_reason(e)}") from None
    result: Dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export"):].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        parsed = _env_value(value.strip()) if sep else None
        if not sep or not _ENV_NAME.match(key) or parsed is None:
            raise ConfigError(f"{path}:{lineno}", "expected KEY=VALUE")
        result[key] = parsed
    return result


def _env_value(value: str) -> Optional[str]:
    """The value part of an env-file line without quotes or trailing comment; ``None`` if malformed."""
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        if end < 0:
            return None
        rest = value[end + 1:].strip()
        if rest and not rest.startswith("#"):
            return None
        return value[1:end]
    # An unquoted value ends at a " #" comment, as in POSIX shells and dotenv.
    match = re.search(r"\s#", value)
    return value[:match.start()].rstrip() if match else value


# --- loading --------------------------------------------------------------------------------------


def load_config(path: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> LoadedConfig:
    """Load the configuration file at ``path`` (``None``: the default location).

    A missing file at the default location gives the default configuration and a note saying where to
    put one; a missing file that was named explicitly is a :class:`ConfigError`.
    """
    default = default_config_path(environ)
    explicit = path is not None and os.path.abspath(_expand_user(path, environ)) != os.path.abspath(default)
    target = _expand_user(path, environ) if path is not None else default
    try:
        with open(target, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("", f"config file not found: {target}") from None
        loaded = parse_config("", target, environ)
        note = (f"no config file found at {target}; using defaults. To configure clproxy, create "
                f"that file (see etc/proxy-config.example.yaml) or pass --config PATH")
        return attr.evolve(loaded, notes=loaded.notes + (note,), source=None)
    except OSError as e:
        raise ConfigError(target, f"cannot read config file: {_os_reason(e)}", source=target) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(target, f"config file is not valid UTF-8 (byte offset {e.start})",
                          source=target) from None
    return parse_config(text, target, environ)


def parse_config(text: str, source: str = "<string>",
                 environ: Mapping[str, str] = os.environ) -> LoadedConfig:
    """Parse configuration ``text`` (JSON when it starts with ``{``, else YAML) read from ``source``.

    Raises :class:`ConfigError` on syntax errors (path ``"<source>:<line>"``) and on invalid values
    (path is the key path, e.g. ``accounts.anthropic[1].weight``).
    """
    warnings: List[str] = []
    document = _parse_document(text, source, warnings)
    try:
        document = _interpolate(document, "", environ, warnings)
        config = _Reader(environ, warnings).config(document)
    except ConfigError as e:
        e.source = source
        raise
    return LoadedConfig(config=config, warnings=tuple(warnings), notes=(), source=source)


def _parse_document(text: str, source: str, warnings: List[str]) -> Any:
    """The document in ``text`` as plain Python data; a JSON slip read as YAML adds a warning."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_unique_json_object)
        except _DuplicateJSONKey as e:
            raise ConfigError(source, f'invalid JSON: duplicate key "{e.key}"', source=source) from None
        except ValueError as json_error:
            json_problem = f"{json_error.msg} (column {json_error.colno})"
            # A YAML flow mapping also starts with "{". Accept it, but say so: broken JSON can be
            # valid YAML with another meaning (`"a": }` is a null).
            try:
                document = _load_yaml(text)
            except yaml.YAMLError:
                raise ConfigError(f"{source}:{json_error.lineno}", f"invalid JSON: {json_problem}",
                                  source=source) from None
            warnings.append(f"{source}:{json_error.lineno}: not valid JSON ({json_problem}); "
                            f"read as YAML instead")
            return document
    try:
        return _load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        # Only the parser's own words: its str() quotes the offending line, which may hold a secret.
        problem = "; ".join(p for p in (e.context, e.problem) if p) or "syntax error"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(where, f"invalid YAML: {problem}{column}", source=source) from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {type(e).__name__}", source=source) from None


class _DuplicateJSONKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateJSONKey(key)
        result[key] = value
    return result


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key; the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f'found duplicate key "{key}"', key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeySafeLoader)  # noqa: S506 -- a SafeLoader subclass


def _os_reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


# --- environment interpolation --------------------------------------------------------------------


class _Interpolated(str):
    """A string value that contained ``${`` in the file: it came (partly) from the environment."""


_REFERENCE = re.compile(r"\$(\$\{)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _interpolate(value: Any, path: str, environ: Mapping[str, str], warnings: List[str]) -> Any:
    """``value`` with ``${VAR}``, ``${VAR:-default}`` and ``$${`` resolved in every string, recursively."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def substitute(match: "re.Match[str]") -> str:
            if match.group(1):
                return "${"
            name = match.group(2)
            if name is None:
                raise ConfigError(path, "malformed ${...} reference; write ${NAME} or ${NAME:-default} "
                                        "(and $${ for a literal ${)")
            current = environ.get(name)
            default = match.group(3)
            if default is not None:
                return current if current else default
            if current is None:
                warnings.append(f"{path}: environment variable {name} is not set")
                return ""
            return current

        return _Interpolated(_REFERENCE.sub(substitute, value))
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, k), environ, warnings) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", environ, warnings) for i, v in enumerate(value)]
    return value


# --- validation -----------------------------------------------------------------------------------

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

    def positive_int(self, value: Any, path: str, default: Optional[int]) -> Optional[int]:
        if value is _ABSENT:
            return default
        number = self._numeric(value)
        if number is None or number <= 0 or number != int(number):
            raise ConfigError(path, f"must be a positive integer, got {_shown(value, path)}")
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
            raise ConfigError(path, f"must be a {wanted} URL, got {_shown(value, path)}")
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
        )
        top.finish()
        return config

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
        )
        keys.finish()
        if enabled and api_key is None:
            if isinstance(raw_key, _Interpolated):
                # The environment left it empty (already warned): run without it rather than refuse to start.
                self.warnings.append(f'{path}: account "{name}" disabled because its apiKey is empty')
                return attr.evolve(account, enabled=False)
            raise ConfigError(key_path, "is required for an enabled account (or set enabled: false)")
        return account

    def routing(self, value: Any, path: str) -> RoutingConfig:
        keys = self.keys(value, path)
        strategy = self.choice(*keys.get("strategy"), default="fill-first", allowed=STRATEGIES,
                               aliases=STRATEGY_ALIASES)
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
        keys.finish()
        return RoutingConfig(strategy=strategy, model_mappings=tuple(mappings), fallback_chain=tuple(chain),
                             passthrough_models=passthrough)

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
        )
        keys.finish()
        return logging


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
