"""The dashboard's routes, under ``/dashboard``::

    /dashboard, /dashboard/        GET   the page (no data in it; open to all, it shows a login form)
    /dashboard/app.js, style.css,  GET   its assets, package data read once at start
      favicon.svg
    /dashboard/whoami              GET   {"authenticated", "open", "loginPossible"}
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
from importlib import resources as package_data
from typing import Dict, Optional, Tuple

from twisted.internet import defer
from twisted.web import server

from clproxy.dashboard.access import DashboardAccess, session_cookie
from clproxy.dashboard.feed import DashboardFeed
from clproxy.errors import ProxyError
from clproxy.http.site import Node, not_found, write_error, write_json
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

    def __init__(self, body: bytes, content_type: bytes, access: Optional[DashboardAccess] = None):
        super().__init__()
        self.body, self.content_type, self.access = body, content_type, access

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return write_error(request, ProxyError(404, "clproxy does not serve that path"))
        self._cookie_for_bearer(request)
        request.responseHeaders.setRawHeaders(b"content-type", [self.content_type])
        return self.body

    def _cookie_for_bearer(self, request) -> None:
        # a browser told to send an admin key (an extension, a test driver) gets a session, so the
        # page's own requests, which cannot add that header, are let in as well
        access = self.access
        if access is None:
            return
        key_hash = access.by_header(request)
        if key_hash is None or access.by_cookie(request) is not None:
            return
        token = access.sessions.open(key_hash)
        request.responseHeaders.addRawHeader(b"set-cookie", session_cookie(token, access.sessions.ttl))


class _Protected(Node):
    """A dashboard resource that needs the viewer to be let in."""

    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess, feed: DashboardFeed):
        super().__init__()
        self.access, self.feed = access, feed

    def render(self, request):
        if not self.access.allowed(request):
            return write_error(request, ProxyError(401, NEED_LOGIN, "authentication_error"))
        return super().render(request)


class _State(_Protected):
    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(document):
            if not gone:
                request.write(write_json(request, document))
                request.finish()

        def failed(failure):
            log.failure("the dashboard state failed", failure)
            if not gone:
                request.write(write_error(request, ProxyError(500, "the dashboard state is unavailable")))
                request.finish()

        defer.ensureDeferred(self.feed.snapshot()).addCallbacks(done, failed)
        return server.NOT_DONE_YET


class _Events(_Protected):
    def render_GET(self, request):
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
        request.responseHeaders.setRawHeaders(b"x-accel-buffering", [b"no"])
        request.write(b"retry: 2000\n\n")
        self.feed.subscribe(request)
        return server.NOT_DONE_YET


class _WhoAmI(Node):
    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess):
        super().__init__()
        self.access = access

    def render_GET(self, request):
        access = self.access
        return write_json(request, {"authenticated": access.allowed(request), "open": access.is_open(),
                                    "loginPossible": access.login_possible(),
                                    "session": access.by_cookie(request) is not None})


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
        body = request.content.read(MAX_LOGIN_BODY + 1) if request.content is not None else b""
        presented = _login_key(body)
        peer = getattr(request.getClientAddress(), "host", "?")
        status, message, token, wait = self.access.login(presented, peer)
        if status == 429:
            # a true wait: the oldest counted attempt leaves the window then
            request.responseHeaders.setRawHeaders(b"retry-after", [str(max(1, int(wait + 0.999))).encode()])
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
        self.access.logout(request)
        request.responseHeaders.addRawHeader(b"set-cookie", session_cookie("", 0))
        return write_json(request, {"ok": True})


class DashboardRoot(Node):
    """``/dashboard`` and everything under it (see the module docstring)."""

    allowed = (b"GET",)

    def __init__(self, access: DashboardAccess, feed: DashboardFeed,
                 assets: Optional[Dict[bytes, Tuple[bytes, bytes]]] = None):
        super().__init__()
        self.access = access
        name, content_type = PAGE
        self.page = _Asset(read_asset(name), content_type, access)
        files = assets if assets is not None else {
            path: (read_asset(file_name), kind) for path, (file_name, kind) in ASSETS.items()}
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
