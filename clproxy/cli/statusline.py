"""``clproxy statusline``: one line for Claude Code's ``statusLine``: the account serving this session.

Claude Code pipes its status-line JSON (``session_id``, ``model``, ...) on stdin and shows the first
line of stdout. This asks the daemon's ``GET /session/{session_id}`` and prints e.g.
``clproxy: work · 5h 62% · 7d 18%``. A status line must never error: every failure (no daemon, bad
input, HTTP errors, timeouts, a refused key) is a short line and exit 0. Stdlib only, no Twisted:
Claude Code runs it after every message.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional, TextIO

from clproxy.cli.argparsing import UsageExit, writing_parser
from clproxy.cli.status import local_opener, read_state, url_from_state
from clproxy.routing.affinity import valid_session_id
from clproxy.routing.headroom import percent as utilization_percent

TIMEOUT = 1.0
#: The most of stdin read (Claude Code's JSON is a few hundred bytes).
MAX_INPUT = 1024 * 1024
#: The most of an answer read.
MAX_ANSWER = 64 * 1024
PREFIX = "clproxy: "
NOT_RUNNING = "proxy not running"
SEPARATOR = " · "
#: Hosts that are Anthropic itself, never the proxy (Claude Code not routed through clproxy).
ANTHROPIC_HOSTS = ("api.anthropic.com",)


class Unavailable(Exception):
    """The daemon gave no usable answer; the message is the short line to show."""


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    Parser = writing_parser(stdout, stderr)
    parser = Parser(prog="clproxy statusline",
                    description="Print one line for Claude Code's statusLine setting: the clproxy account "
                                "serving this session and its 5h/7d utilization. Reads Claude Code's "
                                "status-line JSON on stdin; always exits 0. In ~/.claude/settings.json: "
                                '"statusLine": {"type": "command", "command": "clproxy statusline"}.')
    parser.add_argument("--url", help="the proxy's base URL (default: $ANTHROPIC_BASE_URL, else "
                                      "$CLPROXY_HOME/proxy-state.json)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for the proxy")
    return parser


def proxy_url(environ: Mapping[str, str]) -> str:
    """The daemon's base URL: ``ANTHROPIC_BASE_URL`` (what Claude Code itself uses) unless it points
    at Anthropic, else the state file's address."""
    base = (environ.get("ANTHROPIC_BASE_URL") or "").strip()
    if base.startswith(("http://", "https://")):
        host = (urllib.parse.urlsplit(base).hostname or "").lower()
        if host and host not in ANTHROPIC_HOSTS:
            return base.rstrip("/")
    return url_from_state(read_state(environ))


def client_headers(environ: Mapping[str, str]) -> dict:
    """The client key the way Claude Code sends it: ``ANTHROPIC_API_KEY`` as ``x-api-key``,
    ``ANTHROPIC_AUTH_TOKEN`` as a Bearer token (never in the URL)."""
    headers = {"accept": "application/json"}
    api_key = (environ.get("ANTHROPIC_API_KEY") or "").strip()
    token = (environ.get("ANTHROPIC_AUTH_TOKEN") or "").strip()
    if api_key:
        headers["x-api-key"] = api_key
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def session_from(text: str) -> Optional[str]:
    """The ``session_id`` of Claude Code's status-line JSON, or None (empty, not JSON, no valid id)."""
    try:
        document = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    return valid_session_id(document.get("session_id"))


def get_json(url: str, headers: Mapping[str, str], timeout: float) -> Any:
    """GET ``url`` and parse its JSON; :class:`Unavailable` with the line to show otherwise."""
    opener = local_opener()  # no HTTP proxy from the environment, no redirect taking the key along
    try:
        with opener.open(urllib.request.Request(url, headers=dict(headers)), timeout=timeout) as response:
            body = response.read(MAX_ANSWER)
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise Unavailable("client key refused" if _has_key(headers) else "needs a client key")
        raise Unavailable(f"proxy answered HTTP {e.code}")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise Unavailable("proxy not answering")
        raise Unavailable(NOT_RUNNING)
    try:
        return json.loads(body)
    except ValueError:
        raise Unavailable("not a clproxy answer")


def _has_key(headers: Mapping[str, str]) -> bool:
    return "x-api-key" in headers or "authorization" in headers


def describe(document: Any) -> str:
    """The line (without the prefix) for a ``/session`` document."""
    if not isinstance(document, dict):
        return "not a clproxy answer"
    account = document.get("account")
    if isinstance(account, dict):
        parts = [_clean(account.get("name")) or "?"]
        if account.get("state") in ("cooling", "disabled"):
            parts[0] += f" ({account['state']})"
        quota = _mapping(document.get("quota"))
        for window in ("5h", "7d"):
            percent = utilization_percent(_mapping(quota.get(window)).get("utilization"))
            if percent is not None:
                parts.append(f"{window} {percent}%")
        return SEPARATOR.join(parts)
    pool = _mapping(document.get("pool"))
    ready, total = pool.get("ready"), pool.get("total")
    if not isinstance(ready, int) or not isinstance(total, int):
        return "no account bound yet"
    if total == 0:
        return "no accounts"
    return f"{ready} of {total} account{'' if total == 1 else 's'} ready"


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _clean(name: Any) -> str:
    """An account name fit for a terminal line: printable, bounded."""
    if not isinstance(name, str):
        return ""
    return "".join(c for c in name if c.isprintable())[:40]


def line(stdin_text: str, environ: Mapping[str, str], url: Optional[str] = None,
         timeout: float = TIMEOUT) -> str:
    """The status line for ``stdin_text`` (Claude Code's JSON), never raising."""
    try:
        base = url.rstrip("/") if url else proxy_url(environ)
        headers = client_headers(environ)
        session = session_from(stdin_text)
        if session is None:
            # no session to ask about: say whether the proxy is up (/health needs no key)
            get_json(base + "/health", {"accept": "application/json"}, timeout)
            return PREFIX + "no session yet"
        document = get_json(f"{base}/session/{urllib.parse.quote(session, safe='')}", headers, timeout)
        return PREFIX + describe(document)
    except Unavailable as e:
        return PREFIX + str(e)
    except Exception:  # a status line never shows a traceback
        return PREFIX + "status unavailable"


def _read_input(stdin: TextIO) -> str:
    try:
        if stdin is None or stdin.isatty():
            return ""  # run by hand: nothing piped, do not wait for a terminal
        return stdin.read(MAX_INPUT)
    except (OSError, ValueError, UnicodeDecodeError):
        return ""


def main(argv, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         environ: Mapping[str, str] = os.environ) -> int:
    """``clproxy statusline [--url URL] [--timeout SECONDS]``: prints one line, returns 0 (2 on bad usage)."""
    try:
        args = _parser(stdout, stderr).parse_args(list(argv))
    except UsageExit as e:
        return e.code
    stdout.write(line(_read_input(stdin), environ, args.url, args.timeout) + "\n")
    stdout.flush()
    return 0
