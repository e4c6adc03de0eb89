"""Malformed configuration files met as a user meets them: one clear line, never a traceback or a secret."""

import os
import subprocess
import sys

import pytest

from clproxy.config import ConfigError, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_clproxy(tmp_path, *args):
    """``python -m clproxy ARGS`` with its own HOME and CLPROXY_HOME under ``tmp_path``."""
    env = dict(os.environ, HOME=str(tmp_path), CLPROXY_HOME=str(tmp_path / "home"),
               CLPROXY_CLAUDE_SETTINGS="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "clproxy", *args], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)


def test_self_referencing_alias_is_a_config_error_at_start(tmp_path):
    """A YAML alias inside the node it names stops `proxy start` with one config line, not a RecursionError."""
    config = tmp_path / "proxy-config.yaml"
    config.write_text("cloaking:\n  plugins:\n    loop: &loop [1, *loop]\n")
    done = run_clproxy(tmp_path, "proxy", "start", "--config", str(config), "--port", "1")
    assert done.returncode == 1
    assert "RecursionError" not in done.stderr and "Traceback" not in done.stderr
    assert "invalid configuration" in done.stderr and "cloaking.plugins.loop" in done.stderr


def test_deeply_nested_document_is_a_config_error():
    """A document nested hundreds deep (YAML or JSON) is refused with a ConfigError naming the file."""
    for text in ("a: " + "[" * 1000 + "]" * 1000, '{"a": ' + "[" * 1000 + "]" * 1000 + "}"):
        with pytest.raises(ConfigError) as raised:
            parse_config(text, "deep.yaml", {})
        assert "deep.yaml" in str(raised.value) and "nested too deeply" in str(raised.value)


def test_alias_expansion_bomb_is_refused():
    """A few lines of aliases that expand to a million values are refused instead of built in memory."""
    lines = ["cloaking:", "  plugins:", "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 6):
        lines.append(f"    l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    with pytest.raises(ConfigError) as raised:
        parse_config("\n".join(lines) + "\n", "bomb.yaml", {})
    assert str(raised.value).startswith("cloaking.plugins.") and "aliases" in str(raised.value)


def test_shared_aliases_of_ordinary_size_still_load():
    """Anchors and merge keys used as intended (shared account defaults) keep working."""
    loaded = parse_config(
        "x-defaults: &defaults {weight: 2, excludedModels: [claude-opus-*]}\n"
        "accounts:\n  anthropic:\n"
        "    - {<<: *defaults, name: a, apiKey: '${KA}'}\n"
        "    - {<<: *defaults, name: b, apiKey: '${KB}'}\n",
        "ok.yaml", {"KA": "ka", "KB": "kb"})
    assert [a.weight for a in loaded.config.accounts] == [2, 2]
    assert loaded.config.accounts[1].excluded_models == ("claude-opus-*",)


@pytest.mark.parametrize("section, url", [
    ("state: {url: '%s'}", "redsi://:hunter2pw@redis.example:6379/0"),
    ("providers: {anthropic: {baseUrl: '%s'}}", "htps://bob:hunter2pw@gateway.example/v1"),
    ("providers: {google-ai: {baseUrl: '%s'}}", "generativelanguage.googleapis.com?key=hunter2pw"),
])
def test_bad_url_error_does_not_echo_its_password(section, url):
    """A URL rejected for its shape is named without the password or query it carries."""
    with pytest.raises(ConfigError) as raised:
        parse_config(section % url + "\n", "c.yaml", {})
    message = str(raised.value)
    assert "must be a" in message
    assert "hunter2pw" not in message
