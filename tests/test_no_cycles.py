"""A relayed request leaves no reference cycle behind: everything it held is freed by reference
counting the moment it ends, so the daemon can run full garbage collections rarely (a full
collection over a thousand live streams paused them all for 100-150 ms)."""

import gc

import pytest_twisted

from clproxy.proxy import http1
from clproxy.proxy.upstream import ChunkedPassthrough
from clproxy.testing import anthropic as testing
from conftest import accounts_config
from helpers import post, request_body, stream, until

#: the daemon's per-request objects that a cycle used to keep alive until a full collection
PER_REQUEST = {"StreamRelay", "ChunkedPassthrough", "ChunkedBody", "ClientResponse", "ProxyHTTPRequest", "RequestRecord", "TimedSink",
               "ProxyRequest"}


def _cyclic_garbage():
    """What a full collection would free now (only objects found in reference cycles)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


@pytest_twisted.ensureDeferred
async def test_a_streamed_and_a_whole_answer_leave_no_cycle(fake, start_proxy, monkeypatch):
    """After a stream (on the fast path) and a whole answer are relayed, none of their objects waits
    for the collector."""
    taken = []
    original = ChunkedPassthrough.replacing.__func__

    def spy(cls, *args):
        made = original(cls, *args)
        taken.append(made)
        return made

    monkeypatch.setattr(ChunkedPassthrough, "replacing", classmethod(spy))
    proxy = start_proxy(accounts_config(fake, "one"))
    fake.script(events=testing.text_stream(("hello", " there")), pace=0.02)
    response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
    assert await body.done  # warm-up: connections and caches made once are not per-request garbage
    gc.collect()
    gc.disable()
    try:
        # paced: relayed on the fast path after the first event (ChunkedPassthrough)
        fake.script(events=testing.text_stream(("hello", " again", "!")), pace=0.02)
        response, body = await stream(proxy.url + "/v1/messages", request_body(stream=True))
        assert response.code == 200 and await body.done
        status, _headers, _content = await post(proxy.url + "/v1/messages", request_body())
        assert status == 200
        await until(lambda: not proxy.dispatcher.streams)
        garbage = _cyclic_garbage()
    finally:
        gc.enable()
    assert len(taken) == 2 and None not in taken  # both streams went through the fast path
    names = sorted({type(o).__qualname__ for o in garbage} & PER_REQUEST)
    assert names == []
    upstream = fake.url.encode()
    parsers = [o for o in garbage if type(o).__qualname__ == "HTTPClientParser"
               and getattr(getattr(o, "request", None), "uri", b"").startswith(upstream)]
    assert parsers == []  # the daemon's upstream parser (and the request body it holds) is freed
    # nor the upstream client's response, exchange, connection or chunked decoder (the test's
    # own client is twisted's Agent: its Response is not the daemon's)
    ours = [o for o in garbage if type(o).__module__ == http1.__name__
            or getattr(getattr(o, "finishCallback", None), "__self__", None).__class__ is http1.HTTP1Connection]
    assert ours == []


def test_full_collections_are_rarer_than_the_default():
    """The daemon's collector tuning keeps the young threshold, sends what survives a young
    collection to the old generation at the next one, and makes full collections rare."""
    from clproxy.daemon.assemble import FULL_COLLECTION_THRESHOLD, tune_garbage_collector
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == (before[0], 0, FULL_COLLECTION_THRESHOLD)
        assert FULL_COLLECTION_THRESHOLD >= 10 * 10 * 5
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
