"""Talking to an upstream over HTTP: send raw bytes, read a bounded body, relay a stream.

Requests go over :mod:`clproxy.proxy.http1`, a lean HTTP/1.1 client with kept-alive connections
(or over an ``IAgent`` given instead, as the in-memory tests do): no cookie jar (it would leak one
account's cookies into another's requests), no redirect following and no content decoding, so
what the upstream sends is what the client gets.
"""

import re
from typing import Callable, Dict, List, Optional, Set

from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime
from clproxy.observe.console import logger
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web._newclient import HTTP11ClientProtocol, ResponseDone
from twisted.web.http import (PotentialDataLoss, _ChunkedTransferDecoder, _chunkExtChars, _DataLoss,
                               maxChunkSizeLineLength)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, UNKNOWN_LENGTH
from zope.interface import implementer

from clproxy.interfaces import IUpstream

from clproxy.proxy import sse
from clproxy.proxy.http1 import (BODY_DONE, HTTP1Pool, MalformedResponse, RequestHeaders,
                                 Response as HTTP1Response, _no_delay, pairs_to_headers)

log = logger(__name__)


class _NoDelayClientProtocol(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        _no_delay(self.transport)
        super().connectionMade()

    def _disconnectParser(self, reason) -> None:
        # A finished parser and its body decoder refer to each other (the decoder's finishCallback
        # is the parser's method), which keeps the parser, the response and the request (with its
        # body) alive until a full collection; breaking the cycle frees them at once.
        parser = self._parser
        super()._disconnectParser(reason)
        if parser is not None:
            parser.bodyDecoder = None


class _NoDelayClientFactory(webclient._HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def buildProtocol(self, addr):
        return _NoDelayClientProtocol(self._quiescentCallback)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory, written in one go (no cooperator round trips)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        body, self._body = self._body, b""  # not kept: the request object may outlive the exchange
        consumer.write(body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Twisted's endpoints, except that an ``http://`` URL with an IP address connects directly:
    the standard endpoint resolves even a literal address in a thread, on every new connection."""

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._standard = webclient._StandardEndpointFactory(
            reactor, webclient.BrowserLikePolicyForHTTPS(), connect_timeout, None)

    def set_timeout(self, connect_timeout: float) -> None:
        """Use ``connect_timeout`` for connections made from now on."""
        self._timeout = connect_timeout
        self._standard = webclient._StandardEndpointFactory(
            self._reactor, webclient.BrowserLikePolicyForHTTPS(), connect_timeout, None)

    def endpointForURI(self, uri):
        if uri.scheme == b"http":
            host = uri.host.decode("ascii", "replace")
            if isIPAddress(host):
                return endpoints.TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if isIPv6Address(host):
                return endpoints.TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return self._standard.endpointForURI(uri)


class UpstreamError(Exception):
    """An upstream could not be reached, timed out, or broke off; ``kind`` is ``network`` or ``timeout``.

    ``message`` is the client's error message; ``what`` says what happened in a few words with the
    upstream's host:port (``connection refused by 127.0.0.1:9``, ``timeout after 600 s waiting for
    api.anthropic.com``) for the account's last error and the log. Neither holds a credential.
    """

    def __init__(self, kind: str, message: str, what: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.what = what or message


@implementer(IUpstream)
class UpstreamClient:
    """Sends requests to upstreams over one shared pool of persistent connections.

    ``agent`` (an ``IAgent``) replaces the HTTP/1.1 client, e.g. :func:`twisted_agent` or the
    tests' in-memory agent. ``pool`` is a twisted ``HTTPConnectionPool`` with the same limits, for
    those that need an Agent of their own (the token refresher).
    """

    def __init__(self, reactor, *, connect_timeout: float = 10.0, max_connections_per_host: int = 256,
                 agent=None):
        self._reactor = reactor
        self.pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections_per_host
        self.pool.cachedConnectionTimeout = 120
        self.pool.retryAutomatically = False  # POSTs are never silently re-sent by the pool
        self.pool._factory = _NoDelayClientFactory
        self._endpoints = _EndpointFactory(reactor, connect_timeout)
        self.http1 = HTTP1Pool(reactor, self._endpoints, max_idle_per_host=max_connections_per_host,
                               idle_timeout=self.pool.cachedConnectionTimeout)
        self.agent = agent

    def reconfigure(self, *, connect_timeout: Optional[float] = None,
                    max_connections_per_host: Optional[int] = None) -> None:
        """New limits (a config reload): the next connection made, and the next one returned to the
        pool, use them; connections already open stay as they are."""
        if connect_timeout is not None:
            self._endpoints.set_timeout(connect_timeout)
        if max_connections_per_host is not None:
            self.pool.maxPersistentPerHost = max_connections_per_host
            self.http1.max_idle_per_host = max_connections_per_host

    def send(self, method: bytes, url: bytes, headers: RequestHeaders, body: Optional[bytes],
             timeout: float, clock: IReactorTime) -> "defer.Deferred":
        """Send one request; fires with the response (a :class:`clproxy.proxy.http1.Response`, or the agent's
        ``IResponse``) once its headers arrived. ``headers`` is twisted ``Headers`` or
        ``(name, value)`` pairs, sent in their order.

        Fails with :class:`UpstreamError` when the upstream is unreachable or sends no response
        headers within ``timeout`` seconds. Cancelling the Deferred closes the connection.
        """
        if self.agent is None:
            d = self.http1.request(method, url, headers, body)
        else:
            if not isinstance(headers, Headers):
                headers = pairs_to_headers(headers)
            d = self.agent.request(method, url, headers, BytesProducer(body) if body is not None else None)
        timer = clock.callLater(timeout, d.cancel)
        host = _host_of(url)

        def done(result):
            timed_out = not timer.active()
            if not timed_out:
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            if timed_out:
                raise UpstreamError("timeout", f"upstream {host} sent no response within {timeout:g}s",
                                    f"timeout after {timeout:g} s waiting for {host}")
            if _cancelled(result):
                return result  # our caller cancelled (the client went away)
            raise UpstreamError("network", f"upstream {host} unreachable: {_describe(result)}",
                                _what_happened(result, host))

        return d.addBoth(done)

    def close(self) -> "defer.Deferred":
        """Close every cached connection (called from ``stopService``)."""
        return defer.DeferredList([self.pool.closeCachedConnections(), self.http1.close()])


def twisted_agent(client: UpstreamClient):
    """twisted's ``Agent`` on ``client``'s pool and endpoints: how upstream requests were sent
    before :mod:`clproxy.proxy.http1` (the benchmark compares the two)."""
    return webclient.Agent.usingEndpointFactory(client._reactor, client._endpoints, pool=client.pool)


def _host_of(url: bytes) -> str:
    """``host[:port]`` of a URL, without any ``user:password@`` (it would be a secret)."""
    text = url.decode("ascii", "replace")
    rest = text.split("://", 1)[-1]
    return rest.split("/", 1)[0].rsplit("@", 1)[-1]


def _cancelled(failure: Failure) -> bool:
    """True when a request failed because it was cancelled (possibly wrapped by the HTTP client)."""
    if failure.check(defer.CancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(r.check(defer.CancelledError) for r in reasons)


def _broke_off(reason: Failure) -> str:
    """Why a body's connection was lost, "" when the body ended cleanly (whole, or closed by a
    server that gave no length: twisted's ``PotentialDataLoss``)."""
    if reason is BODY_DONE or reason.check(ResponseDone, PotentialDataLoss) is not None:
        return ""
    return _describe(reason)


def _describe(failure: Failure) -> str:
    """A one-line reason for a connection failure, without a traceback."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived / RequestTransmissionFailed
    if reasons:
        value = reasons[0].value
    name = type(value).__name__
    text = str(value).strip().splitlines()[0] if str(value).strip() else ""
    return f"{name}: {text}" if text else name


def _what_happened(failure: Failure, host: str) -> str:
    """What a failed connection attempt or exchange did, in words: ``connection refused by HOST``."""
    value = failure.value
    reasons = getattr(value, "reasons", None)  # ResponseNeverReceived / RequestTransmissionFailed
    if reasons:
        value = reasons[0].value
    if isinstance(value, error.ConnectionRefusedError):
        return f"connection refused by {host}"
    if isinstance(value, error.DNSLookupError):
        return f"cannot resolve the name of {host}"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError)):
        return f"connecting to {host} timed out"
    if isinstance(value, error.NoRouteError):
        return f"no route to {host}"
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone, error.ConnectionAborted)):
        return f"{host} closed the connection before answering"
    if isinstance(value, MalformedResponse):
        return f"{host} sent an answer that is not valid HTTP/1.1 ({value})"
    module = type(value).__module__
    if "SSL" in module or "ssl" in module or "service_identity" in module:
        return f"TLS with {host} failed"
    return f"connecting to {host} failed ({type(value).__name__})"


class _BodyCollector(protocol.Protocol):
    """Gathers a whole body for :func:`read_body`; with ``idle_timeout`` > 0, the clock's
    :class:`_IdleSweeper` watches it as it watches a stream (no timer of its own) and a body
    silent for that long fails as a timeout and drops its connection."""

    def __init__(self, finished: defer.Deferred, limit: int, host: str,
                 clock: Optional[IReactorTime] = None, idle_timeout: float = 0.0):
        self._finished = finished
        self._host = host
        self._parts: List[bytes] = []
        self._size = 0
        self._limit = limit
        self.truncated = False
        # what the idle sweeper reads and writes (see StreamRelay)
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._chunks = 0
        self._seen_chunks = 0
        self._quiet_since = 0.0
        self._sweeper: Optional["_IdleSweeper"] = None
        self._timed_out = False

    def watch(self) -> None:
        """Have the clock's sweeper watch this body for silence (a body already whole needs none)."""
        if self._clock is not None and self._idle_timeout > 0 and not self._finished.called:
            self._sweeper = _IdleSweeper.watch(self._clock, self)

    def dataReceived(self, data: bytes) -> None:
        self._chunks += 1
        if self._size >= self._limit:
            self.truncated = True
            return
        self._parts.append(data[: self._limit - self._size])
        self._size += len(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._leave_sweeper()
        if self._finished.called:
            return  # timed out (the abort's own end comes after), or the reader cancelled
        if self._timed_out:
            self._fail_silent()
            return
        if reason is BODY_DONE or reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
            return
        # Content-Length not reached, or a chunked body without its last chunk
        what = (f"{self._host} closed the connection after {self._size} bytes of the answer's body, "
                "before its end")
        self._finished.errback(UpstreamError("network", f"upstream {what}", what))

    def _went_silent(self) -> None:
        """Called by the sweeper (which has already let go of this body): drop the connection
        (a body half read can never be followed by another answer on it) and fail as a timeout."""
        self._sweeper = None
        if self._finished.called:
            return
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()
        self._fail_silent()

    def give_up(self) -> None:
        """The reader cancelled (its client went away): stop watching and drop the connection,
        which a body half read can never serve again (left open, a body that then stalled held
        its upstream connection for ever)."""
        self._leave_sweeper()
        if self.transport is not None:
            self.transport.stopProducing()

    def _fail_silent(self) -> None:
        if self._finished.called:
            return
        timeout = self._idle_timeout
        self._finished.errback(UpstreamError(
            "timeout", f"upstream {self._host} went silent for {timeout:g}s in the middle of its answer's body",
            f"timeout after {timeout:g} s waiting for the rest of the body from {self._host}"))

    def _leave_sweeper(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.forget(self)


def read_body(response, limit: int, host: str = "upstream", clock: Optional[IReactorTime] = None,
              idle_timeout: float = 0.0) -> "defer.Deferred":
    """Read a whole response body, keeping at most ``limit`` bytes; fires with the bytes.

    Fails with :class:`UpstreamError` (``network``) when the upstream closes before the body is
    complete; ``host`` names it in the error. With a ``clock`` and ``idle_timeout`` > 0, a body
    that sends nothing for ``idle_timeout`` seconds (between idle_timeout and 1.25 times it, the
    sweeper's bound) fails with ``UpstreamError`` (``timeout``), its connection dropped: the send's
    timeout ends at the response head, and a body stalled after it would otherwise be waited for
    for ever. Cancelling the Deferred drops the connection.
    """
    if response.length == 0:
        return defer.succeed(b"")
    finished: defer.Deferred = defer.Deferred(lambda _: collector.give_up())
    collector = _BodyCollector(finished, limit, host, clock, idle_timeout)
    response.deliverBody(collector)
    # watched only once what had arrived was delivered: a body that came whole with its head
    # (most answers) costs the sweeper nothing
    collector.watch()
    return finished


class FirstEventFailed(Exception):
    """A stream ended, broke or sent nothing usable before its first complete event."""


#: How much of a stream's end a relay keeps: the final message_delta (usage) and message_stop.
TAIL_BYTES = 2048


class StreamRelay(protocol.Protocol):
    """Relays an upstream SSE body to a client once its first complete event has arrived.

    Until :meth:`commit`, bytes are held (only the few needed to see the first event) and
    :attr:`first_event` fires with that event, or fails with :class:`FirstEventFailed`. After
    :meth:`commit` what each upstream read brings is written to the client the moment the read
    has been decoded, in one write however many chunks it held; the client's transport pauses the
    upstream socket when it cannot keep up (backpressure).

    With ``idle_timeout`` > 0, a stream that sends nothing for that long (before or after its
    first event) is aborted: "timed out" before its first event, "went silent" after. Its clock's
    :class:`_IdleSweeper` watches it, not a timer of its own. A shorter ``first_event_timeout``
    (what is left of the request's deadline) is the silence allowed until the first event
    instead; ``idle_timeout`` applies from that event on.
    """

    max_bootstrap_bytes = 1024 * 1024

    def __init__(self, clock: IReactorTime, idle_timeout: float, host: str,
                 first_event_timeout: Optional[float] = None):
        self.first_event: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()  # fires with a StreamOutcome after commit
        self._clock = clock
        #: the silence the sweeper allows now: until the first event, the shorter of the two
        self._idle_timeout = idle_timeout
        self._stream_timeout = idle_timeout
        if first_event_timeout is not None and 0 < first_event_timeout < idle_timeout:
            self._idle_timeout = first_event_timeout
        self._host = host
        self._held: List[bytes] = []
        self._parser: Optional[sse.SSEParser] = sse.SSEParser(self.max_bootstrap_bytes)
        self._write: Optional[Callable[[bytes], None]] = None
        self._request = None
        self._tail = b""
        self._chunks = 0  # data deliveries so far: the idle sweeper compares it between sweeps
        self._seen_chunks = 0  # the count at the last sweep that saw it move (the sweeper's)
        self._quiet_since = 0.0  # when that sweep ran: the stream has been silent since at most then
        self._sweeper: Optional["_IdleSweeper"] = None
        self._lost = False
        #: how it broke off ("" when it ended cleanly), when that was before commit(): kept as
        #: text, not as the Failure, whose traceback would keep frames alive with the relay
        self._ended_before_commit: Optional[str] = None
        self._timed_out = False
        #: why the proxy itself cut the stream (:meth:`cut`), said to the client instead of the
        #: broken connection that follows
        self._cut_reason: Optional[str] = None
        self.bytes_relayed = 0
        #: the ChunkedPassthrough relaying the upstream's framing as it is, once it took over
        self.passthrough: Optional["ChunkedPassthrough"] = None
        self._chunked_body = None
        #: after commit, the chunks of the current upstream read, written as one at its end
        #: (see _gather_reads); None while each chunk is written as it comes
        self._gathered: Optional[List[bytes]] = None

    # -- protocol --------------------------------------------------------------------------
    def connectionMade(self) -> None:
        if self._idle_timeout > 0:  # 0 or less: no idle watchdog
            self._sweeper = _IdleSweeper.watch(self._clock, self)

    def dataReceived(self, data: bytes) -> None:
        self._chunks += 1
        write = self._write
        if write is not None:
            gathered = self._gathered
            if gathered is not None:
                gathered.append(data)
            else:
                write(data)
            self.bytes_relayed += len(data)
            self._tail = (self._tail + data[-TAIL_BYTES:])[-TAIL_BYTES:]
            if self._parser is not None:
                self._read_first_event_after_commit(data)
            if self._chunked_body is not None and self._parser is None:
                self._switch_soon()
            return
        self._held.append(data)
        if self.first_event.called or self._parser is None:
            return
        try:
            events = self._parser.feed(data)
        except sse.EventTooLarge as e:
            self._fail_bootstrap(str(e))
            return
        if events:
            self._parser = None
            # the deadline bounded the wait for this event only: the stream's own silence
            # allowance from now on (the sweeper's next sweep widens its interval again)
            self._idle_timeout = self._stream_timeout
            self.first_event.callback(events[0])

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._lost = True
        self._leave_sweeper()
        if self._gathered is not None:
            self._send_gathered()  # what came before the end goes before anything the end writes
            self._gathered = None
        if self._write is not None:
            # committed: judged now. Checked first because passthrough mode commits before the
            # first event and feeds no parser after that: first_event never fires, and waiting
            # for it left done unfired and the client's answer without its end
            self._end(_broke_off(reason))
            return
        if not self.first_event.called:
            # (passthrough mode commits without waiting for the first event: commit() judges it)
            self._ended_before_commit = _broke_off(reason)
            why = "timed out" if self._timed_out else (
                "closed" if not self._ended_before_commit else self._ended_before_commit)
            self.first_event.errback(FirstEventFailed(
                f"upstream {self._host} stream {why} before its first event"))
            return
        # not committed (yet): the dispatcher either moved on to another account, or is
        # still between the first event and the commit (recording the account's answer may
        # wait on Redis); a short stream can end whole in that gap, so keep why it ended
        # and let commit() finish it
        self._ended_before_commit = _broke_off(reason)

    def _end(self, broke_off: str) -> None:
        """Judge how the committed stream ended (``broke_off``: why its connection was lost
        uncleanly, "" for a clean end) and fire :attr:`done` with it."""
        if self.passthrough is not None:
            self._tail = (self._tail + self.passthrough.tail())[-TAIL_BYTES:]
            self.passthrough.detach()  # it referred to this relay: no cycle left behind
        tail = self._tail
        complete = _ends_whole(tail)
        if self._cut_reason is not None:
            # cut by the proxy once its message_stop had come: the answer is whole, nothing to add
            why = None if complete else self._cut_reason
        elif self._timed_out:
            why = f"upstream {self._host} went silent for {self._idle_timeout:g}s mid-stream"
        elif broke_off:
            why = f"upstream {self._host} broke off the stream: {broke_off}"
        elif not complete:
            why = f"upstream {self._host} ended the stream before message_stop"
        else:
            why = None
        if why is not None and tail and not tail.endswith(b"\n"):
            # cut inside a line: end it, or the error event written next is glued to that line
            # and a client's SSE parser never sees it (the cut event's lines then become part of
            # the error event: no blank line, which would dispatch the cut event on its own). On
            # the fast path it goes first into the open chunk (a write of its own would be padded
            # there with blank lines)
            passthrough = self.passthrough
            if passthrough is not None and not passthrough.done:
                passthrough.lead = b"\n"
            else:
                self._write(b"\n")
        # the client's write method refers back to this relay (its disconnect callback): without
        # this, the pair and everything they hold wait for a full collection
        self._write = None
        self.done.callback(StreamOutcome(truncated=why is not None, reason=why))

    # -- control ---------------------------------------------------------------------------
    @property
    def tail(self) -> bytes:
        """The last bytes of the body received (up to TAIL_BYTES): where the final usage is."""
        if self.passthrough is not None and not self._lost:
            return (self._tail + self.passthrough.tail())[-TAIL_BYTES:]
        return self._tail

    def commit(self, write: Callable[[bytes], None],
               chunked_body: Optional[Callable[[], Optional[object]]] = None) -> None:
        """Write what was held, then write every later chunk through ``write`` as it arrives.

        With ``chunked_body`` (``ClientResponse.chunked_body``: the client's connection) the
        upstream's chunked framing is relayed as it is from the next reactor turn on, when the
        upstream answered chunked: no decoding and re-encoding per event (see
        :class:`ChunkedPassthrough`)."""
        held, self._held = b"".join(self._held), []
        self._write = write
        if held:
            write(held)
            self.bytes_relayed += len(held)
            self._tail = held[-TAIL_BYTES:]
        if self._lost:  # it ended before the commit: everything it sent was just written
            self._end(self._ended_before_commit)
            return
        self._chunked_body = chunked_body
        self._gather_reads()
        if chunked_body is not None and held and self._parser is None:
            self._switch_soon()

    def _gather_reads(self) -> None:
        # twisted's chunked decoder hands over each chunk of a read on its own: written as they
        # came, a read holding several events (a daemon that fell behind, or the read that
        # brought the first event) cost a send each. Gathered, it costs one, at the read's end,
        # before anything else can run. (Only an http1 response says when a read ends.)
        on_read_end = getattr(self.transport, "on_read_end", None)
        if on_read_end is not None and on_read_end(self._send_gathered):
            self._gathered = []

    def _send_gathered(self) -> None:
        gathered = self._gathered
        if gathered:
            self._gathered = []
            self._write(gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def _read_first_event_after_commit(self, data: bytes) -> None:
        # passthrough mode commits before the first event; it is still read, for its usage (a
        # message_start's input and cache counts are nowhere else in a long stream), and the
        # upstream's framing is relayed as it came only after it: the parser needs the events
        try:
            events = self._parser.feed(data)
        except sse.EventTooLarge as e:
            self._parser = None  # the stream itself goes on: only its first event is not read
            self.first_event.errback(FirstEventFailed(f"upstream {self._host}: {e}"))
            return
        if events:
            self._parser = None
            self.first_event.callback(events[0])

    def _switch_soon(self) -> None:
        # not now: this may run inside twisted's chunked decoder (delivering an event), whose
        # state is only consistent once it has returned; and only once the client's response
        # has its head (written with the first bytes)
        chunked_body, self._chunked_body = self._chunked_body, None
        self._clock.callLater(0, self._pass_chunks_through, chunked_body)

    def _pass_chunks_through(self, chunked_body) -> None:
        if self._lost or self._write is None:
            return
        parser = _parser_of(self.transport)
        if parser is None:
            return
        passthrough = ChunkedPassthrough.replacing(parser, self, chunked_body)
        if passthrough is not None:
            self.passthrough = passthrough
            # it writes each read whole itself: nothing is left to gather (a read's end has
            # sent what was gathered: this runs on a turn of its own)
            if self._gathered is not None:
                self._send_gathered()
                self._gathered = None
                self.transport.on_read_end(None)

    def producer(self):
        """The upstream transport as an ``IPushProducer``, for the client's ``registerProducer``."""
        return self.transport

    def abort(self) -> None:
        """Stop reading and close the upstream connection (client gone, or account abandoned)."""
        # given up on: nothing left to watch (and a later sweep must not call it silent instead)
        self._leave_sweeper()
        if not self._lost and self.transport is not None:
            self.transport.stopProducing()

    def cut(self, reason: str) -> None:
        """End the stream now for ``reason`` (the daemon is stopping and its drain gave up): the
        upstream connection is closed and the client, when committed, gets ``reason`` in its
        error event rather than the broken connection's account of it, which blamed the upstream."""
        if self._cut_reason is None:
            self._cut_reason = reason
        self.abort()

    # -- idle timeout: judged by the clock's shared sweeper, so no timer per stream ----------
    def _went_silent(self) -> None:
        """Called by the sweeper (which has already let go of this relay)."""
        self._sweeper = None
        if self._lost:
            return
        self._timed_out = True
        self.abort()

    def _leave_sweeper(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.forget(self)

    def _fail_bootstrap(self, why: str) -> None:
        self._parser = None
        if not self.first_event.called:
            self.first_event.errback(FirstEventFailed(f"upstream {self._host}: {why}"))
        self.abort()


#: idle sweeps per idle timeout (N): the sweeper runs every ``idle_timeout / N`` seconds, so a
#: silent stream is aborted between idle_timeout and idle_timeout * (1 + 1/N) after its last data
#: (when all streams share one timeout; see :class:`_IdleSweeper` for mixed ones)
SWEEPS_PER_TIMEOUT = 4

# N sweeps of T/N add up to T give or take a float rounding: without this slack, a stream silent
# for exactly its timeout could wait one more sweep (a billionth of the timeout is no real hurry)
_ROUNDING = 1 - 1e-9


class _IdleSweeper:
    """One repeating timer that watches every live :class:`StreamRelay` of a clock for silence
    (and every body :func:`read_body` is waiting for, the same way).

    A timer per stream (re-armed every idle timeout) put a DelayedCall per stream in the reactor's
    heap, and ``callLater`` was 2.7% of the daemon's time at 1,000 streams. Instead, relays join
    the sweeper of their clock on ``connectionMade`` and leave it when their connection is lost
    or they are aborted; the sweeper's single timer is pending only while one relay or more is
    watched, and the last one leaving cancels it (so a stopped daemon or a test has no stray timer).

    Every sweep looks at each relay's chunk counter: when it moved since the last sweep, the relay
    was heard from by now (``_quiet_since`` becomes now, an upper bound on its last data, so no
    stream is ever cut before a whole idle timeout of silence); when it has not moved for the
    relay's own idle timeout, the relay is aborted as silent. Sweeps run every ``T / N`` seconds,
    T the smallest idle timeout watched (N = :data:`SWEEPS_PER_TIMEOUT`). The bound, plus the
    reactor's lateness: with one timeout T for all (the usual case) a silent stream is aborted
    no sooner than T and at most T * (1 + 1/N) after its last data (or its start), as the sweep
    that saw its last data is at most T/N after it and T is a whole number of sweeps. When
    timeouts differ (streams started before a reload changed it), a stream's timeout need not end
    on a sweep and the sweep interval may change under it: each is aborted no sooner than its own
    timeout T' and at most T' * (1 + 2/N) after its last data.

    The sweeper of a clock lives in a dict on this class (one per process) keyed by the clock,
    and only while it watches a relay: the last relay leaving removes it, so the dict holds
    nothing for a clock (a test's ``task.Clock``) that has no live stream, and a relay ending is
    dropped at once (no reference to it outlives its connection). Handing a sweeper down from the daemon to each
    try would work as well, but every place that builds a try (the dispatcher and tests) would
    have to carry it, for the same one sweeper per reactor.
    """

    _by_clock: Dict[object, "_IdleSweeper"] = {}

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._relays: Set["StreamRelay"] = set()
        self._call = None  # the pending sweep, while there are relays to watch

    @classmethod
    def watch(cls, clock: IReactorTime, relay: "StreamRelay") -> "_IdleSweeper":
        """Watch ``relay`` (silent from now on) on the sweeper of ``clock``, made if need be."""
        sweeper = cls._by_clock.get(clock)
        if sweeper is None:
            sweeper = cls._by_clock[clock] = cls(clock)
        relay._seen_chunks = relay._chunks
        relay._quiet_since = clock.seconds()
        sweeper._relays.add(relay)
        sweeper._sweep_within(relay._idle_timeout / SWEEPS_PER_TIMEOUT)
        return sweeper

    def forget(self, relay: "StreamRelay") -> None:
        """Stop watching ``relay``; the last one leaving cancels the timer and the sweeper."""
        self._relays.discard(relay)
        if not self._relays:
            self._stop()

    def _stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._by_clock.get(self._clock) is self:
            del self._by_clock[self._clock]

    def _sweep_within(self, interval: float) -> None:
        # a relay with a shorter timeout than those watched brings the next sweep forward; the
        # interval stays short until a sweep finds the relays that need it gone
        due = self._clock.seconds() + interval
        if self._call is not None:
            if self._call.active() and self._call.getTime() <= due:
                return
            if self._call.active():
                self._call.cancel()
        self._call = self._clock.callLater(interval, self._sweep)

    def _sweep(self) -> None:
        self._call = None
        now = self._clock.seconds()
        smallest = None
        silent = []
        for relay in self._relays:
            if relay._chunks != relay._seen_chunks:
                relay._seen_chunks = relay._chunks
                relay._quiet_since = now
            elif now - relay._quiet_since >= relay._idle_timeout * _ROUNDING:
                silent.append(relay)
                continue
            if smallest is None or relay._idle_timeout < smallest:
                smallest = relay._idle_timeout
        # let go of them before aborting: an abort may end other streams, or start new ones, here
        self._relays.difference_update(silent)
        if smallest is not None:
            self._sweep_within(smallest / SWEEPS_PER_TIMEOUT)
        elif not self._relays:
            self._stop()
        for relay in silent:
            relay._went_silent()


def _parser_of(transport):
    """The HTTP client parser reading the response a body protocol was given ``transport`` of
    (an :mod:`http1` response, or twisted's TransportProxyProducer around the upstream
    connection), or None."""
    if isinstance(transport, HTTP1Response):
        return transport._connection  # the connection parses its response itself
    connection = getattr(transport, "_producer", None)
    protocol_ = getattr(connection, "protocol", None)
    protocol_ = getattr(protocol_, "_wrappedProtocol", protocol_)  # an endpoint's wrapper
    if not isinstance(protocol_, HTTP11ClientProtocol):
        return None
    return getattr(protocol_, "_parser", None)


class ChunkedPassthrough:
    """Relays a chunked upstream body to a chunked client response as it is: the upstream's
    chunk-size lines and data go to the client's transport in the bytes they came in.

    It replaces twisted's chunked decoder in the upstream's HTTP parser (the same two calls:
    ``dataReceived``, ``noMoreData``) and follows the framing only as far as it must: to find the
    last chunk (then the parser is told the body ended, so the connection goes back to the pool
    and the relay sees a complete body), to keep the payload's tail (usage), and to know which
    chunk is open when the upstream breaks off (:meth:`close`, which the client's response calls
    before whatever it writes next, completes it: the error event arrives in well-formed chunks).
    A chunk-size line split across reads is held
    until its end (a few bytes); a chunk too big to complete by padding goes out in chunks of the
    proxy's own; the last chunk is not relayed: once it arrived the client's
    request frames again and ends the body itself, as it does on the decoding path.
    """

    #: the longest chunk-size line (with extensions), as twisted's decoder (and _chunk_size): the
    #: decoding and the fast path judge a stream alike, whenever the switch happened and however
    #: it was read
    max_line = maxChunkSizeLineLength
    max_last = 65536  # the last chunk with its trailers

    def __init__(self, relay: "StreamRelay", write: Callable[[bytes], None], release: Callable[[], None],
                 finish: Callable[[bytes], None]):
        self._relay = relay
        self._write = write
        self._release = release
        self._finish = finish
        self._left = 0       # data bytes left in the open chunk
        self._crlf = 0       # bytes of the CRLF after the open chunk's data not yet seen
        self._skip = 0       # bytes of a CRLF the client already has (twisted framed that chunk)
        self._pending = b""  # a chunk-size line (or the last chunk) not yet complete: not sent yet
        self._tail: List[bytes] = []
        self._tail_size = 0
        self.done = False
        #: what :meth:`close` writes before the bytes it is given (the relay's line end after a cut)
        self.lead = b""
        self._reframed = False  # the open chunk is relayed in chunks of our own (_MAX_PADDED)

    @classmethod
    def replacing(cls, parser, relay: "StreamRelay",
                  chunked_body: Callable[[], Optional[object]]) -> Optional["ChunkedPassthrough"]:
        """Take over from twisted's decoder in ``parser`` where it stands, or None when it cannot
        (the body is not chunked on both sides, or the decoder is in the last chunk's trailers).
        ``chunked_body`` is called only when the upstream side can: it gives the client's side
        (``ClientResponse.chunked_body``) or None."""
        decoder = getattr(parser, "bodyDecoder", None)
        if type(decoder) is not _ChunkedTransferDecoder or getattr(parser, "state", None) != "BODY":
            return None
        response = getattr(parser, "response", None)
        if getattr(response, "_bodyProtocol", None) is not relay:
            return None
        state = decoder.state
        buffered = bytes(decoder._buffer)
        if state == "BODY" and buffered:
            return None  # twisted delivers what it holds at once; this is not a state it leaves
        if state == "CRLF" and not b"\r\n".startswith(buffered):
            return None
        if state not in ("CHUNK_LENGTH", "BODY", "CRLF"):
            return None
        body = chunked_body()
        if body is None:
            return None
        passthrough = cls(relay, body.write, body.release, decoder.finishCallback)
        body.closing = passthrough.close  # whatever writes next through the client's request
        if state == "BODY":
            # the client's chunk for the data so far is closed; the rest of this upstream chunk
            # goes out in a chunk of its own, closed by the upstream's CRLF (or, too big to pad
            # after a cut, in chunks of our own)
            passthrough._left = decoder.length
            if decoder.length > _MAX_PADDED:
                passthrough._reframed = True
            else:
                body.write(b"%x\r\n" % decoder.length)
        elif state == "CRLF":
            passthrough._skip = 2 - len(buffered)  # the client's chunk is closed already
        else:
            passthrough._pending = buffered
        parser.bodyDecoder = passthrough
        return passthrough

    def dataReceived(self, data: bytes) -> None:
        relay = self._relay
        relay._chunks += 1  # the idle watchdog's count
        if not (self._left or self._crlf or self._skip or self._pending or self._reframed):
            # the usual read: whole chunks, one SSE event each (several when the daemon fell
            # behind), between two chunks. Relayed with about a third less work than the general
            # loop below, which reads the same bytes the same way and takes any read this does not
            size = len(data)
            pos = 0
            payloads = []
            payload_size = 0
            while True:
                eol = data.find(b"\r\n", pos)
                if eol <= pos:
                    break
                line = data[pos:eol]
                length = _SIZES.get(line)
                if length is None:
                    if _PLAIN_SIZE(line) is None:
                        break
                    length = int(line, 16)
                    if len(_SIZES) < _MAX_SIZES:
                        _SIZES[line] = length
                end = eol + 2 + length
                if not length or length > _MAX_PADDED or not data.startswith(b"\r\n", end):
                    break
                payloads.append(data[eol + 2:end])
                payload_size += length
                pos = end + 2
                if pos == size:
                    self._tail.extend(payloads)
                    self._write(data)
                    relay.bytes_relayed += size
                    self._tail_size += payload_size
                    if self._tail_size >= _TRIM_AT:
                        self._trim()
                    return
        if self._skip:
            skip, self._skip = self._skip, 0
            expected = b"\r\n"[2 - skip:]
            if not data.startswith(expected[:len(data)]):
                raise _MalformedChunks("chunk data not followed by CRLF")
            if len(data) < skip:
                self._skip = skip - len(data)
                return
            data = data[skip:]
        if self._pending:
            data = self._pending + data
            self._pending = b""
        size = len(data)
        pos = 0
        sent = 0  # data[:sent] is dealt with: sent, or the framing of a reframed chunk (not relayed)
        mark = -1  # where the last chunk begun in this read begins (its size line), and the tail then
        marked_size = 0
        tail = self._tail
        try:
            while pos < size:
                left = self._left
                if left:
                    end = pos + left
                    if end > size:
                        end = size
                    piece = data[pos:end]
                    tail.append(piece)
                    self._tail_size += end - pos
                    self._left = left - (end - pos)
                    if self._reframed:
                        self._send(b"%x\r\n%s\r\n" % (end - pos, piece))
                        sent = end
                    pos = end
                    if not self._left:
                        self._crlf = 2
                    continue
                crlf = self._crlf
                if crlf:
                    expected = b"\r\n"[2 - crlf:]
                    got = data[pos:pos + crlf]
                    if not expected.startswith(got):
                        raise _MalformedChunks("chunk data not followed by CRLF")
                    self._crlf = crlf - len(got)
                    pos += len(got)
                    if self._reframed:
                        sent = pos  # the client's chunks are complete: not this CRLF
                        self._reframed = self._crlf != 0
                    continue
                mark = pos
                marked_size = self._tail_size
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > self.max_line:
                        raise _MalformedChunks("chunk-size line too long")
                    self._hold(data, pos, sent)
                    return
                length = _chunk_size(data[pos:eol])
                if length == 0:
                    end = data.find(b"\r\n\r\n", eol)
                    if end < 0:
                        if size - pos > self.max_last:
                            raise _MalformedChunks("trailers too long")
                        self._hold(data, pos, sent)
                        return
                    if end - eol > self.max_last:  # refused whole as when split across reads
                        raise _MalformedChunks("trailers too long")
                    self.done = True
                    self._trim()
                    if _ends_whole(self._relay.tail):
                        # whole: nothing will be written after it, so the client's last chunk
                        # (without the upstream's trailers) leaves with the last events, in one
                        # send, and the framing stays here (the request then writes no last
                        # chunk of its own)
                        self._write(data[sent:pos] + b"0\r\n\r\n")
                        self._relay.bytes_relayed += pos - sent  # the last chunk is ours
                    else:
                        # not relayed: the client's request writes its own when it finishes,
                        # after the error event the relay's end adds
                        if pos > sent:
                            self._send(data[sent:pos])
                        self._release()
                    self._finish(data[end + 4:])
                    return
                if length > _MAX_PADDED:
                    # too big to complete with padding if the upstream breaks off inside it (up to
                    # 2^64 bytes): its data goes out in chunks of our own as it arrives
                    if pos > sent:
                        self._send(data[sent:pos])
                    sent = eol + 2
                    self._reframed = True
                self._left = length
                pos = eol + 2
        except _MalformedChunks:
            # the client must be left with the framing close() completes, and the tail be what
            # it got: without this, a read's valid chunks were dropped but counted, and close()
            # completed a chunk the client never saw begin
            if self._reframed:
                pass  # its pieces went out whole (only its CRLF can be wrong): close() adds nothing
            elif mark < 0:
                # a chunk begun in an earlier read: what came of it goes out (as when decoding)
                if pos > sent:
                    self._send(data[sent:pos])
            else:
                # nothing of a chunk begun in this read goes out, only the chunks before it
                if mark > sent:
                    self._send(data[sent:mark])
                self._left = self._crlf = 0
                self._untail(self._tail_size - marked_size)
            raise
        if not sent:
            self._send(data)
        elif sent < size:
            self._send(data[sent:])
        self._trim()

    def _hold(self, data: bytes, pos: int, sent: int) -> None:
        self._pending = data[pos:]
        if pos > sent:
            self._send(data[sent:pos])
        self._trim()

    def _untail(self, count: int) -> None:
        """Take the last ``count`` bytes off the tail (read, but not relayed)."""
        tail = self._tail
        self._tail_size -= count
        while count > 0:
            last = tail.pop()
            if len(last) > count:
                tail.append(last[:len(last) - count])
            count -= len(last)

    def _send(self, data: bytes) -> None:
        self._write(data)
        self._relay.bytes_relayed += len(data)

    def _trim(self) -> None:
        # the pieces are let go of together once twice the tail has gathered: a join per ~2 KB
        # relayed, not a pop per read (the list is changed in place: callers hold it)
        if self._tail_size >= _TRIM_AT:
            kept = b"".join(self._tail)[-TAIL_BYTES:]
            self._tail[:] = [kept]
            self._tail_size = len(kept)

    def tail(self) -> bytes:
        """The last payload bytes relayed (the events, without framing), up to TAIL_BYTES."""
        return b"".join(self._tail)[-TAIL_BYTES:]

    def detach(self) -> None:
        """Forget the relay (it has ended)."""
        self._relay = None

    def noMoreData(self) -> None:
        if not self.done:
            raise _DataLoss("the upstream's chunked body ended before its last chunk")

    def close(self, last: bytes) -> bytes:
        """Complete the chunk left open (with the first bytes of ``last``, then blank lines, which
        SSE ignores), give the framing back, and return the rest of ``last``."""
        if self.done:
            return last  # the framing was given back at the last chunk
        if self.lead:
            last = self.lead + last
        out = b""
        left = self._left
        if self._skip or self._reframed:
            pass  # the client's chunks are complete; the upstream's CRLF was still to come
        elif left:
            fill = last[:left]
            last = last[left:]
            out = fill + b"\n" * (left - len(fill)) + b"\r\n"
        elif self._crlf:
            out = b"\r\n"[2 - self._crlf:]
        self._left = self._crlf = self._skip = 0
        self._reframed = False
        self._pending = b""
        if out:
            self._write(out)
        self._release()
        return last


#: the biggest chunk relayed with the upstream's own size line: a cut inside it is completed with
#: at most that many bytes (of blank lines); a bigger one is relayed in chunks of the proxy's own
_MAX_PADDED = 65536


#: the lines that end a stream whole: its message_stop, or an error event the upstream sent itself
_END_EVENT_LINES = (b"\nevent: message_stop", b"\nevent:message_stop", b"\nevent: error", b"\nevent:error")


class _MalformedChunks(ValueError):
    """The upstream's chunked framing is broken (the connection is given up, the stream truncated)."""


#: the passthrough's tail is cut back to TAIL_BYTES once this much payload has gathered in it
_TRIM_AT = 2 * TAIL_BYTES


#: a chunk-size line of plain hex digits, without extensions: every valid line of the usual kind
#: (``_chunk_size`` takes more: leading zeros past 16 digits, extensions)
_PLAIN_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}").fullmatch

#: plain chunk-size lines already read, and their sizes: an SSE event's chunk is a few hundred
#: bytes, so the same few hundred lines come back, and a dict look-up replaces a regex match and
#: an int() on every event (~2,100 of its ~31,500 instructions: benchmarks/event_cost.py).
#: Bounded: an upstream could send endless different lines (leading zeros).
_SIZES: Dict[bytes, int] = {}
_MAX_SIZES = 4096


def _chunk_size(line: bytes) -> int:
    """A chunk-size line's size; strict hex digits (leading zeros allowed) and extensions of the
    characters twisted's decoder allows: a line it refuses is refused here (relayed, a client's
    own parser would choke on it instead of reading the error event)."""
    if len(line) >= maxChunkSizeLineLength:  # refused whole as when split across reads
        raise _MalformedChunks("chunk-size line too long")
    digits, _, extensions = line.partition(b";")
    if not digits or digits.strip(b"0123456789abcdefABCDEF") or (
            len(digits) > 16 and len(digits.lstrip(b"0")) > 16):
        raise _MalformedChunks("bad chunk-size line")
    if extensions and extensions.translate(None, _chunkExtChars):
        raise _MalformedChunks("bad chunk extension")
    return int(digits, 16)


def _ends_whole(tail: bytes) -> bool:
    """Whether a stream whose last bytes (up to TAIL_BYTES) are ``tail`` ended whole: with its
    message_stop, or an error event the upstream sent itself."""
    # an event line, not the words: the model's text may quote them (a JSON string holds no
    # line break, so a line starting "event:" is always a real event's). The space after the
    # colon is optional in SSE. A full window may begin inside a line: no line start there
    lines = tail if len(tail) >= TAIL_BYTES else b"\n" + tail
    return any(marker in lines for marker in _END_EVENT_LINES)


class StreamOutcome:
    """How a committed stream ended: ``truncated`` with a ``reason``, or complete."""

    __slots__ = ("truncated", "reason")

    def __init__(self, truncated: bool, reason: Optional[str]):
        self.truncated = truncated
        self.reason = reason


__all__ = ["UpstreamClient", "UpstreamError", "read_body", "StreamRelay", "StreamOutcome",
           "FirstEventFailed", "BytesProducer", "UNKNOWN_LENGTH"]
