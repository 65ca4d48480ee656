"""The disk tier through the engine (docs/disk-tier.md): PageOut, FreezeToDisk, a thaw from swap, the budget's page-out,
with the driver backend over the fake libcuda and real fake-model processes; the kernel's side (page out, read
ahead, VmSwap, the host's swap) is a fake kernel that behaves like it: it moves what fits in the free swap (a partial
move when it fills), or refuses the process. The real page-out runs in tests/system/test_disk_tier.py."""

from __future__ import annotations

import errno

import pytest
from test_policies import BOB, run_model, setup  # noqa: F401 - the fixture

from gpuschedd import hostmem
from gpuschedd.config import ConfigError, parse_budget_action
from gpuschedd.engine import Engine, Requester
from gpuschedd.errors import InsufficientSwap, InvalidState, NotSupported, RamBudgetExceeded
from gpuschedd.events import EventKind
from gpuschedd.model import State
from gpuschedd.pageout import Advised, PageOutError

MIB = 1 << 20


class FakeKernel:
    """process_madvise, VmSwap and the swap as the engine sees them. A page-out moves what the process holds in RAM
    (its real RSS) as far as the free swap takes it; a read-ahead brings it back (the restore that follows frees the
    swap, as the driver's freeing its snapshot does). `refuse`: the errno of a whole-process refusal."""

    def __init__(self, engine: Engine, total: int) -> None:
        self.total = self.free = total
        self.swapped: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.refuse = 0
        engine._kernel_page_out = self.page_out  # type: ignore[method-assign]
        engine._kernel_prefetch = self.prefetch  # type: ignore[method-assign]
        engine._swapped = lambda pid: self.swapped.get(pid, 0)  # type: ignore[method-assign]
        engine._swap_space = lambda: (self.total, self.free)  # type: ignore[method-assign]
        engine._swap_cached = lambda: 0  # type: ignore[method-assign]

    def page_out(self, pid: int) -> Advised:
        self.calls.append(("page-out", pid))
        if self.refuse:
            raise PageOutError("refused", self.refuse)
        moved = min(max(hostmem.rss_bytes(pid) - self.swapped.get(pid, 0), 0), self.free)
        self.swapped[pid] = self.swapped.get(pid, 0) + moved
        self.free -= moved
        return Advised(bytes=moved, calls=1)

    def prefetch(self, pid: int) -> Advised:
        self.calls.append(("prefetch", pid))
        self.free += self.swapped.pop(pid, 0)
        return Advised(calls=1)


async def test_page_out_moves_a_frozen_snapshot_to_swap_and_the_thaw_reads_it_back(setup) -> None:  # noqa: F811
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    with pytest.raises(InvalidState, match="not frozen"):
        await engine.page_out("m")
    assert kernel.calls == [] and model.state == State.RUNNING
    await engine.freeze("m")
    held = engine.ram_frozen_bytes()
    assert held == model.snapshot_bytes > 0 and model.snapshot_on_disk() == 0
    await engine.page_out("m")
    assert model.state == State.FROZEN and kernel.calls == [("page-out", pid) for pid in model.pids]
    assert model.snapshot_on_disk() == model.snapshot_bytes and model.snapshot_in_ram() == 0
    assert engine.ram_frozen_bytes() == 0, "the budget counts only what is in RAM"
    paged = events.events[-1]
    assert paged.kind == EventKind.PAGE_OUT and paged.bytes == model.snapshot_bytes and paged.duration_usec > 0
    assert paged.fields["GPUSCHED_RAM_BYTES"] == "0" and "GPUSCHED_REASON" not in paged.fields
    await engine.thaw("m")
    assert model.state == State.RUNNING and kernel.calls[-1] == ("prefetch", model.pids[0])
    steps = [step for step, pid, result in gpu_dir.log() if pid == model.pids[0] and result == "CUDA_SUCCESS"]
    assert steps[-2:] == ["restore", "unlock"] and gpu_dir.corrupted() == []
    thawed = events.events[-1]
    assert thawed.kind == EventKind.THAW and thawed.fields["GPUSCHED_SWAP_BYTES"] == str(paged.bytes)
    assert (model.swapped_bytes, model.snapshot_on_disk(), engine.ram_frozen_bytes()) == (0, 0, 0)


async def test_what_the_kernel_swaps_out_by_itself_leaves_the_ram_count(setup) -> None:  # noqa: F811
    """Under memory pressure the kernel swaps a frozen snapshot out without a PageOut: the periodic refresh reads
    VmSwap again, so SnapshotRamBytes and the RAM budget count only what is still in RAM, and announces it."""
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    await engine.freeze("m")
    held, announced = engine.ram_frozen_bytes(), len(events.states)
    kernel.swapped[model.cuda_pids[0]] = held // 4
    await engine.refresh_live()
    assert model.snapshot_on_disk() == held // 4 and engine.ram_frozen_bytes() == held - held // 4
    assert events.states[announced:] == [("m", State.FROZEN)], "announced once"
    await engine.refresh_live()
    assert len(events.states) == announced + 1, "nothing moved: nothing announced"
    await engine.thaw("m")
    assert (model.swapped_bytes, engine.ram_frozen_bytes()) == (0, 0)


async def test_no_swap_too_little_or_a_refusing_kernel_changes_nothing(setup) -> None:  # noqa: F811
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 0)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    with pytest.raises(NotSupported, match="needs swap"):
        await engine.freeze_to_disk("m")
    assert model.state == State.RUNNING, "refused before the freeze"
    await engine.freeze("m")
    with pytest.raises(NotSupported, match="needs swap"):
        await engine.page_out("m")
    kernel.total = kernel.free = model.snapshot_bytes // 2
    with pytest.raises(InsufficientSwap, match="Nothing was moved"):
        await engine.page_out("m")
    assert kernel.calls == [] and model.snapshot_in_ram() == model.snapshot_bytes
    assert [e.fields["GPUSCHED_ERROR"] for e in events.events if e.kind == EventKind.REFUSAL][-1].endswith("Swap")
    kernel.total = kernel.free = 1 << 30
    kernel.refuse = errno.EPERM
    with pytest.raises(NotSupported, match="CAP_SYS_NICE"):
        await engine.page_out("m")
    assert model.state == State.FROZEN and model.snapshot_on_disk() == 0
    await engine.thaw("m")
    assert model.state == State.RUNNING and gpu_dir.corrupted() == []


async def test_a_thaw_from_swap_without_room_to_come_back_is_refused(setup) -> None:  # noqa: F811
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    await engine.freeze_to_disk("m")
    engine.mem_available = lambda: model.snapshot_bytes // 4
    kernel.free = model.snapshot_bytes // 4
    with pytest.raises(RamBudgetExceeded, match="stays frozen"):
        await engine.thaw("m")
    assert model.state == State.FROZEN and model.snapshot_on_disk() == model.snapshot_bytes
    assert kernel.calls[-1][0] == "page-out", "nothing read back"
    assert events.events[-1].kind == EventKind.REFUSAL
    kernel.free = 1 << 30
    await engine.thaw("m")
    assert model.state == State.RUNNING and gpu_dir.corrupted() == []


async def test_a_partial_move_is_reported_and_counted_as_it_is(setup) -> None:  # noqa: F811
    """The swap fills during the page-out (something else took it meanwhile): what moved is on disk, the rest stays
    in RAM and in the budget; not an error."""
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    await engine.freeze("m")
    real_page_out = kernel.page_out

    def filling(pid: int) -> Advised:
        kernel.free = model.snapshot_bytes // 3  # taken by someone else after the check
        return real_page_out(pid)

    engine._kernel_page_out = filling  # type: ignore[method-assign]
    await engine.page_out("m")
    assert 0 < model.snapshot_on_disk() < model.snapshot_bytes
    assert engine.ram_frozen_bytes() == model.snapshot_bytes - model.snapshot_on_disk()
    assert f"{model.snapshot_in_ram()} in RAM" in events.events[-1].message


async def test_freeze_to_disk_freezes_then_pages_out(setup) -> None:  # noqa: F811
    engine, gpu_dir, events, _, tmp_path = setup
    FakeKernel(engine, 1 << 30)
    model = await run_model(engine, gpu_dir, tmp_path, "m")
    await engine.freeze_to_disk("m")
    assert model.state == State.FROZEN and model.snapshot_on_disk() == model.snapshot_bytes
    assert events.kinds()[-2:] == [EventKind.FREEZE, EventKind.PAGE_OUT]
    await engine.freeze_to_disk("m")  # frozen already: pages out what is left (nothing)
    assert events.events[-1].bytes == 0


async def test_ram_budget_pages_out_the_least_recently_used_first(setup) -> None:  # noqa: F811
    engine, gpu_dir, events, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    first = await run_model(engine, gpu_dir, tmp_path, "first")
    second = await run_model(engine, gpu_dir, tmp_path, "second")
    third = await run_model(engine, gpu_dir, tmp_path, "third")
    await engine.freeze("first")
    await engine.freeze("second")
    second.last_active_usec = first.last_active_usec - 1  # second ran least recently
    engine.config.ram_budget_bytes = first.snapshot_bytes + second.snapshot_bytes + third.vram_bytes - 1
    engine.config.ram_budget_action = "page-out stop-oldest"
    await engine.freeze("third")
    assert (first.state, second.state, third.state) == (State.FROZEN,) * 3
    assert second.snapshot_on_disk() == second.snapshot_bytes and first.snapshot_on_disk() == 0
    assert events.reasons() == [(EventKind.PAGE_OUT, "second", "ram-budget")]
    assert "requested by uid 0" in events.events[-2].message and "RAM budget" in events.events[-2].message
    # No swap left: paging out cannot make the room, so stop-oldest does.
    await engine.thaw("third")
    kernel.free = 0
    engine.config.ram_budget_bytes = first.snapshot_bytes + third.vram_bytes - 1
    await engine.freeze("third")
    assert events.reasons()[-1] == (EventKind.STOP, "first", "ram-budget")
    assert (first.state, second.state, third.state) == (State.STOPPED, State.FROZEN, State.FROZEN)


async def test_ram_budget_pages_out_only_what_the_requester_could(setup) -> None:  # noqa: F811
    engine, gpu_dir, _, _, tmp_path = setup
    kernel = FakeKernel(engine, 1 << 30)
    roots = await run_model(engine, gpu_dir, tmp_path, "roots")
    mine = await run_model(engine, gpu_dir, tmp_path, "mine")
    await engine.freeze("roots")
    mine.owner = BOB
    engine.config.ram_budget_bytes = roots.snapshot_bytes + mine.vram_bytes - 1
    engine.config.ram_budget_action = "page-out"
    with pytest.raises(RamBudgetExceeded):
        await engine.freeze("mine", by=Requester(BOB))
    assert kernel.calls == [] and (roots.snapshot_on_disk(), mine.state) == (0, State.RUNNING)
    await engine.freeze("mine", by=Requester(BOB, any_model=True))
    assert roots.snapshot_on_disk() == roots.snapshot_bytes and mine.state == State.FROZEN


def test_ram_budget_action_takes_page_out_and_stop_oldest_in_order() -> None:
    assert parse_budget_action("page-out  stop-oldest") == "page-out stop-oldest"
    assert parse_budget_action("refuse") == "refuse"
    for bad in ("", "page-out page-out", "refuse page-out", "drop"):
        with pytest.raises(ValueError):
            parse_budget_action(bad)
    assert issubclass(ConfigError, ValueError)
