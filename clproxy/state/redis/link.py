"""The connection to Redis, on Twisted's ``ClientService``: connect, notice a loss, reconnect
with a bounded backoff, and say once when Redis went away and once when it came back.

The store (:mod:`clproxy.state.redis.store`) runs every command through :meth:`RedisLink.run` and
serves from its local mirror whenever that fails with :class:`RedisDown`.
"""

from typing import Any, Callable, List, Optional

try:
    import txredisapi
except ImportError:  # Debian packages none: the unmodified copy clproxy ships (clproxy/_vendor)
    from clproxy._vendor import txredisapi  # type: ignore[no-redef]
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clproxy.state.redis.protocol import RedisProtocol
from clproxy.state.redis.url import RedisTarget

# One namespace for the whole Redis store, whatever module logs (operators filter on it).
log = Logger(namespace="clproxy.state.redis")

#: Reconnection backoff: the first wait and the longest (seconds).
RECONNECT_FIRST = 0.5
RECONNECT_CAP = 30.0
#: How long a command or a connection attempt may take before Redis counts as unreachable.
DEFAULT_REPLY_TIMEOUT = 2.0
DEFAULT_CONNECT_TIMEOUT = 5.0


class RedisUnavailable(Exception):
    """Redis could not be reached (or refused us) when the store connected; the message names the
    redacted URL and never a password."""


class RedisDown(Exception):
    """One call could not be served by Redis; the store serves it from its local mirror."""


def _no_jitter() -> float:
    return 0.0


#: ``ClientService``'s retry policy: seconds to wait after ``attempt`` failures in a row (1, 2 ...):
#: 0.5 s doubling up to 30 s. No jitter: a handful of instances reconnecting at once costs Redis
#: nothing, and a deterministic wait keeps the outage tests exact.
reconnect_delay = backoffPolicy(initialDelay=RECONNECT_FIRST / 2, maxDelay=RECONNECT_CAP,
                                factor=2.0, jitter=_no_jitter)


def _scrub(text: str, target: RedisTarget) -> str:
    """An error text with the password (should a library ever echo it) removed."""
    text = str(text)
    if target.password:
        text = text.replace(target.password, "***")
    return text


def redis_endpoint(target: RedisTarget, connect_timeout: float, reactor=None):
    """The client endpoint of ``target``: TCP with a connect timeout, inside TLS for ``rediss://``.

    Connections always go through the real reactor (the store's clock may be a ``task.Clock``)."""
    if reactor is None:
        from twisted.internet import reactor
    endpoint: Any = HostnameEndpoint(reactor, target.host, target.port, timeout=connect_timeout)
    if target.tls:
        from twisted.internet import ssl
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(target.host), endpoint)
    return endpoint


class RedisProtocolFactory(protocol.Factory):
    """Builds the txredisapi protocol of one connection to ``target`` (it sends AUTH and SELECT
    when connected) and remembers why the last one was refused.

    ``stopTrying``, ``connectionError`` and ``isLazy`` are what txredisapi's protocol asks of its
    factory when AUTH or SELECT fails (it then closes the connection); retrying is left to the
    link's ``ClientService``.
    """

    noisy = False
    isLazy = False

    def __init__(self, target: RedisTarget, reply_timeout: float):
        self.target = target
        self.reply_timeout = reply_timeout
        self.refusal: Optional[str] = None

    def buildProtocol(self, addr):
        self.refusal = None
        built = RedisProtocol(
            charset="utf-8", replyTimeout=self.reply_timeout, password=self.target.password,
            dbid=self.target.db or None, convertNumbers=False, username=self.target.username)
        built.factory = self
        return built

    def stopTrying(self) -> None:
        """Nothing to stop: the link's ClientService decides about reconnecting."""

    def connectionError(self, why: str) -> None:
        self.refusal = why


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that reports each failed connection attempt (refused, timed out) to the link,
    so :meth:`RedisLink.connect` can fail at the first one."""

    def __init__(self, endpoint, on_failure: Callable[[Failure], None]):
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory) -> Deferred:
        def failed(failure):
            self._on_failure(failure)
            return failure
        return self._endpoint.connect(factory).addErrback(failed)


class RedisLink(service.Service):
    """One connection to Redis, its loss and its recovery, on Twisted's ``ClientService``.

    ``startService`` starts connecting; ``stopService`` stops retrying and closes the connection.
    A connection is used once it has authenticated, selected its database and answered PING;
    every failed attempt and every lost connection waits ``retry(failures in a row)`` seconds on
    ``clock`` (:data:`reconnect_delay`) before the next attempt.

    ``run(op)`` calls ``op(protocol)`` on the live connection; it fails fast with ``RedisDown``
    when there is none, when the connection is lost or a reply takes longer than the reply timeout
    (the connection is then dropped and reconnection starts), or when Redis answers with an error.
    An outage is logged once, its end once, and ``on_recovered`` runs after each reconnection.
    """

    def __init__(self, target: RedisTarget, clock, endpoint, factory=None, *,
                 retry: Callable[[int], float] = reconnect_delay,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
                 on_recovered: Optional[Callable[[], Any]] = None):
        self.target = target
        self._retry = retry
        self._on_recovered = on_recovered
        self._factory = factory if factory is not None else RedisProtocolFactory(target,
                                                                               reply_timeout)
        self._client = ClientService(_WatchedEndpoint(endpoint, self._attempt_failed),
                                     self._factory, retryPolicy=self._next_delay, clock=clock,
                                     prepareConnection=self._prepare)
        self._handler = None
        #: Failed attempts (and lost connections) in a row: ClientService forgets its own count as
        #: soon as TCP connects, even when Redis then refuses us, which would retry in a loop.
        self._failures = 0
        self._waiters: List[Deferred] = []
        self._outage = False
        self._reported: set = set()
        #: Calls made through ``run``, and those Redis could not serve (diagnostics and tests).
        self.calls = 0
        self.failed_calls = 0

    @property
    def url(self) -> str:
        return self.target.redacted

    @property
    def up(self) -> bool:
        """True while a connection is open (the last command on it may still fail)."""
        return self._handler is not None

    @property
    def in_outage(self) -> bool:
        """True from a lost connection (or a failed first attempt) until the next connection."""
        return self._outage

    # Service -----------------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self._client.startService()

    def stopService(self) -> Deferred:
        """Stop retrying and close the connection; fires once it is closed."""
        service.Service.stopService(self)
        self._handler = None
        self._fail_waiters("the redis link was stopped")
        return self._client.stopService()

    def connect(self) -> Deferred:
        """Start if not running and wait for a connection; fails with :class:`RedisUnavailable`
        (naming the redacted URL) at the first failed attempt, while retrying goes on."""
        if self._handler is not None:
            return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if not self.running:
            self.startService()
        return waiter

    # Connecting --------------------------------------------------------------------------------

    def _next_delay(self, _attempts: int) -> float:
        self._failures += 1
        return self._retry(self._failures)

    def _prepare(self, proto) -> None:
        # Returns at once: ClientService cannot take a connection lost before its preparation
        # ended, so readiness (AUTH, SELECT, PING) is awaited here, beside it.
        Deferred.fromCoroutine(self._await_ready(proto)).addCallbacks(
            self._ready, self._refused, callbackArgs=(proto,), errbackArgs=(proto,))

    async def _await_ready(self, proto) -> None:
        # txredisapi closes a connection whose AUTH or SELECT failed: then it never gets ready.
        lost = proto.whenDisconnected()
        first = await defer.race([proto.whenConnected(), lost])
        if first[0] == 1:
            raise txredisapi.ConnectionError(getattr(self._factory, "refusal", None)
                                             or "connection closed before it was ready")
        reply = await proto.ping()
        if reply != "PONG":
            raise txredisapi.RedisError("unexpected PING reply")

    def _ready(self, _, proto) -> None:
        if not self.running or not proto.connected:
            return
        self._handler = proto
        self._failures = 0
        self._reported.clear()
        proto.whenDisconnected().addCallback(lambda _: self._lost(proto, "connection lost"))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._outage:
            self._outage = False
            log.info("redis available again at {url}; shared state is used again", url=self.url)
            if self._on_recovered is not None:
                defer.maybeDeferred(self._on_recovered).addErrback(self._replay_failed)

    def _refused(self, failure: Failure, proto) -> None:
        _abort(proto)  # ClientService sees the loss and retries after the backoff
        self._attempt_failed(failure)

    def _attempt_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and not self.running:
            return  # stopped while connecting: stopService answered the waiters
        if self.running:
            self._outage = True
        self._fail_waiters(_scrub(_reason(failure.value), self.target))

    def _fail_waiters(self, reason: str) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(RedisUnavailable("redis unavailable at {}: {}".format(self.url, reason)))

    # Using the connection ----------------------------------------------------------------------

    def run(self, op: Callable[[Any], Deferred]) -> Deferred:
        """``op(protocol)`` on the live connection; fails with ``RedisDown`` when Redis cannot
        answer."""
        self.calls += 1
        handler = self._handler
        if handler is None:
            self.failed_calls += 1
            return defer.fail(RedisDown("not connected"))
        return defer.maybeDeferred(op, handler).addErrback(self._failed, handler)

    def _failed(self, failure: Failure, handler) -> None:
        self.failed_calls += 1
        reason = _scrub(_reason(failure.value), self.target)
        if failure.check(txredisapi.ConnectionError):  # lost, refused or timed out
            self._lost(handler, reason)
            raise RedisDown(reason)
        if failure.check(txredisapi.RedisError):  # an error reply (OOM, LOADING ...)
            kind = reason.split(" ", 1)[0][:40]
            if kind not in self._reported and len(self._reported) < 32:
                self._reported.add(kind)
                log.warn("redis error at {url}: {reason}; serving from local state",
                         url=self.url, reason=reason)
            raise RedisDown(reason)
        failure.raiseException()

    def _lost(self, handler, reason: str) -> None:
        if self._handler is not handler:
            return  # already noticed (or stopped on purpose)
        self._handler = None
        _abort(handler)  # a stalled connection is dropped: ClientService reconnects
        if not self._outage:
            self._outage = True
            log.warn("redis unavailable at {url}, serving from local state ({reason})",
                     url=self.url, reason=reason)

    def _replay_failed(self, failure: Failure) -> None:
        if failure.check(RedisDown):
            return  # lost again: the outage is logged, and the next recovery replays the rest
        log.error("redis at {url}: writing the changes made during the outage failed: {error}",
                  url=self.url, error=_scrub(_reason(failure.value), self.target))


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def _abort(proto) -> None:
    """Drop a connection at once (a stalled peer would hold ``loseConnection`` back)."""
    transport = getattr(proto, "transport", None)
    if transport is not None:
        abort = getattr(transport, "abortConnection", None) or transport.loseConnection
        abort()
