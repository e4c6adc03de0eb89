"""What clproxy needs, as setup.py and debian/control say it: the same packages, the same lower bounds,
the same split between required and optional (orjson optional, txredisapi vendored)."""

import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PyPI name -> Debian package, for every requirement Debian packages
DEBIAN_NAME = {"twisted": "python3-twisted", "treq": "python3-treq", "pyopenssl": "python3-openssl",
               "service-identity": "python3-service-identity", "pyyaml": "python3-yaml",
               "zope.interface": "python3-zope.interface", "attrs": "python3-attr",
               "prometheus-client": "python3-prometheus-client"}


def setup_keywords() -> dict:
    """The literal keyword arguments of setup.py's setup() call."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {}
    for keyword in call.keywords:
        try:
            keywords[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            pass
    return keywords


def requirement(text: str):
    """(lower-case name without extras, lower bound or None) of a requirement string."""
    match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?:>=\s*([0-9.]+))?", text)
    return match.group(1).lower().replace("_", "-"), match.group(3)


def control_depends() -> dict:
    """debian/control's binary Depends: package -> lower bound (or None)."""
    with open(os.path.join(REPO, "debian", "control"), encoding="utf-8") as f:
        text = f.read()
    line = re.search(r"^Depends: (.*)$", text, re.M).group(1)
    depends = {}
    for item in line.split(","):
        item = item.strip()
        if item.startswith("${"):
            continue
        match = re.match(r"^(\S+)(?: \(>= ([^)]+)\))?$", item)
        depends[match.group(1)] = match.group(2)
    return depends


def test_setup_py_and_debian_control_require_the_same():
    """Every install_requires has its Debian package in Depends with the same lower bound, and back."""
    keywords = setup_keywords()
    required = dict(requirement(r) for r in keywords["install_requires"])
    depends = control_depends()
    assert set(DEBIAN_NAME) == set(required), "a requirement has no Debian name (or Debian lacks it)"
    for name, bound in required.items():
        debian = DEBIAN_NAME[name]
        assert debian in depends, f"{name}: {debian} missing from debian/control's Depends"
        assert bound is not None and depends[debian] is not None, f"{name}: no lower bound"
        assert tuple(map(int, depends[debian].split("."))) == tuple(map(int, bound.split("."))), name
    python = keywords["python_requires"].lstrip(">=")
    assert depends["python3"] == python
    assert re.search(rf"^X-Python3-Version: >= {re.escape(python)}$",
                     open(os.path.join(REPO, "debian", "control")).read(), re.M)


def test_orjson_is_optional_and_txredisapi_vendored():
    """Neither orjson, msgspec nor txredisapi is required anywhere: orjson and msgspec are the `fast`
    extra, txredisapi ships."""
    keywords = setup_keywords()
    names = {requirement(r)[0] for r in keywords["install_requires"]}
    assert not names & {"orjson", "msgspec", "txredisapi"}
    assert [requirement(r)[0] for r in keywords["extras_require"]["fast"]] == ["orjson", "msgspec"]
    depends = " ".join(control_depends())
    assert "orjson" not in depends and "msgspec" not in depends and "txredisapi" not in depends
    assert os.path.exists(os.path.join(REPO, "clproxy", "_vendor", "txredisapi.py"))
    assert "Apache License" in open(os.path.join(REPO, "clproxy", "_vendor", "txredisapi.LICENSE")).read()
    assert "Files: clproxy/_vendor/txredisapi.py" in open(os.path.join(REPO, "debian", "copyright")).read()


def test_the_vendored_txredisapi_serves_when_the_system_has_none():
    """Where `import txredisapi` fails (Debian), the Redis store imports clproxy's copy and works."""
    code = ("import builtins\nreal = builtins.__import__\n"
            "def guarded(name, *args, **kwargs):\n"
            "    if name == 'txredisapi':\n        raise ImportError('not installed')\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = guarded\n"
            "import clproxy.state.redis.link as r\n"
            "print(r.txredisapi.__name__, callable(r.txredisapi.Connection))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["clproxy._vendor.txredisapi", "True"]


def test_scripts_test_installs_what_the_package_tests_use():
    """scripts/test (the README's and CI's test command) installs the tools the .deb tests run and
    every Build-Depends of debian/control (dpkg-buildpackage refuses to build without them)."""
    with open(os.path.join(REPO, "scripts", "test"), encoding="utf-8") as f:
        script = f.read()
    needs = dict(re.findall(r"^  ([\w.+-]+):([\w.+-]+)", script, re.M))
    for command, package in (("mmdebstrap", "mmdebstrap"), ("dpkg-buildpackage", "dpkg-dev"),
                             ("dh", "debhelper"), ("dh_python3", "dh-python")):
        assert needs.get(command) == package, command
    packages = re.search(r"^NEED_PACKAGES=\(([^)]*)\)", script, re.M).group(1).split()
    with open(os.path.join(REPO, "debian", "control"), encoding="utf-8") as f:
        build_depends = re.search(r"^Build-Depends: (.*)$", f.read(), re.M).group(1)
    for item in build_depends.split(","):
        name = item.split()[0]
        name = {"debhelper-compat": "debhelper"}.get(name, name)
        assert name in needs.values() or name in packages, f"Build-Depends {name} is not installed by scripts/test"
