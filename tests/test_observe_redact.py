"""Redaction (clproxy.observe.redact) and trace context (clproxy.observe.trace): pure functions."""

import json

import pytest

from clproxy.observe.redact import (REDACTED, collect_secrets, is_sensitive_key, redact_headers,
                                    redact_json_bytes, redact_raw, redact_text, redact_value)
from clproxy.observe.trace import (clean_tracestate, format_traceparent, new_span_id, new_trace_id,
                                   parse_traceparent, read_inbound)

ANTHROPIC_KEY = "sk-ant-api03-Zq8XyW7vU6tS5rQ4pO3nM2lK1jI0hG9fE8dC7bA6"
OAUTH_TOKEN = "sk-ant-oat01-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
OPENAI_KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"
OPENAI_CLASSIC = "sk-" + "T3BlbkFJ" * 6
GOOGLE_KEY = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
BEARER = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
SHAPED = (ANTHROPIC_KEY, OAUTH_TOKEN, OPENAI_KEY, OPENAI_CLASSIC, GOOGLE_KEY)


@pytest.mark.parametrize("secret", SHAPED)
def test_key_shaped_strings_are_masked_anywhere_in_text(secret):
    """Anthropic, OpenAI and Google key shapes are masked in the middle of prose."""
    text = redact_text(f"my key is {secret}, please keep it")
    assert secret not in text
    assert REDACTED in text
    assert text.startswith("my key is ") and text.endswith(", please keep it")


def test_bearer_tokens_are_masked_in_any_case():
    """``Bearer <token>`` loses its token whatever the capitalisation of Bearer."""
    for word in ("Bearer", "bearer", "BEARER"):
        assert BEARER not in redact_text(f"Authorization: {word} {BEARER}")


def test_each_shape_runs_when_its_start_is_there_and_bearer_in_any_case():
    """redact_text skips a shape whose literal start is absent: each shape's start (taken from its
    replacement) is the real start of its pattern; a Bearer token in odd capitals is still masked when
    another shape's marker is in the same text."""
    from clproxy.observe import redact
    for pattern, _, start in redact._KEY_SHAPES_BY_START:
        assert start is None or pattern.pattern.replace("(?<![A-Za-z0-9])", "").startswith(start)
    assert [start for _, _, start in redact._KEY_SHAPES_BY_START].count(None) == 1  # Bearer
    text = redact_text(f"sk-learn says BeArEr {BEARER} and {OPENAI_KEY}")
    assert BEARER not in text and OPENAI_KEY not in text and text.startswith("sk-learn says ")


def test_ordinary_text_is_left_alone():
    """Words that merely contain ``sk-`` or ``AIza`` are not mistaken for keys."""
    text = "task-antelope sk-learn ask-me AIzawa bearer-of-news"
    assert redact_text(text) == text


BASIC = "YWxpY2U6czNjcmV0LXBhc3M="  # base64 of alice:s3cret-pass


@pytest.mark.parametrize("text", [f"Authorization: Basic {BASIC}", f"upstream said: basic  {BASIC}.",
                                  f"proxy-authorization: BASIC {BASIC}"])
def test_basic_credentials_are_masked_in_text_and_bytes(text):
    """HTTP Basic credentials (base64 of user:password) echoed in an error or a header line go, in
    text and in raw bytes; the word Basic and what surrounds them stay."""
    before, after = text.split(BASIC)
    assert redact_text(text) == before + REDACTED + after
    assert redact_raw(text.encode()) == (before + REDACTED + after).encode()


def test_words_after_basic_that_are_not_credentials_stay():
    """"Basic" followed by a word that is not base64 of text with a colon is ordinary prose."""
    text = "Basic instructions: use basic auth. Basic dXNlcg== has no password. basic Zm9vYmFy"
    assert redact_text(text) == text and redact_raw(text.encode()) == text.encode()


@pytest.mark.parametrize("url,kept", [
    ("https://bob:hunter2@example.com/v1/messages", "https://bob:[REDACTED]@example.com/v1/messages"),
    ("connect to postgres://u:p%40ss@db:5432/x failed", "connect to postgres://u:[REDACTED]@db:5432/x failed"),
])
def test_a_password_in_a_urls_userinfo_is_masked(url, kept):
    """user:password@ in a URL (a base URL echoed by an error): the password goes, user and host stay."""
    assert redact_text(url) == kept
    assert redact_raw(url.encode()) == kept.encode()


@pytest.mark.parametrize("text", ["https://example.com:8443/a@b", "mailto: a@b.c", "ssh://git@host/repo",
                                  "see http://host/path?u=a:b@c"])
def test_urls_without_a_password_are_left_alone(text):
    """A port, an @ in a path or query, a user without password: nothing to mask."""
    assert redact_text(text) == text


def test_clproxy_client_keys_are_masked_in_text_bytes_and_collected():
    """A clproxy client key (``clp_`` + 43 url-safe characters) pasted into a prompt or a tool's
    output is masked like any other key shape; ``clp_config`` and the like are left alone."""
    from clproxy.team.keys import generate_key
    key = generate_key()
    assert key not in redact_text(f"export ANTHROPIC_API_KEY={key}")
    assert key.encode() not in redact_raw(b'{"text":"ANTHROPIC_API_KEY=' + key.encode() + b'"}')
    assert key in collect_secrets({"content": f"the key is {key}"})
    assert redact_text("see clp_config and clp_x") == "see clp_config and clp_x"


def test_request_ids_are_not_mistaken_for_client_keys():
    """A request id (``req_clp_`` + 24 hex digits) stays readable in text, bytes and JSON log rows,
    so a log line can be found from the id a client saw; a client key stays masked even where it
    starts like one, or follows ``req_``."""
    from clproxy.proxy.dispatch import new_request_id
    from clproxy.team.keys import generate_key
    request_id = new_request_id()
    assert redact_text(f"request {request_id} failed") == f"request {request_id} failed"
    assert redact_raw(b'{"requestId":"' + request_id.encode() + b'"}') == (
        b'{"requestId":"' + request_id.encode() + b'"}')
    assert redact_value({"requestId": request_id}) == {"requestId": request_id}
    assert request_id not in collect_secrets({"content": request_id})
    key = generate_key()
    for text in (f"req_{key}", "clp_" + "0123456789abcdef" * 2 + "-X" * 12, "clp_" + "a" * 24 + "Z" * 19):
        assert text[text.index("clp_"):] not in redact_text(text)


def test_sensitive_json_keys_are_redacted_at_any_depth():
    """authorization, x-api-key, cookies, tokens, api_key and client_secret lose their values, nested too."""
    document = {"model": "claude", "metadata": {"api_key": "k1", "deeper": [{"refresh_token": "k2"}]},
                "access_token": "k3", "client_secret": "k4", "Authorization": "k5", "x-api-key": "k6",
                "cookie": "k7", "accessToken": "k8", "note": "keep me"}
    redacted = redact_value(document)
    flat = json.dumps(redacted)
    for value in ("k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"):
        assert f'"{value}"' not in flat
    assert redacted["note"] == "keep me" and redacted["model"] == "claude"
    assert redacted["metadata"]["deeper"][0]["refresh_token"] == REDACTED


def test_json_inside_a_string_loses_its_secret_values():
    """A tool input serialised into a string still has its ``api_key`` value emptied."""
    text = redact_text('{"api_key": "hunter2-plain", "city": "Paris"}')
    assert "hunter2-plain" not in text and '"city": "Paris"' in text


def test_headers_are_redacted_by_name_and_by_shape():
    """Credential headers are replaced; other headers keep their value unless it is key-shaped."""
    headers = [(b"Authorization", b"Bearer " + BEARER.encode()), (b"x-api-key", ANTHROPIC_KEY.encode()),
               (b"Cookie", b"sid=abcdef123456"), (b"x-note", f"see {OPENAI_KEY}".encode()),
               (b"content-type", b"application/json")]
    redacted = dict(redact_headers(headers))
    assert redacted["Authorization"] == REDACTED
    assert redacted["x-api-key"] == REDACTED
    assert redacted["Cookie"] == REDACTED
    assert OPENAI_KEY not in redacted["x-note"]
    assert redacted["content-type"] == "application/json"


def test_raw_bytes_are_redacted_without_changing_anything_else():
    """Raw SSE keeps every byte except the masked values (plain and escaped JSON pairs, key shapes)."""
    raw = (b'event: content_block_delta\ndata: {"type":"x","refresh_token":"rt-secret-1","t":"'
           b'{\\"access_token\\": \\"at-secret-2\\"}"}\n\n'
           b'data: {"text":"' + GOOGLE_KEY.encode() + b'"}\n\n')
    redacted = redact_raw(raw)
    assert b"rt-secret-1" not in redacted and b"at-secret-2" not in redacted
    assert GOOGLE_KEY.encode() not in redacted
    assert redacted.startswith(b'event: content_block_delta\ndata: {"type":"x","refresh_token":"')
    assert redacted.endswith(b'"}\n\n')


def test_json_body_redaction_falls_back_to_raw_for_non_json():
    """A body that is not JSON (a cut prefix) is still redacted."""
    assert b"abc-secret" not in redact_json_bytes(b'{"api_key": "abc-secret", "x": [1, 2')
    assert json.loads(redact_json_bytes(b'{"api_key": "abc-secret"}')) == {"api_key": REDACTED}


def test_collect_secrets_finds_what_redaction_removes():
    """The secrets of a value are those under sensitive keys and the key-shaped substrings."""
    found = collect_secrets({"password": "swordfish", "text": f"k={ANTHROPIC_KEY}", "n": 3})
    assert found == {"swordfish", ANTHROPIC_KEY}


def test_sensitive_key_names_fold_case_and_separators():
    """access_token, accessToken and Access-Token are one key; ordinary names are not sensitive."""
    assert all(is_sensitive_key(k) for k in ("access_token", "accessToken", "Access-Token", "API_KEY"))
    assert not any(is_sensitive_key(k) for k in ("model", "tokens", "input_tokens", 3, None))


# --- trace context -----------------------------------------------------------------------------

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_valid_traceparent_is_parsed():
    """A version-00 traceparent yields its trace id, parent span id and flags."""
    assert parse_traceparent(VALID) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "01")
    assert parse_traceparent(VALID.encode()) is not None


@pytest.mark.parametrize("value", [
    "", "garbage", VALID.upper(), "ff" + VALID[2:], VALID + "-extra",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01", b"\xff\xfe", "x" * 1000,
])
def test_malformed_traceparent_is_ignored(value):
    """Invalid versions, lengths, cases, all-zero ids and junk give None, never an error."""
    assert parse_traceparent(value) is None


def test_future_version_may_carry_more_fields():
    """A higher version with extra fields is accepted (W3C forward compatibility)."""
    assert parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what") is not None


def test_new_ids_are_well_formed_and_distinct():
    """Generated ids are lower-case hex of the right length and do not repeat."""
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000
    assert all(len(t) == 32 and int(t, 16) for t in traces)
    assert all(len(s) == 16 and int(s, 16) for s in spans)
    assert parse_traceparent(format_traceparent(new_trace_id(), new_span_id()).decode()) is not None


def test_inbound_context_reads_trace_and_identity_headers_in_any_case():
    """traceparent/tracestate and the x-clproxy-*/x-neurolink-* ids are found whatever their case."""
    inbound = read_inbound([(b"Traceparent", VALID.encode()), (b"TRACESTATE", b"congo=t61rcWkgMzE"),
                            (b"X-Neurolink-Session-Id", b"sess-1"), (b"x-clproxy-user-id", b"user-1"),
                            (b"X-CLPROXY-CONVERSATION-ID", b"conv-1"),
                            (b"x-claude-code-session-id", b"cc-1")])
    assert (inbound.trace_id, inbound.parent_span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert inbound.tracestate == "congo=t61rcWkgMzE"
    assert (inbound.session_id, inbound.user_id, inbound.conversation_id, inbound.claude_session_id) == (
        "sess-1", "user-1", "conv-1", "cc-1")


def test_tracestate_without_a_valid_traceparent_is_dropped():
    """A tracestate belongs to a traceparent: with a malformed parent it is not kept."""
    inbound = read_inbound([(b"traceparent", b"nonsense"), (b"tracestate", b"a=b")])
    assert inbound.trace_id is None and inbound.tracestate is None


def test_identity_values_are_bounded_and_redacted():
    """An identity header carrying a key shape is masked; long values are cut."""
    inbound = read_inbound([(b"x-clproxy-session-id", ANTHROPIC_KEY.encode()),
                            (b"x-clproxy-user-id", b"u" * 5000)])
    assert ANTHROPIC_KEY not in inbound.session_id
    assert len(inbound.user_id) == 200


def test_tracestate_limits():
    """An over-long or non-printable tracestate is refused."""
    assert clean_tracestate("a=" + "b" * 600) is None
    assert clean_tracestate(b"a=\x01") is None
    assert clean_tracestate(" vendor=value ") == "vendor=value"


def test_clean_short_texts_are_remembered_and_secrets_never_are(monkeypatch):
    """A text redaction leaves as it is comes back without the rules running again (a log row's
    model, path, account... on every request); a text that held a secret is never kept, nor a long
    one; the memory is emptied when full, not grown."""
    from clproxy.observe import redact
    monkeypatch.setattr(redact, "_CLEAN", {})
    ran = []
    real = redact._redact_text
    monkeypatch.setattr(redact, "_redact_text", lambda text: ran.append(text) or real(text))
    assert redact_text("claude-sonnet-4-5") == redact_text("claude-sonnet-4-5") == "claude-sonnet-4-5"
    assert ran == ["claude-sonnet-4-5"]
    secret = f"key {ANTHROPIC_KEY}"
    assert redact_text(secret) == redact_text(secret) != secret
    assert ran.count(secret) == 2 and secret not in redact._CLEAN
    long_text = "x" * (redact._CLEAN_LONGEST + 1)
    redact_text(long_text)
    assert long_text not in redact._CLEAN
    monkeypatch.setattr(redact, "_CLEAN_LIMIT", 10)
    for i in range(25):
        redact_text(f"id-{i}")
        assert len(redact._CLEAN) <= 10
