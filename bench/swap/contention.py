"""What slows a Swap's steps when two processes work at once (issue 17): a driver checkpoint of a process that holds
only its CUDA context (what is left of an agent model after its park), and an agent-style copy out and copy in,
each timed alone and beside a neighbour process doing one kind of work.

    sudo PYTHONPATH=src python3 bench/swap/contention.py [--rounds 2] [--cycles 4] [--gib 4] [--kinds K,...]
        [--same-process]   (the neighbour's threads in this process, on its CUDA context, instead of another's)

Neighbours (each its own process, as the other model of a Swap is): `none`; `idle` (a CUDA context held, no
work); `dma-in` / `dma-out` (16 threads copying between pinned 4 MiB buffers and the GPU, no host copy: only the
link and the GPU's copy engines); `ring-in` / `ring-out` (the same plus each piece memmoved between the pinned
buffer and ordinary host memory, as the agents' unpark and park do: agent/staging.py's ring); `memmove` (16 threads
copying host memory to host memory, no GPU: only the CPU and memory bandwidth). The measured steps: the driver's
checkpoint and restore of a target process (PyTorch with cuBLAS initialised and 20 GiB of address space reserved and
unmapped, as a parked model's), and --gib GiB copied out and back through agent/staging.py's ring by this process
(into a host area kept between copies, as the agents keep theirs). The neighbour's own rate is sampled outside and
during the measured steps. Prints a table and the command to reproduce it."""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent.parent / "src"
sys.path.insert(0, str(SRC))

from gpuschedd.agent.cuda import Cuda  # noqa: E402
from gpuschedd.agent.staging import Copier, HostArea, _Bounce, split  # noqa: E402

KINDS = ("none", "idle", "dma-in", "dma-out", "ring-in", "ring-out", "memmove")
PIECE, THREADS = 4 << 20, 16
TARGET = """
import sys, time, torch
sys.path.insert(0, %r)
from gpuschedd.agent.cuda import Cuda
x = torch.randn(2048, 2048, device="cuda"); (x @ x).sum().item(); torch.cuda.synchronize()
Cuda().reserve(20 << 30)
print("ready", flush=True)
time.sleep(3600)
"""


def device_buffer(gib: int) -> tuple[object, Cuda, int, int]:
    """A GPU buffer of `gib` GiB in this process (PyTorch makes the context): the tensor, libcuda, context, address."""
    import torch

    tensor = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    cuda = Cuda()
    return tensor, cuda, cuda.current_context(), tensor.data_ptr()


class Load:
    """Work of one kind on THREADS threads, from start() to stop(); stop() returns the finishing times of its pieces.
    In a process of its own (neighbour()) or in this one (--same-process: the same CUDA context)."""

    def __init__(self, kind: str, gib: int) -> None:
        self.kind, self.size = kind, gib << 30
        self.done: list[float] = []
        self._stop = threading.Event()
        self._areas: list[HostArea] = []
        if kind != "memmove":
            self._tensor, self.cuda, self.ctx, self.dev = device_buffer(gib)
        if kind in ("ring-in", "ring-out", "memmove"):
            self._areas = [HostArea(self.size) for _ in range(2 if kind == "memmove" else 1)]
            for area in self._areas:
                ctypes.memset(area.address, 1, self.size)  # faulted in, as the kept host areas are
        workers = 0 if kind == "idle" else THREADS
        self._threads = [threading.Thread(target=self._work, args=(i,)) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> list[float]:
        self._stop.set()
        for t in self._threads:
            t.join()
        for area in self._areas:
            area.close()
        self._tensor = None  # the GPU buffer freed with it
        return self.done

    def _work(self, index: int) -> None:
        offsets, kind, done = range(index * PIECE, self.size, THREADS * PIECE), self.kind, self.done
        if kind == "memmove":
            src, dst = (a.address for a in self._areas)
            while not self._stop.is_set():
                for off in offsets:
                    ctypes.memmove(dst + off, src + off, PIECE)
                    done.append(time.monotonic())
            return
        cuda, dev = self.cuda, self.dev
        host = self._areas[0].address if self._areas else 0
        cuda.set_context(self.ctx)
        stream = cuda.stream()
        with _Bounce(cuda, PIECE) as bounce:  # the ring's own pinned buffer
            while not self._stop.is_set():
                for off in offsets:
                    if kind.endswith("-in"):
                        if kind == "ring-in":
                            ctypes.memmove(bounce.address, host + off, PIECE)
                        cuda.copy_in(dev + off, bounce.address, PIECE, stream)
                        cuda.stream_sync(stream)
                    else:
                        cuda.copy_out(bounce.address, dev + off, PIECE, stream)
                        cuda.stream_sync(stream)
                        if kind == "ring-out":
                            ctypes.memmove(host + off, bounce.address, PIECE)
                    done.append(time.monotonic())
                    if self._stop.is_set():
                        break
        cuda.stream_destroy(stream)


def neighbour(kind: str, gib: int, report: Path) -> None:
    """A Load of `kind` in this process until SIGTERM, then the finishing times of its pieces into `report` (JSON)."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    load = Load(kind, gib)
    load.start()
    print("ready", flush=True)
    while not stopping.is_set():
        stopping.wait(0.1)
    report.write_text(json.dumps(load.stop()))


def rate(done: list[float], windows: list[tuple[float, float]]) -> float:
    """The neighbour's GB/s within `windows`."""
    span = sum(b - a for a, b in windows)
    n = sum(1 for t in done for a, b in windows if a <= t < b)
    return n * PIECE / span / 1e9 if span > 0 else float("nan")


class Bench:
    """The measured steps, timed beside one neighbour after another."""

    def __init__(self, gib: int, cycles: int) -> None:
        from gpuschedd.checkpoint.driver import DriverCheckpoint

        self.target = subprocess.Popen([sys.executable, "-c", TARGET % str(SRC)], stdout=subprocess.PIPE, text=True)
        assert self.target.stdout is not None and self.target.stdout.readline().strip() == "ready"
        self.driver = DriverCheckpoint()
        self._tensor, cuda, ctx, dev = device_buffer(gib)
        self.gib, self.cycles = gib, cycles
        self.area = HostArea(gib << 30)
        self.copier = Copier(cuda, ctx)
        self.pieces = split([(dev, gib << 30)], PIECE)
        self.copier.out(self.pieces, self.area)  # the host area faulted in: later copies reuse it
        self._dir = tempfile.TemporaryDirectory(prefix="gpusched-contention-")
        self.report = Path(self._dir.name) / "neighbour.json"

    def close(self) -> None:
        self.target.kill()
        self.target.wait()
        self._dir.cleanup()

    def beside(self, kind: str, r: dict[str, list[float]], same_process: bool) -> None:
        """`cycles` of each step beside a neighbour of `kind` (in a process of its own, or threads of this one),
        appended to `r`: seconds per step, and the neighbour's GB/s in each window (n:quiet, n:checkpoint, n:out,
        n:in)."""
        proc, load = None, None
        if kind != "none" and same_process:
            load = Load(kind, self.gib)
            load.start()
        elif kind != "none":
            cmd = [sys.executable, __file__, "--neighbour", kind, "--gib", str(self.gib), "--report", str(self.report)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        windows: dict[str, list[tuple[float, float]]] = {"quiet": [], "checkpoint": [], "out": [], "in": []}
        pid = self.target.pid
        steps = (
            ("quiet", lambda: time.sleep(0.2)),
            ("lock", lambda: self.driver.lock(pid, 10_000)),
            ("checkpoint", lambda: self.driver.checkpoint(pid)),
            ("restore", lambda: self.driver.restore(pid)),
            ("unlock", lambda: self.driver.unlock(pid)),
            ("out", lambda: self.copier.out(self.pieces, self.area)),
            ("in", lambda: self.copier.back(self.pieces, self.area)),
        )
        try:
            for _ in range(self.cycles):
                for name, fn in steps:
                    t0 = time.monotonic()
                    fn()
                    t1 = time.monotonic()
                    r.setdefault(name, []).append(t1 - t0)
                    if name in windows:
                        windows[name].append((t0, t1))
        finally:  # the neighbour stops however the steps end
            done: list[float] = load.stop() if load is not None else []
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        if proc is not None:
            done = json.loads(self.report.read_text())
        for name, w in windows.items():  # 0 with no neighbour working
            r.setdefault(f"n:{name}", []).append(rate(done, w))


def row(kind: str, r: dict[str, list[float]], gib: int) -> str:
    def ms(name: str) -> str:
        v = r[name]
        return f"{statistics.median(v) * 1e3:.0f} ({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})"

    def gbs(name: str) -> str:
        return f"{(gib << 30) / 1e9 / statistics.median(r[name]):.1f}"

    n = " / ".join(f"{statistics.median(r[f'n:{w}']):.1f}" for w in ("quiet", "checkpoint", "out", "in"))
    return f"| {kind} | {ms('checkpoint')} | {ms('restore')} | {gbs('out')} | {gbs('in')} | {n} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--gib", type=int, default=4)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--same-process", action="store_true", help="the neighbour's threads run in this process")
    parser.add_argument("--neighbour", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.neighbour:
        return neighbour(args.neighbour, args.gib, args.report)
    bench = Bench(args.gib, args.cycles)
    results: dict[str, dict[str, list[float]]] = {k: {} for k in args.kinds.split(",")}
    try:
        for n in range(args.rounds):  # the neighbours alternate, so that the machine's drift spreads over all
            for kind, r in results.items():
                bench.beside(kind, r, args.same_process)
                print(f"round {n + 1} {kind}: {json.dumps({k: [round(x, 3) for x in v] for k, v in r.items()})}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        bench.close()
    print("| neighbour | checkpoint ms | restore ms | copy out GB/s | copy in GB/s | neighbour GB/s: quiet / during "
          "checkpoint / copy out / copy in |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(row(kind, r, args.gib))
    print(f"\nmedians (min-max) over {args.rounds} rounds x {args.cycles} cycles; reproduce with: "
          f"sudo PYTHONPATH=src python3 bench/swap/contention.py {' '.join(sys.argv[1:])}")  # fmt: skip


if __name__ == "__main__":
    main()
