"""The two ways to build the .deb agree: `dpkg-buildpackage -b -us -uc` (debian/rules, debhelper and
dh-python) and scripts/build-deb.sh (dpkg-deb alone) give the same files, modes, contents and Depends."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a checkout may hold that is not part of the source package
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "dist", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", "*.pyc")

pytestmark = pytest.mark.slow


def tools_or_fail():
    """scripts/test installs these; without them the comparison cannot run, and says so (no skip)."""
    missing = [f"{tool} (apt-get install {package})" for tool, package in
               (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"), ("dh_python3", "dh-python"),
                ("dpkg-deb", "dpkg")) if shutil.which(tool) is None]
    if missing:
        pytest.fail("cannot build the package with debian/rules; missing: " + ", ".join(missing), pytrace=False)


def built(command, cwd) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def listing(deb: str) -> list:
    """(mode, owner, path, link target) of every member of the data archive."""
    out = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        mode, owner, _size, _date, _time, path, *rest = line.split()
        rows.append((mode, owner, path, " ".join(rest)))
    return sorted(rows, key=lambda row: row[2])


def field(deb: str, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def control_file(deb: str, name: str, tmp) -> str:
    """One file of the package's control archive (md5sums, conffiles ...)."""
    if not tmp.exists():
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-e", deb, str(tmp)], check=True)
    return (tmp / name).read_text()


def test_debian_rules_and_build_deb_sh_build_the_same_package(tmp_path):
    """dpkg-buildpackage with debian/rules and scripts/build-deb.sh build the same .deb: the same files,
    control fields and dependencies (python3-prometheus-client among them), md5sums and conffiles."""
    tools_or_fail()
    source = tmp_path / "clproxy"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    built(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=source)  # writes ../clproxy_<v>_all.deb
    (rules_deb,) = [str(p) for p in tmp_path.glob("clproxy_*_all.deb")]
    script_deb = built(["sh", os.path.join(REPO, "scripts", "build-deb.sh"), str(tmp_path / "script")],
                       cwd=REPO).split()[-1]

    assert listing(rules_deb) == listing(script_deb)
    for name in ("Package", "Version", "Architecture", "Depends", "Suggests", "Section", "Priority"):
        assert field(rules_deb, name) == field(script_deb, name), name
    assert "python3-prometheus-client" in field(rules_deb, "Depends")
    # same bytes in every file (dh_md5sums and build-deb.sh both list all but the conffiles)
    assert control_file(rules_deb, "md5sums", tmp_path / "r") == control_file(script_deb, "md5sums", tmp_path / "s")
    assert control_file(rules_deb, "conffiles", tmp_path / "r") == control_file(script_deb, "conffiles", tmp_path / "s")
