"""One request's journey: pick an account, send, classify the answer, retry or fail over.

The dispatcher owns the loop the design card draws: for each candidate account it refreshes the
token when needed, shapes the request, sends the raw body, classifies the response and either
answers the client or moves on. When every account is cooling it walks the fallback hook, and
otherwise answers with a truthful error (a 429 whose Retry-After is the earliest recovery).
"""

import json
import math
import re
import time
import uuid
from typing import Callable, List, Optional, Sequence, Tuple

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from clproxy.observe.console import logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from clproxy.routing import policy
from clproxy.accounts.model import Account
from clproxy.routing.quota import has_quota_headers
from clproxy.proxy.shaping import HOP_BY_HOP, CloakingPipeline
from clproxy.routing.router import Target
from clproxy.translate.claude import strip_foreign_thinking
from clproxy.errors import ProxyError, error_event, error_type_for
from clproxy.interfaces import IResponseSink
from clproxy.observe.recorder import (TRACE_HEADERS, Observability, model_from_message, usage_from_event,
                               usage_from_message, usage_from_sse_tail)
from clproxy.proxy.upstream import FirstEventFailed, StreamRelay, UpstreamError, read_body

log = logger(__name__)

# What a client must not see of the upstream's answer: hop-by-hop headers, and what twisted.web
# sets itself for the proxy's own connection.
DROP_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"date"}
NO_ACCOUNT_HELP = (
    "clproxy has no Anthropic account to use. Add one with `clproxy auth login anthropic`, "
    "set ANTHROPIC_API_KEY in the proxy's environment (or its --env-file), or list accounts under "
    "accounts.anthropic in {config}, then retry."
)


@attr.s(auto_attribs=True, slots=True)
class ProxyRequest:
    """What the dispatcher needs of an incoming request; ``body`` is kept byte for byte."""

    method: bytes
    path: bytes  # e.g. b"/v1/messages"
    query: bytes  # b"" or b"?beta=true"
    headers: List[Tuple[bytes, bytes]]  # raw, in the client's order
    body: Optional[bytes]
    model: Optional[str] = None
    stream: bool = False
    request_id: str = attr.ib(factory=lambda: "req_clp_" + uuid.uuid4().hex[:24])
    #: the path the client called when it is not ``path`` (the OpenAI front door translates
    #: ``/v1/chat/completions`` into ``/v1/messages``); logs and metrics name this one
    client_path: Optional[bytes] = None
    #: the clproxy.observe.recorder.RequestRecord of this request (set by Dispatcher.forward; the
    #: translation path reads it here). Never on the response sink.
    record: object = attr.ib(default=None, eq=False, repr=False)


@attr.s(frozen=True, auto_attribs=True)
class DispatchSettings:
    """The knobs of the retry loop (from config and command-line options)."""

    passthrough: bool = False
    upstream_timeout: float = 600.0
    request_deadline: float = 900.0
    error_body_limit: int = 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    max_refresh_retries: int = 5
    config_path: str = "~/.clproxy/proxy-config.yaml"


def downstream_headers(response_headers: Headers) -> List[Tuple[bytes, List[bytes]]]:
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


@implementer(IResponseSink)
class TimedSink:
    """``out`` as the dispatcher uses it: the same sink, telling ``record`` when the first byte goes out.

    The time to first byte belongs to the request's record, not to the sink; wrapping keeps every
    sink (and the translation and fallback paths, which write to it too) free of recording.
    ``write`` and the other per-chunk calls are the inner sink's own bound methods: a stream's
    hot path pays nothing for the wrapper.
    """

    def __init__(self, out, record):
        self._out = out
        self._record = record
        self.write = out.write
        self.finish = out.finish
        self.on_disconnect = out.on_disconnect
        self.register_producer = out.register_producer
        self.unregister_producer = out.unregister_producer

    @property
    def disconnected(self) -> bool:
        return self._out.disconnected

    @property
    def started(self) -> bool:
        return self._out.started

    @property
    def status(self) -> Optional[int]:
        return self._out.status

    def _first_byte(self) -> None:
        if not self._out.disconnected and not self._out.started:
            self._record.first_byte()

    def start(self, status: int, headers) -> None:
        self._first_byte()
        self._out.start(status, headers)

    def send(self, status: int, headers, body: bytes) -> None:
        self._first_byte()
        self._out.send(status, headers, body)

    def send_error(self, error: ProxyError) -> None:
        self._first_byte()
        self._out.send_error(error)


class _Answered(Exception):
    """Internal: the attempt has answered the client (nothing more to do)."""


@attr.s(auto_attribs=True)
class _Failure:
    """The last failure seen in the loop, kept to answer truthfully when no account succeeds."""

    status: Optional[int] = None
    headers: Optional[List[Tuple[bytes, List[bytes]]]] = None
    body: Optional[bytes] = None
    network: Optional[UpstreamError] = None
    #: statuses of the upstream answers this request got, in order
    statuses: List[int] = attr.ib(factory=list)
    #: keys of the accounts those answers came from
    accounts: set = attr.ib(factory=set)


class Dispatcher:
    """Forwards Claude Messages API requests through the account pool."""

    def __init__(self, *, clock: IReactorTime, upstream, pool, store,
                 accounts: Callable[[], Sequence[Account]], settings: DispatchSettings = DispatchSettings(),
                 refresher=None, fallback=None, shaping: Optional[CloakingPipeline] = None,
                 router=None, translation=None, quotas=None,
                 on_refreshed: Optional[Callable[[Account], None]] = None,
                 observability: Optional[Observability] = None):
        self.clock = clock
        #: request logs, metrics and traces (metrics only when none is given)
        self.obs = observability if observability is not None else Observability(clock=clock, logs_dir=None)
        self.upstream = upstream
        self.pool = pool
        self.store = store
        self.accounts = accounts
        self.settings = settings
        self.refresher = refresher
        self.shaping = shaping or CloakingPipeline()
        #: clproxy.routing.router.Router; None means every model is passthrough
        self.router = router
        #: clproxy.providers.translation.Translation, for models mapped to another provider
        self.translation = translation
        #: async (request, out, exhausted_error) -> bool; True when a fallback answered the client.
        self.fallback = fallback
        #: clproxy.routing.quota.QuotaBook: unified rate-limit headers captured per account
        self.quotas = quotas
        #: told about an account that came back from a refresh with a new token
        self.on_refreshed = on_refreshed
        #: the streams being relayed right now (for /status, draining and tests)
        self.streams = set()

    async def forward(self, request: ProxyRequest, out) -> None:
        """Answer ``request`` through ``out`` (any :class:`clproxy.interfaces.IResponseSink`).

        The request's record is made here and stays with the dispatcher (``request.record``): the
        sink is wrapped so the record hears of the first byte, and never holds the record itself.
        """
        record = request.record = self.obs.begin(
            request_id=request.request_id, method=request.method,
            path=request.client_path or request.path, model=request.model,
            stream=request.stream, headers=request.headers, body=request.body)
        out = TimedSink(out, record)
        try:
            await self._forward(request, out)
        except ProxyError as e:
            record.error = e.message
            out.send_error(e)
        except BaseException as e:
            record.error = f"internal error: {type(e).__name__}"
            raise
        finally:
            # 499: the client went away before any answer (nginx's "client closed request")
            record.finish(status=out.status if out.status is not None else (500 if record.error else 499))
            await self.store.incr("completed_requests")

    async def _forward(self, request: ProxyRequest, out) -> None:
        if self.router is not None and request.model:
            route = self.router.route(request.model)
            if route.translated:
                if self.translation is None:
                    raise ProxyError(500, f"model {request.model} is mapped to {route.provider}, "
                                          "but translation is not available")
                request.record.provider = route.provider
                await self.translation.answer(request, out, Target(route.provider, route.model), final=True)
                return
            if not route.passthrough:
                request = with_model(request, route.model)
        if request.body and _FOREIGN_SIGNATURE.search(request.body):
            request = without_foreign_thinking(request)
        accounts = list(self.accounts())
        enabled = [a for a in accounts if a.enabled]
        if not enabled:
            raise self._no_account_error(accounts)
        if self.settings.passthrough:
            candidates = (await self.pool.candidates(enabled))[:1] or enabled[:1]
        else:
            candidates = await self.pool.candidates(enabled)
        deadline = self.clock.seconds() + self.settings.request_deadline
        last = _Failure()
        for account in candidates:
            if out.disconnected:
                return
            if self.clock.seconds() >= deadline:
                break
            if not self.settings.passthrough and not await self.pool.admit(account):
                continue
            try:
                await self._try_account(request, out, account, deadline, last)
            except _Answered:
                return
            if self.settings.passthrough:
                break
        if out.disconnected:
            return
        await self._exhausted(request, out, enabled, last)

    async def _try_account(self, request, out, account: Account, deadline: float, last: _Failure) -> None:
        """Try one account, with its OAuth refresh retries; raises ``_Answered`` once the client has its answer."""
        refreshes = 0
        force = False
        while True:
            if account.is_oauth and self.refresher is not None:
                try:
                    refreshed = await self.refresher.fresh(account, force=force)
                    if refreshed is not account:
                        request.record.refresh(account.name, True)
                        if self.on_refreshed is not None:
                            self.on_refreshed(refreshed)
                    account = refreshed
                except Exception as e:  # refresh failed: this account cannot be used now
                    request.record.refresh(account.name, False)
                    log.warn("<- refresh-failed account={account} reason={reason}",
                             account=account.name, reason=_safe_reason(e))
                    await self.pool.cool(account, policy.AUTH_COOLDOWN)  # no upstream attempt was made
                    return
            verdict = await self._send(request, out, account, deadline, last)
            if verdict is None or verdict.action != policy.REFRESH:
                return
            if self.refresher is None or refreshes >= self.settings.max_refresh_retries:
                # no refresh possible (or retries spent): only now does the 401 cool the account
                await self.pool.cool(account, policy.unrefreshable(verdict).cooldown)
                return
            refreshes += 1
            force = True

    async def _send(self, request, out, account: Account, deadline: float, last: _Failure):
        """One upstream attempt. Returns the verdict when the loop should go on, raises ``_Answered`` otherwise."""
        level = await self.pool.backoff_level(account)
        timeout = max(0.001, min(self.settings.upstream_timeout, deadline - self.clock.seconds()))
        url = (account.base_url.rstrip("/").encode("utf-8") + request.path + request.query)
        headers, body = self.shaping.shape(request.headers, account, request.body)
        for name in TRACE_HEADERS:  # the proxy's own span is the upstream's parent
            headers.removeHeader(name)
        for name, value in request.record.outbound_headers():  # also starts the attempt's clock
            headers.setRawHeaders(name, [value])
        sending = self.upstream.send(request.method, url, headers, body, timeout, self.clock)
        out.on_disconnect(sending.cancel)
        try:
            response = await sending
        except UpstreamError as e:
            return await self._network_failure(request, account, e, level, last)
        except Exception:
            if out.disconnected:
                raise _Answered()  # cancelled because the client went away; nobody to answer
            raise
        status = response.code
        passthrough = self.settings.passthrough
        host = _host(account.base_url)
        if self.quotas is not None and has_quota_headers(response.headers):
            self.quotas.note(account.key, response.headers)
        if 200 <= status < 300:
            if request.stream and is_event_stream(response.headers):
                # the verdict of a stream that failed before its first event (an OAuth 401 sent
                # as an error event must be refreshed like a 401 status), or raises _Answered
                return await self._relay_stream(request, out, account, response, level, last)
            try:
                body = await self._read(response, self.settings.max_response_bytes, out, host)
            except UpstreamError as e:  # body cut short: nothing reached the client yet
                return await self._network_failure(request, account, e, level, last)
            unusable = policy.classify_unusable_answer(status, _content_type(response.headers), body)
            if unusable is not None:
                # an empty or unparsable "success": transient, like a network error (even in
                # passthrough mode: relaying it would tell the client a failure was an answer)
                message = f"upstream {host} returned {unusable}"
                verdict = policy.unusable_answer(status, message, backoff_level=level)
                await self._record(request, account, verdict)
                last.network, last.status = UpstreamError("network", message), None
                return verdict
            await self._record(request, account, policy.classify(status, {}, b"", now=self.clock.seconds(),
                                                                 backoff_level=level, is_oauth=account.is_oauth))
            record = request.record
            record.usage(usage_from_message(body))
            record.actual_model = model_from_message(body)
            record.response_body(status, response.headers, body, streamed=False)
            out.send(status, downstream_headers(response.headers), body)
            raise _Answered()
        try:
            body = await self._read(response, self.settings.error_body_limit, out, host)
        except UpstreamError as e:
            return await self._network_failure(request, account, e, level, last)
        verdict = policy.classify(status, header_dict(response.headers), body, now=self.clock.seconds(),
                                  backoff_level=level, is_oauth=account.is_oauth)
        await self._record(request, account, verdict)
        request.record.response_body(status, response.headers, body, streamed=False)
        if verdict.action == policy.RETURN or (passthrough and verdict.action != policy.REFRESH):
            out.send(status, downstream_headers(response.headers), body)
            raise _Answered()
        last.status, last.headers, last.body, last.network = (
            status, downstream_headers(response.headers), body, None)
        last.statuses.append(status)
        last.accounts.add(account.key)
        return verdict

    async def _network_failure(self, request, account: Account, error: UpstreamError, level: int,
                               last: _Failure):
        """An attempt that failed before anything reached the client: no cooldown, next account."""
        verdict = policy.classify_network_error(error.what, backoff_level=level)
        await self._record(request, account, verdict)
        last.network, last.status = error, None
        return verdict

    async def _read(self, response, limit: int, out, host: str) -> bytes:
        """The whole body; raises ``UpstreamError`` when the upstream cut it short."""
        reading = read_body(response, limit, host)
        out.on_disconnect(reading.cancel)
        try:
            return await reading
        except defer.CancelledError:
            raise _Answered()

    async def _relay_stream(self, request, out, account, response, level, last) -> None:
        relay = StreamRelay(self.clock, self.settings.upstream_timeout, _host(account.base_url))
        response.deliverBody(relay)
        out.on_disconnect(relay.abort)
        if not self.settings.passthrough:
            try:
                first = await relay.first_event
            except FirstEventFailed as e:
                verdict = policy.classify_network_error(str(e), backoff_level=level)
                log.warn("{line}", line=verdict.describe(account.name))  # its detail says why
                await self._record(request, account, verdict, quiet=True)
                last.network, last.status = UpstreamError("network", str(e)), None
                return verdict
            if first.name == "error":
                relay.abort()
                verdict = _classify_error_event(first.data, self.clock.seconds(), level, account)
                await self._record(request, account, verdict)
                body = first.data.encode("utf-8")
                last.status = _status_for_error_event(first.data)
                last.headers = [(b"content-type", [b"application/json"])]
                last.body, last.network = body, None
                last.statuses.append(last.status)
                last.accounts.add(account.key)
                return verdict
            record = request.record
            record.usage(usage_from_event(first.data))
            record.actual_model = model_from_message(first.data)
        await self._record(request, account, policy.classify(response.code, {}, b"", now=self.clock.seconds(),
                                                             backoff_level=level, is_oauth=account.is_oauth))
        out.start(response.code, downstream_headers(response.headers))
        out.register_producer(relay.producer())
        relay.commit(request.record.tee(out.write, status=response.code, headers=response.headers))
        self.streams.add(relay)
        try:
            outcome = await relay.done
        finally:
            self.streams.discard(relay)
        out.unregister_producer()
        record = request.record
        record.usage(usage_from_sse_tail(relay.tail))
        if outcome.truncated:
            record.truncated, record.error = True, outcome.reason
        if outcome.truncated and not out.disconnected:
            log.warn("stream truncated account={account}: {reason}", account=account.name,
                     reason=outcome.reason)
            out.write(error_event(outcome.reason))
            await self.store.incr("truncated_streams")
        out.finish()
        raise _Answered()

    async def _record(self, request: ProxyRequest, account: Account, verdict, quiet: bool = False) -> None:
        request.record.attempt(account_name=account.name, provider="anthropic", model=request.model,
                               status=verdict.status, verdict=verdict)
        await self.pool.record(account, verdict)
        if verdict.action != policy.SUCCESS and not quiet:
            log.info("{line}", line=verdict.describe(account.name))

    async def _exhausted(self, request, out, enabled: Sequence[Account], last: _Failure) -> None:
        """No account answered: fall back, or answer with the most truthful error there is."""
        cooling = await self.pool.cooling(enabled)
        if last.statuses and all(s in (401, 402, 403) for s in last.statuses) \
                and last.accounts >= {a.key for a in enabled}:
            # every account rejected its credential just now (an OAuth one even after its refresh
            # retries, which add answers, hence accounts and not a count): Anthropic's own answer
            # is the truth, a 429 would send the client into a pointless wait
            out.send(last.status, last.headers or [], last.body or b"")
            return
        if len(cooling) == len(enabled) or (last.status is None and last.network is None):
            exhausted = await self._pool_exhausted_error(enabled, cooling)
            if self.fallback is not None and not self.settings.passthrough:
                if await self.fallback(request, out, exhausted):
                    return
            raise exhausted
        if last.status is not None:
            out.send(last.status, last.headers or [], last.body or b"")
            return
        status = 504 if last.network.kind == "timeout" else 502
        raise ProxyError(status, last.network.message)

    async def _pool_exhausted_error(self, enabled, cooling) -> ProxyError:
        """429 with a Retry-After that is the truth: whole seconds until the first account is usable."""
        now = self.clock.seconds()
        earliest = await self.pool.earliest_recovery(enabled)
        wait = max(1, int(math.ceil(earliest - now))) if earliest is not None else 1
        rows = await self.pool.snapshot(enabled)
        reasons = "; ".join(f"{row['name']}: {row['last_error']}" for row in rows if row.get("last_error"))
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + wait))
        message = (f"all {len(enabled)} accounts are unavailable ({len(cooling)} cooling down, "
                   f"{len(enabled) - len(cooling)} at their rateLimit); the first is usable again "
                   f"in {wait}s (at {at})")
        if reasons:
            message += f". Last errors: {reasons}"
        return ProxyError(429, message[:2000], "rate_limit_error",
                          headers=[(b"retry-after", str(wait).encode())])

    def _no_account_error(self, accounts: Sequence[Account]) -> ProxyError:
        if accounts:
            return ProxyError(401, f"every account of clproxy is disabled ({len(accounts)} known); "
                                   "re-enable one with `clproxy auth enable LABEL` or log in again",
                              "authentication_error")
        return ProxyError(401, NO_ACCOUNT_HELP.format(config=self.settings.config_path),
                          "authentication_error")


# A thinking block a fallback provider produced has an empty or "gemini:" signature; Anthropic
# rejects the conversation with it ("Invalid signature in thinking block"). The byte search keeps
# the common case (no such block) free of any parsing.
_FOREIGN_SIGNATURE = re.compile(rb'"signature"\s*:\s*"(?:gemini:|")')


def without_foreign_thinking(request: ProxyRequest) -> ProxyRequest:
    """The request without thinking blocks made by another provider (re-encoded only if one is found)."""
    try:
        parsed = json.loads(request.body)
    except ValueError:
        return request
    cleaned = strip_foreign_thinking(parsed)
    if cleaned is parsed:
        return request
    body = json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return attr.evolve(request, body=body)


def with_model(request: ProxyRequest, model: str) -> ProxyRequest:
    """The request with its ``model`` renamed (an explicit model mapping within Anthropic).

    The body is re-encoded, so its bytes change: the price of a rename the config asked for.
    """
    parsed = json.loads(request.body)
    parsed["model"] = model
    body = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return attr.evolve(request, body=body, model=model)


def _classify_error_event(data: str, now: float, level: int, account: Account):
    return policy.classify(_status_for_error_event(data), {}, data.encode("utf-8"), now=now,
                           backoff_level=level, is_oauth=account.is_oauth)


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


def _safe_reason(error: Exception) -> str:
    """The type and message of an error; credential-layer errors never carry tokens."""
    return f"{type(error).__name__}: {error}"
