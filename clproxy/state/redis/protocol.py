"""txredisapi's Redis protocol with the two costs every command paid trimmed.

A request on the Redis store sends a few commands (two Lua scripts, an MGET, an HINCRBY), and on a
busy worker their encoding was a tenth of its time:

- txredisapi builds each command value by value in Python: two ``_encode_value`` calls, four
  ``bytearray.extend`` calls and a join per argument (~36 us for a 16-argument EVALSHA). Here
  each argument is one ``%`` format, with the same bytes on the wire and the same errors.
- ``eval`` encoded the script and hashed it with SHA1 on every call, to look up whether the
  connection had loaded it. Here each script's bytes and hash are computed once per process.

Everything else (replies, timeouts, script loading and the NOSCRIPT fallback) is txredisapi's.
"""

import hashlib
from typing import Dict, Tuple

try:
    import txredisapi
except ImportError:  # Debian packages none: the unmodified copy clproxy ships (clproxy/_vendor)
    from clproxy._vendor import txredisapi  # type: ignore[no-redef]

#: script text -> (its bytes, their SHA1 in hex), for the few scripts the store runs
_SCRIPTS: Dict[object, Tuple[bytes, str]] = {}
#: scripts remembered at most (the store has a handful; a caller making scripts up as it goes
#: must not grow the table without end)
_MAX_SCRIPTS = 256


class RedisProtocol(txredisapi.RedisProtocol):
    """One connection to Redis: txredisapi's protocol, with a faster command encoder and script
    hashes computed once."""

    def _build_command(self, *args, **kwargs) -> bytes:
        charset, errors = self.charset, self.errors
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                value = arg
            elif kind is str and charset is not None:
                try:
                    value = arg.encode(charset, errors)
                except UnicodeEncodeError:
                    value = self._encode_value(arg)  # txredisapi's own error (InvalidData)
            elif kind is int:
                value = b"%d" % arg
            else:  # floats, bools, subclasses...: txredisapi's own rules
                value = self._encode_value(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return b"".join(parts)

    def eval(self, script, keys=[], args=[]):  # noqa: B006 - txredisapi's signature
        known = _SCRIPTS.get(script)
        if known is None:
            text = script.encode() if isinstance(script, str) else script
            known = (text, hashlib.sha1(text).hexdigest())
            if len(_SCRIPTS) < _MAX_SCRIPTS:
                _SCRIPTS[script] = known
        text, sha1 = known
        if sha1 in self.script_hashes:
            return self.evalsha(sha1, keys, args).addErrback(self._evalsha_failed, text, sha1, keys, args)
        return self._eval(text, sha1, keys, args)
