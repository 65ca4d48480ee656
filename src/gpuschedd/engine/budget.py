"""RAM and VRAM: the checks before a freeze, thaw or start, and the evictions that make room."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import (
    GpuschedError,
    InsufficientGpuMemory,
    RamBudgetExceeded,
)
from ..model import Model, State
from ..options import RunOptions
from ..telemetry import GpuInfo
from .core import Core, Requester, _find_gpu

log = logging.getLogger(__name__)


class Budget(Core):
    """The RAM budget and free VRAM: checked without an await before the step that reserves them; one loop that
    makes room (evictions, stops) before a model's own lock is taken."""

    def ram_frozen_bytes(self) -> int:
        """Host RAM held by the snapshots of frozen (or freezing, thawing) models: what of them is not paged out to
        swap (the disk tier)."""
        return sum(m.snapshot_in_ram() for m in self.models.values())

    def _check_ram(self, model: Model) -> None:
        """Refuse a freeze whose snapshot would not fit the RAM budget or the kernel's MemAvailable. The snapshot
        is estimated by the VRAM NVML sees (it also counts the context, so it errs on the safe side)."""
        need = model.vram_bytes
        if need <= 0:
            return  # nothing on a GPU (or no telemetry): the freeze copies nothing into RAM
        # Freezes under way count too: two checked against the same budget would both pass.
        freezing = sum(m.vram_bytes for m in self.models.values() if m.state == State.FREEZING and m is not model)
        frozen, budget = self.ram_frozen_bytes() + freezing, self.config.ram_budget_bytes
        if frozen + need > budget:
            self._refuse(
                model,
                RamBudgetExceeded(
                    f"freezing {model.name} would park {need} bytes in host RAM; frozen models already hold "
                    f"{frozen} of the {budget}-byte budget"
                ),
            )
        available = self.mem_available() + self._paged_out_cache()
        if need > available:
            self._refuse(
                model,
                RamBudgetExceeded(
                    f"freezing {model.name} would park {need} bytes in host RAM; the kernel has {available} "
                    "available (MemAvailable)"
                ),
            )

    def _check_gpu_room(self, model: Model, shortfall: InsufficientGpuMemory | None) -> None:
        """Refuse a thaw (or a start with GpuMemory) that would not fit: a restore that runs out of VRAM leaves the
        process unrecoverable (cuda-checkpoint issue 44), so this is checked before anything moves."""
        if shortfall is not None:
            self._refuse(model, shortfall)

    def _gpu_shortfall(self, model: Model) -> InsufficientGpuMemory | None:
        """What a thaw would lack: per GPU, the VRAM the model held running (NVML, before its freeze) less what
        its processes hold there now (none, unless a thaw was cut short), against that GPU's free memory."""
        if not model.cuda_pids:
            return None
        gpus = {g.uuid: g for g in self.telemetry.gpus()}
        if not gpus:
            log.warning("thaw of %s: no GPU telemetry, cannot check free VRAM", model.name)
            return None
        if not model.vram_by_gpu:
            # NVML attributed no VRAM to the model's PIDs (no NVML reading before the freeze): the snapshot must at
            # least fit on the GPU with the most free memory.
            best = max(gpus.values(), key=lambda g: g.free_bytes)
            if model.snapshot_bytes > best.free_bytes:
                return InsufficientGpuMemory(
                    f"thawing {model.name} needs {model.snapshot_bytes} bytes free on a GPU; the most free is"
                    f" {best.free_bytes} on GPU {best.index} ({best.uuid}). The model stays frozen."
                )
            return None
        per_pid = self.telemetry.vram_by_pid()
        need = {
            uuid: held - sum(per_pid.get(pid, {}).get(uuid, 0) for pid in model.pids)
            for uuid, held in model.vram_by_gpu.items()
        }
        return self._lacking(model, need, gpus, f"thawing {model.name}", "The model stays frozen.")

    def _lacking(
        self, model: Model, need: dict[str, int], gpus: dict[str, GpuInfo], doing: str, outcome: str
    ) -> InsufficientGpuMemory | None:
        """The first GPU (by UUID) with less free memory than `need` says, counting what thaws under way were
        promised there; the error carries needed, free and gpu for eviction."""
        for uuid, bytes_needed in sorted(need.items()):
            gpu = gpus.get(uuid)
            promised = sum(r.get(uuid, 0) for name, r in self._thaw_reserved.items() if name != model.name)
            free = max(0, gpu.free_bytes - promised) if gpu else 0
            if bytes_needed > free:
                where = f"GPU {gpu.index} ({uuid})" if gpu else f"GPU {uuid}, which is not present"
                message = f"{doing} needs {bytes_needed} bytes free on {where}; {free} free. {outcome}"
                return InsufficientGpuMemory(message, needed=bytes_needed, free=free, gpu=uuid)
        return None

    def _start_shortfall(self, model: Model, options: RunOptions) -> Callable[[], InsufficientGpuMemory | None]:
        """GpuMemory: what the start of a new model would lack, on each GPU it will use: its Gpus, else every GPU
        of the host (it can see them all). A GPU named but not on the host is InvalidArgs. Without GPU telemetry
        nothing can be checked, as for a thaw."""
        if options.gpu_memory <= 0:
            return lambda: None
        found = self.telemetry.gpus()
        if not found:
            log.warning("run of %s: no GPU telemetry, cannot check GpuMemory", model.name)
            return lambda: None
        targets = [_find_gpu(found, gpu) for gpu in options.gpus] if options.gpus else found
        need = {gpu.uuid: options.gpu_memory for gpu in targets}
        return lambda: self._lacking(
            model,
            need,
            {g.uuid: g for g in self.telemetry.gpus()},
            f"starting {model.name} (GpuMemory)",
            "Nothing was started.",
        )

    async def _evict_for(
        self, model: Model, shortfall: Callable[[], InsufficientGpuMemory | None], purpose: str, by: Requester
    ) -> None:
        """EvictOnThaw=yes: while `purpose` (the thaw of `model`, or its start with GpuMemory) lacks VRAM on a GPU
        (`shortfall`), freeze running models there of lower priority, then of equal priority least recently used
        first; never one of higher priority, and never a catalog model: the front door freezes those, knowing which
        have requests in flight (as the daemon's IdleFreezeSec= leaves them to it, policies.py)."""

        def lack() -> tuple[int, int, str] | None:
            short = shortfall()
            return (short.needed, short.free, short.gpu) if short is not None and short.gpu else None

        def gives(gpu: str) -> Callable[[Model], int]:
            per_pid = self.telemetry.vram_by_pid()  # one reading for the round

            def held(victim: Model) -> int:
                if victim.state != State.RUNNING or victim.priority > model.priority or victim.catalog_digest:
                    return 0
                return sum(per_pid.get(pid, {}).get(gpu, 0) for pid in victim.pids)

            return held

        async def evict(victim: Model, need: int, free: int, gpu: str) -> None:
            why = (
                f"evicted for {purpose} of {model.name} (priority {model.priority}), which needs {need} bytes on GPU"
                f" {gpu} where {free} are free; {victim.name} has priority {victim.priority}; requested by {by}"
            )
            log.info("model %s: %s", victim.name, why)
            await self.freeze(victim.name, "evicted", why, by)

        await self._make_room(model, by, lack, gives, lambda m: (m.priority, m.last_active_usec), evict)

    def _ram_lack(self, model: Model) -> Callable[[], tuple[int, int, str] | None]:
        """What freezing `model` would lack in the RAM budget: (bytes needed, bytes of room), or None."""
        need, budget = model.vram_bytes, self.config.ram_budget_bytes

        def lack() -> tuple[int, int, str] | None:
            room = budget - self.ram_frozen_bytes()
            return (need, room, "") if need > 0 and need > room else None

        return lack

    async def _make_ram_room(self, model: Model, by: Requester) -> None:
        """RamBudgetAction=: each action in the order given, until freezing `model` fits the RAM budget. Each acts
        only where it alone would make the room (page-out: when what the frozen models hold in RAM would fit in
        the free swap), so with `page-out stop-oldest` nothing is stopped that paging out would have spared."""
        for action in self.config.ram_budget_action.split():
            if action == "page-out":
                await self._page_out_for_ram(model, by)
            elif action == "stop-oldest":
                await self._stop_oldest_for_ram(model, by)

    async def _page_out_for_ram(self, model: Model, by: Requester) -> None:
        """RamBudgetAction=page-out: while freezing `model` would exceed the RAM budget, page out the frozen model
        least recently used (its last work on a GPU), as far as the free swap takes them."""
        budget = self.config.ram_budget_bytes

        async def page_out(victim: Model, need: int, room: int, _where: str) -> None:
            why = (
                f"the least recently used frozen model, paged out to swap to make room in the RAM budget ({budget}"
                f" bytes, {budget - room} in RAM) for the freeze of {model.name} ({need} bytes); requested by {by}"
            )
            log.info("model %s: %s", victim.name, why)
            await self.page_out(victim.name, "ram-budget", why)

        def gives(_where: str) -> Callable[[Model], int]:
            # What each would give comes out of the one free swap: shared out in the order they would be paged out.
            left, share = self._swap_space()[1], {}
            for m in sorted(self.models.values(), key=lambda m: m.last_active_usec):
                if m.state == State.FROZEN and not m.lock.locked() and by.may_touch(m):
                    share[m.name] = min(m.snapshot_in_ram(), left)
                    left -= share[m.name]
            return lambda victim: share.get(victim.name, 0)

        await self._make_room(model, by, self._ram_lack(model), gives, lambda m: m.last_active_usec, page_out)

    async def _stop_oldest_for_ram(self, model: Model, by: Requester) -> None:
        """RamBudgetAction=stop-oldest: while freezing `model` would exceed the RAM budget, stop the frozen model
        frozen longest ago."""
        budget = self.config.ram_budget_bytes

        async def stop(victim: Model, need: int, room: int, _where: str) -> None:
            why = (
                f"the oldest frozen model, stopped to make room in the RAM budget ({budget} bytes,"
                f" {budget - room} parked) for the freeze of {model.name} ({need} bytes); requested by {by}"
            )
            log.info("model %s: %s", victim.name, why)
            await self.stop(victim.name, "ram-budget", why)

        def gives(_where: str) -> Callable[[Model], int]:
            return lambda victim: victim.snapshot_in_ram() if victim.state == State.FROZEN else 0

        await self._make_room(model, by, self._ram_lack(model), gives, lambda m: m.state_change_usec, stop)

    async def _make_room(
        self,
        model: Model,
        by: Requester,
        lack: Callable[[], tuple[int, int, str] | None],
        gives: Callable[[str], Callable[[Model], int]],
        order: Callable[[Model], Any],
        act: Callable[[Model, int, int, str], Awaitable[None]],
    ) -> None:
        """The one loop of both: while `lack` says `model` needs more than there is (bytes needed, bytes there,
        where), `act` on the first by `order` of the models that would give room there (`gives(where)`: what each
        gives, read once a round) and that `by` could touch itself; each tried once. Nothing is done when all of
        them together would not make room (the caller is refused as without it). Takes no lock but each victim's
        own, one at a time (in `act`). The model a swap brings in is never a victim of its partner's freeze: the
        swap would stop or page out the very model it is about to thaw."""
        tried = {into for out, into in self._swaps if out == model.name}
        while (short := lack()) is not None:
            need, have, where = short
            room_of = gives(where)
            victims = sorted(
                (m for m in self.models.values() if m is not model and m.name not in tried and by.may_touch(m)),
                key=order,
            )
            victims = [m for m in victims if room_of(m) > 0]
            if not victims or have + sum(room_of(m) for m in victims) < need:
                return
            tried.add(victims[0].name)
            try:
                await act(victims[0], need, have, where)
            except GpuschedError as e:
                log.warning("making room for %s: %s: %s", model.name, victims[0].name, e)
