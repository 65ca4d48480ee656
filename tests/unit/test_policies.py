"""The policies (idle auto-freeze, eviction on thaw, RAM budget stop-oldest, frozen time to live) through the engine
with the driver backend over the fake libcuda, fake NVML utilization, real model processes, and an injected clock
(no real minutes are slept)."""

from __future__ import annotations

import pytest
from engine_kit import make_engine
from fakegpu_fixtures import GPU0, GPU1, MIB, fake_model_argv, registered
from polling import until
from process_units import ProcessUnits

from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import DAEMON, Engine, Requester
from gpuschedd.errors import InsufficientGpuMemory, InvalidArgs, RamBudgetExceeded
from gpuschedd.events import EventKind
from gpuschedd.model import Model, State
from gpuschedd.options import RunOptions
from gpuschedd.statefile import model_from_dict, model_to_dict
from gpuschedd.testing.fakegpu import FakeGpuTelemetry

SEC = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.usec = 1_000_000 * SEC

    def __call__(self) -> int:
        return self.usec

    def advance(self, seconds: float) -> None:
        self.usec += int(seconds * SEC)


@pytest.fixture
async def setup(gpu_dir, tmp_path):  # type: ignore[no-untyped-def]
    units = ProcessUnits()
    engine, events = make_engine(
        units,
        checkpoint=DriverCheckpoint(),
        telemetry=FakeGpuTelemetry(gpu_dir.path),
        config=Config(ram_budget_bytes=4 << 30),
    )
    clock = Clock()
    engine.now_usec = clock
    await engine.start()
    yield engine, gpu_dir, events, clock, tmp_path
    await units.close()


async def run_model(engine: Engine, gpu_dir, tmp_path, name: str, vram: int = 100 * MIB, **options) -> Model:  # type: ignore[no-untyped-def]
    before = len(gpu_dir.contexts())
    argv = fake_model_argv(gpu_dir, tmp_path / name, vram, GPU0, 1)
    model = await engine.run(name, argv, RunOptions(**options), 0)
    await until("registration", lambda: registered(gpu_dir, before + 1), 5.0)
    await engine.refresh(model)
    assert model.vram_bytes == vram
    return model


async def test_idle_model_is_frozen_after_its_idle_time(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, clock, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, "m", idle_freeze_sec=60)
    (pid,) = model.pids
    gpu_dir.utilization(pid, 40)
    clock.advance(120)
    await engine.apply_policies()
    assert model.state == State.RUNNING, "busy: never idle"
    gpu_dir.utilization(pid, 0)
    clock.advance(59)
    await engine.apply_policies()
    assert model.state == State.RUNNING, "idle for less than IdleFreezeSec"
    clock.advance(2)
    await engine.apply_policies()
    assert model.state == State.FROZEN
    freeze = events.events[-1]
    assert freeze.kind == EventKind.FREEZE and freeze.fields["GPUSCHED_REASON"] == "idle"
    assert "no GPU utilization" in freeze.message and "IdleFreezeSec=60" in freeze.message
    await engine.thaw("m")
    clock.advance(30)
    await engine.apply_policies()
    assert model.state == State.RUNNING, "a thaw starts the idle time again"


async def test_daemon_default_and_per_model_never(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, clock, tmp_path = setup
    engine.config.idle_freeze_sec = 30
    default = await run_model(engine, gpu_dir, tmp_path, "default")
    never = await run_model(engine, gpu_dir, tmp_path, "never", idle_freeze_sec=0)
    clock.advance(31)
    await engine.apply_policies()
    assert default.state == State.FROZEN and never.state == State.RUNNING
    assert events.reasons() == [(EventKind.FREEZE, "default", "idle")]


async def test_unknown_utilization_is_never_idle(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, _, clock, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, "m", idle_freeze_sec=10)
    engine.telemetry.busy_pids = lambda: None  # type: ignore[method-assign]
    clock.advance(100)
    await engine.apply_policies()
    assert model.state == State.RUNNING


async def test_frozen_model_past_its_ttl_is_stopped(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, clock, tmp_path = setup
    model = await run_model(engine, gpu_dir, tmp_path, "m", frozen_ttl_sec=100)
    keep = await run_model(engine, gpu_dir, tmp_path, "keep")
    await engine.freeze("m")
    await engine.freeze("keep")
    model.state_change_usec = keep.state_change_usec = clock()
    clock.advance(99)
    await engine.apply_policies()
    assert model.state == State.FROZEN
    clock.advance(2)
    await engine.apply_policies()
    assert model.state == State.STOPPED and keep.state == State.FROZEN
    stop = events.events[-1]
    assert stop.kind == EventKind.STOP and stop.fields["GPUSCHED_REASON"] == "frozen-ttl"
    assert "FrozenTTLSec=100" in stop.message


async def test_thaw_evicts_lower_priority_first(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _clock, tmp_path = setup
    engine.config.evict_on_thaw = True
    hi = await run_model(engine, gpu_dir, tmp_path, "hi", 400 * MIB, priority=5)
    await engine.freeze("hi")
    mid = await run_model(engine, gpu_dir, tmp_path, "mid", 400 * MIB, priority=2)
    lo = await run_model(engine, gpu_dir, tmp_path, "lo", 400 * MIB, priority=0)
    await engine.thaw("hi")  # 1 GiB GPU: 224 MiB free, hi needs 400
    assert hi.state == State.RUNNING and lo.state == State.FROZEN and mid.state == State.RUNNING
    assert events.reasons() == [(EventKind.FREEZE, "lo", "evicted")]
    evicted = next(e for e in events.events if e.fields.get("GPUSCHED_REASON") == "evicted")
    assert "evicted for the thaw of hi (priority 5)" in evicted.message and "priority 0" in evicted.message


async def want_beside_two(setup, older: str, newer: str) -> tuple[Model, Model, Model]:  # type: ignore[no-untyped-def]
    """EvictOnThaw=yes; `want` frozen, then `older` and `newer` running (last active 100 s and 10 s ago): 1 GiB
    GPU, 400 MiB each, so want's thaw needs one of them frozen."""
    engine, gpu_dir, _events, clock, tmp_path = setup
    engine.config.evict_on_thaw = True
    want = await run_model(engine, gpu_dir, tmp_path, "want", 400 * MIB)
    await engine.freeze("want")
    old = await run_model(engine, gpu_dir, tmp_path, older, 400 * MIB)
    new = await run_model(engine, gpu_dir, tmp_path, newer, 400 * MIB)
    old.last_active_usec, new.last_active_usec = clock() - 100 * SEC, clock() - 10 * SEC
    return want, old, new


async def test_equal_priority_evicts_least_recently_used(setup) -> None:  # type: ignore[no-untyped-def]
    engine, _gpu_dir, events, _clock, _tmp_path = setup
    want, old, new = await want_beside_two(setup, "old", "new")
    await engine.thaw("want")
    assert (want.state, old.state, new.state) == (State.RUNNING, State.FROZEN, State.RUNNING)
    assert events.reasons() == [(EventKind.FREEZE, "old", "evicted")]


async def test_never_evicts_a_catalog_model(setup) -> None:  # type: ignore[no-untyped-def]
    """Catalog models are the front door's to freeze (it knows which have requests in flight): a thaw short of
    memory evicts the other model, and fails where only catalog models could make room."""
    engine, _gpu_dir, events, _clock, _tmp_path = setup
    want, served, plain = await want_beside_two(setup, "served", "plain")  # served: the least recently used
    served.catalog_digest = "0123abcd"  # listed from /etc/gpusched/models.d
    await engine.thaw("want")
    assert (want.state, served.state, plain.state) == (State.RUNNING, State.RUNNING, State.FROZEN)
    assert events.reasons() == [(EventKind.FREEZE, "plain", "evicted")]
    await engine.freeze("want")
    plain.catalog_digest = "4567cdef"
    await engine.thaw("plain")  # room again: plain runs
    with pytest.raises(InsufficientGpuMemory):
        await engine.thaw("want")
    assert (want.state, served.state, plain.state) == (State.FROZEN, State.RUNNING, State.RUNNING)


async def test_never_evicts_a_higher_priority_model(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    engine.config.evict_on_thaw = True
    lo = await run_model(engine, gpu_dir, tmp_path, "lo", 400 * MIB, priority=0)
    await engine.freeze("lo")
    a = await run_model(engine, gpu_dir, tmp_path, "a", 400 * MIB, priority=1)
    b = await run_model(engine, gpu_dir, tmp_path, "b", 400 * MIB, priority=1)
    with pytest.raises(InsufficientGpuMemory):
        await engine.thaw("lo")
    assert (lo.state, a.state, b.state) == (State.FROZEN, State.RUNNING, State.RUNNING)
    assert events.reasons() == []


async def test_no_eviction_by_default(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    hi = await run_model(engine, gpu_dir, tmp_path, "hi", 400 * MIB, priority=5)
    await engine.freeze("hi")
    lo = await run_model(engine, gpu_dir, tmp_path, "lo", 400 * MIB)
    await run_model(engine, gpu_dir, tmp_path, "lo2", 400 * MIB)
    with pytest.raises(InsufficientGpuMemory):
        await engine.thaw("hi")
    assert hi.state == State.FROZEN and lo.state == State.RUNNING and events.reasons() == []


async def test_run_with_gpu_memory_evicts_for_the_start(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    engine.config.evict_on_thaw = True
    lo = await run_model(engine, gpu_dir, tmp_path, "lo", 400 * MIB, priority=0)
    mid = await run_model(engine, gpu_dir, tmp_path, "mid", 400 * MIB, priority=2)
    # GPU 0 has 224 MiB free; "new" says it needs 400 MiB there (Gpus by index, as CUDA_VISIBLE_DEVICES takes it)
    new = await run_model(engine, gpu_dir, tmp_path, "new", 400 * MIB, priority=1, gpus=["0"], gpu_memory=400 * MIB)
    assert (lo.state, mid.state, new.state) == (State.FROZEN, State.RUNNING, State.RUNNING)
    assert events.reasons() == [(EventKind.FREEZE, "lo", "evicted")]
    evicted = next(e for e in events.events if e.fields.get("GPUSCHED_REASON") == "evicted")
    assert "evicted for the start of new (priority 1)" in evicted.message and f"GPU {GPU0}" in evicted.message


async def test_run_with_gpu_memory_refused_starts_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    a = await run_model(engine, gpu_dir, tmp_path, "a", 400 * MIB, priority=1)
    b = await run_model(engine, gpu_dir, tmp_path, "b", 400 * MIB, priority=1)
    starts = len(engine.units.calls)
    argv = fake_model_argv(gpu_dir, tmp_path / "new", 400 * MIB, GPU0, 1)
    # no Gpus: every GPU it can see must have room; GPU 1 has, GPU 0 not. EvictOnThaw=no: nothing is evicted.
    with pytest.raises(InsufficientGpuMemory, match=r"starting new \(GpuMemory\) needs 419430400 bytes free on GPU 0"):
        await engine.run("new", argv, RunOptions(gpu_memory=400 * MIB), 0)
    engine.config.evict_on_thaw = True  # ... and never models of higher priority
    with pytest.raises(InsufficientGpuMemory):
        await engine.run("new", argv, RunOptions(gpu_memory=400 * MIB, priority=0), 0)
    with pytest.raises(InvalidArgs, match="no GPU '7'"):
        await engine.run("new", argv, RunOptions(gpus=["7"], gpu_memory=1), 0)
    assert "new" not in engine.models and len(engine.units.calls) == starts
    assert (a.state, b.state) == (State.RUNNING, State.RUNNING) and events.reasons() == []
    refusals = [e for e in events.events if e.kind == EventKind.REFUSAL and e.model == "new"]
    assert len(refusals) == 2 and "Nothing was started" in refusals[0].message
    # room on GPU 1: started, nothing evicted
    await run_model(engine, gpu_dir, tmp_path, "one", 100 * MIB, gpus=[GPU1], gpu_memory=900 * MIB)
    assert events.reasons() == []


async def test_ram_budget_stop_oldest(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    first = await run_model(engine, gpu_dir, tmp_path, "first")
    second = await run_model(engine, gpu_dir, tmp_path, "second")
    third = await run_model(engine, gpu_dir, tmp_path, "third")
    await engine.freeze("first")
    await engine.freeze("second")
    first.state_change_usec = second.state_change_usec - 1  # first was frozen first
    engine.config.ram_budget_bytes = first.snapshot_bytes + second.snapshot_bytes + third.vram_bytes - 1
    with pytest.raises(RamBudgetExceeded):
        await engine.freeze("third")  # RamBudgetAction=refuse: the default
    assert third.state == State.RUNNING and first.state == State.FROZEN
    engine.config.ram_budget_action = "stop-oldest"
    await engine.freeze("third")
    assert (first.state, second.state, third.state) == (State.STOPPED, State.FROZEN, State.FROZEN)
    assert events.reasons() == [(EventKind.STOP, "first", "ram-budget")]
    assert "RAM budget" in next(e for e in events.events if e.kind == EventKind.STOP).message


BOB, CAROL = 1001, 1002


def test_requester_may_touch_its_own_models_or_every_one_with_any_model() -> None:
    mine, carols, roots = (
        Model(name=n, unit="u", owner=o, command=["x"]) for n, o in (("a", BOB), ("b", CAROL), ("c", 0))
    )
    assert [Requester(BOB).may_touch(m) for m in (mine, carols, roots)] == [True, False, False]
    assert [Requester(0).may_touch(m) for m in (mine, carols, roots)] == [False, False, True]
    assert all(Requester(BOB, any_model=True).may_touch(m) for m in (mine, carols, roots))
    assert all(DAEMON.may_touch(m) for m in (mine, carols, roots))
    assert (str(Requester(BOB)), str(DAEMON)) == (f"uid {BOB}", "the daemon")


async def test_eviction_never_touches_a_model_the_requester_could_not(setup) -> None:  # type: ignore[no-untyped-def]
    """A thaw for bob freezes bob's own lower-priority model, never carol's or root's (even of lower priority); with
    only theirs in the way it is refused as without eviction, unless bob may control any model."""
    engine, gpu_dir, events, _, tmp_path = setup
    engine.config.evict_on_thaw = True
    want = await run_model(engine, gpu_dir, tmp_path, "want", 400 * MIB, priority=5)
    await engine.freeze("want")
    carols = await run_model(engine, gpu_dir, tmp_path, "carols", 400 * MIB, priority=-5)
    mine = await run_model(engine, gpu_dir, tmp_path, "mine", 400 * MIB, priority=0)
    want.owner, carols.owner, mine.owner = BOB, CAROL, BOB
    await engine.thaw("want", Requester(BOB))
    assert (want.state, carols.state, mine.state) == (State.RUNNING, State.RUNNING, State.FROZEN)
    evicted = next(e for e in events.events if e.fields.get("GPUSCHED_REASON") == "evicted")
    assert evicted.model == "mine" and f"requested by uid {BOB}" in evicted.message
    await engine.freeze("want")
    await engine.thaw("mine")
    mine.priority = 9  # now nothing of bob's may be evicted: only carol's would make room
    with pytest.raises(InsufficientGpuMemory):
        await engine.thaw("want", Requester(BOB))
    with pytest.raises(InsufficientGpuMemory):
        await engine.thaw("want")  # by default, the owner's (bob's) rights
    assert (want.state, carols.state, mine.state) == (State.FROZEN, State.RUNNING, State.RUNNING)
    await engine.thaw("want", Requester(BOB, any_model=True))  # control-any: carol's too
    assert (want.state, carols.state) == (State.RUNNING, State.FROZEN)


async def test_stop_oldest_never_stops_a_model_the_requester_could_not(setup) -> None:  # type: ignore[no-untyped-def]
    engine, gpu_dir, events, _, tmp_path = setup
    roots = await run_model(engine, gpu_dir, tmp_path, "roots")
    mine = await run_model(engine, gpu_dir, tmp_path, "mine")
    third = await run_model(engine, gpu_dir, tmp_path, "third")
    await engine.freeze("roots")
    await engine.freeze("mine")
    roots.state_change_usec = mine.state_change_usec - 1  # root's is the oldest
    mine.owner = third.owner = BOB
    engine.config.ram_budget_bytes = roots.snapshot_bytes + mine.snapshot_bytes + third.vram_bytes - 1
    engine.config.ram_budget_action = "stop-oldest"
    await engine.freeze("third", by=Requester(BOB))
    assert (roots.state, mine.state, third.state) == (State.FROZEN, State.STOPPED, State.FROZEN)
    stop = next(e for e in events.events if e.kind == EventKind.STOP)
    assert stop.model == "mine" and f"requested by uid {BOB}" in stop.message
    await engine.thaw("third")
    engine.config.ram_budget_bytes = roots.snapshot_bytes + third.vram_bytes - 1
    with pytest.raises(RamBudgetExceeded):  # only root's frozen model would make room: refused, nothing stopped
        await engine.freeze("third")  # default: the owner's (bob's) rights
    assert (roots.state, third.state) == (State.FROZEN, State.RUNNING)


def test_policy_fields_persist() -> None:
    model = Model(name="m", unit="u", owner=0, command=["x"], priority=-3, idle_freeze_sec=0, frozen_ttl_sec=60)
    model.last_active_usec = 1234
    again = model_from_dict(model_to_dict(model))
    assert (again.priority, again.idle_freeze_sec, again.frozen_ttl_sec, again.last_active_usec) == (-3, 0, 60, 1234)
    old = model_to_dict(model)
    for key in ("priority", "idle_freeze_sec", "frozen_ttl_sec", "last_active_usec"):
        del old[key]
    legacy = model_from_dict(old)
    assert (legacy.priority, legacy.idle_freeze_sec, legacy.frozen_ttl_sec) == (0, -1, 0)
