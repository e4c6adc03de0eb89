"""Tests for clproxy.translate.gemini: Claude requests to Gemini, Gemini answers and streams back to Claude."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clproxy.translate.claude import EmptyStreamError, TranslationError, content_blocks, make_usage, system_text
from clproxy.translate.gemini import (
    DUMMY_THOUGHT_SIGNATURE,
    GeminiStreamToClaude,
    claude_to_gemini_request,
    gemini_schema,
    gemini_to_claude_response,
)

try:
    from test_translate_claude import ANTHROPIC_ID, assert_valid_claude_stream, claude_requests
except ImportError:  # tests/ imported as a package
    from tests.test_translate_claude import ANTHROPIC_ID, assert_valid_claude_stream, claude_requests

PNG_B64 = "iVBORw0KGgo="


def _user(content):
    return {"role": "user", "content": content}


def _claude(messages, **extra):
    return dict({"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages}, **extra)


# ====================================================================== Claude request -> Gemini request


def test_request_golden_full_conversation():
    """System, a tool round trip, both image kinds, tools, tool_choice and generation options map field by field."""
    claude = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8000,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            _user(
                [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg?size=2"}},
                ]
            ),
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "anthropic thoughts", "signature": "EqAnthropic"},
                    {"type": "text", "text": "Let me zoom."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "zoom", "input": {"factor": 2}},
                    {"type": "tool_use", "id": "toolu_01B", "name": "crop", "input": {}},
                ],
            },
            _user(
                [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": [{"type": "text", "text": "zoomed"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "no region", "is_error": True},
                ]
            ),
        ],
        "tools": [
            {
                "name": "zoom",
                "description": "Zoom in",
                "input_schema": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"factor": {"type": "number", "default": 1}},
                    "required": ["factor"],
                    "additionalProperties": False,
                },
            },
            {"name": "crop", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "zoom"},
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 20,
        "stop_sequences": ["###"],
        "stream": True,
    }
    assert claude_to_gemini_request(claude) == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is in these?"},
                    {"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
                    {"fileData": {"fileUri": "https://example.com/cat.jpg?size=2", "mimeType": "image/jpeg"}},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Let me zoom."},
                    {"functionCall": {"name": "zoom", "args": {"factor": 2}}, "thoughtSignature": DUMMY_THOUGHT_SIGNATURE},
                    {"functionCall": {"name": "crop", "args": {}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "zoom", "response": {"output": "zoomed"}}},
                    {"functionResponse": {"name": "crop", "response": {"error": "no region"}}},
                ],
            },
        ],
        "systemInstruction": {"parts": [{"text": "You are terse.\n\nBe kind."}]},
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "zoom",
                        "description": "Zoom in",
                        "parameters": {"type": "object", "properties": {"factor": {"type": "number"}}, "required": ["factor"]},
                    },
                    {"name": "crop"},
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["zoom"]}},
        "generationConfig": {
            "maxOutputTokens": 8000,
            "temperature": 0.3,
            "topP": 0.9,
            "topK": 20,
            "stopSequences": ["###"],
            "thinkingConfig": {"thinkingBudget": 4000, "includeThoughts": True},
        },
    }


@pytest.mark.parametrize(
    "choice, config",
    [
        ({"type": "auto"}, {"mode": "AUTO"}),
        ({"type": "any"}, {"mode": "ANY"}),
        ({"type": "none"}, {"mode": "NONE"}),
        ({"type": "tool", "name": "f"}, {"mode": "ANY", "allowedFunctionNames": ["f"]}),
    ],
)
def test_request_tool_choice_map(choice, config):
    """Claude tool_choice maps to functionCallingConfig modes and allowed names."""
    claude = _claude([_user("hi")], tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice)
    assert claude_to_gemini_request(claude)["toolConfig"] == {"functionCallingConfig": config}


@pytest.mark.parametrize(
    "thinking, config",
    [
        ({"type": "enabled", "budget_tokens": 2048}, {"thinkingBudget": 2048, "includeThoughts": True}),
        ({"type": "enabled", "budget_tokens": 31999}, {"thinkingBudget": 24576, "includeThoughts": True}),
        ({"type": "adaptive"}, {"thinkingBudget": -1, "includeThoughts": True}),
        ({"type": "disabled"}, None),
    ],
)
def test_request_thinking_config(thinking, config):
    """Enabled thinking sends its (capped) budget, adaptive the dynamic budget -1, disabled nothing."""
    out = claude_to_gemini_request(_claude([_user("hi")], thinking=thinking))
    assert out["generationConfig"].get("thinkingConfig") == config


def test_request_max_tokens_cap_and_no_options():
    """max_tokens_cap caps maxOutputTokens; a bare request has only maxOutputTokens."""
    out = claude_to_gemini_request(_claude([_user("hi")], max_tokens=64000), max_tokens_cap=65536)
    assert out["generationConfig"] == {"maxOutputTokens": 64000}
    assert claude_to_gemini_request(_claude([_user("hi")], max_tokens=64000), max_tokens_cap=8192)["generationConfig"] == {
        "maxOutputTokens": 8192
    }


def test_request_documents():
    """Text documents become text; PDFs become inlineData (base64) or fileData (URL)."""
    claude = _claude(
        [
            _user(
                [
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "body"}},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                    {"type": "document", "source": {"type": "url", "url": "https://x/doc.pdf"}},
                ]
            )
        ]
    )
    assert claude_to_gemini_request(claude)["contents"][0]["parts"] == [
        {"text": "body"},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"fileData": {"fileUri": "https://x/doc.pdf", "mimeType": "application/pdf"}},
    ]


def test_request_tool_result_images_follow_function_responses():
    """Images inside a tool_result are sent as parts after the turn's functionResponse parts."""
    claude = _claude(
        [
            _user("shoot"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
            _user(
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}],
                    },
                    {"type": "text", "text": "what now?"},
                ]
            ),
        ]
    )
    assert claude_to_gemini_request(claude)["contents"][2]["parts"] == [
        {"functionResponse": {"name": "shot", "response": {"output": ""}}},
        {"text": "what now?"},
        {"inlineData": {"mimeType": "image/png", "data": PNG_B64}},
    ]


def test_request_merges_consecutive_turns_and_skips_thinking_only_turns():
    """Consecutive user turns merge, and an assistant turn holding only thinking disappears."""
    claude = _claude(
        [
            _user("a"),
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "EqSig"}]},
            _user("b"),
        ]
    )
    assert claude_to_gemini_request(claude)["contents"] == [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}]


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([_user([{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}])], "unknown tool_use_id"),
        (
            [_user("q"), {"role": "assistant", "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}]}],
            r"messages\.1\.content\.0.*server_tool_use",
        ),
        ([_user([{"type": "mystery"}])], r"messages\.0\.content\.0.*mystery"),
        ([_user([{"type": "image", "source": {"type": "file", "file_id": "f"}}])], r"messages\.0\.content\.0.*file"),
        ([_user([{"type": "document", "source": {"type": "file", "file_id": "f"}}])], r"messages\.0\.content\.0.*document"),
        ([_user("q"), {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}], r"messages\.1.*tool_result"),
    ],
)
def test_request_unsupported_blocks_raise(messages, pattern):
    """Blocks Gemini cannot take raise TranslationError naming the type and message index."""
    with pytest.raises(TranslationError, match=pattern):
        claude_to_gemini_request(_claude(messages))


def test_request_server_tools_and_stop_sequences_raise():
    """Server tool declarations and more than five stop sequences are TranslationErrors."""
    with pytest.raises(TranslationError, match="tools.0.*bash_20250124"):
        claude_to_gemini_request(_claude([_user("hi")], tools=[{"type": "bash_20250124", "name": "bash"}]))
    with pytest.raises(TranslationError, match="stop_sequences"):
        claude_to_gemini_request(_claude([_user("hi")], stop_sequences=list("abcdef")))


def test_request_dummy_signatures_can_be_turned_off():
    """dummy_thought_signatures=False sends function calls without a signature."""
    claude = _claude([_user("q"), {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}])
    part = claude_to_gemini_request(claude, dummy_thought_signatures=False)["contents"][1]["parts"][0]
    assert "thoughtSignature" not in part


# ---------------------------------------------------------------------- tool schemas


def test_schema_strips_rejected_keys_and_resolves_refs():
    """$schema/additionalProperties/default go, $ref inlines, nullable types and const are rewritten."""
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "format": "int64"}}, "required": ["x", "ghost"]}},
        "properties": {
            "at": {"$ref": "#/$defs/Point", "description": "where"},
            "mode": {"const": "fast"},
            "name": {"type": ["string", "null"], "format": "email", "default": "n"},
            "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "choice": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "level": {"type": "integer", "enum": [1, 2, 3]},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1},
            "both": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"properties": {"b": {"type": "number"}}, "required": ["b"]}]},
        },
        "required": ["at", "missing"],
    }
    assert gemini_schema(schema) == {
        "type": "object",
        "properties": {
            "at": {"type": "object", "description": "where", "properties": {"x": {"type": "integer", "format": "int64"}}, "required": ["x"]},
            "mode": {"type": "string", "enum": ["fast"]},
            "name": {"nullable": True, "type": "string"},
            "count": {"nullable": True, "type": "integer"},
            "choice": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "level": {"type": "integer"},
            "tags": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["a", "b"]}},
            "both": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}, "required": ["b"]},
        },
        "required": ["at"],
    }


def test_schema_recursive_ref_and_empty_parameters():
    """A recursive $ref stops at a bare object; an object without properties means no parameters."""
    tree = {"type": "object", "properties": {"child": {"$ref": "#/definitions/Node"}}, "definitions": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/definitions/Node"}}}}}
    assert gemini_schema(tree) == {
        "type": "object",
        "properties": {"child": {"type": "object", "properties": {"child": {"type": "object"}}}},
    }
    assert gemini_schema({"type": "object", "properties": {}}) is None
    assert gemini_schema(None) is None


# ====================================================================== Gemini response -> Claude response


def _response(parts, finish="STOP", usage=None, **extra):
    resp = {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
        "usageMetadata": usage
        or {"promptTokenCount": 100, "cachedContentTokenCount": 40, "candidatesTokenCount": 10, "thoughtsTokenCount": 5, "totalTokenCount": 115},
        "modelVersion": "gemini-2.5-flash",
    }
    resp.update(extra)
    return resp


def test_response_golden_thought_text_and_signed_calls():
    """Thoughts, text and signed function calls become thinking/text/tool_use with mapped usage."""
    resp = _response(
        [
            {"text": "Planning the call.", "thought": True},
            {"text": "I'll check."},
            {"functionCall": {"name": "read", "args": {"path": "a"}}, "thoughtSignature": "SIG1"},
            {"functionCall": {"id": "call-7", "name": "grep", "args": {}}},
        ]
    )
    claude = gemini_to_claude_response(resp, "claude-sonnet-4-5", "gemini-2.5-flash")
    ids = [b["id"] for b in claude["content"] if b["type"] == "tool_use"]
    assert claude == {
        "id": claude["id"],
        "type": "message",
        "role": "assistant",
        "model": "gemini-2.5-flash",
        "content": [
            {"type": "thinking", "thinking": "Planning the call.", "signature": ""},
            {"type": "text", "text": "I'll check."},
            {"type": "thinking", "thinking": "", "signature": "gemini:SIG1"},
            {"type": "tool_use", "id": ids[0], "name": "read", "input": {"path": "a"}},
            {"type": "tool_use", "id": "call-7", "name": "grep", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": make_usage(input_tokens=60, output_tokens=15, cache_read_input_tokens=40),
    }
    assert claude["id"].startswith("msg_") and ANTHROPIC_ID.match(ids[0])


def test_response_signature_joins_preceding_thought():
    """A function call's signature lands on the thinking block right before it, not a new one."""
    resp = _response([{"text": "think", "thought": True}, {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "S"}])
    content = gemini_to_claude_response(resp, "c", "g")["content"]
    assert content[0] == {"type": "thinking", "thinking": "think", "signature": "gemini:S"}
    assert [b["type"] for b in content] == ["thinking", "tool_use"]


def test_response_signed_call_after_signed_thought_gets_its_own_block():
    """A signed call after an already signed thought does not overwrite that thought's signature."""
    resp = _response(
        [{"text": "t", "thought": True, "thoughtSignature": "A"}, {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "B"}]
    )
    content = gemini_to_claude_response(resp, "c", "g")["content"]
    assert content[:2] == [
        {"type": "thinking", "thinking": "t", "signature": "gemini:A"},
        {"type": "thinking", "thinking": "", "signature": "gemini:B"},
    ]
    assert content[2]["type"] == "tool_use"


@pytest.mark.parametrize(
    "finish, stop",
    [
        ("STOP", "end_turn"),
        ("MAX_TOKENS", "max_tokens"),
        ("SAFETY", "refusal"),
        ("RECITATION", "refusal"),
        ("PROHIBITED_CONTENT", "refusal"),
        ("BLOCKLIST", "refusal"),
        ("SPII", "refusal"),
        ("IMAGE_PROHIBITED_CONTENT", "refusal"),
    ],
)
def test_response_finish_reason_map(finish, stop):
    """Gemini finishReason values map onto Claude stop reasons."""
    assert gemini_to_claude_response(_response([{"text": "x"}], finish), "c", "g")["stop_reason"] == stop


def test_response_blocked_prompt_is_a_refusal():
    """A prompt blocked before any candidate answers as an empty refusal."""
    resp = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7}}
    claude = gemini_to_claude_response(resp, "c", "gemini-2.5-pro")
    assert claude["content"] == [] and claude["stop_reason"] == "refusal" and claude["usage"]["input_tokens"] == 7


def test_response_model_is_the_actual_model():
    """The Claude answer names the model that actually answered."""
    assert gemini_to_claude_response(_response([{"text": "x"}]), "claude-opus-4", "gemini-2.5-pro")["model"] == "gemini-2.5-pro"


# ====================================================================== Gemini stream -> Claude events


def _sse_chunk(parts=None, finish=None, usage=None):
    candidate = {"content": {"role": "model", "parts": parts or []}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash"}
    if usage:
        chunk["usageMetadata"] = usage
    return chunk


def _run(translator, chunks):
    events = []
    for chunk in chunks:
        events += translator.feed(chunk)
    return events + translator.finish()


def test_stream_golden_text_then_two_function_calls():
    """Text deltas and two whole function calls get indexes 0, 1, 2 with one content_block_stop each."""
    chunks = [
        _sse_chunk([{"text": "Let me "}], usage={"promptTokenCount": 12}),
        _sse_chunk([{"text": "look."}]),
        _sse_chunk([{"functionCall": {"name": "read", "args": {"path": "x"}}}, {"functionCall": {"name": "grep", "args": {"q": "y"}}}]),
        _sse_chunk([{"text": ""}], finish="STOP", usage={"promptTokenCount": 12, "candidatesTokenCount": 8}),
    ]
    events = _run(GeminiStreamToClaude("claude-sonnet-4-5", "gemini-2.5-flash"), chunks)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 12
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"path": "x"}'}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": make_usage(input_tokens=12, output_tokens=8),
    }
    message = assert_valid_claude_stream(events)
    assert [b.get("input") for b in message["content"]] == [None, {"path": "x"}, {"q": "y"}]


def test_stream_thoughts_then_signature_on_trailing_empty_part():
    """Streamed thoughts form one thinking block; a signature on a later empty part signs it."""
    chunks = [
        _sse_chunk([{"text": "Hmm, ", "thought": True}]),
        _sse_chunk([{"text": "ok.", "thought": True}]),
        _sse_chunk([{"text": "", "thoughtSignature": "SIG"}]),
        _sse_chunk([{"text": "Answer"}], finish="STOP"),
    ]
    message = assert_valid_claude_stream(_run(GeminiStreamToClaude("c", "g"), chunks))
    assert message["content"] == [
        {"type": "thinking", "thinking": "Hmm, ok.", "signature": "gemini:SIG"},
        {"type": "text", "text": "Answer"},
    ]


def test_stream_text_signature_without_thinking_is_dropped():
    """A signature on a text part with no thinking to attach to opens no block."""
    chunks = [_sse_chunk([{"text": "Hi", "thoughtSignature": "S"}]), _sse_chunk([{"text": "", "thoughtSignature": "S2"}], finish="STOP")]
    message = assert_valid_claude_stream(_run(GeminiStreamToClaude("c", "g"), chunks))
    assert message["content"] == [{"type": "text", "text": "Hi"}]


def test_stream_finish_without_chunks_raises():
    """finish() with nothing received raises EmptyStreamError (nothing was sent yet: fail over)."""
    with pytest.raises(EmptyStreamError):
        GeminiStreamToClaude("c", "g").finish()


def test_stream_truncated_ends_with_error_event():
    """A stream that stops before any finishReason ends with an api_error event."""
    events = _run(GeminiStreamToClaude("c", "g"), [_sse_chunk([{"text": "half"}])])
    assert events[-1][0] == "error" and assert_valid_claude_stream(events) is None


@pytest.mark.parametrize("finish", ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL"])
def test_a_failed_tool_call_is_an_error_not_an_empty_end_turn(finish):
    """Gemini's MALFORMED_FUNCTION_CALL / UNEXPECTED_TOOL_CALL (the turn holds no usable call, often
    nothing at all) end in an api_error event naming the reason, with or without text before it,
    never in an end_turn Claude Code would take for the answer; a whole answer raises."""
    for parts in ([], [{"text": "Let me edit the file."}]):
        translator = GeminiStreamToClaude("c", "g")
        events = translator.feed(_sse_chunk(parts, finish=finish)) + translator.finish()
        assert events[-1][0] == "error" and finish in events[-1][1]["error"]["message"]
        assert "message_delta" not in [name for name, _ in events]
        assert assert_valid_claude_stream(events) is None
        if not parts:  # nothing of an answer: only the prelude before the error (the fallback may go on)
            assert [name for name, _ in events] == ["message_start", "error"]
        with pytest.raises(ValueError, match=finish):
            gemini_to_claude_response(_response(parts, finish), "c", "g")


@pytest.mark.parametrize("finish", ["MISSING_THOUGHT_SIGNATURE", "TOO_MANY_TOOL_CALLS", "MALFORMED_RESPONSE",
                                    "OTHER", "FINISH_REASON_UNSPECIFIED", "NO_IMAGE", "SOME_NEW_REASON"])
def test_a_turn_gemini_could_not_produce_is_an_error_not_an_end_turn(finish):
    """finishReasons other than STOP, MAX_TOKENS and the refusals say the turn failed (Gemini 3
    answers MISSING_THOUGHT_SIGNATURE with no parts at all): an api_error naming the reason, with or
    without text before it, so the fallback chain moves on; a whole answer raises.

    Before the fix they became an end_turn: an empty (or cut-short) answer Claude Code took as final."""
    for parts in ([], [{"text": "Partial"}]):
        translator = GeminiStreamToClaude("c", "g")
        events = translator.feed(_sse_chunk(parts, finish=finish)) + translator.finish()
        assert events[-1][0] == "error" and finish in events[-1][1]["error"]["message"]
        assert assert_valid_claude_stream(events) is None
        if not parts:
            assert [name for name, _ in events] == ["message_start", "error"]
        with pytest.raises(ValueError, match=finish):
            gemini_to_claude_response(_response(parts, finish), "c", "g")


def test_stream_error_chunk_becomes_error_event():
    """An error object in the stream becomes an error event; the translator then stays quiet."""
    translator = GeminiStreamToClaude("c", "g")
    events = translator.feed(_sse_chunk([{"text": "a"}])) + translator.feed({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "overloaded"}})
    assert translator.finish() == [] and assert_valid_claude_stream(events) is None


# ====================================================================== round trip


def test_tool_use_round_trip_with_signature():
    """A Gemini function call answered in a later Claude turn goes back to Gemini with its name and signature."""
    answer = gemini_to_claude_response(
        _response([{"text": "Checking."}, {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}, "thoughtSignature": "SIGW"}]),
        "claude-sonnet-4-5",
        "gemini-3-pro",
    )
    tool_id = answer["content"][-1]["id"]
    follow_up = _claude(
        [
            _user("weather?"),
            {"role": "assistant", "content": answer["content"]},
            _user([{"type": "tool_result", "tool_use_id": tool_id, "content": "sunny"}]),
        ]
    )
    assert claude_to_gemini_request(follow_up)["contents"] == [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"text": "Checking."}, {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}, "thoughtSignature": "SIGW"}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"output": "sunny"}}}]},
    ]


# ====================================================================== properties


def _claude_texts(claude):
    out = []
    for message in claude["messages"]:
        for block in content_blocks(message["content"]):
            if block["type"] == "text":
                out.append(block["text"])
            elif block["type"] == "tool_result":
                body = block.get("content")
                parts = [b["text"] for b in content_blocks(body) if b["type"] == "text"]
                out.append("\n".join(parts))
    return out


@given(claude_requests())
@settings(max_examples=200, deadline=None)
def test_property_any_claude_request_translates(claude):
    """Generated Claude requests translate to Gemini with alternating turns, every text and every call kept."""
    out = claude_to_gemini_request(claude)
    json.dumps(out)
    roles = [c["role"] for c in out["contents"]]
    assert all(a != b for a, b in zip(roles, roles[1:])) and roles[0] == "user"
    parts = [p for c in out["contents"] for p in c["parts"]]
    gemini_texts = []
    for p in parts:
        if "text" in p:
            gemini_texts.append(p["text"])
        elif "functionResponse" in p:
            gemini_texts.append(next(iter(p["functionResponse"]["response"].values())))
    assert gemini_texts == _claude_texts(claude)
    calls = [(p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts if "functionCall" in p]
    uses = [(b["name"], b["input"]) for m in claude["messages"] for b in content_blocks(m["content"]) if b["type"] == "tool_use"]
    assert calls == uses
    # every functionResponse names a function the previous model turn called
    for previous, current in zip(out["contents"], out["contents"][1:]):
        called = {p["functionCall"]["name"] for p in previous["parts"] if "functionCall" in p}
        for p in current["parts"]:
            if "functionResponse" in p:
                assert p["functionResponse"]["name"] in called
    if claude.get("system"):
        assert out["systemInstruction"]["parts"][0]["text"] == system_text(claude["system"])


@st.composite
def gemini_chunk_streams(draw):
    """A Gemini SSE stream: thought, text and function-call parts spread over chunks in any grouping."""
    parts = draw(
        st.lists(
            st.one_of(
                st.builds(lambda t: {"text": t, "thought": True}, st.text(min_size=1, max_size=6)),
                st.builds(lambda t: {"text": t}, st.text(max_size=6)),
                st.builds(
                    lambda n, a, s: dict({"functionCall": {"name": n, "args": a}}, **({"thoughtSignature": s} if s else {})),
                    st.sampled_from(["f", "g"]),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                    st.one_of(st.none(), st.text(alphabet="ABC", min_size=1, max_size=3)),
                ),
            ),
            max_size=8,
        )
    )
    cuts = sorted(set(draw(st.lists(st.integers(0, len(parts)), max_size=4))))
    groups = [parts[a:b] for a, b in zip([0] + cuts, cuts + [len(parts)])]
    chunks = [_sse_chunk(g) for g in groups]
    chunks[-1]["candidates"][0]["finishReason"] = draw(st.sampled_from(["STOP", "MAX_TOKENS"]))
    chunks[-1]["usageMetadata"] = {"promptTokenCount": 9, "candidatesTokenCount": 3}
    return chunks, parts


@given(gemini_chunk_streams())
@settings(max_examples=200, deadline=None)
def test_property_gemini_streams_make_valid_claude_streams(case):
    """Any Gemini chunk stream becomes a valid Claude stream with the same text, thoughts, calls and signatures."""
    chunks, parts = case
    message = assert_valid_claude_stream(_run(GeminiStreamToClaude("c", "g"), chunks), allow_error=False)
    content = message["content"]
    assert "".join(b["text"] for b in content if b["type"] == "text") == "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
    assert "".join(b["thinking"] for b in content if b["type"] == "thinking") == "".join(p["text"] for p in parts if p.get("thought"))
    calls = [p["functionCall"] for p in parts if "functionCall" in p]
    assert [(b["name"], b["input"]) for b in content if b["type"] == "tool_use"] == [(c["name"], c["args"]) for c in calls]
    # every function-call signature sits on the thinking block right before its tool_use
    signed = [p["thoughtSignature"] for p in parts if "functionCall" in p and p.get("thoughtSignature")]
    before_tools = [
        content[i - 1]["signature"][len("gemini:") :]
        for i, b in enumerate(content)
        if b["type"] == "tool_use" and i > 0 and content[i - 1]["type"] == "thinking" and content[i - 1]["signature"]
    ]
    assert before_tools == signed
    has_calls = bool(calls)
    finish = chunks[-1]["candidates"][0]["finishReason"]
    assert message["stop_reason"] == ("max_tokens" if finish == "MAX_TOKENS" else "tool_use" if has_calls else "end_turn")
