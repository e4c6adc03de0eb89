"""Anthropic's OAuth protocol as Claude Code uses it: PKCE, the authorize URL, code exchange, refresh.

Every call takes a treq ``HTTPClient`` and the endpoints; errors are typed and never carry a token
(not in ``str``, not in ``repr``, not in a log line).
"""

import base64
import hashlib
import hmac
import json
import re
import secrets
from typing import Any, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlencode, urlsplit

import attr
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

import clproxy

log = Logger()

DEFAULT_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
DEFAULT_AUTHORIZE_URL = "https://claude.ai/oauth/authorize"
DEFAULT_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
DEFAULT_REDIRECT_URI = "https://platform.claude.com/oauth/code/callback"
DEFAULT_SCOPES = ("org:create_api_key", "user:profile", "user:inference",
                  "user:sessions:claude_code", "user:mcp_servers", "user:file_upload")
DEFAULT_CREATE_API_KEY_URL = "https://api.anthropic.com/api/oauth/claude_cli/create_api_key"
#: Seconds one token-endpoint call may take, answer body included; a caller holding the store lock
#: waits this long at most.
DEFAULT_TIMEOUT = 30.0

_USER_AGENT = f"clproxy/{clproxy.__version__}".encode("ascii")
_ERROR_CODE = re.compile(r"[a-z0-9_.:-]{1,64}\Z")


# --- errors ---------------------------------------------------------------------------------------


class OAuthError(Exception):
    """Base of every OAuth failure; the message is safe to print (it never holds a token)."""


class OAuthPasteError(OAuthError):
    """The text pasted back from the browser is not an authorization code."""


class OAuthStateMismatch(OAuthPasteError):
    """The pasted code's state is missing or is not the one this login generated."""


class OAuthHTTPError(OAuthError):
    """The endpoint answered with an error: ``status`` and the OAuth ``error`` code when it gave one."""

    def __init__(self, status: int, error_code: Optional[str] = None, endpoint: str = "token endpoint"):
        self.status = status
        self.error_code = error_code
        self.endpoint = endpoint
        detail = f" ({error_code})" if error_code else ""
        super().__init__(f"{endpoint} answered HTTP {status}{detail}")


class InvalidGrant(OAuthHTTPError):
    """400 ``invalid_grant``: the refresh token (or authorization code) is dead; log in again."""

    def __init__(self, status: int = 400, error_code: str = "invalid_grant",
                 endpoint: str = "token endpoint"):
        super().__init__(status, error_code, endpoint)


class OAuthNetworkError(OAuthError):
    """The endpoint could not be reached, or the connection failed or timed out."""

    def __init__(self, host: str, reason: str):
        self.host = host
        self.reason = reason
        super().__init__(f"network error talking to {host}: {reason}")


# --- configuration --------------------------------------------------------------------------------


def _scopes(value: Any) -> Tuple[str, ...]:
    if value is None:
        return DEFAULT_SCOPES
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(str(s) for s in value)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class OAuthEndpoints:
    """Where and as whom to run the OAuth flows (defaults: Claude Code's public client)."""

    token_url: str = DEFAULT_TOKEN_URL
    authorize_url: str = DEFAULT_AUTHORIZE_URL
    client_id: str = DEFAULT_CLIENT_ID
    redirect_uri: str = DEFAULT_REDIRECT_URI
    scopes: Tuple[str, ...] = attr.ib(default=DEFAULT_SCOPES, converter=_scopes)

    @classmethod
    def from_config(cls, providers_anthropic: Any) -> "OAuthEndpoints":
        """From an object with ``oauth_token_url``, ``authorize_url``, ``client_id``, ``redirect_uri``,
        ``scopes`` (``config.providers.anthropic``); a missing or empty attribute keeps the default."""
        default = cls()

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(providers_anthropic, name, None)
            return value if value else fallback

        return cls(token_url=pick("oauth_token_url", default.token_url),
                   authorize_url=pick("authorize_url", default.authorize_url),
                   client_id=pick("client_id", default.client_id),
                   redirect_uri=pick("redirect_uri", default.redirect_uri),
                   scopes=pick("scopes", default.scopes))


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class TokenSet:
    """What the token endpoint returned. Tokens never appear in ``repr``.

    ``refresh_token`` is ``None`` when the endpoint did not rotate it (then the old one stays valid).
    """

    access_token: str = attr.ib(repr=False)
    refresh_token: Optional[str] = attr.ib(default=None, repr=False)
    expires_in: Optional[float] = None
    token_type: Optional[str] = None
    email: Optional[str] = None
    account_uuid: Optional[str] = None
    org_id: Optional[str] = None
    org_name: Optional[str] = None
    scopes: Tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class PKCE:
    """A PKCE pair: keep ``verifier`` secret until the exchange, send ``challenge`` in the URL."""

    verifier: str = attr.ib(repr=False)
    challenge: str


# --- PKCE, state, the authorize URL, the pasted code -----------------------------------------------


def make_verifier(nbytes: int = 48) -> str:
    """A code verifier from ``secrets``: base64url of ``nbytes`` random bytes (48 -> 64 characters)."""
    verifier = secrets.token_urlsafe(nbytes)
    if not 43 <= len(verifier) <= 128:
        raise ValueError("a PKCE verifier must be 43 to 128 characters")
    return verifier


def code_challenge(verifier: str) -> str:
    """The S256 challenge: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> PKCE:
    """A fresh verifier and its S256 challenge."""
    verifier = make_verifier()
    return PKCE(verifier, code_challenge(verifier))


def new_state() -> str:
    """An unguessable ``state`` value for one login."""
    return secrets.token_urlsafe(32)


def authorize_url(cfg: Any, challenge: str, state: str) -> str:
    """The URL the user opens to sign in and get a code to paste back (``code=true``: paste-back flow)."""
    params = [
        ("code", "true"),
        ("client_id", cfg.client_id),
        ("response_type", "code"),
        ("redirect_uri", cfg.redirect_uri),
        ("scope", " ".join(cfg.scopes)),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
        ("state", state),
    ]
    base = cfg.authorize_url
    return base + ("&" if "?" in base else "?") + urlencode(params)


def parse_pasted_code(text: str, expected_state: str) -> str:
    """The authorization code in what the user pasted: ``code#state`` or the whole callback URL.

    Raises :class:`OAuthStateMismatch` when the state is missing or wrong (a code from another login,
    or a forged one), :class:`OAuthPasteError` when there is no code at all.
    """
    text = (text or "").strip()
    if not text:
        raise OAuthPasteError("nothing was pasted: paste the code shown after signing in (code#state)")
    if "://" in text or text.startswith("/"):
        parts = urlsplit(text)
        query = parse_qs(parts.query)
        # Some callback pages put the parameters in the fragment instead.
        fragment = parse_qs(parts.fragment) if "=" in parts.fragment else {}
        if "error" in query or "error" in fragment:
            error = (query.get("error") or fragment.get("error"))[0]
            safe = error if _ERROR_CODE.match(error) else "error"
            raise OAuthPasteError(f"sign-in did not complete ({safe})")
        codes = query.get("code") or fragment.get("code")
        states = query.get("state") or fragment.get("state")
        if not codes:
            raise OAuthPasteError("the pasted URL has no code parameter")
        code = codes[0]
        state = states[0] if states else ""
        if not state and "#" in code:
            code, _, state = code.partition("#")
    else:
        code, sep, state = text.partition("#")
        if not sep:
            raise OAuthStateMismatch("the pasted code has no state: paste the whole code#state value")
    code = code.strip()
    state = state.strip()
    if not code:
        raise OAuthPasteError("the pasted text has no code before '#'")
    if not state:
        raise OAuthStateMismatch("the pasted code has no state: paste the whole code#state value")
    if not hmac.compare_digest(state.encode("utf-8"), expected_state.encode("utf-8")):
        raise OAuthStateMismatch("the pasted code belongs to another login (state mismatch): "
                                 "start the login again and use the new URL")
    return code


# --- talking to the token endpoint ------------------------------------------------------------------


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc or url
    except ValueError:
        return "the endpoint"


def _error_code(body: bytes) -> Optional[str]:
    """The OAuth ``error`` member of a JSON error body, if it is a plain code (never free text)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):  # Anthropic-shaped {"error": {"type": ...}}
        error = error.get("type")
    if isinstance(error, str) and _ERROR_CODE.match(error):
        return error
    return None


class _BodyReader(Protocol):
    """Collects a response body into :attr:`finished`. Cancelling ``finished`` drops the connection:
    a body that stalls would otherwise keep its socket open for as long as the server likes."""

    def __init__(self) -> None:
        self._chunks: list = []
        self.finished: Deferred = Deferred(self._abandon)

    def _abandon(self, _finished: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.finished.called:  # given up on (cancelled) already
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


async def _exchange(http_client: Any, url: str, payload: bytes, headers: Any,
                    timeout: float) -> Tuple[int, bytes]:
    """POST ``payload`` and read the whole answer: status and body."""
    response = await http_client.post(url, data=payload, headers=headers, timeout=timeout)
    reader = _BodyReader()
    response.deliverBody(reader)
    content = await reader.finished
    return response.code, content


async def _post_json(http_client: Any, url: str, body: Mapping[str, Any], *, endpoint: str,
                     bearer: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                     clock: Any = None) -> Tuple[int, bytes]:
    """POST ``body`` as JSON; the answer's status and body, all of it within ``timeout`` seconds on
    ``clock`` (default: the reactor). treq's own ``timeout`` ends at the response headers: a body
    that stalls after them would hold the caller (and the token store lock) for ever."""
    headers = {b"content-type": [b"application/json"], b"accept": [b"application/json"],
               b"user-agent": [_USER_AGENT]}
    if bearer is not None:
        headers[b"authorization"] = [b"Bearer " + bearer.encode("utf-8")]
    payload = json.dumps(dict(body)).encode("utf-8")
    if clock is None:
        from twisted.internet import reactor
        clock = reactor
    exchange = Deferred.fromCoroutine(_exchange(http_client, url, payload, headers, timeout))
    exchange.addTimeout(timeout, clock)  # cancels the post or the body read, whichever is waited on
    try:
        return await exchange
    except Exception as e:  # any failure to get an answer (the deadline's TimeoutError too) is a network failure
        # Only the exception's class: some carry the request, and the request carries a token.
        raise OAuthNetworkError(_host(url), type(e).__name__) from None


def _parse_token_response(status: int, content: bytes, endpoint: str) -> TokenSet:
    if status >= 400:
        code = _error_code(content)
        if status == 400 and code == "invalid_grant":
            raise InvalidGrant(status, code, endpoint)
        raise OAuthHTTPError(status, code, endpoint)
    if status != 200:
        raise OAuthHTTPError(status, None, endpoint)
    try:
        data = json.loads(content.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise OAuthHTTPError(status, "malformed_response", endpoint) from None
    if not isinstance(data, dict):
        raise OAuthHTTPError(status, "malformed_response", endpoint)
    access = data.get("access_token")
    refresh = data.get("refresh_token")
    if not isinstance(access, str) or not access:
        raise OAuthHTTPError(status, "malformed_response", endpoint)
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise OAuthHTTPError(status, "malformed_response", endpoint)
    expires_in = data.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
        expires_in = None
    account = data.get("account") if isinstance(data.get("account"), dict) else {}
    org = data.get("organization") if isinstance(data.get("organization"), dict) else {}
    scope = data.get("scope")

    def text(value: Any) -> Optional[str]:
        return value if isinstance(value, str) and value else None

    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        expires_in=float(expires_in) if expires_in is not None else None,
        token_type=text(data.get("token_type")),
        email=text(account.get("email_address")),
        account_uuid=text(account.get("uuid")),
        org_id=text(org.get("uuid")),
        org_name=text(org.get("name")),
        scopes=tuple(scope.split()) if isinstance(scope, str) else (),
    )


async def exchange_code(http_client: Any, cfg: Any, code: str, verifier: str, state: str,
                        *, timeout: float = DEFAULT_TIMEOUT, clock: Any = None) -> TokenSet:
    """Trade an authorization code (with its PKCE verifier) for tokens (within ``timeout`` seconds
    on ``clock``, default the reactor)."""
    body = {"grant_type": "authorization_code", "code": code, "redirect_uri": cfg.redirect_uri,
            "client_id": cfg.client_id, "code_verifier": verifier, "state": state}
    status, content = await _post_json(http_client, cfg.token_url, body, endpoint="token endpoint",
                                       timeout=timeout, clock=clock)
    tokens = _parse_token_response(status, content, "token endpoint")
    log.info("oauth: code exchanged ({host})", host=_host(cfg.token_url))
    return tokens


async def refresh_tokens(http_client: Any, cfg: Any, refresh_token: str,
                         *, timeout: float = DEFAULT_TIMEOUT, clock: Any = None) -> TokenSet:
    """Burn ``refresh_token`` for a new pair. The caller must persist the result before using it.
    The whole call (answer body included) ends within ``timeout`` seconds on ``clock`` (default
    the reactor): :class:`OAuthNetworkError` then."""
    body = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": cfg.client_id}
    status, content = await _post_json(http_client, cfg.token_url, body, endpoint="token endpoint",
                                       timeout=timeout, clock=clock)
    return _parse_token_response(status, content, "token endpoint")


async def create_api_key(http_client: Any, url: str, access_token: str,
                         *, timeout: float = DEFAULT_TIMEOUT, clock: Any = None) -> str:
    """Have Anthropic mint an API key for the signed-in subscription (``org:create_api_key`` scope)."""
    status, content = await _post_json(http_client, url, {}, endpoint="API key endpoint",
                                       bearer=access_token, timeout=timeout, clock=clock)
    if status >= 300:
        raise OAuthHTTPError(status, _error_code(content), "API key endpoint")
    try:
        data = json.loads(content.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise OAuthHTTPError(status, "malformed_response", "API key endpoint") from None
    key = None
    if isinstance(data, dict):
        key = data.get("raw_key") or data.get("api_key") or data.get("key")
    if not isinstance(key, str) or not key:
        raise OAuthHTTPError(status, "malformed_response", "API key endpoint")
    return key


def mask_token(token: Optional[str]) -> str:
    """A token shown safely: its family prefix and last four characters (``sk-ant-oat01-…abcd``)."""
    if not token:
        return "(none)"
    match = re.match(r"(sk-ant-[a-z]+\d*-)", token)
    prefix = match.group(1) if match else ""
    tail = token[-4:] if len(token) > 12 else ""
    return f"{prefix}…{tail}"
