"""The Debian package: built with scripts/build-deb.sh, inspected with dpkg-deb, unpacked into a scratch root."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = "usr/lib/python3/dist-packages"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                reason="dpkg-deb is not installed (Debian/Ubuntu only): cannot build the .deb")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """The package built by scripts/build-deb.sh into a temporary directory."""
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(["sh", os.path.join(REPO, "scripts", "build-deb.sh"), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert os.path.basename(path).startswith("clproxy_") and path.endswith("_all.deb")
    return path


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory):
    """The package's files extracted into a scratch root with `dpkg -x` (no root needed)."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True, timeout=120)
    return root


def dpkg_deb(*args) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def test_control_fields(deb):
    """The package is clproxy, architecture all, depending on Debian's Twisted stack (not txredisapi)."""
    info = dpkg_deb("-I", deb)
    fields = dict(line.strip().split(": ", 1) for line in dpkg_deb("-f", deb).splitlines()
                  if ": " in line and not line.startswith(" "))
    assert fields["Package"] == "clproxy" and fields["Architecture"] == "all"
    assert fields["Version"] == open(os.path.join(REPO, "debian", "changelog")).readline().split("(")[1].split(")")[0]
    depends = fields["Depends"]
    for name in ("python3-twisted", "python3-treq", "python3-yaml", "python3-attr", "python3-zope.interface",
                 "python3-openssl", "python3-service-identity", "adduser"):
        assert name in depends
    assert "txredisapi" not in depends and "${" not in depends
    for script in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert script in info


def test_contents(deb):
    """The data archive holds the package, the plugin, the command, the unit, the conffile and docs, root-owned."""
    listing = dpkg_deb("-c", deb)
    for path in (f"./{DIST}/clproxy/daemon/tap.py", f"./{DIST}/clproxy/cli/main.py", f"./{DIST}/clproxy/daemon/runstate.py",
                 f"./{DIST}/twisted/plugins/claudeproxy_plugin.py", "./usr/bin/clproxy",
                 "./lib/systemd/system/clproxy.service", "./etc/clproxy/proxy-config.yaml",
                 "./usr/share/doc/clproxy/copyright", "./usr/share/doc/clproxy/changelog.gz"):
        assert path in listing, path
    assert "__pycache__" not in listing and "/tests/" not in listing and "build/lib" not in listing
    assert all(" root/root " in line for line in listing.splitlines())


def test_maintainer_scripts(deb, tmp_path):
    """postinst creates the system user, the 0700 state dir and the plugin cache; the scripts parse."""
    subprocess.run(["dpkg-deb", "-e", deb, str(tmp_path)], check=True, timeout=120)
    postinst = (tmp_path / "postinst").read_text()
    assert "adduser --system" in postinst and "useradd --system" in postinst
    assert "install -d -o clproxy -g clproxy -m 0700 /var/lib/clproxy" in postinst
    assert "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" in postinst
    assert "#DEBHELPER#" not in postinst
    assert (tmp_path / "conffiles").read_text().split() == ["/etc/clproxy/proxy-config.yaml"]
    assert "rm -rf /var/lib/clproxy" in (tmp_path / "postrm").read_text()
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(tmp_path / script, os.X_OK)
        subprocess.run(["sh", "-n", str(tmp_path / script)], check=True, timeout=30)


def test_system_unit(unpacked):
    """The system unit runs the daemon as user clproxy with its state in /var/lib/clproxy."""
    unit = (unpacked / "lib/systemd/system/clproxy.service").read_text()
    assert "User=clproxy" in unit and "Environment=CLPROXY_HOME=/var/lib/clproxy" in unit
    assert "--config /etc/clproxy/proxy-config.yaml" in unit and "--claude-settings off" in unit
    assert "Restart=always" in unit and "RestartSec=5" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "WantedBy=multi-user.target" in unit
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify",
                                 str(unpacked / "lib/systemd/system/clproxy.service")],
                                capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "clproxy.service" in line and "/usr/bin/python3" not in line]
        assert not problems, problems


def test_unpacked_tree_runs(unpacked, tmp_path):
    """The unpacked package alone is enough: the command answers --help and twistd finds the plugin."""
    site = str(unpacked / DIST)
    env = dict(os.environ, PYTHONPATH=site, CLPROXY_HOME=str(tmp_path), CLPROXY_CLAUDE_SETTINGS="off")
    result = subprocess.run([sys.executable, "-c", "import clproxy, sys; print(clproxy.__file__)"],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert result.stdout.strip().startswith(site)
    result = subprocess.run([sys.executable, "-m", "clproxy", "proxy", "start", "--help"],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert result.returncode == 0 and "--claude-settings" in result.stdout
    probe = ("from twisted.application.service import IServiceMaker; from twisted.plugin import getPlugins; "
             "import twisted.plugins as p; from twisted.plugins import claudeproxy_plugin as c; "
             "print(c.__file__); print([m.tapname for m in getPlugins(IServiceMaker, p)])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            cwd=str(tmp_path), timeout=60)
    plugin_file, makers = result.stdout.strip().splitlines()
    assert plugin_file.startswith(site) and "claudeproxy" in makers
    config = (unpacked / "etc/clproxy/proxy-config.yaml").read_text()
    from clproxy import config as configuration
    assert configuration.parse_config(config, "proxy-config.yaml", {}).config.routing.strategy == "fill-first"
