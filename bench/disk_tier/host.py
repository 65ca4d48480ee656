"""The disk tier's kernel side without a GPU (docs/disk-tier.md): a child process's private anonymous memory (as a
frozen model's snapshot is) paged out with gpuschedd.pageout, its clean copies dropped from the swap cache (so the
read-back reads the disk), then read back by touching every page: faulted in page by page (`plain`), after a
read-ahead (`willneed-before`: MADV_WILLNEED, then touch), and with the read-ahead in a thread beside the touch
(`willneed-beside`: what the daemon does during a thaw). Every page is checked.

Usage (root; makes a swap file and a memory cgroup, removes both after):
    PYTHONPATH=src python3 bench/disk_tier/host.py [--mib 1024] [--rounds 3] [--swapfile PATH] [--threads 1,8]
(the swap file: default /var/tmp/gpusched-bench.swap, on the disk to measure)"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time

from gpuschedd import pageout

PAGE = 4096
V2 = "/sys/fs/cgroup/gpusched-disktier-host"
V1 = "/sys/fs/cgroup/memory/gpusched-disktier-host"


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    """A memory cgroup for the child, to drop the swap cache it leaves: memory.reclaim (v2) or a brief limit (v1)."""

    def __init__(self) -> None:
        self.path = V2 if os.path.exists("/sys/fs/cgroup/cgroup.subtree_control") else V1
        os.makedirs(self.path, exist_ok=True)

    def add(self, pid: int) -> None:
        write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def drop(self, nbytes: int) -> None:
        if self.path == V2:
            with contextlib.suppress(OSError):  # EAGAIN: reclaimed less than asked
                write(os.path.join(self.path, "memory.reclaim"), str(nbytes))
        else:
            write(os.path.join(self.path, "memory.limit_in_bytes"), str(8 << 20))
            write(os.path.join(self.path, "memory.limit_in_bytes"), "-1")

    def remove(self) -> None:
        os.rmdir(self.path)


def one(size: int, mode: str, cg: Cgroup, threads: int) -> dict[str, float]:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, size, PAGE):
            buf[off : off + 8] = (off // PAGE + 1).to_bytes(8, "little")
        os.write(from_child, b"r")
        os.read(to_child, 1)
        view = memoryview(buf)
        ok = all(view[off : off + 8] == (off // PAGE + 1).to_bytes(8, "little") for off in range(0, size, PAGE))
        os.write(from_child, b"1" if ok else b"0")
        os._exit(0)
    cg.add(pid)
    os.read(to_parent, 1)
    t0 = time.monotonic()
    pageout.page_out(pid, threads=threads)
    while meminfo("Writeback") > 0:
        time.sleep(0.005)
    out_s = time.monotonic() - t0
    cg.drop(size)
    cached = meminfo("SwapCached")
    t1 = time.monotonic()
    ahead = threading.Thread(target=pageout.prefetch, args=(pid,), kwargs={"threads": threads})
    if mode == "willneed-before":
        pageout.prefetch(pid, threads=threads)
    elif mode == "willneed-beside":
        ahead.start()
    os.write(from_parent, b"t")
    ok = os.read(to_parent, 1) == b"1"
    back_s = time.monotonic() - t1
    if ahead.is_alive():
        ahead.join()
    os.waitpid(pid, 0)
    if not ok:
        raise SystemExit(f"{mode}: a page came back different")
    return dict(out_gbps=size / out_s / 1e9, back_s=back_s, back_gbps=size / back_s / 1e9, cached_mib=cached / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--swapfile", default="/var/tmp/gpusched-bench.swap")
    parser.add_argument("--threads", default="1", help="process_madvise calls at once: each of these (1,8) is tried")
    args = parser.parse_args()
    size = args.mib << 20
    subprocess.run(["fallocate", "-l", str(2 * size), args.swapfile], check=True)
    os.chmod(args.swapfile, 0o600)
    subprocess.run(["mkswap", args.swapfile], check=True, capture_output=True)
    subprocess.run(["swapon", args.swapfile], check=True)
    cg = Cgroup()
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):
            for threads in sorted({int(t) for t in args.threads.split(",")}):
                for mode in ("plain", "willneed-before", "willneed-beside"):
                    rows.setdefault((mode, threads), []).append(one(size, mode, cg, threads))
    finally:
        subprocess.run(["swapoff", args.swapfile], check=False)
        os.unlink(args.swapfile)
        cg.remove()
    print(f"{args.mib} MiB of private anonymous memory, {args.rounds} rounds (median); kernel {os.uname().release}")
    head = f"{'read-back':16} {'threads':>7} {'page-out GB/s':>13} {'read-back s':>11} {'GB/s':>6}"
    print(f"{head} {'swap cache left':>15}")
    for (mode, threads), results in rows.items():

        def med(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"{mode:16} {threads:7} {med('out_gbps'):13.2f} {med('back_s'):11.2f} {med('back_gbps'):6.2f} "
            f"{med('cached_mib'):12.0f} MiB"
        )
    print(f"command: PYTHONPATH=src python3 {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
