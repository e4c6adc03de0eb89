"""The dashboard under a hostile or unlucky viewer: sessions that end while a live feed is open,
login limits behind a shared address, malformed login calls."""

import json

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from clproxy.dashboard.access import DashboardAccess, LoginSessions
from clproxy.observe.activity import Activity
from clproxy.dashboard.feed import DashboardFeed
from clproxy.state.memory import MemoryStateStore
from clproxy.team.keys import KeyRing
from conftest import accounts_config
from helpers import TimedBody, until
from test_dashboard_http import cookie_of, get, keys, login_headers
from test_dashboard_units import Page, finished, now_result, record, with_headers


async def open_feed(url, headers):
    """An open ``/dashboard/events`` stream: its TimedBody, once the first frame came."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(b"GET", (url + "/dashboard/events").encode(), Headers(headers))
    assert response.code == 200
    body = TimedBody()
    response.deliverBody(body)
    await until(lambda: b"event: update" in body.body)
    return body


@pytest_twisted.ensureDeferred
async def test_logging_out_ends_the_live_feed_the_session_opened(fake, start_proxy, tmp_path):
    """A feed let in by a session cookie ends once that session is logged out (on a shared computer
    the other tab must stop showing the pool); a feed opened with the key itself goes on."""
    admin, _ = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    status, headers, _ = await get(proxy.url + "/dashboard/login", login_headers(), method=b"POST",
                                   body=json.dumps({"key": admin}).encode())
    assert status == 200
    session = cookie_of(headers).split(";")[0].encode()
    by_session = await open_feed(proxy.url, {b"cookie": [session]})
    by_key = await open_feed(proxy.url, {b"x-api-key": [admin.encode()]})
    status, _, _ = await get(proxy.url + "/dashboard/logout",
                             {b"cookie": [session], b"x-clproxy-dashboard": [b"1"]}, method=b"POST", body=b"")
    assert status == 200
    await until(lambda: by_session.reason is not None)
    assert by_session.done.result  # finished, not broken off
    assert by_key.reason is None and len(proxy.service.feed.subscribers) == 1


def test_an_expired_session_ends_its_live_feed():
    """A feed let in by a session stops on the first tick after the session expires, like a feed
    whose key is revoked; until then it runs."""
    admin_key = "clp_" + "a" * 40
    clock = task.Clock()
    gate = DashboardAccess(KeyRing([record("boss", admin_key, True)]),
                           LoginSessions(MemoryStateStore(), clock, ttl=100.0))
    status, _, token, _ = now_result(gate.login(admin_key, "p"))
    assert status == 200
    request = with_headers(cookie=token)
    admission = now_result(gate.admission(request))
    feed = DashboardFeed(lambda: defer.succeed({"now": clock.seconds()}), Activity(clock), clock)
    page = Page()
    feed.subscribe(page, gate.watch(request, admission))
    clock.advance(99)
    finished(feed.activity, clock.seconds())
    clock.advance(0.5)
    assert not page.finished and len(page.frames()) > 1
    clock.advance(1)
    assert page.finished and not feed.subscribers


@pytest_twisted.ensureDeferred
async def test_admins_behind_one_reverse_proxy_are_not_locked_out_by_their_own_logins(
        fake, start_proxy, tmp_path):
    """Behind a reverse proxy every browser logs in from one address: six good logins in a minute
    all succeed (a success spends no attempt), while wrong keys from that address are still held
    to five a minute (after which even the right key waits, as before)."""
    admin, _ = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    url = proxy.url + "/dashboard/login"
    good = json.dumps({"key": admin}).encode()
    for _ in range(6):
        status, headers, _ = await get(url, login_headers(), method=b"POST", body=good)
        assert status == 200 and cookie_of(headers)
    for _ in range(5):
        assert (await get(url, login_headers(), method=b"POST",
                          body=json.dumps({"key": "clp_wrong"}).encode()))[0] == 401
    assert (await get(url, login_headers(), method=b"POST", body=good))[0] == 429


@pytest_twisted.ensureDeferred
async def test_a_viewer_gone_while_its_session_is_read_opens_no_feed(fake, start_proxy, tmp_path):
    """A page that hangs up while its session is still being read (a slow store) leaves no open
    feed behind: no subscriber that never ends, no tick kept running, no failure logged."""
    admin, _ = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    status, headers, _ = await get(proxy.url + "/dashboard/login", login_headers(), method=b"POST",
                                   body=json.dumps({"key": admin}).encode())
    session = cookie_of(headers).split(";")[0].encode()
    store, reads = proxy.service.store, []
    read_now = store.get_login

    def slow_read(digest, now):
        answer = read_now(digest, now)
        reads.append((defer.Deferred(), answer))
        return reads[-1][0]

    store.get_login = slow_read
    failures = []
    observer = lambda event: failures.append(event) if event.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        client = await ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", proxy.service.address()[1])
        client.transport.write(b"GET /dashboard/events HTTP/1.1\r\nHost: localhost\r\nCookie: " + session
                               + b"\r\n\r\n")
        await until(lambda: reads)
        client.transport.loseConnection()
        await until(lambda: proxy.service.drainer.in_flight() == 0)
        store.get_login = read_now
        pending, answer = reads[0]
        answer.addCallback(pending.callback)  # the session is live: it would have been let in
        await until(lambda: pending.called)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not proxy.service.feed.subscribers and not failures


@pytest_twisted.ensureDeferred
async def test_head_of_the_live_feed_answers_as_its_get_would(fake, start_proxy, tmp_path):
    """HEAD /dashboard/events says what GET would (401 without an admin key, 200 and the event
    stream's type with one) and opens no stream either way."""
    admin, plain = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    url = proxy.url + "/dashboard/events"
    for headers in ({}, {b"x-api-key": [plain.encode()]}):
        assert (await get(url, headers))[0] == 401
        status, answer, body = await get(url, headers, method=b"HEAD")
        assert (status, body) == (401, b"")
    status, answer, body = await get(url, {b"x-api-key": [admin.encode()]}, method=b"HEAD")
    assert (status, body) == (200, b"")
    assert answer.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    assert not proxy.service.feed.subscribers
