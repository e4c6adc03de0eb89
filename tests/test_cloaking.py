"""The request-shaping pipeline: mandatory steps, modes, session linkage and third-party plugins."""

import sys
import types
import uuid

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from clproxy.proxy import shaping as cloaking
from clproxy.accounts.model import Account
from clproxy.interfaces import ICloakingPlugin

KEY = Account(key="config:a", name="a", kind="api-key", secret="sk-test")
OAUTH = Account(key="anthropic:w", name="w", kind="oauth", secret="oat")


def shaped(pipeline, client, account):
    headers, _ = pipeline.shape(client, account, b"{}")
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


@pytest.mark.parametrize("plugin", [cloaking.HeaderHygiene(), cloaking.Authentication(),
                                    cloaking.RequiredBetas(), cloaking.SessionLinkage()])
def test_builtins_provide_the_interface(plugin):
    """Every built-in plugin provides ICloakingPlugin."""
    assert verifyObject(ICloakingPlugin, plugin)


@pytest.mark.parametrize("mode,account,linked", [
    ("auto", OAUTH, True), ("auto", KEY, False), ("always", KEY, True), ("never", OAUTH, False)])
def test_mode_decides_optional_plugins(mode, account, linked):
    """auto links sessions for OAuth accounts only, always for all, never for none."""
    headers = shaped(cloaking.CloakingPipeline(mode), [(b"x-app", b"cli")], account)
    assert (b"x-claude-code-session-id" in headers) is linked
    # authentication happens whatever the mode
    assert (b"authorization" in headers) is account.is_oauth
    assert (b"x-api-key" in headers) is (not account.is_oauth)


def test_oauth_beta_is_mandatory_even_with_mode_never():
    """An OAuth request carries the oauth beta whatever the mode: without it the token is refused."""
    headers = shaped(cloaking.CloakingPipeline("never"), [], OAUTH)
    assert headers[b"anthropic-beta"] == [b"oauth-2025-04-20"]


def test_session_linkage_keeps_clients_own_id():
    """A client's own session id is never replaced."""
    headers = shaped(cloaking.CloakingPipeline("always"), [(b"X-Claude-Code-Session-Id", b"mine")], KEY)
    assert headers[b"x-claude-code-session-id"] == [b"mine"]


def test_session_linkage_uses_proxy_session_header_or_stable_account_id():
    """Without a session id, the proxy's session header is used, else a stable per-account UUID."""
    pipeline = cloaking.CloakingPipeline("always")
    headers = shaped(pipeline, [(b"x-clproxy-session-id", b"s-42")], KEY)
    assert headers[b"x-claude-code-session-id"] == [b"s-42"]
    assert b"x-clproxy-session-id" not in headers
    first = shaped(pipeline, [], KEY)[b"x-claude-code-session-id"]
    assert first == shaped(pipeline, [], KEY)[b"x-claude-code-session-id"]
    assert uuid.UUID(first[0].decode())
    assert first != shaped(pipeline, [], OAUTH)[b"x-claude-code-session-id"]


@implementer(ICloakingPlugin)
class Tagger:
    name = "tagger"

    def applies(self, context):
        return True

    def apply(self, context):
        context.headers.append((b"x-tag", context.account.name.encode()))


def test_third_party_plugin_from_config():
    """A plugin named module:attribute in cloaking.plugins runs after the built-ins."""
    module = types.ModuleType("clproxy_test_plugins")
    module.Tagger = Tagger
    sys.modules["clproxy_test_plugins"] = module
    try:
        config = types.SimpleNamespace(mode="always", plugins={"tag": "clproxy_test_plugins:Tagger"})
        headers = shaped(cloaking.pipeline_from_config(config), [], KEY)
        assert headers[b"x-tag"] == [b"a"]
    finally:
        del sys.modules["clproxy_test_plugins"]


@pytest.mark.parametrize("spec,needle", [("nocolon", "module:attribute"),
                                         ("no.such.module:X", "cannot be loaded"),
                                         ("json:dumps", "does not provide")])
def test_bad_plugin_specs_are_clear_errors(spec, needle):
    """A plugin that cannot be loaded, or is not a plugin, is a clear error naming it."""
    with pytest.raises(cloaking.PluginLoadError) as caught:
        cloaking.load_plugin(spec)
    assert needle in str(caught.value) and spec in str(caught.value)


def test_unknown_mode_rejected():
    """Only auto, always and never are modes."""
    with pytest.raises(ValueError):
        cloaking.CloakingPipeline("sometimes")
