"""The dashboard in a real headless Chromium, against a real daemon and the fake upstream.

Each test drives the page as a person would (no reload after it opened), reading the stable hooks
(``data-testid``, ``data-state``, ``aria-valuenow``) the issue fixes. Screenshots are written to
``test-artifacts/``.
"""

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from browser import chrome, console_errors, screenshot
from clproxy.team.keystore import KeyStore
from clproxy.testing.anthropic import Script, error_json, unified_headers
from conftest import accounts_config
from helpers import in_thread, post, request_body


def pause(seconds: float):
    """Let the reactor serve for ``seconds`` (between polls of the page, never as an assertion)."""
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def browser():
    driver = chrome()
    yield driver
    driver.quit()


def _attribute(driver, selector: str, name: str):
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].get_attribute(name) if found else None


async def wait_for(driver, selector: str, name: str = None, value=None, timeout: float = 10.0):
    """Wait (polling the page from a thread) until ``selector`` exists, and has ``name`` == ``value``
    when given. Returns the seconds waited."""
    started = time.monotonic()

    def check():
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return False
        return name is None or found[0].get_attribute(name) == value

    while not await in_thread(check):
        if time.monotonic() - started > timeout:
            seen = await in_thread(_attribute, driver, selector, name) if name else None
            raise AssertionError(f"{selector} never had {name}={value!r} (last: {seen!r})")
        await pause(0.05)
    return time.monotonic() - started


def row(name: str) -> str:
    return f"[data-testid=account-row][data-account={name}]"


@pytest_twisted.ensureDeferred
async def test_rows_quota_bars_requests_and_a_429_live(fake, start_proxy, browser):
    """Account rows and states, quota bars equal to the fake's unified headers, request rows, and a
    429 turning its row to cooling within 3 s and back to ok when the cooldown ends, all without a
    reload; no console error."""
    fake.script("key-work", headers=unified_headers(five_hour=0.62, seven_day=0.18))
    proxy = start_proxy(accounts_config(fake, "work", "spare", routing={"strategy": "fill-first"}))
    await in_thread(browser.get, proxy.url + "/dashboard")
    await wait_for(browser, row("work"), "data-state", "ok")
    await wait_for(browser, row("spare"), "data-state", "ok")
    assert await in_thread(_attribute, browser, row("work") + " [data-testid=quota-5h]", "aria-valuenow") is None

    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    await wait_for(browser, row("work") + " [data-testid=quota-5h]", "aria-valuenow", "62")
    await wait_for(browser, row("work") + " [data-testid=quota-7d]", "aria-valuenow", "18")
    # unknown stays unknown: no number is made up for the account that never answered
    assert await in_thread(_attribute, browser, row("spare") + " [data-testid=quota-5h]", "aria-valuenow") is None
    await wait_for(browser, "[data-testid=request-row]", "data-account", "work")
    assert await in_thread(_attribute, browser, "[data-testid=request-row]", "data-status") == "200"
    assert await in_thread(_attribute, browser, "[data-testid=request-row]", "data-model") == "claude-sonnet-4-5"

    fake.clear()
    fake.script("key-work", status=429, headers={"retry-after": "3"},
                body=error_json(429, "rate_limit_error", "slow down"), times=1)
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200  # answered by the spare account
    waited = await wait_for(browser, row("work"), "data-state", "cooling", timeout=3.0)
    assert waited <= 3.0
    countdown = await in_thread(lambda: browser.find_element(By.CSS_SELECTOR, row("work") + " .countdown").text)
    assert countdown.startswith("for ")
    await wait_for(browser, "[data-testid=request-row]", "data-account", "spare")
    await wait_for(browser, "[data-testid=traffic-chart]", "data-rate-limited", "1")
    assert await in_thread(_attribute, browser, "[data-testid=traffic-chart]", "data-requests") == "2"
    await in_thread(screenshot, browser, "dashboard-cooling")
    # the countdown ends when the cooldown does (3 s), without a reload
    await wait_for(browser, row("work"), "data-state", "ok", timeout=5.0)
    rows = await in_thread(lambda: [r.get_attribute("data-account") for r in
                                    browser.find_elements(By.CSS_SELECTOR, "[data-testid=request-row]")])
    assert rows == ["spare", "work"]  # newest first
    assert await in_thread(console_errors, browser) == []


@pytest_twisted.ensureDeferred
async def test_a_request_opens_to_show_its_attempts_by_keyboard(fake, start_proxy, browser):
    """A request row opens (Enter on its button) to show each attempt; it stays open across updates."""
    fake.script("key-a", status=429, headers={"retry-after": "30"},
                body=error_json(429, "rate_limit_error", "slow down"))
    proxy = start_proxy(accounts_config(fake, "a", "b", routing={"strategy": "fill-first"}))
    status, _, _ = await post(proxy.url + "/v1/messages", request_body())
    assert status == 200
    await in_thread(browser.get, proxy.url + "/dashboard")
    await wait_for(browser, "[data-testid=request-row]", "data-account", "b")

    def open_attempts():
        # the page redraws its rows on every update: a button found just before one is gone
        # (stale) by the time it is used, so it is found again, and Enter is sent only while
        # the row is closed (a second Enter would close it)
        for _ in range(50):
            try:
                button = browser.find_element(By.CSS_SELECTOR, "[data-testid=request-row] button")
                if button.get_attribute("aria-expanded") != "true":
                    button.send_keys(Keys.ENTER)
                return browser.find_element(
                    By.CSS_SELECTOR, "[data-testid=request-row] button").get_attribute("aria-expanded")
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError("the request row's button never stayed long enough to be used")

    assert await in_thread(open_attempts) == "true"
    await wait_for(browser, "tr.attempts li")
    await pause(1.5)  # the page gets at least one more update with the row open: it stays open

    def attempt_items():
        for _ in range(50):  # read again if a redraw replaced the items meanwhile
            try:
                return [li.text for li in browser.find_elements(By.CSS_SELECTOR, "tr.attempts li")]
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError("the attempts never stayed long enough to be read")

    items = await in_thread(attempt_items)
    assert len(items) == 2 and "429" in items[0] and "200" in items[1]
    await in_thread(screenshot, browser, "dashboard-attempts")
    assert await in_thread(console_errors, browser) == []


@pytest_twisted.ensureDeferred
async def test_login_flow_with_keys(fake, start_proxy, tmp_path, browser):
    """With client keys the page asks for an admin key; a plain key is refused with a message; the
    admin key logs in (HttpOnly cookie: the page's script cannot read it, the key is nowhere in the
    page) and shows one key row per key; logging out asks again."""
    keys = KeyStore(str(tmp_path / "home"))
    admin_key, _ = keys.create("boss", admin=True)
    plain_key, _ = keys.create("alice", usd_per_day=5.0)
    proxy = start_proxy(accounts_config(fake, "work"))
    await in_thread(browser.get, proxy.url + "/dashboard")
    await wait_for(browser, "#login:not([hidden])")
    assert await in_thread(browser.find_elements, By.CSS_SELECTOR, "[data-testid=account-row]") == []

    def submit(key):
        field = browser.find_element(By.ID, "login-key")
        field.clear()
        field.send_keys(key)
        field.send_keys(Keys.ENTER)

    await in_thread(submit, plain_key)

    def error_text():
        return browser.find_element(By.ID, "login-error").text

    for _ in range(100):
        if await in_thread(error_text):
            break
        await pause(0.05)
    assert "admin" in await in_thread(error_text)

    await in_thread(submit, admin_key)
    await wait_for(browser, row("work"), "data-state", "ok")
    await wait_for(browser, "[data-testid=key-row][data-key=alice]")
    await wait_for(browser, "[data-testid=key-row][data-key=boss]")
    assert await in_thread(browser.execute_script, "return document.cookie") == ""
    cookies = await in_thread(browser.get_cookies)
    session = [c for c in cookies if c["name"] == "clproxy_dashboard"]
    assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    source = await in_thread(lambda: browser.page_source)
    assert admin_key not in source and plain_key not in source
    await in_thread(screenshot, browser, "dashboard-team")
    # the plain key's refused login is the only console error (its 403 answer)
    assert await in_thread(console_errors, browser, ("/dashboard/login",)) == []

    await in_thread(lambda: browser.find_element(By.ID, "logout").click())
    await wait_for(browser, "#login:not([hidden])")
    state = await in_thread(browser.execute_script,
                            "return fetch('/dashboard/state').then(r => r.status)")
    assert state == 401
    assert json.dumps(await in_thread(browser.get_cookies)).count(admin_key) == 0


@pytest_twisted.ensureDeferred
async def test_readable_on_a_phone(fake, start_proxy):
    """On a phone-sized screen nothing but the tables' own scrollers overflows the page."""
    driver = await in_thread(chrome, 390, 844)
    try:
        fake.script("key-work", headers=unified_headers(five_hour=0.91, seven_day=0.4))
        proxy = start_proxy(accounts_config(fake, "work", "spare"))
        await post(proxy.url + "/v1/messages", request_body())
        await in_thread(driver.get, proxy.url + "/dashboard")
        await wait_for(driver, row("work") + " [data-testid=quota-5h]", "aria-valuenow", "91")
        overflow = await in_thread(driver.execute_script,
                                   "return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1
        await in_thread(screenshot, driver, "dashboard-phone")
        assert await in_thread(console_errors, driver) == []
    finally:
        await in_thread(driver.quit)
