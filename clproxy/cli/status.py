"""``clproxy proxy status``: what the running daemon says about itself, from its live ``/status``.

Finds the daemon through ``$CLPROXY_HOME/proxy-state.json`` (or ``--url``), prints PID, uptime,
strategy, fallback chain, per-account usage and attempts vs completed requests, each account's quota
windows (5h/7d utilization and reset) and bound sessions, the session moves and the queue. Exit 1
when no proxy answers; never a traceback. Once client keys exist (team mode) ``/status`` needs an
admin key: it is taken from ``CLPROXY_ADMIN_KEY`` (or a ``clp_`` key in ``ANTHROPIC_AUTH_TOKEN`` /
``ANTHROPIC_API_KEY``, as Claude Code would send it) and sent as a Bearer token, never in the URL.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, List, Mapping, Optional, TextIO

from clproxy.config import clproxy_home
from clproxy.team.keys import KEY_PREFIX
from clproxy.cli.argparsing import UsageExit as _UsageExit, seconds, writing_parser

DEFAULT_URL = "http://127.0.0.1:55669"
STATE_FILE_NAME = "proxy-state.json"
TIMEOUT = 5.0
#: the environment variable holding an admin client key for ``/status`` (team mode)
ADMIN_KEY_VARIABLE = "CLPROXY_ADMIN_KEY"
#: what every clproxy client key starts with (another value in Claude Code's variables is an
#: Anthropic credential, never sent to the proxy's /status)
CLIENT_KEY_PREFIX = KEY_PREFIX


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    Parser = writing_parser(stdout, stderr)

    parser = Parser(prog="clproxy proxy status",
                    description="Show the running proxy's PID, uptime, strategy, fallback chain and "
                                "per-account usage (from its live /status endpoint).")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parser.add_argument("--url", help=f"the proxy's base URL (default: from $CLPROXY_HOME/{STATE_FILE_NAME}, "
                                      f"else {DEFAULT_URL})")
    parser.add_argument("--timeout", type=seconds, default=TIMEOUT, help="seconds to wait for an answer")
    return parser


def read_state(environ: Mapping[str, str]) -> Optional[dict]:
    """The daemon's state file (``{"pid", "host", "port", ...}``), or None when absent or unreadable."""
    path = os.path.join(clproxy_home(environ), STATE_FILE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    state["_path"] = path
    return state


def url_from_state(state: Optional[dict]) -> str:
    """The base URL the state file points at (its ``url``, else ``host``/``port``; a wildcard bind
    is reached on loopback)."""
    if not state:
        return DEFAULT_URL
    url = state.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        for wildcard, loopback in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
            url = url.replace(wildcard, loopback)
        return url.rstrip("/")
    if not state.get("port"):
        return DEFAULT_URL
    host = str(state.get("host") or "127.0.0.1")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(state['port'])}"


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class NotRunning(Exception):
    """No proxy answered at the URL; the message says why."""


class Refused(Exception):
    """The proxy answered but would not show its status to this caller (team mode without an admin
    key); the message says what to set."""


def admin_key(environ: Mapping[str, str]) -> Optional[str]:
    """The client key to show ``/status``: ``CLPROXY_ADMIN_KEY``, else a clproxy key in Claude
    Code's own variables; None when there is none."""
    for name in (ADMIN_KEY_VARIABLE, "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"):
        value = (environ.get(name) or "").strip()
        if value and (name == ADMIN_KEY_VARIABLE or value.startswith(CLIENT_KEY_PREFIX)):
            return value
    return None


def fetch_status(url: str, timeout: float, key: Optional[str] = None) -> dict:
    """GET ``<url>/status`` (with ``key`` as a Bearer token when given) and parse it; raises
    :class:`Refused` when the proxy wants an admin key, :class:`NotRunning` with one line otherwise."""
    target = url.rstrip("/") + "/status"
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(target, headers=headers)
    try:
        with local_opener().open(request, timeout=timeout) as response:
            body = response.read(8 * 1024 * 1024)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            how = (f"set {ADMIN_KEY_VARIABLE} to a key made with `clproxy keys create NAME --admin`")
            if not key:
                raise Refused(f"the proxy at {url} has client keys and shows /status to an admin key "
                              f"only: {how}")
            raise Refused(f"the proxy at {url} refused the client key given for /status (HTTP {e.code}: "
                          f"not a valid admin key): {how}")
        raise NotRunning(f"the proxy at {url} answered /status with HTTP {e.code}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NotRunning(f"no proxy is running at {url} ({reason})")
    try:
        document = json.loads(body)
    except ValueError:
        raise NotRunning(f"{target} did not answer with JSON: is this a clproxy daemon?")
    if not isinstance(document, dict):
        raise NotRunning(f"{target} did not answer with a status document")
    return document


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is here: following it would send the request's
    client key to wherever the answer points (urllib copies the headers to the new host)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def local_opener():
    """An opener for asking a local daemon: never through an HTTP proxy from the environment,
    never following a redirect (the request may carry a client key)."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def main(argv, *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         environ: Mapping[str, str] = os.environ, now: Callable[[], float] = time.time) -> int:
    """``clproxy proxy status [--format json] [--url URL]``; returns the exit code."""
    try:
        args = _parser(stdout, stderr).parse_args(list(argv))
    except _UsageExit as e:
        return e.code
    state = read_state(environ)
    url = args.url or url_from_state(state)
    pid = state.get("pid") if state and not args.url else None
    stale = isinstance(pid, int) and not pid_alive(pid)
    try:
        document = fetch_status(url, args.timeout, admin_key(environ))
    except Refused as e:
        if args.format == "json":
            stdout.write(json.dumps({"running": True, "url": url, "error": str(e)}, indent=2) + "\n")
        stderr.write(f"clproxy: {e}\n")
        return 1
    except NotRunning as e:
        message = str(e)
        if stale:
            message += (f"; the state file {state['_path']} names PID {pid}, which has exited "
                        f"(the next `clproxy proxy start` clears it)")
        if args.format == "json":
            stdout.write(json.dumps({"running": False, "url": url, "error": message}, indent=2) + "\n")
        stderr.write(f"clproxy: {message}. Start it with `clproxy proxy start`.\n")
        return 1
    except Exception as e:  # never a traceback on the terminal
        stderr.write(f"clproxy: cannot read the proxy's status ({type(e).__name__}: {e})\n")
        return 1
    if document.get("pid") is None and pid is not None and not stale:
        document["pid"] = pid
    if state and not args.url:
        # what /status does not say, the daemon's own state file does
        if _first(document, "fallback_chain", "fallbackChain") is None and "fallbackChain" in state:
            document["fallbackChain"] = state["fallbackChain"]
        if document.get("uptime") is None and isinstance(state.get("startTime"), (int, float)):
            document["uptime"] = max(0.0, now() - state["startTime"])
    document.setdefault("url", url)
    if args.format == "json":
        stdout.write(json.dumps(dict(document, running=True), indent=2, sort_keys=False) + "\n")
    else:
        stdout.write(render_text(document, now()))
    return 0


def render_text(document: dict, now: float) -> str:
    """The human-readable status."""
    counters = document.get("counters") or {}
    attempts = counters.get("upstream_attempts", 0) or 0
    completed = counters.get("completed_requests", 0) or 0
    truncated = counters.get("truncated_streams", 0) or 0
    ratio = f" ({attempts / completed:.2f} attempts per request)" if completed else ""
    lines = [
        f"clproxy is running at {document.get('url')}",
        f"  PID:             {document.get('pid') if document.get('pid') is not None else 'unknown'}",
        f"  Version:         {document.get('version', 'unknown')}",
        f"  Uptime:          {format_duration(document.get('uptime'))}",
        f"  Strategy:        {document.get('strategy', 'unknown')}",
        f"  Fallback chain:  {format_chain(_first(document, 'fallback_chain', 'fallbackChain'))}",
        f"  Requests:        {completed} completed, {attempts} upstream attempts{ratio}",
    ]
    if truncated:
        lines.append(f"  Truncated:       {truncated} stream(s) ended early")
    if "sessionMoves" in document or "queueLength" in document:
        lines.append(f"  Routing:         {_count(document.get('sessionMoves'))} session move(s), "
                     f"{_count(document.get('queueLength'))} request(s) queued")
    logs = (document.get("observability") or {}).get("logs") or document.get("logs")
    if isinstance(logs, dict):
        dropped = sum((logs.get("dropped") or {}).values()) if isinstance(logs.get("dropped"), dict) else 0
        note = f" ({dropped} records dropped)" if dropped else ""
        lines.append(f"  Logs:            {logs.get('dir')}{note}")
    accounts = document.get("accounts") or []
    lines.append("")
    if not accounts:
        lines.append("No accounts. Add one with `clproxy auth login anthropic`.")
    else:
        lines.append("Accounts:")
        lines.extend(_account_table(accounts, now))
        lines.append("")
        lines.append("Quota and sessions:")
        lines.extend(_routing_table(accounts))
    groups = document.get("organizations") or []
    if groups:
        lines.append("")
        lines.append("Organizations (accounts that share one quota):")
        for group in groups:
            if isinstance(group, dict):
                names = ", ".join(str(name) for name in group.get("accounts") or [])
                lines.append(f"  {group.get('id')}: {names} -- {format_quota(group.get('quota'))}")
    return "\n".join(lines) + "\n"


#: What an unknown quota window (never seen, or reset since it was seen) shows.
UNKNOWN_MARK = "\u2013"


def format_quota(quota) -> str:
    """``5h 62% (resets 14:05) · 7d 18%`` from a ``/status`` quota view; an unknown window (or one
    that reset since it was seen) shows ``–``. The reset is the local wall-clock time."""
    windows = quota.get("windows") if isinstance(quota, dict) else None
    windows = windows if isinstance(windows, dict) else {}
    parts = []
    for name in ("5h", "7d"):
        window = windows.get(name)
        utilization = window.get("utilization") if isinstance(window, dict) else None
        if not isinstance(utilization, (int, float)) or isinstance(utilization, bool) or window.get("expired"):
            parts.append(f"{name} {UNKNOWN_MARK}")
            continue
        text = f"{name} {round(utilization * 100)}%"
        reset = window.get("reset")
        if name == "5h" and isinstance(reset, (int, float)) and not isinstance(reset, bool):
            text += f" (resets {format_clock(reset)})"
        parts.append(text)
    return " \u00b7 ".join(parts)


def format_clock(epoch: float) -> str:
    """``14:05``: an epoch second as local wall-clock time (a window reset)."""
    return time.strftime("%H:%M", time.localtime(epoch))


def _routing_table(accounts: List[dict]) -> List[str]:
    """One line per account: quota windows, bound sessions, requests in flight, cache hit ratio
    and why it is disabled (when it is)."""
    rows = [("NAME", "QUOTA", "SESSIONS", "IN FLIGHT", "CACHE HITS")]
    notes = []
    for account in accounts:
        ratio = account.get("cacheHitRatio")
        rows.append((
            str(account.get("name") or account.get("key") or "?"),
            format_quota(account.get("quota")),
            _count(account.get("sessions")),
            _count(account.get("inFlight")),
            f"{ratio * 100:.0f}%" if isinstance(ratio, (int, float)) else "-",
        ))
        reason = account.get("disabledReason") or account.get("disabled_reason")
        notes.append(f"disabled: {_short(reason, 200)}" if reason else "")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row, note in zip(rows, [""] + notes):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [note]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _count(value) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "0"


def _first(document: dict, *keys):
    for key in keys:
        if key in document:
            return document[key]
    return None


def format_chain(chain) -> str:
    """``openai/gpt-4o -> google-ai/gemini-2.5-pro``, or ``none``."""
    if not chain:
        return "none"
    steps = []
    for step in chain:
        if isinstance(step, dict):
            steps.append(f"{step.get('provider', '?')}/{step.get('model', '?')}")
        else:
            steps.append(str(step))
    return " -> ".join(steps)


def format_duration(seconds) -> str:
    """``3d 04h 05m``, ``2h 03m 04s``, ``5m 06s``, ``7s``; ``unknown`` when not a number."""
    if not isinstance(seconds, (int, float)):
        return "unknown"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _account_table(accounts: List[dict], now: float) -> List[str]:
    header = ("NAME", "KIND", "STATE", "ATTEMPTS", "OK", "ERRORS", "429S", "BACKOFF", "COOLING", "LAST ERROR")
    rows = [header]
    for account in accounts:
        until = account.get("cooling_until")
        cooling = format_duration(until - now) if isinstance(until, (int, float)) and until > now else "-"
        rows.append((
            str(account.get("name") or account.get("key") or "?"),
            str(account.get("kind") or "-"),
            str(account.get("state") or "-"),
            str(account.get("attempts", 0)),
            str(account.get("successes", 0)),
            str(account.get("errors", 0)),
            str(account.get("rate_limits", 0)),
            str(account.get("backoff_level", 0)),
            cooling,
            _short(last_error_words(account.get("last_error")), 80),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


#: How the pool records a network failure (``network-error network: <what happened>``): the
#: prefix says nothing the words after it do not.
_NETWORK_PREFIX = "network-error network"


def last_error_words(text) -> str:
    """An account's last error as the table shows it: what happened, in words.

    ``network-error network: connection refused by 127.0.0.1:9`` reads ``connection refused by
    127.0.0.1:9``; an HTTP error (``429 rate-limited: ...``) is shown as recorded.
    """
    if not text:
        return ""
    text = str(text)
    if text == _NETWORK_PREFIX:
        return "network error"
    if text.startswith(_NETWORK_PREFIX + ": "):
        return text[len(_NETWORK_PREFIX) + 2:]
    return text


def _short(text, limit: int = 60) -> str:
    if not text:
        return "-"
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
