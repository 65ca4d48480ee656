"""The engine's state machine with systemd faked at the edge (tests/system runs it against the real one)."""

from __future__ import annotations

import asyncio

import pytest
from engine_kit import Recorder
from fake_units import FakeUnits

from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import InvalidArgs, InvalidState, ModelExists, NoSuchModel, UnitFailed
from gpuschedd.events import EventKind
from gpuschedd.model import State
from gpuschedd.options import RunOptions
from gpuschedd.telemetry import NoGpus


async def test_run_starts_a_unit_in_the_slice(engine: Engine, units: FakeUnits, rec: Recorder) -> None:
    model = await engine.run("llama", ["python3", "serve.py"], RunOptions(gpus=["0"], environment=["A=1"]), 0)
    spec = units.specs["gpusched-model@llama.service"]
    assert spec.slice == "gpusched.slice"
    assert spec.argv == ["python3", "serve.py"]
    assert spec.environment == ["A=1", "CUDA_VISIBLE_DEVICES=0"]
    assert model.state == State.RUNNING and model.main_pid == units.units[spec.unit].main_pid
    assert rec.added == ["llama"] and [e.kind for e in rec.events] == [EventKind.RUN]


async def test_run_refuses_a_live_name_and_bad_input(engine: Engine) -> None:
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    with pytest.raises(ModelExists):
        await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    for bad in ("", "../x", "a/b", "-x", "x" * 65, "a b"):
        with pytest.raises(InvalidArgs):
            await engine.run(bad, ["sleep", "1"], RunOptions(), 0)
    with pytest.raises(InvalidArgs):
        await engine.run("empty", [], RunOptions(), 0)
    assert list(engine.models) == ["llama"]


async def test_failed_start_leaves_no_model(engine: Engine, units: FakeUnits) -> None:
    units.fail["start"] = "gpusched-model@bad.service"
    with pytest.raises(UnitFailed):
        await engine.run("bad", ["nonexistent"], RunOptions(), 0)
    assert "bad" not in engine.models


async def test_freeze_thaw_are_idempotent(engine: Engine, units: FakeUnits, rec: Recorder) -> None:
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    unit = "gpusched-model@llama.service"
    await engine.freeze("llama")
    await engine.freeze("llama")
    assert units.units[unit].frozen and engine.get("llama").state == State.FROZEN
    assert units.calls.count(("freeze", unit)) == 1
    await engine.thaw("llama")
    await engine.thaw("llama")
    assert not units.units[unit].frozen and engine.get("llama").state == State.RUNNING
    assert units.calls.count(("thaw", unit)) == 1
    assert [s for n, s in rec.states] == [State.FREEZING, State.FROZEN, State.THAWING, State.RUNNING]


async def test_failed_freeze_leaves_model_running(engine: Engine, units: FakeUnits) -> None:
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    units.fail["freeze"] = "gpusched-model@llama.service"
    with pytest.raises(UnitFailed):
        await engine.freeze("llama")
    assert engine.get("llama").state == State.RUNNING


async def test_unknown_and_ended_models(engine: Engine, units: FakeUnits) -> None:
    with pytest.raises(NoSuchModel):
        await engine.freeze("nope")
    await engine.run("llama", ["sleep", "1"], RunOptions(), 0)
    await engine.stop("llama")
    assert engine.get("llama").state == State.STOPPED
    assert "gpusched-model@llama.service" not in units.units
    with pytest.raises(InvalidState):
        await engine.freeze("llama")
    with pytest.raises(InvalidState):
        await engine.thaw("llama")
    await engine.stop("llama")  # stopping a stopped model is a no-op
    await engine.run("llama", ["sleep", "2"], RunOptions(), 0)  # the name can be reused
    assert engine.get("llama").state == State.RUNNING


async def test_swap_both_or_neither(engine: Engine, units: FakeUnits) -> None:
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    await engine.run("b", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("b")
    await engine.swap("a", "b")
    assert (engine.get("a").state, engine.get("b").state) == (State.FROZEN, State.RUNNING)
    # The thaw of the second fails: the first is thawed back, the second stays frozen.
    await engine.freeze("b")
    await engine.thaw("a")
    units.fail["thaw"] = "gpusched-model@b.service"
    with pytest.raises(UnitFailed):
        await engine.swap("a", "b")
    assert (engine.get("a").state, engine.get("b").state) == (State.RUNNING, State.FROZEN)
    assert not units.units["gpusched-model@a.service"].frozen
    with pytest.raises(InvalidArgs):
        await engine.swap("a", "a")


async def test_opposite_swaps_do_not_deadlock(engine: Engine) -> None:
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    await engine.run("b", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("b")
    results = await asyncio.wait_for(
        asyncio.gather(engine.swap("a", "b"), engine.swap("b", "a"), return_exceptions=True), timeout=5
    )
    states = {engine.get("a").state, engine.get("b").state}
    assert states <= {State.RUNNING, State.FROZEN}
    assert all(r is None or isinstance(r, InvalidState) for r in results)


async def test_exit_is_reported(engine: Engine, units: FakeUnits, rec: Recorder) -> None:
    await engine.run("ok", ["true"], RunOptions(), 0)
    await engine.run("bad", ["false"], RunOptions(), 0)
    units.exit("gpusched-model@ok.service")
    units.exit("gpusched-model@bad.service", result="exit-code")
    assert engine.get("ok").state == State.STOPPED
    assert engine.get("bad").state == State.FAILED
    assert [e.kind for e in rec.events[-2:]] == [EventKind.EXIT, EventKind.EXIT]


async def test_restart_takes_over_running_and_frozen_units(units: FakeUnits) -> None:
    first = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))
    await first.start()
    await first.run("a", ["sleep", "1"], RunOptions(), 0)
    await first.run("b", ["sleep", "1"], RunOptions(), 0)
    await first.freeze("b")
    calls = len(units.calls)
    second = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))
    await second.start()
    assert {n: m.state for n, m in second.models.items()} == {"a": State.RUNNING, "b": State.FROZEN}
    assert second.get("a").pids == first.get("a").pids
    assert len(units.calls) == calls  # taking over touched no unit


async def test_forget_keeps_the_unit(engine: Engine, units: FakeUnits, rec: Recorder) -> None:
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    await engine.freeze("a")
    with pytest.raises(InvalidState):
        await engine.forget("a")
    await engine.thaw("a")
    await engine.forget("a")
    assert "a" not in engine.models and "gpusched-model@a.service" in units.units
    assert rec.removed == ["a"]


async def test_a_command_that_ends_during_its_start_is_reported_ended(engine: Engine, units: FakeUnits) -> None:
    original = units.start

    async def start_and_end(spec):  # type: ignore[no-untyped-def]
        await original(spec)
        units.units.pop(spec.unit)
        from gpuschedd.units import UnitStatus

        return UnitStatus(spec.unit, "failed", 0, [], False, result="exit-code")

    units.start = start_and_end  # type: ignore[method-assign]
    model = await engine.run("quick", ["sh", "-c", "exit 3"], RunOptions(), 0)
    assert model.state == State.FAILED


async def test_a_refresh_that_finds_new_processes_is_announced_once(
    engine: Engine, units: FakeUnits, rec: Recorder
) -> None:
    """The daemon's periodic refresh (refresh_live) tells the listeners (the bus: PropertiesChanged) when a
    running model's Pids or VRAM changed, and only then."""
    model = await engine.run("llama", ["python3", "serve.py"], RunOptions(), 0)
    await engine.refresh_live()
    assert rec.states == []
    units._replace(model.unit, pids=[*model.pids, 4242])
    await engine.refresh_live()
    assert 4242 in model.pids
    assert rec.states == [("llama", State.RUNNING)]
    await engine.refresh_live()
    assert rec.states == [("llama", State.RUNNING)]
