"""Translation mode: answer a Claude Messages request through OpenAI or Gemini.

:class:`Translation` sends the translated request, turns the provider's answer (whole or streamed)
back into Claude's shapes and writes it to the client's ``out``. It serves models mapped to a
provider (``final=True``: every failure is an answer) and the fallback chain (``final=False``: a
failure before anything was written lets the next fallback try).
"""

import json
from typing import Callable, List, Optional, Tuple

from twisted.internet import defer, protocol
from twisted.web._newclient import ResponseDone
from twisted.web.http import PotentialDataLoss

from clproxy import jsoncodec
from clproxy.proxy import sse
from clproxy.errors import ProxyError, error_type_for
from clproxy.observe.console import logger
from clproxy.providers.clients import ProviderError, build_providers
from clproxy.translate.claude import EmptyStreamError, TranslationError, encode_sse
from clproxy.proxy.upstream import UpstreamError, read_body

__all__ = ["Translation", "TranslatedStream", "MAX_RESPONSE_BYTES"]

log = logger(__name__)

#: Bound on a whole (non-streaming) provider answer.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

EVENT_STREAM = [b"text/event-stream; charset=utf-8"]
JSON = [b"application/json"]

# Events that carry nothing of the answer yet: a stream is only committed after something else,
# so a provider that opens and then fails can still be skipped in the fallback chain.
_PRELUDE = ("message_start", "ping")
_EPSILON = 1e-6


class _NotAnswered(Exception):
    """Internal: the provider failed before anything was written; ``error`` is what a client would get."""

    def __init__(self, error: ProxyError, reason: str):
        super().__init__(reason)
        self.error = error
        self.reason = reason


class Translation:
    """Serves Claude requests through the providers in ``config.providers``."""

    def __init__(self, *, clock, upstream, providers, keepalive_interval: float = 15.0,
                 upstream_timeout: float = 600.0, store=None):
        self.clock = clock
        self.upstream = upstream
        self.clients = build_providers(providers, upstream)
        self.keepalive_interval = keepalive_interval
        self.upstream_timeout = upstream_timeout
        self.store = store
        #: streams being translated right now (for draining and tests)
        self.streams = set()

    # -- the two entry points ---------------------------------------------------------------
    async def answer(self, request, out, target, *, final: bool) -> bool:
        """Answer ``request`` (a ``dispatch.ProxyRequest``) from ``target``; see the module docstring.

        Returns True when the client has its answer (or went away), False when ``final`` is False and
        the provider failed before anything was written to ``out``.
        """
        if out.disconnected:
            return True
        where = f"{target.provider}/{target.model}"
        record = getattr(request, "record", None)
        if record is not None:
            record.outbound_headers()  # starts this attempt's timer
        try:
            client, prepared = self._prepare(request, target)
            if request.stream:
                await self._stream(request, out, target, client, prepared)
            else:
                await self._message(request, out, target, client, prepared)
            if record is not None:
                record.provider, record.account = target.provider, None  # no Claude account answered
                record.attempt(account_name=None, provider=target.provider, model=target.model,
                               status=200, verdict=None)
            return True
        except _NotAnswered as e:
            if record is not None:
                record.attempt(account_name=None, provider=target.provider, model=target.model,
                               status=e.error.status, verdict=None)
            if out.disconnected:
                return True
            if final:
                log.warn("<- {where} failed: {reason}", where=where, reason=e.reason)
                out.send_error(e.error)
                return True
            log.warn("fallback {where} did not answer: {reason}", where=where, reason=e.reason)
            return False
        except defer.CancelledError:
            return True  # the client went away; nobody to answer

    def reconfigure(self, providers) -> None:
        """Use new provider settings (a config reload); requests already running keep their client."""
        self.clients = build_providers(providers, self.upstream)

    def fallback_hook(self, chain) -> Callable:
        """The Dispatcher's ``fallback``: try ``chain`` (router.Target, in order) until one answers.

        ``chain`` is a sequence, or a callable returning the chain in force (read per request, so a
        config reload that changes it needs no new hook).
        """
        current = chain if callable(chain) else (lambda fixed=tuple(chain): fixed)

        async def fallback(request, out, exhausted) -> bool:
            if not _is_messages(request):
                return False  # count_tokens, /v1/models: the pool's own answer is the truth
            for target in tuple(current()):
                if out.disconnected:
                    return True
                if await self.answer(request, out, target, final=False):
                    log.info("fallback answered by {provider}/{model} ({why})",
                             provider=target.provider, model=target.model, why=exhausted.message[:200])
                    return True
            return False

        return fallback

    # -- preparing and sending --------------------------------------------------------------
    def _prepare(self, request, target):
        client = self.clients.get(target.provider)
        if client is None:
            raise _NotAnswered(ProxyError(500, f"clproxy cannot translate to provider {target.provider!r}"),
                               "unknown provider")
        if not _is_messages(request):
            path = request.path.decode("latin-1", "replace")
            raise _NotAnswered(ProxyError(400, f"{path} is not available for model {request.model} "
                                               f"(served by {target.provider} through translation)"),
                               f"{path} cannot be translated")
        try:
            claude = json.loads(request.body)
            return client, client.prepare(claude, target.model, request.stream)
        except TranslationError as e:
            raise _NotAnswered(ProxyError(400, f"{e.message} (the request cannot be translated for "
                                               f"{target.provider} model {target.model})"), e.message)
        except ProviderError as e:
            raise _NotAnswered(ProxyError(500, e.message), e.message)
        except (ValueError, TypeError, AttributeError) as e:
            raise _NotAnswered(ProxyError(400, f"the request cannot be translated: {e}"), str(e))

    async def _send(self, out, client, prepared):
        sending = client.send(prepared, self.upstream_timeout, self.clock)
        out.on_disconnect(sending.cancel)
        try:
            return await sending
        except ProviderError as e:
            raise _NotAnswered(_client_error(e), _describe(e))

    def _headers(self, request, target, model: str, content_type) -> List[Tuple[bytes, List[bytes]]]:
        record = getattr(request, "record", None)
        if record is not None:
            record.actual_model = model  # the model that answered, for the summary and metrics
        return [(b"content-type", content_type),
                (b"request-id", [request.request_id.encode()]),
                (b"x-clproxy-provider", [target.provider.encode()]),
                (b"x-clproxy-actual-model", [model.encode("utf-8", "replace")])]

    async def _answered(self, request, target) -> None:
        if self.store is not None and target.model != request.model:
            await self.store.incr("model_substitutions")

    # -- whole answers ----------------------------------------------------------------------
    async def _message(self, request, out, target, client, prepared) -> None:
        response = await self._send(out, client, prepared)
        reading = read_body(response, MAX_RESPONSE_BYTES, client.name, self.clock, self.upstream_timeout)
        out.on_disconnect(reading.cancel)
        try:
            body = await reading
        except UpstreamError as e:
            raise _NotAnswered(ProxyError(504 if e.kind == "timeout" else 502, e.message), e.message)
        try:
            message = client.message(json.loads(body), target.model)
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            why = client.scrub(str(e))  # may quote the provider's own error message
            raise _NotAnswered(ProxyError(502, f"{client.name} sent an answer clproxy cannot translate: {why}"),
                               f"untranslatable answer: {why}")
        record = getattr(request, "record", None)
        if record is not None and isinstance(message.get("usage"), dict):
            record.usage(message["usage"])  # the translated tokens count in the summary and the ledger
        if out.disconnected:
            return
        encoded = jsoncodec.std_dumps(message)  # (a lone surrogate stays escaped: no UnicodeEncodeError)
        out.send(200, self._headers(request, target, message.get("model") or target.model, JSON), encoded)
        await self._answered(request, target)

    # -- streams ----------------------------------------------------------------------------
    async def _stream(self, request, out, target, client, prepared) -> None:
        response = await self._send(out, client, prepared)

        def commit(model: str) -> None:
            out.start(200, self._headers(request, target, model, EVENT_STREAM)
                      + [(b"cache-control", [b"no-cache"])])

        translated = TranslatedStream(
            client.stream_translator(target.model), clock=self.clock, out=out, commit=commit,
            provider=client.name, idle_timeout=self.upstream_timeout,
            keepalive_interval=self.keepalive_interval, scrub=client.scrub,
            on_usage=getattr(getattr(request, "record", None), "usage", None))
        response.deliverBody(translated)
        out.on_disconnect(translated.abort)
        self.streams.add(translated)
        try:
            outcome = await translated.done
        finally:
            self.streams.discard(translated)
        if isinstance(outcome, _NotAnswered):
            raise outcome
        if translated.committed:
            await self._answered(request, target)


class TranslatedStream(protocol.Protocol):
    """Reads a provider's SSE body, translates it chunk by chunk and writes Claude SSE to ``out``.

    Nothing is written until the translation has produced something beyond ``message_start``/``ping``
    (then ``commit(model)`` sends the headers); a provider that fails or ends before that leaves ``out``
    untouched and :attr:`done` fires with a ``_NotAnswered``. Once committed, a failure becomes an
    ``event: error``; ``: keep-alive`` is written after every ``keepalive_interval`` seconds without a
    write, and ``idle_timeout`` seconds of provider silence abort the stream. :attr:`done` fires with
    None when the client has had the whole stream.
    """

    def __init__(self, translator, *, clock, out, commit: Callable[[str], None], provider: str,
                 idle_timeout: float, keepalive_interval: float,
                 on_usage: Optional[Callable[[dict], None]] = None,
                 scrub: Optional[Callable[[str], str]] = None):
        self.translator = translator
        #: takes clproxy's key out of a provider's error message (a provider may echo it)
        self.scrub = scrub
        #: told the translated ``usage`` of message_start and message_delta (later values win)
        self.on_usage = on_usage
        self.clock = clock
        self.out = out
        self._commit = commit
        self.provider = provider
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.done: defer.Deferred = defer.Deferred()
        self.committed = False
        self._parser = sse.SSEParser()
        self._pending: List[tuple] = []
        self._failed: Optional[str] = None  # why the stream is over early (before its end)
        self._finished = False
        self._lost = False
        self._timed_out = False
        self._last_data = clock.seconds()
        self._last_write = None
        self._timer = None

    # -- protocol ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self._schedule()

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._last_data = self.clock.seconds()
        try:
            parsed = self._parser.feed(data)
        except sse.EventTooLarge as e:
            self._stop_early(str(e))
            return
        events = []
        unusable = None
        for event in parsed:
            text = event.data.strip()
            if not text or text == "[DONE]":
                continue
            try:
                chunk = json.loads(text)
            except ValueError:
                unusable = f"{self.provider} sent a stream event that is not JSON"
                break
            if not isinstance(chunk, dict):
                unusable = f"{self.provider} sent a stream event that is not a JSON object"
                break
            events.extend(self.translator.feed(chunk))
        if events:
            # Written even when a later frame of this read is unusable: the translator has moved
            # past them (a block opened, a finish_reason noted), so dropping them would leave the
            # client the rest of a stream without its start or its text.
            self._emit(events)
        if unusable is not None:
            self._stop_early(unusable)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._lost = True
        self._cancel_timer()
        if self._finished:
            return
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if self._failed is None and not clean:
            self._failed = f"{self.provider} broke off the stream: {reason.getErrorMessage()}"
        if self._failed is not None and not getattr(self.translator, "complete", False):
            # A failure before the provider said all of its answer (OpenAI's usage chunk comes after
            # the finish_reason): finishing would pass a cut-short answer, or zero usage, off as real.
            self._end_with_error(self._failed)
            return
        try:
            events = self.translator.finish()
        except EmptyStreamError:
            self._give_up(ProxyError(502, f"{self.provider} ended its stream without sending anything"),
                          "empty stream")
            return
        self._emit(events)
        if not self._finished:
            self._end_with_error(f"{self.provider} ended the stream before its end")

    # -- writing ----------------------------------------------------------------------------
    def _emit(self, events) -> None:
        if self._finished:
            return
        if self.scrub is not None:
            events = [(name, self._scrubbed(data)) if name == "error" else (name, data) for name, data in events]
        if self.on_usage is not None:
            for name, data in events:
                usage = ((data.get("message") or {}).get("usage") if name == "message_start"
                         else data.get("usage") if name == "message_delta" else None)
                if isinstance(usage, dict):
                    self.on_usage(usage)
        if not self.committed:
            self._pending.extend(events)
            error = next((data for name, data in self._pending if name == "error"), None)
            if error is not None:
                message = (error.get("error") or {}).get("message") or "stream error"
                self._give_up(ProxyError(502, f"{self.provider}: {message}"), message)
                return
            if all(name in _PRELUDE for name, _ in self._pending):
                return
            events, self._pending = self._pending, []
            if self.out.disconnected:
                self._finish(None)
                return
            model = next((data["message"].get("model") for name, data in events if name == "message_start"),
                         None) or ""
            self._commit(model)
            self.committed = True
            if self.transport is not None and not self._lost:
                self.out.register_producer(self.transport)
            self._write(b"".join(encode_sse(name, data) for name, data in events))
            if not self._lost:
                self._cancel_timer()  # from now on the timer also serves keep-alives
                self._schedule()
        else:
            self._write(b"".join(encode_sse(name, data) for name, data in events))
        if any(name in ("message_stop", "error") for name, _ in events):
            self._finish(None)

    def _scrubbed(self, data: dict) -> dict:
        """An error event's data with its message scrubbed (the provider's words, from an error chunk)."""
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        return dict(data, error=dict(error, message=self.scrub(str(error.get("message", "")))))

    def _write(self, data: bytes) -> None:
        self._last_write = self.clock.seconds()
        self.out.write(data)

    def _end_with_error(self, message: str) -> None:
        if not self.committed:
            # a provider gone silent before any content is a timeout (504), as one that never answers
            self._give_up(ProxyError(504 if self._timed_out else 502, message), message)
            return
        log.warn("translated stream from {provider} failed after commit: {reason}",
                 provider=self.provider, reason=message)
        self._write(encode_sse("error", {"type": "error", "error": {"type": "api_error", "message": message}}))
        self._finish(None)

    def _give_up(self, error: ProxyError, reason: str) -> None:
        self._pending = []
        self._finish(_NotAnswered(error, reason))

    def _finish(self, outcome) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        if not self._lost:
            self.abort()
        if self.committed:
            self.out.unregister_producer()
            self.out.finish()
        self.done.callback(outcome)

    def _stop_early(self, why: str) -> None:
        """Something unusable arrived: close the provider connection; connectionLost ends the stream."""
        if self._failed is None:
            self._failed = why
        self.abort()
        if self.transport is None:
            self.connectionLost()

    def abort(self) -> None:
        """Close the provider connection (the client went away, or the stream is over)."""
        if not self._lost and self.transport is not None:
            self.transport.stopProducing()

    # -- one timer for both keep-alives (after commit) and the idle timeout --------------------
    def _schedule(self) -> None:
        deadlines = []
        if self.idle_timeout > 0:
            deadlines.append(self._last_data + self.idle_timeout)
        if self.committed and self.keepalive_interval > 0:
            deadlines.append(self._last_write + self.keepalive_interval)
        if not deadlines:
            return
        delay = max(_EPSILON, min(deadlines) - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._finished or self._lost:
            return
        # compared with the same deadlines _schedule used (a hair early counts: float rounding
        # must not turn one due tick into an endless series of zero-delay ones)
        now = self.clock.seconds() + _EPSILON
        if self.idle_timeout > 0 and now >= self._last_data + self.idle_timeout:
            self._timed_out = True
            self._stop_early(f"{self.provider} went silent for {self.idle_timeout:g}s")
            return
        if self.committed and self.keepalive_interval > 0 and now >= self._last_write + self.keepalive_interval:
            self._write(sse.KEEPALIVE)
        self._schedule()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _is_messages(request) -> bool:
    return request.method == b"POST" and request.path.rstrip(b"/").endswith(b"/v1/messages") \
        and request.body is not None


def _describe(error: ProviderError) -> str:
    if error.kind == "status":
        return f"{error.provider} answered {error.status}: {error.message}"
    return error.message


def _client_error(error: ProviderError) -> ProxyError:
    """The Anthropic-shaped error a client gets when a provider it was routed to fails."""
    name = error.provider
    if error.kind == "config":
        return ProxyError(500, error.message)
    if error.kind == "timeout":
        return ProxyError(504, error.message)
    if error.kind != "status":
        return ProxyError(502, error.message)
    status = error.status
    if status == 429:
        headers = [(b"retry-after", error.retry_after.encode())] if error.retry_after else []
        return ProxyError(429, f"{name} is rate-limiting clproxy: {error.message}", "rate_limit_error",
                          headers=headers)
    if error.key_rejected:
        # The provider refused clproxy's own key, not the client's credential: a gateway failure
        # (Gemini says so with a 400 whose ErrorInfo reason is API_KEY_INVALID).
        setting = "providers.openai.apiKey" if name == "openai" else "providers.google-ai.apiKey"
        return ProxyError(502, f"{name} refused clproxy's API key ({setting}), status {status}: "
                               f"{error.message}")
    if 400 <= status < 500:
        return ProxyError(status, f"{name}: {error.message}", error_type_for(status))
    return ProxyError(502, f"{name} answered {status}: {error.message}")
