"""Redaction under hostile or sloppy input: secrets in forms an attacker, a tool or an upstream might
produce must not reach a JSONL row or a body capture, and ordinary values must come out unchanged."""

import json

import pytest

from clproxy import jsoncodec
from clproxy.observe.jsonl import _encode_row, redact_stream
from clproxy.observe.redact import (REDACTED, collect_secrets, is_sensitive_key, redact_headers,
                                    redact_json_bytes, redact_raw, redact_text, redact_value)

ANTHROPIC_KEY = "sk-ant-api03-Zq8XyW7vU6tS5rQ4pO3nM2lK1jI0hG9fE8dC7bA6"
OPENAI_KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"
GOOGLE_KEY = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
CLIENT_KEY = "clp_" + "Q7dKx2LmN9pR4sT6vW8yZ1aB3cE5fG7hJ9kM2nP4qS6"
BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
SHAPED = [ANTHROPIC_KEY, OPENAI_KEY, GOOGLE_KEY, CLIENT_KEY]


def tail(secret: str) -> str:
    """The part of a key that must never be written (its public prefix may stay)."""
    return secret[8:]


def row(**fields) -> str:
    return _encode_row("2025-01-31T00:00:00.000Z", fields).decode("utf-8")


def sse(*events) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                    for name, data in events)


def text_stream(*pieces: str) -> bytes:
    """A Messages API stream whose one text block is ``pieces``, one text_delta each."""
    events = [("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": piece}}) for piece in pieces]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_stop", {"type": "message_stop"})]
    return sse(*events)


# --- leaks found and fixed ------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["bEaReR", "BeArEr", "bEARER"])
def test_bearer_in_mixed_case_is_masked_when_nothing_else_is_key_shaped(word):
    """The quick test for "nothing to mask" looked for "earer" or "EARER" only: a lone
    "bEaReR <token>" (no other key shape in the string) skipped the Bearer pattern and was written."""
    assert BEARER not in redact_text(f"Authorization: {word} {BEARER}")
    assert BEARER not in row(detail=f"upstream said: {word} {BEARER}", nested={"h": f"{word}\t{BEARER}"})


@pytest.mark.parametrize("secret", SHAPED)
@pytest.mark.parametrize("escape", ["\n", "\t", "\r"])
def test_key_after_a_json_escape_is_masked(secret, escape):
    """A tool result that is serialised JSON holds "\\nsk-ant-..." (backslash, n, key): the "n"
    was read as a letter glued to the key, so the key stayed in the request capture, in a row's
    string, and in a cut body redacted raw."""
    output = json.dumps({"stdout": f"ANTHROPIC_API_KEY is{escape}{secret}"})
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": output}]}]}).encode()
    assert tail(secret).encode() not in redact_json_bytes(body)
    assert tail(secret).encode() not in redact_json_bytes(body[:-5])  # cut: redacted raw
    assert tail(secret) not in row(detail=output)
    assert secret in collect_secrets({"content": output})


def test_text_after_an_escape_that_is_no_key_is_left_alone():
    """The escape boundary adds no false positives: words after \\n that merely contain a key's
    start stay (task-ant-farm, sk-learn, clp_config, a request id)."""
    text = json.dumps({"out": "a\ntask-ant-farmers\nsk-learn\nclp_config\nreq_clp_" + "0a" * 12})
    assert redact_text(text) == text
    assert redact_raw(text.encode()) == text.encode()


def test_an_exception_or_other_object_in_a_row_is_redacted():
    """An exception (or a set, or any object) in a row's ``error``/``detail`` field was written as
    its str() by the encoder's default, after redaction had passed it by unchanged."""

    class Upstream:
        def __str__(self):
            return f"upstream rejected x-api-key {ANTHROPIC_KEY}"

    line = row(error=ValueError(f"invalid x-api-key {ANTHROPIC_KEY}"),
               detail=[RuntimeError(f"Bearer {BEARER}"), {GOOGLE_KEY}, (Upstream(),)])
    for secret in (tail(ANTHROPIC_KEY), BEARER, tail(GOOGLE_KEY)):
        assert secret not in line
    document = json.loads(line)
    assert document["error"] == "invalid x-api-key sk-ant-" + REDACTED
    assert document["detail"][2] == ["upstream rejected x-api-key sk-ant-" + REDACTED]


def test_a_key_shaped_dict_key_is_masked():
    """Keys are strings too: {"sk-ant-...": 1} kept the key, in a row and in a JSON body capture."""
    for secret in SHAPED:
        assert tail(secret) not in row(detail={secret: 1, "ok": {f"k {secret}": "v"}})
        assert tail(secret).encode() not in redact_json_bytes(json.dumps({"env": {secret: True}}).encode())
    assert redact_value({"model": 1, "task-ant-farm": 2}) == {"model": 1, "task-ant-farm": 2}


def test_names_ending_in_api_key_are_credentials():
    """ANTHROPIC_API_KEY, openai_api_key (a tool's env) and an anthropic-api-key header name a
    credential whoever issued it; token counts and ordinary names are not."""
    assert redact_value({"env": {"ANTHROPIC_API_KEY": "plain-secret-1", "openai_api_key": "plain-secret-2"}}) == {
        "env": {"ANTHROPIC_API_KEY": REDACTED, "openai_api_key": REDACTED}}
    assert dict(redact_headers([(b"Anthropic-Api-Key", b"plain-secret-3")])) == {"Anthropic-Api-Key": REDACTED}
    for name in ("max_tokens", "input_tokens", "api_key_id", "model", "keys"):
        assert not is_sensitive_key(name)


@pytest.mark.parametrize("cut", [3, 7, 12, 16, 20, 30, len(ANTHROPIC_KEY) - 6])
def test_a_secret_split_across_events_never_shows_in_the_raw_capture(cut):
    """A key split across two text deltas whose first piece is key-shaped by itself
    ("sk-ant-api03-Zq8") had that piece masked, so the reassembled check no longer saw the whole
    key and the raw bytes, with the key's tail in the second event, were kept."""
    raw, message = redact_stream(text_stream("key: " + ANTHROPIC_KEY[:cut], ANTHROPIC_KEY[cut:] + " end"))
    assert raw is None or ANTHROPIC_KEY[cut:].encode() not in raw
    assert tail(ANTHROPIC_KEY) not in json.dumps(message)
    assert raw is None  # the guard: the key really is split, so raw cannot be trusted


def test_a_bearer_token_split_after_its_first_piece_is_withheld():
    """The same for a Bearer token: "Bearer eyJhbGciOi" is masked alone, the rest was kept."""
    raw, message = redact_stream(text_stream("Authorization: Bearer " + BEARER[:10], BEARER[10:]))
    assert raw is None or BEARER[10:].encode() not in raw
    assert BEARER[10:] not in json.dumps(message)


def test_a_secret_both_whole_and_split_in_one_stream_is_withheld():
    """A key written whole in one block and split in another: the whole copy is masked, and the
    split copy's tail must not survive (the check looks for pieces of the key, not just all of it)."""
    stream = text_stream(f"first {ANTHROPIC_KEY} then ", ANTHROPIC_KEY[:20], ANTHROPIC_KEY[20:])
    raw, _ = redact_stream(stream)
    assert raw is None or ANTHROPIC_KEY[20:].encode() not in raw


NO_SHAPE = "u7Rk2Q9xZp4Lm8Vb3Nc6"  # a credential with no shape of its own (a custom provider's key)


@pytest.mark.parametrize("text", [
    f"upstream 401: GET https://llm.example/v1/chat?api_key={NO_SHAPE}&beta=true",
    f"ANTHROPIC_API_KEY={NO_SHAPE}",
    f"key = {NO_SHAPE}; retry",
    f"grant_type=refresh_token&refresh_token={NO_SHAPE}",
    f"x-goog-api-key={NO_SHAPE}",
    f"password={NO_SHAPE}",
    f"my_company_session_token={NO_SHAPE}",
])
def test_key_value_pairs_lose_their_value(text):
    """key=value (a query string echoed in an error, an environment line, a form body): the value
    of a credential's name goes even when it has no key shape; what follows stays."""
    written = row(error=text)
    assert NO_SHAPE not in written and REDACTED in written
    assert NO_SHAPE.encode() not in redact_raw(text.encode())
    if "&beta=true" in text:
        assert "&beta=true" in written


def test_a_credential_in_a_query_string_of_a_stream_capture_is_masked():
    """The raw bytes of a captured stream mask a key=value pair as a row does."""
    stream = text_stream(f"see https://h.example/?token={NO_SHAPE}&x=1")
    raw, message = redact_stream(stream)
    assert raw is not None and NO_SHAPE.encode() not in raw and b"&x=1" in raw
    assert NO_SHAPE not in json.dumps(message)


@pytest.mark.parametrize("text", ["/v1/messages?beta=true", "max_tokens=1024", "tokens=5", "monkey=banana",
                                  "turkey = 3", "x=1&y=2", "keys=3", "a " * 30 + "=b"])
def test_ordinary_pairs_are_left_alone(text):
    """Names that only look like credentials (max_tokens, monkey, keys) and other pairs stay."""
    assert redact_text(text) == text
    assert redact_raw(text.encode()) == text.encode()


# --- hostile forms already covered (guards) -------------------------------------------------------


@pytest.mark.parametrize("value", [
    ANTHROPIC_KEY.encode(),                                  # bytes
    bytearray(b"\xff\xfe" + ANTHROPIC_KEY.encode() + b"\x80"),  # not UTF-8
    ("a", [ANTHROPIC_KEY]),                                  # tuples and lists
    "x" * 10_000 + " " + ANTHROPIC_KEY + "A" * 50_000,            # very long
    ANTHROPIC_KEY + OPENAI_KEY + "," + GOOGLE_KEY,           # glued to other key-shaped text
    json.dumps({"a": json.dumps({"t": ANTHROPIC_KEY})}),     # JSON in a string in JSON
    f"Bearer\t{ANTHROPIC_KEY}",                              # tab
])
def test_hostile_values_in_a_row_are_masked(value):
    """Every supported shape reaching a row as bytes, non-UTF-8 bytes, a nested sequence, a very
    long string, glued to another key or inside nested JSON strings is masked."""
    assert tail(ANTHROPIC_KEY) not in row(detail=value)


@pytest.mark.parametrize("name", [b"authorization", b"AUTHORIZATION", b"X_Goog_Api_Key", b"x-API-key",
                                  b"Api_Key", b"Proxy-Authorization", "Set-Cookie"])
def test_credential_headers_in_any_spelling_are_replaced(name):
    """Header names fold case and separators; the value goes whatever it holds (odd Bearer spacing,
    bytes that are not UTF-8)."""
    for value in (b"bEaReR   " + BEARER.encode(), b"Bearer\t" + BEARER.encode(), b"\xff" + BEARER.encode()):
        assert dict(redact_headers([(name, value)])) == {
            name.decode() if isinstance(name, bytes) else name: REDACTED}


def test_json_escaped_keys_in_a_body_or_a_stream_are_masked():
    """A key spelt with JSON escapes (\\u0073k-ant-..., \\/ in a Bearer token) is masked in a JSON
    body (parsed first); in a stream the raw bytes, where no pattern sees it, are withheld."""
    escaped = "\\u0073k-ant-" + ANTHROPIC_KEY[len("sk-ant-"):]
    body = ('{"messages":[{"content":"' + escaped + ' and Bearer ab\\/' + BEARER + '"}]}').encode()
    assert tail(ANTHROPIC_KEY).encode() not in redact_json_bytes(body)
    assert BEARER.encode() not in redact_json_bytes(body)
    stream = text_stream("k").replace(b'"text": "k"', b'"text": "' + escaped.encode() + b'"')
    raw, message = redact_stream(stream)
    assert raw is None and tail(ANTHROPIC_KEY) not in json.dumps(message)


def test_an_upstream_error_echoing_the_key_is_masked_in_the_capture_and_the_row():
    """An upstream error body echoing the key (and a row's error built from it) keeps no key."""
    error = {"type": "error", "error": {"type": "authentication_error",
                                        "message": f"invalid x-api-key: {ANTHROPIC_KEY}"}}
    assert tail(ANTHROPIC_KEY).encode() not in redact_json_bytes(json.dumps(error).encode())
    assert tail(ANTHROPIC_KEY) not in row(error="upstream 401: " + json.dumps(error))


# --- false positives ------------------------------------------------------------------------------


def test_an_ordinary_row_is_written_unchanged():
    """A summary row of ordinary values (request id, model, user agent, words near key shapes,
    nested usage, an escaped newline) encodes exactly as the plain encoder would."""
    fields = {"requestId": "req_clp_" + "0123456789abcdef01234567", "method": "POST",
              "path": "/v1/messages?beta=true", "status": 200, "model": "claude-sonnet-4-5",
              "userAgent": "claude-cli/2.0.14 (external, cli)", "durationMs": 12.5, "error": None,
              "truncated": False, "note": "task-ant-farm sk-learn ask-me AIzawa bearer-of-news clp_config",
              "detail": ["a\\nb", {"input_tokens": 3, "max_tokens": 10}], "traceId": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert _encode_row("t", fields) == jsoncodec.dumps(dict({"ts": "t"}, **fields), newline=True)
