"""Redis URLs: parsing ``redis://`` and ``rediss://`` targets, and redacting their passwords.

Pure (no I/O, no txredisapi), so the start-up probe and error messages can use it without the
Redis client.
"""

import re
from typing import Optional
from urllib.parse import unquote, urlsplit

import attr

DEFAULT_PORT = 6379


@attr.s(frozen=True, auto_attribs=True)
class RedisTarget:
    """Where one Redis is, parsed from ``redis://[user][:password]@host[:port][/db]`` (``rediss://``
    for TLS). ``redacted`` is the URL safe to log; the password never appears in ``repr``."""

    host: str
    port: int
    db: int
    username: Optional[str]
    password: Optional[str] = attr.ib(repr=False)
    tls: bool
    redacted: str


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^@/]*)@")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``redis://:***@host``); never raises."""
    text = str(url)

    def hide(match):
        userinfo = match.group(2)
        if ":" not in userinfo:
            return match.group(0)
        user = userinfo.split(":", 1)[0]
        return "{}{}:***@".format(match.group(1), user)

    text = _USERINFO.sub(hide, text, count=1)
    # A query string may carry credentials too (``?password=``): never echo it.
    return text.split("?", 1)[0] + ("?***" if "?" in text else "")


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a ``redis://`` or ``rediss://`` URL; ValueError (naming the redacted URL) when
    it is not one."""
    safe = redact_url(url)
    try:
        parts = urlsplit(str(url))
        port = parts.port
    except ValueError:
        raise ValueError("state.url {} is not a redis:// URL".format(safe)) from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("state.url {} is not a redis://host[:port][/db] URL".format(safe))
    if parts.query:
        raise ValueError("state.url {}: query options are not supported; put the password in "
                         "the URL as redis://:password@host".format(safe))
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError("state.url {}: the database must be a number (/0)".format(safe)) from None
    if db < 0:
        raise ValueError("state.url {}: the database must be 0 or more".format(safe))
    return RedisTarget(host=parts.hostname, port=port or DEFAULT_PORT, db=db,
                       username=unquote(parts.username) if parts.username else None,
                       password=unquote(parts.password) if parts.password is not None else None,
                       tls=parts.scheme == "rediss", redacted=safe)
