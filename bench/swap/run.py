"""Swap benchmark on a real GPU: two models of one Qwen2.5 shape (bench/swap/model.py), run as units by gpuschedd's
engine (cgroupfs units, the driver checkpoint backend, NVML), one running and one frozen; alternately a sequential
swap (today's behaviour, timed as a Freeze call then a Thaw call) and a Swap call (overlapped: engine/swap.py),
on each path: `driver` (the driver's checkpoint moves everything), `agent` (gpuschedd.agent's parkable(), the
driver moves the rest) and `inject` (InjectAgent: the interposer, native/preload, parks an unmodified program);
`agent-keep` and `inject-keep` are those with KeepContext (the contexts stay on the GPU: no driver step at all).
Every Swap's event must say it overlapped; after the runs every weight of both models is checked against its sum
at start.

    sudo PYTHONPATH=src python3 bench/swap/run.py [--sizes 1.5B,7B] [--paths driver,agent,inject,...] [--runs 3]
        [--preload LIB]   (inject: the built interposer, `make preload PRELOAD_OUT=DIR`)
        [--copies staggered|side-by-side]   (the agents' copies in turn, as the engine does, or both at once)
        [--env KEY=VALUE ...]   (more environment for the model processes, e.g. a glibc tunable, for measuring)

Prints a table: per model size and path, the GPU memory of one model, the sequential freeze and thaw, their sum,
the Swap, and Swap / sequential (goal: ≤ 0.75 on the driver path, ≤ 0.6 with agents). Medians over --runs, timed
after one untimed freeze and thaw of each model."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent.parent / "src"
sys.path.insert(0, str(SRC))

from gpuschedd import preload  # noqa: E402
from gpuschedd.checkpoint.driver import DriverCheckpoint  # noqa: E402
from gpuschedd.config import Config, host_ram_bytes  # noqa: E402
from gpuschedd.engine import Engine  # noqa: E402
from gpuschedd.events import EngineListener, Event, EventKind  # noqa: E402
from gpuschedd.model import Model  # noqa: E402
from gpuschedd.nvml import load_telemetry  # noqa: E402
from gpuschedd.options import RunOptions  # noqa: E402
from gpuschedd.units.cgroupfs import CgroupfsUnits  # noqa: E402

GOAL = {"driver": 0.75, "agent": 0.6, "inject": 0.6, "agent-keep": 0.6, "inject-keep": 0.6}


class Swaps(EngineListener):
    """The Swap events, to check each said it overlapped."""

    def __init__(self) -> None:
        self.overlapped: list[str] = []

    def event(self, event: Event) -> None:
        if event.kind == EventKind.SWAP:
            self.overlapped.append(event.fields.get("GPUSCHED_OVERLAPPED", "?"))


@dataclass
class Row:
    size: str
    path: str
    vram: int = 0
    freeze: list[float] = field(default_factory=list)
    thaw: list[float] = field(default_factory=list)
    sequential: list[float] = field(default_factory=list)
    swap: list[float] = field(default_factory=list)
    overlapped: str = ""
    verified: str = ""


async def wait_for(what: str, predicate, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)
    return found


async def start(engine: Engine, name: str, size: str, path: str, out: Path, env: list[str]) -> Model:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        stale.unlink()
    agent, keep = path.startswith("agent"), path.endswith("-keep")
    argv = [sys.executable, str(HERE / "model.py"), size, str(out)] + (["--agent"] if agent else [])
    # model.py --agent imports gpuschedd.agent: from this checkout (a user pip-installs gpuschedd in its env).
    options = RunOptions(
        agent=agent, inject_agent=path.startswith("inject"), keep_context=keep, environment=[f"PYTHONPATH={SRC}", *env]
    )
    model = await engine.run(name, argv, options, 0)
    await wait_for(f"{name} loaded", lambda: list(out.glob("ready.*[0-9]")), 300)
    await engine.refresh(model)
    return model


async def verify(models: list[Model], dirs: list[Path]) -> bool:
    """Every process's weights are what they were at start (the models must run: a frozen one gets the signal late)."""
    checks = []
    for model, d in zip(models, dirs, strict=True):
        for pid in model.pids:
            (d / f"verify.{pid}").unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
            checks.append(d / f"verify.{pid}")
    await wait_for("verification", lambda: all(p.exists() for p in checks), 120)
    return all(json.loads(p.read_text())["ok"] for p in checks)


async def bench(engine: Engine, swaps: Swaps, size: str, path: str, runs: int, workdir: Path, env: list[str]) -> Row:
    row = Row(size, path)
    names = [f"swap-{path}-{size.replace('.', '_')}-{x}" for x in "ab"]
    dirs = [workdir / n for n in names]
    starts = (start(engine, n, size, path, d, env) for n, d in zip(names, dirs, strict=True))
    models = list(await asyncio.gather(*starts))
    row.vram = models[0].vram_bytes
    await engine.freeze(names[1])
    # Untimed: a freeze and a thaw, so that each process has parked once (a process's first park faults its host
    # memory in; later ones reuse it) and the sequential figures are not the first park's.
    await engine.freeze(names[0])
    await engine.thaw(names[1])
    frozen, running = names
    seen = len(swaps.overlapped)
    try:
        for _ in range(runs):
            # Today's behaviour: the Freeze call, then the Thaw call.
            t0 = time.monotonic()
            await engine.freeze(running)
            t1 = time.monotonic()
            await engine.thaw(frozen)
            t2 = time.monotonic()
            row.freeze.append(t1 - t0)
            row.thaw.append(t2 - t1)
            row.sequential.append(t2 - t0)
            running, frozen = frozen, running
            # The Swap call.
            t0 = time.monotonic()
            await engine.swap(running, frozen)
            row.swap.append(time.monotonic() - t0)
            running, frozen = frozen, running
        row.overlapped = f"{swaps.overlapped[seen:].count('1')}/{runs}"
        if path != "driver":
            paths, wanted = {m.freeze_path for m in models}, "agent-only" if path.endswith("-keep") else "agent"
            if paths != {wanted}:
                raise RuntimeError(f"{path}: the freezes took the {paths} path(s), not the {wanted} path")
        await engine.thaw(frozen)  # both fit beside each other: both run for the check
        row.verified = "yes" if await verify(models, dirs) else "NO"
    finally:
        for name in names:
            await engine.stop(name)
    return row


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(rows: list[Row], command: str) -> None:
    header = ["model", "path", "GPU mem", "freeze s", "thaw s", "sequential s", "Swap s", "Swap/seq", "goal"]
    header += ["overlapped", "tensors intact"]
    lines = [header]
    for r in rows:
        ratio = med(r.swap) / med(r.sequential)
        lines.append([
            f"Qwen2.5-{r.size}", r.path, f"{r.vram / 2**30:.1f} GiB", f"{med(r.freeze):.2f}", f"{med(r.thaw):.2f}",
            f"{med(r.sequential):.2f}", f"{med(r.swap):.2f}", f"{ratio:.2f}",
            f"≤ {GOAL[r.path]} {'met' if ratio <= GOAL[r.path] else 'MISSED'}", r.overlapped, r.verified,
        ])  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"\nmedians over the runs; reproduce with: {command}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.5B,7B")
    parser.add_argument("--paths", default="driver,agent,inject")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preload", default="")
    parser.add_argument("--workdir", default="/var/tmp/gpusched-swap-bench")
    parser.add_argument("--cgroup-root", default="/sys/fs/cgroup/gpusched-swap-bench")
    parser.add_argument("--copies", choices=("staggered", "side-by-side"), default="staggered")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    # The engine's log on stderr: how long each agent took to park and unpark.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.preload:
        preload.library_path = lambda: args.preload  # type: ignore[assignment]  # the interposer built here
    workdir = Path(args.workdir)
    config = Config(
        ram_budget_bytes=int(host_ram_bytes() * 0.8), cgroup_root=args.cgroup_root, agent_root=str(workdir / "agents")
    )
    units = CgroupfsUnits(args.cgroup_root)
    engine = Engine(units, DriverCheckpoint(), load_telemetry(), config)
    if args.copies == "side-by-side":  # the incoming unpark does not wait for the outgoing park (engine/swap.py)
        engine._copy_in_turn = lambda model: asyncio.sleep(0)  # type: ignore[method-assign]
    swaps = Swaps()
    engine.add_listener(swaps)
    await units.setup()
    await engine.start()
    rows = []
    try:
        for size in args.sizes.split(","):
            for path in args.paths.split(","):
                try:
                    rows.append(await bench(engine, swaps, size, path, args.runs, workdir, args.env))
                except Exception as e:  # one failed row must not cost the others
                    print(f"FAILED {size} {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    continue
                print(f"done {size} {path}", file=sys.stderr, flush=True)
                print_table(rows, "(partial)")
    finally:
        for name in list(engine.models):
            await engine.stop(name)
    print_table(rows, "sudo PYTHONPATH=src python3 bench/swap/run.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    asyncio.run(main())
