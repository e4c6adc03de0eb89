"""`clproxy proxy setup`: account check, OAuth login when there is none, service or foreground, Claude Code."""

import io
import os

import pytest

from clproxy.accounts.tokenstore import StoredCredential, TokenStore
from clproxy.cli import service, setup
from clproxy.integrations import claude_settings


class FakeManager:
    """A service manager that accepts everything (or fails one verb)."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        return (1, "Failed to connect to bus") if self.fail and self.fail in argv else (0, "")


@pytest.fixture
def environ(tmp_path):
    """An empty CLPROXY_HOME and a Claude settings file under tmp_path."""
    return {"HOME": str(tmp_path), "CLPROXY_HOME": str(tmp_path / ".clproxy"),
            "CLPROXY_CLAUDE_SETTINGS": str(tmp_path / "claude" / "settings.json")}


def run(environ, argv=(), **kwargs):
    out, err = io.StringIO(), io.StringIO()
    defaults = dict(login=lambda argv: pytest.fail("login was not expected"),
                    foreground=lambda port, host: pytest.fail("foreground was not expected"),
                    runner=FakeManager(), platform="linux", healthy=lambda url: True)
    defaults.update(kwargs)
    code = setup.main(list(argv), stdout=out, stderr=err, environ=environ, **defaults)
    return code, out.getvalue(), err.getvalue()


def test_no_account_runs_the_oauth_login_and_stops_if_it_fails(environ):
    """Without accounts the OAuth login runs; a failed login installs nothing."""
    logins = []

    def login(argv):
        logins.append(argv)
        return 1

    code, out, err = run(environ, login=login)
    assert logins == [["login", "anthropic", "--method", "oauth"]]
    assert code == 1 and "nothing was installed" in err
    assert not os.path.exists(service.unit_path(environ))


def test_token_store_account_skips_login(environ):
    """An account in tokens.json is found (no login), listed, and the service is installed."""
    store = TokenStore(environ["CLPROXY_HOME"])
    store.put(StoredCredential.new_api_key("work", "sk-ant-api03-test", 0.0))
    settings = environ["CLPROXY_CLAUDE_SETTINGS"]
    claude_settings.configure(settings, {"ANTHROPIC_BASE_URL": "http://127.0.0.1:55669"})
    manager = FakeManager()
    code, out, err = run(environ, runner=manager)
    assert code == 0, err
    assert "anthropic:work (token store)" in out
    assert ["systemctl", "--user", "restart", "clproxy.service"] in manager.calls
    assert "Claude Code now uses the proxy" in out and "Restart Claude Code" in out


def test_config_and_environment_accounts_are_found(environ, tmp_path):
    """Config accounts and ANTHROPIC_API_KEY (also from $CLPROXY_HOME/.env) count as accounts."""
    os.makedirs(environ["CLPROXY_HOME"])
    with open(os.path.join(environ["CLPROXY_HOME"], "proxy-config.yaml"), "w") as f:
        f.write("accounts:\n  anthropic:\n    - name: team\n      apiKey: ${TEAM_KEY}\n")
    with open(os.path.join(environ["CLPROXY_HOME"], ".env"), "w") as f:
        f.write("TEAM_KEY=sk-ant-api03-team\nANTHROPIC_API_KEY=sk-ant-api03-env\n")
    found = setup.find_accounts(environ)
    assert any(item.startswith("config:team") for item in found) and "env:ANTHROPIC_API_KEY" in found


def with_key_in_env_file(environ):
    """``environ`` whose $CLPROXY_HOME/.env holds ANTHROPIC_API_KEY (what the service reads)."""
    os.makedirs(environ["CLPROXY_HOME"], exist_ok=True)
    with open(os.path.join(environ["CLPROXY_HOME"], ".env"), "w") as f:
        f.write("ANTHROPIC_API_KEY=sk-ant-api03-x\n")
    return environ


def test_a_key_in_the_shell_alone_installs_no_service_that_would_not_see_it(environ):
    """ANTHROPIC_API_KEY set in the installing shell only: the service reads $CLPROXY_HOME/.env,
    not that shell, so it would start with no account. Setup says so and installs nothing;
    --no-service (the daemon in this shell) goes ahead."""
    manager = FakeManager()
    code, out, err = run(dict(environ, ANTHROPIC_API_KEY="sk-ant-api03-shell"), runner=manager)
    assert code == 1 and manager.calls == [] and not os.path.exists(service.unit_path(environ))
    assert "this shell only" in out and ".env" in err and "--method api-key" in err
    assert "sk-ant-api03-shell" not in out + err
    started = []
    code, _, _ = run(dict(environ, ANTHROPIC_API_KEY="sk-ant-api03-shell"), ["--no-service"],
                     foreground=lambda port, host: started.append(port) or 0)
    assert code == 0 and started == [55669]


def test_no_service_starts_in_the_foreground(environ):
    """--no-service hands over to the foreground daemon with the chosen port."""
    started = []
    code, out, err = run(dict(environ, ANTHROPIC_API_KEY="sk-ant-api03-x"), ["--no-service", "-p", "9000"],
                         foreground=lambda port, host: started.append((port, host)) or 0)
    assert code == 0 and started == [(9000, "127.0.0.1")]
    assert "foreground on http://127.0.0.1:9000" in out
    assert not os.path.exists(service.unit_path(environ))


def test_service_that_cannot_start_leaves_claude_code_alone(environ):
    """If the service manager is unreachable, setup says so, exits 1 and does not touch Claude Code."""
    code, out, err = run(with_key_in_env_file(environ), runner=FakeManager(fail="daemon-reload"))
    assert code == 1
    assert "systemctl --user is not available" in err and "--no-service" in err
    assert not os.path.exists(environ["CLPROXY_CLAUDE_SETTINGS"])


def test_service_that_does_not_answer(environ):
    """A service that never answers /health is reported with where to look, exit 1."""
    code, out, err = run(with_key_in_env_file(environ), healthy=lambda url: False)
    assert code == 1 and "did not answer http://127.0.0.1:55669/health" in err
    assert "journalctl --user -u clproxy" in err


def test_corrupt_token_store_is_one_line(environ):
    """An unreadable tokens.json stops setup with one line and no traceback."""
    os.makedirs(environ["CLPROXY_HOME"])
    with open(os.path.join(environ["CLPROXY_HOME"], "tokens.json"), "w") as f:
        f.write("{broken")
    code, out, err = run(environ)
    assert code == 1 and err.count("\n") == 1 and "tokens.json" in err and "Traceback" not in err


def test_a_foreground_instance_blocks_setup(environ, monkeypatch):
    """A proxy already running outside the service is named, and nothing is installed."""
    from clproxy.daemon import runstate
    os.makedirs(environ["CLPROXY_HOME"])
    runstate.write_state(runstate.state_path(environ),
                         {"pid": os.getpid(), "url": "http://127.0.0.1:1", "strategy": "fill-first"})
    monkeypatch.setattr(runstate, "health_ok", lambda url, timeout=2.0: True)
    code, out, err = run(with_key_in_env_file(environ))
    assert code == 1 and "already running" in err and not os.path.exists(service.unit_path(environ))


def test_settings_not_pointing_yet_is_reported(environ):
    """When the service answers but settings.json does not point at it, setup says what to do."""
    code, out, err = run(with_key_in_env_file(environ))
    assert code == 0 and "does not point at it yet" in out
    # setup itself sets only the status line; pointing Claude Code at the proxy is the daemon's job
    assert "env" not in claude_settings.read_settings(environ["CLPROXY_CLAUDE_SETTINGS"])


# --- Claude Code's statusLine ----------------------------------------------------------------------

THEIRS = {"type": "command", "command": "~/.claude/my-status.sh", "padding": 0}


def with_account(environ):
    return with_key_in_env_file(dict(environ))


def status_line(environ):
    return (claude_settings.read_settings(environ["CLPROXY_CLAUDE_SETTINGS"]) or {}).get("statusLine")


def write_settings(environ, document):
    claude_settings.write_settings(environ["CLPROXY_CLAUDE_SETTINGS"], document)


def uninstall(environ):
    out, err = io.StringIO(), io.StringIO()
    code = service.uninstall_main([], stdout=out, stderr=err, environ=environ, platform="linux",
                                  runner=FakeManager())
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_setup_installs_our_status_line_and_uninstall_removes_it(environ):
    """No statusLine of the user's: setup sets `clproxy statusline`, uninstall removes it (and the file
    it created), keeping every other setting."""
    env = with_account(environ)
    code, out, err = run(env)
    assert code == 0, err
    ours = status_line(env)
    assert claude_settings.is_our_status_line(ours) and ours["command"] == setup.status_line_command()
    assert "status line shows the account" in out
    assert "removed clproxy's statusLine" in uninstall(env)
    assert not os.path.exists(env["CLPROXY_CLAUDE_SETTINGS"])  # setup created it: nothing of the user's in it


def test_setup_keeps_the_users_own_status_line_unless_they_agree(environ):
    """A statusLine of the user's: kept when nobody is asked (one line says how to add ours) or they say
    no; replaced when they say yes, and uninstall puts theirs back with their other settings."""
    env = with_account(environ)
    write_settings(env, {"statusLine": THEIRS, "model": "opus"})
    code, out, err = run(env, ask=lambda question: None)
    assert code == 0, err
    assert status_line(env) == THEIRS
    kept = [line for line in out.splitlines() if "Kept your own statusLine" in line]
    assert len(kept) == 1 and "--statusline" in kept[0]
    questions = []
    code, out, err = run(env, ask=lambda question: questions.append(question) or False)
    assert status_line(env) == THEIRS and "my-status.sh" in questions[0]

    code, out, err = run(env, ask=lambda question: True)
    assert code == 0 and claude_settings.is_our_status_line(status_line(env))
    code, out, err = run(env, ask=lambda question: pytest.fail("ours is there: nothing to ask"))
    assert code == 0 and claude_settings.is_our_status_line(status_line(env))
    assert "restored your own statusLine" in uninstall(env)
    assert claude_settings.read_settings(env["CLPROXY_CLAUDE_SETTINGS"]) == {"statusLine": THEIRS, "model": "opus"}


def test_statusline_flag_replaces_and_no_statusline_leaves_it_alone(environ):
    """--statusline replaces the user's own without asking; --no-statusline touches nothing."""
    env = with_account(environ)
    write_settings(env, {"statusLine": THEIRS})
    code, out, err = run(env, ["--no-statusline"], ask=lambda question: pytest.fail("not asked"))
    assert code == 0 and status_line(env) == THEIRS
    code, out, err = run(env, ["--statusline"], ask=lambda question: pytest.fail("not asked"))
    assert code == 0 and claude_settings.is_our_status_line(status_line(env))
    uninstall(env)
    assert status_line(env) == THEIRS


def test_uninstall_leaves_a_status_line_changed_since(environ):
    """Someone changed statusLine after setup: uninstall leaves their value alone."""
    env = with_account(environ)
    write_settings(env, {"statusLine": THEIRS})
    run(env, ["--statusline"])
    newer = {"type": "command", "command": "starship statusline"}
    write_settings(env, {"statusLine": newer})
    uninstall(env)
    assert status_line(env) == newer


def test_no_service_setup_also_offers_the_status_line(environ):
    """`setup --no-service` sets the status line before running in the foreground; uninstall removes it
    even though no service was installed."""
    env = with_account(environ)
    code, out, err = run(env, ["--no-service"], foreground=lambda port, host: 0)
    assert code == 0 and claude_settings.is_our_status_line(status_line(env))
    assert "removed clproxy's statusLine" in uninstall(env)
    assert status_line(env) is None


def test_status_line_command_prefers_the_script_next_to_the_interpreter(tmp_path):
    """The clproxy script beside the interpreter is used by absolute path; else `clproxy` on the PATH."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    assert setup.status_line_command(str(python)) == "clproxy statusline"
    script = tmp_path / "bin" / "clproxy"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert setup.status_line_command(str(python)) == f"{script} statusline"
    assert claude_settings.is_our_status_line({"type": "command", "command": f"{script} statusline"})
    assert claude_settings.is_our_status_line({"type": "command", "command": "python3 -m clproxy statusline"})
    assert not claude_settings.is_our_status_line({"type": "command", "command": "statusline"})
    assert not claude_settings.is_our_status_line(THEIRS)
