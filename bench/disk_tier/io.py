"""How a disk reads and writes with direct I/O by piece size and pieces in flight: what the spill files' readers and
writers (gpuschedd.spill, native/preload/park.c) are sized on (docs/disk-tier.md). Writes a file of --gib GiB in
DIR, then reads it back in each pattern (pieces handed out in file order to THREADS threads, as the agent's copy
threads take them), a fresh part of the file each time, so no pattern reads what another just read.

Usage (no GPU needed): python3 bench/disk_tier/io.py DIR [--gib 16] [--patterns 1x64,16x4,4x64,...]"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import threading
import time

MIB = 1 << 20


def run(fd: int, start: int, total: int, threads: int, piece: int, write: bool) -> float:
    """GB/s of moving `total` bytes from `start` in pieces of `piece` bytes, `threads` at a time."""
    offsets = iter(range(start, start + total, piece))
    lock = threading.Lock()

    def worker() -> None:
        buf = mmap.mmap(-1, piece)
        if write:
            buf.write(os.urandom(min(piece, MIB)) * (piece // min(piece, MIB)))
        while True:
            with lock:
                offset = next(offsets, None)
            if offset is None:
                break
            if write:
                os.pwrite(fd, buf, offset)
            else:
                os.preadv(fd, [buf], offset)
        buf.close()

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if write:
        os.fdatasync(fd)
    return total / (time.monotonic() - t0) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--patterns", default="1x64,16x4,16x16,8x8,4x64,32x4")
    args = parser.parse_args()
    patterns = [tuple(int(x) for x in p.split("x")) for p in args.patterns.split(",")]
    path = os.path.join(args.dir, "gpusched-io-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    os.unlink(path)
    total = args.gib << 30
    share = total // len(patterns) // (64 * MIB) * (64 * MIB)
    print(f"{'threads x MiB':>14} {'write GB/s':>10} {'read GB/s':>10}   ({share / 2**30:.1f} GiB each)")
    writes = [run(fd, i * share, share, t, p * MIB, True) for i, (t, p) in enumerate(patterns)]
    # read each part in another pattern than the one that wrote it
    order = list(itertools.islice(itertools.cycle(range(len(patterns))), 1, len(patterns) + 1))
    reads = [run(fd, order[i] * share, share, t, p * MIB, False) for i, (t, p) in enumerate(patterns)]
    for (t, p), w, r in zip(patterns, writes, reads, strict=True):
        print(f"{t:>6} x {p:>3}    {w:10.2f} {r:10.2f}")
    os.close(fd)


if __name__ == "__main__":
    main()
