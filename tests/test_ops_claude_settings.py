"""Claude Code's settings.json: set the proxy's env entries, keep everything else, undo exactly."""

import json
import os
import stat

import pytest

from clproxy.integrations import claude_settings
from clproxy.integrations.claude_settings import SettingsError, configure, restore

URL = "http://127.0.0.1:55669"
VALUES = {"ANTHROPIC_BASE_URL": URL, "ENABLE_TOOL_SEARCH": "true"}

USER_SETTINGS = {
    "model": "opus",
    "permissions": {"allow": ["Bash(ls:*)"], "deny": []},
    "env": {"FOO": "bar", "ANTHROPIC_BASE_URL": "https://gateway.example.com", "NUMBER": "1"},
    "hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "true"}]}]},
    "unicode": "café ✓",
}


def write(path, document, mode=0o644):
    path.write_text(json.dumps(document))
    os.chmod(path, mode)


def test_missing_file_is_created_and_removed_again(tmp_path):
    """A missing settings file is created (0600) with the entries, and removed on restore."""
    path = tmp_path / ".claude" / "settings.json"
    record = configure(str(path), VALUES)
    assert json.loads(path.read_text()) == {"env": VALUES}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert record["createdFile"] and record["createdEnv"]
    assert restore(record) == ["ANTHROPIC_BASE_URL", "ENABLE_TOOL_SEARCH"]
    assert not path.exists()


def test_other_keys_kept_and_users_own_base_url_restored(tmp_path):
    """Every other key survives, and the user's own ANTHROPIC_BASE_URL comes back on restore."""
    path = tmp_path / "settings.json"
    write(path, USER_SETTINGS)
    record = configure(str(path), VALUES)
    during = json.loads(path.read_text())
    assert during["env"]["ANTHROPIC_BASE_URL"] == URL and during["env"]["ENABLE_TOOL_SEARCH"] == "true"
    assert during["env"]["FOO"] == "bar" and during["hooks"] == USER_SETTINGS["hooks"]
    assert during["unicode"] == "café ✓" and list(during) == list(USER_SETTINGS)
    assert record["previous"] == {"ANTHROPIC_BASE_URL": "https://gateway.example.com",
                                  "ENABLE_TOOL_SEARCH": None}
    restore(record)
    assert json.loads(path.read_text()) == USER_SETTINGS


def test_mode_is_kept(tmp_path):
    """The file keeps its permission bits across configure and restore."""
    path = tmp_path / "settings.json"
    write(path, {"env": {}}, mode=0o640)
    record = configure(str(path), VALUES)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    restore(record)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert json.loads(path.read_text()) == {"env": {}}


def test_env_object_created_by_us_is_removed(tmp_path):
    """An env object the proxy had to create goes away with its entries; other keys stay."""
    path = tmp_path / "settings.json"
    write(path, {"model": "sonnet"})
    restore(configure(str(path), VALUES))
    assert json.loads(path.read_text()) == {"model": "sonnet"}


@pytest.mark.parametrize("content, words", [
    ('{"env": {"A": "1",}', "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"env": "ANTHROPIC_BASE_URL=x"}', '"env"'),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_corrupt_file_is_refused_and_left_untouched(tmp_path, content, words):
    """Invalid JSON (or a wrong shape) is refused with a clear message and never overwritten."""
    path = tmp_path / "settings.json"
    data = content if isinstance(content, bytes) else content.encode()
    path.write_bytes(data)
    with pytest.raises(SettingsError) as error:
        configure(str(path), VALUES)
    assert words in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == data
    with pytest.raises(SettingsError):
        restore({"path": str(path), "set": VALUES, "previous": {}})
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["settings.json"]


def test_value_changed_since_is_left_alone(tmp_path):
    """A key someone changed after the proxy set it is not touched on restore."""
    path = tmp_path / "settings.json"
    write(path, {"env": {"ANTHROPIC_BASE_URL": "https://mine"}})
    record = configure(str(path), VALUES)
    document = json.loads(path.read_text())
    document["env"]["ANTHROPIC_BASE_URL"] = "https://changed-by-user"
    path.write_text(json.dumps(document))
    assert restore(record) == ["ENABLE_TOOL_SEARCH"]
    assert json.loads(path.read_text()) == {"env": {"ANTHROPIC_BASE_URL": "https://changed-by-user"}}


def test_restore_of_a_deleted_file_does_nothing(tmp_path):
    """If the user deleted settings.json meanwhile, restore does not recreate it."""
    path = tmp_path / "settings.json"
    record = configure(str(path), VALUES)
    path.unlink()
    assert restore(record) == []
    assert not path.exists()


def test_unwritable_directory_gives_one_clear_line(tmp_path):
    """A settings path that cannot be created raises SettingsError naming it (no traceback text)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    path = blocker / "settings.json"
    with pytest.raises(SettingsError) as error:
        configure(str(path), VALUES)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert blocker.read_text() == "a file"


def test_failed_rename_leaves_the_file_and_no_temp(tmp_path, monkeypatch):
    """When the atomic rename fails (e.g. read-only filesystem) the original is intact and no temp remains."""
    path = tmp_path / "settings.json"
    write(path, USER_SETTINGS)
    before = path.read_bytes()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(claude_settings.os, "replace", refuse)
    with pytest.raises(SettingsError) as error:
        configure(str(path), VALUES)
    assert "Permission denied" in str(error.value) and "left as it was" in str(error.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["settings.json"]


def test_symlinked_settings_keep_their_link(tmp_path):
    """A settings.json that is a symlink (dotfile managers) is edited through the link."""
    target = tmp_path / "dotfiles" / "claude-settings.json"
    target.parent.mkdir()
    write(target, {"model": "opus"})
    link = tmp_path / "settings.json"
    link.symlink_to(target)
    record = configure(str(link), VALUES)
    assert link.is_symlink()
    assert json.loads(target.read_text())["env"] == VALUES
    restore(record)
    assert link.is_symlink() and json.loads(target.read_text()) == {"model": "opus"}


def test_default_path_and_override():
    """The path is $CLPROXY_CLAUDE_SETTINGS, else ~/.claude/settings.json; 'off' disables it."""
    assert claude_settings.default_settings_path({"HOME": "/home/u"}) == "/home/u/.claude/settings.json"
    assert claude_settings.default_settings_path(
        {"HOME": "/home/u", "CLPROXY_CLAUDE_SETTINGS": "/tmp/s.json"}) == "/tmp/s.json"
    assert claude_settings.default_settings_path(
        {"HOME": "/home/u", "CLPROXY_CLAUDE_SETTINGS": "~/x.json"}) == "/home/u/x.json"
    assert claude_settings.default_settings_path({"CLPROXY_CLAUDE_SETTINGS": "off"}) is None


def test_tool_search_value_is_configurable():
    """ENABLE_TOOL_SEARCH is "true" by default, any other value on request, or left alone with "off"."""
    assert claude_settings.proxy_env(URL) == VALUES
    assert claude_settings.proxy_env(URL, "auto")["ENABLE_TOOL_SEARCH"] == "auto"
    assert claude_settings.proxy_env(URL, "off") == {"ANTHROPIC_BASE_URL": URL}
    assert claude_settings.proxy_env(URL, None) == {"ANTHROPIC_BASE_URL": URL}


def test_pointing_at(tmp_path):
    """pointing_at tells whether the settings route Claude Code to a URL (corrupt: no)."""
    path = tmp_path / "settings.json"
    assert not claude_settings.pointing_at(str(path), URL)
    configure(str(path), VALUES)
    assert claude_settings.pointing_at(str(path), URL)
    path.write_text("{")
    assert not claude_settings.pointing_at(str(path), URL)
