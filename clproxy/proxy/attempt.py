"""One upstream try of one account: send, hear the answer, record its verdict, and say what happened.

:meth:`Attempt.run` returns an :data:`Outcome` value; the dispatch loop (``clproxy.proxy.dispatch``)
reads it and decides what comes next. No exception carries control flow here: real errors (a bug,
a cancelled request whose client is still there) stay exceptions.

The outcomes:

* :class:`Answered`: the client has its answer (or is gone); the loop stops. ``how`` says which:
  a whole answer relayed, a stream relayed to its end, a stream truncated after commit, or the
  client left before anything could be answered.
* :class:`NextAccount`: nothing reached the client; the loop may try another account.
* :class:`RefreshAndRetry`: the account's OAuth token was rejected; the loop refreshes it and
  tries the same account again (or, when it cannot, cools it and goes on).

Both failing outcomes carry the verdict and a :class:`Failure`, what this try learned: the
upstream's error answer (to relay it when no account succeeds) or the network error. The loop
keeps them; nothing here writes into a shared object.

Recording happens in one place, :meth:`Attempt.run`, once per try: the upstream's answer is
first *heard* (sent, read, classified; no side effect on the pool or the record's attempts), then
its verdict is recorded (request record and pool) and the client answered when it should be: a
failure is recorded first (the next account is chosen with its cooldown in place), a success
after its answer has left (nothing in the answer depends on it; the client does not wait for it).
"""

import json
from typing import Any, Callable, Coroutine, List, Optional, Sequence, Set, Tuple, Union

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from clproxy.accounts.model import Account
from clproxy.errors import error_event, error_type_for
from clproxy.observe.console import logger
from clproxy.observe.recorder import (model_from_message, usage_from_event,
                                      usage_from_message, usage_from_sse_tail)
from clproxy.proxy.shaping import HOP_BY_HOP, CloakingPipeline
from clproxy.proxy.upstream import FirstEventFailed, StreamRelay, UpstreamError, read_body
from clproxy.routing import policy
from clproxy.routing.quota import has_quota_headers

log = logger(__name__)

# What a client must not see of the upstream's answer: hop-by-hop headers, and what twisted.web
# sets itself for the proxy's own connection.
DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"date"}

HeaderList = List[Tuple[bytes, Sequence[bytes]]]

#: :attr:`Answered.how`: a whole (non-streamed) answer was sent, success or relayed error
RELAYED = "relayed"
#: a stream was relayed to its end
STREAMED = "streamed"
#: a committed stream broke off; the client got an error event after what it had
TRUNCATED = "truncated"
#: the client went away; nobody is left to answer
CLIENT_GONE = "client-gone"


@attr.s(frozen=True, auto_attribs=True)
class Failure:
    """What a try that did not answer the client learned, for the loop's final answer.

    Either an upstream answer (``status``, with the headers a client may see and the body) or a
    ``network`` error (nothing usable came back: refused, timed out, cut short, an empty "success").
    """

    account_key: str
    status: Optional[int] = None
    headers: Optional[HeaderList] = None
    body: Optional[bytes] = None
    network: Optional[UpstreamError] = None


@attr.s(frozen=True, auto_attribs=True)
class Answered:
    """The client has its answer (or is gone): one of RELAYED, STREAMED, TRUNCATED, CLIENT_GONE."""

    how: str


@attr.s(frozen=True, auto_attribs=True)
class NextAccount:
    """Nothing reached the client; another account may be tried. ``verdict`` is already recorded."""

    verdict: policy.Verdict
    failure: Failure


@attr.s(frozen=True, auto_attribs=True)
class RefreshAndRetry:
    """The account's token was rejected (a 401, as a status or a stream's first event): refresh, retry."""

    verdict: policy.Verdict
    failure: Failure


Outcome = Union[Answered, NextAccount, RefreshAndRetry]


@attr.s(frozen=True, auto_attribs=True)
class _Heard:
    """The upstream's answer, classified but not yet recorded nor delivered.

    Exactly one of ``failure`` (the loop goes on) and ``deliver`` (answers the client) is set.
    """

    verdict: policy.Verdict
    failure: Optional[Failure] = None
    deliver: Optional[Callable[[], Coroutine[Any, Any, Answered]]] = None
    #: the verdict was logged already (with its reason), so recording it stays silent
    quiet: bool = False


def _note_first_event(record, first) -> None:
    """Record what a stream's first event (its message_start) says: usage so far and the model."""
    record.usage(usage_from_event(first.data))
    record.actual_model = model_from_message(first.data)


class Attempt:
    """Tries one account once for one request; :meth:`run` returns the :data:`Outcome`.

    Built by the dispatcher for each request, from its current collaborators and settings (a
    reload may replace them between requests).
    """

    def __init__(self, *, clock: IReactorTime, upstream, pool, store, shaping: CloakingPipeline,
                 quotas=None, passthrough: bool = False, upstream_timeout: float = 600.0,
                 error_body_limit: int = 1024 * 1024, max_response_bytes: int = 256 * 1024 * 1024,
                 streams: Optional[Set[StreamRelay]] = None):
        self.clock = clock
        self.upstream = upstream
        self.pool = pool
        self.store = store
        self.shaping = shaping
        self.quotas = quotas
        self.passthrough = passthrough
        self.upstream_timeout = upstream_timeout
        self.error_body_limit = error_body_limit
        self.max_response_bytes = max_response_bytes
        #: the streams being relayed right now (the dispatcher's set, shown by /status)
        self.streams: Set[StreamRelay] = streams if streams is not None else set()

    async def run(self, request, out, account: Account, deadline: float) -> Outcome:
        """Send ``request`` to ``account`` (before ``deadline``, clock seconds) and say what happened."""
        # sent in this same turn of the reactor (nothing is awaited before the send): the pool
        # needs it so that a success ends only a cooldown decided before the request left
        sent_at = self.clock.seconds()
        heard = await self._hear(request, out, account, deadline, sent_at)
        if isinstance(heard, Answered):
            return heard  # the client left before any verdict: nothing to record
        if heard.verdict.action == policy.SUCCESS and heard.deliver is not None:
            # a success changes nothing the answer depends on: the answer leaves first (a whole
            # message, or a stream's commit and what it held), then the try is recorded while the
            # rest is delivered; the client waits for neither (with a shared store, a round trip)
            delivering: defer.Deferred = defer.ensureDeferred(heard.deliver())
            self._note_attempt(request, account, heard)
            recording = defer.ensureDeferred(self.pool.record(account, heard.verdict, sent_at=sent_at))
            try:
                return await delivering
            finally:
                await recording
        self._note_attempt(request, account, heard)
        await self.pool.record(account, heard.verdict, sent_at=sent_at)
        if heard.verdict.action != policy.SUCCESS and not heard.quiet:
            log.info("{line}", line=heard.verdict.describe(account.name))
        if heard.deliver is not None:
            return await heard.deliver()
        assert heard.failure is not None
        if heard.verdict.action == policy.REFRESH:
            return RefreshAndRetry(heard.verdict, heard.failure)
        return NextAccount(heard.verdict, heard.failure)

    @staticmethod
    def _note_attempt(request, account: Account, heard: _Heard) -> None:
        # the one place a try's verdict is written to the record
        request.record.attempt(account_name=account.name, provider="anthropic", model=request.model,
                               status=heard.verdict.status, verdict=heard.verdict)

    async def _hear(self, request, out, account: Account, deadline: float,
                    now: float) -> Union[_Heard, Answered]:
        """Send (``now``, clock seconds), read what decides the verdict, classify it.

        The account's backoff level is read only for a verdict that is not a success (a success
        resets it): one store read fewer on the common path, a Redis round trip with shared state.
        """
        timeout = max(0.001, min(self.upstream_timeout, deadline - now))
        url = (account.base_url.rstrip("/").encode("utf-8") + request.path + request.query)
        # (shaping drops the client's trace headers: the proxy's own span is the upstream's parent)
        headers, body = self.shaping.shape_pairs(request.headers, account, request.body)
        headers += request.record.outbound_headers()  # also starts the attempt's clock
        sending = self.upstream.send(request.method, url, headers, body, timeout, self.clock)
        out.on_disconnect(sending.cancel)
        try:
            response = await sending
        except UpstreamError as e:
            return _network(account, e, await self.pool.backoff_level(account))
        except Exception:
            if out.disconnected:
                return Answered(CLIENT_GONE)  # cancelled because the client went away
            raise
        status = response.code
        host = _host(account.base_url)
        if self.quotas is not None and has_quota_headers(response.headers):
            self.quotas.note(account.key, response.headers)
        if 200 <= status < 300 and request.stream and is_event_stream(response.headers):
            return await self._hear_stream(request, out, account, response, deadline)
        limit = self.max_response_bytes if 200 <= status < 300 else self.error_body_limit
        try:
            body = await self._read(response, limit, out, host)
        except UpstreamError as e:  # body cut short: nothing reached the client yet
            return _network(account, e, await self.pool.backoff_level(account))
        except defer.CancelledError:
            return Answered(CLIENT_GONE)
        if 200 <= status < 300:
            return await self._hear_message(request, out, account, response, body)
        verdict = policy.classify(status, header_dict(response.headers), body, now=self.clock.seconds(),
                                  backoff_level=await self.pool.backoff_level(account), is_oauth=account.is_oauth)
        request.record.response_body(status, response.headers, body, streamed=False)
        kept = downstream_headers(response.headers)
        if verdict.action == policy.RETURN or (self.passthrough and verdict.action != policy.REFRESH):
            return _Heard(verdict, deliver=_sending(out, status, kept, body))
        return _Heard(verdict, failure=Failure(account.key, status, kept, body))

    async def _hear_message(self, request, out, account: Account, response, body: bytes) -> _Heard:
        """A whole 2xx answer: relayed, unless it is an empty or unparsable "success"."""
        status = response.code
        unusable = policy.classify_unusable_answer(status, _content_type(response.headers), body)
        if unusable is not None:
            # transient, like a network error (even in passthrough mode: relaying it would tell
            # the client a failure was an answer)
            message = f"upstream {_host(account.base_url)} returned {unusable}"
            level = await self.pool.backoff_level(account)
            return _Heard(policy.unusable_answer(status, message, backoff_level=level),
                          failure=Failure(account.key, network=UpstreamError("network", message)))
        record = request.record

        async def deliver() -> Answered:
            out.send(status, downstream_headers(response.headers), body)
            # read for the record once the client has its answer (the summary is written later)
            record.usage(usage_from_message(body))
            record.actual_model = model_from_message(body)
            record.response_body(status, response.headers, body, streamed=False)
            return Answered(RELAYED)

        return _Heard(self._success(status, account), deliver=deliver)

    async def _hear_stream(self, request, out, account: Account, response, deadline: float) -> _Heard:
        """A 2xx event stream: judged by its first event (outside passthrough mode), then relayed.

        The wait for the first event is bounded by what is left of the request's ``deadline``
        too (nothing has reached the client: past it, the loop has no time for another account);
        once committed, a stream is bounded by ``upstream_timeout`` of silence alone.
        """
        first_event_timeout = None
        if not self.passthrough:  # (passthrough commits at once: the stream is the client's)
            first_event_timeout = max(0.001, min(self.upstream_timeout, deadline - self.clock.seconds()))
        relay = StreamRelay(self.clock, self.upstream_timeout, _host(account.base_url), first_event_timeout)
        response.deliverBody(relay)
        out.on_disconnect(relay.abort)
        if not self.passthrough:
            try:
                first = await relay.first_event
            except FirstEventFailed as e:
                verdict = policy.classify_network_error(
                    str(e), backoff_level=await self.pool.backoff_level(account))
                log.warn("{line}", line=verdict.describe(account.name))  # its detail says why
                return _Heard(verdict, quiet=True,
                              failure=Failure(account.key, network=UpstreamError("network", str(e))))
            if first.name == "error":
                # e.g. an OAuth 401 sent as an error event: refreshed like a 401 status
                relay.abort()
                status = _status_for_error_event(first.data)
                verdict = policy.classify(status, {}, first.data.encode("utf-8"), now=self.clock.seconds(),
                                          backoff_level=await self.pool.backoff_level(account),
                                          is_oauth=account.is_oauth)
                return _Heard(verdict, failure=Failure(account.key, status, [(b"content-type", [b"application/json"])],
                                                       first.data.encode("utf-8")))
            _note_first_event(request.record, first)
        else:
            # committed at once, but its first event is still read as it passes: a message_start's
            # input and cache counts are nowhere else in a long stream. A stream that breaks first
            # is judged by the relay's end, so a failure here is nobody's to report
            record = request.record
            relay.first_event.addCallbacks(lambda first: _note_first_event(record, first), lambda _: None)
        return _Heard(self._success(response.code, account),
                      deliver=lambda: self._relay(request, out, account, response, relay))

    async def _relay(self, request, out, account: Account, response, relay: StreamRelay) -> Answered:
        """Commit the stream to the client and relay it to its end (or its truncation)."""
        out.start(response.code, downstream_headers(response.headers))
        out.register_producer(relay.producer())
        write = request.record.tee(out.write, status=response.code, headers=response.headers)
        # when nothing captures the body, the upstream's chunks may be relayed as they are
        relay.commit(write, getattr(out, "chunked_body", None) if write == out.write else None)
        self.streams.add(relay)
        try:
            ended = await relay.done
        finally:
            self.streams.discard(relay)
        out.unregister_producer()
        record = request.record
        tail = relay.tail
        record.usage(usage_from_sse_tail(tail))
        if ended.truncated:
            record.truncated, record.error = True, ended.reason
            if b'"message_delta"' not in tail:
                # cut before its final usage (the client hung up, the upstream broke): the output
                # count is message_start's placeholder, yet every token relayed was generated and
                # billed; a key's budget is charged at least what the relayed bytes must have held
                record.output_at_least(relay.bytes_relayed // BYTES_PER_STREAMED_TOKEN)
        how = STREAMED
        if ended.truncated and out.disconnected:
            how = CLIENT_GONE
        elif ended.truncated:
            log.warn("stream truncated account={account}: {reason}", account=account.name,
                     reason=ended.reason)
            out.write(error_event(ended.reason))  # after the open chunk relayed as it came, if any
            await self.store.incr("truncated_streams")
            how = TRUNCATED
        out.finish()
        return Answered(how)

    def _success(self, status: int, account: Account) -> policy.Verdict:
        # a 2xx resets the backoff level whatever it was, so it is not read for one
        return policy.classify(status, {}, b"", now=self.clock.seconds(), backoff_level=0,
                               is_oauth=account.is_oauth)

    async def _read(self, response, limit: int, out, host: str) -> bytes:
        """The whole body; raises ``UpstreamError`` when the upstream cut it short or stayed silent
        for ``upstream_timeout`` (a timeout, as the send's: the next account, or a 504),
        ``CancelledError`` when the client went away."""
        reading = read_body(response, limit, host, self.clock, self.upstream_timeout)
        out.on_disconnect(reading.cancel)
        return await reading


#: The output tokens a stream cut before its final usage is charged: one per this many bytes
#: relayed. A content_block_delta event takes ~100 bytes of SSE around its text and carries at
#: least one token (usually several), so past its first deltas the estimate is a floor; a stream
#: cut before them is charged a few tokens for its opening events (~650 bytes).
BYTES_PER_STREAMED_TOKEN = 100


def _network(account: Account, error: UpstreamError, level: int) -> _Heard:
    """A try that failed before anything reached the client: no cooldown, next account."""
    return _Heard(policy.classify_network_error(error.what, backoff_level=level),
                  failure=Failure(account.key, network=error))


def _sending(out, status: int, headers: HeaderList, body: bytes) -> Callable[[], Coroutine[Any, Any, Answered]]:
    async def deliver() -> Answered:
        out.send(status, headers, body)
        return Answered(RELAYED)
    return deliver


def downstream_headers(response_headers: Headers) -> HeaderList:
    """The upstream response headers a client should see (end-to-end ones, in order)."""
    kept = []
    for name, values in response_headers.getAllRawHeaders():
        lower = name.lower()
        if lower in DROP_DOWNSTREAM:
            continue
        kept.append((name, values))
    return kept


def header_dict(response_headers: Headers) -> dict:
    """Lower-cased header names to their (first) value as text, for classification."""
    return {name.lower().decode("latin-1"): values[0].decode("latin-1")
            for name, values in response_headers.getAllRawHeaders() if values}


def is_event_stream(response_headers: Headers) -> bool:
    """True when the upstream answered with ``text/event-stream``."""
    values = response_headers.getRawHeaders(b"content-type") or [b""]
    return values[0].split(b";")[0].strip().lower() == b"text/event-stream"


def _status_for_error_event(data: str) -> int:
    """The HTTP status an ``event: error`` stands for, by its error type (overloaded -> 529)."""
    try:
        kind = json.loads(data)["error"]["type"]
    except Exception:
        return 502
    for status in (429, 529, 500, 504, 401, 403, 400, 404, 413):
        if error_type_for(status) == kind:
            return status
    return 502


def _host(base_url: str) -> str:
    """``host[:port]`` of a base URL, without any ``user:password@`` (it would be a secret)."""
    return base_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]


def _content_type(response_headers: Headers) -> Optional[str]:
    values = response_headers.getRawHeaders(b"content-type")
    return values[0].decode("latin-1") if values else None
