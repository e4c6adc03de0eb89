"""Integration: issue 13's routing through a real daemon, driven by the anthropic SDK.

Session affinity under round-robin, failover that moves a session for good, the quota rule from the
fake upstream's unified headers, excludedModels and maxConcurrent (with its FIFO queue), all with the
config keys of the issue (routing.session-affinity, routing.quota.switch-at, routing.queue-timeout,
excludedModels, maxConcurrent).
"""

import json
import time

import pytest_twisted
from twisted.internet import defer, reactor, task

from clproxy.testing import anthropic as testing
from conftest import accounts_config
from helpers import in_thread, sdk, until

ROUTING = {"strategy": "round-robin", "session-affinity": {"enabled": True, "ttl": 3600},
           "quota": {"switch-at": 0.9}, "queue-timeout": 30}


def config(fake, *names, routing=None, **per_account):
    """Accounts ``names`` on ``fake`` with issue 13's routing block; ``per_account``: name -> extra
    keys of that account (e.g. ``{"excludedModels": [...]}``)."""
    cfg = accounts_config(fake, *names, routing=dict(ROUTING, **(routing or {})))
    for account in cfg["accounts"]["anthropic"]:
        account.update(per_account.get(account["name"], {}))
    return cfg


def ask(client, session=None, model="claude-sonnet-4-5"):
    headers = {"x-claude-code-session-id": session} if session else {}
    return client.messages.create(model=model, max_tokens=10, extra_headers=headers,
                                  messages=[{"role": "user", "content": "hi"}])


def ask_stream(client, session=None):
    """A streamed answer read to its end; its text."""
    headers = {"x-claude-code-session-id": session} if session else {}
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=10, extra_headers=headers,
                                messages=[{"role": "user", "content": "hi"}]) as events:
        return "".join(events.text_stream)


async def served_by(fake, client, session=None, **kwargs):
    """The credential of the upstream request that answered one SDK call."""
    await in_thread(ask, client, session, **kwargs)
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
async def test_a_session_stays_on_one_account_across_20_requests(fake, start_proxy):
    """Through the real daemon and SDK, a session's 20 requests interleaved with another session and
    sessionless ones all land on one account, while 3 sessionless requests still rotate over a, b, c."""
    proxy = start_proxy(config(fake, "a", "b", "c"))
    client = sdk(proxy)
    one, two = [], []
    for i in range(20):  # interleaved irregularly with the other session and sessionless requests
        one.append(await served_by(fake, client, "session-one"))
        if i % 3 == 0:
            two.append(await served_by(fake, client, "session-two"))
        if i % 4 == 0:
            await served_by(fake, client)
    assert len(one) == 20 and len(set(one)) == 1
    assert len(set(two)) == 1
    sessionless = {await served_by(fake, client) for _ in range(3)}
    assert len(sessionless) == 3  # without a session, round-robin still rotates


@pytest_twisted.ensureDeferred
async def test_a_429_moves_the_session_and_it_stays_moved(fake, start_proxy):
    """A 429 on the session's account moves it to b, and it stays on b for 6 more requests once a has
    cooled down: one upstream request each (9 in all), no flapping back."""
    proxy = start_proxy(config(fake, "a", "b"))
    client = sdk(proxy)
    assert await served_by(fake, client, "s") == "key-a"
    fake.script("key-a", status=429, headers={"retry-after": "1"},
                body=testing.error_json(429, "rate_limit_error", "slow down"), times=1)
    assert await served_by(fake, client, "s") == "key-b"
    assert [r.credential for r in fake.requests] == ["key-a", "key-a", "key-b"]
    await cooled_down(proxy)
    # a is usable again: round-robin alone would send every other request there
    assert [await served_by(fake, client, "s") for _ in range(6)] == ["key-b"] * 6
    assert len(fake.requests) == 9  # no flap back: one upstream request each


@pytest_twisted.ensureDeferred
async def test_an_account_at_95_percent_takes_no_new_session(fake, start_proxy):
    """Under fill-first, an account reporting 95% of its 5-hour quota takes no new session (they go to
    b) while the session already bound to it stays there for 3 more requests."""
    proxy = start_proxy(config(fake, "a", "b", routing={"strategy": "fill-first"}))
    client = sdk(proxy)
    fake.script("key-a", headers=testing.unified_headers(five_hour=0.95, reset=time.time() + 3600))
    assert await served_by(fake, client, "old") == "key-a"  # unknown until now: fill-first takes a
    assert await served_by(fake, client, "new") == "key-b"  # fill-first would say a
    assert await served_by(fake, client, "newer") == "key-b"
    assert [await served_by(fake, client, "old") for _ in range(3)] == ["key-a"] * 3  # it stays


@pytest_twisted.ensureDeferred
async def test_an_opus_request_skips_the_account_that_excludes_opus(fake, start_proxy):
    """An Opus request skips account a, which excludes claude-opus-*, and reaches b with its model
    unchanged, while a Sonnet request is still served by a under fill-first."""
    proxy = start_proxy(config(fake, "a", "b", routing={"strategy": "fill-first"},
                               a={"excludedModels": ["claude-opus-*"]}))
    client = sdk(proxy)
    assert await served_by(fake, client, model="claude-opus-4-1") == "key-b"
    assert await served_by(fake, client, model="claude-sonnet-4-5") == "key-a"
    assert [r.credential for r in fake.requests] == ["key-b", "key-a"]
    assert json.loads(fake.requests[0].body)["model"] == "claude-opus-4-1"


@pytest_twisted.ensureDeferred
async def test_two_paced_streams_with_max_concurrent_1_land_on_two_accounts(fake, start_proxy):
    """Two concurrent paced streams with maxConcurrent 1 on each account land on a and b, where
    fill-first alone would send both to a, and both arrive whole."""
    proxy = start_proxy(config(fake, "a", "b", routing={"strategy": "fill-first"},
                               a={"maxConcurrent": 1}, b={"maxConcurrent": 1}))
    fake.script(None, events=testing.text_stream(["x"] * 5), pace=0.1)
    client = sdk(proxy)
    texts = await defer.gatherResults([in_thread(ask_stream, client), in_thread(ask_stream, client)])
    assert texts == ["xxxxx", "xxxxx"]
    assert sorted(r.credential for r in fake.requests) == ["key-a", "key-b"]  # fill-first would say a, a


@pytest_twisted.ensureDeferred
async def test_all_accounts_capped_the_third_request_waits_for_a_slot(fake, start_proxy):
    """With both accounts at maxConcurrent 1 and streaming, a third request waits in the queue instead
    of failing, is served once a slot frees (3 upstream requests), and the queue ends empty."""
    proxy = start_proxy(config(fake, "a", "b", a={"maxConcurrent": 1}, b={"maxConcurrent": 1}))
    fake.script(None, events=testing.text_stream(["x"] * 5), pace=0.2, times=2)
    client = sdk(proxy)
    streams = [in_thread(ask_stream, client), in_thread(ask_stream, client)]
    await until(lambda: fake.open_streams == 2)
    third = in_thread(ask, client)
    await until(lambda: proxy.dispatcher.gate.queue_length() == 1)
    assert len(fake.requests) == 2 and not third.called  # waiting, not failed
    answer = await third
    assert answer.content[0].text and len(fake.requests) == 3
    assert await defer.gatherResults(streams) == ["xxxxx", "xxxxx"]
    assert proxy.dispatcher.gate.queue_length() == 0
