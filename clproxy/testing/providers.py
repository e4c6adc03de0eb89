"""Shipped fakes of the translation providers: OpenAI Chat Completions and Gemini on loopback ports.

Like :class:`clproxy.testing.anthropic.FakeAnthropic`, each records every request and answers from a queue
of scripts: a status with a body, a whole answer, a stream of chunks (paced, cut after N chunks,
held open after N chunks until released), an empty stream, a delay, or a connection reset.
"""

import itertools
import json
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import unquote

import attr
from twisted.web import server

from clproxy.testing.anthropic import LoopbackFake, Recorded, default_reactor

Chunk = Union[Dict[str, Any], bytes]

_ids = itertools.count(1)


@attr.s(auto_attribs=True)
class ProviderScript:
    """How a fake provider answers one or more requests.

    ``status``/``headers``/``body``: a plain response. ``response``: a whole JSON answer (non-stream).
    ``chunks``: a stream of JSON chunks (dicts; ``bytes`` are written as they are), each ``pace``
    seconds after the previous; ``cut_after``: close the connection after that many chunks;
    ``hold_after``: stop after that many chunks and stay silent until :meth:`FakeProvider.release`;
    ``end_before_first``: send the stream's headers and end it with no chunk.
    ``reset``: abort the connection before answering. ``delay``: wait before answering.
    ``times``: how many requests it answers (None: all).
    """

    status: int = 200
    headers: Dict[str, str] = attr.ib(factory=dict)
    body: Optional[bytes] = None
    response: Optional[Dict[str, Any]] = None
    chunks: Optional[List[Chunk]] = None
    pace: float = 0.0
    cut_after: Optional[int] = None
    hold_after: Optional[int] = None
    end_before_first: bool = False
    reset: bool = False
    delay: float = 0.0
    times: Optional[int] = None


# -- OpenAI shapes ----------------------------------------------------------------------------

def openai_completion(text: str = "Hello from fake OpenAI.", model: str = "gpt-4o-2024-08-06",
                      tool_calls: Optional[list] = None) -> Dict[str, Any]:
    """A chat.completion (with ``tool_calls`` when given: finish_reason tool_calls)."""
    message: Dict[str, Any] = {"role": "assistant", "content": text if not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-fake{next(_ids):06d}", "object": "chat.completion", "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if tool_calls else "stop"}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }


def openai_tool_call(name: str = "get_weather", arguments: str = '{"city": "Paris"}',
                     call_id: str = "call_fake01") -> Dict[str, Any]:
    """One entry of a chat.completion's ``tool_calls``."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _openai_chunk(model: str, delta: Dict[str, Any], finish_reason=None, cid="chatcmpl-fakestream"):
    return {"id": cid, "object": "chat.completion.chunk", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def _openai_usage_chunk(model: str, prompt: int = 21, completion: int = 9):
    return {"id": "chatcmpl-fakestream", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}}}


def openai_text_chunks(parts: Sequence[str] = ("Hello", " from", " fake", " OpenAI."),
                       model: str = "gpt-4o-2024-08-06", usage: bool = True) -> List[Chunk]:
    """A streamed text answer: role, one chunk per part, finish_reason stop, usage, ``[DONE]``."""
    chunks: List[Chunk] = [_openai_chunk(model, {"role": "assistant", "content": ""})]
    chunks += [_openai_chunk(model, {"content": part}) for part in parts]
    chunks.append(_openai_chunk(model, {}, "stop"))
    if usage:
        chunks.append(_openai_usage_chunk(model))
    return chunks + [b"data: [DONE]\n\n"]


def openai_tool_chunks(name: str = "get_weather", arguments: str = '{"city": "Paris"}',
                       model: str = "gpt-4o-2024-08-06", call_id: str = "call_fake01") -> List[Chunk]:
    """A streamed tool call: the call's id and name, its arguments in two halves, finish_reason tool_calls."""
    half = len(arguments) // 2
    return [
        _openai_chunk(model, {"role": "assistant", "content": None}),
        _openai_chunk(model, {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": ""}}]}),
        _openai_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]}),
        _openai_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}),
        _openai_chunk(model, {}, "tool_calls"),
        _openai_usage_chunk(model),
        b"data: [DONE]\n\n",
    ]


def openai_error(status: int, message: str, error_type: str = "invalid_request_error",
                 code: Optional[str] = None) -> bytes:
    """An OpenAI error body."""
    return json.dumps({"error": {"message": message, "type": error_type, "param": None,
                                 "code": code}}).encode()


# -- Gemini shapes ----------------------------------------------------------------------------

def _gemini_usage(prompt: int = 17, candidates: int = 8) -> Dict[str, Any]:
    return {"promptTokenCount": prompt, "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates}


def gemini_response(text: str = "Hello from fake Gemini.", model: str = "gemini-2.5-flash",
                    function_call: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A whole GenerateContentResponse: text, or a functionCall part when given."""
    part = {"functionCall": function_call} if function_call else {"text": text}
    return {"candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": _gemini_usage(), "modelVersion": model, "responseId": f"fake{next(_ids)}"}


def gemini_text_chunks(parts: Sequence[str] = ("Hello", " from", " fake", " Gemini."),
                       model: str = "gemini-2.5-flash") -> List[Chunk]:
    """alt=sse chunks of a text answer; the last one carries finishReason STOP and the usage."""
    chunks: List[Chunk] = []
    for i, text in enumerate(parts):
        candidate: Dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if i == len(parts) - 1:
            candidate["finishReason"] = "STOP"
        chunks.append({"candidates": [candidate], "usageMetadata": _gemini_usage(candidates=i + 1),
                       "modelVersion": model})
    return chunks


def gemini_tool_chunks(name: str = "get_weather", args: Optional[Dict[str, Any]] = None,
                       model: str = "gemini-2.5-flash", text: str = "Let me check.") -> List[Chunk]:
    """alt=sse chunks of a short text, then one whole functionCall part with finishReason STOP."""
    call = {"name": name, "args": args if args is not None else {"city": "Paris"}}
    return [
        {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}],
         "modelVersion": model},
        {"candidates": [{"content": {"role": "model", "parts": [{"functionCall": call}]},
                         "finishReason": "STOP", "index": 0}],
         "usageMetadata": _gemini_usage(), "modelVersion": model},
    ]


def gemini_error(status: int, message: str, status_text: str = "INVALID_ARGUMENT",
                 retry_delay: Optional[str] = None) -> bytes:
    """A Google API error body (with a RetryInfo detail when ``retry_delay`` is given, e.g. "30s")."""
    error: Dict[str, Any] = {"code": status, "message": message, "status": status_text}
    if retry_delay:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return json.dumps({"error": error}).encode()


# -- the servers ------------------------------------------------------------------------------

class FakeProvider(LoopbackFake):
    """What both fakes share: scripts, recording, listening and the streaming machinery."""

    isLeaf = True
    #: the provider's route name
    name = "provider"

    def __init__(self, reactor=None):
        super().__init__()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.requests: List[Recorded] = []
        self._scripts: List[ProviderScript] = []
        self._held: List[Any] = []
        self.open_streams = 0
        #: requests whose connection closed before their answer was finished (the client went away,
        #: or a cut/reset script closed it)
        self.unfinished = 0
        self.port = None

    # -- scripting ----------------------------------------------------------------------------
    def script(self, **kwargs) -> ProviderScript:
        """Queue how to answer the next request(s); unscripted requests get the default answer."""
        s = ProviderScript(**kwargs)
        self._scripts.append(s)
        return s

    def clear(self) -> None:
        """Forget scripts and recorded requests."""
        self._scripts.clear()
        self.requests.clear()

    def release(self) -> None:
        """Let every stream held by ``hold_after`` send the rest of its chunks."""
        held, self._held = self._held, []
        for resume in held:
            resume()

    def _take(self) -> ProviderScript:
        while self._scripts:
            s = self._scripts[0]
            if s.times is None:
                return s
            s.times -= 1
            if s.times <= 0:
                self._scripts.pop(0)
            return s
        return ProviderScript()

    def bodies(self) -> List[Dict[str, Any]]:
        """The recorded request bodies, parsed."""
        return [json.loads(r.body) for r in self.requests]

    # -- serving ------------------------------------------------------------------------------
    def credential(self, request) -> Optional[str]:
        raise NotImplementedError

    def render(self, request):
        body = request.content.read()
        self.requests.append(Recorded(
            method=request.method, path=request.path, uri=request.uri,
            headers=[(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            body=body, credential=self.credential(request),
            client_port=getattr(request.getClientAddress(), "port", 0)))
        request.notifyFinish().addErrback(self._unfinished)
        s = self._take()
        if s.delay:
            self.reactor.callLater(s.delay, self._answer, request, body, s)
        else:
            self._answer(request, body, s)
        return server.NOT_DONE_YET

    def _unfinished(self, _failure) -> None:
        self.unfinished += 1

    def _answer(self, request, body: bytes, s: ProviderScript) -> None:
        if request.channel is None or getattr(request, "_disconnected", False):
            return
        if s.reset:
            request.transport.abortConnection()
            return
        request.setResponseCode(s.status)
        for name, value in s.headers.items():
            request.setHeader(name.encode(), value.encode())
        if s.body is not None:
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            self._finish_with(request, s.body)
            return
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        problem = self.check(request, parsed)
        if problem is not None:
            request.setResponseCode(problem[0])
            request.setHeader(b"content-type", b"application/json")
            self._finish_with(request, problem[1])
            return
        if self.wants_stream(request, parsed):
            self._stream(request, s.chunks if s.chunks is not None else self.default_chunks(request, parsed), s)
        else:
            answer = s.response if s.response is not None else self.default_response(request, parsed)
            request.setHeader(b"content-type", b"application/json")
            self._finish_with(request, json.dumps(answer).encode())

    def _finish_with(self, request, data: bytes) -> None:
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()

    def check(self, request, parsed) -> Optional[tuple]:
        """(status, body) when the request is malformed for this API, else None."""
        return None

    def wants_stream(self, request, parsed) -> bool:
        raise NotImplementedError

    def default_chunks(self, request, parsed) -> List[Chunk]:
        raise NotImplementedError

    def default_response(self, request, parsed) -> Dict[str, Any]:
        raise NotImplementedError

    def _stream(self, request, chunks: List[Chunk], s: ProviderScript) -> None:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")
        if s.end_before_first:
            request.finish()
            return
        self.open_streams += 1
        finished = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        frames = [c if isinstance(c, bytes) else b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
        held = []

        def send(i: int) -> None:
            while True:
                if finished:
                    self.open_streams -= 1
                    return
                if s.cut_after is not None and i >= s.cut_after:
                    self.open_streams -= 1
                    request.channel.transport.loseConnection()
                    return
                if s.hold_after is not None and i >= s.hold_after and not held:
                    held.append(True)
                    self._held.append(lambda: send(i))
                    return
                if i >= len(frames):
                    self.open_streams -= 1
                    request.finish()
                    return
                request.write(frames[i])
                i += 1
                if s.pace:
                    self.reactor.callLater(s.pace, send, i)
                    return

        send(0)


class FakeOpenAI(FakeProvider):
    """A fake OpenAI API: ``POST {url}/v1/chat/completions`` (use ``baseUrl: {url}/v1``)."""

    name = "openai"

    def credential(self, request) -> Optional[str]:
        auth = request.getHeader(b"authorization") or b""
        return auth[7:].decode("latin-1") if auth.lower().startswith(b"bearer ") else None

    def check(self, request, parsed):
        if not request.path.endswith(b"/chat/completions"):
            return 404, openai_error(404, f"Invalid URL ({request.method.decode()} {request.path.decode()})")
        if not self.credential(request):
            return 401, openai_error(401, "You didn't provide an API key.", code="invalid_api_key")
        return None

    def wants_stream(self, request, parsed) -> bool:
        return parsed.get("stream") is True

    def default_chunks(self, request, parsed):
        usage = bool((parsed.get("stream_options") or {}).get("include_usage"))
        return openai_text_chunks(model=_dated(parsed.get("model") or "gpt-4o"), usage=usage)

    def default_response(self, request, parsed):
        return openai_completion(model=_dated(parsed.get("model") or "gpt-4o"))


class FakeGemini(FakeProvider):
    """A fake Gemini API: ``/v1beta/models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``."""

    name = "google-ai"

    def credential(self, request) -> Optional[str]:
        key = request.getHeader(b"x-goog-api-key")
        return key.decode("latin-1") if key else None

    @staticmethod
    def model_of(request) -> str:
        """The model named in a request's path."""
        path = unquote(request.path.decode("latin-1"))
        return path.rsplit("/", 1)[-1].split(":", 1)[0]

    def check(self, request, parsed):
        path = request.path
        if not path.startswith(b"/v1beta/models/") or not (
                path.endswith(b":generateContent") or path.endswith(b":streamGenerateContent")):
            return 404, gemini_error(404, f"Method not found: {path.decode()}", "NOT_FOUND")
        if not self.credential(request):
            return 403, gemini_error(403, "Method doesn't allow unregistered callers.", "PERMISSION_DENIED")
        return None

    def wants_stream(self, request, parsed) -> bool:
        return request.path.endswith(b":streamGenerateContent")

    def default_chunks(self, request, parsed):
        return gemini_text_chunks(model=self.model_of(request))

    def default_response(self, request, parsed):
        return gemini_response(model=self.model_of(request))


def _dated(model: str) -> str:
    # OpenAI answers with the dated snapshot an alias resolved to
    return model + "-2024-08-06" if model == "gpt-4o" else model


def listen_fake_openai(reactor=None) -> FakeOpenAI:
    """A :class:`FakeOpenAI` listening on a free loopback port."""
    fake = FakeOpenAI(reactor)
    fake.listen()
    return fake


def listen_fake_gemini(reactor=None) -> FakeGemini:
    """A :class:`FakeGemini` listening on a free loopback port."""
    fake = FakeGemini(reactor)
    fake.listen()
    return fake
