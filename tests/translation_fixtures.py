"""Fixtures for translation tests: fake providers on loopback, a recording ``out``, and a daemon with translation."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy import config as configuration
from clproxy.daemon.assemble import build_proxy, serve
from clproxy.proxy.dispatch import ProxyRequest
from clproxy.testing.providers import listen_fake_gemini, listen_fake_openai
from clproxy.proxy.sse import SSEParser
from clproxy.proxy.upstream import UpstreamClient


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


class RecordingOut:
    """A ``ClientResponse`` stand-in that records what was written and can simulate a client leaving."""

    def __init__(self):
        self.disconnected = False
        self.started = False
        self.status = None
        self.headers = []
        self.writes = []
        self.finished = False
        self.cancel = None
        self.producer = None
        self.errors = []

    def on_disconnect(self, cancel):
        self.cancel = cancel

    def start(self, status, headers):
        self.started = True
        self.status = status
        self.headers = list(headers)

    def write(self, data):
        if not self.disconnected:
            self.writes.append(data)

    def finish(self):
        self.finished = True
        self.disconnected = True

    def send(self, status, headers, body):
        self.start(status, headers)
        self.write(body)
        self.finish()

    def send_error(self, error):
        self.errors.append(error)
        self.send(error.status, [(b"content-type", [b"application/json"])]
                  + [(n, [v]) for n, v in error.headers], error.body())

    def register_producer(self, producer):
        self.producer = producer

    def unregister_producer(self):
        self.producer = None

    def disconnect(self):
        """The client goes away."""
        self.disconnected = True
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel()

    # -- reading what was written ---------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return b"".join(self.writes)

    def header(self, name: bytes):
        for key, values in self.headers:
            if key.lower() == name.lower():
                return values[0]
        return None

    def json(self):
        return json.loads(self.body)

    def events(self):
        """The SSE events written, as (name, parsed data)."""
        return [(e.name, json.loads(e.data)) for e in SSEParser().feed(self.body)]


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
