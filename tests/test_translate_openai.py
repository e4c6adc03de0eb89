"""Tests for clproxy.translate.openai: Claude <-> OpenAI Chat Completions in both directions."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from clproxy.translate.claude import EmptyStreamError, TranslationError, content_blocks, make_usage, system_text
from clproxy.translate.openai import (
    ClaudeStreamToOpenAI,
    OpenAIStreamToClaude,
    claude_to_openai_request,
    claude_to_openai_response,
    openai_call_id,
    openai_to_claude_request,
    openai_to_claude_response,
    reasoning_effort_for_budget,
)

try:
    from test_translate_claude import (
        ANTHROPIC_ID,
        assert_valid_claude_stream,
        claude_messages,
        claude_requests,
        stream_message,
    )
except ImportError:  # tests/ imported as a package
    from tests.test_translate_claude import (
        ANTHROPIC_ID,
        assert_valid_claude_stream,
        claude_messages,
        claude_requests,
        stream_message,
    )

PNG_B64 = "iVBORw0KGgo="


def _user(content):
    return {"role": "user", "content": content}


def _claude(messages, **extra):
    return dict({"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages}, **extra)


# ====================================================================== Claude request -> OpenAI request


def test_request_golden_full_conversation():
    """A multi-turn Claude request with system blocks, tools, a tool round trip and options maps field by field."""
    claude = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "List files"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "use ls", "signature": "EqSig"},
                    {"type": "text", "text": "Running ls."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "bash", "input": {"cmd": "ls"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "a.txt\nb.txt"},
                    {"type": "text", "text": "Now count them."},
                ],
            },
        ],
        "tools": [{"name": "bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 10000},
        "stop_sequences": ["###"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "user-1"},
        "stream": True,
    }
    assert claude_to_openai_request(claude, "gpt-5") == {
        "model": "gpt-5",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nBe kind."},
            {"role": "user", "content": "List files"},
            {
                "role": "assistant",
                "content": "Running ls.",
                "tool_calls": [{"id": "toolu_01A", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}],
            },
            {"role": "tool", "tool_call_id": "toolu_01A", "content": "a.txt\nb.txt"},
            {"role": "user", "content": "Now count them."},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "bash", "description": "Run a command", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}},
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning_effort": "medium",
        "max_completion_tokens": 2048,
        "stop": ["###"],
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "user-1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_request_images_both_kinds():
    """A base64 image becomes a data URL and a URL image stays a URL, both as image_url parts."""
    claude = _claude(
        [
            _user(
                [
                    {"type": "text", "text": "Compare"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                ]
            )
        ]
    )
    assert claude_to_openai_request(claude, "gpt-4o")["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        }
    ]


def test_request_tool_result_error_and_images():
    """is_error prefixes 'Error: ' and tool_result images follow the tool messages in a user message."""
    claude = _claude(
        [
            _user("go"),
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}},
                    {"type": "tool_use", "id": "toolu_2", "name": "run", "input": {"x": 1}},
                ],
            },
            _user(
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [
                            {"type": "text", "text": "screenshot"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                        ],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
                ]
            ),
        ]
    )
    messages = claude_to_openai_request(claude, "gpt-4o")["messages"]
    assert messages[1]["content"] is None and len(messages[1]["tool_calls"]) == 2
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "screenshot"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Images returned by tool call toolu_1:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
            ],
        },
    ]


def test_request_documents_text_and_pdf():
    """A text document becomes text (title first); a base64 PDF becomes an OpenAI file part."""
    claude = _claude(
        [
            _user(
                [
                    {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "hello"}},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                ]
            )
        ]
    )
    assert claude_to_openai_request(claude, "gpt-4o")["messages"][0]["content"] == [
        {"type": "text", "text": "Notes\nhello"},
        {"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
    ]


@pytest.mark.parametrize(
    "message_index, block, pattern",
    [
        (1, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}, r"messages\.1\.content\.0.*server_tool_use"),
        (0, {"type": "mystery_block"}, r"messages\.0\.content\.0.*mystery_block"),
        (0, {"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}}, r"messages\.0\.content\.0.*document"),
        (0, {"type": "image", "source": {"type": "file", "file_id": "file_1"}}, r"messages\.0\.content\.0.*file"),
        (2, {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}, r"messages\.2.*web_search_tool_result"),
    ],
)
def test_request_unsupported_blocks_raise(message_index, block, pattern):
    """Blocks OpenAI cannot take raise TranslationError naming the type and the message index."""
    messages = [_user("hi"), {"role": "assistant", "content": "ok"}, _user("more")]
    messages[message_index] = dict(messages[message_index], content=[block])
    with pytest.raises(TranslationError, match=pattern) as info:
        claude_to_openai_request(_claude(messages), "gpt-4o")
    assert info.value.message == str(info.value)


def test_request_server_tools_raise():
    """A server tool declaration (web_search) is a TranslationError naming the tool type."""
    claude = _claude([_user("hi")], tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(TranslationError, match="tools.0.*web_search_20250305"):
        claude_to_openai_request(claude, "gpt-4o")


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "bash"}, {"type": "function", "function": {"name": "bash"}}),
    ],
)
def test_request_tool_choice_map(choice, expected):
    """Claude tool_choice types map to OpenAI's auto/required/none/function."""
    claude = _claude([_user("hi")], tools=[{"name": "bash", "input_schema": {"type": "object"}}], tool_choice=choice)
    out = claude_to_openai_request(claude, "gpt-4o")
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    "thinking, effort",
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 4095}, "low"),
        ({"type": "enabled", "budget_tokens": 4096}, "medium"),
        ({"type": "enabled", "budget_tokens": 16383}, "medium"),
        ({"type": "enabled", "budget_tokens": 16384}, "high"),
        ({"type": "enabled", "budget_tokens": 31999}, "high"),
        ({"type": "adaptive"}, "medium"),
        ({"type": "disabled"}, None),
        (None, None),
    ],
)
def test_request_reasoning_effort_by_budget(thinking, effort):
    """Thinking budgets map to low (<4096), medium (<16384) or high; adaptive to medium; none to nothing."""
    extra = {"thinking": thinking} if thinking else {}
    out = claude_to_openai_request(_claude([_user("hi")], **extra), "o4-mini")
    assert out.get("reasoning_effort") == effort
    if thinking and thinking.get("budget_tokens"):
        assert reasoning_effort_for_budget(thinking["budget_tokens"]) == effort


def test_request_options_for_non_reasoning_models_and_caps():
    """send_reasoning_effort=False omits it and max_tokens_cap caps max_completion_tokens."""
    claude = _claude([_user("hi")], max_tokens=32000, thinking={"type": "enabled", "budget_tokens": 9000})
    out = claude_to_openai_request(claude, "gpt-4o", send_reasoning_effort=False, max_tokens_cap=16384)
    assert "reasoning_effort" not in out and out["max_completion_tokens"] == 16384
    assert "stream" not in out and "stream_options" not in out


def test_request_long_ids_and_user_are_shortened_consistently():
    """Tool ids over 40 chars and user ids over 64 chars are hashed, the call and its result alike."""
    long_id = "toolu_" + "x" * 60
    claude = _claude(
        [
            _user("hi"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": long_id, "name": "f", "input": {}}]},
            _user([{"type": "tool_result", "tool_use_id": long_id, "content": "ok"}]),
        ],
        metadata={"user_id": "user_" + "a" * 100},
    )
    out = claude_to_openai_request(claude, "gpt-4o")
    call_id = out["messages"][1]["tool_calls"][0]["id"]
    assert call_id == out["messages"][2]["tool_call_id"] == openai_call_id(long_id)
    assert len(call_id) <= 40 and len(out["user"]) <= 64


def test_request_too_many_stop_sequences_raise():
    """More than four stop sequences cannot be sent to OpenAI."""
    with pytest.raises(TranslationError, match="stop_sequences"):
        claude_to_openai_request(_claude([_user("hi")], stop_sequences=list("abcde")), "gpt-4o")


# ====================================================================== OpenAI response -> Claude response


def _completion(message, finish_reason="stop", usage=None, model="gpt-4o-2024-08-06"):
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": dict({"role": "assistant"}, **message), "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "prompt_tokens_details": {"cached_tokens": 60}},
    }


def test_response_golden_text_and_tool_calls():
    """Content, reasoning and tool calls become thinking, text and tool_use blocks with mapped usage."""
    resp = _completion(
        {
            "content": "Checking.",
            "reasoning_content": "think first",
            "tool_calls": [
                {"id": "call_abc", "type": "function", "function": {"name": "read", "arguments": '{"path": "a"}'}},
                {"id": "call:bad/id", "type": "function", "function": {"name": "grep", "arguments": ""}},
            ],
        },
        finish_reason="tool_calls",
    )
    claude = openai_to_claude_response(resp, "claude-sonnet-4-5")
    assert claude["id"].startswith("msg_")
    derived = claude["content"][3]["id"]
    assert claude == {
        "id": claude["id"],
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-2024-08-06",
        "content": [
            {"type": "thinking", "thinking": "think first", "signature": ""},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_abc", "name": "read", "input": {"path": "a"}},
            {"type": "tool_use", "id": derived, "name": "grep", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": make_usage(input_tokens=40, output_tokens=20, cache_read_input_tokens=60),
    }
    assert ANTHROPIC_ID.match(derived) and derived != "call:bad/id"
    assert openai_to_claude_response(resp, "x")["content"][3]["id"] == derived  # stable


@pytest.mark.parametrize(
    "finish, stop",
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"), ("content_filter", "refusal"), (None, "end_turn")],
)
def test_response_stop_reason_map(finish, stop):
    """OpenAI finish_reason values map onto Claude stop reasons."""
    assert openai_to_claude_response(_completion({"content": "x"}, finish), "m")["stop_reason"] == stop


def test_response_refusal_and_bad_arguments():
    """A refusal becomes text with stop_reason refusal; invalid argument JSON is kept, not lost."""
    refused = openai_to_claude_response(_completion({"content": None, "refusal": "I can't help."}), "m")
    assert refused["content"] == [{"type": "text", "text": "I can't help."}] and refused["stop_reason"] == "refusal"
    bad = _completion({"tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}, "stop")
    claude = openai_to_claude_response(bad, "m")
    assert claude["content"][0]["input"] == {"_invalid_json_arguments": "{oops"}
    assert claude["stop_reason"] == "tool_use"  # tool calls with "stop" from lax compatible servers


def test_response_model_falls_back_to_requested():
    """Without a model in the response, the requested model is reported."""
    resp = _completion({"content": "x"})
    del resp["model"]
    assert openai_to_claude_response(resp, "gpt-4o")["model"] == "gpt-4o"
    with pytest.raises(ValueError):
        openai_to_claude_response({"choices": []}, "gpt-4o")


# ====================================================================== OpenAI stream -> Claude events


def _chunk(delta=None, finish_reason=None, usage=None, choices=True, model="gpt-4o-mini"):
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunk["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _run(translator, chunks):
    events = []
    for chunk in chunks:
        events += translator.feed(chunk)
    return events + translator.finish()


def _tc(index, id=None, name=None, args=None):
    call = {"index": index, "function": {}}
    if id:
        call["id"] = id
        call["type"] = "function"
    if name:
        call["function"]["name"] = name
    if args is not None:
        call["function"]["arguments"] = args
    return {"tool_calls": [call]}


STREAM_TEXT_AND_TWO_TOOLS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me "}),
    _chunk({"content": "look."}),
    _chunk(_tc(0, id="call_a", name="read", args="")),
    _chunk(_tc(0, args='{"path":')),
    _chunk(_tc(0, args=' "x"}')),
    _chunk(_tc(1, id="call_b", name="grep", args='{"q"')),
    _chunk(_tc(1, args=': "y"}')),
    _chunk({}, finish_reason="tool_calls"),
    _chunk(choices=False, usage={"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}),
]


def test_stream_golden_text_then_two_tool_calls():
    """Interleaved text and two streamed tool calls get indexes 0, 1, 2 and a content_block_stop each."""
    events = _run(OpenAIStreamToClaude("claude-sonnet-4-5"), STREAM_TEXT_AND_TWO_TOOLS)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "read", "input": {}}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": make_usage(input_tokens=10, output_tokens=7),
    }
    message = assert_valid_claude_stream(events)
    assert message["model"] == "gpt-4o-mini"
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "read", "input": {"path": "x"}},
        {"type": "tool_use", "id": "call_b", "name": "grep", "input": {"q": "y"}},
    ]


def test_stream_text_after_tool_and_reasoning():
    """Reasoning deltas become a thinking block; text after a tool call opens a fresh text block."""
    chunks = [
        _chunk({"role": "assistant", "reasoning_content": "hm"}),
        _chunk({"reasoning_content": "m"}),
        _chunk(_tc(0, id="call_a", name="f", args="{}")),
        _chunk({"content": "after"}),
        _chunk({}, finish_reason="stop"),
    ]
    message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), chunks))
    assert [b["type"] for b in message["content"]] == ["thinking", "tool_use", "text"]
    assert message["content"][0]["thinking"] == "hmm"
    assert message["stop_reason"] == "tool_use"


def test_stream_message_start_comes_with_the_first_chunk():
    """The first chunk yields message_start at once, so the dispatcher can commit the response early."""
    translator = OpenAIStreamToClaude("claude-x")
    first = translator.feed(_chunk({"role": "assistant", "content": ""}))
    assert [name for name, _ in first] == ["message_start"]


@pytest.mark.parametrize("finish, stop", [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")])
def test_stream_stop_reason_map(finish, stop):
    """Streamed finish_reason maps to the Claude stop_reason in message_delta."""
    events = _run(OpenAIStreamToClaude("m"), [_chunk({"content": "x"}), _chunk({}, finish_reason=finish)])
    assert assert_valid_claude_stream(events)["stop_reason"] == stop


def test_stream_finish_without_chunks_raises():
    """finish() with nothing received raises EmptyStreamError (nothing was sent yet: fail over)."""
    with pytest.raises(EmptyStreamError):
        OpenAIStreamToClaude("m").finish()


def test_stream_truncated_ends_with_error_event():
    """A stream that ends before a finish_reason ends with an api_error event, not a fake end_turn."""
    events = _run(OpenAIStreamToClaude("m"), [_chunk({"content": "half"})])
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert assert_valid_claude_stream(events) is None


def test_stream_error_chunk_becomes_error_event():
    """An {"error": ...} chunk mid-stream becomes an error event and later chunks are ignored."""
    translator = OpenAIStreamToClaude("m")
    events = translator.feed(_chunk({"content": "a"})) + translator.feed({"error": {"message": "overloaded"}})
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "overloaded"}})
    assert translator.feed(_chunk({"content": "b"})) == [] and translator.finish() == []
    assert assert_valid_claude_stream(events) is None


def test_stream_usage_with_cached_tokens():
    """The include_usage chunk maps prompt/cached/completion tokens into the final usage."""
    usage = {"prompt_tokens": 50, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 30}}
    events = _run(OpenAIStreamToClaude("m"), [_chunk({"content": "x"}, finish_reason="stop"), _chunk(choices=False, usage=usage)])
    assert events[-2][1]["usage"] == make_usage(input_tokens=20, output_tokens=5, cache_read_input_tokens=30)


# ====================================================================== OpenAI request -> Claude request (front door)


def test_front_door_request_golden():
    """System/developer messages, tool calls, tool results, images and options map to a Claude request."""
    openai_req = {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"where": "here"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "a dog"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object", "properties": {"where": {"type": "string"}}}}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 1.5,
        "top_p": 0.8,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert openai_to_claude_request(openai_req) == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.\n\nUse tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "look", "input": {"where": "here"}},
                    {"type": "tool_use", "id": "call_2", "name": "look", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "a dog"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "max_tokens": 4096,
        "tools": [{"name": "look", "description": "Look", "input_schema": {"type": "object", "properties": {"where": {"type": "string"}}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 1.0,
        "top_p": 0.8,
        "metadata": {"user_id": "u1"},
        "stream": True,
    }


@pytest.mark.parametrize(
    "req, expected",
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200, "max_tokens": 100}, 200),
        ({}, 4096),
    ],
)
def test_front_door_max_tokens(req, expected):
    """max_completion_tokens wins over max_tokens; absent both, 4096."""
    claude = openai_to_claude_request(dict({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, **req))
    assert claude["max_tokens"] == expected


def test_front_door_reasoning_effort_enables_thinking():
    """reasoning_effort becomes a thinking budget below max_tokens, and temperature is dropped."""
    claude = openai_to_claude_request(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high", "max_tokens": 1000, "temperature": 0.2}
    )
    assert claude["thinking"] == {"type": "enabled", "budget_tokens": 24576}
    assert claude["max_tokens"] > 24576 and "temperature" not in claude
    assert reasoning_effort_for_budget(claude["thinking"]["budget_tokens"]) == "high"


@pytest.mark.parametrize(
    "req, pattern",
    [
        ({"n": 2}, "n:"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}]}, "not valid JSON"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AA"}}]}]}, "image/tiff"),
        ({"messages": [{"role": "function", "content": "x"}]}, "function"),
    ],
)
def test_front_door_unsupported_raise(req, pattern):
    """What Claude cannot take is a TranslationError naming it."""
    with pytest.raises(TranslationError, match=pattern):
        openai_to_claude_request(dict({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, **req))


# ====================================================================== Claude response -> OpenAI response (front door)


def _claude_message(content, stop_reason="end_turn"):
    return {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": make_usage(input_tokens=10, output_tokens=5, cache_read_input_tokens=90, cache_creation_input_tokens=3),
    }


def test_front_door_response_golden():
    """A Claude message with thinking, text and a tool call becomes a chat.completion."""
    claude = _claude_message(
        [
            {"type": "thinking", "thinking": "plan", "signature": "sig"},
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "tool_use",
    )
    out = claude_to_openai_response(claude, created=1700000000)
    assert out == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "claude-sonnet-4-5",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Sure.",
                    "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
                    "reasoning_content": "plan",
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 103, "completion_tokens": 5, "total_tokens": 108, "prompt_tokens_details": {"cached_tokens": 90}},
    }
    ChatCompletion.model_validate(out)


@pytest.mark.parametrize(
    "stop, finish",
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "stop")],
)
def test_front_door_finish_reason_map(stop, finish):
    """Claude stop reasons map onto OpenAI finish_reason values."""
    assert claude_to_openai_response(_claude_message([{"type": "text", "text": "x"}], stop))["choices"][0]["finish_reason"] == finish


def test_front_door_response_without_text_has_null_content():
    """A tool-only answer has content null, as OpenAI sends it."""
    out = claude_to_openai_response(_claude_message([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}], "tool_use"))
    assert out["choices"][0]["message"]["content"] is None


# ====================================================================== Claude stream -> OpenAI chunks (front door)


def accumulate_chunks(chunks):
    """Fold OpenAI chunks into (content, reasoning, tool_calls, finish_reason, usage), checking their shape."""
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                if call.get("id"):
                    entry["id"] = call["id"]
                entry["name"] += (call.get("function") or {}).get("name") or ""
                entry["arguments"] += (call.get("function") or {}).get("arguments") or ""
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    assert sorted(calls) == list(range(len(calls)))  # tool indexes are 0, 1, 2 ...
    return content, reasoning, [calls[k] for k in sorted(calls)], finish, usage


def test_front_door_stream_golden():
    """Claude events become role, content, tool_calls deltas, a finish chunk and a usage chunk."""
    message = _claude_message(
        [
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
        ],
        "tool_use",
    )
    translator = ClaudeStreamToOpenAI("claude-sonnet-4-5", include_usage=True, created=5, completion_id="chatcmpl-x")
    chunks = [c for event in stream_message(message, piece=100) for c in translator.feed(event)]
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 5, "model": "claude-sonnet-4-5", "usage": None}

    def delta(d, finish=None):
        return dict(base, choices=[{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}])

    assert chunks == [
        delta({"role": "assistant", "content": ""}),
        delta({"content": "Hi"}),
        delta({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
        delta({"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        delta({}, "tool_calls"),
        dict(base, choices=[], usage={"prompt_tokens": 103, "completion_tokens": 5, "total_tokens": 108, "prompt_tokens_details": {"cached_tokens": 90}}),
    ]
    accumulate_chunks(chunks)


def test_front_door_stream_without_usage_and_with_error():
    """Without include_usage no usage chunk is sent; an error event becomes an error chunk."""
    translator = ClaudeStreamToOpenAI("m", include_usage=False)
    chunks = [c for event in stream_message(_claude_message([{"type": "text", "text": "x"}])) for c in translator.feed(event)]
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    error = translator.feed(("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}))
    assert error == [{"error": {"message": "busy", "type": "overloaded_error", "code": None}}]
    assert translator.feed(("ping", {"type": "ping"})) == []


# ====================================================================== round trips and properties


def test_tool_use_round_trip_claude_openai_claude():
    """A Claude history with tool_use and tool_result survives Claude -> OpenAI -> Claude."""
    claude = _claude(
        [
            _user("weather?"),
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_01W", "name": "weather", "input": {"city": "Oslo"}},
                ],
            },
            _user([{"type": "tool_result", "tool_use_id": "toolu_01W", "content": "sunny"}]),
        ],
        system="sys",
    )
    back = openai_to_claude_request(claude_to_openai_request(claude, "gpt-4o"))
    assert back["system"] == "sys"
    assert back["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        claude["messages"][1],
        claude["messages"][2],
    ]
    # and the answer to it: an OpenAI tool call comes back as a Claude tool_use that a later turn can answer
    answer = openai_to_claude_response(
        _completion({"tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}, "tool_calls"),
        "claude-sonnet-4-5",
    )
    follow_up = _claude(claude["messages"] + [{"role": "assistant", "content": answer["content"]}, _user([{"type": "tool_result", "tool_use_id": "call_9", "content": "rain"}])])
    messages = claude_to_openai_request(follow_up, "gpt-4o")["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_9" and messages[-1] == {"role": "tool", "tool_call_id": "call_9", "content": "rain"}


def _project_request(claude):
    """What must survive a round trip: system text, and per turn texts, images, tool calls and tool results."""
    turns = []
    for message in claude["messages"]:
        items = []
        for block in content_blocks(message["content"]):
            kind = block["type"]
            if kind == "text":
                items.append(("text", block["text"]))
            elif kind == "image":
                items.append(("image", json.dumps(block["source"], sort_keys=True)))
            elif kind == "tool_use":
                items.append(("tool_use", block["id"], block["name"], json.dumps(block["input"], sort_keys=True)))
            elif kind == "tool_result":
                body = block.get("content")
                parts = [b["text"] for b in content_blocks(body) if b["type"] == "text"]
                if block.get("is_error"):
                    parts = ["Error: " + (parts[0] if parts else "")] + parts[1:]
                items.append(("tool_result", block["tool_use_id"], tuple(p for p in parts if p)))
        if message["role"] == "assistant":
            # documented loss: OpenAI keeps an assistant turn's text apart from its tool calls
            items.sort(key=lambda item: item[0] == "tool_use")
        if turns and turns[-1][0] == message["role"]:
            turns[-1][1].extend(items)
        elif items:
            turns.append((message["role"], items))
    return system_text(claude.get("system")), turns


@given(claude_requests())
@settings(max_examples=150, deadline=None)
def test_property_any_claude_request_translates(claude):
    """Generated Claude requests (text, images, tools, results, thinking) translate to OpenAI without error."""
    out = claude_to_openai_request(claude, "gpt-4o")
    json.dumps(out)
    roles = [m["role"] for m in out["messages"]]
    for i, m in enumerate(out["messages"]):
        if m["role"] == "tool":  # every tool message directly answers the assistant calls before it
            assert roles[i - 1] in ("assistant", "tool")


@given(claude_requests(tool_result_images=False))
@settings(max_examples=150, deadline=None)
def test_property_request_round_trip_keeps_text_and_tools(claude):
    """Claude -> OpenAI -> Claude keeps system text, texts, images, tool calls and tool results."""
    back = openai_to_claude_request(claude_to_openai_request(claude, "gpt-4o"))
    assert _project_request(back) == _project_request(claude)
    assert back["max_tokens"] >= claude["max_tokens"]


def _project_response(claude):
    text = "".join(b["text"] for b in claude["content"] if b["type"] == "text")
    thinking = "".join(b["thinking"] for b in claude["content"] if b["type"] == "thinking")
    tools = [(b["id"], b["name"], b["input"]) for b in claude["content"] if b["type"] == "tool_use"]
    return text, thinking, tools, claude["stop_reason"]


@given(claude_messages())
@settings(max_examples=150, deadline=None)
def test_property_response_round_trip(message):
    """Claude response -> OpenAI response -> Claude keeps text, thinking, tool calls, stop reason and usage."""
    openai_resp = claude_to_openai_response(message)
    ChatCompletion.model_validate(openai_resp)
    back = openai_to_claude_response(openai_resp, message["model"])
    assert _project_response(back) == _project_response(message)
    assert back["usage"] == message["usage"]


@given(claude_messages(), st.integers(1, 7), st.booleans())
@settings(max_examples=150, deadline=None)
def test_property_stream_round_trip(message, piece, include_usage):
    """Claude events -> OpenAI chunks -> Claude events is a valid stream with the same content."""
    to_openai = ClaudeStreamToOpenAI(message["model"], include_usage=include_usage)
    chunks = [c for event in stream_message(message, piece) for c in to_openai.feed(event)]
    content, reasoning, calls, finish, usage = accumulate_chunks(chunks)
    expected = claude_to_openai_response(message)
    assert content == (expected["choices"][0]["message"]["content"] or "")
    assert finish == expected["choices"][0]["finish_reason"]
    assert (usage == expected["usage"]) if include_usage else usage is None

    back = _run(OpenAIStreamToClaude(message["model"]), chunks)
    rebuilt = assert_valid_claude_stream(back, allow_error=False)
    assert _project_response(rebuilt) == _project_response(message)
    if include_usage:
        assert rebuilt["usage"] == message["usage"]


@st.composite
def openai_chunk_streams(draw):
    """An OpenAI chunk stream: reasoning, content and several tool calls with arguments split anywhere."""
    segments = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("content"), st.text(min_size=1, max_size=8)),
                st.tuples(st.just("reasoning"), st.text(min_size=1, max_size=8)),
                st.tuples(st.just("tool"), st.dictionaries(st.text(max_size=3), st.integers(), max_size=3)),
            ),
            max_size=6,
        )
    )
    chunks = [_chunk({"role": "assistant", "content": ""})]
    expected_tools = []
    for kind, value in segments:
        if kind == "tool":
            index = len(expected_tools)
            raw = json.dumps(value)
            cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
            pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
            chunks.append(_chunk(_tc(index, id="call_%d" % index, name="t%d" % index, args=pieces[0])))
            chunks.extend(_chunk(_tc(index, args=p)) for p in pieces[1:])
            expected_tools.append(("call_%d" % index, "t%d" % index, value))
        else:
            key = "content" if kind == "content" else "reasoning_content"
            chunks.append(_chunk({key: value}))
    chunks.append(_chunk({}, finish_reason="tool_calls" if expected_tools else "stop"))
    chunks.append(_chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4}))
    text = "".join(v for k, v in segments if k == "content")
    thinking = "".join(v for k, v in segments if k == "reasoning")
    return chunks, text, thinking, expected_tools


@given(openai_chunk_streams())
@settings(max_examples=200, deadline=None)
def test_property_openai_streams_make_valid_claude_streams(case):
    """Any OpenAI chunk stream becomes a valid Claude stream holding the same text, thinking and tool calls."""
    chunks, text, thinking, tools = case
    message = assert_valid_claude_stream(_run(OpenAIStreamToClaude("m"), chunks), allow_error=False)
    assert "".join(b["text"] for b in message["content"] if b["type"] == "text") == text
    assert "".join(b["thinking"] for b in message["content"] if b["type"] == "thinking") == thinking
    assert [(b["id"], b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"] == tools
    assert message["stop_reason"] == ("tool_use" if tools else "end_turn")
    assert message["usage"]["output_tokens"] == 4
