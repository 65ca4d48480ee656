"""The engine on a real GPU: real PyTorch processes, the driver checkpoint backend, NVML, cgroupfs units.

Run as root on a machine with an NVIDIA GPU (skipped elsewhere):
    PYTHONPATH=src python3 -m pytest -m gpu tests/gpu -v
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpuschedd.config import Config, host_ram_bytes
from gpuschedd.engine import Engine
from gpuschedd.errors import InsufficientGpuMemory, InvalidArgs
from gpuschedd.hostmem import rss_bytes
from gpuschedd.model import State
from gpuschedd.options import RunOptions
from gpuschedd.procfs import holds_open

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "unit")]
from engine_kit import Recorder  # noqa: E402  (tests/unit's: the one event recorder)
from polling import until  # noqa: E402  (tests/polling.py: the one wait-until helper)

pytestmark = pytest.mark.gpu

MODEL = str(Path(__file__).with_name("torch_model.py"))
MIB = 2048


def _gpu_or_skip() -> tuple[object, object]:
    if not os.path.exists("/dev/nvidiactl"):
        pytest.skip("no NVIDIA GPU")
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups, checkpointing other processes)")
    from gpuschedd.checkpoint.driver import load_driver_backend
    from gpuschedd.nvml import load_telemetry

    driver = load_driver_backend()
    if driver is None:
        pytest.skip("libcuda has no checkpoint API")
    return driver, load_telemetry()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    driver, telemetry = _gpu_or_skip()
    from gpuschedd.units.cgroupfs import CgroupfsUnits

    root = f"/sys/fs/cgroup/gpusched-test-{os.getpid()}"
    units = CgroupfsUnits(root)
    eng = Engine(units, driver, telemetry, Config(ram_budget_bytes=host_ram_bytes() // 2, cgroup_root=root))  # type: ignore[arg-type]
    await units.setup()
    await eng.start()
    yield eng
    for name in list(eng.models):
        await eng.stop(name)


def statuses(d: Path) -> dict[int, dict[str, object]]:
    out = {}
    for f in d.glob("status.*"):
        if f.suffix == ".tmp":
            continue
        try:
            data = json.loads(f.read_text())
        except (ValueError, OSError):
            continue
        out[int(data["pid"])] = data
    return out


async def wait_ready(d: Path, count: int, timeout: float = 120) -> dict[int, dict[str, object]]:
    await until(f"{count} model process(es) ready in {d}", lambda: len(statuses(d)) >= count, timeout, poll=0.1)
    return statuses(d)


async def counters_move(d: Path, wait: float = 1.0) -> bool:
    before = {p: s["counter"] for p, s in statuses(d).items()}
    await asyncio.sleep(wait)
    after = {p: s["counter"] for p, s in statuses(d).items()}
    return all(after[p] > before[p] for p in before)


async def verify(d: Path, pids: list[int]) -> dict[int, bool]:
    for pid in pids:
        (d / f"verify.{pid}").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    await until("every process's verification", lambda: all((d / f"verify.{pid}").exists() for pid in pids), 60.0)
    return {pid: json.loads((d / f"verify.{pid}").read_text())["ok"] for pid in pids}


async def run_model(
    engine: Engine, name: str, d: Path, *extra: str, procs: int = 1, options: RunOptions | None = None
) -> list[int]:
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d), *extra]
    await engine.run(name, argv, options or RunOptions(), 0)
    return sorted((await wait_ready(d, procs)).keys())


def gpu_used(engine: Engine) -> int:
    return sum(g.used_bytes for g in engine.telemetry.gpus())


async def test_freeze_releases_vram_and_thaw_restores_it_intact(engine: Engine, tmp_path: Path) -> None:
    d = tmp_path / "m"
    pids = await run_model(engine, "m", d)
    model = engine.get("m")
    await engine.refresh(model)
    assert model.vram_bytes >= MIB << 20
    used_before = gpu_used(engine)
    await engine.freeze("m")
    listed = engine.telemetry.vram_by_pid()
    assert not any(pid in listed for pid in pids), "a checkpointed PID is still in NVML's list"
    assert used_before - gpu_used(engine) >= (MIB << 20) * 0.9
    assert model.snapshot_bytes >= MIB << 20
    assert not await counters_move(d, 0.5)
    await engine.thaw("m")
    assert model.state == State.RUNNING
    assert await counters_move(d)
    assert await verify(d, pids) == {pid: True for pid in pids}


async def test_freeze_mid_matmul_resumes(engine: Engine, tmp_path: Path) -> None:
    d = tmp_path / "mm"
    pids = await run_model(engine, "mm", d, "--matmul")
    await engine.freeze("mm")
    await engine.thaw("mm")
    assert await counters_move(d)
    assert all((await verify(d, pids)).values())


async def test_two_process_model(engine: Engine, tmp_path: Path) -> None:
    d = tmp_path / "two"
    pids = await run_model(engine, "two", d, "--children", "1", procs=2)
    model = engine.get("two")
    await engine.freeze("two")
    assert sorted(model.cuda_pids) == pids
    listed = engine.telemetry.vram_by_pid()
    assert not any(pid in listed for pid in pids)
    await engine.thaw("two")
    assert await counters_move(d)
    assert all((await verify(d, pids)).values())


async def test_thaw_refused_while_another_process_holds_the_vram(engine: Engine, tmp_path: Path) -> None:
    import torch

    d = tmp_path / "big"
    pids = await run_model(engine, "big", d)
    await engine.freeze("big")
    gpu = engine.telemetry.gpus()[0]
    hog_bytes = gpu.free_bytes - (MIB << 20) // 2  # leave less than the snapshot needs
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(InsufficientGpuMemory):
            await engine.thaw("big")
        assert engine.get("big").state == State.FROZEN
        assert not await counters_move(d, 0.3)
    finally:
        del hog
        torch.cuda.empty_cache()
    await engine.thaw("big")
    assert await counters_move(d)
    assert all((await verify(d, pids)).values())


async def test_twenty_cycles_return_host_ram(engine: Engine, tmp_path: Path) -> None:
    d = tmp_path / "cyc"
    pids = await run_model(engine, "cyc", d)
    baseline = sum(rss_bytes(p) for p in pids)
    for _ in range(20):
        await engine.freeze("cyc")
        assert sum(rss_bytes(p) for p in pids) > baseline + (MIB << 20) * 0.9  # the snapshot is in RSS
        await engine.thaw("cyc")
        assert sum(rss_bytes(p) for p in pids) < baseline + (256 << 20)  # and released after the thaw
    assert all((await verify(d, pids)).values())


async def test_real_get_state_tells_cuda_processes_apart(engine: Engine, tmp_path: Path) -> None:
    import subprocess

    d = tmp_path / "gs"
    pids = await run_model(engine, "gs", d)
    plain = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        assert engine.checkpoint.cuda_pids([*pids, plain.pid, dead.pid]) == pids
        # What the freeze's scan reads first (docs/checkpoint.md): a CUDA process holds /dev/nvidia* open, others not
        assert [p for p in [*pids, plain.pid, dead.pid] if holds_open(p, engine.checkpoint.devices)] == pids
    finally:
        plain.kill()
        plain.wait()


@pytest.mark.parametrize("keep_context", [False, True], ids=["agent", "agent-only"])
async def test_the_agent_parks_a_torch_model(engine: Engine, tmp_path: Path, keep_context: bool) -> None:
    """The fast path on the real driver: addresses kept, bytes and a CUDA graph captured before the freeze intact;
    the driver takes the rest, or (KeepContext) is not called and the context stays on the GPU."""
    d = tmp_path / "fast"
    # The model's Python imports gpuschedd.agent: here from the checkout (a user pip-installs gpuschedd).
    src = str(Path(__file__).resolve().parents[2] / "src")
    options = RunOptions(agent=True, keep_context=keep_context, environment=[f"PYTHONPATH={src}"])
    pids = await run_model(engine, "fast", d, "--agent", "--matmul", options=options)
    await parked_cycles(engine, "fast", d, pids, keep_context)


async def parked_cycles(engine: Engine, name: str, d: Path, pids: list[int], keep_context: bool) -> None:
    """Three freezes and thaws of a model whose memory its agent (or the interposer) parks: the tensors went
    through it, the GPU memory left (all of it, or all but the contexts with KeepContext), its work stopped while
    frozen and goes on after, every byte intact."""
    model = engine.get(name)
    await engine.refresh(model)
    used_before = gpu_used(engine)
    for _cycle in range(3):
        await engine.freeze(name)
        assert (model.freeze_path, model.state) == ("agent-only" if keep_context else "agent", State.FROZEN)
        assert model.parked_bytes >= MIB << 20, "the tensors were parked"
        held = engine.telemetry.vram_by_pid()
        if keep_context:
            assert all(sum(held[pid].values()) < MIB << 20 for pid in pids), "only the context stays"
        else:
            assert not any(pid in held for pid in pids)
        assert used_before - gpu_used(engine) >= (MIB << 20) * 0.9
        assert not await counters_move(d, 0.5)
        await engine.thaw(name)
        assert await counters_move(d)
        assert await verify(d, pids) == {pid: True for pid in pids}


@pytest.fixture(scope="session")
def preload_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The interposer (native/preload), built from the checkout as the packages build it."""
    out = tmp_path_factory.mktemp("preload")
    root = Path(__file__).resolve().parents[2]
    subprocess.run(["make", "-s", "-C", str(root), "preload", f"PRELOAD_OUT={out}"], check=True)
    return str(out / "libgpuschedd-preload.so")


@pytest.mark.parametrize("keep_context", [False, True], ids=["agent", "agent-only"])
async def test_inject_agent_parks_an_unmodified_torch_model(
    engine: Engine, tmp_path: Path, preload_lib: str, monkeypatch: pytest.MonkeyPatch, keep_context: bool
) -> None:
    """InjectAgent on the real driver: torch_model.py without --agent (it imports nothing of gpuschedd, its steps
    run in no busy()) gets the interposer preloaded; its freezes park its tensors through it, the gate holds its
    matmuls, and every byte is back after the thaw."""
    from gpuschedd import preload

    monkeypatch.setattr(preload, "library_path", lambda: preload_lib)
    d = tmp_path / "inject"
    options = RunOptions(inject_agent=True, keep_context=keep_context)
    pids = await run_model(engine, "inject", d, "--matmul", options=options)
    await parked_cycles(engine, "inject", d, pids, keep_context)


async def test_migrate_onto_the_same_gpu_is_an_identity_map(engine: Engine, tmp_path: Path) -> None:
    """Issue 8 on one GPU: the driver accepts gpuPairs mapping the GPU onto itself; an unknown target is refused."""
    d = tmp_path / "mig"
    pids = await run_model(engine, "mig", d)
    gpu = engine.telemetry.gpus()[0]
    with pytest.raises(InvalidArgs):
        await engine.migrate("mig", "7")
    assert engine.get("mig").state == State.RUNNING and await counters_move(d)
    model = await engine.migrate("mig", gpu.uuid)
    assert model.state == State.RUNNING and set(model.vram_by_gpu) == {gpu.uuid}
    assert await counters_move(d)
    assert await verify(d, pids) == {pid: True for pid in pids}
    await engine.freeze("mig")
    await engine.migrate("mig", "0")
    assert engine.get("mig").state == State.RUNNING and await counters_move(d)


async def test_idle_freeze_reads_real_per_process_utilization(engine: Engine, tmp_path: Path) -> None:
    """Issue 9 on the GPU: NVML's per-process utilization tells a model that computes (--matmul) from one that
    only holds its memory; after IdleFreezeSec only the idle one is frozen, with the reason in its event."""
    from gpuschedd.events import EventKind

    recorder = Recorder()
    engine.add_listener(recorder)
    idle, busy = tmp_path / "idle", tmp_path / "busy"
    await run_model(engine, "idle", idle, options=RunOptions(idle_freeze_sec=2))
    await run_model(engine, "busy", busy, "--matmul", options=RunOptions(idle_freeze_sec=2))
    for name in ("idle", "busy"):
        await engine.refresh(engine.get(name))
    deadline = time.monotonic() + 20
    while engine.get("idle").state != State.FROZEN and time.monotonic() < deadline:
        await engine.apply_policies()
        await asyncio.sleep(1)
    assert engine.get("idle").state == State.FROZEN
    assert engine.get("busy").state == State.RUNNING
    assert await counters_move(busy)
    [freeze] = [e for e in recorder.events if e.model == "idle" and e.kind == EventKind.FREEZE]
    assert freeze.fields.get("GPUSCHED_REASON") == "idle", freeze
    assert "no GPU utilization" in freeze.message
    await engine.thaw("idle")
    assert await counters_move(idle)


async def test_adopted_pytorch_processes_freeze_and_thaw(engine: Engine, tmp_path: Path) -> None:
    """Issue 9 on the GPU: a PyTorch process started by hand, not by gpuschedd, adopted with AdoptProcesses into
    its scope, is frozen and thawed like any model, its tensors intact; Forget lets it go, still computing."""
    import subprocess

    d = tmp_path / "adopted"
    d.mkdir()
    proc = subprocess.Popen([sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d)])
    try:
        [pid] = (await wait_ready(d, 1)).keys()
        await engine.adopt_processes("adopted", [pid], 0)
        await engine.freeze("adopted")
        assert engine.get("adopted").cuda_pids == [pid]
        assert pid not in engine.telemetry.vram_by_pid()
        assert not await counters_move(d, 0.5)
        await engine.thaw("adopted")
        assert await counters_move(d)
        assert await verify(d, [pid]) == {pid: True}
        await engine.forget("adopted")
        assert proc.poll() is None and await counters_move(d)
    finally:
        proc.kill()
        proc.wait()
