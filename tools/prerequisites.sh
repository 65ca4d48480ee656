#!/bin/bash
# tools/prerequisites.sh demo|check|list [demo|check]: the system packages `make demo` and `make check` need, in one
# list (the Makefile and .ci/run both call this script; nothing else names them).
#
#   demo    install what `make demo` needs and is missing   (make demo runs this first)
#   check   install what `make check` needs and is missing  (make check and .ci/run run this first)
#   list    print the Debian names of a set, one a line (default: check)
#
# Debian and Ubuntu: apt-get, as root or through sudo; nothing runs, not even `apt-get update`, when every package is
# there already (one dpkg-query). Elsewhere (Fedora: dnf) it names the missing packages and how to install them, and
# fails. Python must be 3.11 or newer: Debian 12, Ubuntu 24.04+, Fedora 40+.
set -euo pipefail

# Debian name, Fedora name (- where none is needed), the set (demo: also needed by check), and why.
PACKAGES="
python3            python3            demo   the daemon, the CLI, make wheels
python3-pip        python3-pip        demo   make wheels, make install (pip wheel / pip install --target)
python3-dev        python3-devel      demo   builds systemd-python (no wheel on PyPI)
gcc                gcc                demo   builds systemd-python and dbus-python
pkg-config         pkgconf-pkg-config demo   finds libsystemd and libdbus for those builds
libsystemd-dev     systemd-devel      demo   systemd-python (the journal); upgrades systemd within its ABI on Debian 12
make               make               demo   make install inside the sandbox
systemd            systemd            demo   the sandbox boots it as PID 1 of its namespaces
dbus               dbus-daemon        demo   the sandbox's system bus
polkitd            polkit             demo   authorization in the sandbox
util-linux         util-linux         demo   unshare, nsenter, setpriv (tools/sandbox.sh)
libglib2.0-bin     glib2              demo   gdbus (the demo shows a call with it; the tests use it)
python3-venv       python3            check  the development venv (.venv: ruff, pytest)
libdbus-1-dev      dbus-devel         check  builds dbus-python (the tests' D-Bus client)
libglib2.0-dev     glib2-devel        check  builds dbus-python
libxml2-utils      libxml2            check  xmllint (make lint: the D-Bus and polkit XML)
groff-base         groff-base         check  the man page checks
tmux               tmux               check  drives gpusched dashboard on a terminal in the system tests
debhelper          -                  check  make deb (tests/packaging)
build-essential    -                  check  make deb: dpkg-buildpackage refuses to build without it
procps             procps-ng          check  kill, ps, pgrep in the tests (not in a minimal Debian)
dh-python          -                  check  make deb (tests/packaging)
rpm                rpm-build          check  make rpm (tests/packaging)
rpmlint            rpmlint            check  checks the .rpm
cpio               cpio               check  unpacks the .rpm in tests/packaging
lintian            -                  check  checks the .deb (tests/packaging)
python3-psutil     python3-psutil     check  the .deb and .rpm use the distribution's (tests/packaging installs them offline)
python3-systemd    python3-systemd    check  the same
python3-aiohttp    python3-aiohttp    check  the same (the front door)
openmpi-bin        openmpi            check  a model that initializes Open MPI (tests/system/test_real_programs.py)
python3-mpi4py     python3-mpi4py-openmpi check  the same, from Python
"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2; }

# names SET COLUMN: the packages of SET (check includes demo), column 1 (Debian) or 2 (Fedora)
names() {
	local set=$1 column=$2 deb fed used _
	while read -r deb fed used _; do
		[ -n "$deb" ] || continue
		if [ "$set" = check ] || [ "$used" = demo ]; then
			if [ "$column" = 1 ]; then printf '%s\n' "$deb"; elif [ "$fed" != - ]; then printf '%s\n' "$fed"; fi
		fi
	done <<< "$PACKAGES"
}

as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo > /dev/null; then
		echo "prerequisites: sudo $*" >&2
		sudo "$@"
	else
		echo "prerequisites: not root and no sudo: run as root, or install as root: $*" >&2
		exit 1
	fi
}

python_ok() {
	local python=${PYTHON:-/usr/bin/python3}
	"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null && return
	echo "prerequisites: $python is not Python >= 3.11 (Debian 12, Ubuntu 24.04+ and Fedora 40+ have it)" >&2
	exit 1
}

set=${1:-}
case "$set" in
list) names "${2:-check}" 1; exit 0 ;;
demo | check) ;;
*) usage ;;
esac

if command -v dpkg-query > /dev/null && command -v apt-get > /dev/null; then
	mapfile -t wanted < <(names "$set" 1)
	# installed packages print "ii "; absent ones print nothing on stdout (and an error on stderr)
	mapfile -t missing < <(
		dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${wanted[@]}" 2> /dev/null \
			| awk '$1 == "ii" { print $2 }' | sort | comm -13 - <(printf '%s\n' "${wanted[@]}" | sort)
	)
	if [ "${#missing[@]}" -gt 0 ]; then
		echo "prerequisites ($set): installing ${missing[*]}" >&2
		as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
			> /dev/null
	fi
elif command -v rpm > /dev/null && command -v dnf > /dev/null; then
	mapfile -t wanted < <(names "$set" 2 | sort -u)
	mapfile -t missing < <(for p in "${wanted[@]}"; do rpm -q --quiet --whatprovides "$p" || printf '%s\n' "$p"; done)
	if [ "${#missing[@]}" -gt 0 ]; then
		echo "prerequisites ($set): missing ${missing[*]}; install them with" >&2
		echo "  sudo dnf install ${missing[*]}" >&2
		echo "(make deb needs debhelper and dh-python, Debian's; on Fedora use make rpm)" >&2
		exit 1
	fi
else
	echo "prerequisites ($set): no apt-get or dnf here; install the equivalents of these Debian packages:" >&2
	names "$set" 1 | paste -sd' ' >&2
	exit 1
fi
python_ok
