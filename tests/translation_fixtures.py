"""Fixtures for translation tests: fake providers on loopback, a recording ``out``, and a daemon with translation."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy import config as configuration
from clproxy.daemon.assemble import build_proxy, serve
from clproxy.proxy.dispatch import ProxyRequest
from clproxy.testing.providers import listen_fake_gemini, listen_fake_openai
from clproxy.proxy.upstream import UpstreamClient
from helpers import RecordingSink


@pytest.fixture
def fake_openai():
    """A fake OpenAI API on a free loopback port."""
    server = listen_fake_openai(reactor)
    yield server
    pytest_twisted.blockon(server.port.stopListening())


@pytest.fixture
def fake_gemini():
    """A fake Gemini API on a free loopback port."""
    server = listen_fake_gemini(reactor)
    yield server
    pytest_twisted.blockon(server.port.stopListening())


@pytest.fixture
def upstream():
    """The shared upstream client, closed after the test."""
    client = UpstreamClient(reactor)
    yield client
    pytest_twisted.blockon(client.close())


def providers_config(fake_openai=None, fake_gemini=None, openai_key="sk-openai-test",
                     gemini_key="gemini-test-key", org_id=None):
    """A ``providers`` config pointing at the fakes (a missing fake gets an unreachable URL)."""
    openai = {"baseUrl": (fake_openai.url if fake_openai else "http://127.0.0.1:9") + "/v1"}
    if openai_key:
        openai["apiKey"] = openai_key
    if org_id:
        openai["orgId"] = org_id
    google = {"baseUrl": fake_gemini.url if fake_gemini else "http://127.0.0.1:9"}
    if gemini_key:
        google["apiKey"] = gemini_key
    return {"openai": openai, "google-ai": google}


def load(config: dict):
    """A validated Config from a dict, with an empty environment (no real keys leak in)."""
    return configuration.parse_config(json.dumps(config), "test-config.json", environ={}).config


class RecordingOut(RecordingSink):
    """The test sink of tests/helpers.py (an IResponseSink that records what was written and can
    play the client leaving), plus the body parsed as JSON."""

    def json(self):
        """The whole answer's body, parsed."""
        return json.loads(self.body)


def claude_request(stream=False, model="claude-sonnet-4-5", path=b"/v1/messages", **extra) -> ProxyRequest:
    """A ProxyRequest carrying a small Claude Messages body."""
    doc = {"model": model, "max_tokens": 32000, "stream": stream,
           "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
           "messages": [{"role": "user", "content": "hi"}]}
    doc.update(extra)
    return ProxyRequest(method=b"POST", path=path, query=b"",
                        headers=[(b"content-type", b"application/json")],
                        body=json.dumps(doc).encode(), model=model, stream=stream)


class TranslationDaemon:
    """A whole daemon from a config dict (build_proxy, as the tap does), listening on a free port."""

    def __init__(self, config: dict, home: str):
        cfg = load(config)
        self.config = cfg
        self.proxy = build_proxy(cfg, clock=reactor, reactor=reactor, environ={}, home=home)
        self.store, self.pool, self.dispatcher = self.proxy.store, self.proxy.pool, self.proxy.dispatcher
        self.router, self.translation = self.dispatcher.router, self.proxy.translation
        self.service = serve(self.proxy, "tcp:0:interface=127.0.0.1", reactor)
        self.service.startService()
        host, port = self.service.address()
        self.url = f"http://{host}:{port}"

    async def counters(self):
        return await self.store.counters()

    def stop(self):
        return self.service.stopService()


@pytest.fixture
def start_daemon(tmp_path):
    """Start a translation-enabled daemon from a config dict; stopped after the test."""
    running = []

    def start(config):
        daemon = TranslationDaemon(config, str(tmp_path / f"home-{len(running)}"))
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        pytest_twisted.blockon(daemon.stop())
