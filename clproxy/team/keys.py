"""Client keys: generation, hashing, the in-memory key ring that verifies a presented key, and
reading a key from a request's headers.

A client key is ``clp_`` followed by 43 url-safe characters (256 random bits). Only its SHA-256 hash
is ever stored; the key itself is shown once, by ``clproxy keys create``. Nothing here logs, and no
repr or error message holds a key. Pure logic: no reactor, no I/O.
"""

import hashlib
import hmac
import secrets
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import attr

#: Every client key starts with this, so a leaked one is recognisable (and greppable).
KEY_PREFIX = "clp_"
#: Random bytes per key: 256 bits.
KEY_BYTES = 32
#: Characters after ``clp_`` kept (unhashed) to tell keys apart in listings.
DISPLAY_PREFIX_LENGTH = 8
#: A presented key longer than this is refused before hashing (a real key is 47 characters).
MAX_PRESENTED_LENGTH = 256


def generate_key() -> str:
    """A new client key: ``clp_`` + 256 bits from the OS's CSPRNG, url-safe base64 without padding."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what is stored and compared.

    A plain fast hash is right here, unlike for passwords: a key holds 256 random bits, so there is
    nothing to guess and no dictionary to try, and a slow KDF (bcrypt, scrypt) would only add
    latency to every request. The hash of a random key also reveals nothing, so it may index a dict.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """The first characters after ``clp_`` (for listings; 48 of 256 bits, never enough to use)."""
    body = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    return body[:DISPLAY_PREFIX_LENGTH]


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class KeyRecord:
    """One client key as stored: its hash and its limits, never the key itself.

    ``models`` are fnmatch patterns of the models the key may use (empty: any). A limit of ``None``
    means no limit. ``allow_subscription``: may be served by subscription (OAuth) accounts;
    ``admin``: may read ``/status``, ``/metrics`` and ``/dashboard``. Times are epoch seconds.
    """

    name: str
    hash: str = attr.ib(repr=False)
    prefix: str = ""
    models: Tuple[str, ...] = attr.ib(default=(), converter=lambda value: tuple(value))
    rpm: Optional[int] = None
    tokens_per_day: Optional[int] = None
    usd_per_day: Optional[float] = None
    usd_per_month: Optional[float] = None
    allow_subscription: bool = False
    admin: bool = False
    created_at: Optional[float] = None
    last_used_at: Optional[float] = None

    def limits(self) -> Dict[str, Any]:
        """The key's limits as the CLI's JSON shows them."""
        return {"models": list(self.models), "rpm": self.rpm, "tokens_per_day": self.tokens_per_day,
                "usd_per_day": self.usd_per_day, "usd_per_month": self.usd_per_month,
                "allow_subscription": self.allow_subscription, "admin": self.admin}

    def to_json(self) -> Dict[str, Any]:
        """The record as ``keys.json`` and the shared store keep it (hash only)."""
        data: Dict[str, Any] = {"name": self.name, "hash": self.hash, "prefix": self.prefix}
        data.update(self.limits())
        data.update({"created_at": self.created_at, "last_used_at": self.last_used_at})
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "KeyRecord":
        """A record from :meth:`to_json`'s shape; ValueError (naming the field) if malformed."""
        def field(name: str, kinds: Any, default: Any = None) -> Any:
            value = data.get(name, default)
            # bool is an int to isinstance: a limit of ``true`` is as wrong as a string
            if value is None or (isinstance(value, kinds) and (kinds is bool or not isinstance(value, bool))):
                return value
            raise ValueError(f"client key field {name!r} has the wrong type")

        name, digest = data.get("name"), data.get("hash")
        if not isinstance(name, str) or not name:
            raise ValueError("client key record without a name")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"client key {name!r} has no valid hash")
        models = data.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ValueError(f"client key {name!r}: models must be a list of patterns")
        return cls(name=name, hash=digest, prefix=field("prefix", str, "") or "", models=tuple(models),
                   rpm=field("rpm", int), tokens_per_day=field("tokens_per_day", int),
                   usd_per_day=_float(field("usd_per_day", (int, float))),
                   usd_per_month=_float(field("usd_per_month", (int, float))),
                   allow_subscription=field("allow_subscription", bool, False) is True,
                   admin=field("admin", bool, False) is True,
                   created_at=_float(field("created_at", (int, float))),
                   last_used_at=_float(field("last_used_at", (int, float))))


def _float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


class KeyRing:
    """The client keys a daemon accepts, in memory, looked up by hash.

    Build one from records (:meth:`replace` swaps the whole set at once when the key file or the
    shared store changes). :meth:`verify` is what the HTTP layer calls on every ``/v1/*`` request.
    """

    def __init__(self, records: Iterable[KeyRecord] = ()):
        self._by_hash: Dict[str, KeyRecord] = {}
        self.replace(records)

    def __repr__(self) -> str:
        return f"KeyRing({len(self._by_hash)} keys)"

    def __len__(self) -> int:
        return len(self._by_hash)

    def __iter__(self) -> Iterator[KeyRecord]:
        return iter(sorted(self._by_hash.values(), key=lambda r: r.name))

    def replace(self, records: Iterable[KeyRecord]) -> None:
        """Accept exactly ``records`` from now on (one assignment: a request sees old or new)."""
        self._by_hash = {record.hash: record for record in records}

    @property
    def empty(self) -> bool:
        """No key at all: the daemon runs unauthenticated (loopback, or allowUnauthenticated)."""
        return not self._by_hash

    @property
    def has_admin(self) -> bool:
        """At least one admin key exists."""
        return any(r.admin for r in self._by_hash.values())

    def find(self, key_hash: str) -> Optional[KeyRecord]:
        """The record of the key whose hash is ``key_hash`` (a login session remembers only the
        hash), or None when that key is gone."""
        return self._by_hash.get(key_hash)

    def verify(self, presented: Optional[str]) -> Optional[KeyRecord]:
        """The record of the presented key, or None (missing, malformed, unknown or revoked).

        The dict lookup by hash leaks nothing (the hash of a random key is itself random); the hit is
        still confirmed with ``hmac.compare_digest`` so the final comparison is constant time too.
        """
        if not presented or not isinstance(presented, str) or len(presented) > MAX_PRESENTED_LENGTH:
            return None
        digest = hash_key(presented)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.hash, digest):
            return None
        return record


def _header_values(headers: Any, name: str) -> Iterator[str]:
    """Every value of header ``name`` in Twisted ``Headers``, a mapping or (name, value) pairs."""
    lowered = name.lower()
    if hasattr(headers, "getRawHeaders"):
        # by bytes name: a str name makes Twisted decode values as UTF-8, which hostile bytes break
        raw = headers.getRawHeaders(lowered.encode("ascii")) or []
    else:
        items = headers.items() if isinstance(headers, Mapping) else headers
        raw = [value for key, value in items
               if (key.decode("latin-1") if isinstance(key, bytes) else str(key)).lower() == lowered]
    for value in raw:
        yield value.decode("latin-1") if isinstance(value, bytes) else str(value)


def extract_client_key(headers: Any) -> Optional[str]:
    """The client key of a request: ``x-api-key``, else ``Authorization: Bearer KEY``.

    ``headers`` is Twisted ``Headers``, a mapping or a sequence of (name, value) pairs (str or
    bytes). Returns None when there is none or it is malformed (empty, spaces inside, too long, more
    than one distinct value): the caller answers 401 without saying which.
    """
    keys = set(_header_values(headers, "x-api-key"))
    if keys:
        return _clean(keys.pop()) if len(keys) == 1 else None
    authorizations = set(_header_values(headers, "authorization"))
    if len(authorizations) != 1:
        return None
    scheme, _, token = authorizations.pop().strip().partition(" ")
    return _clean(token) if scheme.lower() == "bearer" else None


def _clean(value: str) -> Optional[str]:
    value = value.strip()
    if not value or len(value) > MAX_PRESENTED_LENGTH or any(c.isspace() or ord(c) < 0x21 for c in value):
        return None
    return value
