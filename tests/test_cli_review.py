"""`clproxy` commands given bad arguments, run as a user runs them: a usage error, exit 2, no traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [
    ["proxy", "status", "--timeout", "-1"],
    ["proxy", "status", "--timeout", "nan"],
    ["proxy", "stop", "--timeout", "nan"],
    ["proxy", "stop", "--timeout", "0"],
])
def test_a_timeout_that_is_not_positive_is_a_usage_error(tmp_path, argv):
    """`--timeout` of status and stop takes positive seconds: -1 or nan is named as a usage error
    (status answered 'cannot read the proxy's status (ValueError ...)'; stop --timeout nan never gave up)."""
    env = dict(os.environ, HOME=str(tmp_path), CLPROXY_HOME=str(tmp_path / "home"),
               CLPROXY_CLAUDE_SETTINGS="off")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "clproxy", *argv], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert "--timeout: must be a positive number of seconds" in done.stderr
    assert "ValueError" not in done.stderr and "Traceback" not in done.stderr
