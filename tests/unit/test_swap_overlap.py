"""Overlapped swaps (engine/swap.py) on the fake driver, whose checkpoint holds a process's memory until its copy ends
and whose restore claims it before its copy, as the real driver's do. A test holds one model's copy
(FakeGpuDir.hold) and watches what the other model does meanwhile: overlap is shown by the order of events, never
by timing. Then both-or-neither from either side, opposite swaps at once, and Stops in the middle."""

from __future__ import annotations

import asyncio

import pytest
from counters import amoves, astill, file_counter
from fakegpu_fixtures import GPU0, MIB
from polling import until
from test_engine_checkpoint import PARKED, VRAM, not_corrupt, run_agent_model, run_model, setup  # noqa: F401  (setup: a fixture)

from gpuschedd.checkpoint import CudaState
from gpuschedd.engine import Engine
from gpuschedd.errors import CheckpointFailed, InvalidState, RamBudgetExceeded
from gpuschedd.events import EventKind
from gpuschedd.model import Model, State


async def two_models(engine: Engine, gpu_dir, tmp_path) -> tuple[Model, Model]:  # type: ignore[no-untyped-def]
    """`a` running, `b` frozen: 200 MiB each on a 1 GiB GPU."""
    a = await run_model(engine, gpu_dir, tmp_path, "a", procs=1)
    b = await run_model(engine, gpu_dir, tmp_path, "b", procs=1)
    await engine.freeze("b")
    return a, b


def order(gpu_dir, *wanted: tuple[str, int]) -> list[int]:  # type: ignore[no-untyped-def]
    """Where each successful (step, pid) first appears in the fake driver's log."""
    done = [(step, pid) for step, pid, result in gpu_dir.log() if result == "CUDA_SUCCESS"]
    return [done.index(w) for w in wanted]


def swap_event(events):  # type: ignore[no-untyped-def]
    return next(e for e in reversed(events.events) if e.kind == EventKind.SWAP)


async def test_a_swap_that_fits_runs_the_thaw_during_the_freeze(setup) -> None:  # noqa: F811
    engine, units, gpu_dir, events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    # b runs while a's checkpoint is still copying, a's memory still held on the GPU beside b's.
    await until("b thawed", lambda: b.state == State.RUNNING)
    assert a.state == State.FREEZING and gpu_dir.state(a.main_pid) == CudaState.LOCKED
    assert set(engine.telemetry.vram_by_pid()) == {a.main_pid, b.main_pid}
    gpu_dir.release(a.main_pid, "checkpoint")
    await swapping
    assert (a.state, b.state) == (State.FROZEN, State.RUNNING)
    restore_b, unlock_b, checkpoint_a = order(
        gpu_dir, ("restore", b.main_pid), ("unlock", b.main_pid), ("checkpoint", a.main_pid)
    )
    assert restore_b < unlock_b < checkpoint_a
    assert events.states.index(("b", State.RUNNING)) < events.states.index(("a", State.FROZEN))
    event = swap_event(events)
    assert event.fields["GPUSCHED_OVERLAPPED"] == "1" and event.duration_usec > 0
    assert "overlapped" in event.message
    assert await astill(file_counter(tmp_path / "a")) and await amoves(file_counter(tmp_path / "b"))
    assert units.frozen == {a.unit}


async def test_a_swap_that_does_not_fit_thaws_after_the_freeze(setup) -> None:  # noqa: F811
    """b fits only once a has given its memory back: the thaw waits for the freeze, and no restore runs short."""
    engine, _units, gpu_dir, events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.allocate("other", 700 * MIB, GPU0)  # 1 GiB: 124 MiB free beside a, 324 once a is frozen
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("a's checkpoint under way", lambda: gpu_dir.state(a.main_pid) == CudaState.LOCKED)
    assert b.state == State.FROZEN
    gpu_dir.release(a.main_pid, "checkpoint")
    await swapping
    assert (a.state, b.state) == (State.FROZEN, State.RUNNING)
    checkpoint_a, restore_b = order(gpu_dir, ("checkpoint", a.main_pid), ("restore", b.main_pid))
    assert checkpoint_a < restore_b
    assert events.states.index(("a", State.FROZEN)) < events.states.index(("b", State.THAWING))
    assert swap_event(events).fields["GPUSCHED_OVERLAPPED"] == "0"
    assert not gpu_dir.broken(b.main_pid)


async def test_an_overlapped_thaw_that_fails_thaws_the_first_back_after_its_freeze(setup) -> None:  # noqa: F811
    engine, units, gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.hold(a.main_pid, "checkpoint")
    gpu_dir.fail(b.main_pid, "restore", "CUDA_ERROR_UNKNOWN")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b's thaw failed", lambda: ("restore", b.main_pid, "CUDA_ERROR_UNKNOWN") in gpu_dir.log())
    await until("b settled frozen", lambda: b.state == State.FROZEN)
    assert a.state == State.FREEZING, "the thaw back waits for the freeze"
    gpu_dir.release(a.main_pid, "checkpoint")
    with pytest.raises(CheckpointFailed, match=f"restore of pid {b.main_pid} failed"):
        await swapping
    assert (a.state, b.state) == (State.RUNNING, State.FROZEN)
    checkpoint_a, restore_a = order(gpu_dir, ("checkpoint", a.main_pid), ("restore", a.main_pid))
    assert checkpoint_a < restore_a
    assert units.frozen == {b.unit}
    assert await amoves(file_counter(tmp_path / "a")) and await astill(file_counter(tmp_path / "b"))


async def test_an_overlapped_freeze_that_fails_freezes_the_second_again(setup) -> None:  # noqa: F811
    """As a swap that waited for the freeze would have left it: b frozen; a rolled back to running."""
    engine, units, gpu_dir, events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b thawed", lambda: b.state == State.RUNNING)
    gpu_dir.fail(a.main_pid, "checkpoint", "CUDA_ERROR_UNKNOWN")  # read when the copy ends
    gpu_dir.release(a.main_pid, "checkpoint")
    with pytest.raises(CheckpointFailed, match=f"checkpoint of pid {a.main_pid} failed"):
        await swapping
    assert (a.state, b.state) == (State.RUNNING, State.FROZEN)
    assert gpu_dir.state(b.main_pid) == CudaState.CHECKPOINTED and units.frozen == {b.unit}
    assert (EventKind.FREEZE, "b", "swap-rollback") in events.reasons()
    assert not any(e.kind == EventKind.SWAP for e in events.events)
    assert await amoves(file_counter(tmp_path / "a")) and await astill(file_counter(tmp_path / "b"))
    gpu_dir.clear_failures()
    await engine.swap("a", "b")
    assert (a.state, b.state) == (State.FROZEN, State.RUNNING)


async def test_a_refused_freeze_leaves_the_second_model_untouched(setup) -> None:  # noqa: F811
    """The thaw starts only once the freeze has passed its checks: a refusal changes nothing, overlapped too."""
    engine, units, gpu_dir, events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    engine.mem_available = lambda: 1  # the kernel has no room for a's snapshot
    calls = len(gpu_dir.log())
    with pytest.raises(RamBudgetExceeded):
        await engine.swap("a", "b")
    assert (a.state, b.state) == (State.RUNNING, State.FROZEN) and len(gpu_dir.log()) == calls
    assert ("b", State.THAWING) not in events.states and units.frozen == {b.unit}


async def test_an_overlapped_swap_with_agents(setup) -> None:  # noqa: F811
    """The agents park one model and unpark the other at once; the driver's part of a (its context) is held."""
    engine, _units, gpu_dir, events, tmp_path = setup
    a = await run_agent_model(engine, gpu_dir, tmp_path, "a")
    b = await run_agent_model(engine, gpu_dir, tmp_path, "b")
    await engine.freeze("b")
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b thawed", lambda: b.state == State.RUNNING)
    assert a.state == State.FREEZING
    gpu_dir.release(a.main_pid, "checkpoint")
    await swapping
    assert (a.state, a.freeze_path, b.state) == (State.FROZEN, "agent", State.RUNNING)
    assert swap_event(events).fields["GPUSCHED_OVERLAPPED"] == "1"
    assert await amoves(file_counter(tmp_path / "b")) and not_corrupt(tmp_path, "b")
    await engine.swap("b", "a")
    assert await amoves(file_counter(tmp_path / "a")) and not_corrupt(tmp_path, "a")


async def test_the_agents_copies_of_an_overlapped_swap_take_turns(setup) -> None:  # noqa: F811
    """The incoming model's driver restore runs beside the outgoing model's park, but its agent copies in only once
    the park is over (two CPU-bound copies at once slow each other); then its unpark runs beside the outgoing
    model's driver checkpoint of the rest."""
    engine, _units, gpu_dir, events, tmp_path = setup
    a = await run_agent_model(engine, gpu_dir, tmp_path, "a")
    b = await run_agent_model(engine, gpu_dir, tmp_path, "b")
    await engine.freeze("b")
    gpu_dir.hold(a.main_pid, "park")
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b's context restored", lambda: ("unlock", b.main_pid, "CUDA_SUCCESS") in gpu_dir.log())
    await asyncio.sleep(0.5)  # what an unpark beside the park would need to claim b's parked memory (~50 ms)
    assert (a.state, b.state) == (State.FREEZING, State.THAWING)
    assert engine.telemetry.vram_by_pid()[b.main_pid] == {GPU0: VRAM}, "b's parked memory waits for a's park"
    gpu_dir.release(a.main_pid, "park")
    await until("b thawed", lambda: b.state == State.RUNNING)
    assert a.state == State.FREEZING and gpu_dir.state(a.main_pid) == CudaState.LOCKED, "beside a's checkpoint"
    assert engine.telemetry.vram_by_pid()[b.main_pid] == {GPU0: VRAM + PARKED}
    gpu_dir.release(a.main_pid, "checkpoint")
    await swapping
    assert (a.state, a.freeze_path, b.state) == (State.FROZEN, "agent", State.RUNNING)
    assert swap_event(events).fields["GPUSCHED_OVERLAPPED"] == "1" and not engine._copy_turns
    assert await amoves(file_counter(tmp_path / "b")) and not_corrupt(tmp_path, "b")


async def test_opposite_overlapped_swaps_at_once_do_not_deadlock(setup) -> None:  # noqa: F811
    engine, _units, gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    for _round in range(3):
        results = await asyncio.wait_for(
            asyncio.gather(engine.swap("a", "b"), engine.swap("b", "a"), return_exceptions=True), timeout=60
        )
        assert all(r is None or isinstance(r, InvalidState) for r in results), results
        for model in (a, b):
            want = CudaState.CHECKPOINTED if model.state == State.FROZEN else CudaState.RUNNING
            assert model.state in (State.RUNNING, State.FROZEN) and gpu_dir.state(model.main_pid) == want
            assert not gpu_dir.broken(model.main_pid)
        if a.state == b.state == State.RUNNING:
            await engine.freeze("b")
        elif a.state == b.state:
            await engine.thaw("a")
        assert not engine._swaps


async def test_two_swaps_out_of_the_same_model_at_once(setup) -> None:  # noqa: F811
    """Swap(a, b) and Swap(a, c) together: a is frozen once, each swap ends cleanly (the second finds a frozen or
    being frozen and does what a swap of a frozen model does), and no swap's bookkeeping is left behind."""
    engine, _units, gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    c = await run_model(engine, gpu_dir, tmp_path, "c", procs=1)
    await engine.freeze("c")
    gpu_dir.hold(a.main_pid, "checkpoint")
    both = asyncio.gather(engine.swap("a", "b"), engine.swap("a", "c"), return_exceptions=True)
    await until("a's checkpoint under way", lambda: gpu_dir.state(a.main_pid) == CudaState.LOCKED)
    gpu_dir.release(a.main_pid, "checkpoint")
    results = await asyncio.wait_for(both, timeout=60)
    assert all(r is None or isinstance(r, InvalidState) for r in results), results
    assert a.state == State.FROZEN and b.state == State.RUNNING
    assert c.state == (State.RUNNING if results[1] is None else State.FROZEN)
    assert not engine._swaps and not engine._copy_turns


async def test_a_stop_of_the_outgoing_model_mid_swap(setup) -> None:  # noqa: F811
    """The Stop waits for the freeze (that model's own lock only): the swap completes, then the model stops."""
    engine, units, gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.hold(a.main_pid, "checkpoint")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b thawed", lambda: b.state == State.RUNNING)
    stopping = asyncio.create_task(engine.stop("a"))
    await until("the stop waits for a's lock", lambda: "a" in engine._stop_requested)
    gpu_dir.release(a.main_pid, "checkpoint")
    await asyncio.wait_for(asyncio.gather(swapping, stopping), timeout=30)
    assert (a.state, b.state) == (State.STOPPED, State.RUNNING)
    assert a.unit not in units.procs and not engine._swaps


async def test_a_stop_of_the_incoming_model_mid_swap(setup) -> None:  # noqa: F811
    """The Stop waits for b's thaw; b then stops, and a stays frozen: the swap was done before the Stop."""
    engine, units, gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, gpu_dir, tmp_path)
    gpu_dir.hold(b.main_pid, "restore")
    swapping = asyncio.create_task(engine.swap("a", "b"))
    await until("b's restore under way", lambda: gpu_dir.state(b.main_pid) == CudaState.LOCKED)
    stopping = asyncio.create_task(engine.stop("b"))
    await until("the stop waits for b's lock", lambda: "b" in engine._stop_requested)
    gpu_dir.release(b.main_pid, "restore")
    await asyncio.wait_for(asyncio.gather(swapping, stopping), timeout=30)
    assert (a.state, b.state) == (State.FROZEN, State.STOPPED)
    assert b.unit not in units.procs and not engine._swaps
    await engine.thaw("a")
    assert await amoves(file_counter(tmp_path / "a"))


async def test_a_swap_never_stops_the_model_it_brings_in_for_the_ram_budget(setup) -> None:  # noqa: F811
    """RamBudgetAction=stop-oldest: b, the oldest frozen model, is the one the swap thaws; making room for a's freeze
    must not stop it (the swap would then lose it), so the swap is refused and nothing changes."""
    engine, units, _gpu_dir, _events, tmp_path = setup
    a, b = await two_models(engine, _gpu_dir, tmp_path)
    engine.config.ram_budget_bytes = b.snapshot_bytes + a.vram_bytes - 1
    engine.config.ram_budget_action = "stop-oldest"
    with pytest.raises(RamBudgetExceeded):
        await engine.swap("a", "b")
    assert (a.state, b.state) == (State.RUNNING, State.FROZEN)
    assert await amoves(file_counter(tmp_path / "a")) and units.frozen == {b.unit}
