"""One contract for every IResponseSink: what Dispatcher.forward relies on, run against each implementation.

Each implementation comes with a small "client" that reads what reached the other side: the bytes
of a twisted.web request (``ClientResponse``), the sink's own record (``CapturedResponse``, the test
helper), the inner sink of a wrapper (``OpenAIResponseAdapter``, the dispatcher's ``TimedSink``).
The answers written are Claude-shaped (the dispatcher's language); the checks hold whatever shape
the client gets (Anthropic's bytes, or OpenAI's translation of them): statuses, texts in order,
error messages, Retry-After.
"""

import json

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from clproxy.errors import ProxyError
from clproxy.http.openai import CapturedResponse, OpenAIResponseAdapter
from clproxy.http.site import ClientResponse
from clproxy.interfaces import IResponseSink
from clproxy.proxy.dispatch import TimedSink
from clproxy.proxy.sse import encode_event
from clproxy.testing.anthropic import message, text_stream

from helpers import ProducerRequest as _Request, RecordingSink

SSE = [(b"content-type", [b"text/event-stream"])]
JSON = [(b"content-type", [b"application/json"])]


class _Client:
    """What one implementation's client saw: ``status``, ``header(name)``, ``body``; ``gone()`` leaves."""

    def __init__(self, status, header, body, gone, producer=lambda: None):
        self._status, self._header, self._body, self.gone, self._producer = status, header, body, gone, producer

    @property
    def status(self):
        return self._status()

    def header(self, name: bytes):
        return self._header(name)

    @property
    def body(self) -> bytes:
        return self._body()

    @property
    def producer(self):
        return self._producer()


def _client_response():
    request = _Request()
    sink = ClientResponse(request)

    def header(name):
        values = request.responseHeaders.getRawHeaders(name)
        return values[0] if values else None

    return sink, _Client(lambda: getattr(request, "responseCode", None), header,
                         lambda: b"".join(request.written),
                         lambda: request.processingFailed(Failure(ConnectionDone("client left"))),
                         lambda: request.producer)


def _over_recording(sink, inner: RecordingSink):
    return sink, _Client(lambda: inner.status, inner.header, lambda: inner.body, inner.disconnect,
                         lambda: inner.producer)


def _recording():
    sink = RecordingSink()
    return _over_recording(sink, sink)


def _captured():
    sink = CapturedResponse()

    def header(name):
        for key, values in sink.headers:
            if key.lower() == name.lower():
                return values[0]
        return None

    return sink, _Client(lambda: sink.status, header, lambda: sink.body, sink.abandon)


def _openai(stream: bool):
    def make():
        inner = RecordingSink()
        return _over_recording(OpenAIResponseAdapter(inner, "claude-sonnet-4-5", stream, now=lambda: 0.0), inner)
    return make


def _openai_over_client_response():
    sink, client = _client_response()
    return OpenAIResponseAdapter(sink, "claude-sonnet-4-5", True, now=lambda: 0.0), client


class _Record:
    """The recorder's side of TimedSink: when the first byte went out."""

    def __init__(self):
        self.first_bytes = 0

    def first_byte(self):
        self.first_bytes += 1


def _timed():
    inner = RecordingSink()
    return _over_recording(TimedSink(inner, _Record()), inner)


IMPLEMENTATIONS = {
    "ClientResponse": _client_response,
    "CapturedResponse": _captured,
    "RecordingSink": _recording,
    "OpenAIResponseAdapter": _openai(stream=False),
    "OpenAIResponseAdapter-stream": _openai(stream=True),
    "OpenAIResponseAdapter-ClientResponse": _openai_over_client_response,
    "TimedSink": _timed,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def pair(request):
    """(sink, client) for each implementation."""
    return IMPLEMENTATIONS[request.param]()


def _claude_stream(parts):
    return [encode_event(name, data) for name, data in text_stream(parts)]


def _in_order(body: bytes, texts) -> bool:
    at = 0
    for text in texts:
        found = body.find(text.encode(), at)
        if found < 0:
            return False
        at = found + len(text)
    return True


def test_provides_the_interface(pair):
    """Every sink implementation really provides IResponseSink, as verifyObject checks it."""
    sink, _ = pair
    assert verifyObject(IResponseSink, sink)


def test_status_is_none_until_an_answer_then_the_answers(pair):
    """A sink's status is None, and it is neither started nor disconnected, until an answer is sent;
    then it reports that answer's 200, and the client received it."""
    sink, client = pair
    assert sink.status is None and not sink.started and not sink.disconnected
    sink.send(200, JSON, json.dumps(message("hi")).encode())
    assert sink.status == 200 and sink.started
    assert client.status == 200


def test_a_whole_answer_reaches_the_client_once_and_ends_it(pair):
    """A whole answer reaches the client once and ends the response: a late write or a second send (500)
    changes neither the client's body nor the 200 status."""
    sink, client = pair
    sink.send(200, JSON + [(b"request-id", [b"req_1"])], json.dumps(message("the whole answer")).encode())
    assert b"the whole answer" in client.body
    assert sink.disconnected  # finished: nothing more can be written
    before = client.body
    sink.write(b"late")
    sink.send(500, JSON, b"{}")
    assert client.body == before and sink.status == 200


def test_a_streams_chunks_reach_the_client_in_order(pair):
    """A stream of 4 parts, each frame written in two pieces split anywhere, reaches the client in order
    with status 200, and finishing it ends the response."""
    sink, client = pair
    sink.start(200, SSE)
    assert sink.started and sink.status == 200 and not sink.disconnected
    producer = object()
    sink.register_producer(producer)
    assert client.producer in (None, producer)  # a sink without a connection may ignore it
    parts = ["alpha", " beta", " gamma", " delta"]
    for frame in _claude_stream(parts):
        sink.write(frame[:7])  # split anywhere: the sink must not care
        sink.write(frame[7:])
    sink.unregister_producer()
    sink.finish()
    assert client.status == 200
    assert _in_order(client.body, parts)
    assert sink.disconnected


def test_an_error_answer_keeps_status_message_and_retry_after(pair):
    """An error answer keeps its 429 status, its message and its Retry-After of 17 on the way to the
    client, then ends the response."""
    sink, client = pair
    sink.send_error(ProxyError(429, "all accounts are cooling", "rate_limit_error",
                               headers=[(b"retry-after", b"17")]))
    assert sink.status == 429 and client.status == 429
    assert b"all accounts are cooling" in client.body
    assert client.header(b"retry-after") == b"17"
    assert sink.disconnected


def test_an_error_after_the_stream_started_is_an_event_in_it(pair):
    """An error after the stream has started becomes an event in it after the text already sent, and
    the status stays the committed 200."""
    sink, client = pair
    sink.start(200, SSE)
    frames = _claude_stream(["first"])
    sink.write(b"".join(frames[:4]))  # message_start .. the first delta
    sink.send_error(ProxyError(502, "upstream broke off the stream"))
    assert sink.status == 200 and client.status == 200  # committed: the status cannot change
    assert _in_order(client.body, ["first", "upstream broke off the stream"])
    assert sink.disconnected


def test_an_upstream_error_answer_is_relayed_with_its_status(pair):
    """An upstream error answer sent as such (529 overloaded) reaches the client with its own status and
    its message."""
    sink, client = pair
    body = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}).encode()
    sink.send(529, JSON, body)
    assert sink.status == 529 and client.status == 529
    assert b"Overloaded" in client.body


def test_the_client_going_away_cancels_and_silences(pair):
    """When the client goes away only the last on_disconnect callback runs, the status stays None (so
    499 is recorded), and every later start, write, send, error or finish reaches nobody."""
    sink, client = pair
    cancelled = []
    sink.on_disconnect(lambda: cancelled.append("first"))
    sink.on_disconnect(lambda: cancelled.append("second"))  # replaces the first
    client.gone()
    assert sink.disconnected
    assert cancelled == ["second"]
    assert sink.status is None  # nothing was answered: the dispatcher records 499
    sink.start(200, SSE)
    sink.write(b"data: late\n\n")
    sink.send(200, JSON, b"{}")
    sink.send_error(ProxyError(500, "nobody to tell"))
    sink.finish()
    assert client.body == b"" and sink.status is None


def test_the_client_going_away_mid_stream_keeps_what_was_sent(pair):
    """A client gone mid-stream fires the disconnect callback, keeps the status 200 already sent, and
    gets none of the events written after it left."""
    sink, client = pair
    cancelled = []
    sink.start(200, SSE)
    sink.on_disconnect(lambda: cancelled.append(True))
    frames = _claude_stream(["kept"])
    sink.write(b"".join(frames[:4]))
    client.gone()
    assert cancelled == [True] and sink.disconnected and sink.status == 200
    before = client.body
    sink.write(b"".join(frames[4:]))
    sink.finish()
    assert client.body == before


def test_timed_sink_tells_the_record_of_the_first_byte_once():
    """TimedSink tells the record of its first byte exactly once, even when a stream start is followed
    by an error, so the time to first byte is not overwritten."""
    inner, record = RecordingSink(), _Record()
    sink = TimedSink(inner, record)
    sink.start(200, SSE)
    sink.send_error(ProxyError(502, "cut"))
    assert record.first_bytes == 1


def test_timed_sink_tells_nothing_when_the_client_left_first():
    """TimedSink records no first byte when the client had already left before the answer, as no byte
    ever reached it."""
    inner, record = RecordingSink(), _Record()
    sink = TimedSink(inner, record)
    inner.disconnect()
    sink.send(200, JSON, b"{}")
    assert record.first_bytes == 0


def test_upstream_and_recorder_provide_their_interfaces(tmp_path):
    """The other seams the dispatcher uses are written down and kept (zope verifyObject)."""
    from twisted.internet import task
    from zope.interface.verify import verifyObject

    from clproxy.interfaces import IRequestObserver, IRequestRecord, IUpstream
    from clproxy.observe.recorder import Observability
    from clproxy.proxy.upstream import UpstreamClient
    from clproxy.testing.memory import MemoryAgent

    clock = task.Clock()
    assert verifyObject(IUpstream, UpstreamClient(clock, agent=MemoryAgent(None, clock)))
    obs = Observability(clock=clock, logs_dir=str(tmp_path), environ={})
    assert verifyObject(IRequestObserver, obs)
    record = obs.begin(request_id="r", method="POST", path="/v1/messages", model="m", stream=False,
                       headers=[], body=None)
    assert verifyObject(IRequestRecord, record)
