"""The dashboard over real HTTP against a real daemon: its routes, auth, security headers, the live
feed, and that no key ever shows up where it must not."""

import json
import os
import re

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from clproxy.dashboard.resources import CSP
from clproxy.team.keystore import KeyStore
from conftest import accounts_config
from helpers import TimedBody, post, request_body, until
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)


async def get(url, headers=None, method=b"GET", body=None):
    """(status, headers, body) of one request carrying exactly ``headers``."""
    from io import BytesIO
    from twisted.web.client import FileBodyProducer
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(method, url.encode(), Headers(headers or {}),
                                   FileBodyProducer(BytesIO(body)) if body is not None else None)
    return response.code, response.headers, await treq.content(response)


def header(headers, name):
    values = headers.getRawHeaders(name)
    return values[0].decode() if values else None


def login_headers(**extra):
    headers = {b"content-type": [b"application/json"], b"x-clproxy-dashboard": [b"1"]}
    headers.update(extra)
    return headers


def keys(tmp_path):
    store = KeyStore(str(tmp_path / "home"))
    admin, _ = store.create("boss", admin=True)
    plain, _ = store.create("alice")
    return admin, plain


def cookie_of(headers):
    values = headers.getRawHeaders(b"set-cookie") or []
    return values[0].decode() if values else None


@pytest_twisted.ensureDeferred
async def test_page_and_assets_carry_the_security_headers_and_no_inline_script(fake, start_proxy):
    """Every dashboard answer carries the CSP, X-Frame-Options and nosniff, no CORS header; the page
    has no inline script or style."""
    proxy = start_proxy(accounts_config(fake, "work"))
    for path, kind in (("/dashboard", "text/html"), ("/dashboard/", "text/html"),
                       ("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css"),
                       ("/dashboard/favicon.svg", "image/svg+xml"), ("/dashboard/state", "application/json")):
        status, headers, body = await get(proxy.url + path)
        assert status == 200, path
        assert header(headers, b"content-type").startswith(kind), path
        assert header(headers, b"content-security-policy") == CSP.decode()
        assert header(headers, b"x-frame-options") == "DENY"
        assert header(headers, b"x-content-type-options") == "nosniff"
        assert headers.getRawHeaders(b"access-control-allow-origin") is None
    assert "'unsafe-inline'" not in CSP.decode() and "script-src 'self'" in CSP.decode()
    status, _, page = await get(proxy.url + "/dashboard")
    scripts = re.findall(rb"<script[^>]*>", page)
    assert scripts and all(b"src=" in tag for tag in scripts)
    assert b"style=" not in page and b"<style" not in page
    status, headers, _ = await get(proxy.url + "/dashboard/nope")
    assert status == 404 and header(headers, b"x-frame-options") == "DENY"
    status, _, _ = await get(proxy.url + "/dashboard/state", method=b"POST", body=b"{}")
    assert status == 405


@pytest_twisted.ensureDeferred
async def test_the_state_document_shows_the_pool(fake, start_proxy):
    """After one request the state shows the account, its 5h quota from the upstream's headers, the
    request row with its attempt, and the traffic."""
    fake.script("key-work", headers={"anthropic-ratelimit-unified-5h-utilization": "0.4",
                                     "anthropic-ratelimit-unified-status": "allowed"})
    proxy = start_proxy(accounts_config(fake, "work"))
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    status, _, body = await get(proxy.url + "/dashboard/state")
    document = json.loads(body)
    assert document["full"] is True
    (account,) = document["state"]["accounts"]
    assert account["name"] == "work" and account["state"] == "ok"
    assert account["quota"]["5h"]["percent"] == 40 and "7d" not in account["quota"]
    (row,) = document["requests"]
    assert (row["status"], row["account"], row["model"]) == (200, "work", "claude-sonnet-4-5")
    assert row["attempts"][0]["status"] == 200 and row["tokens"]["input"] is not None
    assert len(document["state"]["traffic"]) == 60 and document["state"]["traffic"][-1]["requests"] == 1


@pytest_twisted.ensureDeferred
async def test_with_keys_data_needs_an_admin_key_or_its_session(fake, start_proxy, tmp_path):
    """With keys: the data needs an admin key; a page loaded with it gets a session cookie
    (HttpOnly, Strict, 8 h) that a logout ends."""
    admin, plain = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    base = proxy.url + "/dashboard"
    assert (await get(base))[0] == 200  # the page itself, with its login form
    for path in ("/state", "/events"):
        assert (await get(base + path))[0] == 401
        assert (await get(base + path, {b"authorization": [b"Bearer " + plain.encode()]}))[0] == 401
    status, _, body = await get(base + "/state", {b"authorization": [b"Bearer " + admin.encode()]})
    assert status == 200 and admin.encode() not in body and plain.encode() not in body
    names = [k["name"] for k in json.loads(body)["state"]["keys"]]
    assert names == ["alice", "boss"]
    who = json.loads((await get(base + "/whoami"))[2])
    assert who == {"authenticated": False, "open": False, "loginPossible": True, "session": False}

    # a page loaded with the admin key in its headers gets a session for its own requests
    status, headers, _ = await get(base, {b"authorization": [b"Bearer " + admin.encode()]})
    cookie = cookie_of(headers)
    assert cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Max-Age=28800" in cookie and admin not in cookie
    session = cookie.split(";")[0].encode()
    assert (await get(base + "/state", {b"cookie": [session]}))[0] == 200
    # the session ends on logout
    status, headers, _ = await get(base + "/logout", {b"cookie": [session], b"x-clproxy-dashboard": [b"1"]},
                                   method=b"POST", body=b"")
    assert status == 200 and "Max-Age=0" in cookie_of(headers)
    assert (await get(base + "/state", {b"cookie": [session]}))[0] == 401


@pytest_twisted.ensureDeferred
async def test_login_form_call_is_csrf_safe_typed_and_rate_limited(fake, start_proxy, tmp_path):
    """Login refuses what a cross-site form could send, answers malformed bodies with a typed 401,
    and is rate-limited with a Retry-After."""
    admin, plain = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    url = proxy.url + "/dashboard/login"
    body = json.dumps({"key": admin}).encode()
    # what a cross-site form could send: no custom header, or a foreign Origin
    status, _, answer = await get(url, {b"content-type": [b"application/x-www-form-urlencoded"]},
                                  method=b"POST", body=b"key=" + admin.encode())
    assert status == 403 and admin.encode() not in answer
    status, _, _ = await get(url, login_headers(origin=[b"http://evil.example"]), method=b"POST", body=body)
    assert status == 403
    status, _, answer = await get(url, login_headers(), method=b"POST", body=json.dumps({"key": plain}).encode())
    assert status == 403 and b"admin" in answer and plain.encode() not in answer
    for bad in (b"", b"{", json.dumps({"key": 5}).encode(), b"x" * 10_000):
        status, _, answer = await get(url, login_headers(), method=b"POST", body=bad)
        assert status == 401 and json.loads(answer)["error"]["type"] == "authentication_error"
    # five attempts a minute per address: the sixth is refused with a true wait, even with the right key
    status, headers, answer = await get(url, login_headers(), method=b"POST", body=body)
    assert status == 429 and cookie_of(headers) is None
    assert 1 <= int(header(headers, b"retry-after")) <= 60


@pytest_twisted.ensureDeferred
async def test_login_then_the_session_reads_and_no_key_reaches_the_logs(fake, start_proxy, tmp_path):
    """A login's session reads the state, and neither a good nor a wrong key is written to any file
    under the home."""
    admin, _ = keys(tmp_path)
    proxy = start_proxy(accounts_config(fake, "work"))
    status, headers, answer = await get(proxy.url + "/dashboard/login",
                                        login_headers(origin=[proxy.url.encode()]), method=b"POST",
                                        body=json.dumps({"key": admin}).encode())
    assert status == 200 and json.loads(answer) == {"ok": True}
    session = cookie_of(headers).split(";")[0].encode()
    assert (await get(proxy.url + "/dashboard/state", {b"cookie": [session]}))[0] == 200
    await get(proxy.url + "/dashboard/login", login_headers(), method=b"POST",
              body=json.dumps({"key": admin + "x"}).encode())
    proxy.service.observability.flush()
    written = []
    for folder, _, files in os.walk(str(tmp_path / "home")):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                written.append(f.read())
    assert not any(admin.encode() in blob for blob in written)


@pytest_twisted.ensureDeferred
async def test_the_live_feed_sends_a_full_frame_then_new_requests(fake, start_proxy):
    """The feed sends a full frame at once, then only new requests; a HEAD opens no stream; a
    graceful stop closes open pages at once."""
    proxy = start_proxy(accounts_config(fake, "work"))
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(b"GET", (proxy.url + "/dashboard/events").encode())
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    received = []

    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def dataReceived(self, data):
            received.append(data)

    response.deliverBody(Collect())

    def frames():
        text = b"".join(received).decode()
        return [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if "data: " in b]

    await until(lambda: frames())
    first = frames()[0]
    assert first["full"] and first["state"]["accounts"][0]["name"] == "work" and first["requests"] == []
    feed = proxy.service.feed
    assert len(feed.subscribers) == 1
    status, _, body = await get(proxy.url + "/dashboard/events", method=b"HEAD")
    assert status == 200 and body == b"" and len(feed.subscribers) == 1  # a HEAD opens no stream
    await post(proxy.url + "/v1/messages", request_body())
    await until(lambda: any(f["requests"] for f in frames()[1:]), timeout=5)
    later = [f for f in frames()[1:] if f["requests"]][0]
    assert not later["full"] and later["requests"][0]["account"] == "work"

    # a graceful stop does not wait on an open page: its stream is closed before the drain
    started = reactor.seconds()
    await proxy.service.stopService()
    assert reactor.seconds() - started < 2.0 and not feed.subscribers
    proxy.service.stopService = lambda: defer.succeed(None)  # stopped already: the fixture's stop is moot


@pytest_twisted.ensureDeferred
async def test_revoking_the_admin_key_ends_its_open_live_feeds(fake, start_proxy, tmp_path):
    """An open feed (key in the header, or a login session) ends once its admin key is revoked,
    and reopening it is refused; another admin's feed goes on."""
    admin, _ = keys(tmp_path)
    other, _ = KeyStore(str(tmp_path / "home")).create("ops", admin=True)
    proxy = start_proxy(accounts_config(fake, "work"))
    status, headers, _ = await get(proxy.url + "/dashboard/login", login_headers(), method=b"POST",
                                   body=json.dumps({"key": admin}).encode())
    session = cookie_of(headers).split(";")[0].encode()
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    feeds = {}
    for name, headers in (("bearer", {b"authorization": [b"Bearer " + admin.encode()]}),
                          ("session", {b"cookie": [session]}),
                          ("other", {b"x-api-key": [other.encode()]})):
        response = await agent.request(b"GET", (proxy.url + "/dashboard/events").encode(), Headers(headers))
        assert response.code == 200, name
        feeds[name] = TimedBody()
        response.deliverBody(feeds[name])
    await until(lambda: all(b"event: update" in feed.body for feed in feeds.values()))
    KeyStore(str(tmp_path / "home")).revoke("boss")
    await until(lambda: feeds["bearer"].reason is not None and feeds["session"].reason is not None)
    assert feeds["bearer"].done.result and feeds["session"].done.result  # finished, not broken off
    assert feeds["other"].reason is None and len(proxy.service.feed.subscribers) == 1
    status, _, _ = await get(proxy.url + "/dashboard/events", {b"authorization": [b"Bearer " + admin.encode()]})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_a_login_on_one_instance_lets_the_page_in_on_another_sharing_redis(
        fake, start_proxy, tmp_path, redis_server):  # noqa: F811
    """Sessions live in the shared store: a page logged in through one instance (or worker) is let
    in by the other, and a logout through either ends it for both."""
    admin, _ = keys(tmp_path)
    config = accounts_config(fake, "work")
    config["state"] = {"backend": "redis", "url": redis_server.url, "prefix": unique_prefix()}
    first, second = start_proxy(config), start_proxy(config)
    await until(lambda: first.service.store.available and second.service.store.available)
    status, headers, _ = await get(first.url + "/dashboard/login", login_headers(), method=b"POST",
                                   body=json.dumps({"key": admin}).encode())
    assert status == 200
    session = cookie_of(headers).split(";")[0].encode()
    assert (await get(second.url + "/dashboard/state", {b"cookie": [session]}))[0] == 200
    await get(second.url + "/dashboard/logout", {b"cookie": [session], b"x-clproxy-dashboard": [b"1"]},
              method=b"POST", body=b"")
    assert (await get(first.url + "/dashboard/state", {b"cookie": [session]}))[0] == 401
