"""The disk tier on a real GPU (docs/disk-tier.md): a Qwen2.5-7B-shaped PyTorch process (bench/transparent/
plain_model.py, random bf16 weights, no network) frozen the daemon's way (driver path: lock, checkpoint, cgroup
freeze; agent path: the interposer's agent parks, then the driver takes the rest), its snapshot paged out to swap,
then thawed from there; figures next to a thaw from RAM, and tokens plus a hash of every weight's bits checked
after every thaw.

Page-out methods: `madvise` (gpuschedd.pageout: process_madvise(MADV_PAGEOUT), what the daemon does) and
`reclaim` (the cgroup's memory.reclaim); on the agent path `spill` first (gpuschedd.spill: the parked bytes written
to an unlinked file in $SPILLDIR with direct I/O, the agent handed it and its host memory given back, as the daemon's
page-out does; the unpark reads the file; `readcheck`: the bench reads the same file first, 4 x 32 MiB, to compare;
its thaw has the agent read the file's first bytes ahead beside the driver's restore, as the daemon's does, unless
`noahead`), then `madvise` for the rest of the process. Every thaw records the process's disk reads per second
(`read_gbps_by_s`). After MADV_PAGEOUT the
pages written to swap stay in RAM as clean swap cache until something needs the memory; `drop` (memory.reclaim of
the same cgroup) frees them, so the thaw that follows reads the disk. `prefetch`: MADV_WILLNEED
(gpuschedd.pageout.prefetch) in a thread beside the restore (`prefetchN`: in N calls at once).
`@N` after a case: N process_madvise calls at once (default: gpuschedd.pageout.THREADS).

Usage (root, on the GPU machine, swap on, cgroup v2 with the memory controller):
    PYTHONPATH=src python3 bench/disk_tier/run.py driver|agent [--size 7B] [--cases ram,madvise+drop,...]
(agent: PRELOAD=path of libgpuschedd-preload.so). One JSON line per cycle, then a table."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import threading
import time

from gpuschedd import pageout, spill
from gpuschedd.agentlink import AgentLink
from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.engine.parking import READ_AHEAD_BYTES

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "transparent"))
from run import Program  # noqa: E402  (the same driven program: bench/transparent/run.py)

# io.py's timed reader (loaded by path: as a module, its name is the standard library's)
_spec = importlib.util.spec_from_file_location("disk_io", os.path.join(HERE, "io.py"))
assert _spec is not None and _spec.loader is not None
disk_io = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(disk_io)

PLAIN = os.path.join(HERE, "..", "transparent", "plain_model.py")
CGROUP = "/sys/fs/cgroup/gpusched-disktier-bench"
SPILL_DIR = os.environ.get("SPILLDIR", "/var/tmp/gpusched-spill")
GIB = 1 << 30
CASES = {
    # most telling first: a run cut short by its timeout still has them
    "driver": "ram,madvise+drop+prefetch,madvise+drop,reclaim,madvise",
    "agent": "ram,spill,spill+madvise+drop+prefetch,madvise+drop+prefetch",
}


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def cg_write(name: str, value: str) -> None:
    with open(os.path.join(CGROUP, name), "w") as f:
        f.write(value)


def cg_freeze(frozen: bool) -> None:
    cg_write("cgroup.freeze", "1" if frozen else "0")
    for _ in range(2000):
        with open(os.path.join(CGROUP, "cgroup.events")) as f:
            if f"frozen {int(frozen)}" in f.read():
                return
        time.sleep(0.005)
    raise SystemExit("cgroup did not freeze/thaw")


def reclaim(nbytes: int) -> float:
    """memory.reclaim of the cgroup; the kernel answers EAGAIN when it reclaimed less than asked."""
    t0 = time.monotonic()
    try:
        cg_write("memory.reclaim", str(nbytes))
    except OSError as e:
        print(f"memory.reclaim: {e}", file=sys.stderr)
    return time.monotonic() - t0


def wait_written(timeout: float = 120) -> float:
    """Until the kernel has no swap writes in flight (Writeback: 0): when a page-out's data is on the disk."""
    t0 = time.monotonic()
    while meminfo()["Writeback"] > 0 and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    return time.monotonic() - t0


async def cycle(prog: Program, drv: DriverCheckpoint, link: AgentLink | None, case: str) -> dict[str, object]:
    """One freeze, page-out and thaw. `case`: steps joined by +, and @N for N process_madvise calls at once."""
    pid, (what, _, at) = prog.p.pid, case.partition("@")
    steps, threads = what.split("+"), int(at or pageout.THREADS)
    t0 = time.monotonic()
    parked = await link.park(60_000) if link else 0
    drv.lock(pid, 10_000)
    drv.checkpoint(pid)
    cg_freeze(True)
    row: dict[str, object] = dict(case=case, parked=parked, freeze_s=time.monotonic() - t0)
    rss = status(pid, "VmRSS")
    row["rss_frozen"] = rss
    before = meminfo()
    row["spilled"] = 0
    if "spill" in steps:
        assert link is not None, "spill is the agent path's"
        t1 = time.monotonic()
        fd = spill.spill_area(SPILL_DIR, pid, link.host_address, link.parked_bytes)
        row["spill_write_s"] = time.monotonic() - t1
        cg_freeze(False)  # the agent's moment, as the daemon's page-out gives it
        await link.spill(fd, 60)
        cg_freeze(True)
        os.close(fd)
        row["pageout_s"] = time.monotonic() - t1
        row["spilled"] = link.parked_bytes
        if "readcheck" in steps:  # the same file read here the agent's way (4 x 32 MiB), before the thaw reads it
            row["file_read_gbps"] = read_back(pid)
    if "madvise" in steps:
        t1 = time.monotonic()
        done = pageout.page_out(pid, threads=threads)
        row["pageout_call_s"] = time.monotonic() - t1
        row["pageout_s"] = row.get("pageout_s", 0) + row["pageout_call_s"] + wait_written()  # type: ignore[operator]
        row["advised"], row["skipped"] = done.bytes, len(done.skipped)
    if "reclaim" in steps:
        row["pageout_s"] = reclaim(rss) + wait_written()
    if "drop" in steps:
        row["drop_s"] = reclaim(rss)
    after = meminfo()
    row["swapped"] = status(pid, "VmSwap")
    row["rss_paged"] = status(pid, "VmRSS")
    row["swap_cached"] = after["SwapCached"]
    row["mem_available_gain"] = after["MemAvailable"] - before["MemAvailable"]
    row["on_disk"] = row["swapped"] + row["spilled"]  # type: ignore[operator]
    if "pageout_s" in row:
        row["out_gbps"] = row["on_disk"] / row["pageout_s"] / 1e9  # type: ignore[operator]
    t2 = time.monotonic()
    wanted = [step for step in steps if step.startswith("prefetch")]
    ahead_threads = int(wanted[0][len("prefetch") :] or threads) if wanted else 0
    ahead = threading.Thread(target=pageout.prefetch, args=(pid,), kwargs={"threads": ahead_threads})
    ahead = ahead if wanted else None
    if ahead:  # beside the restore, as the daemon does
        ahead.start()
    sampler = Sampler(pid)
    cg_freeze(False)
    t3 = time.monotonic()
    restore = asyncio.to_thread(drv.restore, pid)
    if link and link.spilled and "noahead" not in steps:  # as the daemon's thaw: the file read ahead meanwhile
        row["read_ahead"], _ = await asyncio.gather(link.read_ahead(READ_AHEAD_BYTES, 60), restore)
    else:
        await restore
    row["restore_s"] = time.monotonic() - t3
    drv.unlock(pid)
    if link:
        await link.unpark(120)
        row["unpark_s"] = link.seconds
    row["read_gbps_by_s"] = sampler.stop()
    if ahead:
        ahead.join()
    row["thaw_s"] = time.monotonic() - t2
    row["swap_free"] = meminfo()["SwapFree"]
    row["tokens_ok"] = prog.ask("tok") == WANT["tok"]
    row["check_ok"] = prog.ask("check") == WANT["check"]
    return row


class Sampler:
    """The process's disk reads (read_bytes of /proc/PID/io) per second while it runs, in GB/s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.rates, self.done = pid, [], threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def read_bytes(self) -> int:
        with open(f"/proc/{self.pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))

    def run(self) -> None:
        last = self.read_bytes()
        while not self.done.wait(1.0):
            now = self.read_bytes()
            self.rates.append(round((now - last) / 1e9, 2))
            last = now

    def stop(self) -> list[float]:
        self.done.set()
        self.thread.join()
        return self.rates


def read_back(pid: int, threads: int = 4, piece: int = 32 << 20) -> float:
    """GB/s of reading the spill file process `pid` holds, as its agent will (direct I/O, `threads` reads of `piece`
    bytes in flight, into ordinary memory): io.py's reader over the whole file."""
    fds = os.listdir(f"/proc/{pid}/fd")
    [path] = [p for p in (f"/proc/{pid}/fd/{fd}" for fd in fds) if os.readlink(p).startswith(SPILL_DIR)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return disk_io.run(fd, 0, os.fstat(fd).st_size, threads, piece, write=False)
    finally:
        os.close(fd)


WANT: dict[str, str] = {}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", choices=("driver", "agent"))
    parser.add_argument("--size", default="7B")
    parser.add_argument("--cases", default="")
    args = parser.parse_args()
    os.makedirs(CGROUP, exist_ok=True)
    prog = Program([sys.executable, PLAIN, args.size], {}, preload=args.path == "agent")
    print("ready:", prog.ready, flush=True)
    cg_write("cgroup.procs", str(prog.p.pid))
    WANT["tok"], WANT["check"] = prog.ask("tok"), prog.ask("check")
    link = await prog.link() if args.path == "agent" else None
    drv = DriverCheckpoint()
    rows = []
    for case in (args.cases or CASES[args.path]).split(","):
        row = await cycle(prog, drv, link, case)
        row["path"] = args.path
        rows.append(row)
        print(json.dumps(row), flush=True)
    if link:
        link.close()
    prog.p.stdin.close()  # type: ignore[union-attr]
    prog.p.wait(60)
    os.rmdir(CGROUP)
    print(f"\n{'path':7} {'case':24} {'snapshot':>9} {'on disk':>8} {'page-out':>9} {'GB/s':>5} {'thaw':>7} ok")
    for r in rows:
        out = f"{r['pageout_s']:8.2f}s {r['out_gbps']:5.2f}" if "pageout_s" in r else f"{'-':>9} {'-':>5}"
        print(f"{r['path']:7} {r['case']:24} {r['rss_frozen'] / GIB:7.2f}Gi {r['on_disk'] / GIB:6.2f}Gi {out} "  # type: ignore[operator]
              f"{r['thaw_s']:6.2f}s {r['tokens_ok'] and r['check_ok']}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
