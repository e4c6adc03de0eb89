"""A first run on a fresh machine: the README's two commands, in order, in one venv.

The install tests build real venvs and run pip (marked ``slow``; they run in the normal suite and
fail, never skip, when pip cannot install). To stay quick they install the project with
``--no-deps`` and reach the dependencies through a ``.pth`` line to a copy (of symlinks) of the
running interpreter's site-packages, with any clproxy install left out of it, so only the scratch
venv's own install of the project can expose the twistd plugin.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# twistd's own entry point, run by a scratch venv's interpreter (the venv has no twistd script:
# Twisted reaches it through the .pth line, not through an install of its own).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _is_clproxy_install(name: str) -> bool:
    """Whether a site-packages entry belongs to an install of clproxy (editable or not)."""
    return name.startswith(("clproxy", "__editable__", "__editable___clproxy"))


def _link_tree(source: str, target: str, skip) -> None:
    """``target`` holds a symlink to each entry of ``source`` that ``skip`` does not reject."""
    os.makedirs(target)
    for name in os.listdir(source):
        if not skip(name):
            os.symlink(os.path.join(source, name), os.path.join(target, name))


@pytest.fixture(scope="module")
def deps_dir(tmp_path_factory):
    """The running interpreter's site-packages without clproxy: symlinks to every entry but any
    clproxy install, and Twisted's own plugins without ``claudeproxy_plugin.py`` (a non-editable
    install puts it there) or a plugin cache that may name it."""
    site = sysconfig.get_paths()["purelib"]
    deps = str(tmp_path_factory.mktemp("deps") / "site-packages")
    _link_tree(site, deps, lambda name: _is_clproxy_install(name) or name == "twisted")
    _link_tree(os.path.join(site, "twisted"), os.path.join(deps, "twisted"),
               lambda name: name == "plugins")
    _link_tree(os.path.join(site, "twisted", "plugins"), os.path.join(deps, "twisted", "plugins"),
               lambda name: name in ("claudeproxy_plugin.py", "dropin.cache", "__pycache__"))
    return deps


def scratch_venv(path, deps: str) -> str:
    """A real venv (no system site-packages) whose interpreter also sees ``deps``; its python."""
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(str(path))
    python = os.path.join(str(path), "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "clproxy-test-deps.pth"), "w") as f:
        f.write(deps + "\n")
    return python


def clean_env() -> dict:
    """The environment for the scratch venv's processes: no PYTHONPATH (which could put this tree,
    and so its twisted/plugins/, on the path by itself) and no user site-packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def pip_install(python: str, *args: str) -> None:
    """``pip install --no-deps ARGS`` run in the repository, as the README's commands are."""
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *args], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stdout}{result.stderr}"


def twistd_plugins(python: str) -> str:
    """What ``twistd --help`` lists in the scratch venv."""
    result = subprocess.run([python, "-c", TWISTD, "--help"], cwd=os.path.dirname(python),
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def assert_daemon_commands_work(python: str) -> None:
    """``twistd claudeproxy`` loads the plugin's options and ``clproxy`` runs, outside the tree."""
    assert "claudeproxy" in twistd_plugins(python)
    cwd = os.path.dirname(python)  # not the repository, whose files would be on the path as ''
    result = subprocess.run([python, "-c", TWISTD, "claudeproxy", "--help"], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--port" in result.stdout, result.stdout + result.stderr
    clproxy = os.path.join(os.path.dirname(python), "clproxy")
    result = subprocess.run([clproxy, "--help"], cwd=cwd, env=clean_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "proxy" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_editable_install_exposes_the_twistd_plugin(tmp_path, deps_dir):
    """``pip install -e '.[test]'`` (the test command's install) leaves a venv where twistd lists
    the claudeproxy plugin: an editable install must expose twisted/plugins/, not only clproxy."""
    python = scratch_venv(tmp_path / "venv", deps_dir)
    # Without the project, the plugin must not be visible: else this test would prove nothing.
    assert "claudeproxy" not in twistd_plugins(python)
    pip_install(python, "-e", ".[test]")
    assert_daemon_commands_work(python)


@pytest.mark.slow
def test_readme_order_install_then_editable_keeps_the_plugin(tmp_path, deps_dir):
    """The README's order in one venv: ``pip install .`` (the daemon command), then
    ``pip install -e '.[test]'`` (the test command); the daemon works after each."""
    python = scratch_venv(tmp_path / "venv", deps_dir)
    assert "claudeproxy" not in twistd_plugins(python)
    pip_install(python, ".")
    assert_daemon_commands_work(python)
    pip_install(python, "-e", ".[test]")
    assert_daemon_commands_work(python)


def test_test_script_names_a_missing_tool_in_one_line_and_stops(tmp_path):
    """Without redis-server (nor the Debian packaging tools) on the PATH and with installing forbidden, scripts/test prints one line
    naming what to install and exits non-zero, before making a venv or running pytest."""
    bare = tmp_path / "bin"  # a PATH with only what runs the script: no redis-server, no python
    bare.mkdir()
    for tool in ("env", "bash"):
        os.symlink(shutil.which(tool), bare / tool)
    venv_dir = tmp_path / "venv"
    env = dict(os.environ, PATH=str(bare), CLPROXY_TEST_INSTALL="no", CLPROXY_TEST_VENV=str(venv_dir))
    result = subprocess.run([os.path.join(REPO, "scripts", "test"), "-q"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    sudo = "sudo " if os.geteuid() else ""
    assert output.splitlines() == [
        "scripts/test: missing redis-server, mmdebstrap, dpkg-buildpackage, dh, dh_python3, chromium, "
        f"chromedriver, python3-all, python3-setuptools; install them with: {sudo}apt-get install "
        "redis-server mmdebstrap dpkg-dev debhelper dh-python chromium chromium-driver python3-all "
        "python3-setuptools"], output
    assert not venv_dir.exists(), "the venv was made (and pytest would have run) despite the missing tool"


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's test command and nothing else, so CI and a newcomer run the same."""
    with open(os.path.join(REPO, ".ci", "run")) as f:
        commands = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == 'exec scripts/test "$@"'
    assert not [line for line in commands if re.search(r"\b(apt-get|pip|pytest)\b", line)]
    assert os.access(os.path.join(REPO, "scripts", "test"), os.X_OK)
    with open(os.path.join(REPO, "README.rst")) as f:
        assert "\n    scripts/test\n" in f.read()


def test_benchmarks_readme_names_no_absolute_interpreter():
    """The benchmarks README runs the project's own venv (.venv, as the README makes it), not a
    path that exists on one machine only."""
    with open(os.path.join(REPO, "benchmarks", "README.md")) as f:
        text = f.read()
    assert not re.findall(r"(?<![\w.])/\S*/bin/(?:python|pip)\S*", text)
    assert ".venv/bin/python benchmarks/run.py" in text
