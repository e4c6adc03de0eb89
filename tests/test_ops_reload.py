"""Hot reload: ConfigWatcher on a task.Clock (change, touch, debounce, broken config) and SIGHUP."""

import os
import signal

from twisted.internet import task

from clproxy import config as configuration
from clproxy.daemon.reload import ConfigWatcher, install_sighup

GOOD = "routing:\n  strategy: fill-first\n"
OTHER = "routing:\n  strategy: round-robin\n"
BROKEN = "accounts:\n  anthropic:\n    - name: a\n      apiKey: k\n      weight: two\n"


class Harness:
    """A config file, a watcher over it on a task.Clock, and what was applied."""

    def __init__(self, tmp_path, text=GOOD):
        self.path = tmp_path / "proxy-config.yaml"
        self.mtime = 1_000_000_000
        if text is not None:
            self.write(text)
        self.clock = task.Clock()
        self.applied = []
        self.loads = 0
        self.watcher = ConfigWatcher(str(self.path), self.load, self.applied.append, self.clock)

    def load(self, path):
        self.loads += 1
        return configuration.load_config(path, {}).config

    def write(self, text, bump=True):
        self.path.write_text(text)
        if bump:
            self.mtime += 10
        os.utime(self.path, ns=(self.mtime * 10**9, self.mtime * 10**9))

    def tick(self, seconds=1.0):
        self.clock.advance(seconds)

    def settle(self):
        self.tick(1.0)
        self.tick(0.15)


def test_a_changed_file_is_reloaded_once_settled(tmp_path, logs):
    """A content change is picked up at the next poll and applied after the debounce."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.write(OTHER)
    h.tick(1.0)
    assert h.applied == []  # seen, waiting for writes to settle
    h.tick(0.15)
    assert [c.routing.strategy for c in h.applied] == ["round-robin"]
    assert any(f"config reloaded from {h.path}" in line for line in logs)
    h.watcher.stopService()


def test_a_touch_without_change_does_nothing(tmp_path):
    """A new mtime with the same content (touch, editor save) loads nothing."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.write(GOOD)
    h.settle()
    assert h.loads == 0 and h.applied == []
    h.watcher.stopService()


def test_a_broken_config_keeps_the_old_one_and_says_why(tmp_path, logs):
    """An invalid edit is not applied; the log has the ConfigError's one line, and a fix is picked up."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.write(BROKEN)
    h.settle()
    assert h.applied == [] and h.loads == 1
    failures = [line for line in logs if "config reload failed, keeping the previous one:" in line]
    assert len(failures) == 1 and "accounts.anthropic[0].weight" in failures[0]
    h.settle()  # nothing changed since: not retried, not logged again
    assert h.loads == 1
    h.write(OTHER)
    h.settle()
    assert [c.routing.strategy for c in h.applied] == ["round-robin"]
    h.watcher.stopService()


def test_writes_in_quick_succession_reload_once(tmp_path):
    """A file still being written when the debounce ends waits another debounce; one reload in all."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.write("routing:\n")
    h.tick(1.0)          # change seen, debounce armed
    h.tick(0.1)
    h.write(OTHER)       # the rest arrives before the debounce ends
    h.tick(0.05)         # debounce ends, sees a newer file: waits again
    assert h.applied == []
    h.tick(0.15)
    assert [c.routing.strategy for c in h.applied] == ["round-robin"] and h.loads == 1
    h.watcher.stopService()


def test_reload_now_reloads_even_unchanged(tmp_path, logs):
    """An explicit reload (SIGHUP) reloads whatever the file holds."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.watcher.reload_now("SIGHUP")
    assert len(h.applied) == 1 and any("(SIGHUP)" in line for line in logs)
    h.write(BROKEN)
    h.watcher.reload_now("SIGHUP")
    assert len(h.applied) == 1
    assert any("config reload failed, keeping the previous one: accounts.anthropic[0].weight" in line
               for line in logs)
    h.watcher.stopService()


def test_apply_failure_keeps_the_old_config(tmp_path, logs):
    """If installing the new config fails, the failure is logged in one line and the watcher goes on."""
    h = Harness(tmp_path)

    def apply(config):
        raise ValueError("unknown strategy 'x'\nsecond line")

    h.watcher.apply = apply
    h.watcher.startService()
    h.write(OTHER)
    h.settle()
    assert any("keeping the previous one: unknown strategy 'x' second line" in line for line in logs)
    assert h.watcher.failures == 1 and h.watcher.running
    h.watcher.stopService()


def test_a_file_created_later_is_loaded(tmp_path):
    """Started without a config file (defaults), the watcher loads one created afterwards."""
    h = Harness(tmp_path, text=None)
    h.watcher.startService()
    h.settle()
    assert h.loads == 0
    h.write(OTHER)
    h.settle()
    assert [c.routing.strategy for c in h.applied] == ["round-robin"]
    h.watcher.stopService()


def test_a_deleted_file_keeps_the_config(tmp_path, logs):
    """Deleting the config file does not reset the daemon to defaults."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.path.unlink()
    h.settle()
    assert h.loads == 0 and any("disappeared" in line for line in logs)
    h.watcher.stopService()


def test_stop_cancels_every_timer(tmp_path):
    """stopService leaves no poll or debounce call behind on the clock."""
    h = Harness(tmp_path)
    h.watcher.startService()
    h.write(OTHER)
    h.tick(1.0)
    assert h.clock.getDelayedCalls()
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []


class RecordingReactor:
    """Just enough reactor for install_sighup: records callFromThread."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))


def test_sighup_triggers_a_reload_through_the_reactor(tmp_path):
    """SIGHUP schedules watcher.reload_now("SIGHUP") on the reactor thread."""
    h = Harness(tmp_path)
    reactor = RecordingReactor()
    previous = signal.getsignal(signal.SIGHUP)
    try:
        install_sighup(h.watcher, reactor)
        os.kill(os.getpid(), signal.SIGHUP)
        assert reactor.calls == [(h.watcher.reload_now, ("SIGHUP",))]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_watcher_that_does_not_poll_reloads_only_when_told(tmp_path):
    """polling False (a worker: its supervisor watches the file): a change is not picked up, no
    timer runs, and reload_now still reloads."""
    h = Harness(tmp_path)
    h.watcher.polling = False
    h.watcher.startService()
    assert h.clock.getDelayedCalls() == []
    h.write(OTHER)
    h.settle()
    h.settle()
    assert h.applied == []
    h.watcher.reload_now("SIGHUP")
    assert [c.routing.strategy for c in h.applied] == ["round-robin"]
    h.watcher.stopService()
