"""The wiring alone: build_proxy connects the parts, makeService listens on an endpoint string,
`proxy start` runs that same service (as magic-wormhole-mailbox-server's test_service.py does)."""

import json
import os

import pytest
import pytest_twisted
import treq
from twisted.application import service
from twisted.internet import reactor, task

from clproxy import config as configuration
from clproxy.cli import main as cli_main
from clproxy.daemon import tap
from clproxy.daemon.assemble import SharedState, build_proxy, serve
from clproxy.daemon.reload import ConfigWatcher
from clproxy.daemon.upkeep import AccountUpkeep
from clproxy.http.site import MessagesResource
from clproxy.state.memory import MemoryStateStore
from helpers import agent, until
from redis_server import redis_server, unique_prefix  # noqa: F401  (fixture)

CONFIG = {"version": 1, "routing": {"strategy": "fill-first"},
          "accounts": {"anthropic": [
              {"name": "a", "apiKey": "key-a", "baseUrl": "http://127.0.0.1:9", "weight": 3},
              {"name": "b", "apiKey": "key-b", "baseUrl": "http://127.0.0.1:9", "enabled": False}]}}


def loaded(config: dict):
    return configuration.parse_config(json.dumps(config), "test-config.json", environ={}).config


def built(tmp_path, config=CONFIG, clock=None):
    path = tmp_path / "proxy-config.json"
    path.write_text(json.dumps(config))
    return build_proxy(loaded(config), clock=clock or task.Clock(), reactor=reactor, environ={},
                       home=str(tmp_path / "home"), config_path=str(path))


def test_the_parts_are_connected(tmp_path):
    """The dispatcher uses the pool, store and accounts; the site routes to the dispatcher."""
    proxy = built(tmp_path)
    d = proxy.dispatcher
    assert d.pool is proxy.pool and d.store is proxy.store and proxy.pool._store is proxy.store
    assert d.upstream is proxy.upstream and d.translation is proxy.translation
    assert d.quotas is proxy.quotas and d.refresher is proxy.refresher
    assert isinstance(proxy.store, MemoryStateStore)
    messages = proxy.site.resource.children[b"v1"].children[b"messages"]
    assert isinstance(messages, MessagesResource) and messages.dispatcher is d
    assert proxy.site.drainer is proxy.drainer
    # the config's accounts as the pool sees them: weight and enabled kept (the old test wiring lost them)
    accounts = {a.name: a for a in proxy.directory.current()}
    assert accounts["a"].weight == 3 and accounts["a"].enabled
    assert not accounts["b"].enabled
    assert proxy.pool.strategy == "fill-first"


@pytest_twisted.ensureDeferred
async def test_the_services_are_present_and_start_and_stop_on_the_clock(tmp_path):
    """Observability, the shared state (the upkeep under it) and the reload watcher run on the
    injected clock: a changed config file is picked up by advancing it; stopping is clean."""
    clock = task.Clock()
    proxy = built(tmp_path, clock=clock)
    kinds = [type(s) for s in proxy.services]
    assert SharedState in kinds and ConfigWatcher in kinds
    assert isinstance(proxy.upkeep, AccountUpkeep) and proxy.upkeep.parent is proxy.shared_state
    top = service.MultiService()
    for child in proxy.services:
        child.setServiceParent(top)
    top.startService()
    assert proxy.upkeep.running  # the memory store connects at once: the upkeep follows
    (tmp_path / "proxy-config.json").write_text(json.dumps(dict(CONFIG, routing={"strategy": "round-robin"})))
    os.utime(tmp_path / "proxy-config.json", ns=(1, 1))  # a new mtime even within the same tick
    clock.advance(proxy.watcher.interval)
    clock.advance(proxy.watcher.debounce)
    assert proxy.pool.strategy == "round-robin" and proxy.watcher.reloads == 1
    stopped = []
    top.stopService().addCallback(stopped.append)
    assert stopped and not proxy.upkeep.running
    await proxy.upstream.close()


def test_listen_description_is_an_endpoint_string():
    """The listen address becomes a Twisted endpoint string with a backlog of 1024, an IPv6 host like
    ::1 with its colons escaped, so the daemon can listen on either family."""
    assert tap.listen_description("127.0.0.1", 55669) == "tcp:55669:interface=127.0.0.1:backlog=1024"
    assert tap.listen_description("::1", 8080) == r"tcp:8080:interface=\:\:1:backlog=1024"


@pytest_twisted.ensureDeferred
async def test_make_service_with_port_0_listens_on_an_endpoint(tmp_path):
    """makeService on port 0 answers /health on the port it got; stopping closes it."""
    path = tmp_path / "proxy-config.json"
    path.write_text(json.dumps(CONFIG))
    options = {"port": 0, "host": "127.0.0.1", "config": str(path), "strategy": None, "env-file": None,
               "health-interval": 30.0, "debug": False, "quiet": True, "passthrough": False}
    top = tap.makeService(options, reactor, environ={"CLPROXY_HOME": str(tmp_path / "home")})
    assert top.address() is None  # not listening before it starts
    top.startService()
    try:
        host, port = top.address()
        assert host == "127.0.0.1" and port > 0
        response = await agent().request(b"GET", f"http://127.0.0.1:{port}/health".encode())
        assert response.code == 200
        assert json.loads(await treq.content(response))
    finally:
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_a_redis_config_gives_the_redis_store_service(tmp_path, redis_server):  # noqa: F811
    """With state.backend redis, the store is Redis's and the shared-state service connects it."""
    config = dict(CONFIG, state={"backend": "redis", "url": redis_server.url, "prefix": unique_prefix()})
    proxy = built(tmp_path, config, clock=reactor)
    assert type(proxy.store).__name__ == "RedisStateStore" and not proxy.store.available
    assert proxy.shared_state.store is proxy.store and proxy.shared_state in proxy.services
    top = serve(proxy, "tcp:0:interface=127.0.0.1", reactor)
    top.startService()
    try:
        await until(lambda: proxy.store.available)
        assert proxy.upkeep.running
    finally:
        await top.stopService()


def test_an_unreachable_redis_refuses_to_build_without_the_password(tmp_path):
    """A Redis state URL that cannot be reached stops the build (SystemExit) naming 127.0.0.1:9, and the
    message never shows the URL's password, so a failed start leaks no secret to the logs."""
    config = dict(CONFIG, state={"backend": "redis", "url": "redis://:s3cret@127.0.0.1:9/0"})
    with pytest.raises(SystemExit) as e:
        built(tmp_path, config)
    assert "127.0.0.1:9" in str(e.value) and "s3cret" not in str(e.value)


def test_proxy_start_builds_with_the_environment_it_is_given(tmp_path, capsys):
    """`proxy start` goes through makeService with its own environment: the CLPROXY_HOME it is
    given is the one checked (one line, exit 1) before anything is built."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    home = str(blocker / "clproxy-home")
    code = cli_main.start(["--config", str(tmp_path / "missing.yaml"), "--claude-settings", "off"],
                          environ={"CLPROXY_HOME": home, "HOME": str(tmp_path)})
    assert code == 1
    assert f"cannot write to {home}" in capsys.readouterr().err
