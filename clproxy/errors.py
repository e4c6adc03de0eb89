"""Anthropic-shaped errors: the one way clproxy tells a client that something failed.

Every failure the proxy itself answers (bad input, no account, exhausted pool, unreachable upstream)
becomes ``{"type":"error","error":{"type":T,"message":M}}`` with a truthful HTTP status.
"""

import json
from typing import Iterable, Optional, Tuple

# The error type Anthropic uses for each status (reference/anthropic-api.md).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    """The Anthropic error type for an HTTP status (``api_error`` for unknown 5xx)."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, error_type: Optional[str] = None) -> bytes:
    """The JSON bytes of an Anthropic error response."""
    return json.dumps(
        {"type": "error", "error": {"type": error_type or error_type_for(status), "message": message}},
        separators=(",", ":"),
    ).encode("utf-8")


def error_event(message: str, error_type: str = "api_error") -> bytes:
    """An SSE ``event: error`` frame, for failures after a stream was committed."""
    data = json.dumps({"type": "error", "error": {"type": error_type, "message": message}},
                      separators=(",", ":"))
    return b"event: error\ndata: " + data.encode("utf-8") + b"\n\n"


class ProxyError(Exception):
    """A failure clproxy answers itself, with a status, an Anthropic error type and extra headers."""

    def __init__(self, status: int, message: str, error_type: Optional[str] = None,
                 headers: Iterable[Tuple[bytes, bytes]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.headers = tuple(headers)

    def body(self) -> bytes:
        """The JSON body for this error."""
        return error_body(self.status, self.message, self.error_type)
