"""Malformed configuration files met as a user meets them: one clear line, never a traceback or a secret."""

import pytest

from clproxy.config import ConfigError, parse_config


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
