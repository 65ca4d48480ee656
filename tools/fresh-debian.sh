#!/bin/bash
# tools/fresh-debian.sh [DIR]: the README's two commands, `make demo` and `make check`, on a fresh Debian 12 as a new
# user meets them (docs/packaging.md, "A fresh machine"). Not part of make check or CI: it takes about half an hour
# and the network; run it by hand before a release, as root, on a Debian or Ubuntu host with debootstrap.
#
#   1. debootstrap --variant=minbase bookworm DIR (default /var/tmp/gpuschedd-fresh): nothing but Debian's minimal base
#   2. git clone of this checkout's HEAD into DIR/root/gpuschedd (what was committed, as a user's clone would have)
#   3. as the root of a mount namespace of its own (pivot_root, as a container's root; the host's /proc, /sys and
#      /dev inside), as root, with a clean environment (PATH, HOME, LANG only):
#        apt-get install make    the one step the README asks for before the two commands
#        make demo               each must install its own prerequisites (tools/prerequisites.sh), wheels, venv
#        make check
#   4. the exit status and duration of each, then DIR is removed (KEEP=1 keeps it; nothing stays mounted: the mounts
#      live in the namespaces, which end with each step)
#
# Knobs (environment): MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm), STEPS (default
# "demo check"), KEEP=1, HOST_CA=0. The certificate authorities this host added itself (/usr/local/share/
# ca-certificates/*.crt) are copied into the fresh system, where the ca-certificates package trusts them once
# installed: behind a proxy that intercepts TLS (this project's CI machines have one) pip reaches PyPI only so.
# HOST_CA=0 leaves them out. On a machine others share, SYSD_NETNS=1 and the sandbox instance names DEMO_NAME, CHECK_NAME,
# PKG_CHECK_NAME are passed through to make, so the guests do not collide with another checkout's.
# Exit status: 0 when every step succeeded, else that of the first that failed.
set -euo pipefail

dir=${1:-/var/tmp/gpuschedd-fresh}
mirror=${MIRROR:-http://deb.debian.org/debian}
suite=${SUITE:-bookworm}
steps=${STEPS:-demo check}
top=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" -eq 0 ] || { echo "fresh-debian: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap > /dev/null || { echo "fresh-debian: apt-get install debootstrap" >&2; exit 2; }
[ ! -e "$dir" ] || { echo "fresh-debian: $dir exists: remove it first" >&2; exit 2; }

cleanup() {
	if [ "${KEEP:-0}" != 1 ]; then rm -rf --one-file-system "$dir" "$dir.debootstrap.log"; else echo "fresh-debian: kept $dir"; fi
}
trap cleanup EXIT

stamp() { date -u +%H:%M:%S; }
echo "fresh-debian: $(stamp) debootstrap $suite into $dir"
t0=$SECONDS
debootstrap --variant=minbase "$suite" "$dir" "$mirror" > "$dir.debootstrap.log" 2>&1 \
	|| { tail -20 "$dir.debootstrap.log" >&2; exit 1; }
echo "fresh-debian: $(stamp) debootstrap done in $((SECONDS - t0)) s"
git clone -q --no-hardlinks "$top" "$dir/root/gpuschedd"
commit=$(git -C "$dir/root/gpuschedd" rev-parse --short HEAD)
echo "fresh-debian: cloned $commit ($(git -C "$top" rev-parse --abbrev-ref HEAD))"
cp /etc/resolv.conf "$dir/etc/resolv.conf"
# As in a chroot or Docker's Debian images: packages do not start services here, where no systemd runs as PID 1
# (the sandboxes of make demo and make check boot their own)
printf '#!/bin/sh\nexit 101\n' > "$dir/usr/sbin/policy-rc.d" && chmod 755 "$dir/usr/sbin/policy-rc.d"
if [ "${HOST_CA:-1}" = 1 ] && compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
	mkdir -p "$dir/usr/local/share/ca-certificates"
	cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
	echo "fresh-debian: the host's own CAs copied in: $(cd /usr/local/share/ca-certificates && echo *.crt)"
fi

# in_fresh CMD: CMD as root in the fresh system, in the clone, with nothing of this shell's environment but what a
# root login would have and the knobs above. The fresh system is the root of a private mount namespace (pivot_root):
# a chroot would not do, since the sandboxes' nsenter enters a namespace at its root mount, which a chroot is not.
in_fresh() {
	local pass=()
	for knob in SYSD_NETNS DEMO_NAME CHECK_NAME PKG_CHECK_NAME; do [ -z "${!knob:-}" ] || pass+=("$knob=${!knob}"); done
	unshare --mount --propagation private -- /bin/bash -euc '
		dir=$1; shift
		mount --bind "$dir" "$dir"
		mount -t proc proc "$dir/proc"
		mount --rbind /sys "$dir/sys"
		mount --rbind /dev "$dir/dev"
		mount -t tmpfs -o mode=755 tmpfs "$dir/run"
		cd "$dir" && mkdir -p .oldroot && pivot_root . .oldroot && cd /
		umount -l /.oldroot && rmdir /.oldroot
		exec "$@"' _ "$dir" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" "${pass[@]}" /bin/bash -c "cd /root/gpuschedd && $*"
}

results=()
rc=0
step() {   # step NAME CMD: run it, record its status and duration
	local name=$1 code start=$SECONDS
	shift
	echo "fresh-debian: $(stamp) == $name"
	if in_fresh "$@"; then code=0; else code=$?; fi
	results+=("$(printf '%-24s exit %-3s %5d s' "$name" "$code" $((SECONDS - start)))")
	[ "$code" -eq 0 ] || [ "$rc" -ne 0 ] || rc=$code
	return 0
}
step "apt-get install make" "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make > /dev/null"
for s in $steps; do
	names=""
	case $s in
	demo) names="${DEMO_NAME:+DEMO_NAME=$DEMO_NAME}" ;;
	check) names="${CHECK_NAME:+CHECK_NAME=$CHECK_NAME} ${PKG_CHECK_NAME:+PKG_CHECK_NAME=$PKG_CHECK_NAME}" ;;
	esac
	step "make $s" "make $s $names"
done

echo "fresh-debian: $(stamp) results (a fresh $suite, $commit):"
printf '  %s\n' "${results[@]}"
exit "$rc"
