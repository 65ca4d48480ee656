"""The engine's shared state and plumbing: the model table, listeners, the state file, unit events."""

from __future__ import annotations

import asyncio
import logging
import pwd
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import events, hostmem
from ..agentlink import AgentLink
from ..checkpoint import CheckpointBackend
from ..config import Config
from ..errors import (
    GpuschedError,
    InvalidArgs,
    ModelExists,
    NoSuchModel,
    Refused,
)
from ..events import EngineListener, Event, EventKind
from ..model import ENDED, Model, State, now_usec, transition
from ..names import model_name_from_unit
from ..statefile import StateFile
from ..telemetry import GpuInfo, GpuTelemetry
from ..units import PidsReader, UnitBackend, UnitStatus

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Requester:
    """Whom an automatic decision (an eviction, a stop for room in the RAM budget) is taken for. It only touches
    models this requester could have touched itself: its own, or every model with `any_model` (the bus layer
    sets it for root and for callers polkit allows `control-any`). The engine never asks polkit itself."""

    uid: int
    any_model: bool = False

    def may_touch(self, model: Model) -> bool:
        return self.any_model or model.owner == self.uid

    def __str__(self) -> str:
        return "the daemon" if self is DAEMON else f"uid {self.uid}"


# The policies that run on their own (idle freeze, frozen TTL) act as the daemon: on every model.
DAEMON = Requester(0, any_model=True)


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


def _gpu_permutation(all_gpus: list[str], old: str, new: str) -> list[tuple[str, str]]:
    """The driver's GPU pairs for moving from `old` to `new`: a permutation of every GPU of the host (old and new
    trade places, the rest map to themselves), so a process that can see several GPUs keeps a consistent
    view, and by UUID, never by index (CUDA_VISIBLE_DEVICES renumbers indices inside the process)."""
    swap = {old: new, new: old}
    return [(uuid, swap.get(uuid, uuid)) for uuid in all_gpus]


def _kept_bytes(model: Model) -> int:
    """What a model's command line and environment take, counted against its owner's MaxCommandBytesPerUser=."""
    return sum(len(arg.encode()) + 1 for arg in model.command) + model.environment_bytes


def _find_gpu(gpus: list[GpuInfo], gpu: str) -> GpuInfo:
    """The GPU a caller named by index or UUID; InvalidArgs when the host has none such."""
    found = next((g for g in gpus if gpu in (g.uuid, str(g.index))), None)
    if found is None:
        raise InvalidArgs(f"no GPU {gpu!r} on this host (give an index or a UUID from `gpusched status`)")
    return found


class Core:
    """What every concern shares: the model table, its listeners and state file, the backends, the unit events.
    Each concern of the package is a class over it; Engine (__init__.py) puts them together."""

    def __init__(
        self,
        units: UnitBackend,
        checkpoint: CheckpointBackend,
        telemetry: GpuTelemetry,
        config: Config,
        state_file: StateFile | None = None,
    ) -> None:
        self.units = units
        self.checkpoint = checkpoint
        self.telemetry = telemetry
        self.config = config
        self.models: dict[str, Model] = {}
        self._listeners: list[EngineListener] = []
        # The model table on disk (None: not kept, as in most unit tests); see statefile.py.
        self.state_file = state_file
        # Units told to Forget (unit → main PID), so a restart does not take them over again.
        self._forgotten: dict[str, int] = {}
        # Swaps under way (freeze name, thaw name): a restart completes "both or neither" from these.
        self._swaps: list[tuple[str, str]] = []
        # Overlapped swaps under way (outgoing model, incoming model, an event set once the outgoing model's agents
        # have copied out): swap.py staggers the agents' copies.
        self._copy_turns: list[tuple[str, str, asyncio.Event]] = []
        # Models being stopped: a restart finishes the stop (a frozen unit is thawed by systemd to be killed, and
        # must not be taken for a frozen model found half running).
        self._stopping: set[str] = set()
        # Re-checks of unit exits seen while a transition held the model's lock.
        self._tasks: set[asyncio.Task[None]] = set()
        # VRAM promised to thaws under way (model name → GPU UUID → bytes): NVML shows it only once restored, and
        # two thaws checked against the same free memory would both pass, and one restore would run out of it.
        self._thaw_reserved: dict[str, dict[str, int]] = {}
        # Open connections to the agents that parked a frozen model's memory (model name → one per process). A
        # park lasts as long as its connection; a daemon restart drops them and the agents unpark by themselves.
        self._parked: dict[str, list[AgentLink]] = {}
        # The agents' wait of a freeze or thaw under way (model name → task), and the models a Stop waits for: a
        # Stop cancels that wait instead of waiting behind it (_agent_wait).
        self._agent_waits: dict[str, asyncio.Future[Any]] = {}
        self._stop_requested: set[str] = set()
        # Unit exits seen while a transition held the model's lock (model name → status), until looked at again.
        self._exits_seen: dict[str, UnitStatus] = {}
        # Host memory probes; tests replace them to play a host short of RAM.
        self.mem_available: Callable[[], int] = hostmem.mem_available_bytes
        self.rss: Callable[[int], int] = hostmem.rss_bytes
        # Wall clock of the policies (idle time, frozen time to live); tests move it instead of sleeping.
        self.now_usec: Callable[[], int] = now_usec

    # ----------------------------------------------------------------- plumbing

    def add_listener(self, listener: EngineListener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        for listener in self._listeners:
            listener.event(event)

    def _persist(self) -> None:
        """Save the whole table (tmp + rename), without an await: one consistent picture, no model lock taken.
        A name reserved by a Run whose unit has not started yet (running, no process) is left out."""
        if self.state_file is None:
            return
        models = [m for m in self.models.values() if m.state != State.RUNNING or m.main_pid or m.pids]
        self.state_file.save(models, self._forgotten, self._swaps, self._stopping)

    def _set_state(self, model: Model, state: State) -> None:
        """Every transition of a model in the table: along an edge of model.TRANSITIONS, saved, announced."""
        transition(model, state)
        self._persist()
        for listener in self._listeners:
            listener.model_changed(model)

    def _add(self, model: Model) -> None:
        self.models[model.name] = model
        self._forgotten.pop(model.unit, None)
        self._persist()
        for listener in self._listeners:
            listener.model_added(model)

    def _remove(self, model: Model) -> None:
        if self.models.get(model.name) is model:
            del self.models[model.name]
            self._persist()
            for listener in self._listeners:
                listener.model_removed(model)

    async def drain(self, timeout: float) -> bool:
        """Wait until no transition is under way (no model's lock held), at most `timeout` seconds: a stopping
        daemon lets a freeze or thaw finish instead of cutting it in half. True when none is left."""
        deadline = time.monotonic() + timeout
        while any(m.lock.locked() for m in self.models.values()) or self._tasks:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def get(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NoSuchModel(f"no model named {name!r}")
        return model

    def _check_name_free(self, name: str, catalog: bool = False) -> None:
        """A new model may take `name`: no live model has it, and the model catalog does not define it (a catalog
        model is started by Start only: `catalog`). Without an await, so it holds until the caller's next await."""
        existing = self.models.get(name)
        if existing is not None and existing.state not in ENDED:
            raise ModelExists(f"model {name!r} exists ({existing.state})")
        if existing is not None and existing.catalog_digest and not catalog:
            raise ModelExists(f"model {name!r} is defined by the model catalog: start it with Start (gpusched start)")

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
        if model is None or model.state in ENDED:
            return
        if status.active_state not in ("inactive", "failed"):
            return
        if model.lock.locked():
            # A transition is under way (it may be failing because of this very exit): look again once it is over.
            self._exits_seen[model.name] = status
            self._spawn(lambda: self._recheck_exit(model, status))
            return
        self._ended(model, status)

    def _spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `work` as a task of its own (kept, so drain() waits for it); from a callback that cannot await."""
        try:
            task = asyncio.get_running_loop().create_task(work())
        except RuntimeError:  # no loop: nothing can hold a lock or wait on a unit either
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recheck_exit(self, model: Model, seen: UnitStatus) -> None:
        async with model.lock:
            self._exits_seen.pop(model.name, None)
            if self.models.get(model.name) is not model or model.state in ENDED:
                return  # the transition itself dealt with it (a Stop), or the model is gone
            try:
                status = await self.units.status(model.unit)
            except GpuschedError as e:
                log.warning("re-checking %s after its exit: %s", model.unit, e)
                status = seen
            if status is not None and status.active_state not in ("inactive", "failed"):
                return
            self._ended(model, status or seen)

    def _ended(self, model: Model, status: UnitStatus | None, away: bool = False, stopped: bool = False) -> None:
        """The model's unit ended by itself (`away`: while no daemon ran, so the saved record enters the table
        ended; `stopped`: a Stop was under way then, so it ended as asked). A frozen model's snapshot lived in its
        processes' memory: it is gone with them, and the host RAM it held is free again."""
        result = status.result if status is not None else "success"
        failed = not stopped and (result != "success" or (status is not None and status.active_state == "failed"))
        was = model.state
        released = model.snapshot_bytes if model.cuda_pids else 0
        self._drop_parked(model.name)
        model.clear_runtime()
        if away:
            transition(model, State.FAILED if failed else State.STOPPED)
            self._add(model)
        else:
            self._set_state(model, State.FAILED if failed else State.STOPPED)
        self._emit(events.ended(model, str(was), result, released, self._close_wake(model), away, stopped))

    async def refresh(self, model: Model, vram: bool = False, quick: bool = False) -> dict[int, dict[str, int]] | None:
        """Re-read PIDs of a live model, and its VRAM when it runs (or when `vram`: the last step of a thaw). Never
        mid-transition otherwise: half a thaw's VRAM must not become what the next thaw checks for. `quick`: the
        PIDs only (a freeze's first step), not the rest of the unit's status. Returns what NVML said of every
        process's VRAM, when it was asked (a freeze's scan uses it instead of asking again)."""
        if model.state in ENDED:
            return None
        if quick:
            if not await self._read_pids(model):
                return None
        else:
            status = await self.units.status(model.unit)
            if status is None:
                return None
            self._apply_status(model, status)
        if vram or model.state == State.RUNNING:
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
            return per_pid
        return None

    async def refresh_live(self) -> None:
        """Keep running models' Pids and VramBytes current between transitions (a model loads its weights after
        it starts; the daemon calls this every few seconds), and frozen models' bytes in swap (the kernel swaps a
        frozen snapshot out by itself under memory pressure, and the RAM budget counts only what is in RAM),
        announcing a change to the listeners (model_changed: the bus sends PropertiesChanged). A model in a
        transition is left to it."""
        for model in list(self.models.values()):
            if model.lock.locked():
                continue
            if model.state == State.FROZEN and model.cuda_pids:
                self._refresh_swapped(model)
            if model.state != State.RUNNING:
                continue
            before = (list(model.pids), model.vram_bytes)
            try:
                await self.refresh(model)
            except Exception as e:  # a unit that vanished mid-read is reported by its own exit event
                log.debug("refresh of %s: %s", model.name, e)
                continue
            if (model.pids, model.vram_bytes) != before:
                for listener in self._listeners:
                    listener.model_changed(model)

    async def _read_pids(self, model: Model) -> bool:
        """The unit's processes into the model, in one systemd call where the backend has one (`pids`), instead of
        a whole status (several): a freeze reads them twice. False when the unit is gone."""
        if not isinstance(self.units, PidsReader):
            status = await self.units.status(model.unit)
            if status is not None:
                self._apply_status(model, status)
            return status is not None
        pids = await self.units.pids(model.unit)
        if pids is not None:
            model.pids = pids
        return pids is not None

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
