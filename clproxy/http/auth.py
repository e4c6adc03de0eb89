"""Client authentication for the daemon's routes: the one place that decides who may use ``/v1/*``
and who may read ``/status`` and ``/metrics``.

:class:`ClientAuth` reads the presented key (``x-api-key`` or ``Authorization: Bearer``) and checks
it against the live :class:`clproxy.team.keys.KeyRing` (constant time, :meth:`KeyRing.verify`).
:class:`Guarded` wraps a resource so that traversal and rendering stop at the check; an accepted
request carries its key record as ``request.client_key`` (the handlers copy it onto the
``ProxyRequest``). Refusals never repeat the presented key, not even a part of it.

**DNS rebinding.** A loopback daemon without keys is open to its own machine, and a web page the
browser fetched from a name its owner then points at 127.0.0.1 is "its own machine" too, unless the
``Host`` header is looked at: while the daemon is open because it is on loopback, a request whose
``Host`` names anything but ``localhost``, ``127.0.0.1``, ``[::1]`` or the bound host (any port)
gets 421 (:func:`misdirected`), ``server.allowUnauthenticated`` or not (it is about non-loopback
binds). A request without ``Host`` (HTTP/1.0) is let through; with keys the key decides and
``Host`` does not matter, nor on a non-loopback bind (open only when allowed, to whoever reaches it).
"""

import time
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.web import resource

from clproxy.errors import ProxyError
from clproxy.team.keys import KeyRing, extract_client_key
from clproxy.team.limits import is_loopback

INVALID_KEY = ("invalid or missing clproxy client key: send it in x-api-key or "
               "Authorization: Bearer (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)")
NEED_ADMIN = "this endpoint needs an admin client key (clproxy keys create NAME --admin)"
NO_KEYS = ("clproxy listens on a non-loopback address and has no client key: run `clproxy keys create "
           "NAME` (or set server.allowUnauthenticated: true)")
MISDIRECTED = ("clproxy has no client key and answers only requests addressed to localhost, 127.0.0.1 "
               "or [::1]: this Host header names another site (create a client key to serve it)")
#: the names a local client reaches a loopback daemon by (IPv6 without its brackets)
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: str) -> str:
    """The name of a ``Host`` header value, lower-cased, without port, brackets or a final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


#: (Host value, bound host) -> whether it names another site: asked on every request of an open
#: loopback daemon, where the same one or two values come each time (bounded: a client sending
#: ever new values only empties it)
_FOREIGN_HOSTS: Dict[Tuple[bytes, str], bool] = {}
_FOREIGN_HOSTS_SIZE = 256


def _foreign(value: bytes, bound_host: str) -> bool:
    key = (value, bound_host)
    verdict = _FOREIGN_HOSTS.get(key)
    if verdict is None:
        verdict = host_name(value.decode("latin-1")) not in LOCAL_NAMES | {host_name(bound_host)}
        if len(_FOREIGN_HOSTS) >= _FOREIGN_HOSTS_SIZE:
            _FOREIGN_HOSTS.clear()
        _FOREIGN_HOSTS[key] = verdict
    return verdict


def misdirected(request, bound_host: str) -> bool:
    """Whether ``request`` carries a ``Host`` naming neither a local name nor ``bound_host``: a page
    of another site reaching the daemon through DNS rebinding. No ``Host`` at all is not."""
    for value in request.requestHeaders.getRawHeaders(b"host") or ():
        if _foreign(value, bound_host):
            return True
    return False


class ClientAuth:
    """Who may pass. ``host`` is the bound interface; ``allow_unauthenticated()`` reads the config in
    force. Without any key the relay is open only on loopback or when allowed: revoking the last key
    of a team server must not turn it into an open relay.

    ``last_used`` is the dict an accepted key's name is stamped into (``now()``), the daemon's
    :attr:`clproxy.team.keystore.LastUseRecorder.times`: one assignment per request, no I/O."""

    def __init__(self, ring: KeyRing, host: str = "127.0.0.1",
                 allow_unauthenticated: Callable[[], bool] = lambda: False,
                 last_used: Optional[Dict[str, float]] = None, now: Callable[[], float] = time.time):
        self.ring = ring
        self.host = host
        self.allow_unauthenticated = allow_unauthenticated
        self.last_used = last_used if last_used is not None else {}
        self.now = now

    def _keyless(self, request) -> Optional[ProxyError]:
        """With no key at all: None when the daemon is open to ``request``, else the refusal (401
        off loopback, 421 for a foreign ``Host`` on loopback)."""
        if not is_loopback(self.host):
            return None if self.allow_unauthenticated() else ProxyError(401, NO_KEYS, "authentication_error")
        if misdirected(request, self.host):
            return ProxyError(421, MISDIRECTED, "invalid_request_error")
        return None

    def client(self, request) -> Optional[ProxyError]:
        """None when ``request`` may use ``/v1/*`` (its record set as ``request.client_key``), else
        the 401 (or 421) to answer."""
        request.client_key = None
        if self.ring.empty:
            return self._keyless(request)
        record = self.ring.verify(extract_client_key(request.requestHeaders))
        if record is None:
            return ProxyError(401, INVALID_KEY, "authentication_error")
        request.client_key = record
        self.last_used[record.name] = self.now()
        return None

    def admin(self, request) -> Optional[ProxyError]:
        """None when ``request`` may read ``/status`` or ``/metrics``. Without any key they are open
        exactly where ``/v1`` is (loopback, or allowed): a public daemon whose last key was revoked
        must not show its pool to anyone who asks."""
        if self.ring.empty:
            return self._keyless(request)
        record = self.ring.verify(extract_client_key(request.requestHeaders))
        if record is None or not record.admin:
            return ProxyError(401, NEED_ADMIN, "authentication_error")
        self.last_used[record.name] = self.now()
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
