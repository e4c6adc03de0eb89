"""The package's layout rules (scripts/check_layout.py): on this tree, and on a small tree that breaks each."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_layout.py")


def run_check(root):
    """``(exit code, output lines)`` of check_layout on ``root``."""
    result = subprocess.run([sys.executable, SCRIPT, str(root)], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.splitlines()


def write_tree(root, files):
    """Write ``{relative path: source}`` under ``root``, with an ``__init__.py`` in every package."""
    for relpath, source in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for directory, _dirs, names in os.walk(root / "clproxy"):
        if "__init__.py" not in names:
            open(os.path.join(directory, "__init__.py"), "w").close()


def test_this_tree_follows_the_rules():
    """clproxy as it stands: no cycle, daemon/ never imports cli/, pure modules import no reactor."""
    assert run_check(ROOT) == (0, [])


BAD_TREE = {
    # a module-level cycle, through a relative import
    "clproxy/accounts/a.py": "from clproxy.accounts import b\n",
    "clproxy/accounts/b.py": "import os\nfrom . import a\n",
    # a cycle closed only inside a function: allowed
    "clproxy/accounts/c.py": "from clproxy.accounts import d\n",
    "clproxy/accounts/d.py": "def late():\n    from clproxy.accounts import c\n",
    # a cycle only for the type checker: allowed
    "clproxy/accounts/e.py": "from clproxy.accounts import f\n",
    "clproxy/accounts/f.py": """\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from clproxy.accounts import e
        """,
    # daemon -> cli, inside a function and at module level
    "clproxy/daemon/runstate.py": "def start():\n    from clproxy.cli.guard import spawn\n",
    "clproxy/daemon/tap.py": "from clproxy import cli\n",
    "clproxy/cli/guard.py": "def spawn():\n    pass\n",
    # cli -> daemon is fine
    "clproxy/cli/main.py": "from clproxy.daemon import tap\n",
    # pure modules and the reactor, at module level and inside a function
    "clproxy/routing/pool.py": "from twisted.internet import reactor\n",
    "clproxy/config/load.py": "def read():\n    import twisted.internet.reactor\n",
    "clproxy/translate/openai.py": "from twisted.internet import defer, task\n",
    # a module that is not pure may use the reactor
    "clproxy/daemon/upkeep.py": "from twisted.internet import reactor\n",
    # the fakes: lazily is fine, at import time is not
    "clproxy/testing/anthropic.py": "def default():\n    from twisted.internet import reactor\n    return reactor\n",
    "clproxy/testing/providers.py": "from twisted.internet import reactor as default_reactor\n",
}


def test_a_bad_tree_fails_with_one_line_per_violation(tmp_path):
    """Each violation is one ``path:line: message`` line; what the rules allow is not reported."""
    write_tree(tmp_path, BAD_TREE)
    code, lines = run_check(tmp_path)
    assert code == 1
    assert lines == [
        "clproxy/accounts/a.py:1: import cycle: clproxy.accounts.a -> clproxy.accounts.b -> clproxy.accounts.a",
        "clproxy/config/load.py:2: clproxy.config.load imports the global reactor "
        "(a pure module: take a clock or reactor as a parameter)",
        "clproxy/daemon/runstate.py:2: clproxy.daemon.runstate imports clproxy.cli.guard "
        "(daemon/ must never import cli/)",
        "clproxy/daemon/tap.py:1: clproxy.daemon.tap imports clproxy.cli (daemon/ must never import cli/)",
        "clproxy/routing/pool.py:1: clproxy.routing.pool imports the global reactor "
        "(a pure module: take a clock or reactor as a parameter)",
        "clproxy/testing/providers.py:1: clproxy.testing.providers imports the global reactor at import time "
        "(import it inside the function that needs it, when none was passed)",
    ]


def test_a_clean_tree_passes(tmp_path):
    """Only allowed imports: exit 0 and no output."""
    allowed = {k: v for k, v in BAD_TREE.items()
               if k in ("clproxy/accounts/c.py", "clproxy/accounts/d.py", "clproxy/accounts/e.py",
                        "clproxy/accounts/f.py", "clproxy/cli/main.py", "clproxy/daemon/upkeep.py",
                        "clproxy/testing/anthropic.py", "clproxy/translate/openai.py")}
    allowed["clproxy/daemon/tap.py"] = "import os\n"
    write_tree(tmp_path, allowed)
    assert run_check(tmp_path) == (0, [])


def test_importing_the_fakes_installs_no_reactor():
    """The shipped fakes import the global reactor lazily: a test can still install its own first."""
    code = ("import sys; import clproxy.testing.anthropic, clproxy.testing.providers, clproxy.testing.oauth; "
            "print('twisted.internet.reactor' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
