"""HTTP calls to the translation providers (OpenAI Chat Completions, Gemini generateContent).

Each provider knows its URLs, authentication, per-model request adjustments and error shape, and
which pure translator turns its answer into Claude's. Requests go over the daemon's shared
:class:`clproxy.proxy.upstream.UpstreamClient`. API keys come from ``providers:`` and are never logged.
"""

import json
from typing import Optional
from urllib.parse import quote

import attr
from twisted.internet import defer
from twisted.web.http_headers import Headers

from clproxy import __version__, jsoncodec
from clproxy.observe.redact import REDACTED, redact_text
from clproxy.translate import gemini as gemini_translate
from clproxy.translate import openai as openai_translate
from clproxy.proxy.upstream import UpstreamError, read_body

__all__ = ["ProviderError", "PreparedRequest", "OpenAIClient", "GeminiClient", "build_providers",
           "ERROR_BODY_LIMIT"]

#: How much of a provider's error body is read (the message is all we need of it).
ERROR_BODY_LIMIT = 64 * 1024

USER_AGENT = f"clproxy/{__version__}".encode()

# Largest max output tokens per model family (longest matching prefix wins). Claude Code asks for
# 32000 or more; OpenAI and Gemini reject a max_tokens above the model's limit instead of capping it.
OPENAI_OUTPUT_LIMITS = {
    "gpt-3.5-turbo": 4096,
    "gpt-4-turbo": 4096,
    "gpt-4o": 16384,
    "gpt-4.1": 32768,
    "gpt-5": 128000,
    "o1": 100000,
    "o3": 100000,
    "o4": 100000,
}
# Reasoning models: they take reasoning_effort and reject temperature/top_p other than the default.
OPENAI_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
GEMINI_OUTPUT_LIMITS = {
    "gemini-1.5": 8192,
    "gemini-2.0": 8192,
    "gemini-2.5": 65536,
    "gemini-3": 65536,
}


class ProviderError(Exception):
    """A provider could not answer: ``kind`` says why.

    ``config`` (no API key), ``status`` (a non-2xx answer: ``status``, the provider's ``message`` and
    ``retry_after`` seconds as text when it said; ``key_rejected`` when it refused clproxy's own API
    key), ``network`` / ``timeout`` (unreachable, no answer in time), ``invalid`` (an answer that
    cannot be understood). Messages never carry a key.
    """

    def __init__(self, provider: str, kind: str, message: str, status: Optional[int] = None,
                 retry_after: Optional[str] = None, key_rejected: bool = False):
        super().__init__(message)
        self.provider = provider
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.key_rejected = key_rejected or status in (401, 403)


@attr.s(frozen=True, auto_attribs=True)
class PreparedRequest:
    """One provider request, ready to send."""

    url: bytes
    headers: Headers
    body: bytes
    stream: bool
    model: str


def _limit(model: str, table: dict) -> Optional[int]:
    best = None
    for prefix, value in table.items():
        if model.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, value)
    return best[1] if best else None


def _json_bytes(value) -> bytes:
    return jsoncodec.std_dumps(value)  # (a client's lone surrogate stays the escape it came as)


def _error_message(body: bytes) -> Optional[str]:
    """``error.message`` of an OpenAI or Google error body (Google streams wrap it in a list)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    return None


def _google_details(body: bytes) -> list:
    """The ``error.details`` entries (dicts) of a Google error body; empty when it has none."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _google_retry_delay(body: bytes) -> Optional[str]:
    """Whole seconds from a Google ``RetryInfo.retryDelay`` ("30s", "1.5s"), if the body has one."""
    for detail in _google_details(body):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                return None
            return str(max(1, int(-(-seconds // 1))))
    return None


class ProviderClient:
    """What both providers share: sending, and turning a non-2xx answer into a :class:`ProviderError`."""

    #: the provider's name in routes and config (``openai``, ``google-ai``)
    name = ""
    #: where its key is configured, for messages
    key_setting = ""

    def __init__(self, settings, upstream):
        self.settings = settings
        self.upstream = upstream

    @property
    def configured(self) -> bool:
        """True when an API key is configured."""
        return bool(self.settings.api_key)

    def require_key(self) -> None:
        """Raise ``ProviderError(kind="config")`` when no API key is configured."""
        if not self.configured:
            raise ProviderError(self.name, "config",
                                f"provider {self.name} has no API key configured ({self.key_setting})")

    def prepare(self, claude: dict, model: str, stream: bool) -> PreparedRequest:
        """The provider request for a Claude request (raises TranslationError / ProviderError)."""
        raise NotImplementedError

    def stream_translator(self, requested_model: str):
        """A translator with ``feed(chunk) -> events`` and ``finish() -> events`` for this provider's stream."""
        raise NotImplementedError

    def message(self, answer: dict, requested_model: str) -> dict:
        """A whole provider answer as a Claude Message (raises ValueError when it has none)."""
        raise NotImplementedError

    def retry_after(self, headers: Headers, body: bytes) -> Optional[str]:
        """Seconds to wait, as the provider said (Retry-After header), or None."""
        values = headers.getRawHeaders(b"retry-after")
        if values:
            value = values[0].decode("latin-1").strip()
            try:
                return str(max(1, int(-(-float(value) // 1))))
            except ValueError:
                return None  # an HTTP date: rare from these APIs, and the pool's own wait is safer
        return None

    def key_rejected(self, body: bytes) -> bool:
        """True when an error body (whatever its status) says clproxy's API key was refused."""
        return False

    def scrub(self, text: str) -> str:
        """A provider's message without clproxy's API key, a Bearer value or any key-shaped string.

        Providers echo what they were sent ("Incorrect API key provided: ..."); their messages
        reach the client and the log.
        """
        key = self.settings.api_key
        if key:
            text = text.replace(key, REDACTED)
        return redact_text(text)

    def send(self, prepared: PreparedRequest, timeout: float, clock) -> defer.Deferred:
        """Send; fires with the 2xx response (``UpstreamClient.send``'s), or fails with :class:`ProviderError`.

        Cancelling the Deferred (the client went away) abandons the request at any stage.
        """
        sending = self.upstream.send(b"POST", prepared.url, prepared.headers, prepared.body, timeout, clock)

        def failed(failure):
            reasons = getattr(failure.value, "reasons", None) or []
            if failure.check(defer.CancelledError) or any(r.check(defer.CancelledError) for r in reasons):
                raise defer.CancelledError()  # our caller cancelled: the client went away
            failure.trap(UpstreamError)
            error = failure.value
            raise ProviderError(self.name, error.kind, f"{self.name}: {error.message}")

        def answered(response):
            if 200 <= response.code < 300:
                return response
            reading = read_body(response, ERROR_BODY_LIMIT, self.name, clock, timeout)

            def rejected(body):
                message = _error_message(body)
                if message is None:
                    text = body.decode("utf-8", "replace").strip()
                    message = text[:300] if text and not text.startswith("<") else \
                        (response.phrase or b"").decode("latin-1") or "no error message"
                raise ProviderError(self.name, "status", self.scrub(message), status=response.code,
                                    retry_after=self.retry_after(response.headers, body),
                                    key_rejected=self.key_rejected(body))

            def unreadable(failure):
                failure.trap(UpstreamError)
                if failure.value.kind == "timeout":
                    # a status without its body in upstreamTimeout: a timeout, as headers that never come
                    raise ProviderError(self.name, "timeout",
                                        f"{self.name} answered {response.code}, then {failure.value.message}")
                raise ProviderError(self.name, "status", self.scrub((response.phrase or b"").decode("latin-1")),
                                    status=response.code,
                                    retry_after=self.retry_after(response.headers, b""))

            return reading.addCallbacks(rejected, unreadable)

        return sending.addCallbacks(answered, failed)


class OpenAIClient(ProviderClient):
    """OpenAI Chat Completions: ``POST {baseUrl}/chat/completions`` with a Bearer key."""

    name = "openai"
    key_setting = "providers.openai.apiKey"

    def prepare(self, claude: dict, model: str, stream: bool) -> PreparedRequest:
        self.require_key()
        reasoning = model.startswith(OPENAI_REASONING_PREFIXES)
        claude = dict(claude, stream=stream)
        body = openai_translate.claude_to_openai_request(
            claude, model, send_reasoning_effort=reasoning,
            max_tokens_cap=_limit(model, OPENAI_OUTPUT_LIMITS))
        if reasoning:
            # o-series and gpt-5 answer 400 "Unsupported value: 'temperature'" for anything but the default.
            body.pop("temperature", None)
            body.pop("top_p", None)
        headers = Headers()
        headers.addRawHeader(b"content-type", b"application/json")
        headers.addRawHeader(b"accept", b"text/event-stream" if stream else b"application/json")
        headers.addRawHeader(b"authorization", b"Bearer " + self.settings.api_key.encode("latin-1"))
        if self.settings.org_id:
            headers.addRawHeader(b"openai-organization", self.settings.org_id.encode("latin-1"))
        headers.addRawHeader(b"user-agent", USER_AGENT)
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        return PreparedRequest(url=url.encode("utf-8"), headers=headers, body=_json_bytes(body),
                               stream=stream, model=model)

    def stream_translator(self, requested_model: str):
        return openai_translate.OpenAIStreamToClaude(requested_model)

    def message(self, answer: dict, requested_model: str) -> dict:
        return openai_translate.openai_to_claude_response(answer, requested_model)


class GeminiClient(ProviderClient):
    """Gemini: ``POST {baseUrl}/v1beta/models/{model}:generateContent`` (or ``:streamGenerateContent?alt=sse``)."""

    name = "google-ai"
    key_setting = "providers.google-ai.apiKey"

    def prepare(self, claude: dict, model: str, stream: bool) -> PreparedRequest:
        self.require_key()
        body = gemini_translate.claude_to_gemini_request(
            claude, max_tokens_cap=_limit(model, GEMINI_OUTPUT_LIMITS))
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        url = f"{self.settings.base_url.rstrip('/')}/v1beta/models/{quote(model, safe='.-_')}:{method}"
        headers = Headers()
        headers.addRawHeader(b"content-type", b"application/json")
        headers.addRawHeader(b"accept", b"text/event-stream" if stream else b"application/json")
        headers.addRawHeader(b"x-goog-api-key", self.settings.api_key.encode("latin-1"))
        headers.addRawHeader(b"user-agent", USER_AGENT)
        return PreparedRequest(url=url.encode("utf-8"), headers=headers, body=_json_bytes(body),
                               stream=stream, model=model)

    def stream_translator(self, requested_model: str):
        # actual model None: the answer's own modelVersion names the model that answered
        return gemini_translate.GeminiStreamToClaude(requested_model, None)

    def message(self, answer: dict, requested_model: str) -> dict:
        return gemini_translate.gemini_to_claude_response(answer, requested_model, None)

    def retry_after(self, headers: Headers, body: bytes) -> Optional[str]:
        return super().retry_after(headers, body) or _google_retry_delay(body)

    def key_rejected(self, body: bytes) -> bool:
        # Google refuses a bad key with 400 INVALID_ARGUMENT, not 401: an ErrorInfo reason
        # API_KEY_INVALID (API_KEY_EXPIRED, API_KEY_SERVICE_BLOCKED ...) says it is the key.
        return any(str(d.get("reason", "")).startswith("API_KEY_") for d in _google_details(body))


def build_providers(providers_config, upstream) -> dict:
    """The provider clients by route name, from ``config.providers``."""
    return {
        OpenAIClient.name: OpenAIClient(providers_config.openai, upstream),
        GeminiClient.name: GeminiClient(providers_config.google_ai, upstream),
    }
