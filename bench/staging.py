"""How to park GPU memory in host RAM at PCIe speed without slowing the driver's checkpoint: measurements behind
the agent's staging mode (src/gpuschedd/agent/staging.py).

    sudo PYTHONPATH=src python3 bench/staging.py [--gib 8] [--runs 3]

Table 1: park (copy out + release) and unpark (map + copy back) of --gib GiB held by PyTorch tensors in the
agent's pool, per staging mode and thread count; every unpark is checked bit-identical.
Table 2: the driver's checkpoint and restore of a process holding 2 GiB of VRAM, against how much page-locked
host memory that process holds (the reason large pinned staging is avoided)."""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gpuschedd.agent.cuda import Cuda  # noqa: E402
from gpuschedd.agent.parking import ParkingLot  # noqa: E402
from gpuschedd.agent.torch_pool import TorchPool  # noqa: E402
from gpuschedd.checkpoint.driver import DriverCheckpoint  # noqa: E402

PINNED_HOLDER = """
import sys, time, torch
vram, pinned = int(sys.argv[1]), int(sys.argv[2])
x = torch.empty(vram, dtype=torch.uint8, device="cuda").fill_(7)
p = torch.empty(pinned, dtype=torch.uint8, pin_memory=True) if pinned else None
if p is not None:
    p.fill_(1)
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
assert int(x[-1]) == 7
print("ok", flush=True)
"""


def park_table(gib: float, runs: int, configs: list[tuple[str, int, int]]) -> list[list[str]]:
    import torch

    size = int(gib * 2**30)
    rows = []
    for mode, threads, chunk_mib in configs:
        lot = ParkingLot(Cuda(), mode=mode, threads=threads, chunk=chunk_mib << 20)
        pool = TorchPool(lot)
        with torch.cuda.use_mem_pool(pool.pool):
            gen = torch.Generator(device="cuda").manual_seed(1)
            # Tensors of a model's sizes: many of tens of MiB, a few large.
            sizes, left = [], size
            while left > 0:
                n = min(left, (600 << 20) if len(sizes) % 40 == 0 else (40 << 20))
                sizes.append(n)
                left -= n
            tensors = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda", generator=gen) for n in sizes]
        sums = [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors]
        torch.cuda.synchronize()
        park, unpark, free_gain = [], [], 0
        for _ in range(runs):
            free0 = torch.cuda.mem_get_info()[0]
            report = lot.park()
            free_gain = torch.cuda.mem_get_info()[0] - free0
            park.append(report.total_s)
            unpark.append(lot.unpark().total_s)
            assert [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors] == sums, "not bit-identical"
        managed = lot.managed_bytes()
        del tensors
        torch.cuda.synchronize()
        del pool
        med_p, med_u = statistics.median(park), statistics.median(unpark)
        rows.append(
            [mode, str(threads), str(chunk_mib), f"{managed / 2**30:.2f}", f"{free_gain / 2**30:.2f}", f"{med_p:.3f}",
             f"{managed / med_p / 1e9:.1f}", f"{med_u:.3f}", f"{managed / med_u / 1e9:.1f}"]
        )  # fmt: skip
        torch.cuda.empty_cache()
        print(f"done {mode}/{threads}/{chunk_mib}", file=sys.stderr, flush=True)
    return rows


def pinned_table(pinned_gib: list[float], runs: int) -> list[list[str]]:
    driver = DriverCheckpoint()
    rows = []
    for gib in pinned_gib:
        proc = subprocess.Popen(
            [sys.executable, "-c", PINNED_HOLDER, str(2 << 30), str(int(gib * 2**30))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout and proc.stdin and proc.stdout.readline().strip() == "ready"
        ck, rs = [], []
        for _ in range(runs):
            t0 = time.monotonic()
            driver.lock(proc.pid, 10_000)
            driver.checkpoint(proc.pid)
            ck.append(time.monotonic() - t0)
            t0 = time.monotonic()
            driver.restore(proc.pid)
            driver.unlock(proc.pid)
            rs.append(time.monotonic() - t0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        proc.wait()
        rows.append([f"{gib:g}", f"{statistics.median(ck):.3f}", f"{statistics.median(rs):.3f}"])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    lines = [header, *rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--configs",
        default="pageable:1:64,pageable:8:64,register:8:64,pin:8:64,pin:16:64,ring:8:64,ring:16:64,ring:16:16,ring:8:4,"
        "ring:16:8,ring:16:4,ring:16:2",
        help="mode:threads:chunk MiB, comma-separated",
    )
    parser.add_argument("--pinned-gib", default="0,0.25,1,4")
    args = parser.parse_args()
    configs = [(m, int(t), int(c)) for m, t, c in (x.split(":") for x in args.configs.split(","))]
    park = park_table(args.gib, args.runs, configs)
    pinned = pinned_table([float(x) for x in args.pinned_gib.split(",") if x], args.runs)
    header = ["mode", "threads", "chunk MiB", "GiB", "GiB freed", "park s", "park GB/s", "unpark s", "unpark GB/s"]
    print_table(header, park)
    print()
    print_table(["pinned GiB held", "lock+checkpoint s (2 GiB VRAM)", "restore+unlock s"], pinned)
    print(f"\nmedians over {args.runs} runs; reproduce with: PYTHONPATH=src python3 bench/staging.py "
          + shlex.join(sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
