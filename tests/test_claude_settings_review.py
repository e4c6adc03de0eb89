"""Claude Code's settings.json after the proxy came and went: the user's own layout, byte for byte."""

import json

import pytest

from clproxy.integrations.claude_settings import configure, restore

VALUES = {"ANTHROPIC_BASE_URL": "http://127.0.0.1:55669", "ENABLE_TOOL_SEARCH": "true"}

USER_SETTINGS = {
    "model": "opus",
    "permissions": {"allow": ["Bash(ls:*)"], "deny": []},
    "env": {"FOO": "bar", "ANTHROPIC_BASE_URL": "https://gateway.example.com"},
    "unicode": "café ✓",
}


@pytest.mark.parametrize("layout", [
    pytest.param(lambda d: json.dumps(d, indent=4, ensure_ascii=False) + "\n", id="four-spaces"),
    pytest.param(lambda d: json.dumps(d, indent="\t", ensure_ascii=False) + "\n", id="tabs"),
    pytest.param(lambda d: json.dumps(d, indent=2), id="ascii-escapes-no-final-newline"),
    pytest.param(lambda d: "\ufeff" + json.dumps(d, indent=2, ensure_ascii=False) + "\n", id="bom"),
    pytest.param(lambda d: json.dumps(d, ensure_ascii=False), id="one-line"),
])
def test_start_and_stop_give_back_the_same_bytes(tmp_path, layout):
    """A settings file written by hand (4 spaces, tabs, \\u escapes, a BOM, one line) is the same
    bytes after the proxy set and restored its env keys, and keeps its layout while they are set."""
    path = tmp_path / "settings.json"
    original = layout(USER_SETTINGS).encode("utf-8")
    path.write_bytes(original)
    record = configure(str(path), VALUES)
    during = path.read_bytes()
    expected = dict(USER_SETTINGS, env=dict(USER_SETTINGS["env"], **VALUES))
    assert during == layout(expected).encode("utf-8")
    restore(record)
    assert path.read_bytes() == original


def test_restore_of_values_that_were_already_there_does_not_rewrite(tmp_path):
    """When the user had already pointed Claude Code at the proxy, stopping leaves the file untouched."""
    path = tmp_path / "settings.json"
    original = b'{ "env" : { "ANTHROPIC_BASE_URL" : "http://127.0.0.1:55669", "ENABLE_TOOL_SEARCH" : "true" } }'
    path.write_bytes(original)
    record = configure(str(path), VALUES)
    assert path.read_bytes() == original
    assert restore(record) == []
    assert path.read_bytes() == original
