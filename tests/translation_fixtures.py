"""Fixtures for translation tests: fake providers on loopback, a recording ``out``, and a daemon with translation."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from clproxy import config as configuration
from clproxy.accounts.model import Account
from clproxy.proxy.dispatch import DispatchSettings, Dispatcher, ProxyRequest
from clproxy.testing.providers import listen_fake_gemini, listen_fake_openai
from clproxy.http.openai import install
from clproxy.routing.pool import AccountPool
from clproxy.routing.router import Router
from clproxy.proxy.sse import SSEParser
from clproxy.state.memory import MemoryStateStore
from clproxy.providers.translation import Translation
from clproxy.proxy.upstream import UpstreamClient
from clproxy.http.site import ProxySite, StatusReport, build_root


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
    """The daemon's pieces wired as tap.makeService does, plus translation and the front door."""

    def __init__(self, config: dict, options=None):
        cfg = load(config)
        self.config = cfg
        self.store = MemoryStateStore()
        self.pool = AccountPool(self.store, strategy=cfg.routing.strategy, clock=reactor)
        self.upstream = UpstreamClient(reactor, connect_timeout=cfg.server.connect_timeout)
        accounts = tuple(Account(key=f"config:{a.name}", name=a.name, secret=a.api_key or "",
                                 base_url=a.base_url or cfg.providers.anthropic.base_url)
                         for a in cfg.accounts)
        self.router = Router.from_config(cfg.routing)
        self.translation = Translation(clock=reactor, upstream=self.upstream, providers=cfg.providers,
                                       keepalive_interval=cfg.server.keepalive_interval,
                                       upstream_timeout=cfg.server.upstream_timeout, store=self.store)
        self.dispatcher = Dispatcher(
            clock=reactor, upstream=self.upstream, pool=self.pool, store=self.store,
            accounts=lambda: accounts,
            settings=DispatchSettings(upstream_timeout=cfg.server.upstream_timeout,
                                      request_deadline=cfg.server.request_deadline),
            router=self.router, translation=self.translation,
            fallback=self.translation.fallback_hook(self.router.fallback_chain))
        status = StatusReport(clock=reactor, pool=self.pool, store=self.store, accounts=lambda: accounts,
                              strategy=lambda: self.pool.strategy, started=reactor.seconds())
        root = build_root(self.dispatcher, status)
        install(root.children[b"v1"], self.dispatcher, self.router, cfg.server.max_body_bytes)
        self.site = ProxySite(root, max_body_bytes=cfg.server.max_body_bytes)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    async def counters(self):
        return await self.store.counters()

    def stop(self):
        d = self.port.stopListening()
        d.addBoth(lambda _: self.upstream.close())
        return d


@pytest.fixture
def start_daemon():
    """Start a translation-enabled daemon from a config dict; stopped after the test."""
    running = []

    def start(config):
        daemon = TranslationDaemon(config)
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        pytest_twisted.blockon(daemon.stop())
