"""A fake Anthropic OAuth server for tests: PKCE code exchange, single-use rotating refresh tokens.

Like the real one, each refresh burns the refresh token it was given and hands out a new pair; a burnt
token gets 400 ``{"error": "invalid_grant"}``. It counts calls, can delay answers and fail on cue.
"""

import base64
import hashlib
import json
import secrets
from collections import Counter
from typing import Any, Dict, List, Optional, Set, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from clproxy.accounts.oauth import DEFAULT_CLIENT_ID, DEFAULT_REDIRECT_URI, DEFAULT_SCOPES, OAuthEndpoints

TOKEN_PATH = b"/v1/oauth/token"
AUTHORIZE_PATH = "/oauth/authorize"
CREATE_API_KEY_PATH = b"/api/oauth/claude_cli/create_api_key"


@attr.s(auto_attribs=True)
class _Grant:
    email: str
    org_id: str
    org_name: str


@attr.s(frozen=True, auto_attribs=True)
class TokenPair:
    """A live access/refresh pair the server issued."""

    access_token: str = attr.ib(repr=False)
    refresh_token: str = attr.ib(repr=False)
    expires_in: int = 28800


class FakeOAuthServer(Resource):
    """The token endpoint (``POST /v1/oauth/token``) and the API-key endpoint
    (``POST /api/oauth/claude_cli/create_api_key``).

    ``calls`` counts requests by kind: ``refresh``, ``authorization_code``, ``create_api_key``,
    ``invalid_grant`` (refused grants), ``fault`` (scripted failures).
    """

    isLeaf = True

    def __init__(self, clock: Any = None, *, access_ttl: int = 28800, client_id: str = DEFAULT_CLIENT_ID,
                 redirect_uri: str = DEFAULT_REDIRECT_URI, email: str = "user@example.com",
                 org_id: str = "org-0001", org_name: str = "Example Org"):
        super().__init__()
        self._clock = clock
        self.access_ttl = access_ttl
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.default_grant = _Grant(email, org_id, org_name)
        #: Seconds to hold each token-endpoint answer (the grant is processed on arrival, as a real
        #: server would: a client that gives up has still spent its refresh token).
        self.delay = 0.0
        self.calls: Counter = Counter()
        self.base_url: Optional[str] = None
        self._codes: Dict[str, Tuple[str, str, _Grant]] = {}
        self._live_refresh: Dict[str, _Grant] = {}
        self._burnt: Set[str] = set()
        self._live_access: Set[str] = set()
        self._faults: List[Tuple[int, Dict[str, Any]]] = []
        self._arrivals: List[Deferred] = []
        self._paused = False
        self._held: List[Any] = []
        self._serial = 0
        #: Grant types of token requests, in arrival order (no token values).
        self.requests: List[str] = []

    # -- what tests look at --

    @property
    def refresh_calls(self) -> int:
        return self.calls["refresh"]

    @property
    def invalid_grants(self) -> int:
        return self.calls["invalid_grant"]

    @property
    def live_refresh_tokens(self) -> frozenset:
        return frozenset(self._live_refresh)

    def is_live_access_token(self, token: str) -> bool:
        return token in self._live_access

    def is_burnt(self, refresh_token: str) -> bool:
        return refresh_token in self._burnt

    @property
    def token_url(self) -> str:
        return self._url(TOKEN_PATH.decode())

    @property
    def authorize_url(self) -> str:
        return self._url(AUTHORIZE_PATH)

    @property
    def create_api_key_url(self) -> str:
        return self._url(CREATE_API_KEY_PATH.decode())

    def endpoints(self) -> OAuthEndpoints:
        """OAuth endpoints pointing at this server (after :func:`listen_fake_oauth`)."""
        return OAuthEndpoints(token_url=self.token_url, authorize_url=self.authorize_url,
                              client_id=self.client_id, redirect_uri=self.redirect_uri,
                              scopes=DEFAULT_SCOPES)

    def _url(self, path: str) -> str:
        if self.base_url is None:
            raise RuntimeError("the fake OAuth server is not listening (use listen_fake_oauth)")
        return self.base_url + path

    # -- scripting --

    def issue_code(self, challenge: str, state: str, *, email: Optional[str] = None) -> str:
        """Play the browser: sign in for a PKCE ``challenge`` and return the one-time code."""
        code = "code-" + secrets.token_urlsafe(16)
        grant = attr.evolve(self.default_grant, email=email or self.default_grant.email)
        self._codes[code] = (challenge, state, grant)
        return code

    def seed_tokens(self, *, email: Optional[str] = None) -> TokenPair:
        """A live pair as if someone had logged in already (to seed a store)."""
        grant = attr.evolve(self.default_grant, email=email or self.default_grant.email)
        return self._mint(grant)

    def fail_next(self, status: int = 500, body: Optional[Dict[str, Any]] = None, times: int = 1) -> None:
        """Answer the next ``times`` token requests with ``status`` and ``body`` (grants untouched)."""
        for _ in range(times):
            self._faults.append((status, body if body is not None else {"error": "server_error"}))

    def revoke(self, access_token: str) -> None:
        """Revoke an access token the server issued (its refresh token stays live), as the real server
        does when it invalidates a session: ``is_live_access_token`` is then false for it."""
        self._live_access.discard(access_token)

    def pause(self) -> None:
        """Hold every token-endpoint answer (the grant is still processed on arrival) until :meth:`resume`."""
        self._paused = True

    def resume(self) -> None:
        """Send the held answers and stop holding new ones."""
        self._paused = False
        held, self._held = self._held, []
        for answer in held:
            answer()

    def next_request(self) -> Deferred:
        """Fires (with the grant type) when the next token request arrives."""
        d: Deferred = Deferred()
        self._arrivals.append(d)
        return d

    def _mint(self, grant: _Grant) -> TokenPair:
        self._serial += 1
        access = f"sk-ant-oat01-fake{self._serial}-{secrets.token_urlsafe(24)}"
        refresh = f"sk-ant-ort01-fake{self._serial}-{secrets.token_urlsafe(24)}"
        self._live_refresh[refresh] = grant
        self._live_access.add(access)
        return TokenPair(access, refresh, self.access_ttl)

    # -- HTTP --

    def render_POST(self, request: Any) -> Any:
        try:
            return self._render(request)
        finally:
            # After the answer is sent or scheduled, so a test woken here can advance its clock.
            if request.path == TOKEN_PATH:
                arrivals, self._arrivals = self._arrivals, []
                for d in arrivals:
                    d.callback(self.requests[-1] if self.requests else None)

    def _render(self, request: Any) -> Any:
        if request.path == TOKEN_PATH:
            status, body = self._token(request)
        elif request.path == CREATE_API_KEY_PATH:
            status, body = self._create_api_key(request)
        else:
            status, body = 404, {"error": "not_found"}
        if request.path != TOKEN_PATH or not (self.delay or self._paused):
            return self._answer(request, status, body)
        finished: List[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def answer() -> None:
            if not finished:
                request.write(self._answer(request, status, body))
                request.finish()

        def after_delay() -> None:
            if self._paused:
                self._held.append(answer)
            else:
                answer()

        if self.delay:
            clock = self._clock
            if clock is None:
                from twisted.internet import reactor as clock
            deferLater(clock, self.delay, after_delay)
        else:
            after_delay()
        return NOT_DONE_YET

    def _answer(self, request: Any, status: int, body: Dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8")

    def _body(self, request: Any) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads(request.content.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _token(self, request: Any) -> Tuple[int, Dict[str, Any]]:
        body = self._body(request)
        grant_type = body.get("grant_type") if body else None
        self.requests.append(str(grant_type))
        if self._faults:
            self.calls["fault"] += 1
            if grant_type == "refresh_token":
                self.calls["refresh"] += 1
            return self._faults.pop(0)
        if body is None:
            return 400, {"error": "invalid_request", "error_description": "body is not a JSON object"}
        if body.get("client_id") != self.client_id:
            return 400, {"error": "invalid_client"}
        if grant_type == "refresh_token":
            self.calls["refresh"] += 1
            token = body.get("refresh_token")
            grant = self._live_refresh.pop(token, None) if isinstance(token, str) else None
            if grant is None:
                self.calls["invalid_grant"] += 1
                return 400, {"error": "invalid_grant", "error_description": "Refresh token not found or invalid"}
            self._burnt.add(token)
            return 200, self._token_body(self._mint(grant), grant)
        if grant_type == "authorization_code":
            self.calls["authorization_code"] += 1
            entry = self._codes.pop(str(body.get("code")), None)
            if entry is None:
                self.calls["invalid_grant"] += 1
                return 400, {"error": "invalid_grant", "error_description": "Invalid code"}
            challenge, state, grant = entry
            verifier = body.get("code_verifier")
            if not isinstance(verifier, str) or _s256(verifier) != challenge:
                self.calls["invalid_grant"] += 1
                return 400, {"error": "invalid_grant", "error_description": "Invalid code verifier"}
            if body.get("redirect_uri") != self.redirect_uri or body.get("state") != state:
                self.calls["invalid_grant"] += 1
                return 400, {"error": "invalid_grant", "error_description": "Invalid redirect or state"}
            return 200, self._token_body(self._mint(grant), grant)
        return 400, {"error": "unsupported_grant_type"}

    def _token_body(self, pair: TokenPair, grant: _Grant) -> Dict[str, Any]:
        return {
            "token_type": "Bearer", "access_token": pair.access_token, "refresh_token": pair.refresh_token,
            "expires_in": pair.expires_in, "scope": " ".join(DEFAULT_SCOPES),
            "organization": {"uuid": grant.org_id, "name": grant.org_name},
            "account": {"uuid": "acct-" + grant.email, "email_address": grant.email},
        }

    def _create_api_key(self, request: Any) -> Tuple[int, Dict[str, Any]]:
        self.calls["create_api_key"] += 1
        auth = request.getHeader(b"authorization") or b""
        token = auth[len(b"Bearer "):].decode("utf-8", "replace") if auth.startswith(b"Bearer ") else ""
        if token not in self._live_access:
            return 401, {"type": "error", "error": {"type": "authentication_error",
                                                    "message": "invalid bearer token"}}
        return 200, {"raw_key": "sk-ant-api03-fake-" + secrets.token_urlsafe(32)}


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def listen_fake_oauth(reactor: Any, server: Optional[FakeOAuthServer] = None,
                      **kwargs: Any) -> Tuple[FakeOAuthServer, Any, str]:
    """Serve a :class:`FakeOAuthServer` on a free 127.0.0.1 port: ``(server, port, base_url)``.

    ``kwargs`` go to the server (``clock`` defaults to ``reactor``). Stop with ``port.stopListening()``.
    """
    if server is None:
        kwargs.setdefault("clock", reactor)
        server = FakeOAuthServer(**kwargs)
    site = Site(server)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    server.base_url = f"http://127.0.0.1:{port.getHost().port}"
    return server, port, server.base_url
