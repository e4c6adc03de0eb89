"""Tests for clproxy.accounts.tokenstore: atomic 0600 writes, the file lock, corruption, discovery."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import attr
import pytest
from twisted.internet import task

from clproxy.accounts import tokenstore
from clproxy.accounts.model import API_KEY, OAUTH, Account
from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import (
    LEGACY_KEY, StoredCredential, TokenStore, TokenStoreCorrupt, TokenStoreLockTimeout, UnknownAccount,
    credential_fingerprint, discover_accounts,
)

NOW = 1_700_000_000.0
ACCESS = "sk-ant-oat01-" + "a" * 40
REFRESH = "sk-ant-ort01-" + "r" * 40


def oauth_record(label="work", access=ACCESS, refresh=REFRESH, expires_in=28800.0, email="w@example.com"):
    tokens = TokenSet(access_token=access, refresh_token=refresh, expires_in=expires_in, email=email)
    return StoredCredential.new_oauth(label, tokens, NOW)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --- writing ----------------------------------------------------------------------------------------


def test_put_and_load_round_trip(tmp_path):
    """A stored account reads back with every field, under its compound key."""
    store = TokenStore(str(tmp_path / "home"), now=lambda: NOW)
    store.put(oauth_record())
    store.put(StoredCredential.new_api_key("api", "sk-ant-api03-" + "k" * 30, NOW))
    loaded = store.load()
    assert list(loaded) == ["anthropic:work", "anthropic:api"]
    work = loaded["anthropic:work"]
    assert (work.type, work.label, work.access_token, work.refresh_token) == (OAUTH, "work", ACCESS, REFRESH)
    assert work.expires_at == NOW + 28800 and work.email == "w@example.com"
    assert work.created_at == NOW and work.updated_at == NOW and work.login_id
    assert not work.disabled and work.refresh_failures == 0
    assert loaded["anthropic:api"].type == API_KEY and loaded["anthropic:api"].secret.startswith("sk-ant-api03-")


def test_store_file_is_0600_and_home_0700(tmp_path):
    """tokens.json is mode 0600 even under a permissive umask; a new home directory is 0700."""
    home = tmp_path / "home"
    old = os.umask(0)
    try:
        TokenStore(str(home)).put(oauth_record())
    finally:
        os.umask(old)
    assert mode(home / "tokens.json") == 0o600
    assert mode(home) == 0o700
    assert mode(home / "tokens.json.lock") == 0o600


def test_temp_file_is_0600_before_the_rename(tmp_path, monkeypatch):
    """The temp file already has mode 0600 and holds the fsynced content when it is renamed into place."""
    seen = []
    fsynced = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src, dst):
        seen.append((os.path.dirname(src), mode(src), open(src, "rb").read(), dst))
        return real_replace(src, dst)

    def spy_fsync(fd):
        fsynced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    old = os.umask(0)
    try:
        TokenStore(str(tmp_path)).put(oauth_record())
    finally:
        os.umask(old)
    assert len(seen) == 1
    directory, temp_mode, content, dst = seen[0]
    assert directory == str(tmp_path) and dst == str(tmp_path / "tokens.json")
    assert temp_mode == 0o600
    assert json.loads(content)["accounts"]["anthropic:work"]["refresh_token"] == REFRESH
    assert fsynced == [False, True]  # the file, then the directory


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """A rename that fails leaves the previous store intact and removes the temp file."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record())
    before = (tmp_path / "tokens.json").read_bytes()

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        store.put(oauth_record(label="other"))
    assert (tmp_path / "tokens.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json", "tokens.json.lock"]


def test_relogin_resets_disabled_and_failures_and_keeps_created(tmp_path):
    """put() of new credentials re-enables, resets failures, keeps created_at and issues a new login_id."""
    times = iter([NOW, NOW + 10, NOW + 20, NOW + 30])
    store = TokenStore(str(tmp_path), now=lambda: next(times))
    first = store.put(oauth_record())
    with store.locked() as tx:
        tx.write(attr.evolve(first, disabled=True, disabled_reason="x", refresh_failures=7))
    again = store.put(oauth_record(access="sk-ant-oat01-" + "b" * 40))
    assert not again.disabled and again.disabled_reason is None and again.refresh_failures == 0
    assert again.created_at == first.created_at and again.updated_at > first.updated_at
    assert again.login_id != first.login_id


def test_enable_disable_remove(tmp_path):
    """disable() records a reason, enable() clears it and the failure count, remove() deletes."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record())
    with store.locked() as tx:
        tx.write(attr.evolve(tx.get("anthropic:work"), refresh_failures=3))
    assert store.disable("anthropic:work", "because").disabled_reason == "because"
    enabled = store.enable("anthropic:work")
    assert not enabled.disabled and enabled.refresh_failures == 0
    store.remove("anthropic:work")
    assert store.load() == {}
    with pytest.raises(UnknownAccount):
        store.remove("anthropic:work")
    with pytest.raises(UnknownAccount):
        store.enable("anthropic:nobody")


def test_only_a_login_or_a_rotation_moves_tokens_at(tmp_path):
    """tokens_at (what orders two copies of an account's tokens) is set by a login and a rotation;
    limits, disable, enable and failure counts bump updated_at only."""
    times = iter(NOW + n for n in range(100))
    store = TokenStore(str(tmp_path), now=lambda: next(times))
    login = store.put(oauth_record())
    assert login.tokens_at == login.updated_at == login.tokens_version
    store.set_limits("anthropic:work", max_concurrent=4)
    store.disable("anthropic:work", "because")
    edited = store.enable("anthropic:work")
    assert edited.updated_at > login.updated_at and edited.tokens_at == login.tokens_at
    rotated = edited.rotated(TokenSet(access_token="sk-ant-oat01-" + "n" * 40), NOW + 500)
    assert rotated.tokens_at == rotated.updated_at == NOW + 500
    assert store.put(oauth_record()).tokens_at > edited.tokens_at  # a new login


def test_a_record_without_tokens_at_keeps_its_last_update_as_its_version(tmp_path):
    """A record written before tokens_at existed is ordered by its updated_at, and an edit that
    bumps updated_at keeps that version: a stale copy edited later is not newer tokens."""
    store = TokenStore(str(tmp_path), now=lambda: NOW + 50)
    (tmp_path / "tokens.json").write_text(json.dumps({"version": 1, "accounts": {"anthropic:work": {
        "type": "oauth", "label": "work", "access_token": ACCESS, "refresh_token": REFRESH,
        "updated_at": NOW}}}))
    assert store.get("anthropic:work").tokens_version == NOW
    store.set_limits("anthropic:work", max_concurrent=2)
    on_disk = json.loads((tmp_path / "tokens.json").read_text())["accounts"]["anthropic:work"]
    assert (on_disk["updated_at"], on_disk["tokens_at"]) == (NOW + 50, NOW)


def test_unknown_fields_survive_a_rewrite(tmp_path):
    """Members a newer clproxy wrote are kept when this version rewrites the entry."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record())
    raw = json.loads((tmp_path / "tokens.json").read_text())
    raw["accounts"]["anthropic:work"]["future_field"] = {"x": 1}
    (tmp_path / "tokens.json").write_text(json.dumps(raw))
    store.disable("anthropic:work", "r")
    assert json.loads((tmp_path / "tokens.json").read_text())["accounts"]["anthropic:work"]["future_field"] == {"x": 1}


def test_repr_never_shows_tokens(tmp_path):
    """StoredCredential, Account and the store repr hold no token."""
    record = oauth_record()
    text = repr(record) + repr(record.to_account()) + repr(TokenStore(str(tmp_path)))
    assert ACCESS not in text and REFRESH not in text


# --- the lock -----------------------------------------------------------------------------------------


WORKER = textwrap.dedent("""
    import sys
    from clproxy.accounts.tokenstore import StoredCredential, TokenStore
    home, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = TokenStore(home, lock_poll=0.001)
    for i in range(count):
        # A read-modify-write of the whole file each time: without the lock, writes get lost.
        store.put(StoredCredential.new_api_key(f"{prefix}-{i}", "sk-ant-api03-" + "x" * 20, 0.0))
""")


def test_lock_prevents_lost_updates_between_processes(tmp_path):
    """Four processes each adding 40 keys concurrently: all 160 keys survive."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), f"p{n}", "40"], env=env)
             for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    keys = set(TokenStore(str(tmp_path)).load())
    assert keys == {f"anthropic:p{n}-{i}" for n in range(4) for i in range(40)}
    assert mode(tmp_path / "tokens.json") == 0o600


def test_async_acquire_polls_with_the_clock_and_times_out(tmp_path):
    """acquire() waits on the injected clock without blocking and raises TokenStoreLockTimeout at the deadline."""
    store = TokenStore(str(tmp_path), lock_timeout=5.0, lock_poll=0.5)
    clock = task.Clock()
    holder = tokenstore._FileLock(store.lock_path)
    assert holder.try_acquire()
    try:
        from twisted.internet.defer import Deferred
        waiting = Deferred.fromCoroutine(store.acquire(clock))
        clock.advance(4.0)
        assert not waiting.called
        clock.pump([0.5] * 3)
        failure = []
        waiting.addErrback(failure.append)
        assert failure and failure[0].check(TokenStoreLockTimeout)
        assert "tokens.json.lock" in str(failure[0].value)
        # once released, the next attempt gets it at the next poll
        again = Deferred.fromCoroutine(store.acquire(clock))
        holder.release()
        clock.advance(0.5)
        got = []
        again.addCallback(got.append)
        assert got and got[0].active
        got[0].release()
    finally:
        holder.release()


def test_blocking_lock_inside_a_held_lock_fails_fast(tmp_path):
    """A blocking locked() while this process holds the lock raises at once instead of deadlocking."""
    store = TokenStore(str(tmp_path), lock_timeout=30.0)
    with store.locked():
        with pytest.raises(TokenStoreLockTimeout) as info:
            with store.locked():
                pass
    assert "this process" in str(info.value)
    with store.locked():  # released properly afterwards
        pass


# --- corruption -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b'{"version": 1, "accounts": {"anthropic:w": {"access_token": "sk-ant-oat01-SECRETSECRET',
    b"",
    b"[1, 2]",
    b'{"version": 1, "accounts": []}',
    b'{"version": 1, "accounts": {"anthropic:w": {"type": "oauth", "access_token": 7}}}',
    b'{"version": 1, "accounts": {"anthropic:w": {"type": "magic", "access_token": "x"}}}',
    b'{"version": 99, "accounts": {}}',
    b"\xff\xfe garbage",
])
def test_corrupt_store_is_a_typed_error_naming_the_file(tmp_path, content):
    """An unreadable store raises TokenStoreCorrupt naming the file, never quoting it, and is not overwritten."""
    path = tmp_path / "tokens.json"
    path.write_bytes(content)
    store = TokenStore(str(tmp_path))
    with pytest.raises(TokenStoreCorrupt) as info:
        store.load()
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert "SECRET" not in str(info.value) and "SECRET" not in repr(info.value)
    with pytest.raises(TokenStoreCorrupt):
        store.put(oauth_record())
    with pytest.raises(TokenStoreCorrupt):
        discover_accounts(str(tmp_path), (), {})
    assert path.read_bytes() == content


# --- discovery --------------------------------------------------------------------------------------------


def write_legacy(home, data):
    (home / "anthropic-credentials.json").write_text(json.dumps(data))


def test_discovery_prefers_the_token_store(tmp_path):
    """With store accounts, the legacy file and ANTHROPIC_API_KEY are ignored; config accounts join after."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record("work"))
    store.put(oauth_record("personal"))
    write_legacy(tmp_path, {"accessToken": "sk-ant-oat01-legacylegacy", "refreshToken": "r", "expiresAt": 1})
    config = Account(key="config:primary", name="primary", secret="sk-ant-api03-cfgcfgcfg")
    accounts = discover_accounts(str(tmp_path), (config,), {"ANTHROPIC_API_KEY": "sk-ant-api03-envenv"})
    assert [a.key for a in accounts] == ["anthropic:work", "anthropic:personal", "config:primary"]
    work = accounts[0]
    assert work.is_oauth and work.secret == ACCESS and work.source == "tokenstore"
    assert work.expires_at == NOW + 28800 and work.metadata["email"] == "w@example.com"


def test_discovery_falls_back_to_the_legacy_file(tmp_path):
    """An empty store gives the legacy credentials file's account (flat shape, expiresAt in ms)."""
    write_legacy(tmp_path, {"accessToken": ACCESS, "refreshToken": REFRESH, "expiresAt": int(NOW * 1000)})
    (account,) = discover_accounts(str(tmp_path), (), {"ANTHROPIC_API_KEY": "sk-ant-api03-envenv"})
    assert account.key == LEGACY_KEY and account.is_oauth and account.secret == ACCESS
    assert account.expires_at == NOW and account.source == "legacy"


def test_discovery_reads_claude_code_shape_in_the_legacy_file(tmp_path):
    """The legacy file may hold Claude Code's {"claudeAiOauth": {...}} shape."""
    write_legacy(tmp_path, {"claudeAiOauth": {"accessToken": ACCESS, "refreshToken": REFRESH,
                                              "expiresAt": int(NOW * 1000), "scopes": ["user:inference"],
                                              "subscriptionType": "max"}})
    (account,) = discover_accounts(str(tmp_path), (), {})
    assert account.key == LEGACY_KEY and account.secret == ACCESS and account.expires_at == NOW
    assert account.metadata["subscription_type"] == "max"


def test_discovery_uses_the_environment_last(tmp_path):
    """Without store, legacy file or config accounts, ANTHROPIC_API_KEY is the pool."""
    (account,) = discover_accounts(str(tmp_path), (), {"ANTHROPIC_API_KEY": "sk-ant-api03-envenv"})
    assert account.key == "env:ANTHROPIC_API_KEY" and account.kind == API_KEY
    assert discover_accounts(str(tmp_path / "missing"), (), {}) == ()


def test_environment_key_is_not_used_next_to_config_accounts(tmp_path):
    """ANTHROPIC_API_KEY only counts when no other account exists: config accounts win."""
    config = Account(key="config:primary", name="primary", secret="sk-ant-api03-cfgcfgcfg")
    accounts = discover_accounts(str(tmp_path), [config], {"ANTHROPIC_API_KEY": "sk-ant-api03-envenv"})
    assert [a.key for a in accounts] == ["config:primary"]


def test_disabled_store_accounts_are_discovered_disabled(tmp_path):
    """A disabled store account maps to Account(enabled=False) with its reason in metadata."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record())
    store.disable("anthropic:work", "15 consecutive refresh failures")
    (account,) = discover_accounts(str(tmp_path), (), {})
    assert account.enabled is False
    assert account.metadata["disabled_reason"] == "15 consecutive refresh failures"


def test_fingerprint_changes_with_every_write_only(tmp_path):
    """store.fingerprint() is stable between writes and changes on each write (and on the legacy file)."""
    store = TokenStore(str(tmp_path))
    empty = store.fingerprint()
    store.put(oauth_record())
    one = store.fingerprint()
    assert one != empty and store.fingerprint() == one
    store.disable("anthropic:work", "r")
    two = store.fingerprint()
    assert two != one
    write_legacy(tmp_path, {"accessToken": ACCESS})
    assert store.fingerprint() != two


def test_credential_fingerprint_survives_rotation_not_relogin(tmp_path):
    """credential_fingerprint is a hash, unchanged by a refresh, changed by a new login."""
    store = TokenStore(str(tmp_path))
    store.put(oauth_record())
    before = store.accounts()[0]
    with store.locked() as tx:
        tx.write(tx.get("anthropic:work").rotated(
            TokenSet(access_token="sk-ant-oat01-" + "n" * 40, refresh_token="sk-ant-ort01-" + "m" * 40,
                     expires_in=100.0), NOW))
    rotated = store.accounts()[0]
    assert rotated.secret != before.secret
    assert credential_fingerprint(rotated) == credential_fingerprint(before)
    store.put(oauth_record())
    assert credential_fingerprint(store.accounts()[0]) != credential_fingerprint(before)
    fp = credential_fingerprint(before)
    assert ACCESS not in fp and len(fp) == 16
    env = Account(key="env:ANTHROPIC_API_KEY", name="env", secret="sk-ant-api03-one")
    assert credential_fingerprint(env) != credential_fingerprint(attr.evolve(env, secret="sk-ant-api03-two"))


def test_legacy_write_back_keeps_its_shape(tmp_path):
    """Writing the legacy account back keeps Claude Code's nested shape and millisecond expiry, 0600."""
    write_legacy(tmp_path, {"claudeAiOauth": {"accessToken": ACCESS, "refreshToken": REFRESH,
                                              "expiresAt": int(NOW * 1000), "scopes": ["a"]}})
    store = TokenStore(str(tmp_path))
    with store.locked() as tx:
        tx.write(tx.get(LEGACY_KEY).rotated(
            TokenSet(access_token="sk-ant-oat01-" + "n" * 40, refresh_token="sk-ant-ort01-" + "m" * 40,
                     expires_in=100.0), NOW))
    raw = json.loads((tmp_path / "anthropic-credentials.json").read_text())
    assert raw["claudeAiOauth"]["refreshToken"] == "sk-ant-ort01-" + "m" * 40
    assert raw["claudeAiOauth"]["expiresAt"] == int((NOW + 100) * 1000)
    assert raw["claudeAiOauth"]["scopes"] == ["a"]
    assert mode(tmp_path / "anthropic-credentials.json") == 0o600


def test_invalid_label_is_refused():
    """Labels are short names; anything with spaces, colons or slashes is refused."""
    for bad in ["", "a b", "x:y", "../up", "-lead", "x" * 65]:
        with pytest.raises(tokenstore.InvalidLabel):
            tokenstore.store_key(bad)
    assert tokenstore.key_for("work") == "anthropic:work"
    assert tokenstore.key_for("anthropic:work") == "anthropic:work"


def test_default_home_honours_clproxy_home_and_home():
    """$CLPROXY_HOME wins; otherwise ~/.clproxy from the given environment's HOME."""
    assert tokenstore.default_home({"CLPROXY_HOME": "/x/y"}) == "/x/y"
    assert tokenstore.default_home({"HOME": "/home/u"}) == "/home/u/.clproxy"


# --- per-account limits (issue 13) --------------------------------------------------------------------


def test_limits_round_trip_and_reach_the_account(tmp_path):
    """excluded_models and max_concurrent are stored, read back, and carried on the pool's Account."""
    store = TokenStore(str(tmp_path), now=lambda: NOW)
    store.put(attr.evolve(oauth_record(), excluded_models=("claude-opus-*",), max_concurrent=2))
    record = store.load()["anthropic:work"]
    assert record.excluded_models == ("claude-opus-*",) and record.max_concurrent == 2
    account = store.accounts()[0]
    assert account.excluded_models == ("claude-opus-*",) and account.max_concurrent == 2
    # a refresh keeps them
    rotated = record.rotated(TokenSet(access_token=ACCESS, refresh_token=REFRESH, expires_in=60), NOW)
    assert rotated.excluded_models == ("claude-opus-*",) and rotated.max_concurrent == 2


def test_records_without_limits_have_none(tmp_path):
    """An entry written before limits existed reads as no excluded model and no cap."""
    store = TokenStore(str(tmp_path), now=lambda: NOW)
    store.put(oauth_record())
    raw = json.loads((tmp_path / "tokens.json").read_text())
    for entry in raw["accounts"].values() if "accounts" in raw else raw.values():
        if isinstance(entry, dict):
            entry.pop("excluded_models", None)
            entry.pop("max_concurrent", None)
    (tmp_path / "tokens.json").write_text(json.dumps(raw))
    record = store.load()["anthropic:work"]
    assert record.excluded_models == () and record.max_concurrent is None
    assert store.accounts()[0].max_concurrent is None


def test_set_limits_changes_only_what_is_given(tmp_path):
    """set_limits: patterns and cap independently; None patterns and KEEP cap leave them as they are."""
    store = TokenStore(str(tmp_path), now=lambda: NOW)
    store.put(oauth_record())
    store.set_limits("anthropic:work", excluded_models=["claude-opus-*"], max_concurrent=3)
    store.set_limits("anthropic:work")
    record = store.load()["anthropic:work"]
    assert (record.excluded_models, record.max_concurrent) == (("claude-opus-*",), 3)
    store.set_limits("anthropic:work", max_concurrent=None)
    record = store.load()["anthropic:work"]
    assert (record.excluded_models, record.max_concurrent) == (("claude-opus-*",), None)
    store.set_limits("anthropic:work", excluded_models=())
    assert store.load()["anthropic:work"].excluded_models == ()
    assert store.load()["anthropic:work"].access_token == ACCESS
    with pytest.raises(UnknownAccount):
        store.set_limits("anthropic:nobody", max_concurrent=1)
    with pytest.raises(ValueError):
        store.set_limits("anthropic:work", max_concurrent=0)


@pytest.mark.parametrize("member, value", [("max_concurrent", 0), ("max_concurrent", "2"),
                                            ("max_concurrent", True), ("excluded_models", "opus"),
                                            ("excluded_models", [1]), ("excluded_models", [""])])
def test_bad_limits_in_the_file_are_corrupt(tmp_path, member, value):
    """A malformed limit is reported as a corrupt entry naming the member."""
    store = TokenStore(str(tmp_path), now=lambda: NOW)
    store.put(oauth_record())
    raw = json.loads((tmp_path / "tokens.json").read_text())
    entries = raw["accounts"] if "accounts" in raw else raw
    entries["anthropic:work"][member] = value
    (tmp_path / "tokens.json").write_text(json.dumps(raw))
    with pytest.raises(TokenStoreCorrupt) as info:
        store.load()
    assert member in str(info.value)
