"""``clproxy keys create|list|revoke``: output shapes, the key shown once, one-line errors."""

import io
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import defer

from clproxy.cli import keys as keys_cli
from clproxy.cli.main import main as clproxy_main
from clproxy.team.keys import KeyRing, hash_key
from clproxy.team.keystore import KeyStore
from conftest import accounts_config
from helpers import post, request_body

LIMIT_FIELDS = ["models", "rpm", "tokens_per_day", "usd_per_day", "usd_per_month",
                "allow_subscription", "admin"]


def run(home, *argv):
    """``clproxy keys ARGV`` through main(): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = keys_cli.main(list(argv), stdout=out, stderr=err, environ={"CLPROXY_HOME": str(home)})
    return code, out.getvalue(), err.getvalue()


def all_bytes(home):
    """The bytes of every file under ``home``."""
    for root, _, names in os.walk(home):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                yield f.read()


def test_create_json_shape_and_key_works(tmp_path):
    """create --format json prints {name, key, ...limits} exactly; the key verifies; file is 0600."""
    code, out, err = run(tmp_path, "create", "alice", "--models", "claude-sonnet-*", "claude-haiku-*",
                         "--rpm", "30", "--tokens-per-day", "100000", "--usd-per-day", "5",
                         "--usd-per-month", "50.5", "--admin", "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert list(data) == ["name", "key"] + LIMIT_FIELDS
    assert data["name"] == "alice" and data["key"].startswith("clp_") and len(data["key"]) == 47
    assert data["models"] == ["claude-sonnet-*", "claude-haiku-*"]
    assert (data["rpm"], data["tokens_per_day"], data["usd_per_day"], data["usd_per_month"]) == \
        (30, 100000, 5.0, 50.5)
    assert data["admin"] is True and data["allow_subscription"] is False
    store = KeyStore(str(tmp_path))
    assert KeyRing(store.records()).verify(data["key"]).name == "alice"
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    for blob in all_bytes(tmp_path):
        assert data["key"].encode() not in blob
    assert any(hash_key(data["key"]).encode() in blob for blob in all_bytes(tmp_path))


def test_create_defaults(tmp_path):
    """Without limits every limit is null, models empty, flags false."""
    data = json.loads(run(tmp_path, "create", "bob", "--format", "json")[1])
    assert {k: data[k] for k in LIMIT_FIELDS} == {
        "models": [], "rpm": None, "tokens_per_day": None, "usd_per_day": None, "usd_per_month": None,
        "allow_subscription": False, "admin": False}


def test_create_text_prints_key_once(tmp_path):
    """Text output shows the key and says it is shown once; list never shows it again."""
    code, out, _ = run(tmp_path, "create", "alice")
    key = [w for w in out.split() if w.startswith("clp_")][0]
    assert code == 0 and "only this once" in out
    for argv in (("list",), ("list", "--format", "json")):
        listing = run(tmp_path, *argv)[1]
        assert key not in listing and key[4:] not in listing and key[:12] in listing


def test_allow_subscription_prints_the_terms(tmp_path):
    """--allow-subscription prints Anthropic's terms for subscription credentials (stderr in json)."""
    code, out, _ = run(tmp_path, "create", "cc", "--allow-subscription")
    assert code == 0 and "Claude Code only" in out
    code, out, err = run(tmp_path, "create", "cc2", "--allow-subscription", "--format", "json")
    assert json.loads(out)["allow_subscription"] is True and "Claude Code only" in err
    assert "Claude Code only" not in run(tmp_path, "create", "plain")[1]


def test_list_json_shape(tmp_path):
    """list --format json: {"keys": [{name, prefix, ...limits, created_at, last_used_at}]}."""
    key = json.loads(run(tmp_path, "create", "alice", "--rpm", "3", "--format", "json")[1])["key"]
    code, out, _ = run(tmp_path, "list", "--format", "json")
    items = json.loads(out)["keys"]
    assert code == 0 and len(items) == 1
    item = items[0]
    assert list(item) == ["name", "prefix"] + LIMIT_FIELDS + ["created_at", "last_used_at"]
    assert item["prefix"] == key[:12] and item["rpm"] == 3 and item["last_used_at"] is None
    assert isinstance(item["created_at"], float)
    assert run(tmp_path, "list")[1].splitlines()[0].split()[:2] == ["NAME", "PREFIX"]


def test_list_empty(tmp_path):
    """No keys: an empty list, and a hint in text."""
    assert json.loads(run(tmp_path, "list", "--format", "json")[1]) == {"keys": []}
    assert "clproxy keys create" in run(tmp_path, "list")[1]


def test_revoke(tmp_path):
    """revoke removes the key by name; an unknown name fails in one line with exit 1."""
    key = json.loads(run(tmp_path, "create", "alice", "--format", "json")[1])["key"]
    code, out, _ = run(tmp_path, "revoke", "alice")
    assert code == 0 and "revoked" in out
    assert KeyRing(KeyStore(str(tmp_path)).records()).verify(key) is None
    code, out, err = run(tmp_path, "revoke", "alice")
    assert (code, out) == (1, "") and err == "error: no client key named 'alice'\n"


@pytest.mark.parametrize("argv,code", [
    (("create", "alice"), 1),
    (("create", "bad name"), 2),
    (("create", "x", "--rpm", "0"), 2),
    (("create", "x", "--rpm", "abc"), 2),
    (("create", "x", "--usd-per-day", "-1"), 2),
    (("create", "x", "--usd-per-month", "nan"), 2),
    (("create", "x", "--models", " "), 2),
    (("frobnicate",), 2),
    ((), 2),
])
def test_errors_are_one_line(tmp_path, argv, code):
    """Bad usage exits 2, a failure 1; the error is one line (after argparse's usage line)."""
    run(tmp_path, "create", "alice")
    got, _, err = run(tmp_path, *argv)
    assert got == code
    assert err.strip() and len([line for line in err.splitlines() if "error" in line]) == 1
    assert "Traceback" not in err


def test_duplicate_name_json_error(tmp_path):
    """In json mode a failure is also {"ok": false, "error": ...} on stdout."""
    run(tmp_path, "create", "alice")
    code, out, err = run(tmp_path, "create", "alice", "--format", "json")
    assert code == 1 and json.loads(out)["ok"] is False and "exists already" in err


def test_corrupt_file_one_line(tmp_path):
    """An unreadable keys.json: exit 1, one line, the file untouched."""
    (tmp_path / "keys.json").write_text("{oops")
    code, _, err = run(tmp_path, "list")
    assert code == 1 and err.count("\n") == 1 and "unreadable" in err
    assert (tmp_path / "keys.json").read_text() == "{oops"


def test_registered_in_clproxy_main(tmp_path, monkeypatch, capsys):
    """`clproxy keys ...` is a top-level command of the clproxy entry point, listed in its usage."""
    monkeypatch.setenv("CLPROXY_HOME", str(tmp_path))
    assert clproxy_main(["keys", "create", "alice", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "alice"
    assert clproxy_main(["--help"]) == 0
    assert "keys ..." in capsys.readouterr().out


def test_subprocess_round_trip(tmp_path):
    """As a real command: create, list, revoke (the proxy's keys work while it runs: file + lock)."""
    env = dict(os.environ, CLPROXY_HOME=str(tmp_path), PYTHONPATH=os.getcwd())

    def clproxy(*argv):
        return subprocess.run([sys.executable, "-m", "clproxy", "keys", *argv], env=env,
                              capture_output=True, text=True, timeout=60)

    made = clproxy("create", "ci", "--rpm", "5", "--format", "json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    listed = clproxy("list", "--format", "json")
    assert json.loads(listed.stdout)["keys"][0]["name"] == "ci" and key not in listed.stdout
    assert clproxy("revoke", "ci").returncode == 0
    assert json.loads(clproxy("list", "--format", "json").stdout) == {"keys": []}


def test_the_first_key_warns_when_the_running_proxy_pointed_claude_code_at_itself(tmp_path):
    """The proxy set ANTHROPIC_BASE_URL in Claude Code's settings (no key there): the first client
    key makes every request of that Claude Code a 401, so create says so on stderr (stdout stays
    the key). A second key, settings that hold a clproxy key, or no such record: nothing said."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:55669"}}))
    home = tmp_path / "home"
    home.mkdir()
    (home / "proxy-state.json").write_text(json.dumps({
        "pid": os.getpid(), "claudeSettings": {"path": str(settings),
                                               "set": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:55669"}}}))
    code, out, err = run(home, "create", "alice", "--format", "json")
    assert code == 0 and json.loads(out)["key"].startswith("clp_")
    assert str(settings) in err and "401" in err and json.loads(out)["key"] not in err
    code, _, err = run(home, "create", "bob")
    assert code == 0 and "401" not in err  # not the first key: said already

    other = tmp_path / "other"
    other.mkdir()
    (other / "proxy-state.json").write_text((home / "proxy-state.json").read_text())
    settings.write_text(json.dumps({"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:55669",
                                            "ANTHROPIC_AUTH_TOKEN": "clp_given"}}))
    code, _, err = run(other, "create", "carol")
    assert code == 0 and err == ""
    code, _, err = run(tmp_path / "nothing-running", "create", "dave")
    assert code == 0 and err == ""


@pytest_twisted.ensureDeferred
async def test_list_shows_when_the_running_daemon_last_accepted_each_key(fake, start_proxy, tmp_path):
    """A daemon notes each accepted key's last use and writes it to keys.json at stop (and every
    minute): `keys list` shows it for the key used, "never" for the other; no request wrote it."""
    home = tmp_path / "home"
    key, _ = KeyStore(str(home)).create("alice")
    KeyStore(str(home)).create("bob")
    proxy = start_proxy(accounts_config(fake, "a"))
    before = time.time()
    for _ in range(3):
        assert (await post(proxy.url + "/v1/messages", request_body(), {b"x-api-key": [key.encode()]}))[0] == 200
    assert KeyStore(str(home)).records()[0].last_used_at is None  # nothing written per request
    await proxy.service.stopService()
    proxy.service.stopService = lambda: defer.succeed(None)  # stopped already: the fixture's stop is moot
    listed = {k["name"]: k for k in json.loads(run(home, "list", "--format", "json")[1])["keys"]}
    assert before <= listed["alice"]["last_used_at"] <= time.time() and listed["bob"]["last_used_at"] is None
    lines = run(home, "list")[1].splitlines()
    assert "never" not in next(line for line in lines if line.startswith("alice"))
    assert "never" in next(line for line in lines if line.startswith("bob"))
