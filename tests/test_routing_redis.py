"""Integration: two daemon instances sharing one Redis keep a session on one account (issue 13)."""

import anthropic
import pytest_twisted
from twisted.internet import reactor, task

from clproxy.testing import anthropic as testing
from conftest import accounts_config
from helpers import in_thread, until
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)


def shared_config(fake, url, *names):
    config = accounts_config(fake, *names, routing={
        "strategy": "round-robin", "session-affinity": {"enabled": True, "ttl": 3600}})
    config["state"] = {"backend": "redis", "url": url, "prefix": unique_prefix()}
    return config


def ask(proxy, session=None):
    client = anthropic.Anthropic(base_url=proxy.url, api_key="client-key", max_retries=0)
    headers = {"x-claude-code-session-id": session} if session else {}
    return client.messages.create(model="claude-sonnet-4-5", max_tokens=10, extra_headers=headers,
                                  messages=[{"role": "user", "content": "hi"}])


async def served_by(fake, proxy, session=None):
    await in_thread(ask, proxy, session)
    return fake.requests[-1].credential


async def cooled_down(proxy, timeout=5.0):
    """Wait (on the real reactor) until no account of ``proxy`` is cooling."""
    dispatcher = proxy.dispatcher
    for _ in range(int(timeout / 0.05)):
        if not await dispatcher.pool.cooling(list(dispatcher.accounts())):
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("an account is still cooling")


@pytest_twisted.ensureDeferred
async def test_a_session_bound_through_one_instance_is_served_by_the_same_account_through_the_other(
        fake, start_proxy, redis_server):  # noqa: F811
    """Two daemons sharing one Redis share session bindings: a session bound to a through one stays on a
    through the other, and its move to b after a 429 through the second holds through the first."""
    config = shared_config(fake, redis_server.url, "a", "b")
    one = start_proxy(config)
    two = start_proxy(config)
    await until(lambda: one.service.store.available and two.service.store.available)
    assert await served_by(fake, one, "s") == "key-a"
    # two's own rotation is at a; one sessionless request moves it on to b
    assert await served_by(fake, two) == "key-a"
    assert [await served_by(fake, two, "s") for _ in range(4)] == ["key-a"] * 4  # rotation: b a b a
    # a move made through two is seen by one
    fake.script("key-a", status=429, headers={"retry-after": "1"},
                body=testing.error_json(429, "rate_limit_error", "slow down"), times=1)
    assert await served_by(fake, two, "s") == "key-b"
    await cooled_down(one)  # a is usable again: one's rotation alone would send it every other request
    sent = len(fake.requests)
    assert [await served_by(fake, one, "s") for _ in range(4)] == ["key-b"] * 4
    assert len(fake.requests) == sent + 4
