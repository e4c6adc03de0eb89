"""Tests for clproxy.accounts.oauth: PKCE, the authorize URL, pasted codes, exchange and refresh."""

import re
import string
import types
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from clproxy.accounts import oauth
from clproxy.accounts.oauth import (
    InvalidGrant, OAuthEndpoints, OAuthHTTPError, OAuthNetworkError, OAuthPasteError,
    OAuthStateMismatch,
)
from clproxy.testing.oauth import listen_fake_oauth

TOKEN_RE = re.compile(r"sk-ant-[a-z]+\d*-[A-Za-z0-9_\-]{6,}")


@pytest.fixture
def fake():
    from twisted.internet import reactor
    server, port, _url = listen_fake_oauth(reactor)
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def http():
    from twisted.internet import reactor
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


# --- PKCE and state ---------------------------------------------------------------------------------


def test_verifier_is_43_to_128_unreserved_characters():
    """A generated verifier has RFC 7636's length and alphabet and is never repeated."""
    allowed = set(string.ascii_letters + string.digits + "-._~")
    verifiers = {oauth.make_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for verifier in verifiers:
        assert 43 <= len(verifier) <= 128
        assert set(verifier) <= allowed


def test_challenge_matches_rfc7636_vector():
    """S256 of the RFC 7636 appendix B verifier is the published challenge (base64url, no padding)."""
    assert oauth.code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_pairs_verifier_with_its_challenge_and_hides_it():
    """new_pkce's challenge is S256 of its verifier, and repr never shows the verifier."""
    pair = oauth.new_pkce()
    assert pair.challenge == oauth.code_challenge(pair.verifier)
    assert "=" not in pair.challenge and len(pair.challenge) == 43
    assert pair.verifier not in repr(pair)


def test_states_are_unguessable_and_distinct():
    """Each login gets a fresh random state of at least 32 characters."""
    states = {oauth.new_state() for _ in range(20)}
    assert len(states) == 20
    assert all(len(s) >= 32 for s in states)


# --- endpoints and the authorize URL ------------------------------------------------------------------


def test_endpoint_defaults_are_claude_codes_public_client():
    """The defaults are the reference's token/authorize URLs, client id, redirect and six scopes."""
    e = OAuthEndpoints()
    assert e.token_url == "https://platform.claude.com/v1/oauth/token"
    assert e.authorize_url == "https://claude.ai/oauth/authorize"
    assert e.client_id == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    assert e.redirect_uri == "https://platform.claude.com/oauth/code/callback"
    assert e.scopes == ("org:create_api_key", "user:profile", "user:inference",
                        "user:sessions:claude_code", "user:mcp_servers", "user:file_upload")


def test_endpoints_from_config_object():
    """from_config reads oauth_token_url/authorize_url/client_id/redirect_uri/scopes from any object."""
    cfg = types.SimpleNamespace(oauth_token_url="https://t.example/token", authorize_url="https://a.example/auth",
                                client_id="cid", redirect_uri="https://r.example/cb", scopes="a b")
    e = OAuthEndpoints.from_config(cfg)
    assert (e.token_url, e.authorize_url, e.client_id, e.redirect_uri, e.scopes) == \
        ("https://t.example/token", "https://a.example/auth", "cid", "https://r.example/cb", ("a", "b"))


def test_endpoints_from_the_real_config_class():
    """from_config accepts the config module's AnthropicProvider and keeps its values."""
    from clproxy.config import AnthropicProvider
    provider = AnthropicProvider(oauth_token_url="https://api.anthropic.com/v1/oauth/token")
    e = OAuthEndpoints.from_config(provider)
    assert e.token_url == "https://api.anthropic.com/v1/oauth/token"
    assert e.scopes == OAuthEndpoints().scopes


def test_authorize_url_carries_every_parameter():
    """The authorize URL has code=true, client, response type, redirect, scopes, S256 challenge, state."""
    e = OAuthEndpoints()
    url = oauth.authorize_url(e, "CHALLENGE", "STATE")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == e.authorize_url
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q == {"code": "true", "client_id": e.client_id, "response_type": "code",
                 "redirect_uri": e.redirect_uri, "scope": " ".join(e.scopes),
                 "code_challenge": "CHALLENGE", "code_challenge_method": "S256", "state": "STATE"}


# --- pasted codes -------------------------------------------------------------------------------------


def test_pasted_code_hash_state():
    """``code#state`` (with stray whitespace) gives the code when the state matches."""
    assert oauth.parse_pasted_code("  abc123#st-1 \n", "st-1") == "abc123"


def test_pasted_callback_url():
    """A full callback URL with ?code=&state= is accepted too."""
    url = "https://platform.claude.com/oauth/code/callback?code=abc123&state=st-1"
    assert oauth.parse_pasted_code(url, "st-1") == "abc123"


def test_pasted_callback_url_wrong_state():
    """A callback URL whose state is not ours is refused."""
    url = "https://platform.claude.com/oauth/code/callback?code=abc123&state=other"
    with pytest.raises(OAuthStateMismatch):
        oauth.parse_pasted_code(url, "st-1")


def test_pasted_code_wrong_state():
    """A code pasted with another login's state raises OAuthStateMismatch."""
    with pytest.raises(OAuthStateMismatch):
        oauth.parse_pasted_code("abc123#someone-else", "st-1")


def test_pasted_code_missing_state():
    """A bare code without ``#state`` raises OAuthStateMismatch, as does an empty state."""
    with pytest.raises(OAuthStateMismatch):
        oauth.parse_pasted_code("abc123", "st-1")
    with pytest.raises(OAuthStateMismatch):
        oauth.parse_pasted_code("abc123#", "st-1")


def test_pasted_nothing_or_denied():
    """Empty input, and a callback URL reporting an error, raise OAuthPasteError."""
    with pytest.raises(OAuthPasteError):
        oauth.parse_pasted_code("   ", "st-1")
    with pytest.raises(OAuthPasteError) as info:
        oauth.parse_pasted_code("https://x.example/cb?error=access_denied&state=st-1", "st-1")
    assert "access_denied" in str(info.value)


# --- the token endpoint over real loopback --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_exchange_code_against_fake(fake, http):
    """A PKCE code exchange returns tokens, expiry, email and organization."""
    pair = oauth.new_pkce()
    code = fake.issue_code(pair.challenge, "st-1")
    tokens = await oauth.exchange_code(http, fake.endpoints(), code, pair.verifier, "st-1")
    assert tokens.access_token.startswith("sk-ant-oat01-")
    assert tokens.refresh_token.startswith("sk-ant-ort01-")
    assert tokens.expires_in == 28800
    assert tokens.email == "user@example.com"
    assert tokens.org_id == "org-0001" and tokens.org_name == "Example Org"
    assert fake.calls["authorization_code"] == 1
    assert tokens.access_token not in repr(tokens) and tokens.refresh_token not in repr(tokens)


@pytest_twisted.ensureDeferred
async def test_exchange_with_wrong_verifier_is_invalid_grant(fake, http):
    """The fake checks code_verifier against the registered challenge: a wrong one is invalid_grant."""
    pair = oauth.new_pkce()
    code = fake.issue_code(pair.challenge, "st-1")
    with pytest.raises(InvalidGrant):
        await oauth.exchange_code(http, fake.endpoints(), code, oauth.make_verifier(), "st-1")


@pytest_twisted.ensureDeferred
async def test_code_is_single_use(fake, http):
    """A code exchanged once cannot be exchanged again."""
    pair = oauth.new_pkce()
    code = fake.issue_code(pair.challenge, "st-1")
    await oauth.exchange_code(http, fake.endpoints(), code, pair.verifier, "st-1")
    with pytest.raises(InvalidGrant):
        await oauth.exchange_code(http, fake.endpoints(), code, pair.verifier, "st-1")


@pytest_twisted.ensureDeferred
async def test_refresh_rotates_and_burns_the_old_token(fake, http):
    """A refresh returns a new pair; the spent refresh token then gets a typed InvalidGrant."""
    seeded = fake.seed_tokens()
    tokens = await oauth.refresh_tokens(http, fake.endpoints(), seeded.refresh_token)
    assert tokens.refresh_token != seeded.refresh_token
    assert fake.is_live_access_token(tokens.access_token)
    assert tokens.email == "user@example.com"
    with pytest.raises(InvalidGrant) as info:
        await oauth.refresh_tokens(http, fake.endpoints(), seeded.refresh_token)
    assert info.value.status == 400 and info.value.error_code == "invalid_grant"
    assert fake.invalid_grants == 1
    # the rotated token still works
    again = await oauth.refresh_tokens(http, fake.endpoints(), tokens.refresh_token)
    assert again.access_token != tokens.access_token


@pytest_twisted.ensureDeferred
async def test_server_error_is_oauth_http_error(fake, http):
    """A 500 from the token endpoint is OAuthHTTPError with status and error code, not InvalidGrant."""
    seeded = fake.seed_tokens()
    fake.fail_next(503, {"error": "temporarily_unavailable"})
    with pytest.raises(OAuthHTTPError) as info:
        await oauth.refresh_tokens(http, fake.endpoints(), seeded.refresh_token)
    assert not isinstance(info.value, InvalidGrant)
    assert (info.value.status, info.value.error_code) == (503, "temporarily_unavailable")


@pytest_twisted.ensureDeferred
async def test_unreachable_endpoint_is_network_error(http):
    """A refused connection is OAuthNetworkError, and its message holds no token."""
    from twisted.internet import reactor
    _server, port, url = listen_fake_oauth(reactor)
    await port.stopListening()
    cfg = OAuthEndpoints(token_url=url + "/v1/oauth/token")
    secret = "sk-ant-ort01-" + "s" * 40
    with pytest.raises(OAuthNetworkError) as info:
        await oauth.refresh_tokens(http, cfg, secret)
    assert secret not in str(info.value) and secret not in repr(info.value)


@pytest_twisted.ensureDeferred
async def test_create_api_key_with_bearer(fake, http):
    """The API-key endpoint mints a key for a live access token and refuses a dead one."""
    seeded = fake.seed_tokens()
    key = await oauth.create_api_key(http, fake.create_api_key_url, seeded.access_token)
    assert key.startswith("sk-ant-api03-")
    with pytest.raises(OAuthHTTPError) as info:
        await oauth.create_api_key(http, fake.create_api_key_url, "sk-ant-oat01-dead")
    assert info.value.status == 401


def test_errors_never_carry_a_token():
    """Error messages and reprs contain status and code only."""
    errors = [InvalidGrant(), OAuthHTTPError(500, "server_error"), OAuthNetworkError("h", "Timeout"),
              OAuthStateMismatch("x")]
    for error in errors:
        assert not TOKEN_RE.search(str(error)) and not TOKEN_RE.search(repr(error))
    # an error code that is not a plain code (could echo input) is dropped
    assert oauth._error_code(b'{"error": "sk-ant-ort01-abcdefghijkl with spaces"}') is None


def test_mask_token_shows_family_and_last_four():
    """mask_token keeps the sk-ant-xxx01- family and the last 4 characters only."""
    assert oauth.mask_token("sk-ant-oat01-abcdefghijklmnopqrstuvwxyz") == "sk-ant-oat01-…wxyz"
    assert oauth.mask_token(None) == "(none)"
