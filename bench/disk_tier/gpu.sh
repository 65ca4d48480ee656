#!/bin/bash
# The disk tier's proof on the GPU machine, in one go (docs/disk-tier.md): a swap file on the disk, the disk's own
# write and read bandwidth on that file system (dd, direct I/O), then bench/disk_tier/run.py on the driver path and
# on the agent path (the interposer, built here) of a Qwen2.5-7B-shaped model. Usage, from the repository root, as
# root: bench/disk_tier/gpu.sh OUTDIR   (SWAP_GB: the swap file's size, default 32; SWAPDIR: where, default /var/tmp;
# DRIVER_CASES, AGENT_CASES: run.py's --cases for each path; PATHS: which paths, default "driver agent")
set -u
out=${1:?OUTDIR}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PATH=/usr/local/cuda/bin:$PATH PYTHONPATH=$(pwd)/src PYTHONUNBUFFERED=1
dir=${SWAPDIR:-/var/tmp}; swap=$dir/gpusched-disktier.swap; gb=${SWAP_GB:-32}
date -u; uname -r; nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
echo "zswap: $(cat /sys/module/zswap/parameters/enabled 2>/dev/null || echo absent)  THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled)"
echo "vm.swappiness=$(cat /proc/sys/vm/swappiness) vm.page-cluster=$(cat /proc/sys/vm/page-cluster)"
df -hT "$dir"; free -g
cg=/sys/fs/cgroup/gpusched-disktier-bench
# A run cut short by its timeout leaves its model process frozen in the bench's cgroup, holding the GPU: kill it.
killcg() { [ -d $cg ] || return 0; echo 1 > $cg/cgroup.kill; sleep 2; rmdir $cg; }
export SPILLDIR=$dir/gpusched-spill
cleanup() { killcg; swapoff "$swap" 2>/dev/null; rm -rf "$swap" "$dir/gpusched-disktier.dd" "$SPILLDIR"; }
trap cleanup EXIT
echo "== swap file: $gb GiB on $dir"
swapoff "$swap" 2>/dev/null; rm -f "$swap"
fallocate -l ${gb}G "$swap" || dd if=/dev/zero of="$swap" bs=1M count=$((gb * 1024)) status=none
chmod 600 "$swap" && mkswap "$swap" >/dev/null && swapon "$swap" || exit 1
cat /proc/swaps
# The disk's direct-I/O bandwidth in 64 MiB blocks, one at a time: over 4 GiB (as in earlier runs), and over
# DISK_GB GiB (default 20: a 7B snapshot's size), whose read-back a cache below the VM cannot hold
dd if=/dev/urandom of="$dir/gpusched-disktier.dd.src" bs=64M count=1 status=none
for gib in 4 ${DISK_GB:-20}; do
echo "== disk bandwidth on the same file system ($gib GiB, direct I/O)"
python3 - "$dir/gpusched-disktier.dd" $gib <<'PY'
import os, sys, time
path, block, total = sys.argv[1], 64 << 20, int(sys.argv[2]) << 30
src = open(path + ".src", "rb").read()
import mmap
buf = mmap.mmap(-1, block); buf.write(src)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
t = time.monotonic()
for _ in range(total // block): os.write(fd, buf)
os.fsync(fd); os.close(fd); w = time.monotonic() - t
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
t = time.monotonic()
for _ in range(total // block): os.readv(fd, [buf])
os.close(fd); r = time.monotonic() - t
print(f"disk write {total / w / 1e9:.2f} GB/s ({w:.2f} s), read {total / r / 1e9:.2f} GB/s ({r:.2f} s), 64 MiB blocks")
PY
done
rm -f "$dir/gpusched-disktier.dd" "$dir/gpusched-disktier.dd.src"
echo "+memory" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; echo "root controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
paths=${PATHS:-driver agent}
if [[ " $paths " == *" driver "* ]]; then
	echo "== driver path, Qwen2.5-7B shape"
	timeout 260 python3 bench/disk_tier/run.py driver --size ${SIZE:-7B} ${DRIVER_CASES:+--cases $DRIVER_CASES}
	killcg
fi
if [[ " $paths " == *" agent "* ]] && make -s preload PRELOAD_OUT=/tmp/disktier-preload; then
	echo "== agent path (interposer), Qwen2.5-7B shape"
	PRELOAD=/tmp/disktier-preload/libgpuschedd-preload.so timeout 330 python3 bench/disk_tier/run.py agent \
		--size ${SIZE:-7B} ${AGENT_CASES:+--cases $AGENT_CASES}
fi
date -u
