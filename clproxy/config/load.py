"""Reading the configuration: YAML or JSON text, ``${VAR}`` interpolation, env files.

:func:`load_config` and :func:`parse_config` run the whole pipeline (parse, interpolate, validate);
syntax errors name ``file:line`` and never quote the line, which may hold a secret.
"""

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import attr
import yaml

from clproxy.config.paths import default_config_path, expand_user
from clproxy.config.schema import ConfigError, LoadedConfig
from clproxy.config.validate import _Interpolated, _join, validate_document

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


def load_config(path: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> LoadedConfig:
    """Load the configuration file at ``path`` (``None``: the default location).

    A missing file at the default location gives the default configuration and a note saying where to
    put one; a missing file that was named explicitly is a :class:`ConfigError`.
    """
    default = default_config_path(environ)
    explicit = path is not None and os.path.abspath(expand_user(path, environ)) != os.path.abspath(default)
    target = expand_user(path, environ) if path is not None else default
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
    try:
        document = _parse_document(text, source, warnings)
        _check_expansion(document)
        document = _interpolate(document, "", environ, warnings)
        config = validate_document(document, environ, warnings)
    except ConfigError as e:
        e.source = source
        raise
    except RecursionError:
        # the parsers and the walks over the document recurse once per level of nesting
        raise ConfigError(source, "the document is nested too deeply", source=source) from None
    return LoadedConfig(config=config, warnings=tuple(warnings), notes=(), source=source, text=text)


def _parse_document(text: str, source: str, warnings: List[str]) -> Any:
    """The document in ``text`` as plain Python data; a JSON slip read as YAML adds a warning."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_unique_json_object)
        except _DuplicateJSONKey as e:
            raise ConfigError(source, f'invalid JSON: duplicate key "{e.key}"', source=source) from None
        except json.JSONDecodeError as json_error:
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


#: More values than any real configuration holds. YAML aliases (``*name``) share one node, so a
#: few lines of aliases of aliases can stand for billions of values once the document is walked.
MAX_VALUES = 100_000


def _check_expansion(document: Any) -> None:
    """Refuse a document whose aliases refer to a node containing them (a cycle every walk would
    follow for ever), or that stands for more than :data:`MAX_VALUES` values once expanded."""
    sizes: Dict[int, int] = {}
    walking: Set[int] = set()

    def size(value: Any, path: str) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if id(value) in sizes:
            return sizes[id(value)]
        if id(value) in walking:
            raise ConfigError(path, "a YAML alias (*name) refers to a mapping or list that contains it")
        walking.add(id(value))
        children = (value.items() if isinstance(value, dict) else
                    ((f"[{index}]", item) for index, item in enumerate(value)))
        total = 1
        for key, child in children:
            child_path = f"{path}{key}" if isinstance(value, list) else _join(path, key)
            total += size(child, child_path)
            if total > MAX_VALUES:
                raise ConfigError(path, f"more than {MAX_VALUES} values once its YAML aliases (*name) are "
                                        f"expanded; a configuration is far smaller")
        walking.discard(id(value))
        sizes[id(value)] = total
        return total

    size(document, "")


def _os_reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


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
