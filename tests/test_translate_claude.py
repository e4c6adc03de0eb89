"""Tests for clproxy.translate.claude: ids, SSE encoding, request normalisation and the stream serializer.

``assert_valid_claude_stream`` is the stream validator the OpenAI and Gemini translator tests share.
"""

import base64
import json
import re

import anthropic.types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clproxy.translate.claude import (
    ClaudeStreamSerializer,
    EmptyStreamError,
    TranslationError,
    assemble_message,
    content_blocks,
    encode_sse,
    is_foreign_thinking,
    is_valid_tool_use_id,
    make_usage,
    new_message_id,
    new_tool_use_id,
    stable_tool_use_id,
    strip_foreign_thinking,
    system_text,
    tool_result_parts,
)

ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]+$")

_DELTA_KIND = {
    "text_delta": "text",
    "citations_delta": "text",
    "input_json_delta": "tool_use",
    "thinking_delta": "thinking",
    "signature_delta": "thinking",
}


class InvalidStream(AssertionError):
    """A Claude event sequence broke the protocol."""


def assert_valid_claude_stream(events, allow_error=True):
    """Check that ``events`` is a valid Claude SSE sequence and return the message it builds.

    message_start first; blocks opened one at a time with indexes 0, 1, 2 ...; deltas only inside the
    open block and of its kind; every block stopped; message_delta after the last block; message_stop
    last. A stream may instead end with an ``error`` event (returns None then) when ``allow_error``.
    """

    def fail(msg, i):
        raise InvalidStream("event %d: %s\n%s" % (i, msg, json.dumps(events, indent=1)[:4000]))

    if not events:
        raise InvalidStream("empty event sequence")
    message = None
    open_index = None
    open_kind = None
    next_index = 0
    partial = {}
    saw_delta = False
    stopped = False
    for i, (name, data) in enumerate(events):
        if not isinstance(data, dict) or data.get("type") != name:
            fail("event name %r does not match data type %r" % (name, data.get("type")), i)
        json.dumps(data)  # must be JSON-serialisable
        if stopped:
            fail("event after the end of the stream", i)
        if name == "ping":
            continue
        if name == "error":
            if not allow_error:
                fail("error event", i)
            if set(data["error"]) < {"type", "message"}:
                fail("error event without type and message", i)
            if i != len(events) - 1:
                fail("error event is not the last event", i)
            return None
        if i == 0 or message is None:
            if name != "message_start" or message is not None:
                fail("first event must be message_start, got %s" % name, i)
            message = json.loads(json.dumps(data["message"]))
            if message["content"] != [] or message["role"] != "assistant" or message["type"] != "message":
                fail("message_start must carry an empty assistant message", i)
            if not message["id"].startswith("msg_"):
                fail("message id must start with msg_", i)
            for key in ("input_tokens", "output_tokens"):
                if not isinstance(message["usage"].get(key), int):
                    fail("message_start usage lacks %s" % key, i)
            continue
        if name == "message_start":
            fail("second message_start", i)
        if saw_delta and name != "message_stop":
            fail("only message_stop may follow message_delta", i)
        if name == "content_block_start":
            if open_index is not None:
                fail("block %d opened while block %d is open" % (data["index"], open_index), i)
            if data["index"] != next_index:
                fail("block index %d, expected %d" % (data["index"], next_index), i)
            block = data["content_block"]
            kind = block["type"]
            if kind == "text" and block.get("text") != "":
                fail("text block must start empty", i)
            if kind == "tool_use":
                if block.get("input") != {} or not ANTHROPIC_ID.match(block.get("id", "")) or not block.get("name"):
                    fail("tool_use block needs a valid id, a name and input {}", i)
            if kind == "thinking" and (block.get("thinking") != "" or block.get("signature") != ""):
                fail("thinking block must start empty", i)
            open_index, open_kind = data["index"], kind
            next_index += 1
            message["content"].append(dict(block))
        elif name == "content_block_delta":
            if open_index is None or data["index"] != open_index:
                fail("delta for block %r, open block is %r" % (data["index"], open_index), i)
            delta = data["delta"]
            if _DELTA_KIND.get(delta["type"]) != open_kind:
                fail("%s inside a %s block" % (delta["type"], open_kind), i)
            block = message["content"][open_index]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial.setdefault(open_index, "")
                partial[open_index] += delta["partial_json"]
        elif name == "content_block_stop":
            if open_index is None or data["index"] != open_index:
                fail("stop for block %r, open block is %r" % (data["index"], open_index), i)
            if open_kind == "tool_use":
                try:
                    value = json.loads(partial.pop(open_index, "") or "{}")
                except ValueError:
                    fail("tool input is not valid JSON", i)
                if not isinstance(value, dict):
                    fail("tool input is not a JSON object", i)
                message["content"][open_index]["input"] = value
            open_index = open_kind = None
        elif name == "message_delta":
            if open_index is not None:
                fail("message_delta while block %d is open" % open_index, i)
            if data["delta"].get("stop_reason") is None:
                fail("message_delta without stop_reason", i)
            if not isinstance(data["usage"].get("output_tokens"), int):
                fail("message_delta usage lacks output_tokens", i)
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["stop_sequence"] = data["delta"].get("stop_sequence")
            message["usage"].update(data["usage"])
            saw_delta = True
        elif name == "message_stop":
            if not saw_delta:
                fail("message_stop before message_delta", i)
            stopped = True
        else:
            fail("unexpected event %r" % name, i)
    if not stopped:
        raise InvalidStream("stream does not end with message_stop")
    anthropic.types.Message.model_validate(message)  # the SDK can read what we built
    return message


# ------------------------------------------------------------------ the validator itself


def _good_stream():
    s = ClaudeStreamSerializer("m", message_id="msg_1")
    return s.start() + s.text("a") + s.tool_start("toolu_1", "f") + s.tool_args("{}") + s.stop("tool_use")


def test_validator_accepts_a_good_stream():
    """The validator accepts a plain serializer stream and returns its message."""
    message = assert_valid_claude_stream(_good_stream())
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda ev: ev[1:],  # no message_start
        lambda ev: ev[:-1],  # no message_stop
        lambda ev: [e for e in ev if e[0] != "content_block_stop"],  # blocks never closed
        lambda ev: ev[:3] + ev[4:],  # text block not stopped before the tool block starts
        lambda ev: [(n, dict(d, index=d["index"] + 1)) if n == "content_block_start" else (n, d) for n, d in ev],
        lambda ev: [
            (n, dict(d, delta={"type": "thinking_delta", "thinking": "x"})) if n == "content_block_delta" else (n, d)
            for n, d in ev
        ],
        lambda ev: ev[:-2] + [ev[-1], ev[-2]],  # message_stop before message_delta
        lambda ev: [(n, dict(d, type="other")) if n == "message_stop" else (n, d) for n, d in ev],
    ],
)
def test_validator_rejects_broken_streams(mutate):
    """The validator fails on missing, misordered, misindexed or mistyped events."""
    with pytest.raises(InvalidStream):
        assert_valid_claude_stream(mutate(_good_stream()))


# ------------------------------------------------------------------ ids, errors, SSE


def test_message_and_tool_ids_have_anthropic_shapes():
    """Fresh ids carry msg_/toolu_ prefixes, match Anthropic's id pattern and differ each time."""
    assert new_message_id().startswith("msg_")
    ids = {new_tool_use_id() for _ in range(50)}
    assert len(ids) == 50
    for tool_id in ids:
        assert tool_id.startswith("toolu_") and ANTHROPIC_ID.match(tool_id)


@pytest.mark.parametrize("foreign", ["call_abc123", "toolu_01XyZ", "a-b_c"])
def test_stable_tool_use_id_keeps_valid_ids(foreign):
    """A foreign id that already fits Anthropic's pattern is kept as is."""
    assert stable_tool_use_id(foreign) == foreign


@pytest.mark.parametrize("foreign", ["call:1", "fc/2", "id with space", "ünïcode", ""])
def test_stable_tool_use_id_derives_valid_stable_ids(foreign):
    """An invalid foreign id maps to the same valid toolu_ id every time."""
    derived = stable_tool_use_id(foreign)
    assert derived.startswith("toolu_") and is_valid_tool_use_id(derived)
    assert derived == stable_tool_use_id(foreign)


def test_stable_tool_use_id_does_not_collide_on_sanitisable_ids():
    """Ids that differ only in invalid characters still map to different Claude ids."""
    assert stable_tool_use_id("a.b") != stable_tool_use_id("a:b")


def test_translation_error_carries_message():
    """TranslationError exposes the client-facing text as .message."""
    err = TranslationError("messages.2.content.0: block type 'server_tool_use' is not supported")
    assert err.message == str(err)


def test_encode_sse_is_compact_and_framed():
    """encode_sse writes an event line, a compact JSON data line and a blank line, UTF-8."""
    raw = encode_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"text": "é"}})
    assert raw == (
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"text":"é"}}\n\n'
    ).encode("utf-8")


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "system, expected",
    [
        (None, ""),
        ("plain", "plain"),
        ([{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}], "a\n\nb"),
    ],
)
def test_system_text_flattens_string_or_blocks(system, expected):
    """system as absent, a string or text blocks flattens to one string."""
    assert system_text(system) == expected


def test_system_text_rejects_non_text_blocks():
    """A non-text system block is a TranslationError naming it."""
    with pytest.raises(TranslationError, match="system.0.*image"):
        system_text([{"type": "image"}])


def test_content_blocks_normalises_strings():
    """A string content becomes one text block; an empty string none."""
    assert content_blocks("hi") == [{"type": "text", "text": "hi"}]
    assert content_blocks("") == []
    assert content_blocks([{"type": "text", "text": "x"}]) == [{"type": "text", "text": "x"}]


def test_tool_result_parts_splits_text_images_and_rejects_others():
    """tool_result content splits into texts and images; unsupported blocks raise."""
    image = {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}
    texts, images = tool_result_parts({"content": [{"type": "text", "text": "t"}, image]}, "m.0")
    assert texts == ["t"] and images == [image]
    assert tool_result_parts({"content": "s"}, "m.0") == (["s"], [])
    with pytest.raises(TranslationError, match="search_result"):
        tool_result_parts({"content": [{"type": "search_result"}]}, "m.0")


def test_strip_foreign_thinking_removes_only_translated_blocks():
    """Thinking blocks with empty or gemini: signatures go; Anthropic-signed ones stay."""
    req = {
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "a", "signature": "EqAnthropicSig"},
                    {"type": "thinking", "thinking": "b", "signature": ""},
                    {"type": "thinking", "thinking": "", "signature": "gemini:abc"},
                    {"type": "text", "text": "t"},
                ],
            }
        ]
    }
    out = strip_foreign_thinking(req)
    assert out["messages"][0]["content"] == [
        {"type": "thinking", "thinking": "a", "signature": "EqAnthropicSig"},
        {"type": "text", "text": "t"},
    ]
    assert req["messages"][0]["content"][1]["signature"] == ""  # input untouched
    clean = {"messages": [{"role": "user", "content": "x"}]}
    assert strip_foreign_thinking(clean) is clean
    assert not is_foreign_thinking({"type": "text", "text": ""})


# ------------------------------------------------------------------ serializer


def test_serializer_golden_interleaved_text_and_two_tools():
    """Text, two tool calls and text again get indexes 0..3, each closed before the next opens."""
    s = ClaudeStreamSerializer("gpt-4o", message_id="msg_x")
    events = s.start({"input_tokens": 5})
    events += s.text("Let me ") + s.text("check.")
    events += s.tool_start("toolu_a", "read") + s.tool_args('{"pa') + s.tool_args('th": "x"}')
    events += s.tool_start("toolu_b", "grep") + s.tool_args('{"q": 1}')
    events += s.text("Done.")
    events += s.stop("tool_use", {"input_tokens": 5, "output_tokens": 9})
    assert events == [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_x",
                    "type": "message",
                    "role": "assistant",
                    "model": "gpt-4o",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": make_usage(input_tokens=5),
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "read", "input": {}}},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"pa'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'th": "x"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "grep", "input": {}}},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"q": 1}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ("content_block_start", {"type": "content_block_start", "index": 3, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "Done."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": make_usage(input_tokens=5, output_tokens=9),
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    message = assert_valid_claude_stream(events)
    assert message["content"][1]["input"] == {"path": "x"}


def test_serializer_thinking_then_signature_stays_in_one_block():
    """A signature closes out the open thinking block instead of opening a new one."""
    s = ClaudeStreamSerializer("m")
    events = s.start() + s.thinking("hmm") + s.signature("sig") + s.text("answer") + s.stop("end_turn")
    message = assert_valid_claude_stream(events)
    assert message["content"] == [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "answer"},
    ]


def test_serializer_ignores_empty_deltas_and_requires_order():
    """Empty text opens no block; calls before start, or args without a tool block, are errors."""
    s = ClaudeStreamSerializer("m")
    with pytest.raises(RuntimeError):
        s.text("x")
    s.start()
    assert s.text("") == [] and s.thinking("") == []
    with pytest.raises(RuntimeError):
        s.tool_args("{}")
    s.stop("end_turn")
    with pytest.raises(RuntimeError):
        s.text("late")


def test_serializer_error_ends_stream():
    """error() emits one error event that the validator accepts as the stream's end."""
    s = ClaudeStreamSerializer("m")
    events = s.start() + s.text("partial") + s.error("overloaded_error", "busy")
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert assert_valid_claude_stream(events) is None


def test_assemble_message_folds_events():
    """assemble_message rebuilds the message, parsing tool input and applying final usage."""
    s = ClaudeStreamSerializer("m", message_id="msg_a")
    events = s.start() + s.text("hi") + s.tool_start("toolu_1", "f") + s.tool_args('{"a":') + s.tool_args("1}")
    events += s.stop("tool_use", {"output_tokens": 3})
    message = assemble_message(events)
    assert message["content"] == [
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
    ]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 3
    with pytest.raises(ValueError):
        assemble_message(s.error("api_error", "x"))


def test_empty_stream_error_is_distinct_from_translation_error():
    """EmptyStreamError is an upstream failure, not a 400 TranslationError."""
    assert not issubclass(EmptyStreamError, TranslationError)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(max_size=5)),
        st.tuples(st.just("thinking"), st.text(max_size=5)),
        st.tuples(st.just("signature"), st.text(alphabet="abc", max_size=3)),
        st.tuples(st.just("tool"), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
        st.tuples(st.just("ping"), st.none()),
    ),
    max_size=12,
)


@given(_ops)
@settings(max_examples=200, deadline=None)
def test_serializer_any_call_sequence_is_valid(ops):
    """Any sequence of serializer calls yields a valid stream whose content matches the calls."""
    s = ClaudeStreamSerializer("m")
    events = s.start()
    expected = []
    for kind, value in ops:
        if kind == "text" and value:
            events += s.text(value)
            if expected and expected[-1]["type"] == "text":
                expected[-1]["text"] += value
            else:
                expected.append({"type": "text", "text": value})
        elif kind in ("thinking", "signature") and value:
            events += s.thinking(value) if kind == "thinking" else s.signature(value)
            if not (expected and expected[-1]["type"] == "thinking"):
                expected.append({"type": "thinking", "thinking": "", "signature": ""})
            expected[-1]["thinking" if kind == "thinking" else "signature"] = (
                expected[-1]["thinking"] + value if kind == "thinking" else value
            )
        elif kind == "tool":
            tool_id = new_tool_use_id()
            events += s.tool_start(tool_id, "f")
            raw = json.dumps(value)
            for k in range(0, len(raw), 3):
                events += s.tool_args(raw[k : k + 3])
            expected.append({"type": "tool_use", "id": tool_id, "name": "f", "input": value})
            # a later text/thinking delta must not extend a block before this tool
            expected.append({"type": "_barrier"})
        elif kind == "ping":
            events += s.ping()
    events += s.stop("end_turn")
    message = assert_valid_claude_stream(events)
    assert message["content"] == [b for b in expected if b["type"] != "_barrier"]


# ------------------------------------------------------------------ shared strategies (also used by the OpenAI and Gemini tests)

TOOL_NAMES = ("read_file", "grep", "run_bash")

texts = st.text(min_size=1, max_size=12).filter(lambda t: t.strip())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
tool_inputs = st.dictionaries(st.text(min_size=1, max_size=5), json_values, max_size=3)


@st.composite
def images(draw):
    """A Claude image block, base64 or URL source."""
    if draw(st.booleans()):
        data = draw(st.binary(min_size=1, max_size=12))
        return {
            "type": "image",
            "source": {
                "type": "base64",
                "media_type": draw(st.sampled_from(["image/png", "image/jpeg", "image/webp"])),
                "data": base64.b64encode(data).decode("ascii"),
            },
        }
    name = draw(st.text(alphabet="abcxyz", min_size=1, max_size=6))
    return {"type": "image", "source": {"type": "url", "url": "https://example.com/%s.png" % name}}


@st.composite
def claude_requests(draw, tool_result_images=True, thinking_blocks=True):
    """A Claude Messages request: alternating turns with text, images, tool_use and matching tool_result."""
    messages = []
    pending_tools = []
    for _turn in range(draw(st.integers(1, 4))):
        user = []
        for tool_id in pending_tools:
            result = {"type": "tool_result", "tool_use_id": tool_id}
            shape = draw(st.sampled_from(["string", "blocks", "none"]))
            if shape == "string":
                result["content"] = draw(texts)
            elif shape == "blocks":
                blocks = [{"type": "text", "text": t} for t in draw(st.lists(texts, min_size=1, max_size=2))]
                if tool_result_images and draw(st.booleans()):
                    blocks.append(draw(images()))
                result["content"] = blocks
            if draw(st.booleans()):
                result["is_error"] = True
            user.append(result)
        extra = draw(st.lists(st.one_of(texts.map(lambda t: {"type": "text", "text": t}), images()), max_size=3))
        user.extend(extra)
        if not user:
            user = draw(texts)
        elif not pending_tools and draw(st.booleans()) and all(b["type"] == "text" for b in user) and len(user) == 1:
            user = user[0]["text"]
        messages.append({"role": "user", "content": user})

        assistant = []
        if thinking_blocks and draw(st.booleans()):
            assistant.append({"type": "thinking", "thinking": draw(texts), "signature": "EqSig"})
        pending_tools = []
        for kind in draw(st.lists(st.sampled_from(["text", "tool"]), min_size=1, max_size=4)):
            if kind == "text":
                assistant.append({"type": "text", "text": draw(texts)})
            else:
                tool_id = new_tool_use_id()
                pending_tools.append(tool_id)
                assistant.append(
                    {"type": "tool_use", "id": tool_id, "name": draw(st.sampled_from(TOOL_NAMES)), "input": draw(tool_inputs)}
                )
        messages.append({"role": "assistant", "content": assistant})
    # end on a user turn answering the last assistant turn
    closing = [{"type": "tool_result", "tool_use_id": t, "content": draw(texts)} for t in pending_tools]
    closing.append({"type": "text", "text": draw(texts)})
    messages.append({"role": "user", "content": closing})

    request = {"model": "claude-sonnet-4-5", "max_tokens": draw(st.integers(1, 64000)), "messages": messages}
    system = draw(st.one_of(st.none(), texts, st.lists(texts.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3)))
    if system is not None:
        request["system"] = system
    if draw(st.booleans()):
        request["tools"] = [
            {
                "name": name,
                "description": "tool " + name,
                "input_schema": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "n": {"type": ["integer", "null"]}},
                    "required": ["path"],
                    "additionalProperties": False,
                },
            }
            for name in TOOL_NAMES
        ]
        request["tool_choice"] = draw(
            st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": "grep"}])
        )
    thinking = draw(st.sampled_from([None, "enabled", "adaptive"]))
    if thinking == "enabled":
        request["thinking"] = {"type": "enabled", "budget_tokens": draw(st.integers(1024, 40000))}
    elif thinking == "adaptive":
        request["thinking"] = {"type": "adaptive"}
    if draw(st.booleans()):
        request["stream"] = True
    return request


@st.composite
def claude_messages(draw):
    """A Claude response Message with text, thinking and tool_use blocks."""
    content = []
    if draw(st.booleans()):
        content.append({"type": "thinking", "thinking": draw(texts), "signature": ""})
    for kind in draw(st.lists(st.sampled_from(["text", "tool"]), max_size=4)):
        if kind == "text":
            content.append({"type": "text", "text": draw(texts)})
        else:
            content.append(
                {"type": "tool_use", "id": new_tool_use_id(), "name": draw(st.sampled_from(TOOL_NAMES)), "input": draw(tool_inputs)}
            )
    has_tools = any(b["type"] == "tool_use" for b in content)
    stop = "tool_use" if has_tools else draw(st.sampled_from(["end_turn", "max_tokens", "refusal"]))
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": make_usage(
            input_tokens=draw(st.integers(0, 1000)),
            output_tokens=draw(st.integers(0, 1000)),
            cache_read_input_tokens=draw(st.integers(0, 1000)),
        ),
    }


def stream_message(message, piece=3):
    """Serialise a Claude Message as the event stream Anthropic would send (text split into pieces)."""
    s = ClaudeStreamSerializer(message["model"], message_id=message["id"])
    events = s.start({"input_tokens": message["usage"]["input_tokens"], "cache_read_input_tokens": message["usage"]["cache_read_input_tokens"]})
    for block in message["content"]:
        if block["type"] == "text":
            events += s.close_block()
            for k in range(0, len(block["text"]), piece):
                events += s.text(block["text"][k : k + piece])
        elif block["type"] == "thinking":
            events += s.close_block()
            for k in range(0, len(block["thinking"]), piece):
                events += s.thinking(block["thinking"][k : k + piece])
        elif block["type"] == "tool_use":
            events += s.tool_start(block["id"], block["name"])
            raw = json.dumps(block["input"])
            for k in range(0, len(raw), piece):
                events += s.tool_args(raw[k : k + piece])
    events += s.stop(message["stop_reason"], message["usage"])
    return events


@given(claude_messages())
@settings(max_examples=100, deadline=None)
def test_stream_message_round_trips_through_the_validator(message):
    """A generated message streamed by the serializer folds back to itself."""
    rebuilt = assert_valid_claude_stream(stream_message(message))
    assert rebuilt["content"] == message["content"]
    assert rebuilt["stop_reason"] == message["stop_reason"]
