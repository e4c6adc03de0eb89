"""The incremental SSE parser and writer."""

import json

import pytest
from hypothesis import given, strategies as st

from clproxy.proxy.sse import Event, EventTooLarge, SSEParser, encode_event, encode_events


def parse_all(chunks):
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def test_event_and_data_lines():
    """An event line and a data line make one named event."""
    assert parse_all([b"event: message_start\ndata: {\"a\":1}\n\n"]) == [Event("message_start", '{"a":1}')]


def test_multiline_data_and_default_name():
    """Several data lines join with newlines; an unnamed event is called message."""
    assert parse_all([b"data: one\ndata: two\n\n"]) == [Event("message", "one\ntwo")]


def test_comments_are_ignored():
    """Comment lines such as keep-alives produce no event."""
    assert parse_all([b": keep-alive\n\n", b"event: ping\ndata: {}\n\n"]) == [Event("ping", "{}")]


def test_crlf_and_cr_line_ends_split_across_chunks():
    """CRLF and bare CR line ends work even when a CRLF is split between chunks."""
    events = parse_all([b"event: a\r", b"\ndata: 1\r\n\r", b"\nevent: b\rdata: 2\r\r"])
    assert events == [Event("a", "1"), Event("b", "2")]


def test_no_space_after_colon_and_unknown_fields():
    """A value without the optional space is read, and id/retry fields are ignored."""
    assert parse_all([b"event:x\nid: 7\nretry: 10\ndata:y\n\n"]) == [Event("x", "y")]


def test_incomplete_event_is_held():
    """An event without its blank line is not dispatched yet."""
    parser = SSEParser()
    assert parser.feed(b"event: a\ndata: 1\n") == []
    assert parser.feed(b"\n") == [Event("a", "1")]


def test_event_too_large_is_bounded():
    """An event that never ends cannot grow the buffer past the bound."""
    parser = SSEParser(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"x" * 100 + b"\n")


def test_json_helper():
    """Event.json parses the data."""
    assert Event("m", '{"k": [1]}').json() == {"k": [1]}


def test_encode_event_round_trip():
    """encode_event writes compact JSON with an event line; the parser reads it back."""
    frame = encode_event("content_block_delta", {"type": "x", "text": "a\nb"})
    assert frame.startswith(b"event: content_block_delta\ndata: {")
    (event,) = parse_all([frame])
    assert event.json() == {"type": "x", "text": "a\nb"}


def test_encode_multiline_string_data():
    """String data with newlines becomes several data lines."""
    assert encode_event(None, "a\nb") == b"data: a\ndata: b\n\n"


@given(st.lists(st.tuples(st.sampled_from(["message_start", "content_block_delta", "ping", "error"]),
                          st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3)),
                max_size=10),
       st.integers(min_value=1, max_value=17))
def test_any_split_gives_the_same_events(events, size):
    """However the bytes are split into chunks, the same events come out."""
    data = encode_events(events)
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    parsed = parse_all(chunks)
    assert [(e.name, json.loads(e.data)) for e in parsed] == events
