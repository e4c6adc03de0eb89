"""``clproxy auth``: log in, import, list, refresh, enable, limit and remove the accounts in the token store.

Every failure is one line on stderr and a non-zero exit (1: it failed, 2: bad usage), never a
traceback; no token is ever printed (any that slipped into a message would be masked).
"""

import argparse
import getpass
import json
import os
import re
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO

import attr
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clproxy.accounts import oauth
from clproxy.accounts.model import API_KEY, OAUTH
from clproxy.accounts.refresh import RefreshFailed, TokenRefresher
from clproxy.accounts.tokenstore import (
    ENV_KEY, KEEP, QUOTAS_FILE_NAME, InvalidLabel, StoredCredential, TokenStore,
    TokenStoreCorrupt, TokenStoreError, UnknownAccount, default_home, key_for,
    read_claude_code_credentials, store_key, write_token_copy,
)

PROVIDERS = ("anthropic",)
METHODS = ("oauth", "api-key", "create-api-key")
DEFAULT_LABEL = "default"
IMPORT_LABEL = "claude-code"
#: seconds the one check of a new API key (GET /v1/models) may take
VERIFY_TIMEOUT = 10.0
ANTHROPIC_VERSION = "2023-06-01"

SUBSCRIPTION_NOTICE = (
    "Note: Anthropic permits Claude Pro/Max subscription credentials for use with Claude Code only. "
    "clproxy forwards Claude Code's requests as they are; it does not disguise other clients.")
SHARED_TOKEN_WARNING = (
    "warning: Claude Code and clproxy must not both keep refreshing this token. Refresh tokens are "
    "single-use: whichever refreshes second is logged out. Log Claude Code out of this account, or "
    "use `clproxy auth login anthropic --method oauth` for a session of clproxy's own.")

_TOKEN_PATTERN = re.compile(r"sk-ant-[a-z]+\d*-[A-Za-z0-9_\-]{6,}")


def _redact(text: str) -> str:
    """Mask anything shaped like an Anthropic token (a last line of defence; nothing should reach it)."""
    return _TOKEN_PATTERN.sub(lambda m: oauth.mask_token(m.group(0)), text)


class CommandError(Exception):
    """A failure to report as one line, with its exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _pattern(text: str) -> str:
    """``--exclude-model``: a non-empty fnmatch pattern."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the pattern must not be empty")
    return text.strip()


def _max_concurrent(text: str, allow_none: bool = False) -> Optional[int]:
    """``--max-concurrent``: a positive integer (``none`` too, for ``auth set``: no cap)."""
    if allow_none and text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        more = " or 'none'" if allow_none else ""
        raise argparse.ArgumentTypeError(f"must be a positive integer{more}, got {text[:20]!r}")
    return value


def _max_concurrent_or_none(text: str) -> Optional[int]:
    return _max_concurrent(text, allow_none=True)


class _UsageExit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        # argparse echoes argument values in its errors: those pass through _redact too.
        def _print_message(self, message: str, file: Any = None) -> None:
            if message:
                (stdout if file is sys.stdout else stderr).write(_redact(message))

        def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
            if message:
                stderr.write(_redact(message))
            raise _UsageExit(status)

        def error(self, message: str) -> None:  # type: ignore[override]
            stderr.write(self.format_usage())
            stderr.write(_redact(f"{self.prog}: error: {message}\n"))
            raise _UsageExit(2)

    common = Parser(add_help=False)
    common.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    common.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $CLPROXY_HOME/proxy-config.yaml)")

    parser = Parser(prog="clproxy auth", description="Manage the accounts clproxy pools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    login = sub.add_parser("login", parents=[common], help="log in and store an account")
    login.add_argument("provider", choices=PROVIDERS)
    login.add_argument("--method", "-m", choices=METHODS)
    login.add_argument("--add", action="store_true", help="add an account to the pool (with --label)")
    login.add_argument("--label", help="the account's label (default: 'default')")
    login.add_argument("--replace", action="store_true",
                       help="replace the account with this label if there is one")
    login.add_argument("--no-verify", action="store_true",
                       help="api-key: save the key without checking it (GET /v1/models)")
    login.add_argument("--non-interactive", action="store_true",
                       help="no prompts (api-key: read ANTHROPIC_API_KEY)")
    login.add_argument("--exclude-model", action="append", dest="exclude_models", type=_pattern,
                       metavar="PATTERN", help="never send this account requests for models matching "
                       "PATTERN (fnmatch, case-sensitive; repeatable)")
    login.add_argument("--max-concurrent", type=_max_concurrent, metavar="N",
                       help="at most N requests in flight at once on this account (default: no cap)")

    imp = sub.add_parser("import", parents=[common], help="import Claude Code's OAuth credentials")
    imp.add_argument("provider", choices=PROVIDERS)
    imp.add_argument("--from-claude-code", nargs="?", const="", metavar="PATH", required=True,
                     help="Claude Code's credentials file (default: ~/.claude/.credentials.json)")
    imp.add_argument("--label", default=IMPORT_LABEL, help=f"the account's label (default: {IMPORT_LABEL})")

    lst = sub.add_parser("list", parents=[common], help="list accounts, expiry and quota")
    lst.add_argument("--debug", action="store_true", help="also show sources and failure counts")

    status = sub.add_parser("status", parents=[common], help="summarize authentication per provider")
    status.add_argument("provider", nargs="?", choices=PROVIDERS)

    refresh = sub.add_parser("refresh", parents=[common], help="refresh OAuth tokens now")
    refresh.add_argument("provider", choices=PROVIDERS)
    refresh.add_argument("--label", help="only this account")

    cleanup = sub.add_parser("cleanup", parents=[common],
                             help="remove disabled and expired-unrefreshable accounts")
    cleanup.add_argument("--force", action="store_true", help="do not ask")

    enable = sub.add_parser("enable", parents=[common], help="re-enable a disabled account")
    enable.add_argument("label")

    limits = sub.add_parser("set", parents=[common],
                            help="change an account's excluded models and concurrency cap")
    limits.add_argument("label")
    limits.add_argument("--exclude-model", action="append", dest="exclude_models", type=_pattern,
                        metavar="PATTERN", help="the models this account is never sent (fnmatch; repeatable; "
                        "replaces the account's list)")
    limits.add_argument("--no-excluded-models", action="store_true", help="clear the account's list")
    limits.add_argument("--max-concurrent", type=_max_concurrent_or_none, default=KEEP, metavar="N|none",
                        help="at most N requests in flight at once; 'none' removes the cap")

    logout = sub.add_parser("logout", parents=[common], help="remove an account from this machine")
    logout.add_argument("label")
    return parser


@attr.s(auto_attribs=True)
class _Context:
    args: argparse.Namespace
    reactor: Any
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    environ: Mapping[str, str]
    now: Callable[[], float]
    http_client: Any = None

    @property
    def json(self) -> bool:
        return getattr(self.args, "format", "text") == "json"

    @property
    def home(self) -> str:
        return default_home(self.environ)

    def store(self) -> TokenStore:
        return TokenStore(self.home, now=self.now)

    def out(self, text: str = "") -> None:
        """A result line (text mode)."""
        self.stdout.write(_redact(text) + "\n")

    def info(self, text: str) -> None:
        """Guidance: stdout in text mode, stderr in JSON mode (stdout then holds only the JSON)."""
        (self.stderr if self.json else self.stdout).write(_redact(text) + "\n")

    def warn(self, text: str) -> None:
        self.stderr.write(_redact(text) + "\n")

    def emit(self, data: Any) -> None:
        self.stdout.write(_redact(json.dumps(data, indent=2, sort_keys=False)) + "\n")

    def prompt(self, text: str) -> str:
        (self.stderr if self.json else self.stdout).write(text)
        (self.stderr if self.json else self.stdout).flush()
        line = self.stdin.readline()
        if not line:
            raise CommandError("no input (standard input is closed)")
        return line.strip()

    def http(self) -> Any:
        if self.http_client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            self.http_client = HTTPClient(Agent(self.reactor, pool=pool))
        return self.http_client

    def _config(self) -> Any:
        """The configuration file's config, or ``None`` without a config module."""
        try:
            from clproxy import config as config_module
        except ModuleNotFoundError as e:
            if e.name != "clproxy.config":
                raise
            return None
        try:
            loaded = config_module.load_config(self.args.config, self.environ)
        except config_module.ConfigError as e:
            raise CommandError(f"configuration: {e}") from None
        return loaded.config

    def anthropic_settings(self) -> Any:
        """``providers.anthropic`` of the configuration file, or ``None`` without a config module."""
        config = self._config()
        return None if config is None else config.providers.anthropic

    def state_settings(self) -> Any:
        """``state`` of the configuration file (where the daemon shares its tokens), or ``None``."""
        config = self._config()
        return None if config is None else getattr(config, "state", None)

    def endpoints(self) -> oauth.OAuthEndpoints:
        settings = self.anthropic_settings()
        endpoints = oauth.OAuthEndpoints.from_config(settings) if settings is not None else \
            oauth.OAuthEndpoints()
        token_url = self.environ.get("CLPROXY_OAUTH_TOKEN_URL")
        authorize_url = self.environ.get("CLPROXY_OAUTH_AUTHORIZE_URL")
        if token_url:
            endpoints = attr.evolve(endpoints, token_url=token_url)
        if authorize_url:
            endpoints = attr.evolve(endpoints, authorize_url=authorize_url)
        return endpoints

    def create_api_key_url(self) -> str:
        override = self.environ.get("CLPROXY_CREATE_API_KEY_URL")
        if override:
            return override
        settings = self.anthropic_settings()
        base = getattr(settings, "base_url", None)
        if base:
            return base.rstrip("/") + "/api/oauth/claude_cli/create_api_key"
        return oauth.DEFAULT_CREATE_API_KEY_URL


# --- presentation helpers ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def _expiry_text(record: StoredCredential, now: float) -> str:
    if not record.is_oauth:
        return "never"
    if record.expires_at is None:
        return "unknown"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.expires_at))
    left = record.expires_at - now
    if left <= 0:
        return f"{stamp} (expired {_duration(left)} ago)"
    return f"{stamp} (in {_duration(left)})"


def _status_text(record: StoredCredential, now: float) -> str:
    if record.disabled:
        return f"disabled: {record.disabled_reason or 'no reason recorded'}"
    if record.is_expired(now):
        return "expired, refreshes on next use" if record.refresh_token else "expired, log in again"
    return "enabled"


def _usable(record: StoredCredential, now: float) -> bool:
    return not record.disabled and (not record.is_expired(now) or bool(record.refresh_token))


def _quotas(ctx: _Context) -> Dict[str, Any]:
    path = os.path.join(ctx.home, QUOTAS_FILE_NAME)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        ctx.warn(f"warning: ignoring unreadable quota file {path}")
        return {}
    return data if isinstance(data, dict) else {}


def _utilization(quota: Any, window: str) -> Optional[float]:
    entry = quota.get(window) if isinstance(quota, dict) else None
    value = entry.get("utilization") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _visible_records(ctx: _Context) -> List[StoredCredential]:
    """What discovery would give the pool (without config-file accounts), as store records."""
    store = ctx.store()
    records = list(store.load().values())
    if not records:
        legacy = store.legacy()
        if legacy is not None:
            records.append(legacy)
    if not records:
        key = ctx.environ.get("ANTHROPIC_API_KEY", "").strip()
        if key:
            records.append(StoredCredential(key=ENV_KEY, label="env", type=API_KEY, api_key=key,
                                            source="env"))
    return records


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _record_json(record: StoredCredential, now: float) -> Dict[str, Any]:
    return {
        "key": record.key, "label": record.label, "provider": record.provider, "type": record.type,
        "source": record.source, "email": record.email, "org_id": record.org_id,
        "org_name": record.org_name, "expires_at": record.expires_at if record.is_oauth else None,
        "expired": record.is_expired(now), "enabled": not record.disabled,
        "disabled_reason": record.disabled_reason, "refresh_failures": record.refresh_failures,
        "has_refresh_token": bool(record.refresh_token), "usable": _usable(record, now),
        "excluded_models": list(record.excluded_models), "max_concurrent": record.max_concurrent,
    }


def _limits_text(record: StoredCredential) -> str:
    """``max 2; excludes claude-opus-*`` for ``auth list``; ``-`` without limits."""
    parts = []
    if record.max_concurrent is not None:
        parts.append(f"max {record.max_concurrent}")
    if record.excluded_models:
        parts.append("excludes " + ",".join(record.excluded_models))
    return "; ".join(parts) or "-"


def _with_limits(record: StoredCredential, args: argparse.Namespace,
                 previous: Optional[StoredCredential]) -> StoredCredential:
    """``record`` with the limits given on the command line; those not given are kept from the
    account it replaces (a re-login does not forget them)."""
    excluded = getattr(args, "exclude_models", None)
    cap = getattr(args, "max_concurrent", None)
    return attr.evolve(
        record,
        excluded_models=tuple(excluded) if excluded else (previous.excluded_models if previous else ()),
        max_concurrent=cap if cap is not None else (previous.max_concurrent if previous else None))


# --- commands ---------------------------------------------------------------------------------------


def _login_label(args: argparse.Namespace) -> str:
    if args.add and not args.label:
        raise CommandError("--add needs --label NAME (the new account's label)", 2)
    return args.label or DEFAULT_LABEL


async def _oauth_tokens(ctx: _Context, notice: bool) -> oauth.TokenSet:
    if ctx.args.non_interactive:
        raise CommandError("OAuth login needs a browser and a pasted code; run it without "
                           "--non-interactive (or use --method api-key)", 2)
    endpoints = ctx.endpoints()
    pkce = oauth.new_pkce()
    state = oauth.new_state()
    if notice:
        ctx.info(SUBSCRIPTION_NOTICE)
    ctx.info("Open this URL in a browser and sign in:")
    ctx.info("")
    ctx.info(oauth.authorize_url(endpoints, pkce.challenge, state))
    ctx.info("")
    pasted = ctx.prompt("Paste the code shown after signing in (code#state): ")
    code = oauth.parse_pasted_code(pasted, state)
    return await oauth.exchange_code(ctx.http(), endpoints, code, pkce.verifier, state)


async def _check_api_key(ctx: _Context, api_key: str) -> Dict[str, Any]:
    """One cheap authenticated call (``GET /v1/models``) at the configured Anthropic base URL:
    ``{"result": "works"|"rejected"|"unreachable", "detail": ...}``. The key is sent, never shown."""
    settings = ctx.anthropic_settings()
    base = (getattr(settings, "base_url", None) or "https://api.anthropic.com").rstrip("/")
    try:
        response = await ctx.http().get(
            base + "/v1/models?limit=1", reactor=ctx.reactor, timeout=VERIFY_TIMEOUT,
            headers={"x-api-key": [api_key], "anthropic-version": [ANTHROPIC_VERSION]})
        await response.content()
    except Exception as e:  # refused, unresolvable, timed out: say which, not the traceback
        reason = "no answer within %gs" % VERIFY_TIMEOUT if type(e).__name__ == "CancelledError" else \
            _redact(" ".join(str(getattr(e, "reasons", None) or e).replace(api_key, "***").split())[:160]) \
            or type(e).__name__
        return {"result": "unreachable", "detail": f"could not reach {base}: {reason}"}
    if response.code in (401, 403):
        return {"result": "rejected", "detail": f"{base} rejected it ({response.code})"}
    if 200 <= response.code < 300:
        return {"result": "works", "detail": f"{base} accepted it (GET /v1/models {response.code})"}
    return {"result": "unreachable", "detail": f"{base} answered {response.code} to GET /v1/models"}


async def cmd_login(ctx: _Context) -> int:
    args = ctx.args
    label = _login_label(args)
    key = store_key(label)
    method = args.method
    if method is None:
        if args.non_interactive:
            method = "api-key"
        else:
            answer = ctx.prompt("Log in with [1] OAuth (Claude Pro/Max), [2] an API key, "
                                "[3] an API key created through OAuth? [1]: ")
            method = {"": "oauth", "1": "oauth", "oauth": "oauth", "2": "api-key", "api-key": "api-key",
                      "3": "create-api-key", "create-api-key": "create-api-key"}.get(answer.lower())
            if method is None:
                raise CommandError(f"unknown choice {answer[:20]!r}: answer 1, 2 or 3", 2)
    store = ctx.store()
    previous = store.get(key)  # also surfaces a corrupt store before any sign-in
    existed = previous is not None
    if existed and not args.replace:
        # before any sign-in or prompt: a login used to replace the account without a word
        raise CommandError(f"{key} already exists; to add another account use --add --label NAME, "
                           f"to replace {key} use --replace")
    now = ctx.now()
    check: Optional[Dict[str, Any]] = None
    if method == "oauth":
        tokens = await _oauth_tokens(ctx, notice=True)
        record = store.put(_with_limits(StoredCredential.new_oauth(label, tokens, now), args, previous))
    elif method == "create-api-key":
        tokens = await _oauth_tokens(ctx, notice=False)
        api_key = await oauth.create_api_key(ctx.http(), ctx.create_api_key_url(), tokens.access_token)
        record = store.put(_with_limits(StoredCredential.new_api_key(
            label, api_key, now, email=tokens.email, org_id=tokens.org_id, org_name=tokens.org_name),
            args, previous))
    else:
        if args.non_interactive:
            api_key = ctx.environ.get("ANTHROPIC_API_KEY", "").strip()
            if not api_key:
                raise CommandError("--non-interactive api-key login reads ANTHROPIC_API_KEY, which is not set", 2)
        elif ctx.stdin is sys.stdin and sys.stdin.isatty():
            api_key = getpass.getpass("Anthropic API key: ", stream=ctx.stderr).strip()
        else:
            api_key = ctx.prompt("Anthropic API key: ")
        if not api_key or any(c.isspace() for c in api_key) or not api_key.isprintable():
            raise CommandError("that does not look like an API key (empty or contains spaces)")
        if not args.no_verify:
            check = await _check_api_key(ctx, api_key)
            if check["result"] == "rejected":
                raise CommandError(f"API key not saved: {check['detail']}; check the key, or save it "
                                   f"anyway with --no-verify")
            if check["result"] == "unreachable":
                ctx.warn(f"warning: the API key was not checked ({check['detail']}); saved anyway")
            else:
                ctx.info(f"API key works: {check['detail']}")
        record = store.put(_with_limits(StoredCredential.new_api_key(label, api_key, now), args, previous))
    verb = "replaced" if existed else "added"
    if ctx.json:
        ctx.emit({"ok": True, "action": verb, "verified": check["result"] if check else None,
                  **_record_json(record, ctx.now())})
    else:
        who = f" as {record.email}" if record.email else ""
        ctx.out(f"Logged in{who}: {record.key} ({record.type}) {verb}; "
                f"expires {_expiry_text(record, ctx.now())}")
    return 0


async def cmd_import(ctx: _Context) -> int:
    args = ctx.args
    path = args.from_claude_code or os.path.join(
        ctx.environ.get("HOME") or os.path.expanduser("~"), ".claude", ".credentials.json")
    label = args.label
    key = store_key(label)
    imported = read_claude_code_credentials(path)
    store = ctx.store()
    previous = store.get(key)
    existed = previous is not None
    record = store.put(_with_limits(attr.evolve(imported, key=key, label=label, source="tokenstore"),
                                    args, previous))
    ctx.warn(SHARED_TOKEN_WARNING)
    if record.is_expired(ctx.now()) and not record.refresh_token:
        ctx.warn("warning: the imported token has expired and has no refresh token; log in instead")
    if ctx.json:
        ctx.emit({"ok": True, "action": "replaced" if existed else "added", "from": path,
                  **_record_json(record, ctx.now())})
    else:
        ctx.out(f"Imported Claude Code credentials from {path} as {record.key}; "
                f"expires {_expiry_text(record, ctx.now())}")
    return 0


async def cmd_list(ctx: _Context) -> int:
    now = ctx.now()
    records = _visible_records(ctx)
    quotas = _quotas(ctx)
    if ctx.json:
        items = []
        for record in records:
            item = _record_json(record, now)
            quota = quotas.get(record.key)
            item["quota"] = {"five_hour": _utilization(quota, "five_hour"),
                             "seven_day": _utilization(quota, "seven_day")}
            items.append(item)
        ctx.emit({"accounts": items})
        return 0
    if not records:
        ctx.out("No accounts. Run: clproxy auth login anthropic")
        return 0
    header = ["KEY", "TYPE", "EMAIL", "EXPIRES", "5H", "7D", "LIMITS", "STATUS"]
    if ctx.args.debug:
        header += ["SOURCE", "REFRESH TOKEN", "FAILURES"]
    rows = [header]
    for record in records:
        quota = quotas.get(record.key)
        row = [record.key, record.type, record.email or "-", _expiry_text(record, now),
               _percent(_utilization(quota, "five_hour")), _percent(_utilization(quota, "seven_day")),
               _limits_text(record), _status_text(record, now)]
        if ctx.args.debug:
            row += [record.source, "yes" if record.refresh_token else "no", str(record.refresh_failures)]
        rows.append(row)
    for line in _table(rows):
        ctx.out(line)
    return 0


async def cmd_status(ctx: _Context) -> int:
    now = ctx.now()
    records = _visible_records(ctx)
    usable = [r for r in records if _usable(r, now)]
    kinds = {kind: sum(1 for r in records if r.type == kind) for kind in (OAUTH, API_KEY)}
    if ctx.json:
        ctx.emit({"providers": {"anthropic": {
            "authenticated": bool(usable), "accounts": len(records), "usable": len(usable),
            "oauth": kinds[OAUTH], "api_key": kinds[API_KEY],
            "details": [_record_json(r, now) for r in records]}}})
    else:
        if not records:
            ctx.out("anthropic: not authenticated (run: clproxy auth login anthropic)")
        else:
            ctx.out(f"anthropic: {len(usable)} of {len(records)} accounts usable "
                    f"(oauth {kinds[OAUTH]}, api-key {kinds[API_KEY]})")
            rows = [[f"  {r.key}", r.type, _status_text(r, now), _expiry_text(r, now)] for r in records]
            for line in _table(rows):
                ctx.out(line)
    return 0 if usable else 1


async def _shared_tokens(ctx: _Context, store: TokenStore) -> Any:
    """The state store the daemon shares tokens in, connected, when ``state.backend`` is redis
    (else ``None``). A refresh must then take the instance-wide refresh lock, start from the live
    record there and publish the rotation: another instance would otherwise spend the refresh token
    this one just rotated, and disable the account. CommandError when Redis cannot be reached."""
    state = ctx.state_settings()
    if getattr(state, "backend", "memory") != "redis":
        return None
    from clproxy.state import connect_store
    try:
        return await connect_store(state, ctx.reactor, on_token_write=lambda key, data:
                                   write_token_copy(store, key, data))
    except Exception as e:  # RedisUnavailable or a bad URL: both name the URL without its password
        raise CommandError(f"not refreshed: the proxy shares its tokens in Redis (state.backend redis) "
                           f"and {e}; a refresh the other instances do not see would log them out: "
                           f"try again once Redis answers") from None


async def cmd_refresh(ctx: _Context) -> int:
    store = ctx.store()
    records = list(store.load().values())
    if not records:
        legacy = store.legacy()
        records = [legacy] if legacy is not None else []
    if ctx.args.label:
        key = key_for(ctx.args.label)
        chosen = [r for r in records if r.key == key]
        if not chosen:
            raise UnknownAccount(key)
        if not chosen[0].is_oauth:
            raise CommandError(f"{key} is an API-key account; only OAuth tokens are refreshed")
    else:
        chosen = [r for r in records if r.is_oauth]
    endpoints = ctx.endpoints()
    shared = await _shared_tokens(ctx, store) if chosen else None
    refresher = TokenRefresher(store, ctx.http, endpoints, ctx.reactor, shared=shared)
    results = []
    failed = False
    try:
        for record in chosen:
            if record.disabled and not ctx.args.label:
                results.append({"key": record.key, "ok": False, "skipped": True,
                                "error": f"disabled: {record.disabled_reason}"})
                continue
            try:
                account = await refresher.fresh(record.to_account(), force=True)
            except RefreshFailed as e:
                failed = True
                results.append({"key": record.key, "ok": False, "error": e.reason, "disabled": e.disabled})
                continue
            results.append({"key": record.key, "ok": True, "expires_at": account.expires_at})
    finally:
        unshared = shared.pending_count() if shared is not None else 0
        if shared is not None:
            await shared.close()
    if unshared:
        # Redis went away mid-refresh: the rotation is in this machine's file only, and this
        # process is about to exit, so nothing will write it to Redis for the other instances.
        failed = True
        ctx.warn(f"error: Redis stopped answering during the refresh: the new tokens are only in "
                 f"{store.path}; restart the proxy on this machine once Redis answers (it imports them), "
                 f"before another instance refreshes")
    if ctx.json:
        ctx.emit({"ok": not failed, "results": results})
    elif not results:
        ctx.out("No OAuth accounts to refresh.")
    else:
        for item in results:
            if item["ok"]:
                stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(item["expires_at"])) \
                    if item.get("expires_at") else "unknown"
                ctx.out(f"refreshed {item['key']}; expires {stamp}")
            elif item.get("skipped"):
                ctx.out(f"skipped {item['key']} ({item['error']}; `clproxy auth enable` re-enables it)")
            else:
                suffix = " (account disabled)" if item.get("disabled") else ""
                ctx.warn(f"error: refresh of {item['key']} failed: {item['error']}{suffix}")
    return 1 if failed else 0


def _cleanup_reason(record: StoredCredential, now: float) -> Optional[str]:
    if record.disabled:
        return f"disabled: {record.disabled_reason or 'no reason recorded'}"
    if record.is_expired(now) and not record.refresh_token:
        return "expired and cannot be refreshed"
    return None


async def cmd_cleanup(ctx: _Context) -> int:
    store = ctx.store()
    now = ctx.now()
    candidates = [(r, _cleanup_reason(r, now)) for r in store.load().values()]
    candidates = [(r, why) for r, why in candidates if why]
    if not candidates:
        if ctx.json:
            ctx.emit({"ok": True, "removed": []})
        else:
            ctx.out("Nothing to clean up.")
        return 0
    for record, why in candidates:
        ctx.info(f"  {record.key}: {why}")
    if not ctx.args.force:
        (ctx.stderr if ctx.json else ctx.stdout).write(
            f"Remove {len(candidates)} account(s)? [y/N] ")
        (ctx.stderr if ctx.json else ctx.stdout).flush()
        answer = ctx.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            if ctx.json:
                ctx.emit({"ok": True, "removed": [], "cancelled": True})
            else:
                ctx.out("Nothing removed.")
            return 0
    removed = []
    with store.locked() as tx:
        # Decide again under the lock: another process may have refreshed or re-enabled one meanwhile.
        for record, _ in candidates:
            current = tx.get(record.key)
            if current is not None and _cleanup_reason(current, ctx.now()):
                tx.remove(record.key)
                removed.append(record.key)
    if ctx.json:
        ctx.emit({"ok": True, "removed": removed})
    else:
        for key in removed:
            ctx.out(f"removed {key}")
    return 0


async def cmd_enable(ctx: _Context) -> int:
    key = key_for(ctx.args.label)
    record = ctx.store().enable(key)
    if ctx.json:
        ctx.emit({"ok": True, "action": "enabled", **_record_json(record, ctx.now())})
    else:
        ctx.out(f"enabled {record.key}")
    return 0


async def cmd_set(ctx: _Context) -> int:
    """``auth set LABEL``: change the excluded models and/or the concurrency cap of a stored account."""
    args = ctx.args
    if args.exclude_models and args.no_excluded_models:
        raise CommandError("give --exclude-model or --no-excluded-models, not both", 2)
    if not args.exclude_models and not args.no_excluded_models and args.max_concurrent is KEEP:
        raise CommandError("nothing to change: give --exclude-model PATTERN, --no-excluded-models or "
                           "--max-concurrent N|none", 2)
    key = key_for(args.label)
    excluded = () if args.no_excluded_models else (tuple(args.exclude_models) if args.exclude_models else None)
    try:
        record = ctx.store().set_limits(key, excluded_models=excluded, max_concurrent=args.max_concurrent)
    except UnknownAccount:
        raise CommandError(f"no account {key!r} in the token store (accounts of the config file take "
                           f"excludedModels and maxConcurrent in proxy-config.yaml)") from None
    if ctx.json:
        ctx.emit({"ok": True, "action": "updated", **_record_json(record, ctx.now())})
    else:
        ctx.out(f"{record.key}: {_limits_text(record) if _limits_text(record) != '-' else 'no limits'}")
    return 0


async def cmd_logout(ctx: _Context) -> int:
    key = key_for(ctx.args.label)
    record = ctx.store().remove(key)
    if ctx.json:
        ctx.emit({"ok": True, "action": "removed", "key": record.key})
    else:
        ctx.out(f"logged out {record.key} (its credentials were removed from this machine)")
    return 0


COMMANDS = {"login": cmd_login, "import": cmd_import, "list": cmd_list, "status": cmd_status,
            "refresh": cmd_refresh, "cleanup": cmd_cleanup, "enable": cmd_enable, "set": cmd_set,
            "logout": cmd_logout}


# --- entry points -------------------------------------------------------------------------------------


async def main_async(argv: Sequence[str], *, reactor: Any, stdin: TextIO = sys.stdin,
                     stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
                     environ: Mapping[str, str] = os.environ, http_client: Any = None,
                     now: Callable[[], float] = time.time) -> int:
    """``clproxy auth`` as a coroutine on a running (or about to run) reactor; returns the exit code."""
    try:
        args = _parser(stdout, stderr).parse_args(list(argv))
    except _UsageExit as e:
        return e.code
    ctx = _Context(args, reactor, stdin, stdout, stderr, environ, now, http_client)
    try:
        return await COMMANDS[args.command](ctx)
    except KeyboardInterrupt:
        ctx.warn("interrupted")
        return 130
    except CommandError as e:
        message, code = str(e), e.code
    except InvalidLabel as e:
        message, code = str(e), 2
    except (TokenStoreCorrupt, UnknownAccount, TokenStoreError, oauth.OAuthError, RefreshFailed) as e:
        message, code = str(e), 1
    except OSError as e:
        message, code = f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}", 1
    except Exception as e:  # never a traceback on the terminal
        message, code = f"unexpected error ({type(e).__name__}: {e})", 1
    if ctx.json:
        ctx.emit({"ok": False, "error": message})
    ctx.warn(f"error: {message}")
    return code


def main(argv: Sequence[str], *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         stderr: TextIO = sys.stderr, environ: Mapping[str, str] = os.environ) -> int:
    """``clproxy auth ...``: run one command, return its exit code.

    The command starts before the reactor does, so prompts read standard input while Ctrl-C still
    works; only commands that talk to a server then run the global reactor until they finish.
    """
    from twisted.internet import reactor

    try:
        d = Deferred.fromCoroutine(main_async(argv, reactor=reactor, stdin=stdin, stdout=stdout,
                                              stderr=stderr, environ=environ))
    except KeyboardInterrupt:
        stderr.write("interrupted\n")
        return 130
    outcome: List[Any] = []
    if not d.called:
        if reactor.running:
            stderr.write("error: clproxy auth cannot run inside a running reactor; use main_async\n")
            return 1

        def finished(result: Any) -> None:
            outcome.append(result)
            if reactor.running:
                from clproxy.daemon.runstate import stop_reactor
                stop_reactor(reactor)  # a Ctrl-C may already have stopped it

        d.addBoth(finished)
        reactor.run()
        if not outcome:
            stderr.write("interrupted\n")
            return 130
    else:
        d.addBoth(outcome.append)
    result = outcome[0]
    if isinstance(result, Failure):
        stderr.write(f"error: unexpected error ({result.type.__name__})\n")
        return 1
    return int(result)
