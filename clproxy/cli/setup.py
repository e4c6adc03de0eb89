"""``clproxy proxy setup``: one-command onboarding.

Find an account (or run the OAuth login), install the per-user service (or, with ``--no-service``,
start in the foreground), then check that the proxy answers and Claude Code points at it. Claude
Code's ``statusLine`` is set to ``clproxy statusline`` unless the user has one of their own (then only
when they agree: asked on a terminal, or ``--statusline``); ``--no-statusline`` leaves it alone.
"""

import argparse
import os
import shlex
import sys
import time
from typing import Callable, List, Mapping, Optional, Sequence, TextIO

from clproxy import config as configuration
from clproxy.daemon import runstate
from clproxy.cli import service
from clproxy.integrations import claude_settings

HEALTH_WAIT = 15.0
LOGIN_ARGV = ["login", "anthropic", "--method", "oauth"]


class SetupError(Exception):
    """Setup cannot go on; one line for the user."""


#: how :func:`find_accounts` names an ANTHROPIC_API_KEY set in the installing shell alone: a
#: service does not inherit that shell's environment (it reads ``$CLPROXY_HOME/.env``)
SHELL_KEY = "env:ANTHROPIC_API_KEY (this shell only)"


def find_accounts(environ: Mapping[str, str] = os.environ) -> List[str]:
    """Where the proxy would find Anthropic accounts: token store, config file, ANTHROPIC_API_KEY
    (in ``$CLPROXY_HOME/.env``, or :data:`SHELL_KEY` when only in ``environ``)."""
    found: List[str] = []
    home = configuration.clproxy_home(environ)
    try:
        from clproxy.accounts.tokenstore import TokenStore, TokenStoreError
    except ImportError:  # pragma: no cover - the token store ships with clproxy
        TokenStore = None
    if TokenStore is not None:
        store = TokenStore(home)
        try:
            records = list(store.load().values())
            legacy = store.legacy()
        except TokenStoreError as e:
            raise SetupError(str(e)) from None
        found += [f"{record.key} (token store)" for record in records if not record.disabled]
        if legacy is not None:
            found.append("legacy:anthropic (anthropic-credentials.json)")
    env = dict(environ)
    from_file: Mapping[str, str] = {}
    env_file = service.env_file_path(environ)
    if os.path.exists(env_file):
        try:
            from_file = configuration.load_env_file(env_file)
        except configuration.ConfigError as e:
            raise SetupError(f"{env_file}: {e}") from None
        env = dict(from_file, **environ)
    try:
        loaded = configuration.load_config(None, env)
    except configuration.ConfigError as e:
        raise SetupError(f"invalid configuration: {e}") from None
    found += [f"config:{a.name} ({loaded.source})" for a in loaded.config.accounts if a.enabled]
    if (from_file.get("ANTHROPIC_API_KEY") or "").strip():
        found.append("env:ANTHROPIC_API_KEY")
    elif env.get("ANTHROPIC_API_KEY", "").strip():
        found.append(SHELL_KEY)
    return found


def default_login(argv: Sequence[str]) -> int:
    """``clproxy auth login anthropic --method oauth`` in this process."""
    from clproxy.cli import auth
    return auth.main(list(argv))


def exec_foreground(port: int, host: str) -> int:
    """Become ``clproxy proxy start`` (a fresh process: the login may already have run the reactor)."""
    argv = [sys.executable, "-m", "clproxy", "proxy", "start", "--port", str(port), "--host", host]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 1  # pragma: no cover - execv does not return


def wait_healthy(url: str, timeout: float = HEALTH_WAIT, sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> bool:
    """Poll ``url``/health until it answers or ``timeout`` seconds pass."""
    deadline = monotonic() + timeout
    while True:
        if runstate.health_ok(url, timeout=1.0):
            return True
        if monotonic() >= deadline:
            return False
        sleep(0.25)


def status_line_command(python: Optional[str] = None) -> str:
    """The shell line for ``statusLine``: the ``clproxy`` script next to this interpreter (so it
    works outside the venv), else ``clproxy`` on the PATH."""
    script = os.path.join(os.path.dirname(os.path.abspath(python or sys.executable)), "clproxy")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return f"{shlex.quote(script)} statusline"
    return "clproxy statusline"


def ask_on_terminal(question: str) -> Optional[bool]:
    """Ask a yes/no ``question`` when stdin is a terminal; None when there is nobody to ask."""
    try:
        if not sys.stdin.isatty():
            return None
        answer = input(question + " [y/N] ")
    except (EOFError, OSError, ValueError):
        return None
    return answer.strip().lower() in ("y", "yes")


def offer_status_line(settings: Optional[str], choice: Optional[bool], environ: Mapping[str, str],
                      stdout: TextIO, stderr: TextIO, ask: Callable[[str], Optional[bool]],
                      command: Optional[str] = None) -> None:
    """Set Claude Code's ``statusLine`` to ``clproxy statusline``. ``choice``: True (``--statusline``:
    replace the user's own too), False (``--no-statusline``: touch nothing), None (keep the user's
    own unless ``ask`` gets a yes). Records what it replaced for ``clproxy proxy uninstall``."""
    if not settings or choice is False:
        return
    command = command or status_line_command()
    try:
        earlier = service.read_status_line_record(environ)
        record = claude_settings.configure_status_line(settings, command, replace=bool(choice), earlier=earlier)
        if record is None:
            current = (claude_settings.read_settings(settings) or {}).get("statusLine")
            shown = current.get("command") if isinstance(current, dict) else None
            if ask(f"Claude Code already has a statusLine ({shown or 'yours'}). Replace it with clproxy's "
                   f"(the account serving each session; uninstall puts yours back)?"):
                record = claude_settings.configure_status_line(settings, command, replace=True, earlier=earlier)
        if record is None:
            stdout.write(f"Kept your own statusLine in {settings}; to show clproxy's instead, run "
                         f"`clproxy proxy setup --statusline` or set its command to `{command}`.\n")
            return
        service.write_status_line_record(record, environ)
    except claude_settings.SettingsError as e:
        stderr.write(f"warning: {e}; Claude Code's statusLine was not set\n")
        return
    except OSError as e:
        stderr.write(f"warning: cannot record Claude Code's statusLine change: {e.strerror or e}\n")
        return
    stdout.write(f"Claude Code's status line shows the account serving each session ({settings}: "
                 f"statusLine runs `{command}`).\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clproxy proxy setup",
        description="Log in if no account exists, install the proxy as a service and point Claude Code at it.")
    parser.add_argument("--no-service", action="store_true",
                        help="start in the foreground instead of installing a service")
    parser.add_argument("-p", "--port", type=service._port, default=service.DEFAULT_PORT,
                        help="port (default 55669)")
    parser.add_argument("-H", "--host", default=service.DEFAULT_HOST, help="interface (default 127.0.0.1)")
    line = parser.add_mutually_exclusive_group()
    line.add_argument("--statusline", dest="statusline", action="store_const", const=True, default=None,
                      help="set Claude Code's statusLine to `clproxy statusline` even if you have your own "
                           "(uninstall puts yours back); default: only when you have none, or you agree")
    line.add_argument("--no-statusline", dest="statusline", action="store_const", const=False,
                      help="leave Claude Code's statusLine alone")
    return parser


def main(argv: Sequence[str], *, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr,
         environ: Mapping[str, str] = os.environ, login: Callable[[Sequence[str]], int] = default_login,
         foreground: Callable[[int, str], int] = exec_foreground,
         runner: service.Runner = service.run_command, platform: str = sys.platform,
         healthy: Callable[[str], bool] = wait_healthy,
         ask: Callable[[str], Optional[bool]] = ask_on_terminal) -> int:
    """``clproxy proxy setup [--no-service] [-p PORT] [-H HOST] [--statusline | --no-statusline]``."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    try:
        accounts = find_accounts(environ)
    except SetupError as e:
        stderr.write(f"clproxy proxy setup: {e}\n")
        return 1
    if accounts:
        stdout.write(f"accounts: {', '.join(accounts)}\n")
    else:
        stdout.write("No Anthropic account yet: starting the OAuth login "
                     "(clproxy auth login anthropic --method oauth)\n")
        stdout.flush()
        code = login(LOGIN_ARGV)
        if code != 0:
            stderr.write("clproxy proxy setup: login did not complete; nothing was installed\n")
            return code
    if accounts and set(accounts) == {SHELL_KEY} and not args.no_service:
        stderr.write(f"clproxy proxy setup: the only account found is ANTHROPIC_API_KEY in this shell, "
                     f"which the service will not see (it reads {service.env_file_path(environ)}): add "
                     f"the line ANTHROPIC_API_KEY=... to that file, or store the key with `clproxy auth "
                     f"login anthropic --method api-key`, then run setup again (or use --no-service, "
                     f"which runs in this shell); nothing was installed\n")
        return 1
    url = runstate.base_url(args.host, args.port)
    status, state = runstate.inspect(runstate.state_path(environ))
    if status == "running" and not service.installed(environ):
        stderr.write(f"clproxy proxy setup: {runstate.describe_running(state, runstate.state_path(environ))}\n")
        return 1
    settings = claude_settings.default_settings_path(environ)
    if args.no_service:
        offer_status_line(settings, args.statusline, environ, stdout, stderr, ask)
        stdout.write(f"Starting the proxy in the foreground on {url} (Ctrl-C stops it). Claude Code "
                     f"points at it while it runs; restart Claude Code to pick that up.\n")
        return foreground(args.port, args.host)
    try:
        outcome = service.install(args.port, args.host, environ=environ, platform=platform, runner=runner)
    except service.ServiceError as e:
        stderr.write(f"clproxy proxy setup: {e}\n")
        return 1
    except OSError as e:
        stderr.write(f"clproxy proxy setup: cannot write {e.filename or 'a file'}: {e.strerror or e}\n")
        return 1
    for path in outcome.files:
        stdout.write(f"wrote {path}\n")
    if not outcome.active:
        for note in outcome.notes:
            stderr.write(f"warning: {note}\n")
        stderr.write("clproxy proxy setup: the service is not running, so Claude Code was not pointed at "
                     "it; use `clproxy proxy setup --no-service` to run in the foreground instead\n")
        return 1
    if not healthy(url):
        stderr.write(f"clproxy proxy setup: the service did not answer {url}/health within "
                     f"{HEALTH_WAIT:g}s; see its log ({_log_hint(outcome.kind)})\n")
        return 1
    offer_status_line(settings, args.statusline, environ, stdout, stderr, ask)
    if settings and claude_settings.pointing_at(settings, url):
        stdout.write(f"Claude Code now uses the proxy ({settings}: env.ANTHROPIC_BASE_URL={url}). "
                     f"Restart Claude Code to pick it up.\n")
    elif settings:
        stdout.write(f"The proxy runs on {url}, but {settings} does not point at it yet; see its log "
                     f"({_log_hint(outcome.kind)}) or set env.ANTHROPIC_BASE_URL={url} yourself.\n")
    for note in outcome.notes:
        stdout.write(note + "\n")
    return 0


def _log_hint(kind: str) -> str:
    return ("journalctl --user -u clproxy" if kind == "systemd" else "$CLPROXY_HOME/logs/proxy.log")

