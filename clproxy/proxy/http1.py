"""A lean HTTP/1.1 client for upstream requests: one protocol per connection, kept alive per host.

twisted.web.client's Agent builds, per request, a Request, a body producer, a parser, a
response state machine, a transport proxy and a chain of Deferreds; profiles put it at a fifth of
the daemon's time. This client writes a request in one go, parses the response head in one pass
once it is complete, and hands the body straight to the caller's protocol. What it keeps of the
Agent: the same endpoints (TCP, TLS with ``optionsForClientTLS``), a ``Headers`` object for the
response's headers, ``deliverBody`` with ``ResponseDone`` / ``PotentialDataLoss`` / a failure at
the end, and twisted's chunked decoder (which ``ChunkedPassthrough`` may take over).
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union, cast

from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss, _ChunkedTransferDecoder
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from clproxy.sendnow import write_through

__all__ = ["BODY_DONE", "HTTP1Pool", "Response", "MalformedResponse"]

#: The longest response head read (status line and headers) before the answer is called malformed.
MAX_HEAD = 64 * 1024

_DEFAULT_PORTS = {b"http": 80, b"https": 443}

#: How every complete body ends (``connectionLost`` of the body's protocol): one Failure for all,
#: as twisted's own ``connectionDone``, not one made and inspected per response.
BODY_DONE = Failure(ResponseDone())


class MalformedResponse(Exception):
    """The upstream's answer is not HTTP/1.1 this client can read (the message says what, in words
    that never quote the answer: it could echo what the request carried)."""


class _Target:
    """What an endpoint factory reads of a URL (``scheme``, ``host``, ``port``), as twisted's URI."""

    __slots__ = ("scheme", "host", "port")

    def __init__(self, scheme: bytes, host: bytes, port: int):
        self.scheme = scheme
        self.host = host
        self.port = port


def split_url(url: bytes) -> Tuple[bytes, bytes, int, bytes, bytes]:
    """``(scheme, host, port, host header value, path with query)`` of an http(s) URL.

    A ``user:password@`` is dropped (it is never sent); an IPv6 host is given without brackets.
    """
    scheme, sep, rest = url.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError("not an http(s) URL")
    end = len(rest)
    for mark in (b"/", b"?", b"#"):
        at = rest.find(mark)
        if 0 <= at < end:
            end = at
    netloc = rest[:end].rpartition(b"@")[2]
    path = rest[end:].partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if netloc.startswith(b"["):
        host, _, after = netloc[1:].partition(b"]")
        port_text = after[1:] if after.startswith(b":") else b""
    else:
        host, _, port_text = netloc.partition(b":")
    if not host:
        raise ValueError("no host in the URL")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    shown = b"[" + host + b"]" if b":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        shown += b":%d" % port
    return scheme, host, port, shown, path


# split_url's answers by URL: an upstream request's URL is an account's base URL, the client's
# path and query, so the same few repeat on every request (2.4 us a split on a slow machine, one
# dict look-up when known). Bounded, as a client may vary its query string without end.
_split_urls: Dict[bytes, Tuple[bytes, bytes, int, bytes, bytes]] = {}
_MAX_URLS = 1_000


RequestHeaders = Union[Headers, Sequence[Tuple[bytes, bytes]]]


def pairs_to_headers(pairs: Sequence[Tuple[bytes, bytes]]) -> Headers:
    """twisted ``Headers`` holding ``pairs`` in order (text encoded, line breaks folded into
    spaces, as ``Headers`` does with any value)."""
    headers = Headers()
    add = headers.addRawHeader
    for name, value in pairs:
        add(name, value)
    return headers


def request_head(method: bytes, path: bytes, host: bytes, headers: RequestHeaders,
                 length: Optional[int]) -> bytes:
    """The request line and headers; ``Host`` unless the caller set one, ``Content-Length`` for a
    body (the caller's own framing headers are not sent: this client frames the body itself).

    ``headers`` is twisted ``Headers`` or ``(name, value)`` pairs, written in their order and
    case. Pairs that are not all bytes free of CR and LF go through ``Headers`` first, which
    encodes text and folds line breaks into spaces: no header can end the head early or add one.
    """
    if not isinstance(headers, Headers):
        head = _head_of_pairs(method, path, host, headers, length)
        if head is not None:
            return head
        headers = pairs_to_headers(headers)
    lines = [method, b" ", path, b" HTTP/1.1\r\n"]
    if not headers.hasHeader(b"host"):
        lines += (b"Host: ", host, b"\r\n")
    for name, values in headers.getAllRawHeaders():  # values are free of CR/LF (Headers sees to it)
        if name in _FRAMING:
            continue
        for value in values:
            lines += (name, b": ", value, b"\r\n")
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    lines.append(b"\r\n")
    return b"".join(lines)


_FRAMING = {b"Content-Length", b"Transfer-Encoding", b"Connection"}  # as getAllRawHeaders names them
_FRAMING_LOWER = frozenset(name.lower() for name in _FRAMING)


# Lower-cased header names already seen to be tokens (bounded, as _keys below: names repeat).
_token_names: Set[bytes] = set()


def _head_of_pairs(method: bytes, path: bytes, host: bytes, pairs: Sequence[Tuple[bytes, bytes]],
                   length: Optional[int]) -> Optional[bytes]:
    """:func:`request_head` of ``(name, value)`` pairs written as they are, or None when one of
    them is not bytes, has a name that is not a token or holds a CR or LF (the caller then goes
    through ``Headers``, which folds line breaks and refuses such a name)."""
    lines = [method, b" ", path, b" HTTP/1.1\r\n", b"Host: ", host, b"\r\n"]
    count = 2  # lines ended so far: the request line and Host
    url_host = True
    try:
        for name, value in pairs:
            lower = name.lower()
            if lower not in _token_names:
                if not _TOKEN.match(name):
                    return None
                if len(_token_names) < _MAX_KEYS:
                    _token_names.add(lower)
            if lower in _FRAMING_LOWER:
                continue
            if lower == b"host" and url_host:  # the caller's own Host replaces the URL's
                del lines[4:7]
                url_host = False
                count -= 1
            lines += (name, b": ", value, b"\r\n")
            count += 1
        if length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
            count += 1
        lines.append(b"\r\n")
        head = b"".join(lines)
    except TypeError:  # text, not bytes
        return None
    # one count of each over the whole head (C speed) in place of a check of every value: any CR
    # or LF beyond the line ends is in a name, a value, the method or the path
    count += 1
    if head.count(b"\n") != count or head.count(b"\r") != count:
        return None
    return head


_TOKEN_DIGITS = frozenset(b"0123456789")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# Header names as a Headers object keys them: lower case up to Twisted 22, canonical case
# (Content-Type) since. Learnt from Headers itself, once per name: names repeat from one answer
# to the next, so the dict lookup is all most headers cost (bounded: a server could send endless
# new names).
_keys: Dict[bytes, bytes] = {}
_MAX_KEYS = 10_000


def _key(name: bytes) -> Optional[bytes]:
    """The ``Headers`` key of a header name, or None when it is not a valid name (a token)."""
    key = _keys.get(name)
    if key is None:
        if not _TOKEN.match(name):
            return None
        sample = Headers()
        sample.addRawHeader(name, b"")
        key = next(iter(sample._rawHeaders))
        if len(_keys) < _MAX_KEYS:
            _keys[name] = key
    return key


_CONNECTION, _TRANSFER_ENCODING, _CONTENT_LENGTH = (
    cast(bytes, _key(b"connection")), cast(bytes, _key(b"transfer-encoding")), cast(bytes, _key(b"content-length")))


def parse_head(head: bytes) -> Tuple[int, bytes, bool, Headers]:
    """``(code, phrase, keep_alive, headers)`` of a response head without its blank line.

    Raises :class:`MalformedResponse`. Lines may end in LF alone; a folded line continues the
    header before it (both as twisted's parser reads them).
    """
    lines = head.split(b"\n")
    status = lines[0].rstrip(b"\r")
    version, _, rest = status.partition(b" ")
    code_text, _, phrase = rest.partition(b" ")
    # a code outside 100-599 is invalid (RFC 9110 15); below 100 it would pass for an interim answer
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code_text) != 3 \
            or not _TOKEN_DIGITS.issuperset(code_text) or not b"100" <= code_text < b"600":
        raise MalformedResponse("bad status line")
    if b"\x00" in head:  # invalid and dangerous (RFC 9110 5.5): it would be relayed to the client
        raise MalformedResponse("bad status line" if b"\x00" in status else "bad header line")
    raw: Dict[bytes, List[bytes]] = {}
    last: Optional[List[bytes]] = None
    for line in lines[1:]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if last is None:
                raise MalformedResponse("bad header line")
            last[-1] = last[-1] + b" " + line.strip(b" \t")
            continue
        name, sep, value = line.partition(b":")
        key = _keys.get(name) or _key(name) if sep else None
        if key is None:
            raise MalformedResponse("bad header line")
        last = raw.get(key)
        if last is None:
            last = raw[key] = []
        last.append(value.strip(b" \t"))
    headers = Headers()
    headers._rawHeaders = raw
    connection = b",".join(raw.get(_CONNECTION, ())).lower()
    keep_alive = b"close" not in connection if version == b"HTTP/1.1" else b"keep-alive" in connection
    if _TRANSFER_ENCODING in raw and (_CONTENT_LENGTH in raw or version == b"HTTP/1.0"):
        # framed two ways (a smuggling shape), or chunked where HTTP/1.0 has no such thing: read
        # as Transfer-Encoding says, but the connection's framing is not trusted again (RFC 9112 6)
        keep_alive = False
    return int(code_text), phrase, keep_alive, headers


def body_length(code: int, head_only: bool, headers: Headers):
    """How the body is framed: an int (Content-Length; 0 for none), ``"chunked"``, or
    ``UNKNOWN_LENGTH`` (read until the connection closes). Raises :class:`MalformedResponse`."""
    if head_only or code in (204, 304) or code < 200:
        return 0
    raw = headers._rawHeaders
    coding = raw.get(_TRANSFER_ENCODING)
    if coding:
        last = b",".join(coding).rsplit(b",", 1)[-1].strip().lower()
        return "chunked" if last == b"chunked" else UNKNOWN_LENGTH
    lengths = raw.get(_CONTENT_LENGTH)
    if not lengths:
        return UNKNOWN_LENGTH
    values = {v.strip() for value in lengths for v in value.split(b",")}
    if len(values) != 1:
        raise MalformedResponse("conflicting Content-Length headers")
    value = values.pop()
    if not value or not _TOKEN_DIGITS.issuperset(value) or len(value) > 18:
        raise MalformedResponse("bad Content-Length")
    return int(value)


@implementer(IPushProducer)
class Response:
    """An upstream's answer: ``code``, ``phrase``, ``headers`` (twisted ``Headers``), ``length``
    (bytes, or ``UNKNOWN_LENGTH``), and :meth:`deliverBody`.

    It is also the transport its body protocol gets (an ``IPushProducer``: pause, resume, stop
    the upstream connection) until the body ends; then it lets go of the connection, which may
    serve the next request, and of the protocol.
    """

    __slots__ = ("code", "phrase", "headers", "length", "_connection", "_bodyProtocol", "_held",
                 "_ended", "_paused")

    def __init__(self, code: int, phrase: bytes, headers: Headers, length, connection):
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection = connection
        # named as twisted's Response names it: ChunkedPassthrough.replacing checks it
        self._bodyProtocol: Any = None
        self._held: Optional[List[bytes]] = []  # body bytes that arrived before deliverBody
        self._ended: Optional[Failure] = None
        self._paused = False

    def deliverBody(self, protocol_) -> None:
        """Give the body to ``protocol_``: ``makeConnection`` (with this as its transport), the
        bytes as they arrive, then ``connectionLost`` with ``ResponseDone`` (complete),
        ``PotentialDataLoss`` (no length, the connection closed) or the failure that cut it."""
        held, self._held = self._held, None
        self._bodyProtocol = protocol_
        protocol_.makeConnection(self)
        if held:
            protocol_.dataReceived(held[0] if len(held) == 1 else b"".join(held))
        ended = self._ended
        if ended is not None:
            self._finish(ended)

    def _data(self, data: bytes) -> None:
        protocol_ = self._bodyProtocol
        if protocol_ is not None:
            protocol_.dataReceived(data)
        elif self._held is not None:
            self._held.append(data)

    def _end(self, reason: Failure) -> None:
        """The body ended: let go of the connection, and tell the protocol (now or when delivered)."""
        connection, self._connection = self._connection, None
        if self._paused and connection is not None:
            self._paused = False
            connection.transport.resumeProducing()  # it may serve the next request
        if self._bodyProtocol is None:
            self._ended = reason
        else:
            self._finish(reason)

    def _finish(self, reason: Failure) -> None:
        protocol_, self._bodyProtocol = self._bodyProtocol, None
        self._ended = None
        protocol_.connectionLost(reason)

    # -- IPushProducer: the upstream connection, while the body is being read ---------------
    def pauseProducing(self) -> None:
        if self._connection is not None and not self._paused:
            self._paused = True
            self._connection.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._connection is not None and self._paused:
            self._paused = False
            self._connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Close the upstream connection (the body's reader gave up)."""
        if self._connection is not None:
            self._connection.abort()

    def on_read_end(self, callback: Optional[Callable[[], None]]) -> bool:
        """Have ``callback`` called each time a read of the body has been delivered (all of the
        read's bytes, in as many ``dataReceived`` calls as its framing took), until the body
        ends or ``None`` replaces it. False when the body has already ended."""
        connection = self._connection
        if connection is None or connection.response is not self:
            return False
        connection.read_done = callback
        return True


class _Exchange:
    """One request from sending to its response head: what a connection needs to send it, what to
    answer, and whether it may be sent again (once, on a fresh connection)."""

    __slots__ = ("data", "head_only", "key", "deferred", "connection", "connecting", "retried")

    def __init__(self, data: List[bytes], head_only: bool, key):
        self.data: Optional[List[bytes]] = data
        self.head_only = head_only
        self.key = key
        self.deferred: Optional[defer.Deferred] = None
        self.connection: Optional["HTTP1Connection"] = None
        self.connecting: Optional[defer.Deferred] = None
        self.retried = False

    def answer(self, result) -> None:
        """Fire the caller's Deferred (once; a cancelled exchange has none left)."""
        d, self.deferred = self.deferred, None
        self.connection = self.connecting = None
        self.data = None
        if d is not None:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)

    def cancel(self, _d) -> None:
        """The caller cancelled (timeout, client gone): drop the connection being made or used."""
        self.deferred = None  # the Deferred errbacks with CancelledError by itself
        connecting, connection = self.connecting, self.connection
        self.connecting = self.connection = None
        if connecting is not None:
            connecting.cancel()
        if connection is not None:
            connection.abort()


def _no_delay(transport) -> None:
    """Turn Nagle's algorithm off: SSE events are small writes that must leave at once."""
    try:
        transport.setTcpNoDelay(True)
    except Exception:  # not a TCP transport (UNIX socket, TLS wrapper without it): nothing to do
        pass


def _skip_endpoint_wrapper(protocol_) -> None:
    """Let the connection under ``protocol_`` call it directly instead of through the endpoint's
    ``_WrappingProtocol`` (or, over TLS, call the TLS protocol directly).

    twisted's client endpoints put a ``_WrappingProtocol`` between the transport and the protocol
    so that connecting can fire a Deferred; once connected it only forwards ``dataReceived`` and
    ``connectionLost``: a Python call for every read of every upstream answer (per relayed SSE
    event ~450 of its ~30,000 instructions, callgrind). Anything else (a wrapper of another kind,
    a test's transport) is left as it is."""
    while True:
        transport: Any = getattr(protocol_, "transport", None)
        # TLS (twisted's TLSMemoryBIOProtocol, a ProtocolWrapper): the TCP connection under it
        # calls it, through the wrapper. (Checked first: a ProtocolWrapper forwards the attributes
        # it lacks to its own transport, ``protocol`` among them.)
        if getattr(transport, "wrappedProtocol", None) is protocol_:
            protocol_ = transport
            continue
        wrapper = getattr(transport, "protocol", None)
        if type(wrapper) is endpoints._WrappingProtocol and wrapper._wrappedProtocol is protocol_:
            transport.protocol = protocol_
        return


def _send_buffer(transport):
    """The TCP transport whose buffer holds what was written to ``transport`` and has not left
    yet (a TLS transport's is the TCP connection it writes to), or None (not twisted's TCP)."""
    transport = getattr(transport, "transport", None) or transport
    return transport if hasattr(transport, "_tempDataBuffer") and hasattr(transport, "dataBuffer") else None


class HTTP1Connection(protocol.Protocol):
    """One upstream connection: one request at a time, kept alive between them by its pool.

    ``state`` is ``IDLE``, ``HEAD`` (waiting for the response head), ``BODY`` or ``CLOSED``.
    ``response`` and ``bodyDecoder`` are named as twisted's parser names them because
    ``ChunkedPassthrough.replacing`` takes over the chunked decoder through them.
    """

    # Any, not Optional: set while they are used (by state), and not re-checked on the hot path
    transport: Any
    response: Any
    bodyDecoder: Any
    _exchange: Any
    _out: Any

    def __init__(self, pool: "HTTP1Pool", key):
        self._pool = pool
        self.key = key
        self.state = "IDLE"
        self.reused = False
        self.idle_since = 0.0
        self.response = None
        self.bodyDecoder = None
        self._exchange = None
        self._buffer = b""
        self._heard = False  # a byte of the current response arrived (no retry after that)
        self._left = 0  # Content-Length bytes still to read
        self._mode = None  # the body's framing: an int length, "chunked" or UNKNOWN_LENGTH
        self._keep_alive = False
        self._aborting = False  # dropped, its connectionLost yet to come: never pooled again
        self._out = None  # where written bytes wait to leave (see _body_done)
        self._on_close: List[defer.Deferred] = []
        #: called after each read of the body has been delivered (see Response.on_read_end)
        self.read_done: Optional[Callable[[], None]] = None

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        _skip_endpoint_wrapper(self)
        # the request leaves now, not on the next reactor turn (see clproxy.sendnow)
        self._write = write_through(self.transport)
        self._out = _send_buffer(self.transport)

    def send(self, exchange: _Exchange) -> None:
        """Write ``exchange``'s request (head and body in one write) and wait for its answer."""
        self.state = "HEAD"
        self._heard = False
        self._exchange = exchange
        exchange.connection = self
        self._write(b"".join(cast(List[bytes], exchange.data)))  # set until answered

    def closed(self) -> defer.Deferred:
        """Fires once the connection is closed."""
        d: defer.Deferred = defer.Deferred()
        if self.state == "CLOSED" and self.transport is None:
            d.callback(None)
        else:
            self._on_close.append(d)
        return d

    def abort(self) -> None:
        """Drop the connection now (a cancelled request, a reader that gave up, a broken answer)."""
        if self.state != "CLOSED" and self.transport is not None:
            self._aborting = True
            self.transport.abortConnection()

    # -- reading ---------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == "BODY":
            if self._mode == "chunked":  # a stream's every event, without a call more
                try:
                    self.bodyDecoder.dataReceived(data)
                    if self.read_done is not None:
                        self.read_done()
                except Exception as e:  # twisted's malformed chunks, or ChunkedPassthrough's
                    self._broken(e)
                return
            self._body(data)
            if self.read_done is not None:
                self.read_done()
        elif state == "HEAD":
            self._heard = True
            self._buffer += data
            self._head()
        elif state == "IDLE":
            self.abort()  # bytes nobody asked for: this connection cannot be trusted again

    def _head(self) -> None:
        buffer = self._buffer
        while True:
            # the blank line after a line ending in CRLF or in LF alone: LF CR LF (which also
            # finds CR LF CR LF, leaving a CR that parse_head drops), or LF LF
            end = buffer.find(b"\n\r\n")
            skip = 3
            bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))
            if bare >= 0:
                end, skip = bare, 2
            if end < 0 or end > MAX_HEAD:  # also a head that arrived whole past the limit
                if end >= 0 or len(buffer) > MAX_HEAD:
                    self._broken(MalformedResponse("response head too long"))
                else:
                    self._buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + skip:]
            exchange = self._exchange
            try:
                code, phrase, keep_alive, headers = parse_head(head)
                length = body_length(code, exchange.head_only, headers)
            except MalformedResponse as e:
                self._broken(e)
                return
            if code >= 200:
                break
            if code == 101:
                self._broken(MalformedResponse("unexpected 101 Switching Protocols"))
                return
            # 1xx (100 Continue, 103 Early Hints): informational, the answer follows
        self._buffer = b""
        self._keep_alive = keep_alive
        self._mode = length
        response = self.response = Response(code, phrase, headers,
                                            UNKNOWN_LENGTH if length == "chunked" else length, self)
        self.state = "BODY"
        if length == "chunked":
            self.bodyDecoder = _ChunkedTransferDecoder(response._data, self._body_done)
        elif length is UNKNOWN_LENGTH:
            self._keep_alive = False
        else:
            self._left = length
        exchange.answer(response)
        # the body bytes that came with the head go to the body's reader after the caller heard
        # of the response, as twisted's parser does: a stream reader judging the first event
        # (StreamRelay) must be able to commit before the end of a short stream reaches it
        if self.response is not response:
            return  # the caller gave up on it at once
        if length == 0:
            self._body_done(buffer)
        elif buffer:
            self.dataReceived(buffer)

    def _body(self, data: bytes) -> None:
        """A body with a length, or read to the connection's end (a chunked one goes to its
        decoder from ``dataReceived``)."""
        mode = self._mode
        if mode is UNKNOWN_LENGTH:
            self.response._data(data)
        else:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                self.response._data(data)
                return
            self._left = 0
            self.response._data(data[:left] if len(data) > left else data)
            self._body_done(data[left:])

    def _body_done(self, rest: bytes) -> None:
        """The whole body has arrived: pool the connection (unless the upstream said otherwise or
        sent more than it should), then tell the response."""
        response = self.response
        self.response = self.bodyDecoder = self._exchange = self.read_done = None
        self.state = "IDLE"
        out = self._out  # (a drained TCP buffer is b"" and [])
        unsent = out is not None and (out.dataBuffer or out._tempDataBuffer)
        if rest or not self._keep_alive or self._aborting or unsent:
            # e.g. the body's reader gave up on the last bytes: the connection is on its way out
            if unsent:
                # answered before the request left whole (a 413 to a large body): the rest of it
                # would reach the server ahead of the next request, or never (it stopped reading)
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
            self.state = "CLOSED"
        else:
            self._pool._release(self)
        if response is not None:
            response._end(BODY_DONE)

    def _broken(self, reason: Exception) -> None:
        """The answer cannot be read: the caller or the body's reader gets ``reason``, and the
        connection is dropped."""
        self.abort()
        self._lost(Failure(reason))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.state == "IDLE":
            self._pool._forget(self)
        self._lost(reason)
        self.transport = None
        waiting, self._on_close = self._on_close, []
        for d in waiting:
            d.callback(None)

    def _lost(self, reason: Failure) -> None:
        state, self.state = self.state, "CLOSED"
        exchange, self._exchange = self._exchange, None
        response, self.response = self.response, None
        self.bodyDecoder = self.read_done = None
        if state == "HEAD" and exchange is not None:
            if self.reused and not self._heard and not exchange.retried and exchange.deferred is not None \
                    and reason.check(error.ConnectionDone, error.ConnectionLost):
                # a kept-alive connection the upstream had closed: nothing of the request can
                # have been answered, so it goes once more, on a fresh connection
                exchange.retried = True
                exchange.connection = None
                self._pool._send(exchange, fresh=True)
                return
            exchange.answer(reason)
        elif state == "BODY" and response is not None:
            # a body cut short ends with the connection's reason, as twisted's first reason:
            # only a body without length may end with the connection
            if self._mode is UNKNOWN_LENGTH and reason.check(error.ConnectionDone):
                reason = Failure(PotentialDataLoss())
            response._end(reason)


class HTTP1Pool:
    """Sends requests over kept-alive connections, by (scheme, host, port).

    As twisted's ``HTTPConnectionPool``: a request takes an idle connection to its host or makes a
    new one (there is no limit on connections in use); a connection whose response was read
    completely goes back to the idle ones, up to ``max_idle_per_host`` (more are closed), and an
    idle connection is closed after ``idle_timeout`` seconds.
    """

    def __init__(self, reactor, endpoints, *, max_idle_per_host: int = 256, idle_timeout: float = 120.0):
        self._reactor = reactor
        self._endpoints = endpoints
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self._idle: Dict[tuple, List[HTTP1Connection]] = {}
        self._sweep = None  # one timer closes idle connections that outstayed idle_timeout

    def request(self, method: bytes, url: bytes, headers: RequestHeaders,
                body: Optional[bytes]) -> defer.Deferred:
        """Send a request (``headers``: twisted ``Headers`` or ``(name, value)`` pairs); fires with
        a :class:`Response` once its head arrived.

        Fails with the connection's failure (refused, timed out, TLS, closed before answering) or a
        :class:`MalformedResponse`. Cancelling it drops the connection.
        """
        parts = _split_urls.get(url)
        if parts is None:
            parts = split_url(url)  # (a URL it refuses raises here, every time: never kept)
            if len(_split_urls) < _MAX_URLS:
                _split_urls[url] = parts
        scheme, host, port, shown, path = parts
        head = request_head(method, path, shown, headers, None if body is None else len(body))
        exchange = _Exchange([head, body] if body else [head], method == b"HEAD", (scheme, host, port))
        d = exchange.deferred = defer.Deferred(exchange.cancel)
        self._send(exchange)
        return d

    def _send(self, exchange: _Exchange, fresh: bool = False) -> None:
        idle = self._idle.get(exchange.key)
        while idle and not fresh:
            connection = idle.pop()
            if connection.state == "IDLE":
                connection.reused = True
                connection.send(exchange)
                return
        scheme, host, port = exchange.key
        endpoint = self._endpoints.endpointForURI(_Target(scheme, host, port))
        connecting = exchange.connecting = endpoint.connect(_Factory(self, exchange.key))
        connecting.addCallbacks(self._connected, self._not_connected, callbackArgs=(exchange,),
                                errbackArgs=(exchange,))

    @staticmethod
    def _connected(connection: HTTP1Connection, exchange: _Exchange) -> None:
        exchange.connecting = None
        if exchange.deferred is None:
            connection.transport.loseConnection()  # cancelled meanwhile
            return
        connection.send(exchange)

    @staticmethod
    def _not_connected(reason: Failure, exchange: _Exchange) -> None:
        exchange.connecting = None
        if not reason.check(defer.CancelledError) or exchange.deferred is not None:
            exchange.answer(reason)

    def _release(self, connection: HTTP1Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle_per_host:
            connection.transport.loseConnection()
            connection.state = "CLOSED"
            return
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self.idle_timeout / 2, self._close_stale)

    def _forget(self, connection: HTTP1Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]
        if not self._idle and self._sweep is not None:
            self._sweep.cancel()  # nothing idle: no timer left behind (a stopped daemon, a test)
            self._sweep = None

    def _close_stale(self) -> None:
        self._sweep = None
        limit = self._reactor.seconds() - self.idle_timeout
        for connection in [c for idle in self._idle.values() for c in idle if c.idle_since <= limit]:
            connection.transport.loseConnection()  # connectionLost takes it out of the pool
        if any(self._idle.values()):
            self._sweep = self._reactor.callLater(self.idle_timeout / 2, self._close_stale)

    def close(self) -> defer.Deferred:
        """Close every idle connection; fires once they are all closed."""
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        closing = []
        for idle in list(self._idle.values()):
            for connection in list(idle):
                closing.append(connection.closed())
                connection.transport.loseConnection()
        return defer.DeferredList(closing)


class _Factory(protocol.ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def __init__(self, pool: HTTP1Pool, key):
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr):
        return HTTP1Connection(self._pool, self._key)
