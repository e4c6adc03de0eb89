"""Shipped fakes for tests and benchmarks: a fake Anthropic API on a real loopback port.

``FakeAnthropic`` records every request byte for byte and answers from scripts chosen per
credential: a status with headers and body, a stream (optionally paced), a stream cut after N
events, a stream that ends before its first event, a delay, or a connection reset.
"""

import itertools
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.web import resource, server

from clproxy.proxy.sse import encode_event

Events = List[Tuple[str, Dict[str, Any]]]


def default_reactor() -> Any:
    """The global reactor, imported only when a fake is given none: importing a fake must not install it."""
    from twisted.internet import reactor
    return reactor


@attr.s(auto_attribs=True)
class Recorded:
    """One request as the fake upstream received it."""

    method: bytes
    path: bytes
    uri: bytes
    headers: List[Tuple[bytes, bytes]]
    body: bytes
    credential: Optional[str]
    client_port: int = 0

    def header(self, name: str) -> Optional[str]:
        """The first value of a header, as text."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


@attr.s(auto_attribs=True)
class Script:
    """How the fake answers a matching request.

    ``status``/``headers``/``body``: a plain response (``body=b""``: an empty one; ``body=b"[]"``: a
    JSON body that is not an object). ``events``: an SSE stream (each event written ``pace`` seconds
    after the previous). ``cut_after``: close the connection mid-body after that many events.
    ``body_cut_at``: send only the first N bytes of a plain body (``body``, or the default message),
    then close the connection; its Content-Length still announces the whole body.
    ``chunked``: send a plain body in chunked transfer encoding, with no Content-Length (with
    ``body_cut_at``: the connection closes before the terminating chunk). ``body_stall_at``: send
    only the first N bytes of a plain body, then nothing more, the connection left open.
    ``end_before_first``: send the stream's headers, then end it cleanly with no event.
    ``first_event_delay``: send the stream's headers at once, its first event that many seconds later.
    ``reset``: abort the connection before any response. ``delay``: wait before answering.
    ``times``: how many requests it answers (None: all).
    """

    status: int = 200
    headers: Dict[str, str] = attr.ib(factory=dict)
    body: Optional[bytes] = None
    events: Optional[Events] = None
    pace: float = 0.0
    cut_after: Optional[int] = None
    body_cut_at: Optional[int] = None
    body_stall_at: Optional[int] = None
    chunked: bool = False
    end_before_first: bool = False
    first_event_delay: float = 0.0
    reset: bool = False
    delay: float = 0.0
    times: Optional[int] = None


_ids = itertools.count(1)


def message(text: str = "Hello from the fake upstream.", model: str = "claude-sonnet-4-5",
            stop_reason: str = "end_turn") -> Dict[str, Any]:
    """A non-streaming Messages API response."""
    return {
        "id": f"msg_fake{next(_ids):06d}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }


def _start(model: str) -> Tuple[str, Dict[str, Any]]:
    return ("message_start", {"type": "message_start", "message": {
        "id": f"msg_fake{next(_ids):06d}", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0}}})


def _end(stop_reason: str, output_tokens: int) -> Events:
    return [
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                           "usage": {"output_tokens": output_tokens}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def text_stream(parts: Sequence[str] = ("Hello", " from", " the", " fake."),
                model: str = "claude-sonnet-4-5") -> Events:
    """A streamed text answer: one text block whose deltas are ``parts``."""
    events: Events = [_start(model),
                      ("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}),
                      ("ping", {"type": "ping"})]
    for part in parts:
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": part}}))
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    return events + _end("end_turn", len(parts))


def tool_use_stream(name: str = "get_weather", arguments: str = '{"city": "Paris"}',
                    model: str = "claude-sonnet-4-5") -> Events:
    """A streamed tool call: a short text block, then a tool_use block with input_json_delta parts."""
    half = len(arguments) // 2
    return [
        _start(model),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Let me check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "tool_use", "id": "toolu_fake01",
                                                   "name": name, "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": arguments[:half]}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "input_json_delta", "partial_json": arguments[half:]}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ] + _end("tool_use", 20)


def thinking_stream(thinking: str = "Let me think.", signature: str = "EqQBCgIYAhIM1gbcDa9GJwZA",
                    text: str = "42.", model: str = "claude-sonnet-4-5") -> Events:
    """A streamed answer with a thinking block (thinking_delta then signature_delta), then text."""
    return [
        _start(model),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "thinking_delta", "thinking": thinking}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "signature_delta", "signature": signature}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("content_block_start", {"type": "content_block_start", "index": 1,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                 "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ] + _end("end_turn", 30)


def error_json(status: int, error_type: str, message: str) -> bytes:
    """An Anthropic error body."""
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message},
                       "request_id": "req_fake"}).encode()


def unified_headers(five_hour: Optional[float] = None, seven_day: Optional[float] = None,
                    status: str = "allowed", reset: Optional[float] = None) -> Dict[str, str]:
    """The subscription ("unified") rate-limit headers of an answer, for ``Script(headers=...)``.

    ``five_hour``/``seven_day``: the windows' utilization (a fraction; None: that window is not
    sent); ``reset``: the epoch second both windows reset (None: none is sent, the window never
    counts as over).
    """
    headers = {"anthropic-ratelimit-unified-status": status}
    for infix, utilization in (("5h", five_hour), ("7d", seven_day)):
        if utilization is None:
            continue
        prefix = f"anthropic-ratelimit-unified-{infix}-"
        headers[prefix + "utilization"] = f"{utilization:g}"
        headers[prefix + "status"] = status
        if reset is not None:
            headers[prefix + "reset"] = str(int(reset))
    if reset is not None:
        headers["anthropic-ratelimit-unified-reset"] = str(int(reset))
    return headers


def credential_of(request) -> Optional[str]:
    """The API key or Bearer token a request carries."""
    key = request.getHeader(b"x-api-key")
    if key:
        return key.decode("latin-1")
    auth = request.getHeader(b"authorization") or b""
    if auth.lower().startswith(b"bearer "):
        return auth[7:].decode("latin-1")
    return None


class LoopbackFake(resource.Resource):
    """A fake upstream that serves itself on a loopback port: ``listen()``, then ``url``."""

    isLeaf = True
    #: the reactor to listen with; ``None``: the global one, looked up when listening
    reactor: Any = None
    port = None

    def listen(self, port: int = 0, interface: str = "127.0.0.1"):
        """Listen on a loopback port (0: a free one); returns the listening port."""
        site = server.Site(self)
        site.displayTracebacks = False
        site.noisy = False
        if self.reactor is None:
            self.reactor = default_reactor()
        self.port = self.reactor.listenTCP(port, site, interface=interface)
        return self.port

    @property
    def url(self) -> str:
        """The base URL clients use (``http://127.0.0.1:PORT``)."""
        address = self.port.getHost()
        return f"http://{address.host}:{address.port}"


class FakeAnthropic(LoopbackFake):
    """A fake Anthropic Messages API. ``listen()`` it on a loopback port; script it with ``script()``."""

    isLeaf = True

    def __init__(self, reactor=None):
        super().__init__()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.requests: List[Recorded] = []
        self._scripts: Dict[Optional[str], List[Script]] = {}
        self.default_stream: Events = text_stream()
        self.open_streams = 0
        #: optional credential check: a request whose credential it rejects gets a 401
        self.authorize: Optional[Callable[[Optional[str]], bool]] = None
        #: (event index, reactor time) for every SSE event written, in order
        self.sent: List[Tuple[int, float]] = []
        self.port = None
        #: credentials the upstream revoked: answered 401 "OAuth token has expired"
        self.revoked: set = set()
        self._paused = False
        #: answers held while paused, in arrival order (see :meth:`pause`)
        self.held: List[Callable[[], None]] = []

    # -- scripting ---------------------------------------------------------------------------
    def script(self, credential: Optional[str] = None, **kwargs) -> Script:
        """Queue how to answer requests with ``credential`` (None: any credential without a script)."""
        s = Script(**kwargs)
        self._scripts.setdefault(credential, []).append(s)
        return s

    def clear(self) -> None:
        """Forget scripts and recorded requests."""
        self._scripts.clear()
        self.requests.clear()

    def _take(self, credential: Optional[str]) -> Optional[Script]:
        for key in (credential, None):
            queue = self._scripts.get(key)
            while queue:
                s = queue[0]
                if s.times is None:
                    return s
                if s.times > 0:
                    s.times -= 1
                    if s.times == 0:
                        queue.pop(0)
                    return s
                queue.pop(0)
        return None

    def revoke(self, credential: str) -> None:
        """Revoke ``credential``: requests carrying it get 401 ``authentication_error`` "OAuth token
        has expired", as Anthropic answers a revoked OAuth access token."""
        self.revoked.add(credential)

    def pause(self) -> None:
        """Hold every answer (the request is recorded on arrival) until :meth:`resume`, so a test can
        have many requests in flight before the first is answered."""
        self._paused = True

    def resume(self) -> None:
        """Send the held answers, in arrival order, and stop holding new ones."""
        self._paused = False
        held, self.held = self.held, []
        for answer in held:
            answer()

    def for_credential(self, credential: str) -> List[Recorded]:
        """The recorded requests that carried ``credential``."""
        return [r for r in self.requests if r.credential == credential]

    # -- serving ------------------------------------------------------------------------------
    def render(self, request):
        body = request.content.read()
        credential = credential_of(request)
        self.requests.append(Recorded(
            method=request.method, path=request.path, uri=request.uri,
            headers=[(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            body=body, credential=credential, client_port=getattr(request.getClientAddress(), "port", 0)))
        if credential in self.revoked:
            s = Script(status=401, body=error_json(401, "authentication_error", "OAuth token has expired"))
        elif self.authorize is not None and not self.authorize(credential):
            s = Script(status=401, body=error_json(401, "authentication_error", "invalid bearer token"))
        else:
            s = self._take(credential) or Script()
        if self._paused:
            self.held.append(lambda: self._answer(request, body, s))
        elif s.delay:
            self.reactor.callLater(s.delay, self._answer, request, body, s)
        else:
            self._answer(request, body, s)
        return server.NOT_DONE_YET

    def _answer(self, request, body: bytes, s: Script) -> None:
        if request.channel is None or getattr(request, "_disconnected", False):
            return  # the client gave up while we were delaying
        if s.reset:
            request.transport.abortConnection()
            return
        request.setResponseCode(s.status)
        request.setHeader(b"request-id", b"req_fake%06d" % next(_ids))
        for name, value in s.headers.items():
            request.setHeader(name.encode(), value.encode())
        if s.body is not None:
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            return self._body(request, s.body, s)
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        path = request.path
        if request.method == b"GET" and path.startswith(b"/v1/models"):
            return self._json(request, {"data": [
                {"type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5",
                 "created_at": "2025-09-29T00:00:00Z"},
                {"type": "model", "id": "claude-opus-4-1", "display_name": "Claude Opus 4.1",
                 "created_at": "2025-08-05T00:00:00Z"}],
                "has_more": False, "first_id": "claude-sonnet-4-5", "last_id": "claude-opus-4-1"})
        if path.endswith(b"/count_tokens"):
            return self._json(request, {"input_tokens": max(1, len(body) // 4)})
        if parsed.get("stream") is True or s.events is not None:
            return self._stream(request, s.events or self.default_stream, s)
        return self._json(request, message(model=parsed.get("model", "claude-sonnet-4-5")), s)

    def _json(self, request, value, s: Optional[Script] = None) -> None:
        request.setHeader(b"content-type", b"application/json")
        self._body(request, json.dumps(value).encode(), s or Script())

    def _body(self, request, data: bytes, s: Script) -> None:
        """Write a plain body as the script says: whole, chunked, cut after ``body_cut_at`` bytes, or
        stalled after ``body_stall_at`` bytes."""
        if not s.chunked:
            request.setHeader(b"content-length", str(len(data)).encode())
        if s.body_stall_at is not None:
            request.write(data[:s.body_stall_at])  # and never the rest (nor the end)
            return
        if s.body_cut_at is None:
            request.write(data)
            request.finish()
            return
        request.write(data[:s.body_cut_at])
        # what was written is flushed first; the client sees the body end short of its
        # Content-Length (or, chunked, without its terminating chunk)
        request.channel.transport.loseConnection()

    def _stream(self, request, events: Events, s: Script) -> None:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # status and headers go out now
        if s.end_before_first:
            request.finish()
            return
        self.open_streams += 1
        finished = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        frames = [encode_event(name, data) for name, data in events]

        def send(i: int) -> None:
            # unpaced events are written in one loop; paced ones one per timer tick
            while True:
                if finished:
                    self.open_streams -= 1
                    return
                if s.cut_after is not None and i >= s.cut_after:
                    self.open_streams -= 1
                    # close the TCP connection mid-body (what was written is flushed first): the
                    # client sees the chunked body end without its terminating chunk
                    request.channel.transport.loseConnection()
                    return
                if i >= len(frames):
                    self.open_streams -= 1
                    request.finish()
                    return
                request.write(frames[i])
                self.sent.append((i, self.reactor.seconds()))
                i += 1
                if s.pace:
                    self.reactor.callLater(s.pace, send, i)
                    return

        if s.first_event_delay:
            self.reactor.callLater(s.first_event_delay, send, 0)
        else:
            send(0)


def listen_fake_anthropic(reactor=None) -> FakeAnthropic:
    """A :class:`FakeAnthropic` listening on a free loopback port."""
    fake = FakeAnthropic(reactor)
    fake.listen()
    return fake
