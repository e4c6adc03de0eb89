"""The daemon's live account list: token-store changes picked up without a restart."""

import time

from twisted.internet import task

from clproxy.accounts.model import Account
from clproxy.accounts.directory import AccountDirectory
from clproxy.accounts.oauth import TokenSet
from clproxy.accounts.tokenstore import StoredCredential, TokenStore


def login(store, label, access="at-1", refresh="rt-1"):
    store.put(StoredCredential.new_oauth(label, TokenSet(access_token=access, refresh_token=refresh),
                                         time.time(), expires_at=time.time() + 3600))


def make(tmp_path, clock, changed, config=()):
    store = TokenStore(str(tmp_path))
    return store, AccountDirectory(store=store, clock=clock, environ={}, config_accounts=config,
                                   base_url="http://upstream", on_changed_credential=changed.append)


def test_new_login_appears_after_the_check_interval(tmp_path):
    """An account added on disk is used once the check interval has passed, without a restart."""
    clock, changed = task.Clock(), []
    store, directory = make(tmp_path, clock, changed)
    assert directory.current() == ()
    login(store, "work")
    assert directory.current() == ()  # not checked again yet
    clock.advance(1.0)
    assert [a.key for a in directory.current()] == ["anthropic:work"]


def test_relogin_resets_runtime_state_but_rotation_does_not(tmp_path):
    """A re-login reports a changed credential; a token rotation of the same login does not."""
    clock, changed = task.Clock(), []
    store, directory = make(tmp_path, clock, changed)
    login(store, "work")
    directory.refresh()
    record = store.get("anthropic:work")
    with store.locked(5) as tx:
        tx.write(record.rotated(TokenSet(access_token="at-2", refresh_token="rt-2"), time.time()))
    clock.advance(1.0)
    assert directory.current()[0].secret == "at-2" and changed == []
    login(store, "work", access="at-3", refresh="rt-3")  # a new login of the same label
    clock.advance(1.0)
    assert directory.current()[0].secret == "at-3"
    assert [a.key for a in changed] == ["anthropic:work"]


def test_corrupt_store_keeps_previous_accounts(tmp_path):
    """A corrupt token store keeps the last good list instead of emptying the pool."""
    clock, changed = task.Clock(), []
    store, directory = make(tmp_path, clock, changed)
    login(store, "work")
    directory.refresh()
    (tmp_path / "tokens.json").write_text("{not json")
    clock.advance(1.0)
    assert [a.key for a in directory.current()] == ["anthropic:work"]


def test_config_accounts_join_and_reload(tmp_path):
    """Config accounts join the store's; a config reload replaces them at once."""
    clock, changed = task.Clock(), []
    one = Account(key="config:a", name="a", secret="k")
    store, directory = make(tmp_path, clock, changed, config=(one,))
    login(store, "work")
    directory.refresh()
    assert [a.key for a in directory.current()] == ["anthropic:work", "config:a"]
    directory.set_config_accounts([Account(key="config:b", name="b", secret="k")])
    assert [a.key for a in directory.current()] == ["anthropic:work", "config:b"]
