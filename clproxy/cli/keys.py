"""``clproxy keys``: create, list and revoke the client keys of team mode.

``create`` prints the new key once (it is stored only as a hash); ``list`` never prints a key. A
running daemon picks every change up within 2 seconds. Every failure is one line on stderr and a
non-zero exit (1: it failed, 2: bad usage), never a traceback; no key ever appears in an error.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO

from clproxy.team.keys import KeyRecord
from clproxy.team.keystore import KeyStore, KeyStoreError, default_home
from clproxy.cli.argparsing import UsageExit as _UsageExit, positive_number, writing_parser

#: Printed by ``keys create --allow-subscription``: the README's "Terms of use", for this key.
SUBSCRIPTION_TERMS = (
    "Terms: Anthropic permits subscription (Pro/Max) OAuth credentials for use with Claude Code only. "
    "This key may be served by the pool's subscription accounts: give it only to people using Claude "
    "Code. clproxy forwards requests as the client shaped them and never disguises another client as "
    "Claude Code; use API keys for any other client. You are responsible for using each account "
    "within its provider's terms.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text[:20]!r}")
    return value


#: an amount of money for a limit
_positive_usd = positive_number("US dollars")


def _pattern(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the pattern must not be empty")
    return text.strip()


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    Parser = writing_parser(stdout, stderr)

    common = Parser(add_help=False)
    common.add_argument("--format", choices=("text", "json"), default="text", help="output format")

    parser = Parser(prog="clproxy keys", description="Manage the client keys that may use this proxy "
                    "(team mode). With at least one key, every /v1/* request needs one.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    create = sub.add_parser("create", parents=[common], help="create a key and print it once")
    create.add_argument("name", help="the key's unique name (a person or a service)")
    create.add_argument("--models", nargs="+", action="extend", type=_pattern, default=[],
                        metavar="PATTERN", help="models the key may use (fnmatch patterns; default: any)")
    create.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute (sliding 60 s)")
    create.add_argument("--tokens-per-day", type=_positive_int, metavar="N",
                        help="input + output tokens per UTC day")
    create.add_argument("--usd-per-day", type=_positive_usd, metavar="X", help="US dollars per UTC day")
    create.add_argument("--usd-per-month", type=_positive_usd, metavar="X",
                        help="US dollars per UTC calendar month")
    create.add_argument("--allow-subscription", action="store_true",
                        help="may be served by subscription (Pro/Max OAuth) accounts: Claude Code only")
    create.add_argument("--admin", action="store_true", help="may read /status, /metrics and /dashboard")

    sub.add_parser("list", parents=[common], help="list the keys (never the keys themselves)")

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key (a running proxy refuses "
                            "it within 2 seconds)")
    revoke.add_argument("name")
    return parser


def _stamp(when: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when)) if when else "never"


def _limit(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _listing(record: KeyRecord) -> Dict[str, Any]:
    item: Dict[str, Any] = {"name": record.name, "prefix": "clp_" + record.prefix}
    item.update(record.limits())
    item.update({"created_at": record.created_at, "last_used_at": record.last_used_at})
    return item


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def claude_code_left_without_key(home: str) -> Optional[str]:
    """The path of Claude Code's settings when the proxy running from ``home`` pointed them at
    itself and they give Claude Code no client key (what the first key makes a 401 on every
    request), else None."""
    from clproxy.daemon import runstate
    from clproxy.integrations import claude_settings
    try:
        state = runstate.read_state(os.path.join(home, runstate.STATE_FILE_NAME)) or {}
    except runstate.StateError:
        return None
    record = state.get("claudeSettings")
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    if not (record.get("set") or {}).get("ANTHROPIC_BASE_URL"):
        return None
    if claude_settings.holds_client_key(record["path"]):
        return None
    return record["path"]


def _create(args: argparse.Namespace, store: KeyStore, out: TextIO, err: TextIO) -> int:
    first = not store.records()
    key, record = store.create(args.name, models=args.models, rpm=args.rpm,
                               tokens_per_day=args.tokens_per_day, usd_per_day=args.usd_per_day,
                               usd_per_month=args.usd_per_month,
                               allow_subscription=args.allow_subscription, admin=args.admin)
    stranded = claude_code_left_without_key(store.home) if first else None
    if stranded:
        # the proxy now answers only requests with a key: the Claude Code it pointed at itself
        # sends none (stderr: stdout stays the key alone for scripts)
        err.write(f"note: the running proxy pointed Claude Code at itself ({stranded}) without a client "
                  f"key; from now on Claude Code gets 401 until it sends one. Give it a key "
                  f"(env.ANTHROPIC_AUTH_TOKEN in that file, or its environment), or restart the proxy: "
                  f"with client keys it leaves Claude Code's settings alone.\n")
    if args.format == "json":
        out.write(json.dumps({"name": record.name, "key": key, **record.limits()}, indent=2) + "\n")
        if record.allow_subscription:
            err.write(SUBSCRIPTION_TERMS + "\n")
        return 0
    out.write(f"created client key {record.name!r}:\n\n  {key}\n\n"
              f"It is shown only this once (clproxy keeps a hash): store it now. Clients send it as "
              f"x-api-key or Authorization: Bearer (Claude Code: ANTHROPIC_API_KEY or "
              f"ANTHROPIC_AUTH_TOKEN).\n")
    if record.allow_subscription:
        out.write("\n" + SUBSCRIPTION_TERMS + "\n")
    return 0


def _list(args: argparse.Namespace, store: KeyStore, out: TextIO, err: TextIO) -> int:
    records = store.records()
    if args.format == "json":
        out.write(json.dumps({"keys": [_listing(r) for r in records]}, indent=2) + "\n")
        return 0
    if not records:
        out.write("No client keys: the proxy accepts every request on loopback. "
                  "Run: clproxy keys create NAME\n")
        return 0
    rows = [["NAME", "PREFIX", "MODELS", "RPM", "TOKENS/DAY", "USD/DAY", "USD/MONTH", "SUBSCRIPTION",
             "ADMIN", "CREATED", "LAST USED"]]
    for r in records:
        rows.append([r.name, "clp_" + r.prefix, ",".join(r.models) or "*", _limit(r.rpm),
                     _limit(r.tokens_per_day), _limit(r.usd_per_day), _limit(r.usd_per_month),
                     "yes" if r.allow_subscription else "no", "yes" if r.admin else "no",
                     _stamp(r.created_at), _stamp(r.last_used_at)])
    for line in _table(rows):
        out.write(line + "\n")
    return 0


def _revoke(args: argparse.Namespace, store: KeyStore, out: TextIO, err: TextIO) -> int:
    record = store.revoke(args.name)
    if args.format == "json":
        out.write(json.dumps({"ok": True, "revoked": record.name}, indent=2) + "\n")
    else:
        out.write(f"revoked client key {record.name!r} (a running proxy refuses it within 2 seconds)\n")
    return 0


COMMANDS = {"create": _create, "list": _list, "revoke": _revoke}


def main(argv: Sequence[str], *, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
         environ: Mapping[str, str] = os.environ) -> int:
    """``clproxy keys ...``: run one command against ``$CLPROXY_HOME/keys.json``; the exit code.
    ``stdout``/``stderr`` default to the streams of the moment (not of import time)."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        args = _parser(stdout, stderr).parse_args(list(argv))
    except _UsageExit as e:
        return e.code
    store = KeyStore(default_home(environ))
    try:
        return COMMANDS[args.command](args, store, stdout, stderr)
    except KeyboardInterrupt:
        stderr.write("interrupted\n")
        return 130
    except KeyStoreError as e:
        message, code = str(e), (2 if isinstance(e, ValueError) else 1)
    except OSError as e:
        message, code = f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}", 1
    except Exception as e:  # never a traceback on the terminal (and no value: it could be a key)
        message, code = f"unexpected error ({type(e).__name__})", 1
    if args.format == "json":
        stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
    stderr.write(f"error: {message}\n")
    return code
