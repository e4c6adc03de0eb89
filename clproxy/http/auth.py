"""Client authentication for the daemon's routes: the one place that decides who may use ``/v1/*``
and who may read ``/status`` and ``/metrics``.

:class:`ClientAuth` reads the presented key (``x-api-key`` or ``Authorization: Bearer``) and checks
it against the live :class:`clproxy.team.keys.KeyRing` (constant time, :meth:`KeyRing.verify`).
:class:`Guarded` wraps a resource so that traversal and rendering stop at the check; an accepted
request carries its key record as ``request.client_key`` (the handlers copy it onto the
``ProxyRequest``). Refusals never repeat the presented key, not even a part of it.
"""

from typing import Any, Callable, Optional

from twisted.web import resource

from clproxy.errors import ProxyError
from clproxy.team.keys import KeyRing, extract_client_key
from clproxy.team.limits import is_loopback

INVALID_KEY = ("invalid or missing clproxy client key: send it in x-api-key or "
               "Authorization: Bearer (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)")
NEED_ADMIN = "this endpoint needs an admin client key (clproxy keys create NAME --admin)"
NO_KEYS = ("clproxy listens on a non-loopback address and has no client key: run `clproxy keys create "
           "NAME` (or set server.allowUnauthenticated: true)")


class ClientAuth:
    """Who may pass. ``host`` is the bound interface; ``allow_unauthenticated()`` reads the config in
    force. Without any key the relay is open only on loopback or when allowed: revoking the last key
    of a team server must not turn it into an open relay."""

    def __init__(self, ring: KeyRing, host: str = "127.0.0.1",
                 allow_unauthenticated: Callable[[], bool] = lambda: False):
        self.ring = ring
        self.host = host
        self.allow_unauthenticated = allow_unauthenticated

    def client(self, request) -> Optional[ProxyError]:
        """None when ``request`` may use ``/v1/*`` (its record set as ``request.client_key``), else
        the 401 to answer."""
        request.client_key = None
        if self.ring.empty:
            if is_loopback(self.host) or self.allow_unauthenticated():
                return None
            return ProxyError(401, NO_KEYS, "authentication_error")
        record = self.ring.verify(extract_client_key(request.requestHeaders))
        if record is None:
            return ProxyError(401, INVALID_KEY, "authentication_error")
        request.client_key = record
        return None

    def admin(self, request) -> Optional[ProxyError]:
        """None when ``request`` may read ``/status`` or ``/metrics``. Without any key they are open
        exactly where ``/v1`` is (loopback, or allowed): a public daemon whose last key was revoked
        must not show its pool to anyone who asks."""
        if self.ring.empty:
            if is_loopback(self.host) or self.allow_unauthenticated():
                return None
            return ProxyError(401, NO_KEYS, "authentication_error")
        record = self.ring.verify(extract_client_key(request.requestHeaders))
        if record is None or not record.admin:
            return ProxyError(401, NEED_ADMIN, "authentication_error")
        return None


def _anthropic_error(request, error: ProxyError) -> bytes:
    from clproxy.http.site import write_error  # site imports the routes' resources; late to stay a leaf
    return write_error(request, error)


def _openai_error(request, error: ProxyError) -> bytes:
    from clproxy.http.openai import _render_error
    return _render_error(request, error.status, error.message, error.error_type)


class _Refusal(resource.Resource):
    isLeaf = True

    def __init__(self, error: ProxyError, render_error: Callable[[Any, ProxyError], bytes]):
        super().__init__()
        self.error, self.render_error = error, render_error

    def render(self, request):
        return self.render_error(request, self.error)


class Guarded(resource.Resource):
    """``wrapped`` behind ``check(request) -> Optional[ProxyError]``: a refusal is answered in the
    Anthropic shape, or the OpenAI one under ``/v1/chat``; nothing behind it runs."""

    def __init__(self, wrapped: resource.Resource, check: Callable[[Any], Optional[ProxyError]]):
        super().__init__()
        self.wrapped, self.check = wrapped, check
        # a leaf renders with its postpath intact: so must its guard
        self.isLeaf = getattr(wrapped, "isLeaf", False)
        # the route table stays readable through the guard (the same dict, not a copy)
        self.children = getattr(wrapped, "children", {})

    @staticmethod
    def _shape(request):
        openai = request.path.startswith(b"/v1/chat/") or request.path == b"/v1/chat"
        return _openai_error if openai else _anthropic_error

    def getChildWithDefault(self, path, request):
        error = self.check(request)
        if error is not None:
            return _Refusal(error, self._shape(request))
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request):
        error = self.check(request)
        if error is not None:
            return self._shape(request)(request, error)
        return self.wrapped.render(request)
