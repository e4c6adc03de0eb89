"""The one-pass request head (clproxy.http.head) against twisted's own line-by-line parser.

Each case's bytes go into two ProxyChannels over a StringTransport, one with the fast path and one
with it forced off (twisted's parsing), and everything observable must be the same: the bytes
written back, whether the connection is closing, every request (method, target, version, raw
headers in order, body, the too-large flag), an exception if one escaped, the timeout left, and the
channel's parsing state. The fast path must also really be taken for the heads it is meant for (and
not for the others): each case says how many heads it expects in one pass.
"""

import importlib.util
import inspect
import linecache
import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from clproxy import mirrored
from clproxy.http import head
from clproxy.http.site import ProxyChannel, ProxySite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H = b"Host: example.com\r\n"


def get(path=b"/", version=b"HTTP/1.1", headers=H, end=b"\r\n"):
    return b"GET " + path + b" " + version + b"\r\n" + headers + end


def post(body=b"hello", headers=b"", version=b"HTTP/1.1"):
    return (b"POST /v1/messages " + version + b"\r\n" + H + headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunked(body_chunks=(b"hel", b"lo"), te=b"chunked", headers=b""):
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in body_chunks) + b"0\r\n\r\n"
    return b"POST /up HTTP/1.1\r\n" + H + headers + b"Transfer-Encoding: " + te + b"\r\n\r\n" + framed


def many(n, size=10):
    return b"".join(b"X-H%d: %s\r\n" % (i, b"v" * size) for i in range(n))


#: a head like Claude Code's (the client this daemon serves)
CLAUDE = (b"POST /v1/messages?beta=true HTTP/1.1\r\n"
          b"host: 127.0.0.1:8082\r\n"
          b"accept: application/json\r\n"
          b"anthropic-beta: claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14\r\n"
          b"anthropic-dangerous-direct-browser-access: true\r\n"
          b"anthropic-version: 2023-06-01\r\n"
          b"authorization: Bearer sk-ant-oat01-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
          b"content-type: application/json\r\n"
          b"user-agent: claude-cli/1.0.83 (external, cli)\r\n"
          b"x-app: cli\r\n"
          b"x-stainless-arch: x64\r\n"
          b"x-stainless-lang: js\r\n"
          b"x-stainless-os: Linux\r\n"
          b"x-stainless-package-version: 0.55.1\r\n"
          b"x-stainless-retry-count: 0\r\n"
          b"x-stainless-runtime: node\r\n"
          b"x-stainless-runtime-version: v22.17.0\r\n"
          b"x-stainless-timeout: 600\r\n"
          b"accept-encoding: gzip, deflate, br\r\n"
          b"connection: keep-alive\r\n"
          b"content-length: 27\r\n\r\n"
          b'{"model":"m","stream":true}')

#: twisted's limits: each line, the sum of the line lengths, the header count
MAX_LINE = ProxyChannel.MAX_LENGTH
MAX_SIZE = ProxyChannel.totalHeadersSize
MAX_HEADERS = ProxyChannel.maxHeaders


def sized_head(total):
    """A GET head whose lines (without CRLF) add up to exactly ``total`` bytes."""
    first = b"GET / HTTP/1.1"
    filler = total - len(first) - len(b"X-Pad: ")
    return first + b"\r\nX-Pad: " + b"p" * filler + b"\r\n\r\n"


#: (name, bytes, heads expected in one pass when all the bytes come in one read)
CASES = [
    # ordinary requests
    ("get", get(), 1),
    ("get no headers", b"GET / HTTP/1.1\r\n\r\n", 1),
    ("post with body", post(), 1),
    ("post empty body", post(b""), 1),
    ("post body later bytes", post(b"x" * 5000), 1),
    ("chunked", chunked(), 1),
    ("chunked upper case", chunked(te=b"Chunked"), 1),
    ("chunked with extension and trailer",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", 1),
    ("claude code", CLAUDE, 1),
    ("http/1.0", get(version=b"HTTP/1.0"), 1),
    ("http/1.0 keep-alive", get(version=b"HTTP/1.0", headers=H + b"Connection: keep-alive\r\n"), 1),
    ("1.1 connection close", get(headers=H + b"Connection: close\r\n"), 1),
    ("1.1 connection Close with others", get(headers=H + b"Connection: Upgrade Close\r\n"), 1),
    ("1.1 connection close, second request ignored", get(headers=H + b"Connection: close\r\n") + get(), 1),
    ("1.0 then another", get(version=b"HTTP/1.0") + get(), 1),
    ("expect 100-continue", post(headers=b"Expect: 100-continue\r\n"), 1),
    ("expect 100-continue upper", post(headers=b"Expect: 100-CONTINUE\r\n"), 1),
    ("expect 100-continue on 1.0", post(headers=b"Expect: 100-continue\r\n", version=b"HTTP/1.0"), 1),
    ("expect something else", post(headers=b"Expect: 200-ok\r\n"), 1),
    ("absolute-form target", get(path=b"http://example.com/a?b=c"), 1),
    ("asterisk target", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 1),
    ("weird method", b"M-SEARCH / HTTP/1.1\r\n" + H + b"\r\n", 1),
    ("token method", b"FOO!#$%&'*+-.^_`|~ / HTTP/1.1\r\n" + H + b"\r\n", 1),
    ("lower case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 1),
    ("missing host on 1.1", b"GET / HTTP/1.1\r\n\r\n", 1),
    ("header name cases", get(headers=b"HOST: a\r\nx-lower: 1\r\nX-UPPER: 2\r\nX-mIxEd-CaSe: 3\r\nte: x\r\n"
                                       b"Www-authenticate: y\r\ndnt: 1\r\ncontent-md5: z\r\n"), 1),
    ("duplicate headers keep order", get(headers=b"X-A: 1\r\nX-B: 2\r\nx-a: 3\r\nX-A: 4\r\nX-B: 5\r\n"), 1),
    ("two hosts", get(headers=b"Host: a\r\nHost: b\r\n"), 1),
    ("empty values", get(headers=b"X-Empty:\r\nX-Spaces:   \r\nX-Tab:\t\r\n"), 1),
    ("values with whitespace", get(headers=b"X-A:  \t a b \t c \t \r\nX-B:no-space\r\n"), 1),
    ("colon in value", get(headers=b"X-A: a:b::c\r\nX-B: http://x/\r\n"), 1),
    ("non-ascii value", get(headers=b"X-A: caf\xc3\xa9 \xff\xfe\x7f\x01\x1b\r\n"), 1),
    ("cookie", get(headers=H + b"Cookie: a=1; b=2\r\n"), 1),
    ("identity coding with length", post(headers=b"Transfer-Encoding: identity\r\n"), 1),
    ("identity coding alone", b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\nbody", 1),
    ("identity coding with chunked", chunked(headers=b"Transfer-Encoding: identity\r\n"), 1),
    ("content-length zero", post(b""), 1),
    ("content-length spaces", b"POST / HTTP/1.1\r\nContent-Length:  3 \t\r\n\r\nabc", 1),
    ("content-length leading zeros", b"POST / HTTP/1.1\r\nContent-Length: 0003\r\n\r\nabc", 1),
    ("content-length shorter than the bytes", b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nabcGET", 1),
    ("content-length larger than the bytes", b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\nabc", 1),
    ("body over the site's limit (413)", b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000, 1),
    ("content-length 18 digits", b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 18 + b"\r\n\r\nab", 1),
    ("exactly the header count", get(headers=many(MAX_HEADERS)), 1),
    ("exactly the total size", sized_head(MAX_SIZE), 1),
    ("pipelined gets", get(path=b"/a") + get(path=b"/b") + get(path=b"/c"), 3),
    ("pipelined post then get", post() + get(), 2),
    ("pipelined chunked then get", chunked() + get(), 2),
    ("2,000 pipelined posts", post(b"x") * 2000, 2000),
    ("pipelined, second incomplete", get() + b"GET /b HTTP/1.1\r\nHo", 1),
    ("post then IE's extra CRLF then get", post() + b"\r\n" + get(), 1),
    ("trailing garbage after a request", get() + b"\x00\x01garbage", 1),

    # refused (or left to twisted) heads
    ("empty", b"", 0),
    ("blank line only", b"\r\n\r\n", 0),
    ("leading CRLF", b"\r\n" + get(), 0),
    ("two leading CRLFs", b"\r\n\r\n" + get(), 0),
    ("incomplete head", b"GET / HTTP/1.1\r\nHost: a\r\n", 0),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: a\n\n", 0),
    ("bare LF then CRLFs", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 0),
    ("bare LF in value", get(headers=b"X-A: a\nb\r\n"), 0),
    ("bare CR in value", get(headers=b"X-A: a\rb\r\n"), 0),
    ("NUL in value", get(headers=b"X-A: a\x00b\r\n"), 0),
    ("bare LF in request line", b"GET /\n HTTP/1.1\r\n\r\n", 0),
    ("obs-fold space", get(headers=b"X-A: a\r\n b\r\n"), 0),
    ("obs-fold tab", get(headers=b"X-A: a\r\n\tb\r\nX-B: c\r\n"), 0),
    ("obs-fold first header", b"GET / HTTP/1.1\r\n continued: x\r\n\r\n", 0),
    ("no colon", get(headers=b"X-A b\r\n"), 0),
    ("empty name", get(headers=b": value\r\n"), 0),
    ("space before colon", get(headers=b"Host : a\r\n"), 0),
    ("space in name", get(headers=b"X A: b\r\n"), 0),
    ("tab in name", get(headers=b"X\tA: b\r\n"), 0),
    ("control char in name", get(headers=b"X\x01A: b\r\n"), 0),
    ("NUL in name", get(headers=b"X\x00A: b\r\n"), 0),
    ("non-token char in name", get(headers=b"X(A): b\r\n"), 0),
    ("non-ascii name", get(headers=b"X-\xc3\xa9: b\r\n"), 0),
    ("content-length not digits", b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 0),
    ("content-length negative", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 0),
    ("content-length plus", b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 0),
    ("content-length list", b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", 0),
    ("content-length unicode digit", b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa3\r\n\r\nabc", 0),
    ("content-length empty", b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 0),
    ("duplicate content-length same", b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 0),
    ("duplicate content-length differ", b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\nabcd", 0),
    ("content-length 19 digits (left to twisted)",
     b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\nab", 0),
    ("content-length and chunked (smuggling)", b"POST / HTTP/1.1\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", 0),
    ("chunked and content-length (smuggling)", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n0\r\n\r\n", 0),
    ("chunked twice", chunked(headers=b"Transfer-Encoding: chunked\r\n"), 0),
    ("transfer-encoding gzip", chunked(te=b"gzip"), 0),
    ("transfer-encoding list", chunked(te=b"gzip, chunked"), 0),
    ("transfer-encoding empty", chunked(te=b""), 0),
    ("malformed chunked body", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 1),
    ("version 2.0", get(version=b"HTTP/2.0"), 0),
    ("version 1.2", get(version=b"HTTP/1.2"), 0),
    ("version lower case", get(version=b"http/1.1"), 0),
    ("version missing", b"GET /\r\n" + H + b"\r\n", 0),
    ("extra space in request line", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 0),
    ("trailing space in request line", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 0),
    ("tab in request line", b"GET\t/\tHTTP/1.1\r\n" + H + b"\r\n", 0),
    ("target with DEL and high byte", get(path=b"/\x7f\xff"), 0),
    ("target with control char", get(path=b"/a\x01"), 0),
    ("method not a token", b"GE(T / HTTP/1.1\r\n" + H + b"\r\n", 0),
    ("method empty", b" / HTTP/1.1\r\n" + H + b"\r\n", 0),
    ("request line too long", get(path=b"/" + b"a" * MAX_LINE), 0),
    ("header line too long", get(headers=b"X-A: " + b"a" * MAX_LINE + b"\r\n"), 0),
    ("header line at the line limit", get(headers=b"X-A: " + b"a" * (MAX_LINE - 5) + b"\r\n"), 0),
    ("too many headers", get(headers=many(MAX_HEADERS + 1)), 0),
    ("total size one over", sized_head(MAX_SIZE + 1), 0),
    ("huge total", get(headers=many(200, 200)), 0),
    ("no head end in a long buffer", b"GET / HTTP/1.1\r\n" + b"a" * (MAX_LINE + 10), 0),
    ("pipelined, second refused", get() + get(headers=b"Bad Name: x\r\n"), 1),
    ("pipelined, second folded", get() + get(headers=b"X-A: a\r\n b\r\n"), 1),
]

#: cases also split in two at every byte position
SPLIT_CASES = ("claude code", "pipelined post then get", "chunked", "expect 100-continue",
               "duplicate content-length same", "obs-fold space", "pipelined, second refused")


class Echo(resource.Resource):
    """Answers every request with what it received, at once or when the test says (``later``)."""

    isLeaf = True

    def __init__(self, later: bool):
        super().__init__()
        self.later = later
        self.pending = []

    def render(self, request):
        request.content.seek(0)
        answer = b"%s %s %s %d\n%r\n" % (request.method, request.uri, request.clientproto,
                                          request.too_large, request.content.read())
        if not self.later:
            return answer
        self.pending.append((request, answer))
        return server.NOT_DONE_YET


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """The Date header of both runs is the same."""
    monkeypatch.setattr(server, "datetimeToString", lambda *a: b"Thu, 01 Jan 1970 00:00:00 GMT")


def run(chunks, fast: bool, later: bool = False):
    """Everything observable after feeding ``chunks`` to a ProxyChannel, and the heads it took in one pass."""
    echo = Echo(later)
    site = ProxySite(echo, max_body_bytes=1000)
    clock = task.Clock()
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    channel.fast_head = fast
    seen = []
    original = channel.requestFactory

    def factory(*args):
        request = original(*args)
        seen.append(request)
        return request

    channel.requestFactory = factory
    transport = StringTransport()
    channel.makeConnection(transport)
    errors = []
    for chunk in chunks:
        try:
            channel.dataReceived(chunk)
        except Exception as e:  # an escaping exception is part of the behaviour compared
            errors.append(repr(e))
    while echo.pending:
        request, answer = echo.pending.pop(0)
        if not request.finished and not request._disconnected:
            request.write(answer)
            try:
                request.finish()
            except Exception as e:
                errors.append(repr(e))
    requests = [(r.method, r.uri, r.clientproto, list(r.requestHeaders.getAllRawHeaders()),
                 r.content.getvalue() if r.content is not None else None, r.too_large) for r in seen]
    state = (channel.line_mode, channel.persistent, channel._buffer, channel._dataBuffer, channel.length,
             channel._receivedHeaderCount, channel._receivedHeaderSize, channel._handlingRequest,
             [d.getTime() for d in clock.getDelayedCalls()])
    return (transport.value(), transport.disconnecting, requests, errors, state), channel.heads_in_one_pass


def same(chunks, later=False):
    """Runs ``chunks`` both ways, asserts the same outcome, returns the heads parsed in one pass."""
    fast, taken = run(chunks, True, later)
    slow, not_taken = run(chunks, False, later)
    assert fast == slow
    assert not_taken == 0
    return taken


def test_the_guard_accepts_this_twisted():
    """The fast path is on for the twisted these tests run on (else they would prove nothing)."""
    assert head.ENABLED and ProxyChannel.fast_head


@pytest.mark.parametrize("later", [False, True], ids=["answered at once", "answered later"])
@pytest.mark.parametrize("name, data, expected", CASES, ids=[c[0] for c in CASES])
def test_same_as_twisted(name, data, expected, later):
    """Whole in one read: the same outcome both ways, and the fast path taken as the case expects."""
    taken = same([data], later)
    if later:  # a pipelined request waits for the previous answer, then comes from the buffer
        assert (taken > 0) == (expected > 0)
    else:
        assert taken == expected


@pytest.mark.parametrize("later", [False, True], ids=["answered at once", "answered later"])
@pytest.mark.parametrize("name", SPLIT_CASES)
def test_split_at_every_byte(name, later):
    """In two reads split anywhere (head incomplete in the first: twisted's way, the same outcome)."""
    data = dict((c[0], c[1]) for c in CASES)[name]
    for cut in range(1, len(data)):
        same([data[:cut], data[cut:]], later)


def test_byte_by_byte():
    """One byte per read: never the fast path, the same outcome."""
    data = CLAUDE + get()
    assert same([data[i:i + 1] for i in range(len(data))]) == 0


def test_head_then_body_in_later_reads():
    """The head in one read, the body in several: the body goes through twisted's decoder."""
    data = chunked((b"a" * 10, b"b" * 3000))
    end = data.index(b"\r\n\r\n") + 4
    assert same([data[:end], data[end:end + 7], data[end + 7:]]) == 1


def test_the_fast_path_is_taken():
    """An ordinary head, and each of three pipelined ones, go through the one-pass parser; none
    does when it is off."""
    assert run([CLAUDE], True)[1] == 1
    assert run([get() + post() + get()], True)[1] == 3
    assert run([CLAUDE], False)[1] == 0


def test_a_changed_twisted_turns_it_off(monkeypatch):
    """Another source for any mirrored function gives another digest, which is not a known one."""
    assert head.fingerprint() in head.KNOWN_FINGERPRINTS
    holder, name = head.MIRRORED[3]
    changed = {getattr(holder, name): b"# changed\n"}
    real = mirrored.source_of
    monkeypatch.setattr(mirrored, "source_of", lambda f: changed.get(f) or real(f))
    assert head.fingerprint() not in head.KNOWN_FINGERPRINTS
    monkeypatch.setattr(mirrored, "source_of", lambda f: (_ for _ in ()).throw(OSError("no source")))
    assert head.fingerprint() == ""
    monkeypatch.undo()
    assert head.fingerprint(head.MIRRORED + ((head.http, "_not_in_this_twisted"),)) == ""


def test_the_source_read_is_the_whole_function_as_inspect_reads_it(tmp_path):
    """source_of gives what inspect.getsource gives, for every mirrored twisted function and for
    a decorated function with a signature over several lines, a nested closure and a last
    statement over several lines; a change at its very end changes it."""
    for holder, name in head.MIRRORED:
        function = getattr(holder, name)
        assert mirrored.source_of(function) == inspect.getsource(function).encode("utf-8")
    text = (
        "import functools\n\n\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    @functools.lru_cache(maxsize=None)\n"
        "    def parse(\n"
        "        line,\n"
        "    ):\n"
        "        # a comment\n\n"
        "        def inner(x):\n"
        "            return x.split(\n"
        "                b' ')\n"
        "        return inner(line) + [\n"
        "            b'END'\n"
        "        ]\n"
        "    # a trailing comment\n\n"
        "    def other(self):\n"
        "        return 1\n")
    before = _load_function(tmp_path, "before_mod", text)
    assert mirrored.source_of(before) == inspect.getsource(before).encode("utf-8")
    assert mirrored.source_of(before).endswith(b"        ]\n")
    after = _load_function(tmp_path, "after_mod", text.replace("b'END'", "b'END2'"))
    assert mirrored.source_of(after) != mirrored.source_of(before)


def _load_function(directory, module_name, text):
    """Holder.parse from a module of ``text`` written to ``directory`` and imported from there."""
    path = directory / f"{module_name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Holder.parse.__wrapped__


def test_reading_the_source_keeps_no_lines_cached():
    """The digest reads twisted's files without filling linecache (idle memory)."""
    linecache.clearcache()
    assert head.fingerprint() in head.KNOWN_FINGERPRINTS
    assert not [name for name in linecache.cache if "twisted" in name]


def test_a_patched_twisted_at_import_leaves_twisted_parsing():
    """End to end: a twisted whose headerReceived is another function at import time gets a
    ProxyChannel that never takes the fast path (a fresh interpreter, as the daemon starts)."""
    code = ("from twisted.web import http\n"
            "original = http.HTTPChannel.headerReceived\n"
            "def headerReceived(self, line):\n"
            "    return original(self, line)\n"
            "http.HTTPChannel.headerReceived = headerReceived\n"
            "from clproxy.http import head, site\n"
            "print(head.ENABLED, site.ProxyChannel.fast_head)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_a_subclass_with_its_own_header_handling_is_left_to_twisted():
    """A channel overriding a method the fast path does the work of must get it called."""

    class Own(ProxyChannel):
        def headerReceived(self, line):
            return super().headerReceived(line)

    class Plain(ProxyChannel):
        pass

    assert not Own.fast_head and Plain.fast_head


class Collect(protocol.Protocol):
    """Sends its bytes, then keeps what comes back until the server closes (or a deadline)."""

    def __init__(self, data: bytes):
        self.data = data
        self.received = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)
        self.deadline = reactor.callLater(5, self.transport.abortConnection)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason=protocol.connectionDone):
        closed_by_server = self.deadline.active()
        if closed_by_server:
            self.deadline.cancel()
        self.done.callback((b"".join(self.received), closed_by_server))


async def over_loopback(data: bytes, fast: bool):
    """What a client gets back over a real TCP connection to a ProxySite, and whether it was closed."""
    site = ProxySite(Echo(False), max_body_bytes=1000)
    site.protocol = type("Channel", (ProxyChannel,), {"fast_head": fast})
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        client = Collect(data)
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        return await client.done
    finally:
        await port.stopListening()


LOOPBACK = [
    CLAUDE + get(path=b"/b") + post() + get(headers=H + b"Connection: close\r\n"),
    chunked() + get(version=b"HTTP/1.0"),
    post(headers=b"Expect: 100-continue\r\nConnection: close\r\n"),
    get() + get(headers=b"Bad Name: x\r\n") + get(),
    get(headers=b"X-A: a\r\n b\r\nConnection: close\r\n"),
]


@pytest.mark.parametrize("data", LOOPBACK, ids=range(len(LOOPBACK)))
@pytest_twisted.ensureDeferred
async def test_same_over_loopback(data):
    """Over a real connection: the same answers, and the server closing the same way."""
    fast = await over_loopback(data, True)
    assert fast == await over_loopback(data, False)
    assert fast[1]  # each case ends with the server closing


def test_a_body_in_one_read_is_the_content_as_it_came():
    """The body's read becomes the request's content without a copy (20 KB a request); a body in
    several reads is joined whole; one over the limit leaves nothing and the too-large flag."""
    site = ProxySite(Echo(False), max_body_bytes=1000)
    chunks_seen = []
    bodies, flags = [], []

    class Watched(site.requestFactory):
        def handleContentChunk(self, data):
            chunks_seen.append(data)
            super().handleContentChunk(data)

        def process(self):
            bodies.append(self.content.getvalue())  # before twisted lets go of it
            flags.append(self.too_large)
            super().process()

    site.requestFactory = Watched
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(post(b"x" * 700))
    assert len(chunks_seen) == 1 and bodies[0] is chunks_seen[0]
    whole = post(b"a" * 300 + b"b" * 300)
    for piece in (whole[:-400], whole[-400:-300], whole[-300:]):
        channel.dataReceived(piece)
    assert bodies[1] == b"a" * 300 + b"b" * 300 and not flags[1]
    head_only = b"POST /v1/messages HTTP/1.1\r\n" + H + b"Content-Length: 1200\r\n\r\n"
    channel.dataReceived(head_only + b"d" * 600)
    channel.dataReceived(b"d" * 600)
    assert flags[2] is True and bodies[2] == b""
