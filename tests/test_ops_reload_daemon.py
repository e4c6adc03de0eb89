"""Hot reload in the daemon as makeService wires it: server.* is applied to the next request, and
what only a restart can take over is named in the reload's one log line."""

import json

import pytest_twisted

from clproxy import config as configuration
from clproxy.daemon.reload import changed_keys, restart_needed

from conftest import accounts_config
from helpers import post

BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [
    {"role": "user", "content": "x" * 2000}]}).encode()
RESTART = "restart needed for: "


def reload_with(proxy, config) -> None:
    """Rewrite the daemon's config file and reload it (what SIGHUP or the file poll do)."""
    watcher = proxy.service.watcher
    with open(watcher.path, "w") as f:
        json.dump(config, f)
    before = watcher.reloads
    watcher.reload_now("test")
    assert watcher.reloads == before + 1, "the reload failed"


def restart_lines(logs):
    return [line for line in logs if RESTART in line]


def named(line):
    return sorted(line.split(RESTART, 1)[1].split(", "))


@pytest_twisted.ensureDeferred
async def test_a_smaller_max_body_bytes_rejects_the_next_request(fake, start_proxy, logs):
    """A body accepted before the reload is refused with 413 after server.maxBodyBytes shrank."""
    config = accounts_config(fake, "a")
    proxy = start_proxy(config)
    status, _, _ = await post(proxy.url + "/v1/messages", BODY)
    assert status == 200
    reload_with(proxy, dict(config, server={"maxBodyBytes": 1000}))
    status, _, body = await post(proxy.url + "/v1/messages", BODY)
    assert status == 413, body
    assert restart_lines(logs) == []  # server.* needs no restart


@pytest_twisted.ensureDeferred
async def test_new_timeouts_are_used_by_the_next_request(fake, start_proxy):
    """server.upstreamTimeout, then server.requestDeadline, bound the next upstream attempt."""
    config = accounts_config(fake, "a")
    proxy = start_proxy(config)
    upstream = proxy.service.upstream
    timeouts, send = [], upstream.send

    def spy(method, url, headers, body, timeout, clock):
        timeouts.append(timeout)
        return send(method, url, headers, body, timeout, clock)

    upstream.send = spy
    await post(proxy.url + "/v1/messages", BODY)
    assert timeouts[-1] == 600.0  # the default
    reload_with(proxy, dict(config, server={"upstreamTimeout": 7}))
    status, _, _ = await post(proxy.url + "/v1/messages", BODY)
    assert status == 200 and timeouts[-1] == 7.0
    reload_with(proxy, dict(config, server={"requestDeadline": 3}))
    await post(proxy.url + "/v1/messages", BODY)
    assert 2.0 < timeouts[-1] <= 3.0  # what is left of the new deadline, under the default 600


def test_every_server_setting_reaches_its_holder(fake, start_proxy, logs):
    """keepAliveInterval, drainTimeout, connectTimeout and maxConnectionsPerHost are applied live."""
    config = accounts_config(fake, "a")
    proxy = start_proxy(config)
    reload_with(proxy, dict(config, server={"keepaliveInterval": 4, "drainTimeout": 9,
                                            "connectTimeout": 2, "maxConnectionsPerHost": 12}))
    top = proxy.service
    assert top.dispatcher.translation.keepalive_interval == 4.0
    assert top.drainer.timeout == 9.0
    assert top.upstream.pool.maxPersistentPerHost == 12
    assert top.upstream._endpoints._timeout == 2.0
    assert restart_lines(logs) == []


def test_restart_only_keys_are_named_in_one_line(fake, start_proxy, logs):
    """A reload changing state.* and logging.* (with server.*) names exactly those keys, once."""
    config = accounts_config(fake, "a")
    proxy = start_proxy(config)
    reload_with(proxy, dict(config, server={"upstreamTimeout": 30},
                            state={"backend": "redis", "url": "redis://127.0.0.1:6390/0"},
                            logging={"retentionDays": 3}))
    lines = restart_lines(logs)
    assert len(lines) == 1 and "config reloaded from" in lines[0]
    assert named(lines[0]) == ["logging.retentionDays", "state.backend", "state.url"]
    assert proxy.dispatcher.settings.upstream_timeout == 30.0  # the rest was applied all the same
    reload_with(proxy, dict(config, state={"backend": "redis", "url": "redis://127.0.0.1:6390/0"}))
    assert named(restart_lines(logs)[-1]) == ["state.backend", "state.url"]  # still pending
    reload_with(proxy, config)  # back to what the daemon runs on: nothing to restart for
    assert len(restart_lines(logs)) == 2


def test_an_unchanged_server_section_logs_no_restart_line(fake, start_proxy, logs):
    """A reload that changes only what applies live (routing) logs no restart line."""
    config = accounts_config(fake, "a", server={"upstreamTimeout": 30}, state={"prefix": "p"})
    proxy = start_proxy(config)
    reload_with(proxy, dict(config, routing={"strategy": "round-robin"}))
    assert proxy.service.pool.strategy == "round-robin"
    assert restart_lines(logs) == []


def test_changed_keys_walks_the_config_in_its_documented_spelling():
    """changed_keys names leaves as the docs spell them; restart_needed keeps the restart-only ones."""
    old = configuration.load_config(None, {}).config
    text = {"server": {"max_body_bytes": 5}, "providers": {"anthropic": {"refreshBeforeExpiry": 60}},
            "state": {"prefix": "x"}}
    new = configuration.parse_config(json.dumps(text), environ={}).config
    assert changed_keys(old, new) == ["providers.anthropic.refreshBeforeExpiry",
                                      "server.maxBodyBytes", "state.prefix"]
    assert restart_needed(old, new) == ["providers.anthropic.refreshBeforeExpiry", "state.prefix"]
