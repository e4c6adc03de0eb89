"""Shared fixtures: a fake Anthropic upstream on loopback and a real clproxy daemon in front of it."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from clproxy.observe import console

from clproxy.daemon.tap import makeService
from clproxy.testing.anthropic import listen_fake_anthropic
from helpers import close_sdk_clients


@pytest.fixture(autouse=True)
def sdk_clients_closed():
    """The SDK clients a test made with helpers.sdk() are closed after it."""
    yield
    close_sdk_clients()


@pytest.fixture
def fake():
    """A fake Anthropic API listening on a free loopback port."""
    server = listen_fake_anthropic(reactor)
    yield server
    pytest_twisted.blockon(server.port.stopListening())


class RunningProxy:
    """A started daemon service and the base URL that reaches it."""

    def __init__(self, service):
        self.service = service
        host, port = service.address()
        self.url = f"http://{host}:{port}"

    @property
    def dispatcher(self):
        return self.service.dispatcher


@pytest.fixture
def start_proxy(tmp_path):
    """Start a daemon with a config dict (and options); stopped after the test."""
    running = []

    def start(config=None, environ=None, **options):
        path = tmp_path / "proxy-config.json"
        path.write_text(json.dumps(config or {}))
        opts = {"port": 0, "host": "127.0.0.1", "config": str(path), "strategy": None,
                "env-file": None, "health-interval": 30.0, "debug": False, "quiet": True,
                "passthrough": False}
        opts.update(options)
        service = makeService(opts, reactor, environ={"CLPROXY_HOME": str(tmp_path / "home")}
                              if environ is None else environ)
        service.startService()
        proxy = RunningProxy(service)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        pytest_twisted.blockon(proxy.service.stopService())


def accounts_config(fake, *names, **extra):
    """A config whose accounts (API keys ``key-<name>``) all point at ``fake``."""
    config = {"version": 1, "accounts": {"anthropic": [
        {"name": name, "apiKey": f"key-{name}", "baseUrl": fake.url} for name in names]}}
    config.update(extra)
    return config


@pytest.fixture
def logs():
    """Log lines emitted while the test runs (clproxy's gate opened to info, restored after)."""
    lines = []

    def observer(event):
        lines.append(formatEvent(event))

    previous = console.level()
    console.set_level(LogLevel.info)
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)
    console.set_level(previous)
