"""State stores: where cooldowns, stats, tokens, quotas and locks live.

Memory by default (one instance); Redis when several instances share one pool. Both provide every
state interface of ``clproxy.interfaces`` and ``IStateLifecycle``, so nothing outside this package
asks which backend it has. The Redis module (and txredisapi) is imported only when asked for.
"""

from typing import Any, Callable, Optional


def open_store(state_config, clock, *,
               on_token_write: Optional[Callable[[str, dict], Any]] = None):
    """The store ``state_config`` asks for, not yet connected (no I/O): memory for backend
    ``memory``, Redis for ``redis`` (``connect()`` it, as the daemon does when it starts).

    ``on_token_write(key, record)`` is called with a token record another instance rotated (Redis
    only). ValueError (naming the redacted URL) for an unknown backend or a bad URL.
    """
    backend = getattr(state_config, "backend", "memory")
    if backend == "memory":
        from clproxy.state.memory import MemoryStateStore
        return MemoryStateStore()
    if backend != "redis":
        raise ValueError("state.backend must be memory or redis, not {!r}".format(backend))
    from clproxy.state.redis import RedisStateStore
    return RedisStateStore(state_config.url, clock, prefix=state_config.prefix,
                           on_token_write=on_token_write)


async def connect_store(state_config, clock, *,
                        on_token_write: Optional[Callable[[str, dict], Any]] = None):
    """The store ``state_config`` asks for, connected: memory, or Redis connected and PINGed.

    Raises ``RedisUnavailable`` (naming the URL without its password) when Redis cannot be reached,
    and ValueError for a bad backend or URL.
    """
    store = open_store(state_config, clock, on_token_write=on_token_write)
    try:
        await store.connect()
    except BaseException:
        # Nobody else holds this store: stop its reconnecting before reporting the failure.
        await store.close()
        raise
    return store
