"""The OpenAI-compatible front door: ``POST /v1/chat/completions`` and an OpenAI-shaped ``GET /v1/models``.

A Chat Completions request is translated into a Claude Messages request and goes through the same
dispatcher (account pool, failover, mappings, fallback) as ``/v1/messages``; an
:class:`OpenAIResponseAdapter` turns what the dispatcher writes back into OpenAI's shapes.
"""

import calendar
import json
import time
from typing import Callable, List, Optional, Tuple

from twisted.internet import defer
from twisted.web import resource, server
from zope.interface import implementer

from clproxy import jsoncodec
from clproxy.proxy import sse
from clproxy.proxy.dispatch import ProxyRequest
from clproxy.errors import ProxyError
from clproxy.http.site import TOO_DEEP, raw_header_pairs, send_anthropic_error
from clproxy.interfaces import IResponseSink
from clproxy.observe.console import logger
from clproxy.translate.claude import TranslationError
from clproxy.translate.openai import ClaudeStreamToOpenAI, claude_to_openai_response, openai_to_claude_request

__all__ = ["ChatCompletionsResource", "OpenAIResponseAdapter", "ModelsListing", "CapturedResponse",
           "chat_node", "openai_error_body"]

log = logger(__name__)

JSON = b"application/json"
ANTHROPIC_VERSION = b"2023-06-01"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

# Client headers that must not reach Anthropic: the client's credentials (the account's replace
# them), what is recomputed, and headers only OpenAI understands.
_DROPPED = {b"content-length", b"authorization", b"x-api-key"}
_DROPPED_PREFIXES = (b"openai-",)
# What of the dispatcher's response headers an OpenAI client gets.
_KEPT_PREFIXES = (b"x-clproxy-", b"anthropic-ratelimit-")
_KEPT = {b"request-id", b"retry-after"}


def openai_error_body(message: str, error_type: str = "invalid_request_error", param: Optional[str] = None,
                      code: Optional[str] = None) -> bytes:
    """An OpenAI error document: ``{"error": {"message", "type", "param", "code"}}``."""
    return jsoncodec.std_dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def _render_error(request, status: int, message: str, error_type: str = "invalid_request_error",
                  param: Optional[str] = None, headers=()) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    for name, value in headers:
        request.responseHeaders.setRawHeaders(name, [value])
    return openai_error_body(message, error_type, param)


def _kept_headers(headers) -> List[Tuple[bytes, List[bytes]]]:
    kept = []
    for name, values in headers or []:
        lower = name.lower()
        if lower in _KEPT or lower.startswith(_KEPT_PREFIXES):
            kept.append((name, list(values)))
    return kept


def _anthropic_error(body: bytes) -> Tuple[str, str]:
    """(type, message) of an Anthropic error body, or a description of a body that is not one."""
    try:
        parsed = json.loads(body)
        error = parsed["error"]
        return str(error.get("type") or "api_error"), str(error.get("message") or "")
    except Exception:
        text = body.decode("utf-8", "replace").strip()
        return "api_error", (text[:300] if text and not text.startswith("<") else "upstream error")


def _message_events(message: dict) -> list:
    """The Claude stream events a whole Message stands for (to stream an answer that came whole)."""
    events = [("message_start", {"type": "message_start",
                                 "message": dict(message, content=[], stop_reason=None)})]
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        if kind == "tool_use":
            events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": dict(block, input={})}))
            events.append(("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}}))
        elif kind == "text":
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": block.get("text", "")}}))
        elif kind == "thinking":
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "thinking_delta",
                                                             "thinking": block.get("thinking", "")}}))
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": message.get("stop_reason")},
                                     "usage": message.get("usage") or {}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _frame(chunk: dict) -> bytes:
    return b"data: " + jsoncodec.std_dumps(chunk) + b"\n\n"


DONE = b"data: [DONE]\n\n"


@implementer(IResponseSink)
class OpenAIResponseAdapter:
    """A ``ClientResponse`` stand-in that answers an OpenAI client with what the dispatcher writes.

    Claude Messages become ``chat.completion``; a Claude SSE stream is parsed as it arrives and each
    event becomes ``chat.completion.chunk`` frames, ending with ``data: [DONE]``; Anthropic errors
    (and ``event: error``) become OpenAI error documents with the same status. Keep-alives pass through.
    """

    def __init__(self, inner, model: str, stream: bool, include_usage: bool = False, *,
                 now: Callable[[], float] = time.time):
        self.inner = inner
        self.model = model
        self.stream = stream
        self.include_usage = include_usage
        self._now = now
        self._parser: Optional[sse.SSEParser] = None
        self._translator: Optional[ClaudeStreamToOpenAI] = None
        self._ended = False  # [DONE] or an error was written

    # -- what the dispatcher reads ------------------------------------------------------------
    @property
    def disconnected(self) -> bool:
        return self.inner.disconnected

    @property
    def started(self) -> bool:
        return self.inner.started

    @property
    def status(self) -> Optional[int]:
        """The status the OpenAI client was answered with (None before the answer began); the
        dispatcher's bookkeeping (summary, metrics, counters) reads it."""
        return self.inner.status

    def on_disconnect(self, cancel) -> None:
        self.inner.on_disconnect(cancel)

    def register_producer(self, producer) -> None:
        self.inner.register_producer(producer)

    def unregister_producer(self) -> None:
        self.inner.unregister_producer()

    # -- a stream ----------------------------------------------------------------------------
    def start(self, status: int, headers) -> None:
        """A Claude stream begins: commit an OpenAI event stream with the same status."""
        self._parser = sse.SSEParser()
        self.inner.start(status, [(b"content-type", [b"text/event-stream; charset=utf-8"]),
                                  (b"cache-control", [b"no-cache"])] + _kept_headers(headers))

    def write(self, data: bytes) -> None:
        """Translate Claude SSE bytes (any split) into OpenAI chunks."""
        if self._parser is None or self._ended:
            return
        if data == sse.KEEPALIVE:
            self.inner.write(data)
            return
        try:
            events = self._parser.feed(data)
        except sse.EventTooLarge as e:
            self._stream_error("api_error", str(e))
            return
        out = []
        for event in events:
            if event.name == "ping":
                out.append(sse.KEEPALIVE)  # the client's connection stays alive as it would with Claude
                continue
            try:
                payload = event.json()
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            kind = payload.get("type", event.name)
            if self._translator is None:
                message = (payload.get("message") or {}) if kind == "message_start" else {}
                message_id = message.get("id") or ""
                self._translator = ClaudeStreamToOpenAI(
                    message.get("model") or self.model, self.include_usage, created=int(self._now()),
                    completion_id="chatcmpl-" + (message_id[4:] if message_id.startswith("msg_")
                                                 else message_id or "clproxy"))
            for chunk in self._translator.feed((event.name, payload)):
                out.append(_frame(chunk))
            if kind == "message_stop":
                out.append(DONE)
                self._ended = True
                break
            if kind == "error":
                self._ended = True
                break
        if out:
            self.inner.write(b"".join(out))

    def finish(self) -> None:
        if self._parser is not None and not self._ended:
            # a stream that ended without message_stop or error: say so rather than end silently
            self._stream_error("api_error", "the stream ended before it was complete")
        self.inner.finish()

    def _stream_error(self, error_type: str, message: str) -> None:
        self._ended = True
        self.inner.write(_frame({"error": {"message": message, "type": error_type, "param": None, "code": None}}))

    # -- whole answers ---------------------------------------------------------------------------
    def send(self, status: int, headers, body: bytes) -> None:
        """A whole Claude answer (a Message, or an Anthropic error) as OpenAI's."""
        if self.inner.disconnected:
            return
        kept = _kept_headers(headers)
        if 200 <= status < 300:
            try:
                message = json.loads(body)
                if not isinstance(message, dict) or message.get("type") != "message":
                    raise ValueError("not a Claude message")
            except ValueError:
                self._send_error(502, "api_error", "the upstream answer is not a Claude message", kept)
                return
            if self.stream:
                self.start(status, headers)
                self.write(b"".join(sse.encode_event(name, data) for name, data in _message_events(message)))
                self.finish()
                return
            completion = claude_to_openai_response(message, created=int(self._now()))
            self.inner.send(status, [(b"content-type", [JSON])] + kept,
                            jsoncodec.std_dumps(completion))
            return
        error_type, message = _anthropic_error(body)
        self._send_error(status, error_type, message, kept)

    def send_error(self, error: ProxyError) -> None:
        """An error the proxy itself answers (OpenAI-shaped; an error chunk once streaming)."""
        if self.inner.disconnected:
            return
        if self.inner.started:
            if not self._ended:
                self._stream_error(error.error_type, error.message)
            self.inner.finish()
            return
        self._send_error(error.status, error.error_type, error.message, [(n, [v]) for n, v in error.headers])

    def _send_error(self, status: int, error_type: str, message: str, headers) -> None:
        self.inner.send(status, [(b"content-type", [JSON])] + list(headers),
                        openai_error_body(message, error_type))


class ChatCompletionsResource(resource.Resource):
    """``POST /v1/chat/completions``: OpenAI in, Claude accounts behind, OpenAI out."""

    isLeaf = True

    def __init__(self, dispatcher, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
                 now: Callable[[], float] = time.time):
        super().__init__()
        self.dispatcher = dispatcher
        self.max_body_bytes = max_body_bytes
        self._now = now

    def render(self, request):
        if request.postpath and request.postpath != [b""]:
            return _render_error(request, 404, f"clproxy does not serve {request.path.decode('latin-1')[:200]}",
                                 "not_found_error")
        if request.method != b"POST":
            request.responseHeaders.setRawHeaders(b"allow", [b"POST"])
            return _render_error(request, 405, f"{request.method.decode('latin-1')} is not allowed on "
                                               "/v1/chat/completions; use POST")
        try:
            proxy_request, model, stream, include_usage = self.parse(request)
        except ProxyError as e:
            return _render_error(request, e.status, e.message, e.error_type,
                                 getattr(e, "param", None), e.headers)
        from clproxy.http.site import ClientResponse  # web imports the dispatcher; imported late to stay a leaf
        out = OpenAIResponseAdapter(ClientResponse(request), model, stream, include_usage, now=self._now)
        d = defer.ensureDeferred(self.dispatcher.forward(proxy_request, out))
        d.addErrback(_internal_error, out)
        return server.NOT_DONE_YET

    def parse(self, request) -> Tuple[ProxyRequest, str, bool, bool]:
        """Check and translate an OpenAI request; raises ProxyError (with ``param`` when known)."""
        body = request.content.getvalue() if hasattr(request.content, "getvalue") else request.content.read()
        limit = getattr(getattr(getattr(request, "channel", None), "site", None), "max_body_bytes", None) \
            or self.max_body_bytes
        if getattr(request, "too_large", False) or len(body) > limit:
            raise ProxyError(413, f"request body is larger than the proxy's limit of {limit} bytes "
                                  "(server.maxBodyBytes)", "invalid_request_error")
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != JSON:
            shown = content_type.decode("latin-1")[:100] or "none"
            raise ProxyError(400, f"content-type must be application/json, got {shown}")
        try:
            parsed = jsoncodec.std_loads(body)
        except ValueError as e:  # UnicodeDecodeError is one
            reason = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) \
                else "not UTF-8 text"
            raise ProxyError(400, f"request body is not valid JSON: {reason}")
        except RecursionError:
            raise ProxyError(400, TOO_DEEP)
        if not isinstance(parsed, dict):
            raise ProxyError(400, "request body must be a JSON object")
        model = parsed.get("model")
        if not isinstance(model, str) or not model:
            raise _param_error("model", "you must provide a model parameter")
        messages = parsed.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _param_error("messages", "messages must be a non-empty array")
        if not all(isinstance(m, dict) for m in messages):
            raise _param_error("messages", "every message must be an object")
        stream = parsed.get("stream") is True
        include_usage = stream and bool((parsed.get("stream_options") or {}).get("include_usage"))
        try:
            claude = openai_to_claude_request(parsed)
        except TranslationError as e:
            raise _param_error(e.message.split(":", 1)[0].split(" ", 1)[0], e.message)
        except (TypeError, AttributeError, ValueError) as e:
            raise ProxyError(400, f"the request cannot be read as a Chat Completions request: {e}")
        headers = [(name, value) for name, value in raw_header_pairs(request)
                   if name.lower() not in _DROPPED and not name.lower().startswith(_DROPPED_PREFIXES)]
        if not any(name.lower() == b"anthropic-version" for name, _ in headers):
            headers.append((b"anthropic-version", ANTHROPIC_VERSION))
        claude_body = jsoncodec.std_dumps(claude)  # (a client's lone surrogate stays escaped)
        proxy_request = ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"", headers=headers,
                                     body=claude_body, model=model, stream=stream,
                                     client_path=request.path,
                                     client_key=getattr(request, "client_key", None))
        return proxy_request, model, stream, include_usage


def _param_error(param: str, message: str) -> ProxyError:
    error = ProxyError(400, message, "invalid_request_error")
    error.param = param
    return error


def _internal_error(failure, out) -> None:
    log.failure("internal error while answering a chat completion", failure)
    out.send_error(ProxyError(500, "clproxy hit an internal error; see the daemon's log"))


@implementer(IResponseSink)
class CapturedResponse:
    """An ``out`` that keeps a whole answer in memory (for requests clproxy makes on its own behalf).

    Its "client" is the code that made it: :meth:`abandon` is that code giving up (the upstream
    step in progress is cancelled, as when a real client goes away).
    """

    def __init__(self):
        self.disconnected = False
        self.started = False
        self.status: Optional[int] = None
        self.headers: list = []
        self.chunks: List[bytes] = []
        self.done: defer.Deferred = defer.Deferred()
        self._cancel: Optional[Callable[[], None]] = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def on_disconnect(self, cancel) -> None:
        self._cancel = cancel

    def abandon(self) -> None:
        """Stop waiting for the answer: cancel the upstream step in progress, keep nothing more."""
        if self.disconnected:
            return
        self.disconnected = True
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()
        self.finish()

    def start(self, status, headers) -> None:
        if self.disconnected:
            return
        self.started = True
        self.status, self.headers = status, list(headers)

    def write(self, data: bytes) -> None:
        if not self.disconnected:
            self.chunks.append(data)

    def finish(self) -> None:
        self.disconnected = True  # the answer is complete: nothing more is kept
        if not self.done.called:
            self.done.callback(self)

    def send(self, status, headers, body: bytes) -> None:
        if self.disconnected:
            return
        self.start(status, headers)
        self.write(body)
        self.finish()

    def send_error(self, error: ProxyError) -> None:
        send_anthropic_error(self, error)

    def register_producer(self, producer) -> None:
        pass

    def unregister_producer(self) -> None:
        pass


def _created(value) -> int:
    """Unix seconds of an RFC 3339 ``created_at`` (0 when unknown)."""
    if not isinstance(value, str):
        return 0
    try:
        return calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0


class ModelsListing(resource.Resource):
    """``GET /v1/models`` for both APIs.

    Requests with ``anthropic-version`` (Anthropic SDKs, Claude Code) go to the Anthropic passthrough
    unchanged. Others get OpenAI's list: the models Anthropic lists for the first usable account, plus
    the names the config makes requestable (mapping sources, passthrough models, and fallback models a
    request can name directly). Each entry's ``owned_by`` is the provider that answers that name.
    """

    isLeaf = True

    def __init__(self, dispatcher, router, anthropic_models_resource):
        super().__init__()
        self.dispatcher = dispatcher
        self.router = router
        self.anthropic = anthropic_models_resource

    def render(self, request):
        if request.getHeader(b"anthropic-version") is not None:
            return self.anthropic.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"allow", [b"GET"])
            return _render_error(request, 405, f"{request.method.decode('latin-1')} is not allowed on "
                                               "/v1/models; use GET")
        wanted = b"/".join(p for p in request.postpath if p).decode("utf-8", "replace") or None
        d = defer.ensureDeferred(self._answer(request, wanted))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def listing(self, headers=(), client_key=None) -> Tuple[list, Optional[CapturedResponse]]:
        """The OpenAI model entries, and the upstream answer when it failed (None when it worked).
        ``client_key``: the asking client's key record (its subscription rule picks the account)."""
        captured = CapturedResponse()
        upstream_request = ProxyRequest(method=b"GET", path=b"/v1/models", query=b"?limit=1000",
                                        headers=[(b"anthropic-version", ANTHROPIC_VERSION)] + list(headers),
                                        body=None, client_key=client_key)
        await self.dispatcher.forward(upstream_request, captured)
        entries, seen = [], set()

        def add(model_id, owned_by, created=0):
            if model_id and model_id not in seen:
                seen.add(model_id)
                entries.append({"id": model_id, "object": "model", "created": created, "owned_by": owned_by})

        failed = captured
        if captured.status == 200:
            try:
                for model in json.loads(captured.body).get("data") or []:
                    add(model.get("id"), "anthropic", _created(model.get("created_at")))
                failed = None
            except (ValueError, AttributeError):
                pass
        for model_id, provider in self._configured():
            add(model_id, provider)
        return entries, failed

    def _configured(self):
        # no router given: the dispatcher's, read per request (a config reload may replace it)
        router = self.router if self.router is not None else getattr(self.dispatcher, "router", None)
        if router is None:
            return
        for model_id in sorted(getattr(router, "_passthrough", ())):
            yield model_id, "anthropic"
        for model_id in getattr(router, "_exact", {}):  # exact mapping sources; patterns name no model
            yield model_id, router.route(model_id).provider
        for target in router.fallback_chain:
            # listed only when asking for it by name really reaches that provider
            if router.route(target.model).provider == target.provider:
                yield target.model, target.provider

    async def _answer(self, request, wanted: Optional[str]) -> None:
        entries, failed = await self.listing(client_key=getattr(request, "client_key", None))
        if request._disconnected:
            return
        if wanted is not None:
            entry = next((e for e in entries if e["id"] == wanted), None)
            if entry is None:
                request.setResponseCode(404)
                request.responseHeaders.setRawHeaders(b"content-type", [JSON])
                body = openai_error_body(f"The model '{wanted}' does not exist", "invalid_request_error",
                                         "model", "model_not_found")
            else:
                request.setResponseCode(200)
                request.responseHeaders.setRawHeaders(b"content-type", [JSON])
                body = json.dumps(entry).encode()
        elif not entries and failed is not None:
            error_type, message = _anthropic_error(failed.body)
            body = _render_error(request, failed.status or 502, message, error_type,
                                 headers=[(n, v[0]) for n, v in failed.headers
                                          if n.lower() == b"retry-after" and v])
        else:
            request.setResponseCode(200)
            request.responseHeaders.setRawHeaders(b"content-type", [JSON])
            body = json.dumps({"object": "list", "data": entries}, separators=(",", ":")).encode()
        request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _failed(self, failure, request) -> None:
        log.failure("listing models failed", failure)
        if not request._disconnected and not request.finished:
            request.write(_render_error(request, 500, "clproxy could not list models; see the daemon's log",
                                        "api_error"))
            request.finish()


class _OpenAINode(resource.Resource):
    """A path segment whose unknown children get an OpenAI-shaped 404."""

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _render_error(request, 404, f"clproxy does not serve {request.path.decode('latin-1')[:200]}",
                             "not_found_error")


def chat_node(dispatcher, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> resource.Resource:
    """``/v1/chat``: ``completions`` answers Chat Completions; any other child is an OpenAI-shaped 404."""
    chat = _OpenAINode()
    chat.putChild(b"completions", ChatCompletionsResource(dispatcher, max_body_bytes))
    return chat