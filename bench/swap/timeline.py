"""Where a Swap's time goes: bench/swap/run.py (same arguments) with the engine's steps timed, printing on stderr,
for every Freeze, Thaw and Swap call, each step's start, end and length in ms from the call's start: the agents'
park and unpark, the driver's lock, checkpoint, restore and unlock, the cgroup freeze and thaw, the wait for the
copy's turn.

    sudo PYTHONPATH=src python3 bench/swap/timeline.py --sizes 7B --paths agent,inject --runs 3 [--preload LIB]

Results: bench/swap/results/h200-run5-timeline.txt (docs/gpu-results.md)."""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/swap/run.py

from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.engine import Engine
from gpuschedd.units.cgroupfs import CgroupfsUnits


class Timeline:
    """The steps of the call under way (one at a time: run.py makes one call after the other)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.rows: list[tuple[float, float, str, str]] = []
        self.lock = threading.Lock()  # the driver's steps run on worker threads

    def note(self, step: str, who: object, start: float) -> None:
        with self.lock:
            if self.t0 is not None:
                self.rows.append((start - self.t0, time.monotonic() - self.t0, step, str(getattr(who, "name", who))))

    async def call(self, title: str, work: Any) -> Any:
        if self.t0 is not None:  # a step of the call under way (a Swap's freeze and thaw)
            return await work
        self.t0, self.rows = time.monotonic(), []
        try:
            return await work
        finally:
            print(f"-- {title}: {time.monotonic() - self.t0:.3f}s", file=sys.stderr)
            for start, end, step, who in sorted(self.rows):
                print(f"   {start * 1000:7.1f} {end * 1000:7.1f} {(end - start) * 1000:7.1f}ms {step:16} {who}",
                      file=sys.stderr)  # fmt: skip
            self.t0 = None


TIMELINE = Timeline()


def timed(cls: type, name: str) -> None:
    """Record every call of cls.name (a method, plain or async) as a step; who: its first argument."""
    f: Callable[..., Any] = getattr(cls, name)
    if asyncio.iscoroutinefunction(f):

        @functools.wraps(f)
        async def step(self: object, *args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return await f(self, *args, **kwargs)
            finally:
                TIMELINE.note(name, args[0] if args else "", start)
    else:

        @functools.wraps(f)
        def step(self: object, *args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return f(self, *args, **kwargs)
            finally:
                TIMELINE.note(name, args[0] if args else "", start)

    setattr(cls, name, step)


def called(name: str) -> None:
    """Engine.name (freeze, thaw, swap) timed as a call of its own."""
    f = getattr(Engine, name)

    async def call(self: Engine, *args: Any, **kwargs: Any) -> Any:
        return await TIMELINE.call(f"{name} {' '.join(map(str, args))}", f(self, *args, **kwargs))

    setattr(Engine, name, call)


for method in ("lock", "checkpoint", "restore", "unlock"):
    timed(DriverCheckpoint, method)
for method in ("freeze", "thaw"):
    timed(CgroupfsUnits, method)
for method in ("_park", "_unpark", "_read_ahead", "_copy_in_turn", "_late_cuda_pids"):
    timed(Engine, method)
for method in ("freeze", "thaw", "swap"):
    called(method)

if __name__ == "__main__":
    asyncio.run(run.main())
