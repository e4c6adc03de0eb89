"""Test helpers: raw HTTP clients that see bytes and timings, the anthropic SDK off the reactor thread,
and a recording response sink."""

import json
from typing import List, Optional, Tuple

import treq
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from clproxy.errors import error_event
from clproxy.interfaces import IResponseSink
from clproxy.proxy.sse import SSEParser
from clproxy.proxy.upstream import BytesProducer

#: the SDK clients sdk() made during the running test (conftest closes them after it)
_sdk_clients: list = []


def sdk(proxy, **kwargs):
    """The official anthropic SDK pointed at the proxy, with no SDK-side retries (the proxy's are
    what the tests test). Closed after the test (its pooled connections, not left to the collector)."""
    import anthropic

    client = anthropic.Anthropic(base_url=proxy.url, api_key="client-key", max_retries=0, **kwargs)
    _sdk_clients.append(client)
    return client


def close_sdk_clients() -> None:
    """Close every client sdk() made since the last call."""
    while _sdk_clients:
        _sdk_clients.pop().close()


JSON_HEADERS = {b"content-type": [b"application/json"], b"anthropic-version": [b"2023-06-01"],
                b"x-api-key": [b"client-key"]}


def agent() -> Agent:
    """A fresh agent with no persistent connections (each test owns its sockets)."""
    return Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))


async def post(url: str, body: bytes, headers: Optional[dict] = None, method: bytes = b"POST"):
    """Send raw bytes; returns (status, Headers, body bytes)."""
    all_headers = dict(JSON_HEADERS)
    all_headers.update(headers or {})
    response = await agent().request(method, url.encode(), Headers(all_headers),
                                     BytesProducer(body) if body is not None else None)
    content = await treq.content(response)
    return response.code, response.headers, content


def error_of(body: bytes) -> Tuple[str, str]:
    """(error type, message) of an Anthropic error body."""
    parsed = json.loads(body)
    assert parsed["type"] == "error", parsed
    return parsed["error"]["type"], parsed["error"]["message"]


class TimedBody(protocol.Protocol):
    """Collects a streamed body with the reactor time each chunk arrived, parsing SSE as it goes."""

    def __init__(self):
        self.chunks: List[Tuple[float, bytes]] = []
        self.events = []  # (time, Event)
        self.parser = SSEParser()
        self.done = defer.Deferred()
        self.reason = None

    def dataReceived(self, data):
        now = reactor.seconds()
        self.chunks.append((now, data))
        for event in self.parser.feed(data):
            self.events.append((now, event))

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason
        self.done.callback(reason.check(ResponseDone, PotentialDataLoss) is not None)

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


async def stream(url: str, body: bytes, headers: Optional[dict] = None):
    """POST and deliver the body into a :class:`TimedBody`; returns (response, TimedBody) at once."""
    all_headers = dict(JSON_HEADERS)
    all_headers.update(headers or {})
    response = await agent().request(b"POST", url.encode(), Headers(all_headers), BytesProducer(body))
    collector = TimedBody()
    response.deliverBody(collector)
    return response, collector


def in_thread(function, *args, **kwargs):
    """Run blocking code (the anthropic/openai SDKs) in a thread while the reactor keeps serving."""
    return threads.deferToThread(function, *args, **kwargs)


async def until(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Wait on the real reactor until ``predicate()`` is true (for I/O to settle, not for timing)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


def request_body(stream: bool = False, model: str = "claude-sonnet-4-5", **extra) -> bytes:
    """A Claude-Code-like request body with deliberately unusual formatting (to catch re-serialising)."""
    doc = {"model": model, "max_tokens": 64, "stream": stream,
           "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
           "messages": [{"role": "user", "content": "héllo \u2603"}],
           "metadata": {"user_id": "user_abc"}}
    doc.update(extra)
    # keys out of order, odd spacing, escaped and raw unicode mixed: any re-encoding would show
    text = json.dumps(doc, indent=1, ensure_ascii=True).replace('"max_tokens": 64', '"max_tokens" :64')
    return text.encode("utf-8")


@implementer(IResponseSink)
class RecordingSink:
    """An :class:`~clproxy.interfaces.IResponseSink` that records what was written (the client's view
    of a raw Anthropic answer) and can play the client going away (:meth:`disconnect`)."""

    def __init__(self):
        self.disconnected = False
        self.started = False
        self.status: Optional[int] = None
        self.headers: list = []
        self.writes: List[bytes] = []
        self.finished = False
        self.cancel = None
        self.producer = None
        self.errors: list = []

    def on_disconnect(self, cancel):
        self.cancel = cancel

    def start(self, status, headers):
        if self.disconnected:
            return
        self.started = True
        self.status = status
        self.headers = list(headers)

    def write(self, data):
        if not self.disconnected:
            self.writes.append(data)

    def finish(self):
        if not self.disconnected:
            self.finished = True
            self.disconnected = True

    def send(self, status, headers, body):
        if self.disconnected:
            return
        self.start(status, headers)
        self.write(body)
        self.finish()

    def send_error(self, error):
        if self.disconnected:
            return
        self.errors.append(error)
        if self.started:
            self.write(error_event(error.message, error.error_type))
            self.finish()
            return
        self.send(error.status, [(b"content-type", [b"application/json"])]
                  + [(n, [v]) for n, v in error.headers], error.body())

    def register_producer(self, producer):
        self.producer = producer

    def unregister_producer(self):
        self.producer = None

    def disconnect(self):
        """The client goes away."""
        self.disconnected = True
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel()

    # -- reading what was written ---------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return b"".join(self.writes)

    def header(self, name: bytes):
        for key, values in self.headers:
            if key.lower() == name.lower():
                return values[0]
        return None

    def events(self):
        """The SSE events written, as (name, parsed data)."""
        return [(e.name, json.loads(e.data)) for e in SSEParser().feed(self.body)]


class ProducerRequest(DummyRequest):
    """A twisted.web request double whose producer registration keeps the (push) producer."""

    def __init__(self):
        super().__init__([b""])
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def make_clock(at: float) -> task.Clock:
    """A test clock already at ``at`` (a timestamp: the logs name their files by its day)."""
    clock = task.Clock()
    clock.advance(at)
    return clock


def jsonl_rows(path) -> list:
    """The rows of a JSONL file, decoded."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]
