"""Hostile or broken upstream bytes against the SSE parser and the usage/model extraction:
wrong counts are billing bugs, exceptions must not reach the reactor, nothing may hang."""

import json

import pytest

from clproxy.observe.recorder import usage_from_event, usage_from_message, usage_from_sse_tail
from clproxy.proxy.sse import Event, EventTooLarge, SSEParser, encode_event


def parse_all(chunks, **kw):
    parser = SSEParser(**kw)
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


# -- SSE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [0, 1, 2, 3, 4])
def test_a_byte_order_mark_at_the_stream_start_is_skipped(split):
    """WHATWG: a leading BOM is not part of the first field name. Kept, it hid the first event's
    name ("event: error" became a "message", taken for a successful stream), even split across chunks."""
    raw = b"\xef\xbb\xbfevent: error\ndata: {}\n\n"
    assert parse_all([raw[:split], raw[split:]]) == [Event("error", "{}")]


def test_a_bom_later_in_the_stream_is_not_skipped():
    """Only the stream's first bytes may be a BOM: later it is part of the line."""
    assert parse_all([b"data: 1\n\n", b"\xef\xbb\xbfevent: x\ndata: 2\n\n"]) == [
        Event("message", "1"), Event("message", "2")]


def test_an_empty_chunk_between_a_cr_and_its_lf_is_one_line_end():
    """A CR ending one chunk, an empty chunk, then the LF: one CRLF, not two line ends (the second
    was a blank line that dispatched half an event)."""
    assert parse_all([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [Event("message", "a\nb")]


def test_a_long_line_in_tiny_chunks_is_not_recopied_at_each_chunk():
    """An upstream sending one line in tiny chunks (chunked framing allows it) costs linear work:
    the partial line was re-copied whole at each chunk (quadratic: seconds for 400 KB, hours for
    16 MB, holding the reactor). Shown without a clock: each chunk without a line end is kept as
    the very object that came, and the line is joined once, when its end arrives."""
    parser = SSEParser(max_event_bytes=1024 * 1024)
    parser.feed(b"data: ")
    pieces = [bytes(bytearray(b"xy")) for _ in range(2000)]  # distinct objects (not interned)
    for piece in pieces:
        parser.feed(piece)
    held = parser._held
    assert len(held) == 1 + len(pieces) and all(a is b for a, b in zip(held[1:], pieces))
    assert parser.feed(b"\n\n") == [Event("message", "xy" * 2000)]


def test_a_line_sent_a_byte_per_chunk_is_still_bounded():
    """The held pieces of an unfinished line count against the event bound."""
    parser = SSEParser(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(2000):
            parser.feed(b"y")


def test_every_split_of_mixed_line_ends_gives_the_same_events():
    """CR, LF and CRLF mixed, comments, id/retry, "data" without a colon, split at every byte pair."""
    raw = (b": hi\r\nevent: a\rdata:1\ndata\r\nid: 3\r\n\r"
           b"retry: 5\nevent:b\r\ndata: {\"x\":1}\r\r")
    want = [Event("a", "1\n"), Event("b", '{"x":1}')]
    assert parse_all([raw]) == want
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            assert parse_all([raw[:i], raw[i:j], raw[j:]]) == want, (i, j)


# -- usage values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-5, 10 ** 30, 10 ** 400, "12", 1.5, True, None, [1], {"a": 1}])
def test_usage_values_that_are_no_token_count_are_ignored(bad):
    """Negative, absurdly large (10**400 cannot become a float for the metrics; the ledger's sums
    overflow), non-int values are ignored, field by field; the good ones are kept."""
    body = json.dumps({"content": [], "usage": {"input_tokens": bad, "output_tokens": 7,
                                                "cache_creation": {"ephemeral_5m_input_tokens": bad,
                                                                   "ephemeral_1h_input_tokens": 3}}})
    expected = {"output_tokens": 7, "cache_creation": {"ephemeral_1h_input_tokens": 3}}
    assert usage_from_message(body.encode()) == expected
    event = encode_event("message_delta", {"type": "message_delta", "usage": json.loads(body)["usage"]})
    assert usage_from_sse_tail(event) == expected


def test_a_deeply_nested_usage_does_not_raise():
    """A message_start whose usage nests 100000 deep: RecursionError escaped usage_from_event."""
    data = b'{"type":"message_start","message":{"usage":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}}"
    assert usage_from_event(data) == {}
    assert usage_from_message(data) == {}


# -- non-stream answers ---------------------------------------------------------------------------

FAKE = {"type": "tool_use", "id": "t", "name": "f", "input": {"usage": {"output_tokens": 999999}}}


def test_usage_first_then_a_tool_input_quoting_usage():
    """An answer with usage before its content (key order is not promised): the tool input's
    "usage" was taken for the answer's (999999 output tokens billed)."""
    body = json.dumps({"id": "m", "usage": {"input_tokens": 3, "output_tokens": 4},
                       "content": [FAKE], "stop_reason": "tool_use"}).encode()
    assert usage_from_message(body) == {"input_tokens": 3, "output_tokens": 4}


def test_no_top_level_usage_records_none():
    """Only a tool input has a "usage" key: nothing is recorded."""
    body = json.dumps({"id": "m", "content": [FAKE], "stop_reason": "tool_use"}).encode()
    assert usage_from_message(body) == {}
    body = json.dumps({"id": "m", "content": [FAKE], "usage": "n/a"}).encode()
    assert usage_from_message(body) == {}


def test_usage_last_with_scalar_members_after_it_takes_the_fast_path():
    """Scalar members after a top-level usage still count as the answer's end; a huge text before
    it is not decoded."""
    body = json.dumps({"content": [{"type": "text", "text": "x" * 2_000_000}],
                       "usage": {"input_tokens": 1, "output_tokens": 2}, "tier": "s", "n": None}).encode()
    assert usage_from_message(body) == {"input_tokens": 1, "output_tokens": 2}


def test_usage_last_with_an_object_member_after_it():
    """An object member after usage (a tool-like look-alike) forces the whole decode, which finds the
    real one: a "usage" inside that object is not taken."""
    body = json.dumps({"usage": {"input_tokens": 1, "output_tokens": 2},
                       "extra": {"usage": {"output_tokens": 999999}}}).encode()
    assert usage_from_message(body) == {"input_tokens": 1, "output_tokens": 2}


def test_duplicate_usage_keys_last_wins_as_in_json():
    """Duplicate top-level keys: the last one, as a JSON parser reads it."""
    body = b'{"usage": {"output_tokens": 1}, "content": [], "usage": {"output_tokens": 2}}'
    assert usage_from_message(body) == {"output_tokens": 2}


# -- stream tails ---------------------------------------------------------------------------------

def test_a_short_stream_whose_message_delta_has_output_tokens_only():
    """A message_delta with output_tokens only: the input and cache counts of its message_start,
    in the same tail, were lost (in passthrough mode the tail is all that is read)."""
    start = {"type": "message_start", "message": {"id": "m", "model": "x", "content": [], "usage": {
        "input_tokens": 30, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 2, "output_tokens": 1}}}
    stream = (encode_event("message_start", start)
              + encode_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                  "type": "text_delta", "text": '"usage": {"output_tokens": 999999}'}})
              + encode_event("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 50}})
              + encode_event("message_stop", {"type": "message_stop"}))
    assert usage_from_sse_tail(stream) == {"input_tokens": 30, "cache_read_input_tokens": 7,
                                           "cache_creation_input_tokens": 2, "output_tokens": 50}


def test_a_tail_without_message_start_is_the_message_delta_alone():
    """A window beginning after message_start: only the message_delta's usage."""
    stream = (encode_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": "message_start"}})
              + encode_event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 5}}))
    assert usage_from_sse_tail(stream) == {"output_tokens": 5}
