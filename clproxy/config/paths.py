"""Where clproxy's files live: ``$CLPROXY_HOME`` and the default configuration file in it."""

import os
from typing import Mapping

from clproxy.config.schema import CONFIG_FILE_NAME


def clproxy_home(environ: Mapping[str, str] = os.environ) -> str:
    """``$CLPROXY_HOME`` (``~`` expanded), or ``~/.clproxy`` when it is unset or empty."""
    home = environ.get("CLPROXY_HOME", "").strip()
    if home:
        return expand_user(home, environ)
    return expand_user(os.path.join("~", ".clproxy"), environ)


def default_config_path(environ: Mapping[str, str] = os.environ) -> str:
    """Where the configuration file is looked for when none is named: ``$CLPROXY_HOME/proxy-config.yaml``."""
    return os.path.join(clproxy_home(environ), CONFIG_FILE_NAME)


def expand_user(path: str, environ: Mapping[str, str]) -> str:
    """``path`` with a leading ``~`` replaced by ``environ``'s ``HOME``."""
    # Honour the given environ's HOME so tests and callers need not touch os.environ.
    if path == "~" or path.startswith("~" + os.sep) or path.startswith("~/"):
        home = environ.get("HOME") or os.path.expanduser("~")
        return home + path[1:]
    return os.path.expanduser(path)
