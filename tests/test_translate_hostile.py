"""Hostile and malformed provider answers fed to the stream translators (clproxy.translate).

Each test feeds parsed provider chunks the way providers.translation.TranslatedStream does and checks
that the outcome is a well-formed Claude stream: either a truthful end or a final ``error`` event,
never an exception (which would escape into the transport's dataReceived) and never a broken block.
"""

import json

import pytest
from twisted.internet import task
from twisted.internet.error import ConnectionLost
from twisted.web._newclient import ResponseDone
from twisted.python.failure import Failure

from clproxy.providers.translation import TranslatedStream
from clproxy.translate.claude import ClaudeStreamSerializer, encode_sse
from clproxy.translate.gemini import GeminiStreamToClaude, gemini_to_claude_response
from clproxy.translate.openai import OpenAIStreamToClaude

try:
    from test_translate_claude import assert_valid_claude_stream
except ImportError:  # tests/ imported as a package
    from tests.test_translate_claude import assert_valid_claude_stream


def _run(translator, chunks):
    events = []
    for chunk in chunks:
        events += translator.feed(chunk)
    return events + translator.finish()


def _oc(delta=None, finish=None, **extra):
    return dict({"model": "gpt-4o", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}, **extra)


def _tc(index, id=None, name=None, args=None):
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    call = {"index": index, "function": function}
    if id is not None:
        call["id"] = id
    return {"tool_calls": [call]}


def _gc(parts, finish=None, **extra):
    candidate = {"content": {"role": "model", "parts": parts}}
    if finish:
        candidate["finishReason"] = finish
    return dict({"candidates": [candidate], "modelVersion": "gemini-2.5-flash"}, **extra)


def _ends_in_error(events):
    assert_valid_claude_stream(events)  # message_start first, indexes in order, error last
    assert events[-1][0] == "error", [name for name, _ in events]
    assert not any(name == "message_stop" for name, _ in events)


MALFORMED_OPENAI = [
    pytest.param(["not an object"], id="chunk-is-a-string"),
    pytest.param([{"choices": [None]}], id="choice-null"),
    pytest.param([{"choices": "abc"}], id="choices-string"),
    pytest.param([_oc({"content": 5}), _oc(finish="stop")], id="content-number"),
    pytest.param([_oc({"content": {"a": 1}}), _oc(finish="stop")], id="content-object"),
    pytest.param([_oc({"refusal": 7}), _oc(finish="stop")], id="refusal-number"),
    pytest.param([_oc({"tool_calls": [None]})], id="tool-call-null"),
    pytest.param([_oc({"tool_calls": [{"index": [1], "function": {"name": "f"}}]})], id="tool-index-list"),
    pytest.param([_oc(_tc(0, "call_1", "f", {"a": 1})), _oc(finish="tool_calls")], id="arguments-object"),
    pytest.param([_oc(_tc(0, "call_1", 5, "")), _oc(finish="tool_calls")], id="name-number"),
    pytest.param([_oc({"content": "hi"}, "stop"), {"choices": [], "usage": [1, 2]}], id="usage-list"),
    pytest.param([_oc({"content": "hi"}, "stop"), {"choices": [], "usage": {"prompt_tokens": "x"}}], id="usage-string"),
    pytest.param([_oc({"content": "hi"}), _oc(finish={"why": "stop"})], id="finish-reason-object"),
]


@pytest.mark.parametrize("chunks", MALFORMED_OPENAI)
def test_openai_malformed_chunk_is_an_error_event_not_an_exception(chunks):
    """A chunk of the wrong shape ends the Claude stream with an error event instead of raising.

    Before the fix these raised AttributeError/TypeError out of feed()/finish() (into the transport),
    or emitted a text_delta whose text was a number/object, with a message_stop claiming success.
    """
    _ends_in_error(_run(OpenAIStreamToClaude("gpt-4o"), chunks))


MALFORMED_GEMINI = [
    pytest.param([{"candidates": [None]}], id="candidate-null"),
    pytest.param([{"candidates": [{"content": "x"}]}], id="content-string"),
    pytest.param([_gc([None])], id="part-null"),
    pytest.param([_gc([{"text": 5}], "STOP")], id="text-number"),
    pytest.param([_gc([{"functionCall": "x"}], "STOP")], id="function-call-string"),
    pytest.param([_gc([{"functionCall": {"name": "f", "args": [1, 2]}}], "STOP")], id="args-list"),
    pytest.param([_gc([{"functionCall": {"name": "f", "args": "s"}}], "STOP")], id="args-string"),
    pytest.param([_gc([{"functionCall": {"args": {}}}], "STOP")], id="call-without-name"),
    pytest.param([_gc([{"text": "t", "thought": True, "thoughtSignature": 5}], "STOP")], id="signature-number"),
    pytest.param([_gc([{"text": "hi"}], "STOP", usageMetadata={"promptTokenCount": "x"})], id="usage-string"),
    pytest.param([_gc([{"text": "hi"}]), _gc([], "STOP", usageMetadata=[1])], id="usage-list"),
    pytest.param([_gc([{"text": "hi"}]), _gc([], ["STOP"])], id="finish-reason-list"),
]


@pytest.mark.parametrize("chunks", MALFORMED_GEMINI)
def test_gemini_malformed_chunk_is_an_error_event_not_an_exception(chunks):
    """A Gemini chunk of the wrong shape ends the Claude stream with an error event instead of raising.

    Before the fix: exceptions out of feed(), tool_use blocks with a list/string input or an empty
    name, and text deltas holding numbers, all closed by a message_stop.
    """
    _ends_in_error(_run(GeminiStreamToClaude("claude-x", None), chunks))


def test_gemini_whole_answer_with_list_args_is_a_value_error():
    """A non-streaming Gemini answer whose functionCall.args is not an object is refused (ValueError,
    which the caller turns into a 502), not returned as a tool_use with input [1]."""
    with pytest.raises(ValueError):
        gemini_to_claude_response(_gc([{"functionCall": {"name": "f", "args": [1]}}], "STOP"), "c", None)


def test_openai_model_that_is_not_a_string_is_not_copied_into_message_start():
    """message_start.model is always a string: a numeric chunk model falls back to the requested model."""
    events = _run(OpenAIStreamToClaude("gpt-4o"), [_oc({"content": "hi"}, "stop", model=5)])
    assert events[0][1]["message"]["model"] == "gpt-4o"
    assert assert_valid_claude_stream(events, allow_error=False)["content"][0]["text"] == "hi"


def test_openai_two_calls_sharing_index_zero_become_two_tool_uses():
    """Servers that send every call with index 0 (a new id each) get one tool_use per call.

    Before the fix both argument strings were glued into one block: '{"a":1}{"b":2}', invalid JSON.
    """
    chunks = [
        _oc(_tc(0, "call_a", "f", '{"a":')),
        _oc(_tc(0, args="1}")),
        _oc(_tc(0, "call_b", "g", '{"b":2}')),
        _oc(finish="tool_calls"),
    ]
    message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), chunks), allow_error=False)
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_a", "f", {"a": 1}),
        ("call_b", "g", {"b": 2}),
    ]
    assert message["stop_reason"] == "tool_use"


def test_openai_whole_calls_without_index_or_id_become_one_tool_use_each():
    """Gemini's OpenAI-compatible endpoint sends whole tool calls with no index and id "": two of
    them in one chunk (or in two chunks) are two tool_use blocks.

    Before the fix they were glued into one call with arguments '{..}{..}' and the stream ended in
    an error. A call streamed in pieces without index (the name only on the first) stays one call."""
    calls = [{"id": "", "type": "function", "function": {"name": "read", "arguments": '{"path":"a"}'}},
             {"id": "", "type": "function", "function": {"name": "grep", "arguments": '{"q":"b"}'}}]
    for chunks in ([_oc({"tool_calls": calls}, "stop")],
                   [_oc({"tool_calls": calls[:1]}), _oc({"tool_calls": calls[1:]}, "stop")]):
        message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), chunks), allow_error=False)
        assert [(b["name"], b["input"]) for b in message["content"]] == [("read", {"path": "a"}), ("grep", {"q": "b"})]
        assert message["stop_reason"] == "tool_use"
    pieces = [_oc({"tool_calls": [{"function": {"name": "read", "arguments": '{"path":'}}]}),
              _oc({"tool_calls": [{"function": {"arguments": '"a"}'}}]}), _oc(finish="tool_calls")]
    message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), pieces), allow_error=False)
    assert [(b["name"], b["input"]) for b in message["content"]] == [("read", {"path": "a"})]


@pytest.mark.parametrize(
    "pieces, then",
    [
        (['{"path": "a', '.txt"'], _oc(finish="tool_calls")),  # cut JSON, then the end
        (["[1, 2]"], _oc(finish="tool_calls")),  # valid JSON, not an object
        (['{"a":1', "}}"], _oc(finish="tool_calls")),  # trailing garbage
        (['{"a":'], _oc({"content": "after"})),  # text closes the broken call
    ],
)
def test_openai_tool_arguments_that_are_not_an_object_end_in_error(pieces, then):
    """A streamed call whose arguments never form a JSON object ends with an error event, not a
    content_block_stop + message_stop whose tool input Claude Code cannot parse."""
    chunks = [_oc(_tc(0, "call_1", "edit", pieces[0]))] + [_oc(_tc(0, args=p)) for p in pieces[1:]] + [then]
    _ends_in_error(_run(OpenAIStreamToClaude("m"), chunks))


def test_openai_broken_first_call_is_caught_when_the_second_opens():
    """The arguments of a call are checked when the next call opens its block (before its content_block_stop)."""
    chunks = [_oc(_tc(0, "call_1", "f", '{"a":')), _oc(_tc(1, "call_2", "g", "{}")), _oc(finish="tool_calls")]
    events = _run(OpenAIStreamToClaude("m"), chunks)
    _ends_in_error(events)
    assert [n for n, _ in events].count("content_block_start") == 1


def test_arguments_before_name_and_index_jump_still_make_valid_tool_uses():
    """Arguments arriving before the name are held, and a jumping index (0 then 5) opens a new call:
    both calls come out whole and valid (guards the reworked tool bookkeeping)."""
    chunks = [
        _oc(_tc(0, args='{"x"')),
        _oc(_tc(0, id="call_0", name="f", args=": 1}")),
        _oc(_tc(5, id="call_5", name="g")),
        _oc(_tc(5, args="{}")),
        _oc(finish="tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
    ]
    message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), chunks), allow_error=False)
    assert [(b["name"], b["input"]) for b in message["content"]] == [("f", {"x": 1}), ("g", {})]
    assert message["usage"]["output_tokens"] == 2


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "nul\x00byte", "\U0001f600 emoji", "\u2028\u2029"])
def test_every_unicode_text_serialises_to_valid_utf8_sse(text):
    """Any text a provider's JSON can hold (lone surrogates from \\ud800 escapes included) is encodable.

    Before the fix encode_sse raised UnicodeEncodeError on a lone surrogate, so the stream died with
    an exception in the middle of _emit.
    """
    chunk = json.loads(json.dumps(_oc({"content": text}, "stop")))
    events = _run(OpenAIStreamToClaude("m"), [chunk])
    wire = b"".join(encode_sse(name, data) for name, data in events)
    wire.decode("utf-8")  # strict: must be valid UTF-8
    data_lines = [line[6:] for line in wire.split(b"\n") if line.startswith(b"data: ")]
    deltas = [json.loads(d) for d in data_lines if b"text_delta" in d]
    assert "".join(d["delta"]["text"] for d in deltas) == text


def test_serializer_refuses_non_string_text():
    """The serializer never emits a text_delta whose text is not a string (the translators turn this into an error)."""
    s = ClaudeStreamSerializer("m")
    s.start()
    with pytest.raises(TypeError):
        s.text(42)


# -- over a loopback-like transport: the bytes a provider sends, through TranslatedStream ---------


class _Out:
    """The client side of a translated stream: records what would reach Claude Code."""

    disconnected = False

    def __init__(self):
        self.started = None
        self.body = b""
        self.finished = False

    def start(self, status, headers):
        self.started = status

    def write(self, data):
        self.body += data

    def finish(self):
        self.finished = True

    def register_producer(self, producer):
        pass

    def unregister_producer(self):
        pass


class _Transport:
    def __init__(self, protocol):
        self.protocol = protocol
        self.stopped = False

    def stopProducing(self):
        if not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(Failure(ResponseDone()))


def _stream(translator, *bodies, lost=None):
    """Feed ``bodies`` (provider reads) through a TranslatedStream, then end the connection with
    ``lost`` (a clean end by default)."""
    out = _Out()
    stream = TranslatedStream(
        translator, clock=task.Clock(), out=out, commit=lambda model: out.start(200, []),
        provider="openai", idle_timeout=0, keepalive_interval=0,
    )
    stream.makeConnection(_Transport(stream))
    for body in bodies:
        stream.dataReceived(body)
    if not stream.transport.stopped:
        stream.connectionLost(lost or Failure(ResponseDone()))
    return out, stream


def test_malformed_chunk_after_text_over_the_wire_ends_with_event_error():
    """Provider bytes: a good text chunk, then a chunk with choices [null]. The client gets the text
    and then ``event: error`` (the exception no longer escapes dataReceived)."""
    out, stream = _stream(
        OpenAIStreamToClaude("gpt-4o"),
        b"data: " + json.dumps(_oc({"content": "Hel"})).encode() + b"\n\n",
        b"data: " + json.dumps({"choices": [None]}).encode() + b"\n\ndata: [DONE]\n\n",
    )
    assert out.started == 200 and out.finished
    assert b"event: error" in out.body and b"message_stop" not in out.body
    assert b'"text":"Hel"' in out.body
    assert stream.done.called


def test_malformed_first_chunk_over_the_wire_leaves_the_client_untouched():
    """A provider whose first chunk is malformed has written nothing: the stream gives up (the fallback
    chain can try the next provider) instead of raising out of dataReceived."""
    out, stream = _stream(OpenAIStreamToClaude("gpt-4o"), b'data: {"choices":"abc"}\n\ndata: [DONE]\n\n')
    assert out.started is None and out.body == b""
    assert stream.done.called and stream.done.result is not None
    stream.done.addErrback(lambda f: None)


def test_lone_surrogate_over_the_wire_reaches_the_client_escaped():
    """Provider bytes with a JSON \\ud800 escape: the client gets valid UTF-8 SSE ending in message_stop."""
    body = b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"x\\ud800y"},"finish_reason":"stop"}]}\n\n' \
           b"data: [DONE]\n\n"
    out, _ = _stream(OpenAIStreamToClaude("gpt-4o"), body)
    out.body.decode("utf-8")
    assert b"\\ud800" in out.body and out.body.rstrip().endswith(b'{"type":"message_stop"}')


def _frame(chunk):
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _client_events(body):
    """The (name, data) events a client reads from SSE bytes."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if len(lines) >= 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
            events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


def test_a_bad_frame_after_the_end_in_the_same_read_does_not_lose_the_answer():
    """One read holds the text, the finish_reason, the usage chunk and then a frame that is JSON but
    not an object: what the good frames made is written before the stream stops.

    Before the fix those events were dropped while the translator had moved past them, so the client
    got content_block_stop, message_delta and message_stop with no message_start and no text."""
    read = (_frame(_oc({"role": "assistant", "content": "Hello world"})) + _frame(_oc(finish="stop"))
            + _frame({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}) + b"data: 42\n\n")
    out, stream = _stream(OpenAIStreamToClaude("gpt-4o"), read)
    message = assert_valid_claude_stream(_client_events(out.body), allow_error=False)
    assert message["content"] == [{"type": "text", "text": "Hello world"}]
    assert message["usage"]["output_tokens"] == 2 and out.started == 200 and out.finished


_TEXT_AND_STOP = _frame(_oc({"role": "assistant", "content": "Hello world"})) + _frame(_oc(finish="stop"))
_USAGE = _frame({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})


@pytest.mark.parametrize("reads, lost", [
    ([_TEXT_AND_STOP], Failure(ConnectionLost("connection reset"))),  # cut before the usage chunk
    ([_TEXT_AND_STOP + b"data: 42\n\n"], None),  # a bad frame before the usage chunk
], ids=["cut", "bad-frame"])
def test_a_stream_that_fails_before_its_usage_chunk_ends_in_error(reads, lost):
    """OpenAI streams the finish_reason, then the include_usage chunk, then [DONE]. A stream that
    breaks (or sends garbage) between the two is cut short: the client gets the text and then
    event: error, not message_stop with usage 0/0 reported as real.

    Before the fix a finish_reason alone counted as the whole answer."""
    out, _ = _stream(OpenAIStreamToClaude("gpt-4o"), *reads, lost=lost)
    events = _client_events(out.body)
    assert events[-1][0] == "error" and "message_stop" not in [name for name, _ in events]
    assert assert_valid_claude_stream(events) is None and b'"text":"Hello world"' in out.body


def test_a_stream_cut_after_its_usage_chunk_is_the_whole_answer():
    """A connection broken after the usage chunk (before [DONE]) lost nothing: message_stop, real usage."""
    out, _ = _stream(OpenAIStreamToClaude("gpt-4o"), _TEXT_AND_STOP + _USAGE,
                     lost=Failure(ConnectionLost("connection reset")))
    message = assert_valid_claude_stream(_client_events(out.body), allow_error=False)
    assert message["content"][0]["text"] == "Hello world" and message["usage"]["output_tokens"] == 2
