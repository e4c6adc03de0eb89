"""End to end: secrets planted in every input never appear in any written file or exported OTLP payload."""

import gzip
import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.web import resource, server

from clproxy.observe.recorder import Observability
from clproxy.routing.policy import Verdict

# One distinctive marker per secret: what is grepped for. Each is embedded in its real shape.
ANTHROPIC_KEY = "sk-ant-api03-MARKERanthropicKEY0123456789abcdef"
OAUTH_ACCESS = "sk-ant-oat01-MARKERoauthACCESS0123456789abcdef"
OAUTH_REFRESH = "sk-ant-ort01-MARKERoauthREFRESH0123456789abcdef"
OPENAI_KEY = "sk-proj-MARKERopenaiKEY0123456789abcdefXYZ"
OPENAI_CLASSIC = "sk-MARKERopenaiCLASSIC0123456789abcdefghijklmnopq"
GOOGLE_KEY = "AIzaSyMARKERgoogleKEY0123456789abcdefgh"
BEARER = "MARKERbearerJWT.eyJzdWIiOiIxIn0.c2ln"
COOKIE = "MARKERcookieVALUE42"
PLAIN = {  # values under sensitive JSON keys that have no key shape at all
    "api_key": "MARKERplainApiKey",
    "access_token": "MARKERplainAccess",
    "refresh_token": "MARKERplainRefresh",
    "client_secret": "MARKERplainClientSecret",
    "authorization": "MARKERplainAuthorization",
}
SPLIT = "MARKERsplitACROSSevents"  # a tool input secret split across two input_json_delta events
SHAPED = [ANTHROPIC_KEY, OAUTH_ACCESS, OAUTH_REFRESH, OPENAI_KEY, OPENAI_CLASSIC, GOOGLE_KEY]
MARKERS = [s[s.index("MARKER"):] for s in SHAPED] + [BEARER, COOKIE, SPLIT] + list(PLAIN.values())

CLIENT_HEADERS = [
    (b"Authorization", b"Bearer " + BEARER.encode()),
    (b"X-Api-Key", ANTHROPIC_KEY.encode()),
    (b"Cookie", b"session=" + COOKIE.encode()),
    (b"X-Goog-Api-Key", GOOGLE_KEY.encode()),
    (b"X-Note", f"forwarded for {OPENAI_KEY}".encode()),
    (b"X-Clproxy-Session-Id", OPENAI_CLASSIC.encode()),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]
REQUEST_BODY = json.dumps({
    "model": "claude-sonnet-4-5",
    "metadata": {"user_id": "u1", "nested": [{"refresh_token": PLAIN["refresh_token"]},
                                             {"client_secret": PLAIN["client_secret"]}]},
    "api_key": PLAIN["api_key"],
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": f"keys: {ANTHROPIC_KEY} {OAUTH_ACCESS} {OPENAI_KEY} {GOOGLE_KEY} "
                                 f"and Authorization: Bearer {BEARER}"},
        {"type": "tool_result", "tool_use_id": "t1",
         "content": json.dumps({"access_token": PLAIN["access_token"], "refresh": OAUTH_REFRESH})}]}],
    "tools": [{"name": "login", "input_schema": {"authorization": PLAIN["authorization"]}}],
}).encode()


def sse(*events) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(data).encode())
                    for name, data in events)


HALF = len('{"access_token": "') + 8
TOOL_JSON = json.dumps({"access_token": SPLIT})
STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "usage": {"input_tokens": 5, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": f"echo {OAUTH_ACCESS} and {GOOGLE_KEY}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "tool_use", "id": "t2", "name": "login", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": TOOL_JSON[:HALF]}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": TOOL_JSON[HALF:]}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
    ("message_stop", {"type": "message_stop"}),
)
ERROR_BODY = json.dumps({"type": "error", "error": {"type": "authentication_error",
                                                   "message": f"invalid x-api-key {ANTHROPIC_KEY}"}}).encode()


class Collector(resource.Resource):
    """Keeps every raw OTLP payload."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.raw = []

    def render_POST(self, request):
        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"") == b"gzip":
            body = gzip.decompress(body)
        self.raw.append(body)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""


def everything_written(folder) -> dict:
    """{path: bytes} of every file under ``folder``, gzip files decompressed."""
    contents = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            contents[path] = gzip.decompress(data) if name.endswith(".gz") else data
    return contents


def joined_deltas(raw: bytes) -> bytes:
    """The text and tool-input deltas of an SSE stream joined per block: what a split secret becomes."""
    blocks = {}
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            data = json.loads(line[6:])
            delta = data.get("delta") or {}
            piece = delta.get("text") or delta.get("partial_json") or ""
            blocks[data.get("index")] = blocks.get(data.get("index"), "") + piece
    return "\n".join(blocks.values()).encode()


def test_the_stream_really_splits_the_secret():
    """Guard for the test data: no single event of the stream holds the split secret whole."""
    assert SPLIT.encode() not in STREAM
    assert SPLIT[:8].encode() in STREAM and SPLIT[8:].encode() in STREAM


@pytest_twisted.ensureDeferred
async def test_no_planted_secret_reaches_a_file_or_the_collector(tmp_path):
    """Every secret form in headers, bodies, SSE, errors and details is absent from all outputs."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra")
    receiver = Collector()
    port = reactor.listenTCP(0, server.Site(receiver), interface="127.0.0.1")
    clock = task.Clock()
    clock.advance(1_767_268_800.0)
    logs = tmp_path / "logs"
    obs = Observability(clock=clock, logs_dir=str(logs), debug_bodies=True,
                        otlp_endpoint=f"http://127.0.0.1:{port.getHost().port}", environ={})
    try:
        record = obs.begin(request_id="req_secret", method=b"POST", path=b"/v1/messages",
                           model="claude-sonnet-4-5", stream=True, headers=CLIENT_HEADERS, body=REQUEST_BODY)
        record.outbound_headers()
        record.attempt(account_name="work", provider="anthropic", model="claude-sonnet-4-5", status=401,
                       verdict=Verdict("cool-and-next", 401, "auth", 300.0, 0,
                                       f"authentication_error: invalid x-api-key {ANTHROPIC_KEY}"),
                       duration=0.1)
        record.response_body(401, [(b"www-authenticate", [b"Bearer " + BEARER.encode()]),
                                   (b"set-cookie", [COOKIE.encode()])], ERROR_BODY, streamed=False)
        record.refresh("home", ok=True)
        record.outbound_headers()
        record.attempt(account_name="home", provider="anthropic", model="claude-sonnet-4-5", status=200,
                       verdict=Verdict("success", 200, "ok", None, 0), duration=0.2)
        write = record.tee(lambda data: None, status=200,
                           headers=[(b"content-type", [b"text/event-stream"]),
                                    (b"x-debug", [f"token {OAUTH_REFRESH}".encode()])])
        for start in range(0, len(STREAM), 64):
            write(STREAM[start:start + 64])
        record.finish(status=200, account_name="home", provider="anthropic",
                      error=f"upstream said: Bearer {BEARER} / {OPENAI_CLASSIC}")
        await threads.deferToThread(obs.flush)
        deadline = time.monotonic() + 10
        while len(receiver.raw) < 2:
            assert time.monotonic() < deadline
            await task.deferLater(reactor, 0.02, lambda: None)
    finally:
        if obs.otlp is not None:
            obs.otlp.stop(timeout=0)
        await port.stopListening()

    written = everything_written(logs)
    names = {os.path.relpath(p, logs) for p in written}
    assert {"proxy-2026-01-01.jsonl", "proxy-attempts-2026-01-01.jsonl", "proxy-debug-2026-01-01.jsonl",
            "bodies/2026-01-01/req_secret/request.json.gz", "bodies/2026-01-01/req_secret/response.json.gz",
            "bodies/2026-01-01/req_secret/response-2.json.gz"} <= names
    outputs = dict(written)
    for path, data in written.items():
        if path.endswith(".sse.gz"):
            outputs[path + " (deltas joined)"] = joined_deltas(data)
    for n, payload in enumerate(receiver.raw):
        outputs[f"otlp payload {n}"] = payload
    leaks = [(where, marker) for where, data in outputs.items() for marker in MARKERS
             if marker.encode() in data]
    assert leaks == []
    # the files are still useful: the redaction markers are there, and the reassembled tool input too
    response = json.loads(written[str(logs / "bodies/2026-01-01/req_secret/response-2.json.gz")])
    assert response["content"][1]["input"] == {"access_token": "[REDACTED]"}
    assert b"[REDACTED]" in written[str(logs / "proxy-2026-01-01.jsonl")]
