"""scripts/lint (layout rules, ruff, mypy on clproxy/) passes on this tree and fails on a violation.

Running it from the tests makes the README's test command, and so CI, fail on a lint violation.
"""

import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_lint(root):
    """``(exit code, stdout + stderr)`` of ``root/scripts/lint`` with this interpreter's ruff and mypy."""
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", os.path.join(str(root), "scripts", "lint")], capture_output=True, text=True,
                            env=env, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_this_tree_is_clean():
    """No layout violation, no ruff finding, no mypy error (outside pyproject.toml's listed modules)."""
    code, output = run_lint(ROOT)
    assert (code, output) == (0, "")


def test_a_violation_fails(tmp_path):
    """A copy of the lint set-up over a small package with one violation of each kind: exit 1, each named."""
    (tmp_path / "scripts").mkdir()
    for name in ("lint", "check_layout.py"):
        shutil.copy(os.path.join(ROOT, "scripts", name), tmp_path / "scripts" / name)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    files = {
        "clproxy/__init__.py": "",
        "clproxy/cli/__init__.py": "",
        "clproxy/daemon/__init__.py": "",
        "clproxy/daemon/tap.py": "def start():\n    from clproxy import cli\n    return cli\n",
        "clproxy/unused.py": "import os\n",
        "clproxy/typed.py": """\
            def half(n: int) -> int:
                return n // 2


            WRONG: str = half(4)
            """,
    }
    for relpath, source in files.items():
        path = tmp_path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    code, output = run_lint(tmp_path)
    assert code == 1
    assert "clproxy/daemon/tap.py:2: clproxy.daemon.tap imports clproxy.cli" in output
    assert "clproxy/unused.py:1:8: F401" in output
    assert "clproxy/typed.py:5: error: Incompatible types in assignment" in output
