"""The model table and its state machine.

running → freezing → frozen → thawing → running; stopped and failed end a model's life. Every transition of
one model holds that model's lock (never two at once, so opposite swaps cannot deadlock); readers never take
a lock, so status stays instant during a long freeze. The engine knows no D-Bus: it is driven by the bus
layer (or tests) and reports through listeners.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import hostmem
from .checkpoint import CheckpointBackend, CheckpointError, CudaState
from .config import Config
from .errors import (
    AccessDenied,
    CheckpointFailed,
    GpuschedError,
    InsufficientGpuMemory,
    InvalidArgs,
    InvalidState,
    ModelExists,
    NoSuchModel,
    RamBudgetExceeded,
    Refused,
)
from .events import Event, EventKind
from .model import ENDED, Model, State, now_usec
from .names import MODEL_UNIT_PREFIX, model_name_from_unit, model_unit, validate_model_name
from .telemetry import GpuTelemetry
from .units import UnitBackend, UnitSpec, UnitStatus

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    description: str = ""
    working_directory: str = ""
    environment: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    user: str = ""  # run as this user instead of the owner (the bus layer allows it only with `manage`)


class EngineListener:
    """Receives what the engine does. Override what you need; the defaults ignore everything."""

    def model_added(self, model: Model) -> None:
        pass

    def model_changed(self, model: Model) -> None:
        pass

    def model_removed(self, model: Model) -> None:
        pass

    def event(self, event: Event) -> None:
        pass


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise InvalidArgs(f"uid {uid} has no user name") from None


def _user_uid(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise InvalidArgs(f"no such user: {name}") from None


class Engine:
    def __init__(
        self,
        units: UnitBackend,
        checkpoint: CheckpointBackend,
        telemetry: GpuTelemetry,
        config: Config,
    ) -> None:
        self.units = units
        self.checkpoint = checkpoint
        self.telemetry = telemetry
        self.config = config
        self.models: dict[str, Model] = {}
        self._listeners: list[EngineListener] = []
        # Host memory probes; tests replace them to play a host short of RAM.
        self.mem_available: Callable[[], int] = hostmem.mem_available_bytes
        self.rss: Callable[[int], int] = hostmem.rss_bytes

    # ----------------------------------------------------------------- plumbing

    def add_listener(self, listener: EngineListener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            listener.event(event)

    def _set_state(self, model: Model, state: State) -> None:
        model.state = state
        model.state_change_usec = now_usec()
        for listener in self._listeners:
            listener.model_changed(model)

    def _add(self, model: Model) -> None:
        self.models[model.name] = model
        for listener in self._listeners:
            listener.model_added(model)

    def _remove(self, model: Model) -> None:
        if self.models.get(model.name) is model:
            del self.models[model.name]
            for listener in self._listeners:
                listener.model_removed(model)

    def get(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NoSuchModel(f"no model named {name!r}")
        return model

    async def _blocking(self, fn: Callable[..., object], *args: object) -> object:
        """Driver calls block for seconds: keep them off the event loop so status stays responsive."""
        return await asyncio.to_thread(fn, *args)

    # ----------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Take over the models that already run: the units are the truth, the daemon only remembers."""
        self.units.watch(self._unit_changed)
        for status in await self.units.list_units(MODEL_UNIT_PREFIX):
            name = model_name_from_unit(status.unit)
            if name is None or name in self.models:
                continue
            if status.active_state not in ("active", "activating", "reloading"):
                continue
            owner = _user_uid(status.user) if status.user else 0
            model = Model(name=name, unit=status.unit, owner=owner, command=list(status.command))
            self._apply_status(model, status)
            if status.frozen:
                model.state = State.FROZEN
                model.cuda_pids = await self._checkpointed_pids(model.pids)
            self._add(model)
            log.info("found %s (%s, %s)", status.unit, model.state, ",".join(map(str, model.pids)))

    async def _checkpointed_pids(self, pids: list[int]) -> list[int]:
        def scan() -> list[int]:
            found = []
            for pid in pids:
                try:
                    if self.checkpoint.state(pid) in (CudaState.LOCKED, CudaState.CHECKPOINTED):
                        found.append(pid)
                except CheckpointError:
                    pass
            return found

        return await asyncio.to_thread(scan)

    # ----------------------------------------------------------------- unit events

    def _apply_status(self, model: Model, status: UnitStatus) -> None:
        model.main_pid = status.main_pid
        model.pids = list(status.pids)

    def _unit_changed(self, status: UnitStatus) -> None:
        """A unit's active state moved: a model that exited or crashed is reported, not left running."""
        name = model_name_from_unit(status.unit)
        model = (
            self.models.get(name) if name else next((m for m in self.models.values() if m.unit == status.unit), None)
        )
        if model is None or model.state in ENDED or model.lock.locked():
            return
        if status.active_state not in ("inactive", "failed"):
            return
        failed = status.active_state == "failed" or status.result != "success"
        model.pids, model.main_pid = [], 0
        self._set_state(model, State.FAILED if failed else State.STOPPED)
        self._emit(
            Event(
                EventKind.EXIT,
                model.name,
                model.unit,
                f"model {model.name} exited ({status.result})",
                fields={"GPUSCHED_RESULT": status.result},
            )
        )

    async def refresh(self, model: Model) -> None:
        """Re-read PIDs and VRAM of a live model."""
        if model.state in ENDED:
            return
        status = await self.units.status(model.unit)
        if status is None:
            return
        self._apply_status(model, status)
        # THAWING too: the thaw's last step re-reads what the restored processes hold.
        if model.state in (State.RUNNING, State.THAWING):
            per_pid = self.telemetry.vram_by_pid()
            by_gpu: dict[str, int] = {}
            for pid in model.pids:
                for uuid, used in per_pid.get(pid, {}).items():
                    by_gpu[uuid] = by_gpu.get(uuid, 0) + used
            model.vram_by_gpu = by_gpu
            model.vram_bytes = sum(by_gpu.values())
            gpus = sorted({uuid for pid in model.pids for uuid in per_pid.get(pid, {})})
            if gpus:
                model.gpus = gpus

    # ----------------------------------------------------------------- run / stop

    async def run(self, name: str, argv: list[str], options: RunOptions, owner: int) -> Model:
        validate_model_name(name)
        if not argv:
            raise InvalidArgs("argv must not be empty")
        existing = self.models.get(name)
        if existing is not None and existing.state not in ENDED:
            raise ModelExists(f"model {name!r} exists ({existing.state})")
        if owner < 0:
            raise AccessDenied("unknown caller")
        user = options.user or (_user_name(owner) if owner != 0 else "")
        uid = _user_uid(user) if user else owner
        if owner != 0 and (not user or uid == 0):
            # The bus layer allows User= only with `manage`; this holds even if that check ever goes wrong:
            # a caller that is not root never gets a process running as root (any name with uid 0 included).
            raise AccessDenied("only root may run a model as root")
        environment = list(options.environment)
        if options.gpus:
            environment.append("CUDA_VISIBLE_DEVICES=" + ",".join(options.gpus))
        spec = UnitSpec(
            unit=model_unit(name),
            argv=list(argv),
            description=options.description or f"gpusched model {name}",
            working_directory=options.working_directory,
            environment=environment,
            user=user,
        )
        model = Model(name=name, unit=spec.unit, owner=uid, command=list(argv), gpus=list(options.gpus))
        async with model.lock:
            if existing is not None:
                self._remove(existing)
            # Reserve the name before awaiting, so two concurrent Runs of one name cannot both start.
            if name in self.models:
                raise ModelExists(f"model {name!r} exists")
            self.models[name] = model
            t0 = time.monotonic()
            try:
                status = await self.units.start(spec)
            except BaseException:
                del self.models[name]
                raise
            self._apply_status(model, status)
            del self.models[name]
            self._add(model)
        self._emit(
            Event(
                EventKind.RUN,
                name,
                spec.unit,
                f"model {name} started as {spec.unit}",
                duration_usec=int((time.monotonic() - t0) * 1e6),
            )
        )
        if status.active_state in ("inactive", "failed"):
            # It ran and ended before the start returned: report it like any exit.
            self._unit_changed(status)
        return model

    async def stop(self, name: str) -> None:
        model = self.get(name)
        async with model.lock:
            if model.state in ENDED:
                return
            t0 = time.monotonic()
            # A frozen unit is stopped as it is: systemd thaws it to deliver the kill, and a checkpointed
            # CUDA process dies like any other, releasing its host-RAM snapshot with it.
            await self.units.stop(model.unit)
            model.pids, model.main_pid, model.cuda_pids = [], 0, []
            model.snapshot_bytes = model.vram_bytes = 0
            self._set_state(model, State.STOPPED)
        self._emit(
            Event(
                EventKind.STOP,
                name,
                model.unit,
                f"model {name} stopped",
                duration_usec=int((time.monotonic() - t0) * 1e6),
            )
        )

    async def forget(self, name: str) -> None:
        """Stop managing a model; its unit keeps running, untouched."""
        model = self.get(name)
        async with model.lock:
            if model.state in (State.FROZEN, State.FREEZING, State.THAWING):
                raise InvalidState(f"model {name!r} is {model.state}: thaw it before forgetting it")
            self._remove(model)
        self._emit(Event(EventKind.FORGET, name, model.unit, f"model {name} forgotten; its unit runs on"))

    # ----------------------------------------------------------------- freeze / thaw

    async def freeze(self, name: str) -> Model:
        model = self.get(name)
        async with model.lock:
            if model.state == State.FROZEN:
                return model
            if model.state != State.RUNNING:
                raise InvalidState(f"model {name!r} is {model.state}, not running")
            await self._freeze_locked(model)
        return model

    async def _freeze_locked(self, model: Model) -> None:
        t0 = time.monotonic()
        await self.refresh(model)
        self._check_ram(model)
        self._set_state(model, State.FREEZING)
        try:
            try:
                cuda = await asyncio.to_thread(self.checkpoint.cuda_pids, model.pids)
            except CheckpointError as e:
                raise CheckpointFailed(f"model {model.name}: {e}; nothing was changed") from e
            unseen = sorted((set(model.pids) & set(self.telemetry.vram_by_pid())) - set(cuda))
            if unseen and self.checkpoint.name != "none":
                raise CheckpointFailed(
                    f"model {model.name}: pid {unseen[0]} holds VRAM (NVML) but the checkpoint backend cannot see"
                    " its CUDA context; nothing was changed"
                )
            rss_before = sum(map(self.rss, cuda))
            await self._checkpoint_all(model, cuda)
            # The snapshot lives in the targets' own memory: its size is their RSS growth. Where that does not
            # show (RSS not readable), the VRAM NVML saw is the estimate.
            grown = sum(map(self.rss, cuda)) - rss_before
            model.snapshot_bytes = grown if grown > 0 else (model.vram_bytes if cuda else 0)
            try:
                await self.units.freeze(model.unit)
            except BaseException:
                await self._restore_all(model, cuda, rollback=True)
                raise
        except BaseException:
            self._set_state(model, State.RUNNING)
            raise
        model.cuda_pids = cuda
        model.last_freeze_usec = int((time.monotonic() - t0) * 1e6)
        self._set_state(model, State.FROZEN)
        self._emit(
            Event(
                EventKind.FREEZE,
                model.name,
                model.unit,
                f"model {model.name} frozen in {model.last_freeze_usec / 1e6:.3f}s"
                f" ({len(cuda)} CUDA process(es), backend {self.checkpoint.name})",
                duration_usec=model.last_freeze_usec,
                bytes=model.snapshot_bytes,
                gpus=tuple(model.gpus),
            )
        )

    def ram_frozen_bytes(self) -> int:
        """Host RAM held by the snapshots of frozen (or freezing, thawing) models."""
        return sum(m.snapshot_bytes for m in self.models.values() if m.cuda_pids)

    def _refuse(self, model: Model, error: GpuschedError) -> None:
        self._emit(
            Event(EventKind.REFUSAL, model.name, model.unit, error.message, fields={"GPUSCHED_ERROR": error.dbus_name})
        )
        error.journaled = True
        raise error

    def report_error(self, error: GpuschedError, name: str, message: str, fields: dict[str, str]) -> None:
        """A call answered with `error` (by the bus layer) becomes one event: kind refusal when nothing was done,
        failure when it was tried and did not work; unless the engine already reported that error itself."""
        if error.journaled:
            return
        error.journaled = True
        model = self.models.get(name)
        kind = EventKind.REFUSAL if isinstance(error, Refused) else EventKind.FAILURE
        fields = {"GPUSCHED_ERROR": error.dbus_name, **fields}
        self._emit(Event(kind, name, model.unit if model else "", message, fields=fields))

    def _check_ram(self, model: Model) -> None:
        """Refuse a freeze whose snapshot would not fit the RAM budget or the kernel's MemAvailable. The snapshot
        is estimated by the VRAM NVML sees (it also counts the context, so it errs on the safe side)."""
        need = model.vram_bytes
        if need <= 0:
            return  # nothing on a GPU (or no telemetry): the freeze copies nothing into RAM
        frozen, budget = self.ram_frozen_bytes(), self.config.ram_budget_bytes
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

    def _check_gpu_room(self, model: Model) -> None:
        """Refuse a thaw that would not fit: a restore that runs out of VRAM leaves the process unrecoverable
        (cuda-checkpoint issue 44), so this is checked before anything moves."""
        if not model.cuda_pids or not model.vram_by_gpu:
            return
        gpus = {g.uuid: g for g in self.telemetry.gpus()}
        if not gpus:
            log.warning("thaw of %s: no GPU telemetry, cannot check free VRAM", model.name)
            return
        for uuid, need in sorted(model.vram_by_gpu.items()):
            gpu = gpus.get(uuid)
            free = gpu.free_bytes if gpu else 0
            if need > free:
                where = f"GPU {gpu.index} ({uuid})" if gpu else f"GPU {uuid}, which is not present"
                error = InsufficientGpuMemory(
                    f"thawing {model.name} needs {need} bytes free on {where}; {free} free. The model stays frozen."
                )
                error.needed, error.free, error.gpu = need, free, uuid  # type: ignore[attr-defined]
                self._refuse(model, error)

    async def _checkpoint_all(self, model: Model, pids: list[int]) -> None:
        """Lock every PID, then checkpoint every PID. On any failure, put every PID back as it was."""
        locked: list[int] = []
        checkpointed: list[int] = []
        try:
            for pid in pids:
                await asyncio.to_thread(self.checkpoint.lock, pid, self.config.lock_timeout_ms)
                locked.append(pid)
            for pid in pids:
                await asyncio.to_thread(self.checkpoint.checkpoint, pid)
                checkpointed.append(pid)
        except CheckpointError as e:
            undone = await self._undo(checkpointed, locked)
            outcome = (
                "every process was rolled back to running"
                if not undone
                else f"rolling back failed too ({'; '.join(undone)}): the model may need a restart"
            )
            raise CheckpointFailed(f"model {model.name}: {e}; {outcome}") from e

    async def _undo(self, checkpointed: list[int], locked: list[int]) -> list[str]:
        """Restore what was checkpointed, unlock what was locked; returns what could not be undone."""
        failures = []
        for pid in checkpointed:
            try:
                await asyncio.to_thread(self.checkpoint.restore, pid, None)
            except CheckpointError as e:
                log.error("rollback: %s", e)
                failures.append(str(e))
        for pid in locked:
            try:
                await asyncio.to_thread(self.checkpoint.unlock, pid)
            except CheckpointError as e:
                log.error("rollback: %s", e)
                failures.append(str(e))
        return failures

    async def _restore_all(self, model: Model, pids: list[int], rollback: bool = False) -> None:
        """Restore every PID, then unlock every PID."""
        restored: list[int] = []
        try:
            for pid in pids:
                await asyncio.to_thread(self.checkpoint.restore, pid, None)
                restored.append(pid)
            for pid in pids:
                await asyncio.to_thread(self.checkpoint.unlock, pid)
        except CheckpointError as e:
            if rollback:
                log.error("rollback of %s: %s", model.name, e)
                return
            # Put the restored ones back to sleep so the model is consistently frozen again.
            for pid in restored:
                try:
                    await asyncio.to_thread(self.checkpoint.checkpoint, pid)
                except CheckpointError as again:
                    log.error("re-checkpoint after failed restore: %s", again)
            raise CheckpointFailed(f"model {model.name}: {e}; the model stays frozen") from e

    async def thaw(self, name: str) -> Model:
        model = self.get(name)
        async with model.lock:
            if model.state == State.RUNNING:
                return model
            if model.state != State.FROZEN:
                raise InvalidState(f"model {name!r} is {model.state}, not frozen")
            await self._thaw_locked(model)
        return model

    async def _thaw_locked(self, model: Model) -> None:
        t0 = time.monotonic()
        self._check_gpu_room(model)
        self._set_state(model, State.THAWING)
        try:
            # The driver's restore runs on a thread inside the target: thaw the cgroup first.
            await self.units.thaw(model.unit)
            try:
                await self._restore_all(model, model.cuda_pids)
            except BaseException:
                await self.units.freeze(model.unit)
                raise
        except BaseException:
            self._set_state(model, State.FROZEN)
            raise
        model.cuda_pids = []
        model.last_thaw_usec = int((time.monotonic() - t0) * 1e6)
        await self.refresh(model)
        self._set_state(model, State.RUNNING)
        self._emit(
            Event(
                EventKind.THAW,
                model.name,
                model.unit,
                f"model {model.name} thawed in {model.last_thaw_usec / 1e6:.3f}s",
                duration_usec=model.last_thaw_usec,
                bytes=model.snapshot_bytes,
                gpus=tuple(model.gpus),
            )
        )

    async def swap(self, freeze_name: str, thaw_name: str) -> None:
        """Freeze one model and thaw another: both or neither. If the thaw fails, the first is thawed back."""
        if freeze_name == thaw_name:
            raise InvalidArgs("swap needs two different models")
        out, into = self.get(freeze_name), self.get(thaw_name)
        if into.state not in (State.FROZEN, State.RUNNING):
            raise InvalidState(f"model {thaw_name!r} is {into.state}, not frozen")
        if out.state not in (State.FROZEN, State.RUNNING):
            raise InvalidState(f"model {freeze_name!r} is {out.state}, not running")
        t0 = time.monotonic()
        await self.freeze(freeze_name)
        try:
            await self.thaw(thaw_name)
        except BaseException:
            try:
                await self.thaw(freeze_name)
            except Exception as e:  # the original error is the one the caller needs
                log.error("swap rollback: thawing %s failed: %s", freeze_name, e)
            raise
        self._emit(
            Event(
                EventKind.SWAP,
                thaw_name,
                into.unit,
                f"swapped {freeze_name} out and {thaw_name} in",
                duration_usec=int((time.monotonic() - t0) * 1e6),
                fields={"GPUSCHED_SWAP_OUT": freeze_name},
            )
        )
