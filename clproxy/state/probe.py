"""A blocking check, once, before serving, that the configured state backend answers.

``makeService`` is synchronous and must refuse to start (one line) when a shared store is
configured but unreachable, rather than serve from an empty local mirror.
"""

import socket
from typing import Optional

from clproxy.state.redis.url import parse_redis_url


def probe_store(state_config, timeout: float = 3.0) -> Optional[str]:
    """The problem with the configured backend, or None (memory never has one)."""
    if getattr(state_config, "backend", "memory") != "redis":
        return None
    return probe_redis(state_config.url, timeout)


def probe_redis(url: str, timeout: float = 3.0) -> Optional[str]:
    """Check that Redis answers PING (a blocking check, once, before serving); the problem or None."""
    target = parse_redis_url(url)
    if target.tls:
        return None  # checked by the asynchronous connect instead
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if target.password is not None:
                parts = ["AUTH"] + ([target.username] if target.username else []) + [target.password]
                sock.sendall(_resp(parts))
                if not sock.recv(1024).startswith(b"+OK"):
                    return f"redis at {target.redacted} refused the credentials"
            sock.sendall(_resp(["PING"]))
            reply = sock.recv(1024)
    except OSError as e:
        return f"redis unavailable at {target.redacted}: {e.strerror or e}"
    if not reply.startswith(b"+PONG"):
        return f"redis at {target.redacted} did not answer PING ({reply[:60]!r})"
    return None


def _resp(parts) -> bytes:
    """A command in Redis's wire protocol."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
