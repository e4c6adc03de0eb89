"""The HTTP face of the daemon: the twisted.web resource tree, request parsing and error answers.

Routes: ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (through the dispatcher),
``GET /v1/models``, ``GET /health``, ``GET /status``. Everything else gets an Anthropic-shaped 404.
Request bodies are bounded while they arrive, so an oversized upload never fills memory.
"""

import json
import re
import time
from io import BytesIO

from clproxy import jsoncodec
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from clproxy.observe.console import logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from zope.interface import implementer

from clproxy import __version__
from clproxy.http.head import HeadChannel
from clproxy.sendnow import write_through
from clproxy.interfaces import IResponseSink
from clproxy.proxy.dispatch import SESSION_MOVES, ProxyRequest
from clproxy.observe.metrics import cache_hit_ratio
from clproxy.routing.headroom import RULE_WINDOWS, group_headrooms, quota_view
from clproxy.errors import ProxyError, error_event

log = logger(__name__)

JSON = b"application/json"


def send_anthropic_error(sink, error: ProxyError) -> None:
    """Answer ``error`` through ``sink`` (an IResponseSink) in Anthropic's shape: a whole JSON error
    with its status and headers before the answer started, an SSE ``error`` event and the end after."""
    if sink.disconnected:
        return
    if sink.started:
        sink.write(error_event(error.message, error.error_type))
        sink.finish()
        return
    sink.send(error.status, [(b"content-type", [JSON])] + [(n, [v]) for n, v in error.headers], error.body())


# twisted.web.http is a deprecation proxy module: each attribute read there is a Python call
_HTTPChannel = http.HTTPChannel
_NO_BODY_CODES = http.NO_BODY_CODES


@implementer(IResponseSink)
class ClientResponse:
    """Writes one answer to one client request; the dispatcher's only handle on the connection.

    It knows whether the client is still there, runs the current cancel callback when the client
    goes away (so the upstream request is abandoned, not leaked), and never writes after that.
    """

    def __init__(self, request: server.Request):
        self._request = request
        self.disconnected = False
        self.started = False
        #: the status sent to the client (None until the response starts)
        self.status: Optional[int] = None
        self._cancel: Optional[Callable[[], None]] = None
        #: the ChunkedBody handed out (its framing is the caller's until it is released)
        self._chunked: Optional["ChunkedBody"] = None
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, _failure) -> None:
        self.disconnected = True
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def on_disconnect(self, cancel: Callable[[], None]) -> None:
        """Call ``cancel`` if the client disconnects from now on (replaces the previous callback)."""
        self._cancel = cancel

    def start(self, status: int, headers: List[Tuple[bytes, List[bytes]]]) -> None:
        """Send the status line and headers (the response is committed from here on)."""
        if self.disconnected:
            return
        self.started = True
        self.status = status
        request = self._request
        request.setResponseCode(status)
        set_header = request.responseHeaders.setRawHeaders
        for name, values in headers:
            set_header(name, values)

    def write(self, data: bytes) -> None:
        """Write body bytes as they are (no-op after a disconnect)."""
        if self._chunked is not None:
            data = self._take_framing_back(data)
        if not self.disconnected:
            self._request.write(data)

    def finish(self) -> None:
        """End the response."""
        self._cancel = None  # often the upstream relay, which refers back here: no cycle to collect
        if self._chunked is not None:
            rest = self._take_framing_back(b"")
            if rest and not self.disconnected:
                self._request.write(rest)
        if not self.disconnected:
            self.disconnected = True  # nothing more may be written
            self._request.finish()

    def send(self, status: int, headers, body: bytes) -> None:
        """A whole response in one go, with its length."""
        if self.disconnected:
            return
        self.start(status, headers)
        if status not in _NO_BODY_CODES:  # a 204/304 has no body: a length would announce bytes never sent
            self._request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        self.write(body)
        self.finish()

    def send_error(self, error: ProxyError) -> None:
        """An Anthropic-shaped error, or an SSE error event when the response was already committed."""
        send_anthropic_error(self, error)

    def chunked_body(self) -> Optional["ChunkedBody"]:
        """The client's connection for writing chunked framing as it is, or None when this response
        does not send its body chunked (an HTTP/1.0 client, a length) or has not started writing."""
        request = self._request
        if self.disconnected or not request.startedWriting or not request.chunked or request.finished:
            return None
        transport = getattr(request.channel, "transport", None)
        if transport is None or not isinstance(request.channel, _HTTPChannel):
            return None
        self._chunked = ChunkedBody(request, transport)
        return self._chunked

    def _take_framing_back(self, data: bytes) -> bytes:
        # whatever writes after a relayed framing (an error event, an error answer from a code
        # path that knows nothing of it) gets the open chunk closed first, and framed writes
        body, self._chunked = self._chunked, None
        return body.end(data)

    def register_producer(self, producer) -> None:
        """Let the client's transport pause ``producer`` (the upstream) when it cannot keep up."""
        if not self.disconnected:
            self._request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        """Undo :meth:`register_producer` before finishing."""
        if not self.disconnected:
            self._request.unregisterProducer()


class ChunkedBody:
    """A chunked response body whose framing the caller writes itself (an upstream's own chunks,
    relayed as they came). While it is held, twisted.web's request adds no framing and no last
    chunk of its own; :meth:`release` gives the framing back (for an error event and the end)."""

    __slots__ = ("_request", "write", "closing")

    def __init__(self, request: server.Request, transport):
        self._request = request
        request.chunked = 0  # the relayed bytes carry their own chunk framing and last chunk
        #: writes bytes to the client as they are, straight to the socket when nothing is queued
        self.write = write_through(transport)
        #: set by the relayed framing's owner: ``closing(data)`` completes the chunk it left open
        #: (with the first bytes of ``data``), releases, and returns the rest of ``data``
        self.closing: Optional[Callable[[bytes], bytes]] = None

    def release(self) -> None:
        """Frame later writes again (and end with a last chunk): the relayed framing stopped at a
        chunk boundary without its last chunk."""
        self._request.chunked = 1

    def end(self, data: bytes) -> bytes:
        """Give the framing back before ``data`` is written through the request (closing the open
        chunk if the owner left one); returns what is left of ``data`` to write."""
        closing, self.closing = self.closing, None
        if closing is not None:
            return closing(data)
        self.release()
        return data


def write_error(request: server.Request, error: ProxyError) -> bytes:
    """Set status and headers for ``error`` on a plain (synchronous) render and return its body."""
    request.setResponseCode(error.status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    for name, value in error.headers:
        request.responseHeaders.setRawHeaders(name, [value])
    return error.body()


def write_json(request: server.Request, value, status: int = 200) -> bytes:
    """Set a JSON content type and return ``value`` encoded."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


#: Reason phrases twisted.web does not know (it would send "429 Unknown Status"); RFC 9110 and
#: 6585 name them, 529 is Anthropic's overloaded_error.
REASON_PHRASES = {421: b"Misdirected Request", 422: b"Unprocessable Content", 425: b"Too Early",
                  426: b"Upgrade Required", 428: b"Precondition Required", 429: b"Too Many Requests",
                  431: b"Request Header Fields Too Large", 451: b"Unavailable For Legal Reasons",
                  506: b"Variant Also Negotiates", 508: b"Loop Detected",
                  511: b"Network Authentication Required", 529: b"Overloaded"}


class ProxyHTTPRequest(server.Request):
    """A request whose body is bounded while it arrives and always kept in memory.

    twisted.web would spool large bodies to a temporary file and read any size; here a body over
    ``site.max_body_bytes`` is discarded as it streams in and answered with 413.
    """

    too_large = False
    defaultContentType = None  # our responses always say what they are
    _parts: Optional[List[bytes]] = None

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        """twisted's, with :data:`REASON_PHRASES` for the codes it has no phrase for."""
        super().setResponseCode(code, message if message is not None else REASON_PHRASES.get(code))

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        # the body's reads, joined once it is whole: a body that came in one read (the usual
        # case) becomes the content as it is, not copied into a BytesIO first (20 KB a request)
        self._parts = []
        self._received = 0
        limit = self.channel.site.max_body_bytes if self.channel and self.channel.site else None
        self._limit = limit
        if limit is not None and length is not None and length > limit:
            self.too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self.too_large = True
            self._parts = []
            return
        self._parts.append(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        parts, self._parts = self._parts, None
        if parts:
            # BytesIO shares the bytes it starts with until written to: no copy here or in getvalue
            self.content = BytesIO(b"".join(parts))
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            # twisted.web announces itself in "Server"; the upstream's own value (or none) is kept
            server_header = self.responseHeaders.getRawHeaders(b"server")
            if server_header and server_header[0].startswith(b"TwistedWeb"):
                self.responseHeaders.removeHeader(b"server")
            channel = self.channel
            if getattr(channel, "start_gathering", None) is not None and channel.start_gathering():
                # the head and the first bytes leave in one send (one segment), not two
                try:
                    super().write(data)
                finally:
                    channel.send_gathered()
                return
        super().write(data)


class ProxyChannel(HeadChannel):
    """An HTTP channel that turns Nagle's algorithm off (SSE events are small writes), parses a
    request head in one pass where it can (:mod:`clproxy.http.head`), and sends what it writes at
    once.

    twisted's TCP transport buffers every write until the next reactor turn: two ``epoll_ctl``
    calls (watch for writable, stop watching) and a turn of the loop per response. On a plain
    TCP connection the channel's transport writes are sent on the socket right away when nothing
    is waiting in its buffer (:func:`write_through`; what the socket does not take is buffered
    as before, with the same backpressure), and a response's head is gathered with its first
    bytes (:meth:`gather`) so that they still leave together.
    """

    _gathered: Optional[List[bytes]] = None
    _host: Any = None

    def getHost(self):
        """The connection's local address, asked of the socket once: twisted's Request asks for it
        on every request, and a TCP transport answers each time with a ``getsockname`` call."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)
        except Exception:
            pass
        send = write_through(transport)
        if send == transport.write:
            return  # not a plain TCP transport (TLS, a test's): its own writes
        channel = self

        def write(data: bytes) -> None:
            gathered = channel._gathered
            if gathered is not None:
                gathered.append(data)
            else:
                send(data)

        def write_sequence(pieces) -> None:
            gathered = channel._gathered
            if gathered is not None:
                gathered.extend(pieces)
            else:
                send(b"".join(pieces))

        # instance attributes in place of the class's methods, for this connection only; they
        # refer to the channel, so connectionLost takes them away again (no cycle left)
        transport.write, transport.writeSequence = write, write_sequence

    def start_gathering(self) -> bool:
        """Hold the transport writes from now on, to send them as one write at
        :meth:`send_gathered` (which the caller must call, in a ``finally``, when this returns True).
        False when the writes cannot be held: not sent at once here, or already being gathered.
        (Two methods, not a context manager: this runs on every response, and a generator-based
        ``with`` costs ten times the work it wraps.)"""
        transport = self.transport
        if self._gathered is not None or transport is None or "write" not in vars(transport):
            return False
        self._gathered = []
        return True

    def send_gathered(self) -> None:
        """Stop holding the transport writes and send what was held, as one write."""
        gathered, self._gathered = self._gathered, None
        if gathered:
            self.transport.write(b"".join(gathered))

    def _send100Continue(self) -> None:
        """twisted answers ``Expect: 100-continue`` before it reads the body; a body whose length
        is over ``server.maxBodyBytes`` is not asked for: the request is answered at once (its
        413) as if its body had come, and the connection closes after it, so the body a client
        may send anyway is never read as a request."""
        request = self.requests[-1] if self.requests else None
        if not getattr(request, "too_large", False):
            super()._send100Continue()
            return
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.length = 0  # what follows allHeadersReceived (in twisted and head.py) ends the request

    def connectionLost(self, reason=connectionDone) -> None:
        transport = self.transport
        if transport is not None:
            vars(transport).pop("write", None)
            vars(transport).pop("writeSequence", None)
        super().connectionLost(reason)


class ProxySite(server.Site):
    """The daemon's site: bounded request bodies, TCP_NODELAY, no per-request access-log line."""

    protocol = ProxyChannel
    requestFactory = ProxyHTTPRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root, max_body_bytes: int = 32 * 1024 * 1024, drainer=None):
        super().__init__(root)
        self.max_body_bytes = max_body_bytes
        #: a clproxy.daemon.drain.Drainer counting requests in flight (graceful stop), or None
        self.drainer = drainer
        # bodies are JSON: twisted's form parsing (email.message per POST) is pure cost here
        self._parsePOSTFormSubmission = False

    def getResourceFor(self, request):
        if self.drainer is not None:
            self.drainer.track(request.notifyFinish())
        return super().getResourceFor(request)

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.site = self
        return channel

    def log(self, request) -> None:
        # one summary record per request is written by the observability layer instead
        pass


class ErrorResource(resource.Resource):
    """Answers every method with one Anthropic-shaped error."""

    isLeaf = True

    def __init__(self, error: ProxyError):
        super().__init__()
        self.error = error

    def render(self, request):
        return write_error(request, self.error)


def not_found(request: server.Request) -> ErrorResource:
    """The resource answering ``request``'s unknown path with an Anthropic-shaped 404."""
    return ErrorResource(_not_found_error(request))


class Node(resource.Resource):
    """A resource with children whose unknown paths and wrong methods get Anthropic-shaped errors."""

    allowed: Tuple[bytes, ...] = ()

    def getChild(self, path, request):
        if path == b"" and request.postpath == [] and self.allowed:
            return self
        return not_found(request)

    def render(self, request):
        if not self.allowed:
            return write_error(request, _not_found_error(request))
        if request.method not in self.allowed and not (request.method == b"HEAD" and b"GET" in self.allowed):
            request.responseHeaders.setRawHeaders(b"allow", [b", ".join(self.allowed)])
            return write_error(request, ProxyError(
                405, f"{request.method.decode('latin-1')} is not allowed on "
                     f"{request.path.decode('latin-1')}; use {', '.join(m.decode() for m in self.allowed)}"))
        return super().render(request)


def _not_found_error(request) -> ProxyError:
    return ProxyError(404, f"clproxy does not serve {request.path.decode('latin-1', 'replace')[:200]}")


def parse_messages_request(request: server.Request, needs_model: bool = True) -> ProxyRequest:
    """Check and parse just enough of a Messages API request (``model``, ``stream``); keep the raw bytes."""
    if getattr(request, "too_large", False):
        limit = request.channel.site.max_body_bytes
        raise ProxyError(413, f"request body is larger than the proxy's limit of {limit} bytes "
                              "(server.maxBodyBytes)", "request_too_large")
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != JSON:
        shown = content_type.decode("latin-1")[:100] or "none"
        raise ProxyError(400, f"content-type must be application/json, got {shown}")
    body = request.content.getvalue()
    fields = _read_model_and_stream(body)  # the body checked whole, only these two built
    if fields is None:
        fields = _model_and_stream_or_why_not(body)
    model, stream = fields
    if needs_model and (not isinstance(model, str) or not model):
        raise ProxyError(400, "model: field required (a non-empty string)")
    stream = stream is True
    uri = request.uri
    query = uri[uri.index(b"?"):] if b"?" in uri else b""
    return ProxyRequest(method=request.method, path=request.path, query=query,
                        headers=raw_header_pairs(request), body=body, model=model, stream=stream,
                        client_key=client_key_of(request))


#: The 400 for a body nested deeper than Python's parser goes (json.loads raises RecursionError,
#: which is not a ValueError): the same words on /v1/messages and /v1/chat/completions. The limit
#: is the interpreter's: about a thousand levels on Python 3.11 (less the caller's stack), several
#: thousand on 3.12 and later (C recursion), so the message names no number.
TOO_DEEP = "request body nests JSON arrays or objects deeper than the proxy's JSON parser goes"

#: (model, stream) of a body that is one valid JSON object, else None (then a full parse says why)
_read_model_and_stream = jsoncodec.object_reader("model", "stream")


def _model_and_stream_or_why_not(body: bytes) -> Tuple[object, object]:
    """The full parse of a body the reader did not take: its (model, stream), or the 400 saying
    what is wrong with it."""
    try:
        parsed = jsoncodec.loads(body)  # several times faster than json on Claude Code's large bodies
    except jsoncodec.JSONDecodeError:
        # the standard parser decides: it accepts what orjson refuses but JSON allows (lone
        # surrogate escapes, huge integers), and says where broken JSON breaks
        try:
            parsed = jsoncodec.std_loads(body)
        except ValueError as e:  # UnicodeDecodeError is one
            raise ProxyError(400, f"request body is not valid JSON: {_json_reason(e)}")
        except RecursionError:
            raise ProxyError(400, TOO_DEEP)
    if not isinstance(parsed, dict):
        raise ProxyError(400, f"request body must be a JSON object, got {_json_kind(parsed)}")
    return parsed.get("model"), parsed.get("stream")


def client_key_of(request):
    """The key record the auth check accepted for ``request`` (None without client keys)."""
    return getattr(request, "client_key", None)


def raw_header_pairs(request) -> List[Tuple[bytes, bytes]]:
    """The request's headers as ``(name, value)`` pairs, in order (a list built at once: a
    generator's resumption per header cost more than the pairs themselves)."""
    return [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]


def _json_reason(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    return "not UTF-8 text"


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


class MessagesResource(Node):
    """``POST /v1/messages`` (and, as its child, ``/v1/messages/count_tokens``)."""

    allowed = (b"POST",)

    def __init__(self, dispatcher):
        super().__init__()
        self.dispatcher = dispatcher
        self.putChild(b"count_tokens", CountTokensResource(dispatcher))

    def render_POST(self, request):
        return _dispatch(self.dispatcher, request, needs_model=True)


class CountTokensResource(Node):
    """``POST /v1/messages/count_tokens``: forwarded like a non-streaming message."""

    allowed = (b"POST",)

    def __init__(self, dispatcher):
        super().__init__()
        self.dispatcher = dispatcher

    def render_POST(self, request):
        return _dispatch(self.dispatcher, request, needs_model=True, force_no_stream=True)


def _dispatch(dispatcher, request, needs_model: bool, force_no_stream: bool = False):
    try:
        proxy_request = parse_messages_request(request, needs_model=needs_model)
    except ProxyError as e:
        return write_error(request, e)
    if force_no_stream:
        proxy_request.stream = False
    out = ClientResponse(request)
    d = defer.ensureDeferred(dispatcher.forward(proxy_request, out))
    d.addErrback(_internal_error, out)
    return server.NOT_DONE_YET


def _internal_error(failure: Failure, out: ClientResponse) -> None:
    """A bug must still end in an Anthropic-shaped answer, never a hung request or a traceback."""
    log.failure("internal error while answering a request", failure)
    out.send_error(ProxyError(500, "clproxy hit an internal error; see the daemon's log"))


#: A model id in ``/v1/models/{id}`` (``claude-sonnet-4-5-20250929``, ``gpt-4o``, a Vertex
#: ``...@2025...``): no dot segment, no percent-escape, nothing that would name another endpoint
_MODEL_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}\Z")


def models_path(postpath: List[bytes]) -> Optional[bytes]:
    """The upstream path for what follows ``/v1/models`` (twisted's unquoted ``postpath``):
    ``/v1/models`` or ``/v1/models/{id}``, or None for anything else. Rebuilt, never the client's
    path as sent: ``/v1/models/../messages/batches`` (or ``..%2Ffiles``) would otherwise reach
    another endpoint of the API with the pool's credential."""
    if postpath in ([], [b""]):
        return b"/v1/models"
    if len(postpath) == 1 and _MODEL_ID.match(postpath[0]):
        return b"/v1/models/" + postpath[0]
    return None


class ModelsResource(Node):
    """``GET /v1/models`` and ``/v1/models/{id}``: forwarded upstream with the first usable account
    (any other path under it is a 404 here)."""

    isLeaf = True
    allowed = (b"GET",)

    def __init__(self, dispatcher):
        super().__init__()
        self.dispatcher = dispatcher

    def render_GET(self, request):
        path = models_path(request.postpath)
        if path is None:
            return write_error(request, ProxyError(404, "Not found: /v1/models takes at most one model id",
                                                   "not_found_error"))
        uri = request.uri
        query = uri[uri.index(b"?"):] if b"?" in uri else b""
        proxy_request = ProxyRequest(method=b"GET", path=path, query=query,
                                     headers=raw_header_pairs(request), body=None,
                                     client_key=client_key_of(request))
        out = ClientResponse(request)
        d = defer.ensureDeferred(self.dispatcher.forward(proxy_request, out))
        d.addErrback(_internal_error, out)
        return server.NOT_DONE_YET


class HealthResource(Node):
    """``GET /health``: liveness with the strategy and uptime."""

    allowed = (b"GET",)

    def __init__(self, status):
        super().__init__()
        self.status = status

    def render_GET(self, request):
        return write_json(request, self.status.health())


class StatusResource(Node):
    """``GET /status``: accounts, their state and the proxy's counters."""

    allowed = (b"GET",)

    def __init__(self, status):
        super().__init__()
        self.status = status

    def render_GET(self, request):
        return answer_json_later(request, self.status.status(), "status")


def answer_later(request: server.Request, answer, what: str):
    """Render ``request`` with the bytes the coroutine ``answer`` returns once it has them (it sets
    the status and headers; None: it finishes the request itself). A failure is an
    Anthropic-shaped 500 naming ``what``; a client gone meanwhile gets nothing. For ``render_*``."""
    gone = []  # the client hung up while the answer was being built: nobody to answer
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(body):
        if not gone and body is not None:
            request.write(body)
            request.finish()

    def failed(failure):
        log.failure("{what} failed", failure, what=what)
        if gone:
            return
        request.write(write_error(request, ProxyError(500, f"{what} is unavailable")))
        request.finish()

    defer.ensureDeferred(answer).addCallbacks(done, failed)
    return server.NOT_DONE_YET


def answer_json_later(request: server.Request, document, what: str):
    """:func:`answer_later` with the JSON of ``document`` (a coroutine)."""
    async def as_json():
        return write_json(request, await document)

    return answer_later(request, as_json(), what)


class StatusReport:
    """Builds the /health and /status documents from the live daemon.

    Per account (the pool's snapshot rows, plus): ``quota`` (:func:`clproxy.routing.headroom.quota_view`
    of its latest snapshot, with the snapshot's own fields kept beside it for older readers),
    ``inFlight``, ``sessions`` (live bound sessions), ``cacheReadTokens``, ``cacheCreationTokens``,
    ``cacheHitRatio`` (:func:`clproxy.observe.metrics.cache_hit_ratio`; tokens counted by this
    process since it started) and ``disabledReason``. Proxy-wide: ``sessionMoves`` (every instance's,
    from the state store), ``queueLength`` and ``organizations`` (accounts sharing an org id, judged
    together by the quota rule). Team mode (``keys`` given and at least one key): ``keys``, one row
    per client key: ``name``, ``prefix``, ``admin``, ``limits``, ``today`` ``{tokens, usd}`` and
    ``month`` ``{tokens, usd}`` from the state store's usage counters (every instance's under
    Redis). Never a key or its hash.
    """

    def __init__(self, *, clock, pool, store, accounts, strategy: Callable[[], str], started: float,
                 extra: Callable[[], dict] = dict, quotas=None, dispatcher=None, metrics=None,
                 keys: Optional[Callable[[], Iterable]] = None):
        self.clock = clock
        self.pool = pool
        self.store = store
        self.accounts = accounts
        self.strategy = strategy
        self.started = started
        self.extra = extra
        self.quotas = quotas
        #: the gate (in flight, queue) and the affinity are read from the dispatcher at each call:
        #: a reload may replace the affinity
        self.dispatcher = dispatcher
        #: the metrics book (token totals per account)
        self.metrics = metrics
        #: team mode: the client keys' records (``clproxy.team.keys.KeyRecord``); None: no section
        self.keys = keys

    def health(self) -> dict:
        """The small liveness document."""
        return {"status": "ok", "strategy": self.strategy(),
                "uptime": round(self.clock.seconds() - self.started, 3)}

    async def status(self) -> dict:
        """The full status document (never a secret)."""
        accounts = list(self.accounts())
        counters = await self.store.counters()
        rows = await self.pool.snapshot(accounts)
        now = self.clock.seconds()
        keys = [row["key"] for row in rows]
        snapshots = await self.quotas.latest(a.key for a in accounts) if self.quotas is not None else {}
        gate = getattr(self.dispatcher, "gate", None)
        affinity = getattr(self.dispatcher, "affinity", None)
        sessions = await affinity.sessions_by_account(keys) if affinity is not None and keys else {}
        tokens = self.metrics.tokens_by_account() if self.metrics is not None else {}
        for row in rows:
            if self.quotas is not None:
                row["quota"] = _quota(snapshots.get(row["key"]), now)
            row["inFlight"] = gate.in_flight(row["key"]) if gate is not None else 0
            row["sessions"] = sessions.get(row["key"], 0)
            counted = tokens.get(row["name"]) or {}
            read, creation = counted.get("cache_read", 0), counted.get("cache_creation", 0)
            row["cacheReadTokens"] = int(read)
            row["cacheCreationTokens"] = int(creation)
            row["cacheHitRatio"] = cache_hit_ratio(read, creation, counted.get("input", 0))
            if row.get("disabled_reason"):
                row["disabledReason"] = row["disabled_reason"]
        document = {
            "status": "ok",
            "version": __version__,
            "strategy": self.strategy(),
            "uptime": round(now - self.started, 3),
            "accounts": rows,
            "counters": {
                "upstream_attempts": counters.get("upstream_attempts", 0),
                "completed_requests": counters.get("completed_requests", 0),
                "truncated_streams": counters.get("truncated_streams", 0),
                "model_substitutions": counters.get("model_substitutions", 0),
            },
            "sessionMoves": int(counters.get(SESSION_MOVES, 0) or 0),
            "queueLength": gate.queue_length() if gate is not None else 0,
            "organizations": organizations(accounts, snapshots, now),
        }
        if self.keys is not None:
            keys_section = await self._keys(now)
            if keys_section:
                document["keys"] = keys_section
        document.update(self.extra())
        return document

    async def _keys(self, now: float) -> list:
        """The ``keys`` section: each key's spending today and this month against its limits."""
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        rows = []
        for record in self.keys():
            tokens, usd = await self.store.get_usage(record.name, day)
            month_tokens, month_usd = await self.store.get_month_usage(record.name, day[:7])
            rows.append({"name": record.name, "prefix": record.prefix, "admin": record.admin,
                         "limits": record.limits(),
                         "today": {"tokens": int(tokens), "usd": round(float(usd), 6)},
                         "month": {"tokens": int(month_tokens), "usd": round(float(month_usd), 6)}})
        return rows


def _quota(snapshot, now: float) -> dict:
    """``quota_view`` of one snapshot, over the snapshot's own (snake_case) fields: readers of the
    earlier ``/status`` find ``five_hour``/``representative_claim`` where they were."""
    view = dict(snapshot or {})
    view.update(quota_view(snapshot, now))
    return view


def organizations(accounts, snapshots, now: float) -> List[dict]:
    """The organization groups of ``/status``: ``[{"id", "accounts": [names], "quota"}]`` for every
    org id some account carries, in configured order. ``quota`` is what the quota rule judges each
    member by (:func:`clproxy.routing.headroom.group_headrooms`: the worst utilization per window
    and the worst status of the group): ``{"known", "status", "windows": {"5h": {"utilization",
    "reset"}, "7d": {"utilization"}}}`` with only the windows known and current."""
    members: Dict[str, List[Any]] = {}
    for account in accounts:
        if getattr(account, "org_id", None):
            members.setdefault(account.org_id, []).append(account)
    if not members:
        return []
    rooms = group_headrooms([group[0].key for group in members.values()], snapshots, now,
                            {a.key: a.org_id for a in accounts})
    groups = []
    for org, group in members.items():
        room = rooms[group[0].key]
        windows: Dict[str, dict] = {}
        for field, shown in RULE_WINDOWS:
            if field in room.utilization:
                windows[shown] = {"utilization": room.utilization[field]}
        if room.five_hour_reset is not None:
            windows.setdefault("5h", {"utilization": None})["reset"] = room.five_hour_reset
        groups.append({"id": org, "accounts": [a.name for a in group],
                       "quota": {"known": room.known, "status": room.status, "windows": windows}})
    return groups
