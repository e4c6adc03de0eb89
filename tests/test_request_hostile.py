"""Hostile request bodies against the request-reading code that runs on every request: the JSON
codec (``clproxy.jsoncodec``), the dispatcher's body rewrites (``with_model``,
``without_foreign_thinking``) and its session lookup (``session_of_request``).

Each body here is one the front door accepts (valid JSON to the full parse, or something the
reader hands to it); whatever the rewrite does with it, the client gets an answer (the body
forwarded unchanged, or a 400), never an internal error.
"""

import json
from types import SimpleNamespace

import attr
import pytest

from clproxy import jsoncodec
from clproxy.errors import ProxyError
from clproxy.observe.jsonl import _encode_row
from clproxy.proxy import dispatch
from clproxy.proxy.dispatch import Dispatcher, ProxyRequest
from clproxy.routing.router import Router

from helpers import RecordingSink
from test_dispatch_memory import Harness, api, no_socket  # noqa: F401  (fixture)

SID = "6b1f3c2e-9d4a-4c8b-a1e2-7f5d3c9b8a10"
LEGACY_USER_ID = "user_" + "ab" * 32 + "_account__session_" + SID
FOREIGN = b'{"type":"thinking","thinking":"t","signature":""}'


def request_of(body: bytes, model="claude-sonnet-4-5", headers=()) -> ProxyRequest:
    return ProxyRequest(method=b"POST", path=b"/v1/messages", query=b"",
                        headers=[(b"content-type", b"application/json")] + list(headers),
                        body=body, model=model)


#: deeper than Python's json goes on every supported version: its limit is the interpreter's
#: recursion limit (about 1,000 levels less the caller's stack on 3.11; C recursion on 3.12 and
#: later: 3.12 parses 1,100 levels and not 5,000, 3.13 parses 5,000 and not 20,000)
TOO_DEEP_FOR_JSON = 100_000


def deep(levels: int = TOO_DEEP_FOR_JSON) -> bytes:
    """Arrays nested ``levels`` deep (by default, deeper than Python's json parses)."""
    return b"[" * levels + b"]" * levels


# jsoncodec.dumps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [{"model": "\udc00"}, {"s": "half an emoji \ud83d", "n": 2 ** 70}])
def test_dumps_writes_a_lone_surrogate_as_its_escape(value):
    """A lone surrogate (which Python's json reads from a client's ``\\udc00`` escape) is written
    as its escape, as json.loads gives it back; it used to raise UnicodeEncodeError (orjson
    refuses it, and the standard fallback then could not encode it as UTF-8)."""
    out = jsoncodec.dumps(value, newline=True)
    assert out.endswith(b"\n")
    assert json.loads(out) == value


def test_a_request_log_row_with_a_lone_surrogate_model_is_written():
    """A JSONL row of a request whose model holds a lone surrogate escape encodes: before, the
    writer dropped the row ("log record dropped"), so a client could keep its own requests out
    of the request log."""
    row = _encode_row("2026-01-01T00:00:00.000Z", {"model": "claude\udc00", "status": 200})
    assert json.loads(row) == {"ts": "2026-01-01T00:00:00.000Z", "model": "claude\udc00", "status": 200}


# without_foreign_thinking --------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    # the foreign block's marker, and a body Python's json cannot nest into
    b'{"model":"m","messages":[{"role":"user","content":[' + FOREIGN + b']}],"x":' + deep() + b'}',
    # messages that are not a list of objects (Anthropic answers those with its own 400)
    b'{"model":"m","messages":"' + FOREIGN.replace(b'"', b"'") + b'","x":{"signature":""}}',
    b'{"model":"m","messages":[1,{"role":"user","content":[' + FOREIGN + b']}]}',
    b'{"model":"m","messages":7,"x":{"signature":""}}',
    b'{"model":"m","messages":[{"role":"user","content":[{"type":"thinking","signature":5},'
    + FOREIGN + b']}]}',
])
def test_a_body_the_rewrite_cannot_read_is_forwarded_unchanged(body):
    """When a body holds the foreign-signature marker but the rewrite cannot read it (too deep for
    json, messages of the wrong shape), the body goes on unchanged; it used to raise
    (RecursionError, AttributeError, TypeError): an internal error for the client."""
    assert dispatch._FOREIGN_SIGNATURE.search(body)
    request = request_of(body)
    assert dispatch.without_foreign_thinking(request) is request


def test_a_foreign_block_is_removed_from_a_body_with_a_lone_surrogate():
    """A body with a lone surrogate escape (valid JSON, taken by the front door) and a foreign
    thinking block loses the block, the surrogate kept as its escape; the re-encoding used to
    raise UnicodeEncodeError."""
    body = (b'{"model":"m","messages":[{"role":"user","content":"half \\ud83d"},'
            b'{"role":"assistant","content":[' + FOREIGN + b',{"type":"text","text":"a"}]}]}')
    out = dispatch.without_foreign_thinking(request_of(body))
    assert json.loads(out.body) == {"model": "m", "messages": [
        {"role": "user", "content": "half \ud83d"},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}


@pytest.mark.parametrize("body", [
    b'{"model":"m","messages":[{"role":"user","content":"say \\"signature\\": \\"\\" please"}]}',
    b'{"model":"m","messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n",'
    b'"input":{"signature" : ""}}]}]}',
])
def test_a_signature_that_is_not_a_thinking_block_leaves_the_bytes_alone(body):
    """A "signature" in a message's text does not even match the marker, and an empty signature
    in a tool's input matches it but is no thinking block: the request (its bytes, for the
    prompt cache) is the same object."""
    request = request_of(body)
    assert dispatch.without_foreign_thinking(request) is request


def test_a_foreign_block_with_a_deep_body_reaches_anthropic(no_socket):  # noqa: F811
    """Through the dispatcher: a deep body with the marker reaches the upstream byte for byte,
    where the RecursionError used to end the request in an internal error."""
    body = (b'{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":['
            + FOREIGN + b']}],"x":' + deep() + b'}')
    h = Harness([api("a")])
    out = RecordingSink()
    h.forward(request_of(body), out)
    assert h.fake.requests[-1].body == body and out.status is not None


# with_model -------------------------------------------------------------------------------------

def renaming_harness():
    h = Harness([api("a")])
    mapping = SimpleNamespace(from_model="old-model", to_model="claude-sonnet-4-5", provider="anthropic")
    old = h.dispatcher
    h.dispatcher = Dispatcher(clock=h.clock, upstream=old.upstream, pool=h.pool, store=h.store,
                              accounts=lambda: h.accounts, settings=old.settings,
                              observability=old.obs, router=Router([mapping]))
    return h


def test_a_renamed_body_keeps_a_lone_surrogate():
    """A model rename on a body with a lone surrogate escape renames it and keeps the surrogate
    (as its escape); it used to raise UnicodeEncodeError (an internal error)."""
    body = b'{"model":"old","model":"old-model","messages":[{"role":"user","content":"x\\udc00"}]}'
    out = dispatch.with_model(request_of(body, model="old-model"), "new-model")
    assert out.model == "new-model"
    assert json.loads(out.body) == {"model": "new-model", "messages": [{"role": "user", "content": "x\udc00"}]}


@pytest.mark.parametrize("body", [
    b'{"model":"old-model","x":' + deep() + b'}',          # Python's json cannot nest into it
    b'{"model":"old-model","x":1' + b"0" * 5000 + b'}',        # beyond Python's int digits limit
])
def test_a_body_that_cannot_be_renamed_is_a_400(no_socket, body):  # noqa: F811
    """A rename the config asks for, on a body the reader took but Python's json cannot parse, is
    a typed 400 and nothing goes upstream; it used to raise RecursionError/ValueError out of the
    dispatcher (an internal error)."""
    with pytest.raises(ProxyError) as caught:
        dispatch.with_model(request_of(body, model="old-model"), "claude-sonnet-4-5")
    assert caught.value.status == 400
    h = renaming_harness()
    out = RecordingSink()
    h.forward(request_of(body, model="old-model"), out)
    assert out.status == 400 and not h.fake.requests


def test_the_reader_and_the_rename_agree_on_duplicate_models():
    """With two "model" keys the reader gives the last, as json does, and a rename leaves one."""
    body = b'{"model":"a","stream":true,"model":"old-model"}'
    assert jsoncodec.object_reader("model", "stream")(body) == ("old-model", True)
    out = dispatch.with_model(request_of(body, model="old-model"), "claude-sonnet-4-5")
    assert out.body == b'{"model":"claude-sonnet-4-5","stream":true}'


# session_of_request -----------------------------------------------------------------------------

@pytest.mark.parametrize("headers, expected", [
    ([(b"x-claude-code-session-id", b"")], None),
    ([(b"x-claude-code-session-id", b"a" * 100_000)], None),
    ([(b"x-claude-code-session-id", "s\u00e9ance".encode())], None),
    ([(b"x-claude-code-session-id", b" abc ")], "abc"),
    ([(b"X-Claude-Code-Session-Id", b"first"), (b"x-claude-code-session-id", b"second")], "first"),
    ([(b"x-claude-code-session-id", b"a\r\nb")], None),
])
def test_hostile_session_headers(headers, expected):
    """An empty, huge, non-ASCII or line-breaking header gives no session (it never reaches a
    store key or a log line); the first of repeated headers decides."""
    body = json.dumps({"model": "m", "metadata": {"user_id": LEGACY_USER_ID}}).encode()
    assert dispatch.session_of_request(request_of(body, headers=headers)) == expected


def test_a_user_id_in_message_text_does_not_set_the_session():
    """A "metadata"/"user_id" pair written in a message's text (escaped in the body) is not the
    request's metadata: the real metadata at the end decides."""
    fake = json.dumps({"metadata": {"user_id": "user_x_account__session_EVIL"}})
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": fake}],
                       "metadata": {"user_id": LEGACY_USER_ID}}).encode()
    assert dispatch.session_of_request(request_of(body)) == SID
    no_metadata = json.dumps({"model": "m", "messages": [{"role": "user", "content": fake}]}).encode()
    assert dispatch.session_of_request(request_of(no_metadata)) is None


def test_a_json_user_id_with_two_session_ids_takes_the_last():
    """A JSON user_id with the session_id key twice gives the last, as json reads it."""
    user_id = '{"session_id":"first","session_id":"' + SID + '"}'
    body = json.dumps({"model": "m", "metadata": {"user_id": user_id}}).encode()
    assert dispatch.session_of_request(request_of(body)) == SID
    assert dispatch.session_of_request(attr.evolve(request_of(body), body=b"")) is None
