#!/bin/bash
# sandbox.sh — gpuschedd's system-test harness: boot a REAL systemd as PID 1 of a private PID + mount + cgroup
# namespace, with its own system bus (dbus-daemon), polkitd and journald, on a host whose PID 1 is not systemd.
#
# Why: gpuschedd is a system service. Its tests must install the shipped unit, D-Bus policy and polkit files the way
# a package does, start gpuschedd.service through systemd, and freeze real cgroups with FreezeUnit — without
# touching the host. The guest's root is an overlay: the host root (or SYSD_ROOTFS) as read-only lower layer, a
# tmpfs as upper layer, so `make install` inside writes to RAM and vanishes at `down`. A fresh cgroup2 mount rooted
# at a child cgroup of the host (cgroup namespace) gives the guest a unified hierarchy where freezing works.
# Adapted from ../shared/recipes/boot-systemd.sh (proven there: boot 0.3-0.5 s, teardown 0.1-0.2 s).
#
# Usage (as root):
#   sandbox.sh up               boot; wait until is-system-running is running|degraded and the system bus answers
#   sandbox.sh exec CMD...      run CMD inside: same env, cwd, stdio and exit code, in scope sysd-exec-<pid>.scope
#                               (so the guest's systemd can move its children into other units)
#   sandbox.sh run CMD...       run CMD inside as a transient service (systemd-run --pipe --wait)
#   sandbox.sh with CMD...      up, exec CMD, down (also on failure or Ctrl-C); exits with CMD's exit code
#   sandbox.sh shell            interactive bash inside
#   sandbox.sh status           is the guest up? prints its PID 1 (host PID) and is-system-running
#   sandbox.sh logs             the guest's console and the harness's own log (what to read when boot fails)
#   sandbox.sh pid              host PID of the guest's systemd
#   sandbox.sh down             poweroff, kill leftovers, remove the guest's cgroups and state (idempotent)
#
# Knobs (environment):
#   SYSD_NAME       instance name (default gpuschedd-sandbox); several guests may run at once under different names
#   SYSD_BIND       space-separated host paths bind-mounted read-write at the same path inside (the checkout, a venv,
#                   device nodes such as /dev/nvidia0). Without it the guest sees the host's files only read-only
#                   through the overlay, and nothing under the host's /tmp, /run or /var/tmp.
#   SYSD_ROOTFS     lowest layer of the guest root (default / = the host's own OS tree); never modified
#   SYSD_LOWER      colon-separated extra read-only layers stacked ABOVE SYSD_ROOTFS (leftmost is topmost): e.g. a
#                   tmpfs with unpacked systemd/dbus/polkitd .debs on a host that lacks them (tools/gpu-sandbox.sh).
#                   Each must be its own filesystem: overlayfs refuses overlapping layers (ELOOP).
#   SYSD_STATE      state dir on the host (default /var/tmp/sysd-$SYSD_NAME): pid files, logs, mount points
#   SYSD_TIMEOUT    seconds to wait for boot (default 60)
#   SYSD_NETNS      1 = own network namespace with only lo (default 0: share the host's network)
#   SYSD_WANTS      extra units started at boot, e.g. "systemd-logind.service"
#   SYSD_FAST_DOWN  1 = `down` SIGKILLs the guest instead of a clean poweroff
#   SYSD_EXEC_SCOPE 0 = `exec` leaves CMD in a plain cgroup instead of a transient scope
#
# Inside, /run/systemd/container holds "sysd-sandbox": tests/system checks it before touching anything.
# If the caller is SIGKILLed, the guest keeps running: `SYSD_NAME=... sandbox.sh down` cleans up.
set -euo pipefail

NAME=${SYSD_NAME:-gpuschedd-sandbox}
STATE=${SYSD_STATE:-/var/tmp/sysd-$NAME}
TIMEOUT=${SYSD_TIMEOUT:-60}
BINDS=${SYSD_BIND:-}
NETNS=${SYSD_NETNS:-0}
ROOTFS=${SYSD_ROOTFS:-/}
LOWER=${SYSD_LOWER:-}
FAST_DOWN=${SYSD_FAST_DOWN:-0}
WANTS=${SYSD_WANTS:-}
TARGET=sysd-sandbox.target

die() { echo "sandbox: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d'; }

case "${1:-}" in ''|-h|--help|help) usage; exit 2 ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (it mounts, unshares namespaces and creates cgroups)"

# --- the host's cgroup2 hierarchy (hybrid hosts: /sys/fs/cgroup/unified; unified hosts: /sys/fs/cgroup)
cg2_root() {
	local m
	m=$(awk '$9=="cgroup2"{print $5; exit}' /proc/self/mountinfo)
	[ -n "$m" ] || die "no cgroup2 mount on the host (mount -t cgroup2 none /sys/fs/cgroup/unified?)"
	echo "$m"
}
CG2=$(cg2_root)
CGH=$CG2/sysd-$NAME                # host path of the guest's cgroup-namespace root
CGS=$CG2/sysd-$NAME-supervisor     # holds the `unshare` process, outside the guest's tree

guest_pid() {   # the only child of `unshare --fork` is the guest's PID 1
	local u
	[ -f "$STATE/unshare.pid" ] || return 1
	u=$(cat "$STATE/unshare.pid")
	[ -d "/proc/$u" ] || return 1
	awk '{print $1}' "/proc/$u/task/$u/children" 2>/dev/null
}

alive() {       # pid exists and is not a zombie
	local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
	[ -n "$s" ] && [ "$s" != Z ]
}

running_pid() { # guest PID 1 or die
	local p; p=$(guest_pid 2>/dev/null || true)
	[ -n "$p" ] || die "guest $NAME is not running (tools/sandbox.sh up)"
	echo "$p"
}

# Runs as PID 1 of the new PID namespace, inside the new mount namespace: builds the guest root and execs systemd.
write_inner() {
	cat > "$STATE/inner.sh" <<'INNER'
#!/bin/bash
set -eu
STATE=$1 NAME=$2 TARGET=$3 LOWERDIRS=$4 WANTS=$5; shift 5
# -n everywhere: libmount must not write /run/mount/utab on the host's (shared, on-disk) /run
mount() { command mount -n "$@"; }
R=$STATE/root
mount --make-rprivate /
mount -t tmpfs -o mode=755 "sysd-$NAME-ovl" "$STATE/ovl"
mkdir -p "$STATE/ovl/upper" "$STATE/ovl/work"
mount -t overlay overlay -o "lowerdir=$LOWERDIRS,upperdir=$STATE/ovl/upper,workdir=$STATE/ovl/work" "$R"
cd "$R"
# /proc with a read-only /proc/sys: systemd-sysctl must not change the HOST's kernel settings
mount -t proc -o nosuid,nodev,noexec proc proc
mount --bind proc/sys proc/sys; mount -o remount,bind,ro proc/sys
if [ -e proc/sysrq-trigger ]; then mount --bind proc/sysrq-trigger proc/sysrq-trigger; mount -o remount,bind,ro proc/sysrq-trigger; fi
# read-only /sys (host devices stay out of reach); a writable, pure cgroup2 on /sys/fs/cgroup (FreezeUnit needs it)
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs sys
mount -t cgroup2 -o rw,nosuid,nodev,noexec cgroup2 sys/fs/cgroup
# a minimal private /dev; the console goes to a log file on the host
mount -t tmpfs -o mode=755,nosuid,size=4m "sysd-$NAME-dev" dev
for n in null zero full random urandom tty; do touch "dev/$n"; mount --bind "/dev/$n" "dev/$n"; done
mkdir -p dev/pts dev/shm dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts dev/pts
ln -s pts/ptmx dev/ptmx; ln -s /proc/self/fd dev/fd
ln -s /proc/self/fd/0 dev/stdin; ln -s /proc/self/fd/1 dev/stdout; ln -s /proc/self/fd/2 dev/stderr
touch dev/console; mount --bind "$STATE/console.log" dev/console
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs dev/shm
# fresh /run, /tmp, /var/tmp: tmpfiles' "D /tmp" must never see (and wipe) host files
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs var/tmp
# The guest's users (the system tests' alice and bob) run programs from the shared checkout: every directory above a
# shared path is made traversable for them in the guest (o+x, in the overlay or the guest's tmpfs: no host path is
# bound yet), so a checkout in root's 0700 home, where a fresh machine's root clones it, works as one in /srv does.
# The host's modes do not change.
for b in "$@"; do
	d=$(dirname "$b")
	while [ "$d" != / ]; do mkdir -p ".$d"; chmod o+x ".$d"; d=$(dirname "$d"); done
done
# host paths shared read-write at the same path (after /dev, /tmp... so binds into them survive)
for b in "$@"; do
	[ -e "$b" ] || { echo "SYSD_BIND: $b missing, skipped" >&2; continue; }
	if [ -d "$b" ]; then mkdir -p ".$b"; else mkdir -p ".$(dirname "$b")"; touch ".$b"; fi
	mount --rbind "$b" ".$b"
done
# guest-only configuration (lands in the tmpfs upper layer)
sd=etc/systemd/system
mkdir -p "$sd" etc/tmpfiles.d
rm -f etc/machine-id; tr -d - < /proc/sys/kernel/random/uuid > etc/machine-id
echo "$NAME" > etc/hostname; hostname "$NAME"
ln -sf /dev/null etc/tmpfiles.d/tmp.conf
# nothing that would reach out of the guest, wait for hardware, or start the host's own services
for u in timers.target systemd-journald-audit.socket systemd-timesyncd.service systemd-networkd.service \
         systemd-resolved.service getty.target console-getty.service postgresql.service e2scrub_reap.service \
         cron.service ssh.service ssh.socket apt-daily.service apt-daily-upgrade.service; do
	rm -f "$sd/$u"; ln -s /dev/null "$sd/$u"
done
cat > "$sd/$TARGET" <<EOF
[Unit]
Description=gpuschedd sandbox (journald + system bus + polkitd)
Requires=basic.target dbus.socket
Wants=dbus.service polkit.service $WANTS
After=basic.target dbus.service polkit.service $WANTS
AllowIsolate=yes
EOF
mkdir -p oldroot
pivot_root . oldroot
cd /
umount -l /oldroot; rmdir /oldroot
exec env -i container=sysd-sandbox TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	/lib/systemd/systemd --unit="$TARGET" --show-status=no
INNER
	chmod 755 "$STATE/inner.sh"
}

cmd_up() {
	local p
	p=$(guest_pid 2>/dev/null || true)
	[ -z "$p" ] || die "guest $NAME already running (pid $p); tools/sandbox.sh down first"
	local t0 t1 st i lowerdirs=$ROOTFS
	[ -n "$LOWER" ] && lowerdirs=$LOWER:$ROOTFS
	# any failure below: show why, then tear everything down again
	trap 'rc=$?; if [ $rc != 0 ]; then tail -n 30 "$STATE/unshare.log" "$STATE/console.log" >&2 2>/dev/null; cmd_down >&2; fi' EXIT
	t0=$(date +%s%N)
	rm -rf "$STATE"; mkdir -p "$STATE/ovl" "$STATE/root"
	: > "$STATE/console.log"
	if [ -d "$CGH" ]; then cleanup_cgroup; fi
	mkdir "$CGH"
	write_inner

	local nsflags="--pid --fork --mount --cgroup --uts --ipc --kill-child"
	[ "$NETNS" = 1 ] && nsflags="$nsflags --net"
	# setsid: a Ctrl-C or SIGHUP to the caller's process group must not reach the guest. The pid is recorded from
	# inside (setsid may fork), then bash execs unshare (same pid), already in the guest's cgroup.
	# shellcheck disable=SC2086
	setsid bash -c 'echo $$ > "$1/unshare.pid"; echo $$ > "$2/cgroup.procs"; shift 2; exec "$@"' _ "$STATE" "$CGH" \
		unshare $nsflags -- "$STATE/inner.sh" "$STATE" "$NAME" "$TARGET" "$lowerdirs" "$WANTS" $BINDS \
		> "$STATE/unshare.log" 2>&1 < /dev/null &
	for i in $(seq 1 100); do [ -s "$STATE/unshare.pid" ] && break; sleep 0.02; done

	p=""
	for i in $(seq 1 200); do
		p=$(guest_pid || true); [ -n "$p" ] && break
		alive "$(cat "$STATE/unshare.pid")" || break
		sleep 0.05
	done
	[ -n "$p" ] || die "guest PID 1 did not appear"
	# move `unshare` out of the guest's root cgroup: the guest's systemd wants its root cgroup to itself
	mkdir -p "$CGS"
	cat "$STATE/unshare.pid" > "$CGS/cgroup.procs" || true

	local deadline=$(( $(date +%s) + TIMEOUT ))
	while :; do
		st=$(nsenter -t "$p" -a -- systemctl is-system-running 2>/dev/null || true)
		case "$st" in running|degraded) break ;; esac
		alive "$p" || die "guest died during boot"
		[ "$(date +%s)" -lt "$deadline" ] || {
			nsenter -t "$p" -a -- systemctl list-jobs --no-pager >&2 || true; die "boot timeout (state: $st)"; }
		sleep 0.05
	done
	# the bus must answer before anyone calls busctl (dbus.service is ordered before the target, but be sure)
	for i in $(seq 1 100); do
		nsenter -t "$p" -a -- busctl --system status org.freedesktop.DBus >/dev/null 2>&1 && break
		sleep 0.05
	done
	t1=$(date +%s%N)
	echo "$p" > "$STATE/guest.pid"
	echo "guest $NAME up: pid1=$p state=$st boot=$(( (t1 - t0) / 1000000 ))ms"
	if [ "$st" = degraded ]; then nsenter -t "$p" -a -- systemctl --failed --no-pager >&2 || true; fi
	trap - EXIT
}

# Run CMD inside with the caller's env/cwd/stdio/exit code. The process first joins the guest's cgroup tree (works
# where the host mounts cgroup2 with nsdelegate), then `systemd-run --scope` makes it a real unit, so the guest's
# systemd may move its children into other units (StartTransientUnit PIDs=) and journald attributes it properly.
cmd_exec() {
	local p wd cg="$CGH/sysd-exec.staging" scope=()
	p=$(running_pid)
	mkdir -p "$cg"
	wd=$(pwd); [ -d "/proc/$p/root$wd" ] || wd=/
	[ "${SYSD_EXEC_SCOPE:-1}" = 1 ] && scope=(systemd-run --scope --quiet --collect --unit="sysd-exec-$$"
		--description="sandbox.sh exec" --)
	exec bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" \
		nsenter -t "$p" -a --wdns="$wd" -- "${scope[@]}" "$@"
}

cmd_run() {     # as a transient service, the way `machinectl shell` would
	local p wd
	p=$(running_pid)
	wd=$(pwd); [ -d "/proc/$p/root$wd" ] || wd=/
	exec nsenter -t "$p" -a -- systemd-run --quiet --pipe --wait --collect --service-type=exec \
		--working-directory="$wd" -E PATH="$PATH" ${VIRTUAL_ENV:+-E VIRTUAL_ENV=$VIRTUAL_ENV} -- "$@"
}

cmd_with() {    # up, exec, down: one call for CI and `make check`; the guest never outlives this process
	local rc=0
	cmd_up                               # tears down by itself when boot fails
	trap 'cmd_down >/dev/null' EXIT
	trap 'exit 130' INT TERM HUP
	( cmd_exec "$@" ) || rc=$?
	return "$rc"
}

cmd_status() {
	local p; p=$(guest_pid 2>/dev/null || true)
	[ -n "$p" ] || { echo "guest $NAME: down"; return 3; }
	echo "guest $NAME: pid1=$p state=$(nsenter -t "$p" -a -- systemctl is-system-running 2>/dev/null || true)"
}

cmd_logs() {
	local f
	for f in "$STATE/unshare.log" "$STATE/console.log"; do
		[ -f "$f" ] && { echo "== $f"; cat "$f"; }
	done
	return 0
}

cleanup_cgroup() {
	local d i
	for d in "$CGH" "$CGS"; do
		[ -d "$d" ] || continue
		# kill what is left (cgroup.kill: kernel >= 5.14), then remove depth-first (a frozen cgroup is killed too)
		{ [ -f "$d/cgroup.kill" ] && echo 1 > "$d/cgroup.kill"; } 2>/dev/null || true
		for i in $(seq 1 100); do
			find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
			[ -d "$d" ] || break
			sleep 0.05
		done
		[ -d "$d" ] && echo "sandbox: could not remove $d" >&2
	done
	return 0
}

cmd_down() {
	local u="" p="" i
	[ -f "$STATE/unshare.pid" ] && u=$(cat "$STATE/unshare.pid")
	p=$(guest_pid 2>/dev/null || true)
	if [ -n "$p" ] && [ "$FAST_DOWN" != 1 ]; then
		kill -s SIGRTMIN+4 "$p" 2>/dev/null || true     # = systemctl poweroff: the guest's systemd exits
		for i in $(seq 1 200); do alive "$u" || break; sleep 0.05; done
	fi
	if [ -n "$u" ] && alive "$u"; then
		kill -KILL "$u" 2>/dev/null || true              # --kill-child: the guest's PID 1 gets SIGKILL too
		for i in $(seq 1 100); do alive "$u" || break; sleep 0.05; done
	fi
	cleanup_cgroup
	rm -rf "$STATE"
	echo "guest $NAME down"
}

case "$1" in
	up) cmd_up ;;
	down) cmd_down ;;
	exec) shift; [ $# -gt 0 ] || die "exec: no command"; cmd_exec "$@" ;;
	run) shift; [ $# -gt 0 ] || die "run: no command"; cmd_run "$@" ;;
	with) shift; [ $# -gt 0 ] || die "with: no command"; cmd_with "$@" ;;
	shell) cmd_exec bash -l ;;
	status) cmd_status ;;
	logs) cmd_logs ;;
	pid) guest_pid ;;
	*) usage; exit 2 ;;
esac
