"""txredisapi's Redis protocol without what every command and reply paid for nothing.

A request on the Redis store sends a few commands (two Lua scripts, an MGET, an HINCRBY), and on a
busy worker their encoding and reading took a tenth of its time:

- txredisapi builds each command value by value in Python: two ``_encode_value`` calls, four
  ``bytearray.extend`` calls and a join per argument (~36 us for a 16-argument EVALSHA). Here
  each argument is one ``%`` format, with the same bytes on the wire and the same errors.
- ``eval`` encoded the script and hashed it with SHA1 on every call, to look up whether the
  connection had loaded it. Here each script's bytes and hash are computed once per process.
- Each command's answer went through a ``DeferredQueue``, two callbacks on it and a third
  Deferred before its caller saw it, and each command set a timer for its reply timeout and
  cancelled it on the reply. Here a command waits in a FIFO of its own Deferreds, each fired by
  its reply (the same values and errors), and one timer per connection watches the oldest
  command's deadline (the same timeout, to the same instant).
- Replies were read line by line, and after each bulk string (every value of an MGET, every
  string a script returns) the rest of the read was handed back to the reactor for its next turn,
  the socket paused and resumed meanwhile (two ``epoll_ctl`` calls and a reactor turn per value).
  Here every complete reply in a read is parsed at once, into the same values and errors.

Everything else (timeouts, script loading and the NOSCRIPT fallback, AUTH and SELECT) is
txredisapi's. Transactions (MULTI/EXEC, WATCH), which the store does not use, keep txredisapi's
reader.
"""

import collections
import hashlib
from typing import Deque, Dict, Optional, Tuple

from twisted.internet import defer

try:
    import txredisapi
except ImportError:  # Debian packages none: the unmodified copy clproxy ships (clproxy/_vendor)
    from clproxy._vendor import txredisapi  # type: ignore[no-redef]

#: script text -> (its bytes, their SHA1 in hex), for the few scripts the store runs
_SCRIPTS: Dict[object, Tuple[bytes, str]] = {}
#: scripts remembered at most (the store has a handful; a caller making scripts up as it goes
#: must not grow the table without end)
_MAX_SCRIPTS = 256


#: a reply not complete in what has been read yet
_INCOMPLETE = object()
#: a line txredisapi's reader ignores (empty, or of no known type): no value
_NOTHING = object()


class _Unreadable(Exception):
    """The connection sent what no Redis reply is (a line too long or not UTF-8, nesting too deep)."""


class RedisProtocol(txredisapi.RedisProtocol):
    """One connection to Redis: txredisapi's protocol, with a faster command encoder, script
    hashes computed once and every complete reply of a read parsed at once."""

    #: array nesting beyond which a reply is refused (Redis itself nests a few levels at most)
    max_depth = 64

    _unparsed = b""
    #: who gets each reply still to come, in the order the commands were sent: a command's own
    #: Deferred with the time its reply is due (None: no timeout), or None for a command sent
    #: through txredisapi's queue (pipelines, transactions), which times it out itself
    _waiters: Optional[Deque[Optional[Tuple[defer.Deferred, Optional[float]]]]] = None
    #: the one timer that checks the oldest command's deadline (re-armed, never cancelled per reply)
    _watchdog = None

    def execute_command(self, *args, **kwargs):
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = collections.deque()
        if self.pipelining or self.inMulti or self.connected == 0:
            # txredisapi's own path (its reply queue), its place in the order kept
            result = super().execute_command(*args, **kwargs)
            waiters.append(None)
            return result
        self.transport.write(self._build_command(*args))
        result = defer.Deferred()
        due = None
        if self.replyTimeout and kwargs.get("apply_timeout", True):
            clock = self.callLater.__self__  # (txredisapi's reactor, or a test's clock)
            due = clock.seconds() + self.replyTimeout
            if self._watchdog is None:
                self._watchdog = self.callLater(self.replyTimeout, self._watch)
        waiters.append((result, due))
        post_proc = kwargs.get("post_proc")
        if callable(post_proc):
            result.addCallback(post_proc)
        return result

    def _watch(self) -> None:
        """The oldest command still waiting: timed out if its reply is due, else watched again
        at its deadline."""
        self._watchdog = None
        for waiter in self._waiters or ():
            if waiter is not None and waiter[1] is not None:
                late = waiter[1] - self.callLater.__self__.seconds()
                if late <= 0:
                    self._reply_timed_out()
                else:
                    self._watchdog = self.callLater(late, self._watch)
                return

    def _reply_timed_out(self) -> None:
        """As txredisapi: the command and every one still waiting fail with TimeoutError, and the
        connection is dropped."""
        error = txredisapi.TimeoutError("Not received Redis response in {0} seconds".format(self.replyTimeout))
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if waiter is None:
                super().replyReceived(error)  # a command on txredisapi's queue
            elif not waiter[0].called:
                waiter[0].errback(error)
        self.transport.abortConnection()

    def replyReceived(self, reply):
        waiters = self._waiters
        waiter = waiters.popleft() if waiters else None
        if waiter is None:
            return super().replyReceived(reply)
        result = waiter[0]
        if result.called:  # timed out meanwhile
            return None
        if isinstance(reply, Exception):
            result.errback(reply)
        else:
            result.callback(reply)
        return None

    def connectionLost(self, why):
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        super().connectionLost(why)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if waiter is not None and not waiter[0].called:
                waiter[0].errback(txredisapi.ConnectionError("Lost connection"))

    def dataReceived(self, data, unpause=False):
        if (self.inTransaction or self.bulk_length or self.multi_bulk.pending is not None
                or getattr(self, "_LineReceiver__buffer", b"")):  # (a txredisapi without it holds none)
            # txredisapi's reader is mid-reply or in a transaction: it goes on as it was
            return super().dataReceived(data, unpause)
        buffer = self._unparsed + data if self._unparsed else data
        self._unparsed = b""
        size = len(buffer)
        at = 0
        try:
            while at < size:
                parsed = self._reply(buffer, at, 0)
                if parsed is _INCOMPLETE:
                    break
                reply, at = parsed
                if reply is _NOTHING:
                    continue
                self.replyReceived(reply)
                if self.transport is not None and self.transport.disconnecting:
                    return None
        except _Unreadable:
            return self.lineLengthExceeded(buffer[at:])
        self._unparsed = buffer[at:]
        return None

    def _reply(self, buffer: bytes, at: int, depth: int):
        """The reply (or array element) starting at ``at`` and where it ends: ``(value, end)``,
        or ``_INCOMPLETE``. Values as txredisapi's reader gives them: status text, ResponseError,
        int, decoded bulk string (bytes when not decodable), None, lists."""
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            if len(buffer) - at > self.MAX_LENGTH:
                raise _Unreadable("line too long")
            return _INCOMPLETE
        if eol - at > self.MAX_LENGTH:
            raise _Unreadable("line too long")
        after = eol + 2
        if eol == at:
            return _NOTHING, after
        token = buffer[at]
        if token == 0x24:  # $ bulk string
            try:
                length = int(buffer[at + 1:eol])
            except ValueError:
                return txredisapi.InvalidResponse(
                    "Cannot convert data '%s' to integer" % buffer[at + 1:eol].decode("utf-8", "replace")), after
            if length < 0:
                return None, after
            end = after + length
            if len(buffer) < end + 2:
                return _INCOMPLETE
            return self.tryConvertData(buffer[after:end]), end + 2
        if token == 0x2A:  # * array
            try:
                count = int(buffer[at + 1:eol])
            except ValueError:
                return txredisapi.InvalidResponse(
                    "Cannot convert multi-response header '%s' to integer"
                    % buffer[at + 1:eol].decode("utf-8", "replace")), after
            if count < 0:
                return None, after
            if depth >= self.max_depth:
                raise _Unreadable("arrays nested too deep")
            items: list = []
            while len(items) < count:
                parsed = self._reply(buffer, after, depth + 1)
                if parsed is _INCOMPLETE:
                    return _INCOMPLETE
                item, after = parsed
                if item is not _NOTHING:
                    items.append(item)
            return items, after
        try:
            text = buffer[at + 1:eol].decode()
        except UnicodeDecodeError:  # txredisapi raised it into the reactor; a closed connection is clearer
            raise _Unreadable("a reply line that is not UTF-8")
        if token == 0x2B:  # + status
            return text, after
        if token == 0x2D:  # - error
            return txredisapi.ResponseError(text[4:] if text[:4] == "ERR" else text), after
        if token == 0x3A:  # : integer
            try:
                return int(text), after
            except ValueError:
                return txredisapi.InvalidResponse("Cannot convert data '%s' to integer" % text), after
        return _NOTHING, after

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
