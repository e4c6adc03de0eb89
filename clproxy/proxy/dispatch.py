"""One request's journey: pick an account, try it, retry or fail over, answer when all fail.

The dispatcher owns the loop the design card draws: for each candidate account (within the
request's deadline) it refreshes the token when needed and makes one try
(:class:`clproxy.proxy.attempt.Attempt`: shape, send, classify, record, maybe answer), which
returns what happened as a value; the loop reads it to stop, retry after a refresh, or move on.
When every account is cooling it walks the fallback hook, and otherwise answers with a truthful
error (a 429 whose Retry-After is the earliest recovery).
"""

import json
import math
import os
import re
import time
from typing import Callable, List, Optional, Sequence, Tuple

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from clproxy import jsoncodec
from clproxy.accounts.model import Account
from clproxy.accounts.refresh import RefreshPostponed
from clproxy.accounts.tokenstore import STORED_SOURCES
from clproxy.errors import ProxyError
from clproxy.interfaces import IResponseSink
from clproxy.observe.console import logger
from clproxy.observe.recorder import Observability
from clproxy.proxy.attempt import Answered, Attempt, Failure, NextAccount, downstream_headers
from clproxy.proxy.shaping import CloakingPipeline
from clproxy.routing import headroom, limits, policy
from clproxy.routing.affinity import SessionAffinity, session_of, valid_session_id
from clproxy.routing.limits import ConcurrencyGate
from clproxy.routing.router import Target
from clproxy.team.limits import usable_accounts
from clproxy.translate.claude import strip_foreign_thinking

# downstream_headers lives in attempt.py; it is still importable from here, where it was
__all__ = ["DispatchSettings", "Dispatcher", "ProxyRequest", "TimedSink", "downstream_headers",
           "with_model", "without_foreign_thinking"]

log = logger(__name__)

NO_ACCOUNT_HELP = (
    "clproxy has no Anthropic account to use. Add one with `clproxy auth login anthropic`, "
    "set ANTHROPIC_API_KEY in the proxy's environment (or its --env-file), or list accounts under "
    "accounts.anthropic in {config}, then retry."
)


_ids_in_hand: List[str] = []


def new_request_id() -> str:
    """A fresh request id, ``req_clp_`` and 24 hex digits (96 random bits from ``os.urandom``).

    Ids are made 256 at a time, from one read of random bytes: one ``getrandom`` call per request
    was ~1.5% of a non-streaming request's CPU (benchmarks/README.md; ``uuid.uuid4()`` before
    that, ~2%). A forked child drops the ids its parent made, so no two processes share one."""
    if not _ids_in_hand:
        digits = os.urandom(12 * 256).hex()
        _ids_in_hand.extend("req_clp_" + digits[at:at + 24] for at in range(0, len(digits), 24))
    return _ids_in_hand.pop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids_in_hand.clear)


@attr.s(auto_attribs=True, slots=True)
class ProxyRequest:
    """What the dispatcher needs of an incoming request; ``body`` is kept byte for byte."""

    method: bytes
    path: bytes  # e.g. b"/v1/messages"
    query: bytes  # b"" or b"?beta=true"
    headers: List[Tuple[bytes, bytes]]  # raw, in the client's order
    body: Optional[bytes]
    model: Optional[str] = None
    stream: bool = False
    request_id: str = attr.ib(factory=new_request_id)
    #: the path the client called when it is not ``path`` (the OpenAI front door translates
    #: ``/v1/chat/completions`` into ``/v1/messages``); logs and metrics name this one
    client_path: Optional[bytes] = None
    #: team mode: the client key's record (clproxy.team.keys.KeyRecord) that authenticated this
    #: request, set by the HTTP side; None when the proxy has no client keys. Never the key itself.
    client_key: object = attr.ib(default=None, eq=False, repr=False)
    #: the clproxy.observe.recorder.RequestRecord of this request (set by Dispatcher.forward; the
    #: translation path reads it here). Never on the response sink.
    record: object = attr.ib(default=None, eq=False, repr=False)


@attr.s(frozen=True, auto_attribs=True)
class DispatchSettings:
    """The knobs of the retry loop (from config and command-line options)."""

    passthrough: bool = False
    upstream_timeout: float = 600.0
    request_deadline: float = 900.0
    error_body_limit: int = 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    max_refresh_retries: int = 5
    config_path: str = "~/.clproxy/proxy-config.yaml"
    #: seconds a request may wait for a concurrency slot when every account is at its maxConcurrent
    queue_timeout: float = 30.0
    #: quota utilization at or above which an account takes no new session (routing.quota.switch-at)
    switch_at: float = 0.9


@implementer(IResponseSink)
class TimedSink:
    """``out`` as the dispatcher uses it: the same sink, telling ``record`` when the first byte goes out.

    The time to first byte belongs to the request's record, not to the sink; wrapping keeps every
    sink (and the translation and fallback paths, which write to it too) free of recording.
    ``write`` and the other per-chunk calls are the inner sink's own bound methods: a stream's
    hot path pays nothing for the wrapper.
    """

    def __init__(self, out, record):
        self._out = out
        self._record = record
        self.write = out.write
        self.finish = out.finish
        self.on_disconnect = out.on_disconnect
        self.register_producer = out.register_producer
        self.unregister_producer = out.unregister_producer
        #: the sink's own ``chunked_body`` (clproxy.http.site.ClientResponse), if it has one
        self.chunked_body = getattr(out, "chunked_body", None)

    @property
    def disconnected(self) -> bool:
        return self._out.disconnected

    @property
    def started(self) -> bool:
        return self._out.started

    @property
    def status(self) -> Optional[int]:
        return self._out.status

    def _first_byte(self) -> None:
        if not self._out.disconnected and not self._out.started:
            self._record.first_byte()

    def start(self, status: int, headers) -> None:
        self._first_byte()
        self._out.start(status, headers)

    def send(self, status: int, headers, body: bytes) -> None:
        self._first_byte()
        self._out.send(status, headers, body)

    def send_error(self, error: ProxyError) -> None:
        self._first_byte()
        self._out.send_error(error)


@attr.s(frozen=True, auto_attribs=True)
class _Tried:
    """What trying one account (with its refresh retries) came to: answered, or the failures seen."""

    answered: Optional[Answered] = None
    failures: Tuple[Failure, ...] = ()


class Dispatcher:
    """Forwards Claude Messages API requests through the account pool."""

    def __init__(self, *, clock: IReactorTime, upstream, pool, store,
                 accounts: Callable[[], Sequence[Account]], settings: DispatchSettings = DispatchSettings(),
                 refresher=None, fallback=None, shaping: Optional[CloakingPipeline] = None,
                 router=None, translation=None, quotas=None,
                 on_refreshed: Optional[Callable[[Account], None]] = None,
                 observability: Optional[Observability] = None, gate: Optional[ConcurrencyGate] = None,
                 affinity: Optional[SessionAffinity] = None,
                 on_disabled: Optional[Callable[[Account, str], None]] = None, key_limits=None):
        self.clock = clock
        #: request logs, metrics and traces (metrics only when none is given)
        self.obs = observability if observability is not None else Observability(clock=clock, logs_dir=None)
        self.upstream = upstream
        self.pool = pool
        self.store = store
        self.accounts = accounts
        self.settings = settings
        self.refresher = refresher
        self.shaping = shaping or CloakingPipeline()
        #: clproxy.routing.router.Router; None means every model is passthrough
        self.router = router
        #: clproxy.providers.translation.Translation, for models mapped to another provider
        self.translation = translation
        #: async (request, out, exhausted_error) -> bool; True when a fallback answered the client.
        self.fallback = fallback
        #: clproxy.routing.quota.QuotaBook: unified rate-limit headers captured per account
        self.quotas = quotas
        #: told about an account that came back from a refresh with a new token
        self.on_refreshed = on_refreshed
        #: the streams being relayed right now (for /status, draining and tests)
        self.streams = set()
        #: requests in flight per account (maxConcurrent) and the FIFO queue of those waiting for one
        self.gate = gate if gate is not None else ConcurrencyGate(clock)
        #: which account each session (a Claude Code conversation) is bound to; None: no affinity
        self.affinity = affinity
        #: told about an account the upstream says can never serve (organization disabled, OAuth
        #: not allowed): the account directory takes it out of the pool, with the reason
        self.on_disabled = on_disabled
        #: clproxy.team.limits.KeyLimits: the client key's model, budget and rpm checks (None: none)
        self.key_limits = key_limits

    async def forward(self, request: ProxyRequest, out) -> None:
        """Answer ``request`` through ``out`` (any :class:`clproxy.interfaces.IResponseSink`).

        The request's record is made here and stays with the dispatcher (``request.record``): the
        sink is wrapped so the record hears of the first byte, and never holds the record itself.
        """
        record = request.record = self.obs.begin(
            request_id=request.request_id, method=request.method,
            path=request.client_path or request.path, model=request.model,
            stream=request.stream, headers=request.headers, body=request.body)
        record.key_name = getattr(request.client_key, "name", None)  # team mode: whose usage this is
        out = TimedSink(out, record)
        release = None
        try:
            client = request.client_key
            # before anything is routed or sent: a refused request reaches no provider and takes
            # no slot. One naming no model (GET /v1/models) still spends the key's rpm and stops at
            # a spent budget: it reaches an account with the pool's credential like any other
            if client is not None and self.key_limits is not None:
                release = await self.key_limits.check(client, request.model)
            await self._forward(request, out)
        except ProxyError as e:
            record.error = e.message
            out.send_error(e)
        except BaseException as e:
            record.error = f"internal error: {type(e).__name__}"
            raise
        finally:
            try:
                # 499: the client went away before any answer (nginx's "client closed request")
                record.finish(status=out.status if out.status is not None else (500 if record.error else 499))
            finally:
                if release is not None:
                    release()  # after finish: its usage is counted as spent before it stops being held
            await self.store.incr("completed_requests")

    async def _forward(self, request: ProxyRequest, out) -> None:
        client = request.client_key
        if self.router is not None and request.model:
            route = self.router.route(request.model)
            if route.translated:
                if self.translation is None:
                    raise ProxyError(500, f"model {request.model} is mapped to {route.provider}, "
                                          "but translation is not available")
                request.record.provider = route.provider
                await self.translation.answer(request, out, Target(route.provider, route.model), final=True)
                return
            if not route.passthrough:
                request = with_model(request, route.model)
        if request.body and _FOREIGN_SIGNATURE.search(request.body):
            request = without_foreign_thinking(request)
        accounts = list(self.accounts())
        live = [a for a in accounts if a.enabled]
        if not live:
            raise self._no_account_error(accounts)
        # subscription (OAuth) accounts serve only keys allowed to use them (403 when none is left)
        enabled = usable_accounts(client, live)
        enabled, exclusions = limits.serving(enabled, request.model)
        if not enabled:  # every account excludes this model: nothing is sent upstream
            raise ProxyError(404, limits.not_served_message(request.model or "", exclusions), "not_found_error")
        session = bound = None
        if self.settings.passthrough:
            candidates = (await self.pool.candidates(enabled))[:1] or enabled[:1]
        else:
            session = session_of_request(request) if self.affinity is not None else None
            # the session's binding is read while the pool reads the accounts' states: with a
            # shared store both questions leave together and cost one round trip, not two
            binding = self._binding(session, live)
            try:
                candidates = await self.pool.candidates(enabled)
            except BaseException:
                if binding is not None:
                    binding.addErrback(lambda _: None)  # its answer no longer matters
                raise
            candidates, bound = await self._ordered(candidates, session, binding)
        deadline = self.clock.seconds() + self.settings.request_deadline
        attempt = self._attempt()
        failures: List[Failure] = []
        busy: List[Account] = []  # usable, but at their maxConcurrent: waited for below
        for account in candidates:
            if out.disconnected:
                return
            if self.clock.seconds() >= deadline:
                break
            slot = self.gate.try_acquire(account)
            if slot is None:  # its rate slot is taken only once it has a concurrency slot
                busy.append(account)
                continue
            try:
                admitted = self.settings.passthrough or await self.pool.admit(account)
            except BaseException:
                slot.release()
                raise
            if not admitted:
                slot.release()
                continue
            if await self._try_with_slot(attempt, request, out, account, slot, deadline, failures):
                await self._bind(session, account, bound, live, enabled, busy)
                return
            if self.settings.passthrough:
                break
        while busy and not out.disconnected and self.clock.seconds() < deadline:
            taken = await self._wait_for_slot(request, out, busy, deadline)
            if taken is None:  # the client went away while it waited
                return
            account, slot = taken
            busy = [a for a in busy if a.key != account.key]  # each account is tried once
            if not self.settings.passthrough and not await self._still_usable(account, slot):
                continue
            if await self._try_with_slot(attempt, request, out, account, slot, deadline, failures):
                await self._bind(session, account, bound, live, enabled, busy)
                return
        if out.disconnected:
            return
        await self._exhausted(request, out, enabled, failures)

    def _binding(self, session: Optional[str], live: Sequence[Account]) -> Optional[defer.Deferred]:
        """The account key ``session`` is bound to, its binding refreshed on the way (a Deferred,
        started now); None without a session, without affinity, or with a single enabled account
        (there is nothing to order, nor a binding to keep).

        ``live``: every enabled account, not only those that may serve this request: a request
        its session's account may not take (a model it excludes) must still know the binding,
        or its answer from another account would move the session (:meth:`_bind`)."""
        if session is None or self.affinity is None or len(live) < 2:
            return None
        return defer.ensureDeferred(self.affinity.account_for(session))

    async def _ordered(self, candidates: List[Account], session: Optional[str],
                       binding: Optional[defer.Deferred]) -> Tuple[List[Account], Optional[str]]:
        """The pool's candidates in the order this request tries them, and the account key the
        session's binding (from :meth:`_binding`) was refreshed to (None when it was not).

        A session bound to a usable account goes there first (its prompt cache lives there). A new
        session (or a request without one) is ordered by the quota rule: accounts at or above
        ``switch_at`` in a window take no new session while another has headroom
        (:func:`clproxy.routing.headroom.order_for_new_session`).
        """
        bound = None if binding is None else await binding
        if len(candidates) < 2:
            return candidates, bound
        if bound is not None:
            first = [a for a in candidates if a.key == bound]
            if first:
                return first + [a for a in candidates if a.key != bound], bound
        if self.quotas is None:
            return candidates, bound
        every = list(self.accounts())
        snapshots = await self.quotas.latest(a.key for a in every)
        return headroom.order_for_new_session(
            candidates, snapshots, now=self.clock.seconds(), strategy=self.pool.strategy,
            switch_at=self.settings.switch_at, organizations={a.key: a.org_id for a in every},
            key=lambda a: a.key), bound

    async def _bind(self, session: Optional[str], account: Account, bound: Optional[str],
                    live: Sequence[Account], enabled: Sequence[Account], busy: Sequence[Account]) -> None:
        """``account`` answered this session: keep the session there (a move is counted).

        A binding to ``account`` already refreshed when this request started (``bound``, the key
        it pointed to then) is not written again: that write was one Redis round trip of nearly
        every request.

        The session moves only when its account failed it: cooling, at its rateLimit, disabled or
        gone, or tried and failed. Not when this request was one it may not take (``live`` but not
        in ``enabled``: a model it excludes, such as Claude Code's background model, or a client
        key it does not serve), nor when it was only at its maxConcurrent (still in ``busy``): the
        account is healthy and the conversation's prompt cache lives there.
        """
        if session is None or self.affinity is None or account.key == bound:
            return
        if bound is not None and _only_set_aside(bound, live, enabled, busy):
            return
        if await self.affinity.bind(session, account.key):
            self.obs.metrics.session_moved()
            await self.store.incr(SESSION_MOVES)

    async def _try_with_slot(self, attempt: Attempt, request: ProxyRequest, out, account: Account, slot,
                             deadline: float, failures: List[Failure]) -> bool:
        """Try ``account`` holding its concurrency ``slot`` (released however it ends, a stream
        included); True when the client got its answer, else the failures are added to ``failures``."""
        try:
            tried = await self._try_account(attempt, request, out, account, deadline)
        finally:
            slot.release()
        failures.extend(tried.failures)
        return tried.answered is not None

    async def _wait_for_slot(self, request: ProxyRequest, out, busy: Sequence[Account], deadline: float):
        """Wait in the FIFO queue for a slot on one of ``busy`` (every other candidate failed or is
        cooling). Returns ``(account, slot)``, None when the client hung up (it leaves the queue at
        once), or raises a 429 when ``queue_timeout`` (or the request's deadline) runs out."""
        timeout = max(0.0, min(self.settings.queue_timeout, deadline - self.clock.seconds()))
        waiting = self.gate.wait_for_slot(busy, timeout)
        out.on_disconnect(waiting.cancel)
        try:
            account, slot = await waiting
        except defer.CancelledError:
            return None
        except limits.QueueTimeout as e:
            self.obs.metrics.observe_queue_wait(e.waited)
            raise ProxyError(429, f"all {len(busy)} usable accounts are at their maxConcurrent; waited "
                                  f"{e.waited:.0f}s for a slot (routing.queue-timeout is {e.timeout:g}s)",
                             "rate_limit_error", headers=[(b"retry-after", b"1")])
        self.obs.metrics.observe_queue_wait(slot.waited)
        return account, slot

    async def _still_usable(self, account: Account, slot) -> bool:
        """Whether a queued request may be sent to ``account``, whose concurrency ``slot`` it was
        just handed; when not, the slot is released (to the next waiter).

        The request's candidates were judged before it waited: meanwhile the account may have
        cooled (the request whose slot it took got a 429), been disabled, or reached its rateLimit.
        True means it is still enabled and not cooling, and its rate slot is taken
        (``pool.admit``, right before sending, as for any attempt).
        """
        try:
            usable = (any(a.key == account.key and a.enabled for a in self.accounts())
                      and not await self.pool.cooling([account])
                      and await self.pool.admit(account))
        except BaseException:
            slot.release()
            raise
        if not usable:
            slot.release()
        return usable

    def _attempt(self) -> Attempt:
        """One request's tries, with today's collaborators and settings (a reload may change them)."""
        settings = self.settings
        return Attempt(clock=self.clock, upstream=self.upstream, pool=self.pool, store=self.store,
                       shaping=self.shaping, quotas=self.quotas, passthrough=settings.passthrough,
                       upstream_timeout=settings.upstream_timeout, error_body_limit=settings.error_body_limit,
                       max_response_bytes=settings.max_response_bytes, streams=self.streams)

    async def _try_account(self, attempt: Attempt, request: ProxyRequest, out, account: Account,
                           deadline: float) -> _Tried:
        """Try one account, refreshing its OAuth token and retrying while the upstream rejects it."""
        failures: List[Failure] = []
        refreshes = 0
        force = False
        renewed = False  # the last refresh handed out a new token
        while True:
            if account.is_oauth and self.refresher is not None:
                try:
                    refreshed = await self.refresher.fresh(account, force=force)
                    renewed = refreshed is not account
                    if renewed:
                        request.record.refresh(account.name, True)
                        if self.on_refreshed is not None:
                            self.on_refreshed(refreshed)
                    account = refreshed
                except RefreshPostponed as e:  # an early refresh failed; the token itself is still good
                    request.record.refresh(account.name, False)
                    log.warn("<- refresh-failed account={account} reason={reason}",
                             account=account.name, reason=_safe_reason(e))
                    account, renewed = e.account, False
                except Exception as e:  # refresh failed: this account cannot be used now
                    request.record.refresh(account.name, False)
                    log.warn("<- refresh-failed account={account} reason={reason}",
                             account=account.name, reason=_safe_reason(e))
                    await self.pool.cool(account, policy.AUTH_COOLDOWN)  # no upstream attempt was made
                    return _Tried(failures=tuple(failures))
                if out.disconnected:
                    # the client hung up while the token was refreshed (the first try or the retry
                    # after a 401): nothing is sent for it; the loop sees it gone and ends
                    return _Tried(failures=tuple(failures))
            if refreshes and not self.settings.passthrough and not await self.pool.admit(account):
                # the retry is a new attempt and takes its own rate slot (AccountPool's contract);
                # refused, the next account is tried. A new token answered the 401s: what stops
                # this account now is its rateLimit, which the pool's own 429 tells when no account
                # answers, not Anthropic's "token expired" about a token no longer used
                return _Tried(failures=() if renewed else tuple(failures))
            outcome = await attempt.run(request, out, account, deadline)
            if isinstance(outcome, Answered):
                return _Tried(answered=outcome, failures=tuple(failures))
            failures.append(outcome.failure)
            if isinstance(outcome, NextAccount):
                if outcome.verdict.action == policy.DISABLE:
                    await self._disable(account, policy.disable_reason(outcome.verdict))
                return _Tried(failures=tuple(failures))
            if self.refresher is None or refreshes >= self.settings.max_refresh_retries:
                # no refresh possible (or retries spent): only now does the 401 cool the account
                await self.pool.cool(account, policy.unrefreshable(outcome.verdict).cooldown)
                return _Tried(failures=tuple(failures))
            refreshes += 1
            force = True

    async def _disable(self, account: Account, reason: str) -> None:
        """The upstream says ``account`` can never serve (its organization is disabled, or OAuth is
        not allowed for it): take it out of the pool with ``reason`` (kept in the token store for a
        stored account, so ``auth list`` shows it), instead of cooling it again and again."""
        log.warn("accounts: {name} disabled: {reason}", name=account.name, reason=reason)
        if account.source in STORED_SOURCES and self.refresher is not None:
            try:
                await self.refresher.disable(account.key, reason)
            except Exception as e:  # the pool still drops it below; the store keeps its old state
                log.warn("accounts: could not record {name} as disabled: {error}", name=account.name,
                         error=_safe_reason(e))
        if self.affinity is not None:
            await self.affinity.forget_account(account.key)
        if self.on_disabled is not None:
            self.on_disabled(account, reason)

    async def _exhausted(self, request, out, enabled: Sequence[Account], failures: Sequence[Failure]) -> None:
        """No account answered: fall back, or answer with the most truthful error there is.

        ``failures``: what every try of this request learned, in order (the last one is the truth
        to tell when some account is not cooling).
        """
        cooling = await self.pool.cooling(enabled)
        answers = [f for f in failures if f.status is not None]  # the upstream's own answers
        if answers and all(f.status in (401, 402, 403) for f in answers) \
                and {f.account_key for f in answers} >= {a.key for a in enabled}:
            # every account rejected its credential just now (an OAuth one even after its refresh
            # retries, which add answers, hence accounts and not a count): Anthropic's own answer
            # is the truth, a 429 would send the client into a pointless wait
            _send_failure(out, answers[-1])
            return
        last = failures[-1] if failures else None
        # a 429 speaks for one account: relayed as it is, its Retry-After would hold the client
        # back for that account alone (often longer than the backoff cooling it, or than another
        # account's rateLimit); the pool's earliest recovery is the truth to tell
        rate_limited = last is not None and last.status == 429
        if len(cooling) == len(enabled) or last is None \
                or (rate_limited and not await self._usable_now(enabled)):
            exhausted = await self._pool_exhausted_error(enabled, cooling)
            if self.fallback is not None and not self.settings.passthrough:
                if await self.fallback(request, out, exhausted):
                    return
            raise exhausted
        if rate_limited:
            # another account is usable now (it failed otherwise, or the deadline came first)
            _send_failure(out, attr.evolve(last, headers=_with_retry_after(last.headers, 1)))
            return
        if last.status is not None:
            _send_failure(out, last)
            return
        assert last.network is not None
        status = 504 if last.network.kind == "timeout" else 502
        raise ProxyError(status, last.network.message)

    async def _usable_now(self, enabled: Sequence[Account]) -> bool:
        """Whether some account of ``enabled`` is neither cooling nor at its rateLimit now (it could
        serve a retry at once). Only asked when no account answered."""
        for row in await self.pool.snapshot(enabled):
            rate_used = row["rate_used"]  # None without a rateLimit
            if row["state"] == "ok" and (rate_used is None or rate_used < row["rate_limit"]):
                return True
        return False

    async def _pool_exhausted_error(self, enabled, cooling) -> ProxyError:
        """429 with a Retry-After that is the truth: whole seconds until the first account is usable."""
        now = self.clock.seconds()
        earliest = await self.pool.earliest_recovery(enabled)
        wait = max(1, int(math.ceil(earliest - now))) if earliest is not None else 1
        rows = await self.pool.snapshot(enabled)
        reasons = "; ".join(f"{row['name']}: {row['last_error']}" for row in rows if row.get("last_error"))
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + wait))
        message = (f"all {len(enabled)} accounts are unavailable ({len(cooling)} cooling down, "
                   f"{len(enabled) - len(cooling)} at their rateLimit); the first is usable again "
                   f"in {wait}s (at {at})")
        if reasons:
            message += f". Last errors: {reasons}"
        return ProxyError(429, message[:2000], "rate_limit_error",
                          headers=[(b"retry-after", str(wait).encode())])

    def _no_account_error(self, accounts: Sequence[Account]) -> ProxyError:
        if accounts:
            return ProxyError(401, f"every account of clproxy is disabled ({len(accounts)} known); "
                                   "re-enable one with `clproxy auth enable LABEL` or log in again",
                              "authentication_error")
        return ProxyError(401, NO_ACCOUNT_HELP.format(config=self.settings.config_path),
                          "authentication_error")


# A thinking block a fallback provider produced has an empty or "gemini:" signature; Anthropic
# rejects the conversation with it ("Invalid signature in thinking block"). The byte search keeps
# the common case (no such block) free of any parsing.
_FOREIGN_SIGNATURE = re.compile(rb'"signature"\s*:\s*"(?:gemini:|")')


#: the store counter of sessions rebound to another account (shared by every instance)
SESSION_MOVES = "session_moves"
# Claude Code puts ``metadata`` at the end of its body; only that tail is parsed, never the whole
# (often hundreds of KB) body, and only when the session header is missing.
_SESSION_HEADER = b"x-claude-code-session-id"
_USER_ID = re.compile(rb'"user_id"\s*:\s*("(?:[^"\\]|\\.){0,400}")')
_USER_ID_KEY = re.compile(rb'"user_id"\s*:\s*"')
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # _USER_ID's string, unrolled


def session_of_request(request: ProxyRequest) -> Optional[str]:
    """The request's session: the ``x-claude-code-session-id`` header, else the ``session_id`` in
    ``metadata.user_id`` (found without parsing the whole body); None when it has none."""
    for name, value in request.headers:  # raw byte pairs: the cheap scan, every request
        if name.lower() == _SESSION_HEADER:
            return valid_session_id(value)
    if not request.body:
        return None
    at = request.body.rfind(b'"metadata"')
    if at < 0:
        return None
    literal = _user_id_literal(request.body, at)
    if literal is None:
        return None
    user_id = jsoncodec.loads_or_none(literal)
    if user_id is None:
        return None
    return session_of(None, {"metadata": {"user_id": user_id}})


def _user_id_literal(body: bytes, at: int) -> Optional[bytes]:
    """The JSON string of the first ``"user_id"`` member at or after ``at`` that ``_USER_ID``
    matches (at most 400 characters or escapes), quotes included; None when there is none.

    The same answer as ``_USER_ID.search(body, at)``, faster: the pattern's alternation costs the
    regex engine ~25 ns a character (~4 µs on every request without the session header), its
    unrolled form a few. The unrolled form reads at most 400 bytes of the string (so at most 400
    characters, and no scan past them in a hostile body); a longer string is left to ``_USER_ID``.
    """
    while True:
        key = _USER_ID_KEY.search(body, at)
        if key is None:
            return None
        start = key.end() - 1  # the opening quote
        string = _JSON_STRING.match(body, start, start + 402)
        if string is not None:
            return string.group()
        match = _USER_ID.match(body, key.start())  # longer than 400 bytes, or not a string
        if match is not None:
            return match.group(1)
        at = key.start() + 1


def without_foreign_thinking(request: ProxyRequest) -> ProxyRequest:
    """The request without thinking blocks made by another provider (re-encoded only if one is found)."""
    try:
        parsed = json.loads(request.body)
        cleaned = strip_foreign_thinking(parsed)
        if cleaned is parsed:
            return request
        body = jsoncodec.std_dumps(cleaned)  # (a lone surrogate stays escaped: no UnicodeEncodeError)
    # too deep for json (the front door's reader may go deeper on Python 3.11, where json's limit
    # counts the caller's stack), or messages that are not a list of objects: forwarded as they
    # are, for Anthropic to judge, never an internal error
    except (ValueError, RecursionError, AttributeError, TypeError):
        return request
    return attr.evolve(request, body=body)


def with_model(request: ProxyRequest, model: str) -> ProxyRequest:
    """The request with its ``model`` renamed (an explicit model mapping within Anthropic).

    The body is re-encoded, so its bytes change: the price of a rename the config asked for.
    """
    try:
        parsed = json.loads(request.body)
        parsed["model"] = model
        body = jsoncodec.std_dumps(parsed)
    # the front door's reader (msgspec) may take bodies json cannot read: nested past json's
    # recursion limit (on Python 3.11 it counts the caller's stack), an integer beyond its 4300
    # digits; a rename needs json, so a 400
    except RecursionError:
        raise ProxyError(400, "request body nests JSON too deeply for the model mapping to rewrite it")
    except ValueError:
        raise ProxyError(400, "request body is JSON the model mapping cannot rewrite "
                              "(an integer of more than 4300 digits?)")
    return attr.evolve(request, body=body, model=model)


def _only_set_aside(key: str, live: Sequence[Account], enabled: Sequence[Account],
                    busy: Sequence[Account]) -> bool:
    """Whether account ``key`` sat this request out for a reason that says nothing of its health:
    it is enabled but may not take the request (not in ``enabled``), or it was at its
    maxConcurrent and never got a slot (in ``busy``)."""
    if any(a.key == key for a in busy):
        return True
    return any(a.key == key for a in live) and not any(a.key == key for a in enabled)


def _send_failure(out, failure: Failure) -> None:
    """Relay an upstream's error answer that a try kept (status, client-visible headers, body)."""
    out.send(failure.status, failure.headers or [], failure.body or b"")


def _with_retry_after(headers, seconds: int):
    """``headers`` (a relayed answer's, ``(name, [values])``) with ``retry-after`` set to ``seconds``."""
    kept = [(name, values) for name, values in headers or [] if name.lower() != b"retry-after"]
    return kept + [(b"retry-after", [str(seconds).encode()])]


def _safe_reason(error: Exception) -> str:
    """The type and message of an error; credential-layer errors never carry tokens."""
    return f"{type(error).__name__}: {error}"
