"""Point Claude Code at the proxy through ``env`` in its ``settings.json``, and take it back exactly.

``configure`` sets a few ``env`` keys and returns a record of what it changed (and the values they
replaced); ``restore`` undoes only that. ``configure_status_line`` / ``restore_status_line`` do the
same for the ``statusLine`` setting (``clproxy statusline``). Every other key is kept; writes are
atomic and keep the mode. :class:`SetOnceUsable` holds that change back while the daemon has no
usable account.
"""

import errno
import json
import os
import re
import shlex
import stat
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.application import service
from twisted.internet import task

from clproxy.observe import console
from clproxy.team.keys import KEY_PREFIX

__all__ = [
    "SettingsError", "SETTINGS_ENV", "DEFAULT_TOOL_SEARCH", "default_settings_path", "proxy_env",
    "read_settings", "write_settings", "configure", "restore", "pointing_at", "holds_client_key",
    "SetOnceUsable",
    "status_line_setting", "is_our_status_line", "configure_status_line", "restore_status_line",
]

log = console.logger(__name__)

#: Environment variable naming the settings file (``off`` disables the integration).
SETTINGS_ENV = "CLPROXY_CLAUDE_SETTINGS"
#: Claude Code turns MCP tool search off by default when ``ANTHROPIC_BASE_URL`` is not Anthropic's,
#: because most proxies drop ``tool_reference`` blocks; passthrough forwards them untouched.
DEFAULT_TOOL_SEARCH = "true"
#: Values meaning "do not touch Claude Code's settings".
OFF_VALUES = ("off", "none", "no", "false", "0", "")


class SettingsError(Exception):
    """Claude Code's settings cannot be read or written; the message is one line, for the user."""


def default_settings_path(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """``$CLPROXY_CLAUDE_SETTINGS``, else ``~/.claude/settings.json``; ``None`` when set to ``off``."""
    value = environ.get(SETTINGS_ENV)
    if value is not None:
        value = value.strip()
        if value.lower() in OFF_VALUES:
            return None
        return _expand(value, environ)
    return _expand(os.path.join("~", ".claude", "settings.json"), environ)


def _expand(path: str, environ: Mapping[str, str]) -> str:
    if path == "~" or path.startswith("~/"):
        return (environ.get("HOME") or os.path.expanduser("~")) + path[1:]
    return os.path.expanduser(path)


def proxy_env(base_url: str, tool_search: Optional[str] = DEFAULT_TOOL_SEARCH) -> Dict[str, str]:
    """The ``env`` entries that route Claude Code through the proxy at ``base_url``.

    ``tool_search`` is the value for ``ENABLE_TOOL_SEARCH`` (``None`` or ``off``: leave it alone).
    """
    values = {"ANTHROPIC_BASE_URL": base_url}
    if tool_search is not None and tool_search.strip().lower() not in ("off", "none", ""):
        values["ENABLE_TOOL_SEARCH"] = tool_search.strip()
    return values


def read_settings(path: str) -> Optional[Dict[str, Any]]:
    """The settings document, or ``None`` when the file does not exist.

    Raises :class:`SettingsError` when it cannot be read or is not a JSON object (the file is left
    as it is: a corrupt file is never overwritten).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SettingsError(f"cannot read Claude Code settings {path}: {e.strerror or e}") from None
    if not data.strip():
        return {}  # Claude Code treats an empty file as no settings; so do we
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise SettingsError(f"Claude Code settings {path} are not UTF-8 text; left untouched") from None
    except json.JSONDecodeError as e:
        raise SettingsError(f"Claude Code settings {path} are not valid JSON ({e.msg} at line {e.lineno} "
                            f"column {e.colno}); left untouched: fix the file and start again") from None
    if not isinstance(document, dict):
        raise SettingsError(f"Claude Code settings {path} are not a JSON object; left untouched")
    env = document.get("env")
    if env is not None and not isinstance(env, dict):
        raise SettingsError(f'"env" in Claude Code settings {path} is not an object; left untouched')
    return document


def _encoded_like(document: Mapping[str, Any], current: Optional[bytes]) -> bytes:
    """``document`` as JSON written the way ``current`` (the file's bytes, if any) is: its indent (or
    one line), ``\\u`` escapes when it is all ASCII, its BOM and its final newline. Claude Code's own
    layout (2 spaces, UTF-8, final newline) for a new or empty file."""
    text = (current or b"").decode("utf-8", "replace")
    bom = text.startswith("\ufeff")
    text = text.lstrip("\ufeff")
    if not text.strip():
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    indented = re.search(r"\n([ \t]+)\S", text)
    indent = indented.group(1) if indented else (2 if "\n" in text.strip() else None)
    encoded = json.dumps(document, indent=indent, ensure_ascii=text.isascii())
    return (("\ufeff" if bom else "") + encoded + ("\n" if text.endswith("\n") else "")).encode("utf-8")


def write_settings(path: str, document: Mapping[str, Any], mode: Optional[int] = None) -> None:
    """Replace the settings atomically (temp file, fsync, rename, fsync the directory).

    A symlinked ``settings.json`` keeps its link: the target is replaced. The file keeps its mode
    (``mode`` for a new one, default 0600 -- it may hold tokens) and its layout (indent, escapes,
    BOM, final newline): a file the user wrote by hand is changed only in the keys we own.
    """
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    owner = None
    current = None
    try:
        st = os.stat(target)
        mode = stat.S_IMODE(st.st_mode)
        owner = (st.st_uid, st.st_gid)
        with open(target, "rb") as f:
            current = f.read()
    except FileNotFoundError:
        mode = 0o600 if mode is None else mode
    except OSError as e:
        raise SettingsError(f"cannot update Claude Code settings {path}: {e.strerror or e}") from None
    data = _encoded_like(document, current)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings.", suffix=".clproxy.tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None and hasattr(os, "fchown"):
                try:
                    os.fchown(f.fileno(), *owner)
                except OSError:
                    pass  # not ours to give away; the mode is what matters
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(directory)
    except OSError as e:
        raise SettingsError(f"cannot update Claude Code settings {path}: {e.strerror or e}; "
                            f"it was left as it was") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def configure(path: str, values: Mapping[str, str]) -> Dict[str, Any]:
    """Set ``env[key] = value`` for each of ``values`` in the settings at ``path``.

    Returns the record :func:`restore` needs: the path, what was set, the values replaced (``None``
    for keys that were absent) and whether the file or its ``env`` object were created.
    A missing file is created; an invalid one raises :class:`SettingsError` and stays untouched.
    """
    document = read_settings(path)
    created_file = document is None
    document = {} if document is None else document
    created_env = "env" not in document
    env = document.setdefault("env", {})
    previous = {key: env.get(key) for key in values}
    for key, value in values.items():
        env[key] = value
    record = {"path": os.path.abspath(path), "set": dict(values), "previous": previous,
              "createdFile": created_file, "createdEnv": created_env}
    if not created_file and all(previous[k] == v for k, v in values.items()):
        return record  # already so: nothing to write
    write_settings(path, document)
    return record


def restore(record: Mapping[str, Any]) -> List[str]:
    """Undo :func:`configure`: each key still holding the value we set gets its previous value back
    (or is removed); keys someone changed since are left alone. Returns the keys restored.

    A settings file that is gone needs nothing; an invalid one raises :class:`SettingsError`.
    """
    path = record["path"]
    document = read_settings(path)
    if document is None:
        return []
    env = document.get("env")
    if not isinstance(env, dict):
        return []
    restored = []
    for key, value in record.get("set", {}).items():
        previous = record.get("previous", {}).get(key)
        if env.get(key) != value or previous == value:  # changed since, or it was already so
            continue
        if previous is None:
            del env[key]
        else:
            env[key] = previous
        restored.append(key)
    if not restored:
        return []
    if record.get("createdEnv") and not env:
        del document["env"]
    if record.get("createdFile") and not document:
        try:
            os.unlink(os.path.realpath(path))
            return restored
        except OSError:
            pass  # fall through and write the empty document
    write_settings(path, document)
    return restored


def status_line_setting(command: str) -> Dict[str, str]:
    """The ``statusLine`` value that runs ``command`` (``clproxy statusline``, as a shell line)."""
    return {"type": "command", "command": command}


def is_our_status_line(value: Any) -> bool:
    """Whether a ``statusLine`` value runs ``clproxy statusline`` (any path to ``clproxy``, or
    ``python -m clproxy statusline``)."""
    if not isinstance(value, dict) or value.get("type") != "command":
        return False
    try:
        words = shlex.split(str(value.get("command") or ""))
    except ValueError:
        return False
    return len(words) >= 2 and words[-1] == "statusline" and os.path.basename(words[-2]) == "clproxy"


def configure_status_line(path: str, command: str, replace: bool = False,
                          earlier: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Set Claude Code's ``statusLine`` to run ``command``, keeping a user's own unless ``replace``.

    Returns the record :func:`restore_status_line` needs (``{"path", "set", "previous",
    "createdFile"}``; ``previous`` is the user's value or None), or None when the user has a status
    line of their own and ``replace`` is false (nothing is written). Ours already there is updated
    in place; ``earlier`` (the record of that earlier install) keeps what it replaced.
    """
    document = read_settings(path)
    created_file = document is None
    document = {} if document is None else document
    current = document.get("statusLine")
    wanted = status_line_setting(command)
    if current is None:
        previous = None
    elif is_our_status_line(current):
        same_file = earlier is not None and earlier.get("path") == os.path.abspath(path)
        previous = earlier.get("previous") if same_file and earlier is not None else None
        created_file = bool(same_file and earlier is not None and earlier.get("createdFile"))
    elif replace:
        previous = current
    else:
        return None
    record = {"path": os.path.abspath(path), "set": wanted, "previous": previous,
              "createdFile": created_file}
    if current != wanted:
        document["statusLine"] = wanted
        write_settings(path, document)
    return record


def restore_status_line(record: Mapping[str, Any]) -> Optional[str]:
    """Undo :func:`configure_status_line` while ``statusLine`` is still what it set: the user's own
    comes back (``"restored"``) or ours is removed (``"removed"``). None when there was nothing to
    undo (file gone, or someone changed the status line since: theirs now, left alone)."""
    path = record["path"]
    document = read_settings(path)
    if document is None or document.get("statusLine") != record.get("set"):
        return None
    previous = record.get("previous")
    if previous is not None:
        document["statusLine"] = previous
        write_settings(path, document)
        return "restored"
    del document["statusLine"]
    if record.get("createdFile") and not document:
        try:
            os.unlink(os.path.realpath(path))
            return "removed"
        except OSError:
            pass  # fall through and write the empty document
    write_settings(path, document)
    return "removed"


def holds_client_key(path: str) -> bool:
    """Whether the settings at ``path`` give Claude Code a clproxy client key (``env``'s
    ``ANTHROPIC_AUTH_TOKEN`` or ``ANTHROPIC_API_KEY``; unreadable: ``False``)."""
    try:
        document = read_settings(path)
    except SettingsError:
        return False
    env = (document or {}).get("env")
    if not isinstance(env, dict):
        return False
    return any(isinstance(env.get(name), str) and env[name].strip().startswith(KEY_PREFIX)
               for name in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"))


def pointing_at(path: str, base_url: str) -> bool:
    """Whether the settings at ``path`` route Claude Code to ``base_url`` (unreadable: ``False``)."""
    try:
        document = read_settings(path)
    except SettingsError:
        return False
    return bool(document) and (document.get("env") or {}).get("ANTHROPIC_BASE_URL") == base_url


class SetOnceUsable(service.Service):
    """Points Claude Code at the proxy only while that can work: once the daemon has a usable
    (enabled) account. Pointed at a proxy without one, Claude Code gets 401 on every request.
    Likewise with client keys (team mode, ``keys_exist()``): the proxy then answers only a request
    that carries one, so the settings are left alone unless they already give Claude Code a key.

    Built over a ``runstate.Lifecycle`` that has not started yet: it takes the lifecycle's
    ``settings_path`` (so the lifecycle no longer sets it at start) and, once an account is there,
    sets the settings itself and records them in the lifecycle's state, which the lifecycle (and
    the fail-open guard) undo as before. Add it to the daemon after the lifecycle: it starts once
    the lifecycle has recorded the address, and stops before the lifecycle restores the settings.
    While waiting it looks at ``directory`` every ``interval`` seconds on ``clock`` (a cheap stat of
    the token store) and listens to its changes (a config reload adds accounts at once).
    """

    name = "claude-settings"

    def __init__(self, lifecycle, directory, clock, interval: float = 1.0,
                 keys_exist: Callable[[], bool] = lambda: False):
        self.lifecycle = lifecycle
        self.directory = directory
        self.keys_exist = keys_exist
        self.clock = clock
        self.interval = interval
        self.settings_path: Optional[str] = lifecycle.settings_path
        lifecycle.settings_path = None  # ours to set, when there is an account
        #: the record of what was set (``None`` while waiting)
        self.record: Optional[Dict[str, Any]] = None
        self._loop: Optional[task.LoopingCall] = None

    def startService(self):
        """Set the settings now if an account is usable; otherwise say so and wait for one."""
        super().startService()
        if self._check(self.directory.current()):
            return
        log.warn("no usable account: Claude Code's settings {path} left unchanged (they are set as soon "
                 "as one appears); add one with `clproxy auth login anthropic`", path=self.settings_path)
        self.directory.add_listener(self._check)
        self._loop = task.LoopingCall(lambda: self._check(self.directory.current()))
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Stop waiting (what was set is the lifecycle's to undo)."""
        self._stop_waiting()
        return super().stopService()

    def _stop_waiting(self) -> None:
        self.directory.remove_listener(self._check)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _check(self, accounts) -> bool:
        """Set the settings if ``accounts`` has a usable one; whether nothing is left to wait for."""
        if self.record is not None or not self.running:
            return True
        if not any(account.enabled for account in accounts):
            return False
        self._stop_waiting()
        state = self.lifecycle.state
        if state is None or getattr(self.lifecycle, "_cleaned", False):
            return True  # the proxy is on its way out: pointing Claude Code at it now would strand it
        url = state["url"]
        if self.keys_exist() and not holds_client_key(self.settings_path):
            log.warn("client keys exist: Claude Code's settings {path} left unchanged (pointed at the "
                     "proxy without a key it would get 401 on every request). Give Claude Code a key "
                     "and the address: ANTHROPIC_AUTH_TOKEN=clp_... and ANTHROPIC_BASE_URL={url} "
                     "(docs/team.rst)", path=self.settings_path, url=url)
            return True
        try:
            record = configure(self.settings_path, proxy_env(url, self.lifecycle.tool_search))
        except SettingsError as e:
            log.warn("{error}. Claude Code was not configured: set env.ANTHROPIC_BASE_URL={url} "
                     "in its settings yourself", error=str(e), url=url)
            return True
        self.record = record
        self.lifecycle.update(claudeSettings=record)
        log.info("Claude Code settings {path}: env.ANTHROPIC_BASE_URL={url} (restart Claude Code "
                 "to pick it up; removed again when the proxy stops)", path=self.settings_path, url=url)
        return True
