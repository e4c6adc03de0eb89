"""The fake Anthropic's plain-body faults, seen as raw bytes on the wire (what a client really gets)."""

import socket

import pytest
import pytest_twisted

from helpers import in_thread


def exchange(url: str, body: bytes = b'{"model": "claude-sonnet-4-5"}') -> bytes:
    """Send one HTTP/1.1 request (``connection: close``) on a raw socket; every byte until the close."""
    host, port = url.split("://", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nconnection: close\r\nx-api-key: k\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data


def split(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    return lines[0], headers, body


@pytest_twisted.ensureDeferred
async def test_empty_and_non_object_bodies_are_sent_as_scripted(fake):
    """``body=b""`` is a 200 with Content-Length 0; ``body=b"[]"`` a JSON array."""
    fake.script(body=b"", times=1)
    fake.script(body=b"[]", times=1)
    for expected in (b"", b"[]"):
        status, headers, body = split(await in_thread(exchange, fake.url))
        assert status.startswith(b"HTTP/1.1 200")
        assert headers[b"content-length"] == str(len(expected)).encode() and body == expected


@pytest_twisted.ensureDeferred
async def test_body_cut_at_announces_the_whole_body_then_closes(fake):
    """``body_cut_at=N``: Content-Length is the whole message's, only N bytes come, then the close."""
    fake.script(body_cut_at=25)
    status, headers, body = split(await in_thread(exchange, fake.url))
    assert status.startswith(b"HTTP/1.1 200")
    assert len(body) == 25 and int(headers[b"content-length"]) > 25
    assert body.startswith(b'{"id": "msg_fake')


@pytest_twisted.ensureDeferred
async def test_chunked_body_cut_lacks_its_last_chunk(fake):
    """``chunked=True`` with ``body_cut_at``: chunked encoding, no Content-Length, no terminating chunk."""
    fake.script(body=b'{"type": "message", "content": []}', body_cut_at=10, chunked=True)
    status, headers, body = split(await in_thread(exchange, fake.url))
    assert headers[b"transfer-encoding"] == b"chunked" and b"content-length" not in headers
    assert body == b"a\r\n" + b'{"type": "' + b"\r\n"
    assert not body.endswith(b"0\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_chunked_whole_body_ends_with_its_last_chunk(fake):
    """``chunked=True`` alone sends the whole body, properly terminated."""
    fake.script(body=b"[1]", chunked=True)
    _, headers, body = split(await in_thread(exchange, fake.url))
    assert headers[b"transfer-encoding"] == b"chunked"
    assert body == b"3\r\n[1]\r\n0\r\n\r\n"
