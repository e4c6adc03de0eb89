"""What an upstream account is, and where the pool's accounts come from.

An :class:`Account` is an immutable description of one credential the pool may use.
Discovery turns configuration (and, later, the token store) into a tuple of accounts.
"""

import os
from typing import Any, Mapping, Optional, Tuple

import attr

API_KEY = "api-key"
OAUTH = "oauth"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Account:
    """One credential the pool can send requests with.

    ``key`` is unique and stable across reloads (``config:primary``, ``env:ANTHROPIC_API_KEY``,
    ``anthropic:work``); state such as cooldowns and stats is kept under it. ``secret`` is the API key
    or the OAuth access token and is never shown in ``repr``.
    """

    key: str
    name: str
    kind: str = API_KEY
    secret: str = attr.ib(default="", repr=False)
    base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    weight: int = 1
    enabled: bool = True
    rate_limit: Optional[int] = None
    org_id: Optional[str] = None
    metadata: Mapping[str, Any] = attr.ib(factory=dict, hash=False)
    source: str = "config"
    #: OAuth only: absolute expiry of ``secret`` in seconds since the epoch.
    expires_at: Optional[float] = None
    #: fnmatch patterns (case-sensitive) of model names this account must never be sent
    #: (``excludedModels``); see :mod:`clproxy.routing.limits`.
    excluded_models: Tuple[str, ...] = attr.ib(default=(), converter=tuple)
    #: Requests in flight at once on this account (``maxConcurrent``); ``None``: no cap.
    max_concurrent: Optional[int] = None

    @property
    def is_oauth(self) -> bool:
        """True for subscription (OAuth) accounts, whose requests carry a Bearer token."""
        return self.kind == OAUTH

    def auth_headers(self) -> Tuple[Tuple[bytes, bytes], ...]:
        """The headers that authenticate a request with this account."""
        if self.is_oauth:
            return ((b"authorization", b"Bearer " + self.secret.encode("utf-8")),)
        return ((b"x-api-key", self.secret.encode("utf-8")),)


def accounts_from_environment(environ: Mapping[str, str] = os.environ,
                              base_url: str = DEFAULT_ANTHROPIC_BASE_URL) -> Tuple[Account, ...]:
    """The ``ANTHROPIC_API_KEY`` account, when the variable is set and not empty."""
    key = environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        return ()
    return (Account(key="env:ANTHROPIC_API_KEY", name="env", kind=API_KEY, secret=key,
                    base_url=base_url, source="env"),)
