"""The engine with the driver backend over the fake libcuda, fake NVML over the same state, and real model
processes: ordering across a multi-process model, rollback of partial failures, and memory accounting."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from counters import amoves, astill, file_counter
from engine_kit import make_engine
from fakegpu_fixtures import GIB, GPU0, GPU1, MIB, fake_model_argv, registered
from polling import until
from process_units import ProcessUnits
from test_disk_tier import FakeKernel

from gpuschedd import preload, spill
from gpuschedd.checkpoint import CudaState, NoCheckpoint
from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.engine import parking as engine_module
from gpuschedd.errors import (
    CheckpointFailed,
    InsufficientGpuMemory,
    InvalidArgs,
    InvalidState,
    NotSupported,
    RamBudgetExceeded,
)
from gpuschedd.events import EventKind
from gpuschedd.model import Model, State
from gpuschedd.options import RunOptions
from gpuschedd.testing.fakegpu import FakeGpuTelemetry

VRAM = 200 * MIB


@pytest.fixture
async def setup(gpu_dir, tmp_path):  # type: ignore[no-untyped-def]
    units = ProcessUnits()
    engine, events = make_engine(
        units,
        checkpoint=DriverCheckpoint(),
        telemetry=FakeGpuTelemetry(gpu_dir.path),
        config=Config(ram_budget_bytes=4 << 30),
    )
    await engine.start()
    yield engine, units, gpu_dir, events, tmp_path
    await units.close()


async def run_model(engine: Engine, gpu_dir, tmp_path, name: str = "m", procs: int = 2) -> Model:  # type: ignore[no-untyped-def]
    before = len(gpu_dir.contexts())
    model = await engine.run(name, fake_model_argv(gpu_dir, tmp_path / name, VRAM, GPU0, procs), RunOptions(), 0)
    await until("registration", lambda: registered(gpu_dir, before + procs), 5.0)
    await engine.refresh(model)
    assert len(model.pids) == procs
    return model


def steps(gpu_dir, pids: list[int]) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return [(step, pid) for step, pid, result in gpu_dir.log() if pid in pids and result == "CUDA_SUCCESS"]


def states(gpu_dir, pids: list[int]) -> list[CudaState | None]:  # type: ignore[no-untyped-def]
    return [gpu_dir.state(pid) for pid in pids]


async def test_freeze_and_thaw_a_two_process_model(setup) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path)
    a, b = model.pids
    nvml = engine.telemetry
    assert model.vram_bytes == 2 * VRAM and model.vram_by_gpu == {GPU0: 2 * VRAM}
    free_running = nvml.gpus()[0].free_bytes

    await engine.freeze("m")
    assert model.state == State.FROZEN and model.cuda_pids == [a, b]
    assert units.frozen == {model.unit}
    assert steps(gpu_dir, [a, b]) == [("lock", a), ("lock", b), ("checkpoint", a), ("checkpoint", b)]
    assert nvml.vram_by_pid() == {}, "checkpointed processes leave NVML's list"
    assert nvml.gpus()[0].free_bytes == free_running + 2 * VRAM
    assert model.snapshot_bytes >= 2 * VRAM * 0.9, "the snapshot is the targets' RSS growth"
    assert engine.ram_frozen_bytes() == model.snapshot_bytes
    assert await astill(file_counter(tmp_path / "m"))

    await engine.thaw("m")
    assert model.state == State.RUNNING and units.frozen == set()
    assert steps(gpu_dir, [a, b])[4:] == [("restore", a), ("restore", b), ("unlock", a), ("unlock", b)]
    assert states(gpu_dir, [a, b]) == [CudaState.RUNNING, CudaState.RUNNING]
    assert await amoves(file_counter(tmp_path / "m")) and await amoves(file_counter(f"{tmp_path / 'm'}.1"))
    assert engine.ram_frozen_bytes() == 0
    assert [e.kind for e in events.events][-2:] == [EventKind.FREEZE, EventKind.THAW]


@pytest.mark.parametrize(("step", "error"), [("lock", "CUDA_ERROR_NOT_READY"), ("checkpoint", "CUDA_ERROR_UNKNOWN")])
async def test_partial_failure_rolls_every_process_back(setup, step, error) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, _, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path)
    a, b = model.pids
    gpu_dir.fail(b, step, error)
    with pytest.raises(CheckpointFailed) as e:
        await engine.freeze("m")
    assert f"{step} of pid {b} failed: {error}" in e.value.message
    assert model.state == State.RUNNING and not model.cuda_pids and units.frozen == set()
    assert states(gpu_dir, [a, b]) == [CudaState.RUNNING, CudaState.RUNNING]
    assert await amoves(file_counter(tmp_path / "m")) and await amoves(file_counter(f"{tmp_path / 'm'}.1"))
    # Once the cause is gone, the same model freezes fine.
    gpu_dir.clear_failures()
    await engine.freeze("m")
    assert states(gpu_dir, [a, b]) == [CudaState.CHECKPOINTED, CudaState.CHECKPOINTED]


async def test_lock_timeout_is_honoured(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, _, tmp_path = setup
    engine.config.lock_timeout_ms = 150
    model = await run_model(engine, gpu_dir, tmp_path)
    a, b = model.pids
    gpu_dir.busy(b, 10_000)
    with pytest.raises(CheckpointFailed) as e:
        await asyncio.wait_for(engine.freeze("m"), 3)
    assert f"lock of pid {b} failed: CUDA_ERROR_NOT_READY" in e.value.message
    assert states(gpu_dir, [a, b]) == [CudaState.RUNNING, CudaState.RUNNING]


async def test_restore_failure_leaves_the_model_frozen(setup) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, _, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path)
    a, b = model.pids
    await engine.freeze("m")
    gpu_dir.fail(b, "restore", "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(CheckpointFailed) as e:
        await engine.thaw("m")
    assert f"restore of pid {b} failed: CUDA_ERROR_OUT_OF_MEMORY" in e.value.message
    assert model.state == State.FROZEN and model.cuda_pids == [a, b] and units.frozen == {model.unit}
    assert states(gpu_dir, [a, b]) == [CudaState.CHECKPOINTED, CudaState.CHECKPOINTED]


async def test_thaw_refused_when_the_gpu_lacks_room(setup) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path)
    await engine.freeze("m")
    gpu_dir.allocate("other", 700 * MIB, GPU0)  # 1 GiB GPU: 324 MiB free, the model needs 400
    calls = len(gpu_dir.log())
    with pytest.raises(InsufficientGpuMemory) as e:
        await engine.thaw("m")
    assert (e.value.needed, e.value.free, e.value.gpu) == (2 * VRAM, 324 * MIB, GPU0)
    assert "GPU 0" in e.value.message
    assert model.state == State.FROZEN and units.frozen == {model.unit}
    assert len(gpu_dir.log()) == calls, "nothing was attempted"
    assert not any(gpu_dir.broken(pid) for pid in model.pids)
    assert events.events[-1].kind == EventKind.REFUSAL
    gpu_dir.free("other")
    await engine.thaw("m")
    assert model.state == State.RUNNING


async def test_freeze_refused_over_the_ram_budget(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, _, tmp_path = setup
    first = await run_model(engine, gpu_dir, tmp_path, "first", procs=1)
    second = await run_model(engine, gpu_dir, tmp_path, "second", procs=1)
    await engine.freeze("first")
    engine.config.ram_budget_bytes = first.snapshot_bytes + VRAM - 1
    calls = len(gpu_dir.log())
    with pytest.raises(RamBudgetExceeded) as e:
        await engine.freeze("second")
    assert "budget" in e.value.message
    assert second.state == State.RUNNING and len(gpu_dir.log()) == calls
    engine.config.ram_budget_bytes = 4 << 30
    engine.mem_available = lambda: VRAM - 1
    with pytest.raises(RamBudgetExceeded) as e:
        await engine.freeze("second")
    assert "MemAvailable" in e.value.message
    engine.mem_available = lambda: 1 << 40
    await engine.freeze("second")
    assert second.state == State.FROZEN


async def test_a_model_without_cuda_freezes_with_the_cgroup_alone(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, _, _ = setup
    model = await engine.run("plain", ["sleep", "60"], RunOptions(), 0)
    await engine.freeze("plain")
    assert model.state == State.FROZEN and model.cuda_pids == [] and model.snapshot_bytes == 0
    assert not [s for s in gpu_dir.log() if s[0] != "init"]
    await engine.thaw("plain")
    assert model.state == State.RUNNING


async def test_a_failed_rollback_is_not_reported_as_success(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, _, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path)
    a, b = model.pids
    gpu_dir.fail(b, "checkpoint", "CUDA_ERROR_UNKNOWN")
    gpu_dir.fail(a, "restore", "CUDA_ERROR_UNKNOWN")
    with pytest.raises(CheckpointFailed) as e:
        await engine.freeze("m")
    assert f"restore of pid {a} failed" in e.value.message and "rolled back to running" not in e.value.message


async def test_freeze_refused_when_nvml_sees_vram_the_driver_cannot(setup) -> None:  # type: ignore[no-untyped-def]
    """The real driver answers OPERATING_SYSTEM for a process without CUDA; a CUDA process answering that too
    must not be cgroup-frozen with its VRAM still held."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, procs=1)
    gpu_dir.fail(model.pids[0], "get-state", "CUDA_ERROR_OPERATING_SYSTEM")
    with pytest.raises(CheckpointFailed, match=f"pid {model.pids[0]} holds VRAM"):
        await engine.freeze(model.name)
    assert model.state == State.RUNNING
    assert states(gpu_dir, model.pids) == [CudaState.RUNNING]


# ---------------------------------------------------------------- which processes the driver is asked about


def asked_about(engine: Engine) -> list[list[int]]:
    """Every list of PIDs the checkpoint backend is asked about (cuda_pids) from now on."""
    asked: list[list[int]] = []
    real = engine.checkpoint.cuda_pids

    def cuda_pids(pids: list[int]) -> list[int]:
        asked.append(list(pids))
        return real(pids)

    engine.checkpoint.cuda_pids = cuda_pids  # type: ignore[method-assign]
    return asked


def register_context(gpu_dir, pid: int, vram: int = VRAM) -> None:  # type: ignore[no-untyped-def]
    """`pid` holds a CUDA context of the fake driver (and VRAM that fake NVML shows), without its device file open."""
    Path(gpu_dir.path, "ctx", str(pid)).write_text(f"vram={vram}\ngpu={GPU0}\nagent=0\n")


async def test_the_driver_is_asked_only_about_processes_that_hold_its_device_open(setup) -> None:  # type: ignore[no-untyped-def]
    """A CUDA process holds the driver's device file open (the fake's, as a real one holds /dev/nvidia*); a process
    without it cannot hold a context and costs the freeze no driver call (nor a worker thread)."""
    engine, _, gpu_dir, _, tmp_path = setup
    before = len(gpu_dir.contexts())
    argv = [*fake_model_argv(gpu_dir, tmp_path / "m", VRAM, GPU0, 1), "--noncuda-child"]
    model = await engine.run("m", argv, RunOptions(), 0)
    await until("registration", lambda: registered(gpu_dir, before + 1), 5.0)
    await until("the child", lambda: Path(f"{tmp_path / 'm'}.noncuda").exists(), 5.0)
    await engine.refresh(model)
    [cuda] = [c.pid for c in gpu_dir.contexts()]
    [other] = [pid for pid in model.pids if pid != cuda]
    asked = asked_about(engine)
    await engine.freeze("m")
    assert asked == [[cuda]] and model.cuda_pids == [cuda] and model.state == State.FROZEN
    await engine.thaw("m")

    plain = await engine.run("plain", ["sleep", "60"], RunOptions(), 0)
    await engine.freeze("plain")
    assert asked == [[cuda]], "a model without CUDA: nothing asked" and plain.state == State.FROZEN
    assert other not in model.cuda_pids


async def test_a_process_nvml_sees_holding_vram_is_asked_about_without_a_device_open(setup) -> None:  # type: ignore[no-untyped-def]
    """The descriptors only spare the driver a question: a process that NVML sees holding GPU memory is asked
    about whatever they say, so the cross-check (NVML sees memory the backend cannot) still refuses the freeze."""
    engine, _, gpu_dir, _, _ = setup
    model = await engine.run("odd", ["sleep", "60"], RunOptions(), 0)
    [pid] = model.pids
    register_context(gpu_dir, pid)
    asked = asked_about(engine)
    gpu_dir.fail(pid, "get-state", "CUDA_ERROR_OPERATING_SYSTEM")
    with pytest.raises(CheckpointFailed, match=f"pid {pid} holds VRAM"):
        await engine.freeze("odd")
    assert asked == [[pid]] and model.state == State.RUNNING
    gpu_dir.clear_failures()
    await engine.freeze("odd")
    assert asked == [[pid], [pid]] and model.cuda_pids == [pid] and gpu_dir.state(pid) == CudaState.CHECKPOINTED


async def test_a_context_created_after_the_look_at_the_descriptors_is_checkpointed(setup) -> None:  # type: ignore[no-untyped-def]
    """A process with no device open when the freeze looked, that has a context by the time its cgroup is frozen,
    is found by NVML after the cgroup freeze and checkpointed: it is not left frozen holding its VRAM."""
    engine, units, gpu_dir, _, _ = setup
    model = await engine.run("late", ["sleep", "60"], RunOptions(), 0)
    [pid] = model.pids
    asked = asked_about(engine)
    freeze = units.freeze

    async def context_then_freeze(unit: str) -> None:
        if not model.cuda_pids and gpu_dir.state(pid) is None:
            register_context(gpu_dir, pid)
        await freeze(unit)

    units.freeze = context_then_freeze  # type: ignore[method-assign]
    await engine.freeze("late")
    assert asked == [], "no device open when it looked"
    assert model.state == State.FROZEN and model.cuda_pids == [pid] and gpu_dir.state(pid) == CudaState.CHECKPOINTED
    assert ("thaw", model.unit) in units.calls, "the cgroup was thawed to checkpoint the late one"


# ---------------------------------------------------------------- Migrate: GPU pairs on the restore


def on_gpu(gpu_dir, pids: list[int]) -> set[str]:  # type: ignore[no-untyped-def]
    return {c.gpu for c in gpu_dir.contexts() if c.pid in pids}


async def test_migrate_a_running_model(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, procs=2)
    free1 = {g.uuid: g.free_bytes for g in engine.telemetry.gpus()}
    await engine.migrate("m", "1")  # by index
    assert model.state == State.RUNNING and model.gpus == [GPU1]
    assert on_gpu(gpu_dir, model.pids) == {GPU1}
    assert model.vram_by_gpu == {GPU1: model.vram_bytes}
    free2 = {g.uuid: g.free_bytes for g in engine.telemetry.gpus()}
    assert free2[GPU0] == free1[GPU0] + model.vram_bytes and free2[GPU1] == free1[GPU1] - model.vram_bytes
    restores = [e for e in gpu_dir.log() if e[0] == "restore" and e[2] == "CUDA_SUCCESS"]
    assert len(restores) == 2
    assert [e.kind for e in events.events][-3:] == [EventKind.FREEZE, EventKind.THAW, EventKind.MIGRATE]
    assert await amoves(file_counter(tmp_path / "m"))
    # and back, by UUID; then a move onto the GPU it is on (an identity map) is a freeze and a thaw
    await engine.migrate("m", GPU0)
    assert on_gpu(gpu_dir, model.pids) == {GPU0}
    await engine.migrate("m", GPU0)
    assert on_gpu(gpu_dir, model.pids) == {GPU0} and model.state == State.RUNNING


async def test_migrate_a_frozen_model_runs_it_there(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, procs=1)
    await engine.freeze("m")
    await engine.migrate("m", GPU1)
    assert model.state == State.RUNNING and on_gpu(gpu_dir, model.pids) == {GPU1}


async def refused(engine: Engine, gpu_dir, model, error: type[Exception], gpu: str) -> None:  # type: ignore[no-untyped-def]
    before = (model.state, on_gpu(gpu_dir, model.pids), [gpu_dir.state(p) for p in model.pids])
    with pytest.raises(error):
        await engine.migrate(model.name, gpu)
    assert (model.state, on_gpu(gpu_dir, model.pids), [gpu_dir.state(p) for p in model.pids]) == before


async def test_refusals_change_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, procs=1)
    await refused(engine, gpu_dir, model, InvalidArgs, "7")
    await refused(engine, gpu_dir, model, InvalidArgs, "GPU-00000000-0000-0000-0000-000000000000")
    gpu_dir.allocate("hog", GIB - 16 * MIB, GPU1)  # the target has less room than the model holds
    await refused(engine, gpu_dir, model, InsufficientGpuMemory, GPU1)
    await engine.freeze("m")
    await refused(engine, gpu_dir, model, InsufficientGpuMemory, GPU1)  # a frozen one stays frozen
    assert model.state == State.FROZEN


async def test_a_failed_restore_leaves_it_frozen_where_it_was(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, procs=2)
    a, b = model.pids
    gpu_dir.fail(b, "restore", "CUDA_ERROR_INVALID_DEVICE")
    with pytest.raises(CheckpointFailed, match=f"restore of pid {b}"):
        await engine.migrate("m", GPU1)
    assert model.state == State.FROZEN
    assert [gpu_dir.state(p) for p in (a, b)] == [CudaState.CHECKPOINTED, CudaState.CHECKPOINTED]
    gpu_dir.clear_failures()
    await engine.thaw("m")  # on the GPU it came from, as if nothing had been tried
    assert model.state == State.RUNNING and on_gpu(gpu_dir, model.pids) == {GPU0}


async def test_without_a_checkpoint_backend(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    await run_model(engine, gpu_dir, tmp_path, procs=1)
    engine.checkpoint = NoCheckpoint()
    with pytest.raises(NotSupported):
        await engine.migrate("m", GPU1)


# ---------------------------------------------------------------- the fast path (gpuschedd.agent)

PARKED = 60 * MIB  # ten of fake_model.py's 6 MiB segments


async def run_agent_model(engine: Engine, gpu_dir, tmp_path, name: str = "fast", keep_context: bool = False) -> Model:  # type: ignore[no-untyped-def]
    engine.config.agent_root = str(tmp_path / "agents")
    argv = [*fake_model_argv(gpu_dir, tmp_path / name, VRAM, GPU0, 1), "--park-bytes", str(PARKED)]
    model = await engine.run(name, argv, RunOptions(agent=True, keep_context=keep_context), 0)
    await until("the agent's socket", lambda: list((tmp_path / "agents" / name).glob("agent-*.sock")))
    await engine.refresh(model)
    return model


def not_corrupt(tmp_path, name: str = "fast") -> bool:  # type: ignore[no-untyped-def]
    return (tmp_path / name).read_text() != "CORRUPT"


async def test_the_agent_parks_and_the_driver_takes_the_rest(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, events, tmp_path = setup
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    assert model.vram_bytes == VRAM + PARKED
    for _cycle in range(2):
        await engine.freeze("fast")
        assert (model.freeze_path, model.parked_bytes) == ("agent", PARKED)
        assert engine.telemetry.vram_by_pid() == {}, "parked and checkpointed: nothing left on the GPU"
        assert model.snapshot_bytes >= (VRAM + PARKED) * 0.9, "both halves are in host RAM"
        assert "bytes parked by the agent" in events.events[-1].message
        assert await astill(file_counter(tmp_path / "fast"))
        await engine.thaw("fast")
        assert model.state == State.RUNNING
        assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)
    assert engine.telemetry.vram_by_pid()[model.main_pid] == {GPU0: VRAM + PARKED}


async def test_an_agent_that_fails_leaves_the_driver_path(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    gpu_dir.fail(model.main_pid, "memcpy", "CUDA_ERROR_UNKNOWN")
    await engine.freeze("fast")
    assert (model.state, model.freeze_path, model.parked_bytes) == (State.FROZEN, "driver", 0)
    gpu_dir.clear_failures()
    await engine.thaw("fast")
    assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)


async def test_a_model_without_an_agent_takes_the_driver_path(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _units, gpu_dir, _events, tmp_path = setup
    engine.config.agent_root = str(tmp_path / "agents")
    await engine.run("plain", fake_model_argv(gpu_dir, tmp_path / "plain", VRAM, GPU0, 1), RunOptions(agent=True), 0)
    await until("registration", lambda: registered(gpu_dir, 1), 5.0)
    model = await engine.freeze("plain")
    assert (model.freeze_path, model.parked_bytes) == ("driver", 0)
    await engine.thaw("plain")


async def test_an_unpark_that_finds_no_memory_leaves_the_model_frozen(setup) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, _events, tmp_path = setup
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    await engine.freeze("fast")
    gpu_dir.fail(model.main_pid, "mem-create", "CUDA_ERROR_OUT_OF_MEMORY")
    with pytest.raises(CheckpointFailed, match="stay parked"):
        await engine.thaw("fast")
    assert model.state == State.FROZEN and units.frozen == {model.unit}
    assert await astill(file_counter(tmp_path / "fast"))
    gpu_dir.clear_failures()
    await engine.thaw("fast")
    assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)
    await engine.freeze("fast")
    assert model.freeze_path == "agent"


async def test_a_page_out_spills_what_the_agent_parked_and_the_thaw_reads_it_back(setup) -> None:  # type: ignore[no-untyped-def]
    """The disk tier's spill files through the engine (spill.py), on a host without swap: the parked bytes leave
    RAM for the daemon's file, the model is stopped again after its agent's moment, and the thaw reads them back."""
    engine, units, gpu_dir, events, tmp_path = setup
    kernel = FakeKernel(engine, 0)
    engine.config.spill_directory = str(tmp_path / "spill")
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    await engine.freeze("fast")
    in_ram = model.snapshot_in_ram()
    await engine.page_out("fast")
    assert (model.state, model.snapshot_in_files(), model.snapshot_in_ram()) == (State.FROZEN, PARKED, in_ram - PARKED)
    assert kernel.calls == [] and units.frozen == {model.unit}, "no swap to page the rest to; frozen again"
    assert await astill(file_counter(tmp_path / "fast"))
    paged = events.events[-1]
    assert paged.kind == EventKind.PAGE_OUT and paged.fields["GPUSCHED_FILE_BYTES"] == str(PARKED)
    assert paged.bytes == PARKED and not list((tmp_path / "spill").iterdir()), "the file has no name"
    with pytest.raises(NotSupported, match="needs swap"):
        await engine.page_out("fast")  # nothing left to spill, no swap for the rest
    assert model.snapshot_in_files() == PARKED
    await engine.thaw("fast")
    thawed = events.events[-1]
    assert thawed.kind == EventKind.THAW and thawed.fields["GPUSCHED_FILE_BYTES"] == str(PARKED)
    assert model.spilled_bytes == 0 and await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)


async def test_a_thaw_has_the_agent_read_its_spill_file_ahead_while_the_driver_restores(setup, caplog) -> None:  # type: ignore[no-untyped-def]
    """The disk need not wait for the driver's restore of the contexts: the agent is asked to read its file's first
    bytes while the restore is still held (the fake driver holds it until released)."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    FakeKernel(engine, 0)
    engine.config.spill_directory = str(tmp_path / "spill")
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    await engine.freeze("fast")
    await engine.page_out("fast")
    caplog.set_level(logging.INFO, engine_module.__name__)
    gpu_dir.hold(model.main_pid, "restore")
    thaw = asyncio.ensure_future(engine.thaw("fast"))
    asked = f"the agent of pid {model.main_pid} reads {PARKED} bytes ahead"
    try:
        await until("the read-ahead asked for", lambda: asked in caplog.text)
        assert not thaw.done() and model.state == State.THAWING
    finally:
        gpu_dir.release(model.main_pid, "restore")
    await thaw
    assert model.state == State.RUNNING and await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)


async def test_parked_bytes_that_cannot_be_spilled_stay_for_swap(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An agent claiming more than the model held on the GPU is not believed, and a spill directory without room
    writes nothing: the bytes stay in RAM, for the swap where there is one, and the model thaws whole."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    kernel = FakeKernel(engine, 0)
    engine.config.spill_directory = str(tmp_path / "spill")
    model = await run_agent_model(engine, gpu_dir, tmp_path)
    await engine.freeze("fast")
    held, model.vram_bytes = model.vram_bytes, PARKED - 1
    with pytest.raises(NotSupported, match="could not write their parked bytes"):
        await engine.page_out("fast")
    assert (model.state, model.spilled_bytes) == (State.FROZEN, 0)
    model.vram_bytes = held
    monkeypatch.setattr(spill, "RESERVE", 1.0)  # the whole file system kept free: no room
    kernel.total = kernel.free = 1 << 30
    await engine.page_out("fast")
    assert model.spilled_bytes == 0 and model.snapshot_in_swap() == model.snapshot_bytes, "all of it went to swap"
    await engine.thaw("fast")
    assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)


async def run_hostile_model(engine: Engine, gpu_dir, tmp_path, name: str, kind: str) -> Model:  # type: ignore[no-untyped-def]
    """A model whose agent socket is served by its own code, answering every request in a hostile way."""
    engine.config.agent_root = str(tmp_path / "agents")
    argv = [*fake_model_argv(gpu_dir, tmp_path / name, VRAM, GPU0, 1), "--hostile-agent", kind]
    model = await engine.run(name, argv, RunOptions(agent=True), 0)
    await until("the agent's socket", lambda: list((tmp_path / "agents" / name).glob("agent-*.sock")))
    await engine.refresh(model)
    return model


async def wait_on_agents(engine: Engine, name: str, freezing: asyncio.Task[Model]) -> None:
    """Until the freeze waits on the model's agents (or is over: garbage fails at once)."""
    await until("the freeze to wait on the agents", lambda: name in engine._agent_waits or freezing.done())


@pytest.mark.parametrize("kind", ["drip", "silent", "garbage"])
async def test_a_hostile_agent_costs_only_its_own_park(setup, monkeypatch, kind: str) -> None:  # type: ignore[no-untyped-def]
    """An agent that drip-feeds, stays silent or answers garbage fails its own process's park by the call's one
    deadline: that model is frozen by the driver instead, and another model's freeze and thaw meanwhile wait
    neither for it nor for a worker thread it holds."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    monkeypatch.setattr(engine_module, "GRACE_S", 0.0)
    engine.config.agent_timeout_ms = 20_000 if kind != "garbage" else 500
    bad = await run_hostile_model(engine, gpu_dir, tmp_path, "bad", kind)
    await run_agent_model(engine, gpu_dir, tmp_path)
    freezing = asyncio.create_task(engine.freeze("bad"))
    await wait_on_agents(engine, "bad", freezing)
    await engine.freeze("fast")
    await engine.thaw("fast")
    assert not freezing.done() or kind == "garbage", "the other model did not wait for the hostile agent"
    engine.config.agent_timeout_ms = 300  # its deadline, were it shorter: the park fails, the driver freezes it
    if kind != "garbage":
        engine._agent_waits["bad"].cancel()  # (a Stop's cut, here only to end the long wait quickly)
        with pytest.raises(InvalidState, match="its freeze was cancelled"):
            await freezing
        assert (bad.state, gpu_dir.state(bad.main_pid)) == (State.RUNNING, CudaState.RUNNING)
        freezing = asyncio.create_task(engine.freeze("bad"))
    await freezing
    assert (bad.state, bad.freeze_path, gpu_dir.state(bad.main_pid)) == (State.FROZEN, "driver", CudaState.CHECKPOINTED)
    await engine.thaw("bad")
    assert await amoves(file_counter(tmp_path / "bad"))


async def test_a_stop_cuts_a_freeze_waiting_on_a_silent_agent(setup) -> None:  # type: ignore[no-untyped-def]
    """The freeze rolls back (nothing was checkpointed or frozen yet) and the stop proceeds at once, not after
    the agent's deadline; no process is left."""
    engine, units, gpu_dir, events, tmp_path = setup
    engine.config.agent_timeout_ms = 3_600_000
    bad = await run_hostile_model(engine, gpu_dir, tmp_path, "bad", "silent")
    pid = bad.main_pid
    freezing = asyncio.create_task(engine.freeze("bad"))
    await wait_on_agents(engine, "bad", freezing)
    await engine.stop("bad")
    with pytest.raises(InvalidState, match="being stopped: its freeze was cancelled, nothing was changed"):
        await freezing
    assert bad.state == State.STOPPED and not engine._parked and not engine._agent_waits
    assert bad.unit not in units.procs and units.frozen == set()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert [e.kind for e in events.events[-1:]] == [EventKind.STOP]


# ---------------------------------------------------------------- InjectAgent: the interposer as the agent


async def test_inject_agent_parks_an_unmodified_program(  # type: ignore[no-untyped-def]
    setup, monkeypatch, preload_lib, preload_program, fakecuda_lib
) -> None:
    """Run with InjectAgent: the daemon preloads native/preload into a program that knows nothing of gpuschedd (a C
    program of the fake libcuda, launching from two threads), and its freezes take the fast path like an Agent
    model's: the interposer parks what cuMemAlloc gave, the driver the rest, every byte back after the thaw."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    engine.config.agent_root = str(tmp_path / "agents")
    monkeypatch.setattr(preload, "library_path", lambda: str(preload_lib))
    argv = [str(preload_program), GPU0, "2", str(tmp_path / "c")]
    environment = [f"LD_LIBRARY_PATH={fakecuda_lib.parent}", "LD_PRELOAD=libm.so.6"]
    options = RunOptions(inject_agent=True, environment=environment)
    model = await engine.run("c", argv, options, 0)
    assert (model.agent, model.inject_agent) == (True, True)
    environ = Path(f"/proc/{model.main_pid}/environ").read_bytes().split(b"\0")
    assert f"LD_PRELOAD={preload_lib} libm.so.6".encode() in environ, "the interposer first, then the caller's"
    await until("the interposer's socket", lambda: list((tmp_path / "agents" / "c").glob("agent-*.sock")), 10.0)
    await engine.refresh(model)
    assert await amoves(file_counter(tmp_path / "c")), "its threads launch: every buffer is allocated"
    for _cycle in range(2):
        await engine.freeze("c")
        assert (model.freeze_path, model.parked_bytes) == ("agent", 2 * 4 * MIB + 8 * MIB)
        assert gpu_dir.state(model.main_pid) == CudaState.CHECKPOINTED, "the driver took the rest"
        await engine.thaw("c")
        assert await amoves(file_counter(tmp_path / "c")) and not_corrupt(tmp_path, "c")


async def test_the_interposers_staging_ring_counts_in_the_snapshot(  # type: ignore[no-untyped-def]
    setup, monkeypatch, preload_lib, preload_program, fakecuda_lib
) -> None:
    """The interposer keeps its pinned bounce buffers from the park to the unpark and says how much: host RAM the
    frozen model holds beside its parked bytes, so the snapshot (and the RAM budget) count it."""
    engine, _units, _gpu_dir, _events, tmp_path = setup
    engine.config.agent_root = str(tmp_path / "agents")
    monkeypatch.setattr(preload, "library_path", lambda: str(preload_lib))
    argv = [str(preload_program), GPU0, "2", str(tmp_path / "c")]
    options = RunOptions(inject_agent=True, keep_context=True, environment=[f"LD_LIBRARY_PATH={fakecuda_lib.parent}"])
    model = await engine.run("c", argv, options, 0)
    await until("the interposer's socket", lambda: list((tmp_path / "agents" / "c").glob("agent-*.sock")), 10.0)
    await engine.refresh(model)
    assert await amoves(file_counter(tmp_path / "c"))
    engine.rss = lambda pid: 0  # no RSS growth to see: the snapshot is what the agent reported
    await engine.freeze("c")
    staging = sum(link.staging_bytes for link in engine._parked["c"])
    assert model.freeze_path == "agent-only" and staging >= 2 * 4 * MIB
    assert model.snapshot_bytes == model.parked_bytes + staging
    await engine.thaw("c")
    assert await amoves(file_counter(tmp_path / "c")) and not_corrupt(tmp_path, "c")


async def test_inject_agent_needs_the_library(setup, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine, _units, _gpu_dir, _events, _tmp = setup
    monkeypatch.setattr(preload, "library_path", lambda: str(tmp_path / "missing.so"))
    with pytest.raises(NotSupported, match=r"InjectAgent needs libgpuschedd-preload\.so"):
        await engine.run("c", ["/bin/true"], RunOptions(inject_agent=True), 0)
    assert "c" not in engine.models


# ---------------------------------------------------------------- KeepContext: the agents park, no driver call


async def test_keep_context_freezes_without_the_driver(setup) -> None:  # type: ignore[no-untyped-def]
    """Every process's agent parked: the driver is not called, each process keeps its context's memory (here
    the fake model's VRAM outside the agent) on the GPU, the cgroup holds it; the thaw unparks."""
    engine, units, gpu_dir, events, tmp_path = setup
    model = await run_agent_model(engine, gpu_dir, tmp_path, keep_context=True)
    pid = model.main_pid
    calls = len(steps(gpu_dir, [pid]))
    for _cycle in range(2):
        await engine.freeze("fast")
        assert (model.state, model.freeze_path, model.parked_bytes) == (State.FROZEN, "agent-only", PARKED)
        assert units.frozen == {model.unit} and gpu_dir.state(pid) == CudaState.RUNNING
        assert len(steps(gpu_dir, [pid])) == calls, "no lock, no checkpoint"
        assert engine.telemetry.vram_by_pid() == {pid: {GPU0: VRAM}}, "the context stays, the parked memory left"
        assert model.snapshot_bytes >= PARKED and engine.ram_frozen_bytes() == model.snapshot_bytes
        assert "CUDA contexts kept on the GPU" in events.events[-1].message
        assert await astill(file_counter(tmp_path / "fast"))
        await engine.thaw("fast")
        assert model.state == State.RUNNING and len(steps(gpu_dir, [pid])) == calls
        assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)
    assert engine.telemetry.vram_by_pid()[pid] == {GPU0: VRAM + PARKED}


async def test_keep_context_gives_way_where_the_gpu_must_be_released(setup) -> None:  # type: ignore[no-untyped-def]
    """KeepContext needs Agent; an agent that fails, an eviction and a migration take the driver path; a model
    frozen keeping its contexts is not migrated (they are on its GPU)."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    with pytest.raises(InvalidArgs, match="KeepContext needs Agent"):
        await engine.run("nope", ["/bin/true"], RunOptions(keep_context=True), 0)
    assert "nope" not in engine.models
    model = await run_agent_model(engine, gpu_dir, tmp_path, keep_context=True)
    pid = model.main_pid
    gpu_dir.fail(pid, "memcpy", "CUDA_ERROR_UNKNOWN")
    await engine.freeze("fast")
    assert model.freeze_path == "driver" and gpu_dir.state(pid) == CudaState.CHECKPOINTED
    gpu_dir.clear_failures()
    await engine.thaw("fast")
    await engine.freeze("fast", "evicted", "for a test")
    assert model.freeze_path == "agent" and gpu_dir.state(pid) == CudaState.CHECKPOINTED
    await engine.thaw("fast")
    await engine.freeze("fast")
    assert model.freeze_path == "agent-only"
    with pytest.raises(NotSupported, match="keeping its CUDA contexts"):
        await engine.migrate("fast", GPU1)
    gpu_dir.fail(pid, "mem-create", "CUDA_ERROR_OUT_OF_MEMORY")  # the unpark finds no room: settled by the driver
    with pytest.raises(CheckpointFailed, match="stay parked"):
        await engine.thaw("fast")
    assert (model.state, model.freeze_path, gpu_dir.state(pid)) == (State.FROZEN, "agent", CudaState.CHECKPOINTED)
    gpu_dir.clear_failures()
    await engine.thaw("fast")
    await engine.migrate("fast", GPU1)
    assert model.freeze_path == "agent" and model.state == State.RUNNING
    assert engine.telemetry.vram_by_pid()[pid] == {GPU1: VRAM + PARKED}
    assert await amoves(file_counter(tmp_path / "fast")) and not_corrupt(tmp_path)
