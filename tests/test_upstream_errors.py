"""What an upstream failure says about itself (``UpstreamError.what``): words, host:port, no secret.

Real loopback servers and a real HTTP client; the response timeout runs on a ``task.Clock``.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.http_headers import Headers

from helpers import until

from clproxy.proxy.upstream import UpstreamClient, UpstreamError, _host_of, read_body


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def client():
    upstream = UpstreamClient(reactor, connect_timeout=5)
    yield upstream
    pytest_twisted.blockon(upstream.close())


def headers():
    return Headers({b"x-api-key": [b"sk-ant-secret"], b"content-type": [b"application/json"]})


@pytest_twisted.ensureDeferred
async def test_refused_connection_says_refused_by_host_port(client):
    """Nothing listening: ``connection refused by 127.0.0.1:PORT``."""
    port = free_port()
    with pytest.raises(UpstreamError) as caught:
        await client.send(b"POST", f"http://127.0.0.1:{port}/v1/messages".encode(), headers(), b"{}",
                          30, reactor)
    assert caught.value.kind == "network"
    assert caught.value.what == f"connection refused by 127.0.0.1:{port}"


@pytest_twisted.ensureDeferred
async def test_no_response_in_time_says_timeout_after(client, fake):
    """No response headers before the timeout: ``timeout after 600 s waiting for HOST:PORT``."""
    fake.pause()
    clock = task.Clock()
    sending = client.send(b"POST", (fake.url + "/v1/messages").encode(), headers(), b"{}", 600, clock)
    await until(lambda: fake.requests)
    clock.advance(600)
    with pytest.raises(UpstreamError) as caught:
        await sending
    host = fake.url.split("://", 1)[1]
    assert caught.value.kind == "timeout"
    assert caught.value.what == f"timeout after 600 s waiting for {host}"
    fake.held.clear()


@pytest_twisted.ensureDeferred
async def test_connection_closed_before_answer_says_so(client, fake):
    """The upstream drops the connection before answering: ``HOST closed the connection before answering``."""
    fake.script(reset=True)
    with pytest.raises(UpstreamError) as caught:
        await client.send(b"POST", (fake.url + "/v1/messages").encode(), headers(), b"{}", 30, reactor)
    host = fake.url.split("://", 1)[1]
    assert caught.value.what == f"{host} closed the connection before answering"


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.ensureDeferred
async def test_body_cut_short_names_host_and_bytes(client, fake, chunked):
    """A body cut short (Content-Length not reached, or no last chunk) is an UpstreamError in words."""
    fake.script(body_cut_at=10, chunked=chunked)
    response = await client.send(b"POST", (fake.url + "/v1/messages").encode(), headers(), b"{}", 30, reactor)
    host = fake.url.split("://", 1)[1]
    with pytest.raises(UpstreamError) as caught:
        await read_body(response, 10 ** 6, host)
    assert caught.value.kind == "network"
    assert caught.value.what == (f"{host} closed the connection after 10 bytes of the answer's body, "
                                 "before its end")
    assert caught.value.message == "upstream " + caught.value.what


@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_is_a_timeout_and_its_connection_is_dropped(client, fake):
    """Head and 10 bytes of body, then silence with the connection open: the read fails as a
    ``timeout`` (as the send's) once the idle timeout has passed with nothing, never before, and the
    connection is closed rather than pooled (its answer was never read whole)."""
    fake.script(body_stall_at=10)
    response = await client.send(b"POST", (fake.url + "/v1/messages").encode(), headers(), b"{}", 30, reactor)
    connection = response._connection
    host = fake.url.split("://", 1)[1]
    clock = task.Clock()
    reading = read_body(response, 10 ** 6, host, clock, 600)
    await until(lambda: response._bodyProtocol is not None and response._bodyProtocol._size == 10)
    for _ in range(599):  # second by second: the idle sweeps run on time, as on a real reactor
        clock.advance(1)
    assert not reading.called  # not a whole timeout of silence yet
    for _ in range(151):  # at most 1.25 times the timeout after the read began (the sweeper's bound)
        clock.advance(1)
    with pytest.raises(UpstreamError) as caught:
        await reading
    assert caught.value.kind == "timeout"
    assert caught.value.what == f"timeout after 600 s waiting for the rest of the body from {host}"
    assert caught.value.message == (f"upstream {host} went silent for 600s in the middle of its "
                                    "answer's body")
    await until(lambda: connection.state == "CLOSED")
    assert not client.http1._idle
    assert clock.getDelayedCalls() == []  # the sweeper let go of it


@pytest_twisted.ensureDeferred
async def test_cancelling_a_body_read_drops_its_connection_and_the_watch(client, fake):
    """The client went away while a whole answer's body was arriving (the dispatcher cancels the
    read): the upstream connection is closed at once and the idle sweeper lets go of the body.

    Before the fix the cancel only failed the Deferred: the body stayed watched, and when it then
    stalled its connection stayed open for ever (the sweeper found the read already ended and
    returned without dropping it)."""
    fake.script(body_stall_at=10)
    response = await client.send(b"POST", (fake.url + "/v1/messages").encode(), headers(), b"{}", 30, reactor)
    connection = response._connection
    clock = task.Clock()
    reading = read_body(response, 10 ** 6, "upstream", clock, 600)
    await until(lambda: response._bodyProtocol is not None and response._bodyProtocol._size == 10)
    reading.cancel()
    reading.addErrback(lambda f: f.trap(defer.CancelledError))
    await until(lambda: connection.state == "CLOSED")
    assert not client.http1._idle  # never pooled: its answer was not read whole
    assert clock.getDelayedCalls() == []  # the sweeper let go of it


def test_host_never_carries_userinfo():
    """A base URL with ``user:password@`` is named by host:port alone."""
    assert _host_of(b"https://user:s3cret@api.example.com:8443/v1/messages") == "api.example.com:8443"
    assert _host_of(b"https://api.anthropic.com/v1/messages") == "api.anthropic.com"

