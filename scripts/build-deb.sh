#!/bin/sh
# Build the clproxy .deb with nothing but dpkg-deb: stage the tree debian/ describes, then pack it.
# Same package as `dpkg-buildpackage -b -us -uc` (debian/rules), without debhelper or dh-python.
#
#   scripts/build-deb.sh [OUTPUT_DIR]      (default: dist/) -> OUTPUT_DIR/clproxy_<version>_all.deb
set -eu
umask 022

top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$top/dist"}
command -v dpkg-deb >/dev/null 2>&1 || { echo "build-deb.sh: dpkg-deb not found (apt-get install dpkg)" >&2; exit 1; }

version=$(sed -n '1s/^clproxy (\([^)]*\)).*/\1/p' "$top/debian/changelog")
[ -n "$version" ] || { echo "build-deb.sh: no version in debian/changelog" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT INT TERM
root="$stage/clproxy"
site="$root/usr/lib/python3/dist-packages"
doc="$root/usr/share/doc/clproxy"

# the Python package (sources only) and the twistd plugin
(cd "$top" && find clproxy -name '*.py' -not -path '*/__pycache__/*') | while read -r f; do
    install -D -m 0644 "$top/$f" "$site/$f"
done
install -D -m 0644 "$top/twisted/plugins/claudeproxy_plugin.py" "$site/twisted/plugins/claudeproxy_plugin.py"
# the dashboard's page: package data, as setup.py's package_data ships it
(cd "$top" && find clproxy/dashboard/static -type f) | while read -r f; do
    install -D -m 0644 "$top/$f" "$site/$f"
done

# the command: the same small script debian/rules installs (not setuptools' entry-point wrapper,
# which needs the egg-info neither build ships)
install -D -m 0755 "$top/debian/clproxy-command" "$root/usr/bin/clproxy"

# debian/clproxy.install
install -D -m 0644 "$top/debian/proxy-config.yaml" "$root/etc/clproxy/proxy-config.yaml"
install -D -m 0644 "$top/etc/clproxy.service" "$root/lib/systemd/system/clproxy.service"

# debian/clproxy.docs, .examples, copyright, changelog
# (compressed as dh_compress would: docs over 4 kB, never copyright or examples)
install -d "$doc"
for f in README.rst docs/operations.rst; do
    [ ! -f "$top/$f" ] || gzip -9n < "$top/$f" > "$doc/$(basename "$f").gz"
done
chmod 0644 "$doc"/*.gz
install -D -m 0644 "$top/etc/proxy-config.example.yaml" "$doc/examples/proxy-config.example.yaml"
install -D -m 0644 "$top/debian/copyright" "$doc/copyright"
gzip -9n < "$top/debian/changelog" > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# DEBIAN/: control from debian/control's binary paragraph, conffiles, maintainer scripts, md5sums
install -d -m 0755 "$root/DEBIAN"
maintainer=$(sed -n 's/^Maintainer: //p' "$top/debian/control" | head -n 1)
section=$(sed -n 's/^Section: //p' "$top/debian/control" | head -n 1)
priority=$(sed -n 's/^Priority: //p' "$top/debian/control" | head -n 1)
# ${python3:Depends} as dh_python3 --no-guessing-deps fills it: the interpreter X-Python3-Version names;
# ${misc:Depends} is empty for this package (no debconf, no init script).
pyver=$(sed -n 's/^X-Python3-Version: *>= *//p' "$top/debian/control" | head -n 1)
python3_depends="python3:any${pyver:+ (>= $pyver~)}"
size=$(du -sk "$root" | cut -f1)
{
    awk '/^Package:/ {p = 1} p' "$top/debian/control" \
        | sed -e "s/\${python3:Depends}/$python3_depends/" -e 's/\${misc:Depends}, //' \
        | awk -v v="$version" -v m="$maintainer" -v s="$size" -v sec="$section" -v pri="$priority" '
            /^Package:/ {print; print "Version: " v; print "Maintainer: " m; print "Installed-Size: " s
                         if (sec != "") print "Section: " sec
                         if (pri != "") print "Priority: " pri
                         next}
            /^$/ {next}
            {print}'
} > "$root/DEBIAN/control"
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    sed '/^#DEBHELPER#$/d' "$top/debian/clproxy.$script" > "$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
done
# md5sums of every file but the conffiles (dpkg tracks those in its own database), as dh_md5sums does
(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -print | sed 's|^\./||' | sort \
    | xargs md5sum) > "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/clproxy_${version}_all.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
