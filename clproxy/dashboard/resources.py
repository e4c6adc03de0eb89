"""The dashboard's routes, under ``/dashboard``::

    /dashboard, /dashboard/        GET   the page (no data in it; open to all, it shows a login form)
    /dashboard/app.js, style.css,  GET   its assets, package data read once at start
      favicon.svg
    /dashboard/whoami              GET   {"authenticated", "open", "loginPossible", "session"}
    /dashboard/state               GET   the whole document once (see clproxy.dashboard.feed)
    /dashboard/events              GET   the live feed (server-sent events)
    /dashboard/login               POST  {"key": ...} -> a session cookie
    /dashboard/logout              POST  ends the session

Every answer carries the security headers (:data:`SECURITY_HEADERS`): a Content-Security-Policy
without inline script or style, ``X-Frame-Options: DENY``, no referrer, no sniffing; there is no
CORS header anywhere (same origin only). ``state`` and ``events`` need what
:class:`clproxy.dashboard.access.DashboardAccess` accepts. Login and logout, the only calls that
change anything, need the header ``X-Clproxy-Dashboard: 1`` (a cross-site form cannot send one) and
refuse a foreign ``Origin``. A page loaded with a valid admin ``Authorization: Bearer`` also gets a
session cookie, so its live feed (which a browser opens without that header) is let in too.
"""

import json
import math
from importlib import resources as package_data
from typing import Dict, Optional, Tuple

from twisted.web import resource

from clproxy.dashboard.access import DashboardAccess, session_cookie
from clproxy.dashboard.feed import DashboardFeed
from clproxy.errors import ProxyError
from clproxy.http.auth import MISDIRECTED
from clproxy.http.site import ErrorResource, Node, answer_later, not_found, write_error, write_json
from clproxy.observe import console

log = console.logger(__name__)

CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = (
    (b"content-security-policy", CSP),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)
#: the header login and logout need: a cross-site form or a simple request cannot carry it
CSRF_HEADER = b"x-clproxy-dashboard"
MAX_LOGIN_BODY = 4096
ASSETS = {
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"style.css": ("style.css", b"text/css; charset=utf-8"),
    b"favicon.svg": ("favicon.svg", b"image/svg+xml"),
}
PAGE = ("index.html", b"text/html; charset=utf-8")
NEED_LOGIN = "log in with an admin client key to see the dashboard"


def read_asset(name: str) -> bytes:
    """One file of ``clproxy/dashboard/static`` (package data)."""
    return package_data.files("clproxy.dashboard").joinpath("static", name).read_bytes()


def secure(request) -> None:
    """Set :data:`SECURITY_HEADERS` on ``request``'s answer."""
    for name, value in SECURITY_HEADERS:
        request.responseHeaders.setRawHeaders(name, [value])


class _Asset(Node):
    """A file of the page, served from memory."""

    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, body: bytes, content_type: bytes):
        super().__init__()
        self.body, self.content_type = body, content_type

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return write_error(request, ProxyError(404, "clproxy does not serve that path"))
        request.responseHeaders.setRawHeaders(b"content-type", [self.content_type])
        return self.body


class _Page(_Asset):
    """The page. A browser told to send an admin key in its headers (an extension, a test driver)
    also gets a session cookie, so the page's own requests, which cannot add that header, are let
    in as well."""

    def __init__(self, body: bytes, content_type: bytes, access: DashboardAccess):
        super().__init__(body, content_type)
        self.access = access

    def render_GET(self, request):
        key_hash = self.access.by_header(request)
        if key_hash is None:
            return super().render_GET(request)
        return answer_later(request, self._with_session(request, key_hash), "the dashboard page")

    async def _with_session(self, request, key_hash: str) -> bytes:
        access = self.access
        if await access.by_cookie(request) is None:
            token = await access.sessions.open(key_hash)
            request.responseHeaders.addRawHeader(b"set-cookie", session_cookie(token, access.sessions.ttl))
        return super().render_GET(request)


class _Protected(Node):
    """A dashboard resource that needs the viewer to be let in (:meth:`answer` once they are)."""

    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess, feed: DashboardFeed):
        super().__init__()
        self.access, self.feed = access, feed

    def render_GET(self, request):
        return answer_later(request, self._checked(request), "the dashboard")

    async def _checked(self, request) -> Optional[bytes]:
        admission = await self.access.admission(request)
        if admission is None:
            if self.access.misdirected(request):
                return write_error(request, ProxyError(421, MISDIRECTED, "invalid_request_error"))
            return write_error(request, ProxyError(401, NEED_LOGIN, "authentication_error"))
        return await self.answer(request, admission)

    async def answer(self, request, admission: str) -> Optional[bytes]:
        """The answer's body (None: the request is the resource's to finish); ``admission`` is what
        let the viewer in (:meth:`DashboardAccess.admission`)."""
        raise NotImplementedError


class _State(_Protected):
    async def answer(self, request, admission: str) -> Optional[bytes]:
        return write_json(request, await self.feed.snapshot())


class _Events(_Protected):
    async def answer(self, request, admission: str) -> Optional[bytes]:
        if request.channel is None:
            # the viewer hung up while it was being let in (a session read from a slow store):
            # a stream opened now would never see its end, and tick for nobody for ever
            return None
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"x-accel-buffering", [b"no"])
        if request.method == b"HEAD":
            # a HEAD has no body to stream into: it must not open a subscription that never ends
            return b""
        request.write(b"retry: 2000\n\n")
        # re-checked on every tick: revoking the key (or its admin right), a logout or the
        # session's expiry ends this stream too
        self.feed.subscribe(request, self.access.watch(request, admission))
        return None  # the feed writes from now on, and finishes when the daemon stops or the key goes


class _WhoAmI(Node):
    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess):
        super().__init__()
        self.access = access

    def render_GET(self, request):
        return answer_later(request, self._answer(request), "the dashboard")

    async def _answer(self, request) -> bytes:
        access = self.access
        session = await access.by_cookie(request) is not None
        return write_json(request, {"authenticated": session or await access.allowed(request),
                                    "open": access.is_open(), "loginPossible": access.login_possible(),
                                    "session": session})


def _same_origin(request) -> bool:
    """No ``Origin`` (not a browser's cross-site call), or one naming this very host."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host") or b""
    return origin in (b"http://" + host, b"https://" + host)


class _Change(Node):
    """A call that changes something (login, logout): it needs :data:`CSRF_HEADER` and no foreign
    ``Origin``."""

    isLeaf = True
    allowed = (b"POST",)

    def __init__(self, access: DashboardAccess):
        super().__init__()
        self.access = access

    def render(self, request):
        if request.method == b"POST":
            if request.getHeader(CSRF_HEADER) != b"1" or not _same_origin(request):
                return write_error(request, ProxyError(
                    403, "this call needs the dashboard's own page (same origin, X-Clproxy-Dashboard: 1)",
                    "permission_error"))
        return super().render(request)


class _Login(_Change):
    def render_POST(self, request):
        return answer_later(request, self._answer(request), "the dashboard login")

    async def _answer(self, request) -> bytes:
        body = request.content.read(MAX_LOGIN_BODY + 1) if request.content is not None else b""
        presented = _login_key(body)
        peer = getattr(request.getClientAddress(), "host", "?")
        status, message, token, wait = await self.access.login(presented, peer)
        if status == 429 and wait is not None:
            # a true wait: the oldest counted attempt leaves the window then
            request.responseHeaders.setRawHeaders(b"retry-after", [str(max(1, math.ceil(wait))).encode()])
        if token is None:
            error_type = {401: "authentication_error", 403: "permission_error",
                          429: "rate_limit_error"}.get(status, "invalid_request_error")
            log.info("dashboard login refused ({status}) from {peer}", status=status, peer=peer)
            return write_error(request, ProxyError(status, message, error_type))
        request.responseHeaders.addRawHeader(b"set-cookie", session_cookie(token, self.access.sessions.ttl))
        log.info("dashboard login from {peer}", peer=peer)
        return write_json(request, {"ok": True})


def _login_key(body: bytes) -> Optional[str]:
    if len(body) > MAX_LOGIN_BODY:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    key = parsed.get("key") if isinstance(parsed, dict) else None
    return key.strip() if isinstance(key, str) else None


class _Logout(_Change):
    def render_POST(self, request):
        return answer_later(request, self._answer(request), "the dashboard logout")

    async def _answer(self, request) -> bytes:
        await self.access.logout(request)
        request.responseHeaders.addRawHeader(b"set-cookie", session_cookie("", 0))
        return write_json(request, {"ok": True})


def load_assets(read=read_asset) -> Dict[bytes, Tuple[bytes, bytes]]:
    """Every file of the page by URL path (``b""`` is the page): ``{path: (body, content type)}``.
    Raises OSError when one is missing (a broken install)."""
    name, kind = PAGE
    files = {b"": (read(name), kind)}
    for path, (file_name, kind) in ASSETS.items():
        files[path] = (read(file_name), kind)
    return files


class DashboardRoot(Node):
    """``/dashboard`` and everything under it (see the module docstring).

    The page's files are read once, here. Without them (a broken install) the proxy still serves
    and ``/dashboard`` answers 503 saying what is missing: a dashboard must never stop the relay.
    """

    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess, feed: DashboardFeed, read=read_asset):
        super().__init__()
        self.access = access
        self.page: resource.Resource
        try:
            files = load_assets(read)
        except OSError as e:
            log.error("the dashboard's files are missing ({why}): /dashboard answers 503 until clproxy "
                      "is reinstalled", why=e.strerror or e)
            self.page = ErrorResource(ProxyError(503, "the dashboard's files are not installed; reinstall "
                                                      "clproxy", "api_error"))
            for path in ASSETS:
                self.putChild(path, self.page)
        else:
            body, kind = files.pop(b"")
            self.page = _Page(body, kind, access)
            for path, (body, kind) in files.items():
                self.putChild(path, _Asset(body, kind))
        self.putChild(b"whoami", _WhoAmI(access))
        self.putChild(b"state", _State(access, feed))
        self.putChild(b"events", _Events(access, feed))
        self.putChild(b"login", _Login(access))
        self.putChild(b"logout", _Logout(access))

    def getChildWithDefault(self, path, request):
        secure(request)
        if path == b"" and not request.postpath:
            return self.page
        if path in self.children:
            return self.children[path]
        return not_found(request)

    def render_GET(self, request):
        secure(request)
        return self.page.render(request)
