"""RAM and VRAM: the checks before a freeze, thaw or start, and the evictions that make room."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
    def ram_frozen_bytes(self) -> int:
        """Host RAM held by the snapshots of frozen (or freezing, thawing) models."""
        return sum(m.snapshot_bytes for m in self.models.values() if m.cuda_pids)

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
        available = self.mem_available()
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
                error = InsufficientGpuMemory(
                    f"{doing} needs {bytes_needed} bytes free on {where}; {free} free. {outcome}"
                )
                error.needed, error.free, error.gpu = bytes_needed, free, uuid  # type: ignore[attr-defined]
                return error
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
        first; never one of higher priority, never one `by` could not freeze itself, and none at all when all of
        them together would not make room. Takes no lock but each victim's own, one at a time."""
        tried: set[str] = set()
        while True:
            short = shortfall()
            uuid = getattr(short, "gpu", None)
            if short is None or uuid is None:
                return
            need, free = short.needed, short.free  # type: ignore[attr-defined]
            per_pid = self.telemetry.vram_by_pid()

            def held(m: Model, uuid: str = uuid, per_pid: dict[int, dict[str, int]] = per_pid) -> int:
                return sum(per_pid.get(pid, {}).get(uuid, 0) for pid in m.pids)

            victims = sorted(
                (
                    m
                    for m in self.models.values()
                    if m is not model
                    and m.name not in tried
                    and m.state == State.RUNNING
                    and m.priority <= model.priority
                    and by.may_touch(m)
                    and held(m) > 0
                ),
                key=lambda m: (m.priority, m.last_active_usec),
            )
            if not victims or free + sum(held(m) for m in victims) < need:
                return  # the thaw is refused as without eviction: no freeze that would not make room
            victim = victims[0]
            tried.add(victim.name)
            why = (
                f"evicted for {purpose} of {model.name} (priority {model.priority}), which needs {need} bytes on GPU"
                f" {uuid} where {free} are free; {victim.name} has priority {victim.priority}; requested by {by}"
            )
            log.info("model %s: %s", victim.name, why)
            try:
                await self.freeze(victim.name, "evicted", why, by)
            except GpuschedError as e:
                log.warning("evicting %s for %s: %s", victim.name, model.name, e)

    async def _make_ram_room(self, model: Model, by: Requester) -> None:
        """RamBudgetAction=stop-oldest: while freezing `model` would exceed the RAM budget, stop the frozen model
        frozen longest ago among those `by` could stop itself. Nothing is stopped when stopping all of those would
        not make room."""
        need = model.vram_bytes
        if need <= 0:
            return
        budget = self.config.ram_budget_bytes
        tried: set[str] = set()
        while True:
            parked = self.ram_frozen_bytes()
            if parked + need <= budget:
                return
            frozen = sorted(
                (
                    m
                    for m in self.models.values()
                    if m is not model
                    and m.name not in tried
                    and m.state == State.FROZEN
                    and m.snapshot_bytes
                    and by.may_touch(m)
                ),
                key=lambda m: m.state_change_usec,
            )
            if not frozen or parked - sum(m.snapshot_bytes for m in frozen) + need > budget:
                return  # refused by _check_ram as with RamBudgetAction=refuse
            oldest = frozen[0]
            tried.add(oldest.name)
            why = (
                f"the oldest frozen model, stopped to make room in the RAM budget ({budget} bytes, {parked} parked)"
                f" for the freeze of {model.name} ({need} bytes); requested by {by}"
            )
            log.info("model %s: %s", oldest.name, why)
            try:
                await self.stop(oldest.name, "ram-budget", why)
            except GpuschedError as e:
                log.warning("stopping %s for room in the RAM budget: %s", oldest.name, e)
