"""Reliability of the engine: the saved model table, a restart in the middle of every step of a freeze and of a
thaw (the fake libcuda's per-PID state is the truth a restarted engine reads), rollbacks that must bring every
process back, unit exits seen while a transition holds the model's lock, and a model that dies while frozen."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from engine_kit import Recorder, make_engine
from fake_units import FakeUnits
from fakegpu_fixtures import GPU0, MIB, fake_model_argv, registered
from polling import until
from process_units import ProcessUnits

from gpuschedd.checkpoint import CudaState, NoCheckpoint
from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import CheckpointFailed, InsufficientGpuMemory
from gpuschedd.events import EngineListener, EventKind
from gpuschedd.model import Model, State
from gpuschedd.options import RunOptions
from gpuschedd.recovery import Truth, target_for, with_nvml
from gpuschedd.statefile import StateFile
from gpuschedd.telemetry import NoGpus
from gpuschedd.testing.fakegpu import FakeGpuTelemetry
from gpuschedd.units import UnitStatus

VRAM = 200 * MIB
R, L, C = CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED


def driver_engine(units, gpu_dir, state_path: Path) -> tuple[Engine, Recorder]:  # type: ignore[no-untyped-def]
    return make_engine(
        units,
        checkpoint=DriverCheckpoint(),
        telemetry=FakeGpuTelemetry(gpu_dir.path),
        config=Config(ram_budget_bytes=4 << 30),
        state_file=StateFile(str(state_path)),
    )


@pytest.fixture
async def first(gpu_dir, tmp_path):  # type: ignore[no-untyped-def]
    """A daemon's engine with a two-process fake CUDA model `m` running; the test then plays a crash and starts a
    second engine over the same units, driver and saved table."""
    units = ProcessUnits()
    engine, _ = driver_engine(units, gpu_dir, tmp_path / "run" / "models.json")
    await engine.start()
    model = await engine.run("m", fake_model_argv(gpu_dir, tmp_path / "m", VRAM, GPU0, 2), RunOptions(), 0)
    await until("registration", lambda: registered(gpu_dir, 2), 5.0)
    await engine.refresh(model)
    assert len(model.pids) == 2
    yield engine, units, gpu_dir, model, tmp_path
    await units.close()


async def restart(first_engine: Engine, units, gpu_dir, tmp_path) -> tuple[Engine, Recorder]:  # type: ignore[no-untyped-def]
    engine, events = driver_engine(units, gpu_dir, tmp_path / "run" / "models.json")
    await asyncio.wait_for(engine.start(), 30)
    return engine, events


async def counting(path: Path | str, wait: float = 0.2) -> bool:
    def read() -> int:
        try:
            return int(Path(path).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    before = read()
    await asyncio.sleep(wait)
    return read() > before


def states(gpu_dir, pids: list[int]) -> list[CudaState | None]:  # type: ignore[no-untyped-def]
    return [gpu_dir.state(pid) for pid in pids]


# ------------------------------------------------------------------------------------------------ the saved table


async def test_every_transition_is_saved_atomically(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    state_file = StateFile(str(path))
    units = FakeUnits()
    engine = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1 << 30), state_file)
    await engine.start()
    seen: list[str] = []

    class Reader(EngineListener):
        def model_changed(self, model: Model) -> None:
            # Saved before anyone hears of the change: a crash right after a signal never loses the state.
            seen.append(json.loads(path.read_text())["models"][0]["state"])

    engine.add_listener(Reader())
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("a")
    await engine.thaw("a")
    await engine.stop("a")
    assert seen == ["freezing", "frozen", "thawing", "running", "stopped"]
    assert [p.name for p in tmp_path.iterdir()] == ["models.json"], "no temporary file is left behind"
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["boot_id"] and data["models"][0]["name"] == "a"


async def test_a_table_from_another_boot_or_garbage_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    state_file = StateFile(str(path))
    state_file.save([Model("a", "gpusched-model@a.service", 0, ["x"], state=State.FROZEN)], {}, [])
    assert list(state_file.load().models) == ["a"]
    data = json.loads(path.read_text())
    data["boot_id"] = "another boot"
    path.write_text(json.dumps(data))
    assert state_file.load().models == {}
    path.write_text("{not json")
    assert state_file.load().models == {}
    path.unlink()
    assert state_file.load().models == {}


async def test_an_unwritable_runtime_directory_does_not_fail_transitions(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    engine = Engine(FakeUnits(), NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), StateFile(f"{blocker}/x.json"))
    await engine.start()
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("a")
    assert engine.get("a").state == State.FROZEN


async def test_forgotten_units_stay_forgotten_after_a_restart(tmp_path: Path) -> None:
    units = FakeUnits()
    state_file = StateFile(str(tmp_path / "models.json"))
    engine = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), state_file)
    await engine.start()
    await engine.run("kept", ["sleep", "1"], RunOptions(), 0)
    await engine.run("gone", ["sleep", "1"], RunOptions(), 0)
    await engine.forget("gone")
    again = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), state_file)
    await again.start()
    assert list(again.models) == ["kept"]
    # Once that unit ended, a new run of the name is a model again.
    await units.stop("gpusched-model@gone.service")
    await again.run("gone", ["sleep", "1"], RunOptions(), 0)
    third = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), state_file)
    await third.start()
    assert sorted(third.models) == ["gone", "kept"]


def test_the_rules_for_a_model_found_on_start() -> None:
    running, frozen = Truth(False, {1: R, 2: R}), Truth(True, {1: C, 2: C})
    mixed = Truth(False, {1: C, 2: L})
    for truth in (running, frozen, mixed):
        assert target_for(State.FREEZING, truth)[0] == State.RUNNING  # an interrupted freeze is rolled back
        assert target_for(State.THAWING, truth)[0] == State.RUNNING  # an interrupted thaw is finished
    for truth in (frozen, mixed, Truth(True, {1: R})):
        assert target_for(State.FROZEN, truth)[0] == State.FROZEN  # a frozen model stays frozen
    assert target_for(State.FROZEN, running)[0] == State.RUNNING  # unless it was found wholly running
    assert with_nvml({1: C}, [1, 2, 3], {1, 2}) == {1: C, 2: R}  # the driver's word first, then NVML's
    assert target_for(None, frozen)[0] == State.FROZEN
    assert target_for(State.RUNNING, running)[0] == State.RUNNING
    assert target_for(None, mixed)[0] == State.RUNNING
    assert Truth(True, {}).frozen and not Truth(True, {1: L}).frozen  # a cgroup-only freeze has no CUDA PIDs


# ------------------------------------------------------------------------------------------- restarts, for real


async def test_a_frozen_model_keeps_its_memory_facts_across_a_restart(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    snapshot = model.snapshot_bytes
    again, _ = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state == State.FROZEN and found.cuda_pids == model.pids
    assert found.vram_by_gpu == {GPU0: 2 * VRAM} and found.snapshot_bytes == snapshot > 0
    assert again.ram_frozen_bytes() == snapshot
    # The thaw check works as before the restart: 1 GiB GPU, 700 MiB taken, the model needs 400.
    gpu_dir.allocate("other", 700 * MIB, GPU0)
    with pytest.raises(InsufficientGpuMemory):
        await again.thaw("m")
    assert not any(gpu_dir.broken(pid) for pid in found.pids)
    gpu_dir.free("other")
    await again.thaw("m")
    assert found.state == State.RUNNING and states(gpu_dir, found.pids) == [R, R]
    assert await counting(tmp_path / "m")


FREEZE_STEPS = ["lock a", "lock b", "checkpoint a", "checkpoint b", "cgroup freeze"]
THAW_STEPS = ["cgroup thaw", "restore a", "restore b", "unlock a", "unlock b"]


async def play(steps: list[str], engine: Engine, units: ProcessUnits, model: Model) -> None:
    """Do the first steps of a freeze or a thaw by hand, in the engine's order, as a daemon killed after them
    would have left them."""
    a, b = model.pids
    cp = engine.checkpoint
    for step in steps:
        verb, who = step.split()
        if verb == "cgroup":
            await (units.freeze if who == "freeze" else units.thaw)(model.unit)
            continue
        pid = a if who == "a" else b
        if verb == "lock":
            cp.lock(pid, 1000)
        else:
            getattr(cp, verb)(pid)


@pytest.mark.parametrize("done", range(len(FREEZE_STEPS) + 1), ids=lambda n: f"after-{n}-steps")
async def test_a_restart_mid_freeze_rolls_back_to_running(first, done: int) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.refresh(model)
    engine._set_state(model, State.FREEZING)  # saved, as the freeze does before its first step
    await play(FREEZE_STEPS[:done], engine, units, model)

    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state == State.RUNNING and found.cuda_pids == []
    assert states(gpu_dir, found.pids) == [R, R] and units.frozen == set()
    assert await counting(tmp_path / "m") and await counting(f"{tmp_path / 'm'}.1")
    assert not found.lock.locked()
    [event] = events.events
    assert event.kind == EventKind.FAILURE and event.fields["GPUSCHED_INTERRUPTED"] == "freeze"
    # and it is usable
    await again.freeze("m")
    assert states(gpu_dir, found.pids) == [C, C]


@pytest.mark.parametrize("done", range(len(THAW_STEPS) + 1), ids=lambda n: f"after-{n}-steps")
async def test_a_restart_mid_thaw_finishes_the_thaw(first, done: int) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    engine._set_state(model, State.THAWING)
    await play(THAW_STEPS[:done], engine, units, model)

    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state == State.RUNNING and found.cuda_pids == []
    assert states(gpu_dir, found.pids) == [R, R] and units.frozen == set()
    assert found.vram_by_gpu == {GPU0: 2 * VRAM}
    assert again.ram_frozen_bytes() == 0
    assert await counting(tmp_path / "m") and await counting(f"{tmp_path / 'm'}.1")
    [event] = events.events
    assert event.kind == EventKind.THAW and event.fields["GPUSCHED_INTERRUPTED"] == "thaw"


async def test_an_interrupted_thaw_without_room_ends_frozen_intact(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    engine._set_state(model, State.THAWING)
    await play(THAW_STEPS[:2], engine, units, model)  # a restored (holds its 200 MiB again), b not yet
    gpu_dir.allocate("other", 700 * MIB, GPU0)  # 124 MiB left: not enough for b

    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state == State.FROZEN and found.cuda_pids == found.pids
    assert states(gpu_dir, found.pids) == [C, C] and units.frozen == {found.unit}
    assert not any(gpu_dir.broken(pid) for pid in found.pids), "no restore was tried without room"
    assert "kept frozen" in events.events[0].message
    gpu_dir.free("other")
    await again.thaw("m")
    assert states(gpu_dir, found.pids) == [R, R]


async def test_a_frozen_model_thawed_behind_our_back_is_frozen_again(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    await play([*THAW_STEPS[:2], "unlock a"], engine, units, model)  # someone ran cuda-checkpoint by hand
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state == State.FROZEN and states(gpu_dir, found.pids) == [C, C]
    assert units.frozen == {found.unit} and events.kinds() == [EventKind.FREEZE]


async def test_a_frozen_model_found_wholly_running_is_running(first) -> None:  # type: ignore[no-untyped-def]
    """Saved frozen, found running (a whole thaw behind the daemon's back, or one whose record could not be
    written): the driver and NVML say it runs and holds its VRAM, so it is reported running, with that VRAM,
    and nothing is touched."""
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    await play(THAW_STEPS, engine, units, model)
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert (found.state, found.cuda_pids, found.snapshot_bytes) == (State.RUNNING, [], 0)
    assert states(gpu_dir, found.pids) == [R, R] and units.frozen == set()
    assert found.vram_bytes == 2 * VRAM and again.ram_frozen_bytes() == 0
    assert events.kinds() == [EventKind.THAW] and events.events[0].fields["GPUSCHED_RECOVERY"] == "1"
    assert await counting(tmp_path / "m")


async def test_a_restart_mid_swap_is_both_or_neither(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    other = await engine.run("other", ["sleep", "60"], RunOptions(), 0)
    await engine.freeze("other")
    # The daemon dies between the swap's freeze of m and its thaw of `other`.
    engine._swaps.append(("m", "other"))
    await engine.freeze("m")
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    assert again.get("m").state == State.RUNNING, "the first model is thawed back"
    assert again.get(other.name).state == State.FROZEN
    assert states(gpu_dir, model.pids) == [R, R]
    assert events.events[-1].fields["GPUSCHED_INTERRUPTED"] == "swap"
    assert json.loads((tmp_path / "run" / "models.json").read_text())["swaps"] == []


async def test_a_restart_mid_overlapped_swap_whose_freeze_was_undone(first) -> None:  # type: ignore[no-untyped-def]
    """An overlapped swap thawed `other` while m's freeze ran; the daemon died and m was found running: the swap is
    made "neither" by freezing `other` again."""
    engine, units, gpu_dir, model, tmp_path = first
    other = await engine.run("other", ["sleep", "60"], RunOptions(), 0)
    engine._swaps.append(("m", "other"))
    engine._persist()
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    assert again.get("m").state == State.RUNNING and states(gpu_dir, model.pids) == [R, R]
    assert again.get(other.name).state == State.FROZEN and units.frozen == {other.unit}
    last = events.events[-1]
    assert (last.model, last.fields["GPUSCHED_INTERRUPTED"], last.fields["GPUSCHED_SWAP_OUT"]) == ("other", "swap", "m")
    assert (EventKind.FREEZE, "other", "swap-rollback") in events.reasons()
    assert json.loads((tmp_path / "run" / "models.json").read_text())["swaps"] == []


async def test_a_model_that_ended_while_the_daemon_was_down(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    snapshot = model.snapshot_bytes
    await units.stop(model.unit)  # killed while no daemon ran
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    found = again.get("m")
    assert found.state in (State.STOPPED, State.FAILED) and found.snapshot_bytes == 0 and found.cuda_pids == []
    assert again.ram_frozen_bytes() == 0
    [event] = events.events
    assert (
        event.kind == EventKind.EXIT
        and event.bytes == snapshot
        and "while gpuschedd was not running" in (event.message)
    )


# ------------------------------------------------------------------------------------------- faults while running


async def test_a_failed_unlock_part_way_leaves_every_pid_checkpointed(first) -> None:  # type: ignore[no-untyped-def]
    """restore a, restore b, unlock a, unlock b fails: a already runs. Checkpointing a again needs a lock first."""
    engine, units, gpu_dir, model, tmp_path = first
    a, b = model.pids
    await engine.freeze("m")
    gpu_dir.fail(b, "unlock", "CUDA_ERROR_UNKNOWN")
    with pytest.raises(CheckpointFailed) as e:
        await engine.thaw("m")
    assert f"unlock of pid {b} failed" in e.value.message and "stays frozen" in e.value.message
    assert model.state == State.FROZEN and model.cuda_pids == [a, b] and units.frozen == {model.unit}
    assert states(gpu_dir, [a, b]) == [C, C]
    steps = [(s, p) for s, p, r in gpu_dir.log() if r == "CUDA_SUCCESS" and p in (a, b)][4:]
    assert steps == [("restore", a), ("restore", b), ("unlock", a), ("lock", a), ("checkpoint", a), ("checkpoint", b)]
    gpu_dir.clear_failures()
    await engine.thaw("m")
    assert states(gpu_dir, [a, b]) == [R, R] and await counting(tmp_path / "m")


async def test_a_thaw_that_cannot_be_undone_is_finished_instead(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, gpu_dir, model, _ = first
    a, b = model.pids
    await engine.freeze("m")
    gpu_dir.fail(b, "unlock", "CUDA_ERROR_UNKNOWN")
    gpu_dir.busy(a, 60_000)  # a cannot be locked again
    engine.config.lock_timeout_ms = 100
    original_lock = engine.checkpoint.lock

    def lock(pid: int, timeout_ms: int) -> None:
        gpu_dir.clear_failures()  # once the rollback starts, b's unlock works when tried again
        original_lock(pid, timeout_ms)

    engine.checkpoint.lock = lock  # type: ignore[method-assign]
    with pytest.raises(CheckpointFailed) as e:
        await engine.thaw("m")
    assert "the model is running" in e.value.message
    assert model.state == State.RUNNING and states(gpu_dir, [a, b]) == [R, R] and units.frozen == set()


async def test_a_model_that_dies_while_frozen_releases_its_ram(first) -> None:  # type: ignore[no-untyped-def]
    engine, units, _, model, tmp_path = first
    events = Recorder()
    engine.add_listener(events)
    await engine.freeze("m")
    snapshot = model.snapshot_bytes
    assert engine.ram_frozen_bytes() == snapshot > 0
    await units.stop(model.unit)
    engine._unit_changed(UnitStatus(model.unit, "failed", 0, [], False, result="signal"))
    assert model.state == State.FAILED and model.snapshot_bytes == 0 and engine.ram_frozen_bytes() == 0
    event = events.events[-1]
    assert event.kind == EventKind.EXIT and event.bytes == snapshot and "while frozen" in event.message
    saved = json.loads((tmp_path / "run" / "models.json").read_text())["models"][0]
    assert (saved["state"], saved["snapshot_bytes"]) == ("failed", 0)


async def test_one_process_of_a_frozen_model_dies(first) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, model, _ = first
    events = Recorder()
    engine.add_listener(events)
    a, b = model.pids
    await engine.freeze("m")
    os.kill(b, signal.SIGKILL)
    stat = Path(f"/proc/{b}/stat")
    await until("b to die", lambda: not stat.exists() or " Z " in stat.read_text())
    await engine.thaw("m")
    assert model.state == State.RUNNING and model.pids == [a] and states(gpu_dir, [a]) == [R]
    assert any(e.kind == EventKind.FAILURE and str(b) in e.message for e in events.events)


@pytest.mark.parametrize(("transition", "step"), [("freeze", "checkpoint"), ("thaw", "restore")])
async def test_a_model_killed_mid_transition_is_reported_ended(first, transition: str, step: str) -> None:  # type: ignore[no-untyped-def]
    """Killed during the driver's step: the call fails saying the model ended (not that it is frozen), the model
    is stopped or failed, and its exit event says what it was doing, not that it was frozen."""
    engine, units, _gpu_dir, model, _tmp_path = first
    events = Recorder()
    engine.add_listener(events)
    if transition == "thaw":
        await engine.freeze("m")
    original = getattr(engine.checkpoint, step)

    def killed_first(pid: int, *args: object) -> None:
        os.killpg(units.procs[model.unit].pid, signal.SIGKILL)
        units.procs[model.unit].wait()
        original(pid, *args)

    setattr(engine.checkpoint, step, killed_first)
    with pytest.raises(CheckpointFailed, match=r"the model ended meanwhile: it is (stopped|failed)") as e:
        await getattr(engine, transition)("m")
    assert "the model is frozen" not in e.value.message
    assert model.state in (State.STOPPED, State.FAILED) and model.pids == [] and engine.ram_frozen_bytes() == 0
    await asyncio.wait_for(engine.drain(5), 6)
    exits = [e for e in events.events if e.kind == EventKind.EXIT]
    doing = {"freeze": "freezing", "thaw": "thawing"}[transition]
    assert len(exits) == 1 and f"while {doing}" in exits[0].message, exits[0].message
    assert exits[0].fields["GPUSCHED_STATE_BEFORE"] == doing


async def test_an_exit_during_a_freeze_is_reported_after_it(tmp_path: Path) -> None:
    """The unit dies while the freeze holds the model's lock: the freeze fails, and then the exit is reported."""
    units = FakeUnits()
    engine, events = make_engine(units)
    await engine.start()
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    original = units.freeze
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_freeze(unit: str) -> None:
        entered.set()
        await release.wait()
        await original(unit)

    units.freeze = slow_freeze  # type: ignore[method-assign]
    freezing = asyncio.ensure_future(engine.freeze("a"))
    await entered.wait()
    units.exit("gpusched-model@a.service", result="signal")
    assert engine.get("a").state == State.FREEZING  # not yet: the freeze holds the lock
    release.set()
    with pytest.raises(Exception):  # noqa: B017 - the unit is gone: UnitFailed
        await freezing
    await asyncio.wait_for(engine.drain(5), 6)
    assert engine.get("a").state == State.FAILED
    assert events.kinds()[-1] == EventKind.EXIT


async def test_drain_waits_for_a_transition(tmp_path: Path) -> None:
    units = FakeUnits()
    engine = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1 << 30))
    await engine.start()
    model = await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    async with model.lock:
        assert not await engine.drain(0.1)
    assert await engine.drain(0.1)


async def test_status_never_waits_on_a_slow_freeze(first) -> None:  # type: ignore[no-untyped-def]
    engine, _, gpu_dir, model, _ = first
    gpu_dir.delay(None, "checkpoint", 700)  # each of the two checkpoints takes 0.7 s
    freezing = asyncio.ensure_future(engine.freeze("m"))
    await until("freezing", lambda: model.state == State.FREEZING, 5.0)
    worst = 0.0
    loop = asyncio.get_running_loop()
    while not freezing.done():
        t0 = loop.time()
        await engine.refresh(model)  # what ListModels does for each model
        assert engine.get("m").state in (State.FREEZING, State.FROZEN)
        worst = max(worst, loop.time() - t0)
        await asyncio.sleep(0.01)
    await freezing
    assert model.last_freeze_usec >= 1_400_000, "the injected delay made the freeze slow"
    assert worst < 0.1, f"a status read waited {worst:.3f}s during the freeze"


async def test_two_thaws_never_promise_the_same_free_vram(gpu_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each fits in the free VRAM alone, not both: one thaw is refused, and no restore runs out of memory."""
    units = ProcessUnits()
    engine, _ = driver_engine(units, gpu_dir, tmp_path / "models.json")
    await engine.start()
    try:
        models = []
        for name in ("x", "y"):
            before = len(gpu_dir.contexts())
            argv = fake_model_argv(gpu_dir, tmp_path / name, 400 * MIB, GPU0, 1)
            model = await engine.run(name, argv, RunOptions(), 0)
            await until("registration", lambda n=before: registered(gpu_dir, n + 1), 5.0)
            await engine.freeze(name)
            models.append(model)
        gpu_dir.allocate("other", 500 * MIB, GPU0)  # 524 MiB free: room for one 400 MiB model
        gpu_dir.delay(None, "restore", 300)
        results = await asyncio.gather(engine.thaw("x"), engine.thaw("y"), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["InsufficientGpuMemory", "Model"]
        assert sorted(m.state for m in models) == [State.FROZEN, State.RUNNING]
        assert not any(gpu_dir.broken(pid) for m in models for pid in m.pids)
    finally:
        await units.close()


async def test_the_fake_driver_is_thread_safe(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    """The daemon calls the driver from several worker threads at once. (The fake's file lock was once a global:
    two threads in it at a time deadlocked every later call.)"""
    import threading

    models = [spawn_model(8 * MIB, gpu=GPU0) for _ in range(4)]
    cp = DriverCheckpoint()
    done: list[int] = []

    def cycle(pid: int) -> None:
        for _ in range(15):
            cp.lock(pid, 1000)
            cp.checkpoint(pid)
            cp.restore(pid, None)
            cp.unlock(pid)
        done.append(pid)

    # Daemon threads: a deadlock fails the test instead of hanging the run.
    threads = [threading.Thread(target=cycle, args=(m.pids[0],), daemon=True) for m in models]
    for thread in threads:
        thread.start()
    await until("the driver calls of every thread (a hang is a deadlock)", lambda: len(done) == len(models), 60.0)
    assert all(gpu_dir.state(m.pids[0]) == CudaState.RUNNING for m in models)


async def test_a_restart_mid_stop_finishes_the_stop(first) -> None:  # type: ignore[no-untyped-def]
    """A frozen model being stopped: systemd thaws its cgroup to deliver the kill, so a restarted daemon finds a
    "frozen" model half running. It must finish the stop, not freeze the model again."""
    engine, units, gpu_dir, model, tmp_path = first
    await engine.freeze("m")
    engine._stopping.add("m")
    engine._persist()
    await units.thaw(model.unit)  # what systemd does first
    calls = [c for c in gpu_dir.log() if c[0] != "init"]
    again, events = await restart(engine, units, gpu_dir, tmp_path)
    assert again.get("m").state == State.STOPPED and model.unit not in units.procs
    assert [c for c in gpu_dir.log() if c[0] != "init"] == calls, "no driver call on a model being stopped"
    assert events.kinds() == [EventKind.STOP]
    assert json.loads((tmp_path / "run" / "models.json").read_text())["stopping"] == []


async def test_a_cuda_context_created_during_the_freeze_is_checkpointed_too(first) -> None:  # type: ignore[no-untyped-def]
    """A process that had no CUDA context when the freeze looked (a model still starting) and has one by the time
    its cgroup is frozen must not end up frozen holding its VRAM."""
    engine, units, gpu_dir, model, _ = first
    a, b = model.pids
    real = engine.checkpoint.cuda_pids
    calls = []

    def cuda_pids(pids: list[int]) -> list[int]:
        calls.append(pids)
        return [a] if len(calls) == 1 else real(pids)  # b "creates its context" right after the first look

    engine.checkpoint.cuda_pids = cuda_pids  # type: ignore[method-assign]
    # NVML too sees b's memory only once it has a context; the check after the cgroup freeze asks NVML (the driver
    # cannot answer for a frozen process).
    real_nvml = engine.telemetry.vram_by_pid
    engine.telemetry.vram_by_pid = lambda: real_nvml() if calls else {}  # type: ignore[method-assign]
    await engine.freeze("m")
    assert model.state == State.FROZEN and sorted(model.cuda_pids) == sorted([a, b])
    assert states(gpu_dir, [a, b]) == [C, C] and units.frozen == {model.unit}
    assert ("thaw", model.unit) in units.calls, "the cgroup was thawed to checkpoint the late one"
    await engine.thaw("m")
    assert states(gpu_dir, [a, b]) == [R, R]


async def test_a_model_frozen_keeping_its_contexts_stays_frozen_across_a_restart(gpu_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """KeepContext: its processes hold GPU memory while frozen, by design. A restarted daemon takes it as frozen
    from the saved table (no driver call, nothing thawed); its thaw then finds the processes running, and their
    agents, whose daemon connections ended with the old daemon, unpark by themselves."""
    units = ProcessUnits()
    try:
        engine, _ = driver_engine(units, gpu_dir, tmp_path / "run" / "models.json")
        engine.config.agent_root = str(tmp_path / "agents")
        await engine.start()
        argv = [*fake_model_argv(gpu_dir, tmp_path / "k", VRAM, GPU0, 1), "--park-bytes", str(48 * MIB)]
        model = await engine.run("k", argv, RunOptions(agent=True, keep_context=True), 0)
        await until("the agent's socket", lambda: list((tmp_path / "agents" / "k").glob("agent-*.sock")))
        await engine.refresh(model)
        await engine.freeze("k")
        assert model.freeze_path == "agent-only"
        pid, calls = model.main_pid, len(gpu_dir.log())
        for link in engine._parked.pop("k"):  # the old daemon's ends of the connections die with it
            link.close()
        again, _events = await restart(engine, units, gpu_dir, tmp_path)
        found = again.get("k")
        assert (found.state, found.freeze_path, found.cuda_pids) == (State.FROZEN, "agent-only", [pid])
        assert units.frozen == {found.unit} and gpu_dir.state(pid) == CudaState.RUNNING
        assert not [step for step, p, _r in gpu_dir.log()[calls:] if p == pid and step != "get-state"]
        assert not await counting(tmp_path / "k")
        await again.thaw("k")
        assert found.state == State.RUNNING
        assert await counting(tmp_path / "k", 1.0) and (tmp_path / "k").read_text() != "CORRUPT"
    finally:
        await units.close()
