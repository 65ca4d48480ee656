#!/bin/bash
# gpu-sandbox.sh — tools/sandbox.sh on the GPU machine, which has no systemd, dbus or polkitd installed (Ubuntu 24.04
# image, driver under /usr/local/nvidia, PyTorch in /opt/torch/.venv, Python 3.12). Debian 12's systemd, dbus and
# polkitd travel as .deb files (~7.6 MB) and are unpacked into a tmpfs that becomes an extra read-only layer of the
# guest's root (SYSD_LOWER), above the host root; the NVIDIA devices, the driver and PyTorch are bound in.
# Proven with ../shared/recipes/gpu-sandbox.sh: boot to `running` in ~0.4 s; a PyTorch unit checkpointed through
# libcuda from inside the guest, frozen with FreezeUnit, thawed and restored intact.
#
#   here (Debian 12, network):   tools/gpu-sandbox.sh fetch DIR         .debs + Python 3.12 deps into DIR (keep DIR
#                                                                         out of git: .carry/ is ignored)
#   on the GPU machine:           tools/gpu-sandbox.sh pydeps DIR        build systemd-python there: DIR/wheels then
#                                                                         holds every wheel `make install` needs
#                                                                         (install does it when the wheel is missing)
#                                 tools/gpu-sandbox.sh up DIR            boot the guest
#                                 tools/gpu-sandbox.sh install DIR       make install inside, start gpuschedd
#                                 tools/gpu-sandbox.sh exec CMD...       as tools/sandbox.sh exec
#                                 tools/gpu-sandbox.sh with DIR CMD...   up, install, exec CMD, down
#                                 tools/gpu-sandbox.sh down
# SYSD_BIND adds host paths (default: the checkout); SYSD_NAME defaults to "gpu".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SANDBOX=$HERE/sandbox.sh
DEBS="systemd libsystemd-shared libsystemd0 systemd-sysv libpam-systemd dbus dbus-daemon dbus-bin
      dbus-system-bus-common libdbus-1-3 polkitd libpolkit-gobject-1-0 libduktape207 libkmod2 libapparmor1
      libip4tc2 libglib2.0-0"
# what `make install` pulls in, as Python 3.12 wheels (systemd-python has none: built on the GPU machine)
PYWHEELS="dbus-fast psutil nvidia-ml-py prometheus-client setuptools wheel"
ADDROOT=/var/tmp/sysd-addroot      # its own tmpfs: overlayfs refuses overlapping lower layers (ELOOP)
# the interpreter the installed daemon runs under there (Python 3.12, like the carried wheels)
GPU_PYTHON=${GPU_PYTHON:-$(command -v python3)}
export SYSD_NAME=${SYSD_NAME:-gpu}
export SYSD_BIND="$REPO ${SYSD_BIND:-}"

die() { echo "gpu-sandbox: $*" >&2; exit 1; }
need_dir() { [ -n "${1:-}" ] && [ -d "$1" ] || die "give the folder made by: tools/gpu-sandbox.sh fetch DIR"; }

cmd_fetch() {   # on a Debian 12 machine with network
	local dir=$1
	mkdir -p "$dir/debs" "$dir/py" "$dir/wheels"
	# shellcheck disable=SC2086
	(cd "$dir/debs" && apt-get download $DEBS)
	(cd "$dir/py" && apt-get download libsystemd-dev)
	python3 -m pip download -q --no-deps --no-binary :all: -d "$dir/py" systemd-python==235
	# shellcheck disable=SC2086
	python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform any -d "$dir/wheels" $PYWHEELS
	echo "fetched into $dir; carry it to the GPU machine (e.g. as .carry/ of the checkout)"
}

cmd_pydeps() {  # on the GPU machine: a systemd-python wheel built against the carried headers
	local dir=$1 dev=/var/tmp/sysd-libsystemd-dev
	rm -rf "$dev"; dpkg -x "$dir"/py/libsystemd-dev_*.deb "$dev"
	sed -i "s#^prefix=.*#prefix=$dev/usr#" "$dev/usr/lib/x86_64-linux-gnu/pkgconfig/libsystemd.pc"
	# the image has the runtime library, not the -dev symlink
	ln -sf /usr/lib/x86_64-linux-gnu/libsystemd.so.0 "$dev/usr/lib/x86_64-linux-gnu/libsystemd.so"
	PKG_CONFIG_PATH=$dev/usr/lib/x86_64-linux-gnu/pkgconfig CFLAGS="-I$dev/usr/include" \
		LDFLAGS="-L$dev/usr/lib/x86_64-linux-gnu" \
		"$GPU_PYTHON" -m pip wheel -q --no-deps --no-index --find-links "$dir/wheels" -w "$dir/wheels" \
		"$dir"/py/systemd-python-*.tar.gz
	ls "$dir/wheels"
}

cmd_up() {
	local dir=$1 d devs
	[ -d "$dir/debs" ] || die "$dir/debs missing: run fetch first"
	mkdir -p "$ADDROOT"; mountpoint -q "$ADDROOT" || mount -t tmpfs tmpfs "$ADDROOT"
	for d in "$dir"/debs/*.deb; do dpkg -x "$d" "$ADDROOT"; done
	# Debian's packages carry /lib, /bin, /sbin; the host has them as symlinks into /usr: a real directory in the
	# upper layer would hide the host's /lib in the merged root, so move them under /usr.
	for d in lib bin sbin; do
		if [ -d "$ADDROOT/$d" ] && [ ! -L "$ADDROOT/$d" ]; then
			mkdir -p "$ADDROOT/usr/$d"; cp -a "$ADDROOT/$d/." "$ADDROOT/usr/$d/"; rm -rf "${ADDROOT:?}/$d"
		fi
	done
	# the users the packages' maintainer scripts would have created
	mkdir -p "$ADDROOT/etc"; cp /etc/passwd /etc/group "$ADDROOT/etc/"
	add() { grep -q "^$1:" "$ADDROOT/etc/$2" || echo "$3" >> "$ADDROOT/etc/$2"; }
	add messagebus passwd 'messagebus:x:990:990::/nonexistent:/usr/sbin/nologin'
	add messagebus group 'messagebus:x:990:'
	add polkitd passwd 'polkitd:x:991:991::/nonexistent:/usr/sbin/nologin'
	add polkitd group 'polkitd:x:991:'
	add systemd-journal group 'systemd-journal:x:992:'
	devs=$(find /dev -maxdepth 1 -name 'nvidia*' ! -name 'nvidia-caps*' 2>/dev/null | tr '\n' ' ')
	SYSD_LOWER="$ADDROOT" SYSD_BIND="$SYSD_BIND /usr/local/nvidia /opt/torch $devs" "$SANDBOX" up
}

cmd_install() { # inside the guest: the project as a package, from the carried wheels; then start the daemon
	local dir
	dir=$(cd "$1" && pwd)
	compgen -G "$dir/wheels/systemd_python-*.whl" > /dev/null || cmd_pydeps "$dir"
	"$SANDBOX" exec make -C "$REPO" --no-print-directory install PREFIX=/usr PYTHON="$GPU_PYTHON" \
		PIP_FLAGS="--no-index --find-links $dir/wheels"
	"$SANDBOX" exec make -C "$REPO" --no-print-directory post-install PREFIX=/usr
	"$SANDBOX" exec systemctl start gpuschedd.service
	"$SANDBOX" exec systemctl --no-pager status gpuschedd.service
}

cmd_down() {
	"$SANDBOX" down
	umount "$ADDROOT" 2>/dev/null || true
}

case "${1:-}" in
	fetch) need_dir "$(mkdir -p "${2:-}" 2>/dev/null; echo "${2:-}")"; cmd_fetch "$2" ;;
	pydeps) need_dir "${2:-}"; cmd_pydeps "$2" ;;
	up) need_dir "${2:-}"; cmd_up "$2" ;;
	install) need_dir "${2:-}"; cmd_install "$2" ;;
	with)
		need_dir "${2:-}"; dir=$2; shift 2
		cmd_up "$dir"
		trap cmd_down EXIT
		cmd_install "$dir"
		"$SANDBOX" exec "$@" ;;
	exec|run|shell|status|logs|pid) "$SANDBOX" "$@" ;;
	down) cmd_down ;;
	*) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
