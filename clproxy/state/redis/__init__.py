"""The Redis state store, shared by every clproxy instance that uses the same Redis and prefix.

``url`` parses and redacts Redis URLs (pure: no I/O, no txredisapi); ``link`` is the connection
on Twisted's ``ClientService`` (reconnects with a bounded backoff); ``scripts`` holds the Lua
read-modify-writes; ``mirror`` the last known state, served while Redis is unreachable; ``store``
the ``RedisStateStore`` itself, a service over all of them.

The names below are importable from here. All but the URL ones are loaded on first use, so the
start-up probe and error messages can parse a URL without loading txredisapi.
"""

from typing import TYPE_CHECKING, Any

from clproxy.state.redis.url import RedisTarget, parse_redis_url, redact_url

if TYPE_CHECKING:  # for type checkers; at run time ``__getattr__`` loads them on first use
    from clproxy.state.redis.link import (  # noqa: F401
        DEFAULT_CONNECT_TIMEOUT, DEFAULT_REPLY_TIMEOUT, RECONNECT_CAP, RECONNECT_FIRST,
        RedisLink, RedisProtocolFactory, RedisUnavailable, reconnect_delay, redis_endpoint)
    from clproxy.state.redis.mirror import LocalMirror  # noqa: F401
    from clproxy.state.redis.scripts import MAX_TTL  # noqa: F401
    from clproxy.state.redis.store import (  # noqa: F401
        BINDING_GRACE, COOLDOWN_GRACE, LEVEL_TTL, QUOTA_TTL, STATS_TTL, RedisStateStore,
        TokenNotStored)

_LAZY = {
    "clproxy.state.redis.link": (
        "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_REPLY_TIMEOUT", "RECONNECT_CAP", "RECONNECT_FIRST",
        "RedisLink", "RedisProtocolFactory", "RedisUnavailable", "reconnect_delay",
        "redis_endpoint"),
    "clproxy.state.redis.mirror": ("LocalMirror",),
    "clproxy.state.redis.scripts": ("MAX_TTL",),
    "clproxy.state.redis.store": ("BINDING_GRACE", "COOLDOWN_GRACE", "LEVEL_TTL", "QUOTA_TTL", "STATS_TTL",
                                  "RedisStateStore", "TokenNotStored"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["RedisTarget", "parse_redis_url", "redact_url", *_WHERE]


def __getattr__(name: str) -> Any:
    """Load a store name on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError("module {!r} has no attribute {!r}".format(__name__, name))
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
