"""Start-up: read the truth (units, driver), classify each model, apply the saved record, recover."""

from __future__ import annotations

import asyncio
import logging

from .. import events, recovery
from ..checkpoint import CudaState
from ..errors import (
    InvalidArgs,
)
from ..events import EventKind
from ..model import ENDED, Model, State
from ..names import MODEL_UNIT_PREFIX, model_name_from_unit
from ..statefile import SavedTable
from ..units import UnitStatus
from .core import Core, _user_uid

log = logging.getLogger(__name__)

# A model found inconsistent on start: the model, the state recovery.target_for chose, why, its saved state.
_Pending = tuple[Model, State, str, State | None]


class Startup(Core):
    """Taking over the models when the daemon starts (docs/reliability.md)."""

    async def start(self) -> None:
        """Take over the models. The units and the driver are the truth; the saved table (statefile.py) is what
        only the daemon knew: a frozen model's VRAM per GPU and snapshot size, a transition under way, a swap, a
        Forget. A model caught in the middle of a transition is brought to a consistent state by the rules of
        recovery.target_for (docs/reliability.md) before the daemon serves anyone; a consistent one is not
        touched: nothing is started, stopped, frozen or thawed while taking it over. The steps, in order: read the
        truth, take over each live unit (classify it against its saved record), enter the models that ended while
        no daemon ran, finish the interrupted stops, recover the inconsistent models, finish the interrupted swaps."""
        self.units.watch(self._unit_changed)
        saved = self.state_file.load() if self.state_file is not None else SavedTable()
        live = await self._read_truth(saved)
        pending: list[_Pending] = []
        stops: list[str] = []
        for unit, status in live.items():
            taken = await self._take_over(unit, status, saved)
            if isinstance(taken, str):
                stops.append(taken)
            elif taken is not None:
                pending.append(taken)
        self._enter_ended_while_away(saved, live)
        for name in stops:
            log.warning("model %s: its stop was interrupted by a restart of gpuschedd: finishing it", name)
            await self.stop(name)
        # Those that end frozen first: they give VRAM back before the thaws need it.
        for model, target, why, before in sorted(pending, key=lambda p: p[1] != State.FROZEN):
            async with model.lock:
                await self._recover(model, target, why, before)
        for out, into in saved.swaps:
            await self._finish_swap(out, into)
        self._persist()

    async def _read_truth(self, saved: SavedTable) -> dict[str, UnitStatus]:
        """Every live unit that is, or was saved as, a model: ours by name, adopted ones (tracked again) by record."""
        live = {status.unit: status for status in await self.units.list_units(MODEL_UNIT_PREFIX)}
        for record in saved.models.values():
            if model_name_from_unit(record.unit) is None and record.state not in ENDED:
                self.units.track(record.unit)  # an adopted unit: watched like our own
            if record.unit not in live and record.state not in ENDED:
                status = await self.units.status(record.unit)
                if status is not None:
                    live[record.unit] = status
        return live

    def _claim(self, unit: str, status: UnitStatus, saved: SavedTable) -> tuple[str, Model | None] | None:
        """The model name of a live unit and its saved record, if the record is about this very run of the unit;
        None when the unit is not (or no longer) a model: not active, or told to Forget."""
        name = model_name_from_unit(unit) or next((n for n, r in saved.models.items() if r.unit == unit), None)
        if name is None or name in self.models or status.active_state not in ("active", "activating", "reloading"):
            return None
        if status.main_pid and saved.forgotten.get(unit) == status.main_pid:
            self._forgotten[unit] = status.main_pid  # still forgotten: not ours
            return None
        record = saved.models.get(name)
        if record is not None and (
            record.unit != unit or (record.main_pid and status.main_pid and record.main_pid != status.main_pid)
        ):
            record = None  # another unit, or a new run of the name: nothing saved is about it
        return name, record

    async def _take_over(self, unit: str, status: UnitStatus, saved: SavedTable) -> _Pending | str | None:
        """One live unit into the table. Returns its name when its stop must be finished, what _recover must do
        when it is inconsistent, else None."""
        claimed = self._claim(unit, status, saved)
        if claimed is None:
            return None
        name, record = claimed
        model = record or Model(name=name, unit=unit, owner=self._owner_of(status), command=list(status.command))
        self._apply_status(model, status)
        if record is not None and name in saved.stopping:
            self._add(model)  # as it was; its stop is finished before anything else is touched
            return name
        cuda = await self._found_cuda_states(model, status, record)
        truth = recovery.Truth(status.frozen, cuda)
        before = recovery.saved_state(record.state if record else None)
        target, why = recovery.target_for(before, truth)
        model.cuda_pids = [pid for pid in model.pids if pid in cuda] if not truth.running else []
        if not recovery.consistent(target, truth):
            # Shown in transition (every reader sees it is being worked on) until _recover ends it.
            model.state = State.THAWING if target == State.RUNNING else State.FREEZING
            self._add(model)
            return model, target, why, before
        await self._take_consistent(model, before, target, why)
        return None

    async def _take_consistent(self, model: Model, before: State | None, target: State, why: str) -> None:
        """A model found consistent enters the table as it is; one that moved while no daemon ran (a freeze or thaw
        finished, a frozen model found running) is reported."""
        model.state = target
        if target == State.RUNNING:
            model.snapshot_bytes = model.parked_bytes = 0
        self._add(model)
        if before in (State.FREEZING, State.THAWING) or (before == State.FROZEN and target == State.RUNNING):
            if before == State.FROZEN:
                await self.refresh(model, vram=True)  # its VRAM now, not the table's
            self._recovered(model, before, target, why, [])
        log.info("found %s (%s, %s)", model.unit, model.state, ",".join(map(str, model.pids)))

    def _enter_ended_while_away(self, saved: SavedTable, live: dict[str, UnitStatus]) -> None:
        """Saved models not taken over: ended ones as they were, live ones as the exits they had meanwhile."""
        for name, record in saved.models.items():
            if name in self.models:
                continue
            if record.state not in ENDED:
                self._ended(record, live.get(record.unit), away=True, stopped=name in saved.stopping)
            else:
                self._add(record)

    async def _found_cuda_states(self, model: Model, status: UnitStatus, record: Model | None) -> dict[int, CudaState]:
        """The driver state of each CUDA process of a unit found on start. The driver's GetState blocks on a
        process the cgroup freezer holds (measured on driver 580, H100): a model saved frozen and found frozen is
        read from the saved table and NVML, untouched; any other frozen unit is thawed for the question (a
        checkpointed process only blocks in its next CUDA call) and frozen again."""
        if not status.frozen or self.checkpoint.name == "none":
            cuda = await asyncio.to_thread(recovery.cuda_states, self.checkpoint, model.pids)
            return cuda if status.frozen else recovery.with_nvml(cuda, model.pids, set(self.telemetry.vram_by_pid()))
        if record is not None and record.state == State.FROZEN:
            kept = record.freeze_path == "agent-only"
            return recovery.frozen_cuda_states(model.pids, record.cuda_pids, set(self.telemetry.vram_by_pid()), kept)
        await self.units.thaw(model.unit)
        try:
            return await asyncio.to_thread(recovery.cuda_states, self.checkpoint, model.pids)
        finally:
            await self.units.freeze(model.unit)

    def _owner_of(self, status: UnitStatus) -> int:
        try:
            return _user_uid(status.user) if status.user else 0
        except InvalidArgs:
            log.warning("%s runs as unknown user %r: owned by root", status.unit, status.user)
            return 0

    async def _recover(self, model: Model, target: State, why: str, before: State | None) -> None:
        """Bring a model found inconsistent on start to `target` (or, if that cannot be done, the other state)."""
        frozen = target == State.FROZEN
        if not frozen:
            short = self._gpu_shortfall(model)
            if short is not None:
                frozen, why = True, f"{why.split(':')[0]}, but {short.message.split('; ', 1)[0]}: kept frozen"
        reached, errors = await self._settle(model, model.cuda_pids, frozen)
        if reached == State.RUNNING:
            model.cuda_pids, model.snapshot_bytes = [], 0
            await self.refresh(model, vram=True)
        self._set_state(model, reached)
        self._recovered(model, before, reached, why, errors)

    def _recovered(self, model: Model, before: State | None, reached: State, why: str, errors: list[str]) -> None:
        interrupted = {State.FREEZING: "freeze", State.THAWING: "thaw"}.get(before) if before else None
        if errors:
            why = f"{why}; it could not be done ({'; '.join(errors)}): the model is {reached}"
        if reached == State.RUNNING and (interrupted == "thaw" or (before == State.FROZEN and not errors)):
            kind = EventKind.THAW
        elif reached == State.FROZEN and not errors and before == State.FROZEN:
            kind = EventKind.FREEZE
        else:
            kind = EventKind.FAILURE
        log.warning("model %s: %s", model.name, why)
        self._emit(events.recovered(model, kind, why, interrupted or ""))

    async def _finish_swap(self, out: str, into: str) -> None:
        """A swap cut short by a restart is made both-or-neither: if the model to thaw is not running, the model
        that was frozen for it is thawed back; if both run (an overlapped swap whose freeze was undone), the model
        thawed for it is frozen again."""
        first, second = self.models.get(out), self.models.get(into)
        if second is not None and second.state == State.RUNNING:
            if first is not None and first.state == State.RUNNING:
                try:
                    await self.freeze(into, "swap-rollback", f"frozen again: the swap of {out} for it was cut short")
                except Exception as e:
                    log.error("swap %s -> %s interrupted by a restart; freezing %s again: %s", out, into, into, e)
                    return
                self._emit(events.swap_rolled_back(second, out, thawed_back=False))
            return
        if first is None or first.state != State.FROZEN:
            return
        try:
            await self.thaw(out)
        except Exception as e:
            log.error("swap %s -> %s interrupted by a restart; thawing %s back failed: %s", out, into, out, e)
            return
        self._emit(events.swap_rolled_back(first, into, thawed_back=True))
