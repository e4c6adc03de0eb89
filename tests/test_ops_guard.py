"""The fail-open guard's decisions, on a task.Clock: when it takes the proxy out of Claude Code's settings."""

import io
import json

from twisted.internet import defer, task

from clproxy.daemon import runstate
from clproxy.cli import guard
from clproxy.integrations import claude_settings

PID = 4242
URL = "http://127.0.0.1:4321"


class World:
    """A guarded daemon on paper: its state file, the settings it changed, and switchable liveness."""

    def __init__(self, tmp_path):
        self.clock = task.Clock()
        self.settings = tmp_path / "settings.json"
        self.settings.write_text(json.dumps({"model": "opus"}))
        record = claude_settings.configure(str(self.settings), {"ANTHROPIC_BASE_URL": URL})
        self.state_path = str(tmp_path / "proxy-state.json")
        runstate.write_state(self.state_path, {"pid": PID, "url": URL, "claudeSettings": record,
                                               "guardPid": 99})
        self.alive = True
        self.healthy = True
        self.probes = 0

    def probe(self):
        self.probes += 1
        return defer.succeed(self.healthy)

    def guard(self, failures=3):
        return guard.Guard(clock=self.clock, pid=PID, state_path=self.state_path, probe=self.probe,
                           alive=lambda pid: self.alive, interval=1.0, failures=failures)

    def settings_document(self):
        return json.loads(self.settings.read_text())


def test_clean_shutdown_means_nothing_to_do(tmp_path):
    """When the daemon removed its state file, the guard exits without touching the settings."""
    world = World(tmp_path)
    done = world.guard().start()
    for _ in range(3):
        world.clock.advance(1)
    assert not done.called and world.probes == 4
    runstate.remove_state(world.state_path)
    world.alive = False
    world.clock.advance(1)
    assert "cleaned up" in done.result
    assert world.settings_document()["env"]["ANTHROPIC_BASE_URL"] == URL
    assert world.clock.getDelayedCalls() == []


def test_dead_pid_restores_settings_and_removes_state(tmp_path):
    """A vanished daemon (SIGKILL) is taken out of Claude Code's settings at the next tick."""
    world = World(tmp_path)
    done = world.guard().start()
    world.alive = False
    world.clock.advance(1)
    assert "is gone" in done.result
    assert world.settings_document() == {"model": "opus"}
    assert runstate.read_state(world.state_path) is None


def test_health_failing_n_times_fails_open(tmp_path):
    """A live pid whose /health fails N times in a row is treated as dead; its record stays, minus settings."""
    world = World(tmp_path)
    done = world.guard(failures=3).start()
    world.healthy = False
    world.clock.advance(1)
    world.clock.advance(1)
    assert not done.called
    world.clock.advance(1)
    assert "did not answer /health 3 times" in done.result
    assert world.settings_document() == {"model": "opus"}
    state = runstate.read_state(world.state_path)
    assert state["pid"] == PID and state["claudeSettings"] is None and state["guardPid"] is None


def test_a_success_resets_the_failure_count(tmp_path):
    """Failures must be consecutive: an answer in between starts the count again."""
    world = World(tmp_path)
    done = world.guard(failures=3).start()
    for healthy in (False, False, True, False, False, True):
        world.healthy = healthy
        world.clock.advance(1)
    assert not done.called
    assert world.settings_document()["env"]["ANTHROPIC_BASE_URL"] == URL


def test_probe_errors_count_as_failures(tmp_path):
    """A probe that raises (connection refused, timeout) counts as a failed health check."""
    world = World(tmp_path)
    g = guard.Guard(clock=world.clock, pid=PID, state_path=world.state_path,
                    probe=lambda: defer.fail(ConnectionRefusedError()), alive=lambda pid: True,
                    interval=1.0, failures=2)
    done = g.start()
    world.clock.advance(1)
    assert "did not answer" in done.result


def test_last_look_on_sigterm(tmp_path):
    """On SIGTERM the guard fails open only if the daemon is already dead."""
    world = World(tmp_path)
    g = world.guard()
    done = g.start()
    g.last_look()
    assert done.result == "terminated"
    assert world.settings_document()["env"]["ANTHROPIC_BASE_URL"] == URL

    (tmp_path / "second").mkdir()
    world2 = World(tmp_path / "second")
    g2 = world2.guard()
    done2 = g2.start()
    world2.alive = False
    g2.last_look()
    assert "is gone" in done2.result and world2.settings_document() == {"model": "opus"}


def test_guard_command_without_a_running_proxy(tmp_path):
    """`clproxy proxy guard` with nothing recorded says so in one line and exits 1."""
    out, err = io.StringIO(), io.StringIO()
    code = guard.main([], stdout=out, stderr=err, environ={"CLPROXY_HOME": str(tmp_path)})
    assert code == 1 and "nothing to guard" in err.getvalue() and err.getvalue().count("\n") == 1


def test_guard_command_rejects_bad_numbers(tmp_path):
    """Nonsensical --interval/--failures are a usage error (exit 2)."""
    err = io.StringIO()
    assert guard.main(["--interval", "0"], stdout=io.StringIO(), stderr=err,
                      environ={"CLPROXY_HOME": str(tmp_path)}) == 2
