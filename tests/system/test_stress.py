"""Many clients at once against the installed daemon on the fake GPU: CLIENTS concurrent D-Bus connections, each doing
OPS random operations (run, freeze, thaw, swap, stop, status) on a small shared pool of model names, so the same
model is fought over all the time. Afterwards: no call hung (no deadlock), every model's state matches its unit, its
cgroup and the driver's state of every process, and no unit, cgroup or CUDA process is left behind once all are
stopped.

The regular system tests run a short version (16 x 50). The full one (16 x 1,000) is marked `stress`:

    make stress                                      # 16 clients x 1,000 operations, in a throw-away sandbox
    make stress STRESS_CLIENTS=32 STRESS_OPS=200 STRESS_SEED=7
    make stress STRESS_KILLS=10                      # and kill -9 the daemon 10 times during the run

It writes its figures to build/stress-<clients>x<ops>.json (docs/reliability.md quotes them)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType
from fakegpu_sys import (
    GPU0,
    GPU1,
    MIB,
    cgroup_pids_of,
    check_consistent,
    fake_gpu_daemon,
    fake_model_argv,
    journal_entries,
    kill_daemon,
)
from sysutil import REPO, SLICE, WORKDIR, list_models, log, model_unit, run, unit_property, wait_until

from gpuschedd.client import AsyncGpuSched, BusError
from gpuschedd.errors import InsufficientGpuMemory, InvalidState, ModelExists, NoSuchModel, RamBudgetExceeded
from gpuschedd.testing.fakegpu import FakeGpuDir

# What a caller may legitimately be told while others race it for the same model.
EXPECTED = (ModelExists, NoSuchModel, InvalidState, InsufficientGpuMemory, RamBudgetExceeded)
OPS = {"run": 14, "freeze": 20, "thaw": 20, "swap": 14, "stop": 8, "status": 24}
POOL = 8  # model names shared by every client
VRAM = 32 * MIB
# Room for every model of the pool at once on one GPU: a restore can never run out of VRAM because a Run started
# a model between a thaw's check and its restore (a race no supervisor can close; see docs/reliability.md).
GPU_BYTES = 2 * POOL * VRAM
CALL_TIMEOUT = 120.0
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"  # a call that takes longer is counted as hung


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGpuDir]:
    with fake_gpu_daemon(GPU_BYTES) as fake:
        yield fake


# What a caller is told by the bus while the daemon is killed and restarted under it (with --chaos only).
WHILE_DOWN = {
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.systemd1.NoSuchUnit",
}


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []


async def client(index: int, ops: int, seed: int, names: list[str], stats: Stats, chaos: bool) -> None:
    rng = random.Random(seed * 1000 + index)
    kinds, weights = list(OPS), list(OPS.values())
    async with AsyncGpuSched(interactive=False, bus_type=BusType.SYSTEM) as gs:
        for _ in range(ops):
            kind = rng.choices(kinds, weights)[0]
            name = rng.choice(names)
            if kind == "run":
                argv = fake_model_argv(name, VRAM, rng.choice((1, 1, 2)), rng.choice((GPU0, GPU1)))
                call = gs.run(name, argv)
            elif kind == "freeze":
                call = gs.freeze(name)
            elif kind == "thaw":
                call = gs.thaw(name)
            elif kind == "swap":
                call = gs.swap(name, rng.choice([n for n in names if n != name]))
            elif kind == "stop":
                call = gs.stop(name)
            else:
                call = gs.models() if rng.random() < 0.5 else gs.model(name)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(call, CALL_TIMEOUT)
                outcome = "ok"
            except EXPECTED as e:
                outcome = type(e).__name__
            except BusError as e:
                if kind == "status" and e.dbus_name == UNKNOWN_OBJECT:
                    # GetModel answered, then the model object went: it was replaced by a Run of its name meanwhile.
                    outcome = "Gone"
                elif chaos and e.dbus_name in WHILE_DOWN:
                    outcome = "DaemonDown"
                    await asyncio.sleep(0.1)
                else:
                    outcome = type(e).__name__
                    stats.unexpected.append(f"client {index}: {kind} {name}: {e.dbus_name}: {e}")
            except TimeoutError:
                outcome = "HUNG"
                stats.unexpected.append(f"client {index}: {kind} {name} hung for {CALL_TIMEOUT}s")
            except Exception as e:
                outcome = type(e).__name__
                stats.unexpected.append(f"client {index}: {kind} {name}: {type(e).__name__}: {e}")
            stats.latency[kind].append(time.monotonic() - t0)
            stats.outcomes[f"{kind} {outcome}"] += 1


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(values[max(0, int(len(values) * 0.99) - 1)] * 1000, 1),
        "max_ms": round(values[-1] * 1000, 1),
    }


def live_model_cgroups() -> set[str]:
    """Unit cgroups under gpusched.slice that still hold a process."""
    cg = unit_property(SLICE, "ControlGroup")
    root = Path("/sys/fs/cgroup" + cg) if cg else None
    if root is None or not root.is_dir():
        return set()
    return {d.name for d in root.iterdir() if d.is_dir() and (d / "cgroup.procs").read_text().strip()}


def loaded_model_units() -> set[str]:
    """gpusched-model@ units that systemd has not seen end (a unit that failed by itself stays loaded, inactive)."""
    out = run("systemctl", "list-units", "--all", "--plain", "--no-legend", "gpusched-model@*").stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {row[0] for row in rows if row[2] not in ("inactive", "failed")}


def stress(fake: FakeGpuDir, clients: int, ops: int, seed: int, kills: int = 0) -> dict[str, Any]:
    """kills: SIGKILL the daemon that many times while the clients run (systemd restarts it each time)."""
    names = [f"stress{seed}{'k' if kills else ''}-{i}" for i in range(POOL)]
    stats = Stats()
    log(f"stress: {clients} clients x {ops} operations on {POOL} models, seed {seed}, {kills} daemon kills")
    since = time.time()
    killed: list[float] = []

    def killer() -> None:
        rng = random.Random(seed)
        for _ in range(kills):
            time.sleep(rng.uniform(0.5, 1.5))
            killed.append(time.monotonic())
            kill_daemon()

    async def everyone() -> None:
        await asyncio.gather(*(client(i, ops, seed, names, stats, kills > 0) for i in range(clients)))

    thread = threading.Thread(target=killer)
    t0 = time.monotonic()
    thread.start()
    asyncio.run(everyone())
    wall = time.monotonic() - t0
    thread.join()
    try:
        assert len(killed) == kills, "the clients finished before every kill: give them more operations"
        # No deadlock: every call returned, and the daemon still answers at once.
        assert not stats.unexpected, "\n".join(stats.unexpected[:20])
        t1 = time.monotonic()
        listed = list_models()
        assert time.monotonic() - t1 < 2
        mine = {name: row for name, row in listed.items() if name in names}
        # Every model's state matches its unit, cgroup and CUDA processes; nothing is left mid-transition.
        final = {name: check_consistent(name, fake) for name in mine}
        live = {name for name, state in final.items() if state in ("running", "frozen")}
        # No leaked units or cgroups: exactly the live models have them.
        assert {model_unit(n) for n in live} == {u for u in loaded_model_units() if u in map(model_unit, names)}
        assert {model_unit(n) for n in live} == {c for c in live_model_cgroups() if c in map(model_unit, names)}
        # No CUDA process outside a live model.
        owned = set().union(*(cgroup_pids_of(model_unit(n)) for n in live)) if live else set()
        stray = [c.pid for c in fake.contexts() if c.pid not in owned and any(n in _cmdline(c.pid) for n in names)]
        assert not stray, f"CUDA processes outside any live model: {stray}"
        # Nothing went wrong inside the daemon: no error-priority entry (a failed operation, an internal error).
        errors = [
            e["MESSAGE"]
            for e in journal_entries("-u", "gpuschedd.service", "-p", "err", f"--since=@{since:.3f}")
            if kills == 0 or e.get("GPUSCHED_RECOVERY") != "1"
        ]
        assert not errors, errors[:10]
        # And every live model is still usable.
        for name in sorted(live):
            verb = "thaw" if final[name] == "frozen" else "freeze"
            run("gpusched", verb, name, timeout=60)
            check_consistent(name, fake)
    finally:
        for name in names:
            run("gpusched", "stop", name, check=False, timeout=60)
            run("gpusched", "forget", name, check=False)
            for path in WORKDIR.glob(f"{name}.count*"):
                path.unlink(missing_ok=True)
    wait_until("every unit gone", lambda: not {u for u in loaded_model_units() if u in map(model_unit, names)})
    assert not {c for c in live_model_cgroups() if c in map(model_unit, names)}, "a model's cgroup was left behind"
    assert not [c.pid for c in fake.contexts() if any(n in _cmdline(c.pid) for n in names)]

    total = sum(len(v) for v in stats.latency.values())
    report = {
        "clients": clients,
        "ops_per_client": ops,
        "seed": seed,
        "models": POOL,
        "operations": total,
        "wall_s": round(wall, 1),
        "ops_per_s": round(total / wall, 1),
        "final_states": dict(Counter(final.values())),
        "outcomes": dict(sorted(stats.outcomes.items())),
        "latency": {kind: percentiles(v) for kind, v in sorted(stats.latency.items())},
        "unexpected": len(stats.unexpected),
        "daemon_kills": kills,
        "recoveries": dict(
            Counter(
                f"{e['GPUSCHED_EVENT']} {e.get('GPUSCHED_INTERRUPTED', e.get('GPUSCHED_STATE_BEFORE', ''))}"
                for e in journal_entries("GPUSCHED_RECOVERY=1", f"--since=@{since:.3f}")
                + journal_entries("MESSAGE_ID=c54537ba923647cd9f9503ccac4581a6", f"--since=@{since:.3f}")
                if e.get("GPUSCHED_MODEL") in names
                and (e.get("GPUSCHED_RECOVERY") == "1" or "not running" in e.get("MESSAGE", ""))
            )
        ),
    }
    out = REPO / "build" / f"stress-{clients}x{ops}{f'-{kills}kills' if kills else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report, indent=2))
    return report


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_stress_short(fake: FakeGpuDir) -> None:
    """16 clients x 50 operations: part of every system-test run."""
    report = stress(fake, 16, 50, int(os.environ.get("STRESS_SEED", "1")))
    assert report["operations"] == 16 * 50
    ok = sum(n for k, n in report["outcomes"].items() if k.endswith(" ok") and not k.startswith("status"))
    assert ok > 50, "too few operations succeeded to have tested anything"


def test_stress_with_daemon_crashes(fake: FakeGpuDir) -> None:
    """16 clients x 100 operations while the daemon is SIGKILLed 3 times under them: every transition cut short by a
    kill is settled by the next daemon, and afterwards everything is as consistent as without the kills."""
    report = stress(fake, 16, 100, int(os.environ.get("STRESS_SEED", "1")), kills=3)
    assert report["operations"] == 16 * 100


@pytest.mark.stress
def test_stress_full(request: pytest.FixtureRequest, fake: FakeGpuDir) -> None:
    """16 clients x 1,000 operations (make stress); STRESS_CLIENTS, STRESS_OPS, STRESS_SEED change them, and
    STRESS_KILLS=N SIGKILLs the daemon N times during the run."""
    if not re.search(r"\bstress\b", request.config.getoption("markexpr") or ""):
        pytest.skip("the full stress test runs with -m stress (make stress)")
    clients = int(os.environ.get("STRESS_CLIENTS", "16"))
    ops = int(os.environ.get("STRESS_OPS", "1000"))
    kills = int(os.environ.get("STRESS_KILLS", "0"))
    report = stress(fake, clients, ops, int(os.environ.get("STRESS_SEED", "1")), kills)
    assert report["operations"] == clients * ops
