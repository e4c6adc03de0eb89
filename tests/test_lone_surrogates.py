"""A lone surrogate ("\\ud800", which Python's json reads from a client's or a provider's escape)
has no UTF-8 form: every place that writes JSON bytes for a client or a provider must keep it as
the escape it came as, never raise UnicodeEncodeError (a 500, or a dropped answer)."""

import json

import pytest_twisted

from clproxy.providers.clients import _json_bytes
from test_frontdoor import StubDispatcher, adapter, chat, chunks_of, serve, sse_bytes  # noqa: F401  (fixture)
from clproxy.testing import anthropic as testing
from clproxy.testing import providers as fp
from helpers import post, request_body
from test_translation_integration import daemon_config
from translation_fixtures import fake_openai, start_daemon  # noqa: F401  (fixtures)

LONE = "a\ud800b"


def test_a_provider_request_body_keeps_a_lone_surrogate_escaped():
    """The body sent to OpenAI or Gemini: the client's lone surrogate is written as its escape."""
    body = _json_bytes({"messages": [{"role": "user", "content": LONE}]})
    assert b"\\ud800" in body and json.loads(body)["messages"][0]["content"] == LONE


def test_a_claude_answer_with_a_lone_surrogate_becomes_a_chat_completion():
    """The OpenAI front door's whole answer: the text keeps the surrogate, escaped."""
    a, out = adapter()
    message = testing.message(LONE, model="claude-sonnet-4-5")
    a.send(200, [(b"content-type", [b"application/json"])], json.dumps(message).encode())
    assert out.status == 200 and out.json()["choices"][0]["message"]["content"] == LONE


def test_a_claude_stream_with_a_lone_surrogate_becomes_chunks():
    """The OpenAI front door's streamed chunks, and the SSE frames they come from: the text keeps
    the surrogate, escaped."""
    a, out = adapter(stream=True)
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": LONE}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 1}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    a.start(200, [(b"content-type", [b"text/event-stream"])])
    a.write(sse_bytes(events))
    a.finish()
    texts = [c["choices"][0]["delta"].get("content") for c in chunks_of(out.body)
             if isinstance(c, dict) and c.get("choices")]
    assert LONE in "".join(t for t in texts if t)


@pytest_twisted.ensureDeferred
async def test_a_chat_request_with_a_lone_surrogate_reaches_the_dispatcher(serve):  # noqa: F811
    """The OpenAI front door translates the request into a Claude body: the client's escape is
    kept, and the request is forwarded (it used to be a 500)."""
    dispatcher = StubDispatcher()
    url = serve(dispatcher)
    body = json.dumps({"model": "claude-sonnet-4-5", "stream": False,
                       "messages": [{"role": "user", "content": LONE}]}).encode()
    status, _, _ = await chat(url, body)
    assert status == 200
    claude = json.loads(dispatcher.requests[0].body)
    assert claude["messages"][0]["content"][0]["text"] == LONE


@pytest_twisted.ensureDeferred
async def test_a_translated_answer_with_a_lone_surrogate_reaches_the_client(fake, fake_openai, start_daemon):  # noqa: F811
    """A model mapped to OpenAI, whose whole answer holds a "\\ud800" escape: the client gets the
    Claude message with the escape kept (re-encoding it raised, and the client got no answer)."""
    mappings = [{"from": "claude-haiku-4-5", "to": "gpt-4o", "provider": "openai"}]
    daemon = start_daemon(daemon_config(fake, fake_openai=fake_openai, **{"model-mappings": mappings}))
    completion = json.dumps(fp.openai_completion(text="placeholder")).replace("placeholder", "a\\ud800b")
    fake_openai.script(body=completion.encode(), headers={"content-type": "application/json"})
    status, _, body = await post(daemon.url + "/v1/messages",
                                 request_body(model="claude-haiku-4-5"),
                                 {b"content-type": [b"application/json"], b"x-api-key": [b"client-key"],
                                  b"anthropic-version": [b"2023-06-01"]})
    assert status == 200 and b"\\ud800" in body
    assert json.loads(body)["content"][0]["text"] == LONE


def test_an_sse_frame_keeps_a_lone_surrogate_escaped_and_plain_text_gets_a_replacement():
    """encode_event: JSON data keeps the escape; data given as text (not JSON) cannot, so the
    surrogate becomes U+FFFD instead of raising."""
    from clproxy.proxy.sse import SSEParser, encode_event
    frame = encode_event("content_block_delta", {"text": LONE})
    assert json.loads(SSEParser().feed(frame)[0].data) == {"text": LONE}
    assert encode_event("note", LONE) == "event: note\ndata: a\ufffdb\n\n".encode("utf-8")
