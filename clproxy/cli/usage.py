"""``clproxy usage``: who spent what, in tokens and dollars, from the usage ledger.

Reads ``$CLPROXY_HOME/usage.sqlite3`` directly (the daemon need not run; while it runs, WAL lets
both read and write). ``--format json`` prints exactly ``{"rows": [{BY_FIELD, "requests",
"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
"cost_usd"}]}``; otherwise a table. Never a traceback: a bad flag or an unreadable database is one
line on stderr and a non-zero exit.
"""

import argparse
import json
import os
import sqlite3
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, TextIO

from clproxy.config import clproxy_home
from clproxy.team.usage import DIMENSIONS, SUM_FIELDS, connect, ledger_path, parse_since, query_summary
from clproxy.cli.argparsing import UsageExit as _UsageExit, writing_parser

DEFAULT_BY = "key"


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    Parser = writing_parser(stdout, stderr)

    parser = Parser(prog="clproxy usage",
                    description="Requests, tokens (prompt cache included) and cost in USD, summed by client "
                                "key, account, model or UTC day, from $CLPROXY_HOME/usage.sqlite3.")
    parser.add_argument("--by", choices=tuple(DIMENSIONS), default=DEFAULT_BY,
                        help=f"what to sum by (default {DEFAULT_BY})")
    parser.add_argument("--since", help="YYYY-MM-DD (from that day's midnight UTC) or Nd (the last N days); "
                                        "default: everything kept")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    return parser


def main(argv: List[str], *, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
         environ: Mapping[str, str] = os.environ, now: Callable[[], float] = time.time) -> int:
    """``clproxy usage [--by key|account|model|day] [--since YYYY-MM-DD|Nd] [--format json]``."""
    # sys.stdout looked up per call, not bound at import (redirected streams, captured tests)
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        args = _parser(stdout, stderr).parse_args(list(argv))
    except _UsageExit as e:
        return e.code
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, now())
        except ValueError as e:
            stderr.write(f"clproxy usage: {e}\n")
            return 2
    path = ledger_path(clproxy_home(environ))
    try:
        rows = summary(path, args.by, since)
    except (sqlite3.Error, OSError) as e:
        stderr.write(f"clproxy usage: cannot read {path}: {type(e).__name__}: {' '.join(str(e).split())}\n")
        return 1
    if args.format == "json":
        stdout.write(json.dumps({"rows": rows}, indent=2) + "\n")
        return 0
    if not rows:
        stdout.write("no usage recorded{} ({})\n".format("" if since is None else " in that period", path))
        return 0
    stdout.write(table(rows, DIMENSIONS[args.by][0]))
    return 0


def summary(path: str, by: str, since: Optional[float]) -> List[Dict[str, Any]]:
    """The summary rows of the ledger at ``path``; none when no ledger exists yet (never creates one)."""
    try:
        connection = connect(path, create=False)
    except FileNotFoundError:
        return []
    try:
        return query_summary(connection, by, since)
    finally:
        connection.close()


_HEADERS = {"requests": "REQUESTS", "input_tokens": "INPUT", "output_tokens": "OUTPUT",
            "cache_creation_input_tokens": "CACHE WRITE", "cache_read_input_tokens": "CACHE READ",
            "cost_usd": "COST USD"}


def table(rows: List[Dict[str, Any]], field: str) -> str:
    """The rows as an aligned text table, with a total line."""
    def cost(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    totals: Dict[str, Any] = {name: sum(row[name] for row in rows) for name in SUM_FIELDS if name != "cost_usd"}
    costs = [row["cost_usd"] for row in rows if row["cost_usd"] is not None]
    totals["cost_usd"] = sum(costs) if costs else None
    lines = [[field.upper()] + [_HEADERS[name] for name in SUM_FIELDS]]
    for row in rows + [dict(totals, **{field: "TOTAL"})]:
        label = row[field]
        lines.append(["(none)" if label is None else str(label)]
                     + [str(row[name]) for name in SUM_FIELDS if name != "cost_usd"] + [cost(row["cost_usd"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"
