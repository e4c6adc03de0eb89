"""A request head parsed in one pass, where twisted.web's line-by-line parser would take a call per line.

twisted.web's HTTPChannel reads a request head line by line: LineReceiver splits one line off its
buffer per call (copying the rest of the buffer, body included, every time), then ``lineReceived``
and ``headerReceived`` run per header. For a head of ~15 headers that is most of the server side's
parsing cost (issue 17). :class:`HeadChannel` takes the whole head at once when it is complete in
the bytes just received: it finds the blank line, splits once, validates everything twisted would
check, and fills the request exactly as twisted's code would. It never rejects anything itself: a
head it does not fully accept (a limit exceeded, an invalid name or value, a folded line, a bare LF,
a head split across reads...) goes to twisted's own line-by-line parser, unchanged, which then
accepts or rejects it as it always did. The body after the head takes twisted's own path.

This mirrors twisted internals, so it is only on for the twisted sources it was checked against:
:data:`ENABLED` compares a digest of the source of the twisted functions it mirrors with the digests
known here. Any other twisted (Debian 12's 22.4, a newer release) parses the plain twisted way.
"""

from typing import Any, List, Optional, Tuple

from twisted.protocols import basic
from twisted.web import http, http_headers
from twisted.web.iweb import INonQueuedRequestFactory

from clproxy import mirrored

#: The twisted functions whose behaviour :func:`parse_head` and :class:`HeadChannel` reproduce or
#: rely on (their state, their checks, the contract of the ones called), as (holder, name): a change
#: in any of them may change what a head means, so the fast path is off until they are checked
#: again. Older releases lack some of them (22.4 has no _parseRequestLine nor _NameEncoder).
MIRRORED = (
    (basic.LineReceiver, "dataReceived"),
    (http.HTTPChannel, "dataReceived"),
    (http.HTTPChannel, "lineReceived"),
    (http.HTTPChannel, "headerReceived"),
    (http.HTTPChannel, "_maybeChooseTransferDecoder"),
    (http, "_parseRequestLine"),
    (getattr(http_headers, "_NameEncoder", None), "encode"),
    (http_headers.Headers, "addRawHeader"),
    (http_headers, "_sanitizeLinearWhitespace"),
)

#: The methods of the channel whose work the fast path does instead of calling them.
OWN_PARSING = ("lineReceived", "headerReceived")

#: The methods it calls without looking at their verdict, which :func:`parse_head` has already
#: given for twisted's own: a subclass's version may refuse (400) a head the fast path would then
#: go on with (allHeadersReceived, a 100 Continue after the 400...).
PREJUDGED = ("_maybeChooseTransferDecoder",)

#: sha256 of :func:`fingerprint` for the twisted releases checked against this module (with
#: tests/test_head_parsing.py): 26.10.0.
KNOWN_FINGERPRINTS = frozenset({
    "b9611428a2019674729d0f10793ab45b49b3ba10ffb5951cc5c61905ca948b2a",
})

#: The headers that choose how the body is read (twisted's ``_maybeChooseTransferDecoder``).
FRAMING = (b"Content-Length", b"Transfer-Encoding")

#: What a head parsed in one pass gives: method, target, version, the headers (canonical name, value)
#: in order, the sum of its line lengths (twisted's header size), and where the bytes after it start.
Head = Tuple[bytes, bytes, bytes, List[Tuple[bytes, bytes]], int, int]


def fingerprint(functions=MIRRORED) -> str:
    """The digest of the ``functions`` this module mirrors (see :func:`clproxy.mirrored.fingerprint`)."""
    return mirrored.fingerprint(functions)


#: Whether this twisted's parsing is the one the fast path was checked against (computed once).
ENABLED = fingerprint() in KNOWN_FINGERPRINTS


# twisted.web.http is a deprecation proxy module: each attribute read there is a Python call
_parse_request_line: Any = getattr(http, "_parseRequestLine", None)  # older twisted: none (ENABLED is off)


def parse_head(data: bytes, max_line: int, max_size: int, max_headers: int) -> Optional[Head]:
    """The request head at the start of ``data`` if it is complete there and twisted would accept
    it, with the limits left (``max_line`` per line, ``max_size`` for the sum of the line lengths,
    ``max_headers`` headers); None for anything else, which twisted's own parser then handles.

    No side effect: on None nothing has been consumed or changed.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[:end]
    lines = head.split(b"\r\n")
    count = len(lines) - 1
    size = end - 2 * count  # twisted counts the lines without their CRLF
    if size > max_size or count > max_headers or max(map(len, lines)) > max_line:
        return None
    # A NUL, CR or LF other than the line ends is refused by twisted wherever it is (request line,
    # header name or value): one scan of the head instead of one per value.
    if b"\x00" in head or head.count(b"\r") != count or head.count(b"\n") != count:
        return None
    try:
        method, target, version = _parse_request_line(lines[0])
    except ValueError:
        return None
    encoder = http_headers._nameEncoder
    # encode() starts with this look-up; a hit spares the call (only valid names are cached)
    canonical, encode = encoder._canonicalHeaderCache.get, encoder.encode
    headers = []
    decoders = 0
    for line in lines[1:]:
        # a folded line (leading space or tab) has no token before its colon: refused below
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        try:
            name = canonical(name) or encode(name)
        except http_headers.InvalidHeaderName:
            return None
        value = value.strip(b" \t")
        if name in FRAMING:
            if name == b"Content-Length":
                if not value.isdigit() or len(value) > 18:  # (int() refuses thousands of digits)
                    return None
                decoders += 1
            else:
                coding = value.lower()
                if coding == b"chunked":
                    decoders += 1
                elif coding != b"identity":
                    return None
            if decoders > 1:  # two lengths, or a length and chunked: twisted refuses the request
                return None
        headers.append((name, value))
    return method, target, version, headers, size, end + 4


class HeadChannel(http.HTTPChannel):
    """An HTTPChannel that takes a request head complete in one read in one pass (:func:`parse_head`),
    and leaves everything else to twisted's line-by-line parser."""

    #: whether heads may be parsed in one pass here (the guard's verdict; False forces twisted's way)
    fast_head = ENABLED
    #: how many request heads this channel parsed in one pass
    heads_in_one_pass = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass with its own line or header handling must get it called and heeded, and one
        # with other line ends than parse_head's CRLF gets them: no fast path there
        if cls.dataReceived is not HeadChannel.dataReceived or cls.delimiter != b"\r\n" or any(
                getattr(cls, name) is not getattr(http.HTTPChannel, name) for name in OWN_PARSING + PREJUDGED):
            cls.fast_head = False

    def _may_take_head(self) -> bool:
        """Whether twisted would now read a new request's first line from fresh data, with nothing
        buffered and no state of a previous line to carry on (the only state the fast path starts in)."""
        return bool(self.fast_head and self.line_mode and not self._buffer and not self._busyReceiving
                    and not self.paused and self.persistent and self._HTTPChannel__first_line == 1
                    and not self._closing())

    def _closing(self) -> bool:
        """LineReceiver's test for stopping after a line: the connection is being closed."""
        transport: Any = self.transport
        return bool(transport and transport.disconnecting)

    def dataReceived(self, data: bytes) -> None:
        if not self._may_take_head():
            return super().dataReceived(data)
        self.resetTimeout()
        while True:
            head = parse_head(data, self.MAX_LENGTH, self.totalHeadersSize - self._receivedHeaderSize,
                              self.maxHeaders - self._receivedHeaderCount)
            if head is None:
                return basic.LineReceiver.dataReceived(self, data)
            # as within LineReceiver.dataReceived: what follows the head waits in the buffer while
            # the head is handled, and data arriving meanwhile (a finished request's buffered
            # pipelined bytes) is appended to it
            self._buffer = data[head[5]:]
            self._busyReceiving = True
            try:
                self._take_head(head)
                if self._closing():
                    return None  # twisted stops reading here too, leaving the buffer
                if self._buffer and not self.paused and not self.line_mode:
                    # the body came with the head: LineReceiver's next step, in raw mode, which
                    # may end the request and leave the next one in the buffer
                    data, self._buffer = self._buffer, b""
                    self.rawDataReceived(data)
            finally:
                self._busyReceiving = False
            data, self._buffer = self._buffer, b""
            if not data:
                return None
            if not self._may_take_head():  # a body still coming, a request still being answered...
                return basic.LineReceiver.dataReceived(self, data)

    def _take_head(self, head: Head) -> None:
        """Fill a new request from ``head`` as twisted's lineReceived and headerReceived would have
        from its lines, then end the head as its blank line does."""
        method, target, version, headers, size, _ = head
        factory = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            request = factory(self)
        else:
            request = factory(self, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = method, target, version
        request_headers = request.requestHeaders
        # Headers.addRawHeader would canonicalize the name again and fold line ends in the value
        # (none left): the same result, straight into its table
        table = request_headers._rawHeaders if type(request_headers) is http_headers.Headers else None
        for name, value in headers:
            if name in FRAMING:
                self._maybeChooseTransferDecoder(name, value)  # checked to succeed by parse_head
            if table is None:
                request_headers.addRawHeader(name, value)
            else:
                table.setdefault(name, []).append(value)
        self._receivedHeaderCount += len(headers)
        self._receivedHeaderSize += size
        self.heads_in_one_pass += 1
        # what lineReceived does on the blank line
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
