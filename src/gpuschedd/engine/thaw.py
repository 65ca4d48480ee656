"""Thaw and migrate (swap.py puts a freeze and a thaw together)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeVar

from .. import events, recovery
from ..checkpoint import CheckpointError
from ..errors import (
    CheckpointFailed,
    GpuschedError,
    InsufficientGpuMemory,
    NotSupported,
)
from ..model import Model, State, require
from .core import Core, Requester, _find_gpu, _gpu_permutation

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Thawing(Core):
    """Thaw and Migrate."""

    def _drop_lost_pids(self, model: Model) -> None:
        """A CUDA process of a frozen model that ended while the unit lives on (one rank of a multi-process
        model): its snapshot is gone with it. Reported, and left out of the restore, which would fail on it."""
        lost = [pid for pid in model.cuda_pids if pid not in model.pids]
        if not lost or not model.pids:
            return
        share = model.snapshot_bytes * len(lost) // len(model.cuda_pids)
        model.cuda_pids = [pid for pid in model.cuda_pids if pid not in lost]
        model.snapshot_bytes -= share
        self._emit(events.lost_pids(model, lost, share))

    async def thaw(self, name: str, by: Requester | None = None) -> Model:
        """`by`: whose rights an eviction for the thaw has (default: the model owner's)."""
        model = self.get(name)
        if model.state == State.FROZEN and self.config.evict_on_thaw:
            await self._evict_for(model, lambda: self._gpu_shortfall(model), "the thaw", by or Requester(model.owner))
        async with model.lock:
            if model.state == State.RUNNING:
                return model
            require(model, "thaw")
            try:
                await self._thaw_locked(model)
            finally:
                self._thaw_reserved.pop(model.name, None)
        return model

    async def _thaw_locked(self, model: Model, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        """gpu_pairs: restore onto other GPUs (Migrate, which checked the target's room itself)."""
        t0 = time.monotonic()
        await self.refresh(model, quick=True)
        self._drop_lost_pids(model)
        moved = dict(gpu_pairs or [])
        if gpu_pairs is None:
            self._check_gpu_room(model, self._gpu_shortfall(model))
        self._check_swap_in(model)
        # No await since the check: nothing came between.
        self._thaw_reserved[model.name] = {moved.get(uuid, uuid): n for uuid, n in model.vram_by_gpu.items()}
        self._set_state(model, State.THAWING)
        reached, settled = State.FROZEN, False  # where a failure leaves the model
        in_swap, in_files = model.snapshot_in_swap(), model.snapshot_in_files()
        # Pages in swap are read ahead alongside the restore, not before it (docs/disk-tier.md has the figures).
        prefetch = asyncio.ensure_future(self._prefetch(model))
        try:
            # The driver's restore runs on a thread inside the target: thaw the cgroup first.
            await self.units.thaw(model.unit)
            try:
                if model.cuda_pids:  # no CUDA process: no worker thread to wake
                    # Agents with spill files start reading them meanwhile; both are waited for, so the links are
                    # idle again before anything else talks to them.
                    restore = asyncio.to_thread(
                        recovery.drive, self.checkpoint, model.cuda_pids, False, self.config.lock_timeout_ms, gpu_pairs
                    )
                    for outcome in await asyncio.gather(self._read_ahead(model), restore, return_exceptions=True):
                        if isinstance(outcome, BaseException):
                            raise outcome
            except CheckpointError as e:
                reached, errors = await self._settle(model, model.cuda_pids, frozen=True)
                settled = True
                raise CheckpointFailed(f"model {model.name}: {e}; {await self._left(model, reached, errors)}") from e
            await self._copy_in_turn(model)
            failed = await self._unpark(model)
            if failed:
                # A process is back on the GPU without its parked memory (the GPU filled up meanwhile): freeze
                # it again, memory still parked, so a later thaw finishes the job.
                reached, errors = await self._settle(model, model.cuda_pids, frozen=True)
                settled = True
                raise CheckpointFailed(f"model {model.name}: {failed}; {await self._left(model, reached, errors)}")
        except BaseException:
            if await self._ended_meanwhile(model):
                raise
            if not settled:
                try:
                    await self.units.freeze(model.unit)
                except GpuschedError as again:
                    log.error("thaw of %s failed, and freezing it again too: %s", model.name, again)
            if reached == State.RUNNING:
                model.cuda_pids = []
            self._set_state(model, reached)
            raise
        finally:
            await prefetch
        model.cuda_pids, model.swapped_bytes, model.spilled_bytes = [], 0, 0
        if moved:
            model.vram_by_gpu = dict(self._thaw_reserved[model.name])
            model.gpus = sorted({moved.get(uuid, uuid) for uuid in model.gpus})
        model.last_thaw_usec = int((time.monotonic() - t0) * 1e6)
        model.last_active_usec = self.now_usec()
        await self.refresh(model, vram=True, quick=True)
        self._set_state(model, State.RUNNING)
        self._emit(events.thawed(model, in_swap, in_files))

    async def migrate(self, name: str, gpu: str) -> Model:
        """Move a model onto another GPU: freeze it (if it runs), restore its processes there through the driver's
        GPU pairs, and run it. The target's room is checked first; if the restore fails, the model is settled
        frozen where it was and thaws there as before."""
        model = self.get(name)
        async with model.lock:
            require(model, "migrate")
            if self.checkpoint.name == "none":
                raise NotSupported("migration needs the CUDA checkpoint API (CheckpointBackend is none)")
            if model.state == State.FROZEN and model.freeze_path == "agent-only":
                raise NotSupported(
                    f"model {name!r} was frozen keeping its CUDA contexts on its GPU (KeepContext): thaw it, then"
                    " migrate it (a migration's freeze gives the GPU back)"
                )
            gpus = self.telemetry.gpus()
            target = _find_gpu(gpus, gpu)
            if model.state == State.RUNNING:
                await self.refresh(model, vram=True)
            sources = sorted(model.vram_by_gpu)
            if len(sources) != 1:
                raise NotSupported(
                    f"model {name!r} holds memory on {len(sources)} GPUs; migration moves a model from one GPU"
                    if sources
                    else f"model {name!r} holds no GPU memory that NVML can see: nothing to migrate"
                )
            need = 0 if sources[0] == target.uuid else model.vram_by_gpu[sources[0]]
            promised = sum(r.get(target.uuid, 0) for r in self._thaw_reserved.values())
            free = max(0, target.free_bytes - promised)
            if need > free:
                self._refuse(
                    model,
                    InsufficientGpuMemory(
                        f"migrating {name} needs {need} bytes free on GPU {target.index} ({target.uuid}); {free}"
                        f" free. The model stays {model.state} where it is."
                    ),
                )
            t0 = time.monotonic()
            if model.state == State.RUNNING:
                await self._freeze_locked(model, release_gpu=True)
            pairs = _gpu_permutation([g.uuid for g in gpus], sources[0], target.uuid)
            try:
                await self._thaw_locked(model, pairs)
            except CheckpointFailed as e:
                if model.state == State.FROZEN:
                    await self._move_back(model, e, pairs)
                raise
            finally:
                self._thaw_reserved.pop(model.name, None)
        self._emit(events.migrated(model, sources[0], target.index, target.uuid, int((time.monotonic() - t0) * 1e6)))
        return model

    async def _move_back(self, model: Model, error: CheckpointFailed, pairs: list[tuple[str, str]]) -> None:
        """A migration whose restore failed part-way was settled frozen, but the processes restored before the
        failure sit on the target GPU now: bring them back (the pairs swap two GPUs, so they are their own
        inverse), so the model is frozen where it was, whole."""
        cause, pids = error.__cause__, model.cuda_pids
        if isinstance(cause, CheckpointError) and cause.step == "restore" and cause.pid in pids:
            moved = pids[: pids.index(cause.pid)]
        else:
            moved = list(pids)
        if not moved:
            return
        try:
            await self.units.thaw(model.unit)
            for pid in moved:
                await asyncio.to_thread(self.checkpoint.restore, pid, pairs)
                await asyncio.to_thread(self.checkpoint.checkpoint, pid)
        except (CheckpointError, GpuschedError) as e:
            log.error("migration of %s failed, and so did moving pid(s) %s back: %s", model.name, moved, e)
        finally:
            await self.units.freeze(model.unit)
