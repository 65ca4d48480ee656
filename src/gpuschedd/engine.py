"""The model table and its state machine.

running → freezing → frozen → thawing → running; stopped and failed end a model's life. Every transition of
one model holds that model's lock (never two at once, so opposite swaps cannot deadlock); readers never take
a lock, so status stays instant during a long freeze. The engine knows no D-Bus: it is driven by the bus
layer (or tests) and reports through listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from . import adopt, hostmem, recovery
from .agent.protocol import AGENT_DIR_ENV, DAEMON_UID_ENV
from .agentlink import GRACE_S, AgentFailed, AgentLink
from .checkpoint import CheckpointBackend, CheckpointError, CudaState
from .config import Config
from .errors import (
    AccessDenied,
    CheckpointFailed,
    GpuschedError,
    InsufficientGpuMemory,
    InvalidArgs,
    InvalidState,
    LimitExceeded,
    ModelExists,
    NoSuchModel,
    NotSupported,
    RamBudgetExceeded,
    Refused,
)
from .events import EngineListener, Event, EventKind
from .model import ENDED, Model, State, now_usec
from .names import MODEL_UNIT_PREFIX, model_name_from_unit, model_unit, validate_model_name
from .options import Policies, RunOptions
from .statefile import SavedTable, StateFile
from .telemetry import GpuInfo, GpuTelemetry
from .units import UnitBackend, UnitSpec, UnitStatus

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


class Engine:
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
        model.state = state
        model.state_change_usec = now_usec()
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

    # ----------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Take over the models. The units and the driver are the truth; the saved table (statefile.py) is what
        only the daemon knew: a frozen model's VRAM per GPU and snapshot size, a transition under way, a swap, a
        Forget. A model caught in the middle of a transition is brought to a consistent state by the rules of
        recovery.target_for (docs/reliability.md) before the daemon serves anyone; a consistent one is not
        touched: nothing is started, stopped, frozen or thawed while taking it over."""
        self.units.watch(self._unit_changed)
        saved = self.state_file.load() if self.state_file is not None else SavedTable()
        live = {status.unit: status for status in await self.units.list_units(MODEL_UNIT_PREFIX)}
        for record in saved.models.values():
            if model_name_from_unit(record.unit) is None and record.state not in ENDED:
                self.units.track(record.unit)  # an adopted unit: watched like our own
            if record.unit not in live and record.state not in ENDED:
                status = await self.units.status(record.unit)
                if status is not None:
                    live[record.unit] = status
        pending: list[tuple[Model, State, str, State | None]] = []
        stops: list[str] = []
        for unit, status in live.items():
            name = model_name_from_unit(unit) or next((n for n, r in saved.models.items() if r.unit == unit), None)
            if name is None or name in self.models or status.active_state not in ("active", "activating", "reloading"):
                continue
            if status.main_pid and saved.forgotten.get(unit) == status.main_pid:
                self._forgotten[unit] = status.main_pid  # still forgotten: not ours
                continue
            record = saved.models.get(name)
            if record is not None and (
                record.unit != unit or (record.main_pid and status.main_pid and record.main_pid != status.main_pid)
            ):
                record = None  # another unit, or a new run of the name: nothing saved is about it
            model = record or Model(name=name, unit=unit, owner=self._owner_of(status), command=list(status.command))
            self._apply_status(model, status)
            if record is not None and name in saved.stopping:
                self._add(model)  # as it was; its stop is finished below, before anything else is touched
                stops.append(name)
                continue
            cuda = await self._found_cuda_states(model, status, record)
            truth = recovery.Truth(status.frozen, cuda)
            before = recovery.saved_state(record.state if record else None)
            target, why = recovery.target_for(before, truth)
            model.cuda_pids = [pid for pid in model.pids if pid in cuda] if not truth.running else []
            if recovery.consistent(target, truth):
                model.state = target
                if target == State.RUNNING:
                    model.snapshot_bytes = model.parked_bytes = 0
                self._add(model)
                if before in (State.FREEZING, State.THAWING) or (before == State.FROZEN and target == State.RUNNING):
                    if before == State.FROZEN:
                        await self.refresh(model, vram=True)  # its VRAM now, not the table's
                    self._recovered(model, before, target, why, [])
                log.info("found %s (%s, %s)", unit, model.state, ",".join(map(str, model.pids)))
            else:
                # Shown in transition (every reader sees it is being worked on) until _recover ends it.
                model.state = State.THAWING if target == State.RUNNING else State.FREEZING
                self._add(model)
                pending.append((model, target, why, before))
        for name, record in saved.models.items():
            if name in self.models:
                continue
            if record.state not in ENDED:
                self._ended_while_away(record, live.get(record.unit), stopped=name in saved.stopping)
            else:
                self._add(record)
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

    def _ended_while_away(self, model: Model, status: UnitStatus | None, stopped: bool = False) -> None:
        """A saved model whose unit ended while no daemon ran: reported like any exit, its snapshot released
        (`stopped`: a Stop was under way, so it ended as asked)."""
        result = status.result if status is not None else "success"
        failed = not stopped and (result != "success" or (status is not None and status.active_state == "failed"))
        released = model.snapshot_bytes if model.cuda_pids else 0
        was = model.state
        model.pids, model.main_pid, model.cuda_pids = [], 0, []
        model.snapshot_bytes = model.vram_bytes = 0
        model.state = State.FAILED if failed else State.STOPPED
        model.state_change_usec = now_usec()
        self._add(model)
        self._emit(
            Event(
                EventKind.STOP if stopped else EventKind.EXIT,
                model.name,
                model.unit,
                f"model {model.name} "
                + ("stopped" if stopped else "ended")
                + f" while gpuschedd was not running (it was {was}; result {result})"
                + (f"; {released} bytes of host RAM released" if released else "")
                + self._close_wake(model),
                bytes=released,
                fields={"GPUSCHED_RESULT": result, "GPUSCHED_STATE_BEFORE": str(was)},
            )
        )

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
        fields = {"GPUSCHED_RECOVERY": "1"}
        if interrupted:
            fields["GPUSCHED_INTERRUPTED"] = interrupted
        log.warning("model %s: %s", model.name, why)
        self._emit(Event(kind, model.name, model.unit, f"model {model.name}: {why}", fields=fields))

    async def _finish_swap(self, out: str, into: str) -> None:
        """A swap cut short by a restart is made both-or-neither: if the model to thaw is not running, the model
        that was frozen for it is thawed back."""
        first, second = self.models.get(out), self.models.get(into)
        if second is not None and second.state == State.RUNNING:
            return
        if first is None or first.state != State.FROZEN:
            return
        try:
            await self.thaw(out)
        except Exception as e:
            log.error("swap %s -> %s interrupted by a restart; thawing %s back failed: %s", out, into, out, e)
            return
        self._emit(
            Event(
                EventKind.FAILURE,
                out,
                first.unit,
                f"swap of {out} for {into} was interrupted by a restart of gpuschedd: {out} thawed back",
                fields={"GPUSCHED_RECOVERY": "1", "GPUSCHED_INTERRUPTED": "swap", "GPUSCHED_SWAP_IN": into},
            )
        )

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

    def _ended(self, model: Model, status: UnitStatus) -> None:
        """The model's unit ended by itself. A frozen model's snapshot lived in its processes' memory: it is gone
        with them, and the host RAM it held is free again."""
        failed = status.active_state == "failed" or status.result != "success"
        was = model.state
        released = model.snapshot_bytes if model.cuda_pids else 0
        self._drop_parked(model.name)
        model.pids, model.main_pid, model.cuda_pids = [], 0, []
        model.snapshot_bytes = model.vram_bytes = model.parked_bytes = 0
        self._set_state(model, State.FAILED if failed else State.STOPPED)
        message = f"model {model.name} exited ({status.result})"
        if was != State.RUNNING:
            message += f" while {was}"
        if released:
            message += f"; its snapshot is lost and {released} bytes of host RAM were released"
        message += self._close_wake(model)
        self._emit(
            Event(
                EventKind.EXIT,
                model.name,
                model.unit,
                message,
                bytes=released,
                fields={"GPUSCHED_RESULT": status.result, "GPUSCHED_STATE_BEFORE": str(was)},
            )
        )

    async def refresh(self, model: Model, vram: bool = False, quick: bool = False) -> None:
        """Re-read PIDs of a live model, and its VRAM when it runs (or when `vram`: the last step of a thaw). Never
        mid-transition otherwise: half a thaw's VRAM must not become what the next thaw checks for. `quick`: the
        PIDs only (a freeze's first step), not the rest of the unit's status."""
        if model.state in ENDED:
            return
        if quick:
            if not await self._read_pids(model):
                return
        else:
            status = await self.units.status(model.unit)
            if status is None:
                return
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

    async def _read_pids(self, model: Model) -> bool:
        """The unit's processes into the model, in one systemd call where the backend has one (`pids`), instead of
        a whole status (several): a freeze reads them twice. False when the unit is gone."""
        read = getattr(self.units, "pids", None)
        if read is None:
            status = await self.units.status(model.unit)
            if status is not None:
                self._apply_status(model, status)
            return status is not None
        pids = await read(model.unit)
        if pids is not None:
            model.pids = pids
        return pids is not None

    # ----------------------------------------------------------------- run / stop

    async def run(
        self, name: str, argv: list[str], options: RunOptions, owner: int, by: Requester | None = None
    ) -> Model:
        """`by`: whose rights an eviction for the start has (default: the owner's own models only)."""
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
        if options.keep_context and not options.agent:
            raise InvalidArgs("KeepContext needs Agent: only a model whose agents park its memory keeps its contexts")
        environment = list(options.environment)
        if options.gpus:
            environment.append("CUDA_VISIBLE_DEVICES=" + ",".join(options.gpus))
        agent_dir = os.path.join(self.config.agent_root, name) if options.agent else ""
        if agent_dir:
            environment += [f"{AGENT_DIR_ENV}={agent_dir}", f"{DAEMON_UID_ENV}={os.geteuid()}"]
        spec = UnitSpec(
            unit=model_unit(name),
            argv=list(argv),
            description=options.description or f"gpusched model {name}",
            working_directory=options.working_directory,
            environment=environment,
            user=user,
            runtime_directory=agent_dir,
        )
        model = Model(
            name=name,
            unit=spec.unit,
            owner=uid,
            command=list(argv),
            gpus=list(options.gpus),
            port=options.port,
            backend_port=options.backend_port,
            listen_address=options.listen_address,
            agent=options.agent,
            keep_context=options.keep_context,
            environment_bytes=sum(len(entry.encode()) + 1 for entry in options.environment),
        )
        self._set_policies(model, options)
        start_wake = getattr(self.units, "start_wake", None)
        if options.port and start_wake is None:
            raise InvalidArgs(f"Port needs the systemd unit backend, not {self.units.name}")
        shortfall = self._start_shortfall(model, options)
        if self.config.evict_on_thaw:
            await self._evict_for(model, shortfall, "the start", by or Requester(owner))
        self._check_gpu_room(model, shortfall())
        t0 = time.monotonic()
        status = await self._admit(model, lambda: self.units.start(spec), owner)
        if options.port and start_wake is not None:
            try:
                await start_wake(name, options.port, options.backend_port, user, options.listen_address)
            except BaseException:
                await self.stop(name)
                raise
        self._announce(
            status,
            Event(
                EventKind.RUN,
                name,
                spec.unit,
                f"model {name} started as {spec.unit}",
                duration_usec=int((time.monotonic() - t0) * 1e6),
            ),
        )
        return model

    def _set_policies(self, model: Model, policies: Policies) -> None:
        """A new model's policies; its idle time starts now."""
        model.priority = policies.priority
        model.idle_freeze_sec = policies.idle_freeze_sec
        model.frozen_ttl_sec = policies.frozen_ttl_sec
        model.last_active_usec = self.now_usec()

    async def _admit(self, model: Model, start: Callable[[], Awaitable[UnitStatus]], caller: int) -> UnitStatus:
        """Enter a new model in the table around the start of its unit. The name is reserved before the first
        await, so two concurrent calls for one name cannot both start (nor two calls of one user both pass its
        limits); a start that fails leaves no trace. An ended model of the same name is replaced."""
        async with model.lock:
            existing = self.models.get(model.name)
            if existing is not None and existing.state not in ENDED:
                raise ModelExists(f"model {model.name!r} exists ({existing.state})")
            self._check_limits(model, caller)
            if existing is not None:
                self._remove(existing)
            self.models[model.name] = model
            try:
                status = await start()
            except BaseException:
                del self.models[model.name]
                raise
            self._apply_status(model, status)
            del self.models[model.name]
            self._add(model)
        return status

    def _check_limits(self, model: Model, caller: int) -> None:
        """Refuse a new model past its owner's limits (MaxModelsPerUser=, MaxCommandBytesPerUser=), counting every
        model of the owner in the table, ended ones too, except an ended model of the same name that the new one
        replaces. Root is exempt. Without an await, so it holds until the caller's next await."""
        if caller == 0:
            return
        mine = [m for m in self.models.values() if m.owner == model.owner and m.name != model.name]
        most, most_bytes = self.config.max_models_per_user, self.config.max_command_bytes_per_user
        if most and len(mine) >= most:
            self._refuse(
                model,
                LimitExceeded(
                    f"uid {model.owner} has {len(mine)} models, the most MaxModelsPerUser= allows: stop and forget"
                    " one first (ended models are dropped EndedModelTTLSec= after they end). Nothing was started."
                ),
            )
        kept = sum(_kept_bytes(m) for m in mine)
        if most_bytes and kept + _kept_bytes(model) > most_bytes:
            self._refuse(
                model,
                LimitExceeded(
                    f"model {model.name}'s argv and Environment ({_kept_bytes(model)} bytes) with those of uid"
                    f" {model.owner}'s other models ({kept} bytes) exceed MaxCommandBytesPerUser={most_bytes}."
                    " Nothing was started."
                ),
            )

    def _announce(self, status: UnitStatus, event: Event) -> None:
        """The event of a new model; then, if it already ended before its start returned, its exit like any."""
        self._emit(event)
        if status.active_state in ("inactive", "failed"):
            self._unit_changed(status)

    async def stop(self, name: str, reason: str = "", why: str = "") -> None:
        """`reason` and `why`: a stop the daemon decided itself (a policy), said in its event."""
        model = self.get(name)
        async with self._cutting_agent_waits(name), model.lock:
            if model.state in ENDED:
                return
            t0 = time.monotonic()
            # A frozen unit is stopped as it is: systemd thaws it to deliver the kill, and a checkpointed
            # CUDA process dies like any other, releasing its host-RAM snapshot with it.
            self._stopping.add(name)
            self._persist()
            try:
                await self._stop_wake(name)
                await self.units.stop(model.unit)
            finally:
                self._stopping.discard(name)
            self._drop_parked(name)
            model.pids, model.main_pid, model.cuda_pids = [], 0, []
            model.snapshot_bytes = model.vram_bytes = model.parked_bytes = 0
            self._set_state(model, State.STOPPED)
        self._emit(
            Event(
                EventKind.STOP,
                name,
                model.unit,
                f"model {name} stopped" + (f": {why}" if why else ""),
                duration_usec=int((time.monotonic() - t0) * 1e6),
                fields={"GPUSCHED_REASON": reason} if reason else {},
            )
        )

    @contextlib.asynccontextmanager
    async def _cutting_agent_waits(self, name: str) -> AsyncIterator[None]:
        """While a Stop waits for the model and runs: a freeze or thaw waiting on the model's agents gives up at
        once (_agent_wait), rather than the Stop waiting behind it for the agents' deadline."""
        self._stop_requested.add(name)
        wait = self._agent_waits.get(name)
        if wait is not None:
            wait.cancel()
        try:
            yield
        finally:
            self._stop_requested.discard(name)

    def _close_wake(self, model: Model) -> str:
        """A model that ended by itself takes its public port with it: the proxy would keep every client waiting
        for a model that never runs again (a new Run of the name opens the port again). Returns what the exit's
        event says about it."""
        if not model.port:
            return ""

        async def close() -> None:
            if self.models.get(model.name) is not model or model.state not in ENDED:
                return  # the name was run again meanwhile: its wake units are the new model's
            try:
                await self._stop_wake(model.name)
            except GpuschedError as e:
                log.warning("closing the public port of %s, which ended: %s", model.name, e)

        self._spawn(close)
        return f"; its public port {model.port} is closed"

    async def _stop_wake(self, name: str) -> None:
        """Stop a model's wake-on-connection socket and proxy, if it has them (none: nothing happens)."""
        stop_wake = getattr(self.units, "stop_wake", None)
        if stop_wake is not None:
            await stop_wake(name)

    async def forget(self, name: str) -> None:
        """Stop managing a model; its unit keeps running, untouched."""
        model = self.get(name)
        async with model.lock:
            if model.state in (State.FROZEN, State.FREEZING, State.THAWING):
                raise InvalidState(f"model {name!r} is {model.state}: thaw it before forgetting it")
            self._persist()  # a retry now: a Forget the table cannot keep would be undone by a restart
            if self.state_file is not None and self.state_file.error:
                raise GpuschedError(f"cannot forget {name!r} now: {self.state_file.error}")
            await self._stop_wake(name)  # its public port goes: nobody would thaw it any more
            if model.state not in ENDED and model.main_pid:
                self._forgotten[model.unit] = model.main_pid  # a restart must not take it over again
            self._remove(model)
            if model_name_from_unit(model.unit) is None:
                self.units.untrack(model.unit)
        runs_on = "" if model.state in ENDED else "; its unit runs on"
        self._emit(Event(EventKind.FORGET, name, model.unit, f"model {name} forgotten{runs_on}"))

    # ----------------------------------------------------------------- adopt

    def _check_new_model(self, name: str, unit: str, pids: list[int]) -> None:
        """The name is free, and neither the unit nor any of the PIDs belongs to a live model. Without an await, so
        it holds until the caller's next await."""
        existing = self.models.get(name)
        if existing is not None and existing.state not in ENDED:
            raise ModelExists(f"model {name!r} exists ({existing.state})")
        for other in self.models.values():
            if other.state in ENDED:
                continue
            if other.unit == unit:
                raise ModelExists(f"{unit} is managed already, as model {other.name!r}")
            shared = sorted(set(other.pids) & set(pids))
            if shared:
                raise ModelExists(f"process {shared[0]} belongs to model {other.name!r} already")

    async def adoptable_unit(self, name: str, unit: str) -> tuple[UnitStatus, int]:
        """An existing unit that may become model `name`, and its owner (its User=, else the uid every process runs
        as, else root). Raises a typed error saying why not."""
        validate_model_name(name)
        adopt.check_unit_name(unit)
        self._check_new_model(name, unit, [])
        status = await self.units.status(unit)
        if status is None:
            raise InvalidArgs(f"no such unit: {unit}")
        if status.active_state not in ("active", "reloading"):
            raise InvalidState(f"{unit} is {status.active_state}, not active: only a running unit can be adopted")
        if not status.pids:
            raise InvalidState(f"{unit} has no processes")
        if status.frozen:
            raise InvalidState(f"{unit} is frozen already (not by gpuschedd): thaw it first")
        if os.getpid() in status.pids:
            raise InvalidArgs(f"{unit} holds gpuschedd itself: it cannot be adopted")
        self._check_new_model(name, unit, status.pids)
        if status.user:
            owner = self._owner_of(status)
        else:
            uids = [adopt.process_uid(pid) for pid in status.pids]
            owner = adopt.common_owner([u for u in uids if u is not None], 0)
        return status, owner

    async def adopt(
        self, name: str, unit: str, caller: int, others: bool = False, policies: Policies | None = None
    ) -> Model:
        """Manage an existing unit in place: it keeps its name, restart policy and logs. Only a unit the caller owns,
        unless `others` (the bus layer grants it with `manage`)."""
        if caller < 0:
            raise AccessDenied("unknown caller")
        status, owner = await self.adoptable_unit(name, unit)
        if owner != caller and caller != 0 and not others:
            raise AccessDenied(f"{unit} runs as uid {owner}: only its owner may adopt it")
        self._check_new_model(name, unit, status.pids)  # again: the status was read with an await
        command = list(status.command) or adopt.cmdline(status.main_pid or status.pids[0])
        model = Model(name=name, unit=unit, owner=owner, command=command)
        self._set_policies(model, policies or Policies())
        self._apply_status(model, status)
        self._check_limits(model, caller)
        existing = self.models.get(name)
        if existing is not None:
            self._remove(existing)  # an ended model of that name
        self.units.track(unit)
        self._add(model)
        self._emit(Event(EventKind.ADOPT, name, unit, f"unit {unit} adopted as model {name} (owner uid {owner})"))
        return model

    def adoptable_pids(self, name: str, pids: list[int]) -> dict[int, int]:
        """Processes that may become model `name`: pid → owner uid. Raises a typed error saying why not."""
        validate_model_name(name)
        owners = adopt.check_pids(pids)
        self._check_new_model(name, adopt.scope_unit(name), list(owners))
        return owners

    async def adopt_processes(
        self,
        name: str,
        pids: list[int],
        caller: int,
        others: bool = False,
        policies: Policies | None = None,
        pins: adopt.Pins | None = None,
    ) -> Model:
        """Move running processes into the transient scope gpusched-adopt-NAME.scope in gpusched.slice. Only
        processes the caller owns, unless `others` (the bus layer grants it with `manage`). `pins`: the processes
        as the caller's checks saw them, held since (adopt.Pins); without, they are pinned here."""
        if caller < 0:
            raise AccessDenied("unknown caller")
        with adopt.Pins(pids) if pins is None else contextlib.nullcontext(pins) as held:
            return await self._adopt_pinned(name, pids, caller, others, policies, held)

    async def _adopt_pinned(
        self, name: str, pids: list[int], caller: int, others: bool, policies: Policies | None, pins: adopt.Pins
    ) -> Model:
        owners = self.adoptable_pids(name, pids)
        pins.verify()  # what was just read from /proc is of the processes checked before
        foreign = sorted(pid for pid, uid in owners.items() if uid != caller)
        if foreign and caller != 0 and not others:
            raise AccessDenied(f"process {foreign[0]} runs as uid {owners[foreign[0]]}: only its owner may adopt it")
        unit = adopt.scope_unit(name)
        owner = adopt.common_owner(list(owners.values()), caller)
        command = adopt.cmdline(min(owners))
        model = Model(name=name, unit=unit, owner=owner, command=command)
        self._set_policies(model, policies or Policies())

        async def move() -> UnitStatus:
            pins.verify()  # the last moment before PID 1 is handed the numbers
            return await self.units.start_scope(unit, sorted(owners), f"gpusched adopted processes {name}")

        status = await self._admit(model, move, caller)
        self._announce(
            status,
            Event(
                EventKind.ADOPT,
                name,
                unit,
                f"process(es) {', '.join(map(str, sorted(owners)))} adopted as model {name} in {unit}",
            ),
        )
        return model

    # ----------------------------------------------------------------- freeze / thaw

    async def freeze(self, name: str, reason: str = "", why: str = "", by: Requester | None = None) -> Model:
        """`reason` and `why`: a freeze the daemon decided itself (idle, eviction), said in its event. `by`: whose
        rights a stop for room in the RAM budget has (default: the model owner's)."""
        model = self.get(name)
        if model.state == State.RUNNING and self.config.ram_budget_action == "stop-oldest":
            await self._make_ram_room(model, by or Requester(model.owner))
        async with model.lock:
            if model.state == State.FROZEN:
                return model
            if model.state != State.RUNNING:
                raise InvalidState(f"model {name!r} is {model.state}, not running")
            # An eviction is there to give the GPU back: no context is kept.
            await self._freeze_locked(model, reason, why, release_gpu=reason == "evicted")
        return model

    async def _freeze_locked(self, model: Model, reason: str = "", why: str = "", release_gpu: bool = False) -> None:
        """release_gpu: the driver checkpoints every CUDA process even of a KeepContext model (a migration, an
        eviction)."""
        t0 = time.monotonic()
        await self.refresh(model, quick=True)
        self._check_ram(model)
        self._set_state(model, State.FREEZING)
        cuda: list[int] = []
        kept = False  # KeepContext honoured: no driver call
        reached = State.RUNNING  # where a failure leaves the model; a rollback that cannot run ends it frozen
        try:
            # NVML first: a process that creates its CUDA context in between is then seen by the driver too,
            # instead of being taken for a process whose context the driver cannot see.
            # One list of PIDs throughout: a status read meanwhile may replace model.pids with a newer one (a process
            # forked since is caught by the check after the cgroup freeze).
            pids = list(model.pids)
            holding = set(self.telemetry.vram_by_pid())
            try:
                cuda = await asyncio.to_thread(self.checkpoint.cuda_pids, pids)
            except CheckpointError as e:
                raise CheckpointFailed(f"model {model.name}: {e}; nothing was changed") from e
            unseen = sorted((set(pids) & holding) - set(cuda))
            if unseen and self.checkpoint.name != "none":
                raise CheckpointFailed(
                    f"model {model.name}: pid {unseen[0]} holds VRAM (NVML) but the checkpoint backend cannot see"
                    " its CUDA context; nothing was changed"
                )
            model.parked_bytes = 0
            if model.agent:
                await self._park(model, cuda)
            # KeepContext: when every CUDA process's agent parked, the driver is not called at all; each process
            # keeps its CUDA context (and what it allocated outside parkable()) on the GPU, frozen by the cgroup.
            parked_pids = {link.pid for link in self._parked.get(model.name, [])}
            kept = model.keep_context and not release_gpu and bool(cuda) and parked_pids >= set(cuda)
            rss_before = {pid: self.rss(pid) for pid in cuda}
            late: list[int] = []
            for _attempt in range(3):
                try:
                    if not kept:
                        await asyncio.to_thread(
                            recovery.drive, self.checkpoint, cuda, True, self.config.lock_timeout_ms
                        )
                except CheckpointError as e:
                    reached, errors = await self._settle(model, cuda, frozen=False)
                    left = await self._left(model, reached, errors)
                    raise CheckpointFailed(f"model {model.name}: {e}; {left}") from e
                try:
                    await self.units.freeze(model.unit)
                    # With the cgroup frozen the set of processes and contexts holds still: check it once more. A
                    # process forked, or a context created, since the scan would be frozen holding its VRAM.
                    late = await self._late_cuda_pids(model, cuda)
                    if late:
                        log.info("freeze of %s: CUDA process(es) %s appeared meanwhile: taking them", model.name, late)
                        await self.units.thaw(model.unit)
                except BaseException:
                    reached, _errors = await self._settle(model, cuda, frozen=False)
                    raise
                if not late:
                    break
                rss_before.update({pid: self.rss(pid) for pid in late})
                cuda = cuda + late
                kept = False  # a process whose agent did not park: the driver checkpoints them all
            else:
                reached, errors = await self._settle(model, cuda, frozen=False)
                raise CheckpointFailed(
                    f"model {model.name}: new CUDA processes kept appearing during the freeze; "
                    f"{await self._left(model, reached, errors)}"
                )
            # The snapshot lives in the targets' own memory: what the agents parked, plus the driver's part, their
            # RSS growth since. Where that does not show (RSS not readable), the VRAM NVML saw is the estimate.
            grown = sum(self.rss(pid) - before for pid, before in rss_before.items())
            if kept:
                model.snapshot_bytes = max(grown, 0) + model.parked_bytes
            else:
                model.snapshot_bytes = grown + model.parked_bytes if grown > 0 else (model.vram_bytes if cuda else 0)
        except BaseException:
            if await self._ended_meanwhile(model):
                raise
            model.cuda_pids = cuda if reached == State.FROZEN else []
            if reached == State.RUNNING:
                await self._unpark(model)
            self._set_state(model, reached)
            raise
        model.freeze_path = "agent-only" if kept else "agent" if self._parked.get(model.name) else "driver"
        model.cuda_pids = cuda
        model.last_freeze_usec = int((time.monotonic() - t0) * 1e6)
        self._set_state(model, State.FROZEN)
        self._emit(
            Event(
                EventKind.FREEZE,
                model.name,
                model.unit,
                f"model {model.name} frozen in {model.last_freeze_usec / 1e6:.3f}s"
                f" ({len(cuda)} CUDA process(es), backend {self.checkpoint.name}"
                + (f", {model.parked_bytes} bytes parked by the agent" if model.parked_bytes else "")
                + (", CUDA contexts kept on the GPU" if kept else "")
                + ")"
                + (f": {why}" if why else ""),
                duration_usec=model.last_freeze_usec,
                bytes=model.snapshot_bytes,
                gpus=tuple(model.gpus),
                fields={"GPUSCHED_REASON": reason} if reason else {},
            )
        )

    async def _late_cuda_pids(self, model: Model, known: list[int]) -> list[int]:
        """Processes of the (frozen) unit that hold GPU memory the freeze has not checkpointed. NVML answers, not
        the driver: GetState blocks on a process the cgroup freezer holds (measured on driver 580, H100)."""
        if not await self._read_pids(model):
            return []
        holding = self.telemetry.vram_by_pid()
        return [pid for pid in model.pids if pid in holding and pid not in known]

    async def _park(self, model: Model, pids: list[int]) -> None:
        """The fast path: each process's agent copies its memory out and releases it, keeping the addresses.
        A process without an agent, or whose agent fails or misses the deadline, is left whole to the driver's
        checkpoint that follows, which works for any process. A Stop cuts the wait: the freeze is rolled back
        (nothing was checkpointed or frozen yet) and raises InvalidState."""
        directory = os.path.join(self.config.agent_root, model.name)
        timeout_ms = self.config.agent_timeout_ms
        deadline_s = timeout_ms / 1000 + GRACE_S

        async def park_one(pid: int) -> tuple[AgentLink | None, int, str]:
            link = None
            try:
                # One deadline for the whole call: reaching the agent, the request and its whole answer.
                async with asyncio.timeout(deadline_s):
                    link = await AgentLink.connect(directory, pid, timeout_ms / 1000)
                    return (link, await link.park(timeout_ms), "") if link else (None, 0, "")
            except (AgentFailed, TimeoutError) as e:
                if link is not None:
                    link.close()  # a park that finishes late is undone by the agent when it sees this
                return None, 0, str(e) if isinstance(e, AgentFailed) else f"no whole answer in {deadline_s:g}s"
            except asyncio.CancelledError:
                if link is not None:
                    link.close()
                raise

        results = await self._agent_wait(model, asyncio.gather(*(park_one(pid) for pid in pids)))
        if results is None:
            raise InvalidState(f"model {model.name!r} is being stopped: its freeze was cancelled, nothing was changed")
        model.parked_bytes = sum(n for _link, n, _error in results)
        links = [link for link, _n, _error in results if link is not None]
        if links:
            self._parked[model.name] = links
        for pid, (link, n, error) in zip(pids, results, strict=True):
            if error:
                log.warning("freeze of %s: pid %d takes the driver path: %s", model.name, pid, error)
            elif link is not None:
                log.info("freeze of %s: the agent of pid %d parked %d bytes in %.3fs", model.name, pid, n, link.seconds)

    async def _unpark(self, model: Model) -> str:
        """Give the agents their memory back; returns what failed ("" when nothing did). An agent that answered
        with a failure (no room on the GPU) keeps its memory parked and its connection, for the next thaw; one
        that cannot be reached (or whose wait a Stop cut) unparks by itself once its connection is gone."""

        async def unpark_one(link: AgentLink) -> str:
            try:
                await link.unpark(self.config.agent_timeout_ms / 1000)
                log.info("thaw of %s: the agent of pid %d unparked in %.3fs", model.name, link.pid, link.seconds)
            except AgentFailed as e:
                if e.answered:
                    return str(e)
            link.close()
            return ""

        links = self._parked.pop(model.name, [])
        errors = await self._agent_wait(model, asyncio.gather(*(unpark_one(link) for link in links)))
        if errors is None:
            for link in links:
                link.close()
            return ""
        kept = [link for link, error in zip(links, errors, strict=True) if error]
        if kept:
            self._parked[model.name] = kept
        return "; ".join(error for error in errors if error)

    async def _agent_wait(self, model: Model, work: Awaitable[_T]) -> _T | None:
        """Wait for `work` on a model's agents, in a task a Stop of the model cancels (None when it did): agent
        I/O is bounded by its deadline, but a Stop does not wait even that long."""
        task = asyncio.ensure_future(work)
        if model.name in self._stop_requested:
            task.cancel()
        self._agent_waits[model.name] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this call itself is cancelled (the daemon stops), not only the agents' wait
            return None
        finally:
            self._agent_waits.pop(model.name, None)

    def _drop_parked(self, name: str) -> None:
        """The model's processes are gone: their agents' connections with them."""
        for link in self._parked.pop(name, []):
            link.close()

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

    def _drop_lost_pids(self, model: Model) -> None:
        """A CUDA process of a frozen model that ended while the unit lives on (one rank of a multi-process
        model): its snapshot is gone with it. Reported, and left out of the restore, which would fail on it."""
        lost = [pid for pid in model.cuda_pids if pid not in model.pids]
        if not lost or not model.pids:
            return
        share = model.snapshot_bytes * len(lost) // len(model.cuda_pids)
        model.cuda_pids = [pid for pid in model.cuda_pids if pid not in lost]
        model.snapshot_bytes -= share
        self._emit(
            Event(
                EventKind.FAILURE,
                model.name,
                model.unit,
                f"model {model.name}: CUDA process(es) {', '.join(map(str, lost))} ended while frozen; their "
                f"snapshot (about {share} bytes of host RAM) is released. The model may need a restart.",
                bytes=share,
            )
        )

    async def _settle(self, model: Model, pids: list[int], frozen: bool) -> tuple[State, list[str]]:
        """After a failed step (or a restart mid-transition): bring every CUDA PID of the model, and its cgroup, to
        frozen (frozen=True) or running, whatever mix of states they are in; if that fails too, to the other
        state. Returns the state reached and what went wrong on the way. When neither works, the cgroup is frozen
        and the model reported frozen: nothing runs half-restored, and a Thaw (or a Stop) tries again."""
        errors: list[str] = []
        for target in (frozen, not frozen):
            try:
                # The driver's copies run on a thread inside each target: the cgroup must run.
                await self.units.thaw(model.unit)
            except GpuschedError as e:
                log.warning("settling %s: %s", model.name, e)
            try:
                await asyncio.to_thread(recovery.drive, self.checkpoint, pids, target, self.config.lock_timeout_ms)
                if target:
                    await self.units.freeze(model.unit)
                    if model.freeze_path == "agent-only":
                        model.freeze_path = "agent"  # frozen by the driver now: the contexts are checkpointed too
            except (CheckpointError, GpuschedError) as e:
                log.error("settling %s %s: %s", model.name, "frozen" if target else "running", e)
                errors.append(str(e))
                continue
            return (State.FROZEN if target else State.RUNNING), errors
        try:
            await self.units.freeze(model.unit)
        except GpuschedError as e:
            errors.append(str(e))
        return State.FROZEN, errors

    async def _ended_meanwhile(self, model: Model) -> bool:
        """After a failed freeze or thaw step: whether the model's unit ended during it (killed mid-step, which is
        likely why the step failed). If so it is reported as the exit it is (state failed or stopped), never as a
        model left frozen or running."""
        if model.state in ENDED:
            return True
        try:
            status = await self.units.status(model.unit)
        except GpuschedError as e:
            log.warning("checking %s after a failed step: %s", model.unit, e)
            return False
        if status is not None and status.active_state not in ("inactive", "failed"):
            return False
        seen = self._exits_seen.get(model.name)  # the unit is gone: what its exit said, if it was seen
        self._ended(model, status or seen or UnitStatus(model.unit, "inactive", 0, [], False, result="unknown"))
        return True

    async def _left(self, model: Model, reached: State, errors: list[str]) -> str:
        """The end of a failed freeze's or thaw's error message: where the model was left, or that it ended."""
        if await self._ended_meanwhile(model):
            return f"the model ended meanwhile: it is {model.state}"
        return self._outcome(reached, errors)

    @staticmethod
    def _outcome(reached: State, errors: list[str]) -> str:
        """The end of a failed freeze's or thaw's error message: where the model was left."""
        if not errors:
            return "every process was rolled back to running" if reached == State.RUNNING else "the model stays frozen"
        text = f"rolling back failed too ({'; '.join(errors)}): the model is {reached}"
        if len(errors) > 1:
            text += ", but not every process could be brought there; thaw or stop it"
        return text

    async def thaw(self, name: str, by: Requester | None = None) -> Model:
        """`by`: whose rights an eviction for the thaw has (default: the model owner's)."""
        model = self.get(name)
        if model.state == State.FROZEN and self.config.evict_on_thaw:
            await self._evict_for(model, lambda: self._gpu_shortfall(model), "the thaw", by or Requester(model.owner))
        async with model.lock:
            if model.state == State.RUNNING:
                return model
            if model.state != State.FROZEN:
                raise InvalidState(f"model {name!r} is {model.state}, not frozen")
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
        # No await since the check: nothing came between.
        self._thaw_reserved[model.name] = {moved.get(uuid, uuid): n for uuid, n in model.vram_by_gpu.items()}
        self._set_state(model, State.THAWING)
        reached, settled = State.FROZEN, False  # where a failure leaves the model
        try:
            # The driver's restore runs on a thread inside the target: thaw the cgroup first.
            await self.units.thaw(model.unit)
            try:
                await asyncio.to_thread(
                    recovery.drive, self.checkpoint, model.cuda_pids, False, self.config.lock_timeout_ms, gpu_pairs
                )
            except CheckpointError as e:
                reached, errors = await self._settle(model, model.cuda_pids, frozen=True)
                settled = True
                raise CheckpointFailed(f"model {model.name}: {e}; {await self._left(model, reached, errors)}") from e
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
        model.cuda_pids = []
        if moved:
            model.vram_by_gpu = dict(self._thaw_reserved[model.name])
            model.gpus = sorted({moved.get(uuid, uuid) for uuid in model.gpus})
        model.last_thaw_usec = int((time.monotonic() - t0) * 1e6)
        model.last_active_usec = self.now_usec()
        await self.refresh(model, vram=True, quick=True)
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

    async def migrate(self, name: str, gpu: str) -> Model:
        """Move a model onto another GPU: freeze it (if it runs), restore its processes there through the driver's
        GPU pairs, and run it. The target's room is checked first; if the restore fails, the model is settled
        frozen where it was and thaws there as before."""
        model = self.get(name)
        async with model.lock:
            if model.state not in (State.RUNNING, State.FROZEN):
                raise InvalidState(f"model {name!r} is {model.state}, not running or frozen")
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
        self._emit(
            Event(
                EventKind.MIGRATE,
                name,
                model.unit,
                f"model {name} migrated from {sources[0]} to GPU {target.index} ({target.uuid})"
                f" in {time.monotonic() - t0:.3f}s",
                duration_usec=int((time.monotonic() - t0) * 1e6),
                bytes=model.snapshot_bytes,
                gpus=(target.uuid,),
                fields={"GPUSCHED_GPU_FROM": sources[0], "GPUSCHED_GPU_TO": target.uuid},
            )
        )
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

    async def swap(self, freeze_name: str, thaw_name: str, by: Requester | None = None) -> None:
        """Freeze one model and thaw another: both or neither. If the thaw fails, the first is thawed back. `by`:
        as for freeze and thaw."""
        if freeze_name == thaw_name:
            raise InvalidArgs("swap needs two different models")
        out, into = self.get(freeze_name), self.get(thaw_name)
        if into.state not in (State.FROZEN, State.RUNNING):
            raise InvalidState(f"model {thaw_name!r} is {into.state}, not frozen")
        if out.state not in (State.FROZEN, State.RUNNING):
            raise InvalidState(f"model {freeze_name!r} is {out.state}, not running")
        t0 = time.monotonic()
        # Saved while under way, so a restart in the middle still ends both-or-neither (_finish_swap). Only when
        # the first model runs: thawing back one that was frozen before the swap would be wrong.
        entry = (freeze_name, thaw_name)
        if out.state == State.RUNNING:
            self._swaps.append(entry)
        try:
            await self.freeze(freeze_name, by=by)
            try:
                await self.thaw(thaw_name, by)
            except BaseException:
                try:
                    await self.thaw(freeze_name, by)
                except InvalidState as e:  # stopped or thawed by someone meanwhile: nothing left to roll back
                    log.warning("swap rollback: %s", e.message)
                except Exception as e:  # the original error is the one the caller needs
                    log.error("swap rollback: thawing %s failed: %s", freeze_name, e)
                raise
        finally:
            if entry in self._swaps:
                self._swaps.remove(entry)
                self._persist()
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

    # ----------------------------------------------------------------- policies

    def idle_limit(self, model: Model) -> int:
        """The idle time in force for a model: its own IdleFreezeSec, else the daemon's (0: never frozen idle)."""
        return self.config.idle_freeze_sec if model.idle_freeze_sec < 0 else model.idle_freeze_sec

    async def apply_policies(self) -> None:
        """One round of the automatic decisions (the daemon calls it every second): freeze running models idle for
        their IdleFreezeSec, stop frozen models past their FrozenTTLSec. A model in a transition is left alone;
        a policy that cannot be carried out is logged (and its refusal or failure journaled) and tried again."""
        now = self.now_usec()
        watched = [
            m for m in self.models.values() if m.state == State.RUNNING and self.idle_limit(m) > 0 and m.vram_bytes
        ]
        busy = self.telemetry.busy_pids() if watched else None
        for model in watched:
            if busy is None:
                model.last_active_usec = now  # utilization unknown: never called idle
                continue
            if busy & set(model.pids):
                model.last_active_usec = now
                continue
            limit = self.idle_limit(model)
            idle = (now - model.last_active_usec) / 1e6
            if idle < limit or model.lock.locked():
                continue
            why = f"no GPU utilization from its processes for {idle:.0f}s (IdleFreezeSec={limit}), decided by {DAEMON}"
            log.info("model %s: %s: freezing it", model.name, why)
            try:
                await self.freeze(model.name, "idle", why, DAEMON)
            except GpuschedError as e:
                log.warning("idle freeze of %s: %s", model.name, e)
                model.last_active_usec = now  # try again after another idle period, not every second
        for model in list(self.models.values()):
            if model.state != State.FROZEN or model.frozen_ttl_sec <= 0 or model.lock.locked():
                continue
            frozen = (now - model.state_change_usec) / 1e6
            if frozen < model.frozen_ttl_sec:
                continue
            why = f"frozen for {frozen:.0f}s, past its FrozenTTLSec={model.frozen_ttl_sec}, decided by {DAEMON}"
            log.info("model %s: %s: stopping it", model.name, why)
            try:
                await self.stop(model.name, "frozen-ttl", why)
            except GpuschedError as e:
                log.warning("stop of %s past its frozen time to live: %s", model.name, e)
        self._drop_ended(now)

    def _drop_ended(self, now: int) -> None:
        """EndedModelTTLSec=: an ended model is dropped from the table (and the state file) this long after it ended,
        with its command line: nothing a user ran is kept forever, and the table stays small."""
        ttl = self.config.ended_model_ttl_sec
        if ttl <= 0:
            return
        for model in list(self.models.values()):
            ended = (now - model.state_change_usec) / 1e6
            if model.state not in ENDED or model.lock.locked() or ended < ttl:
                continue
            self._remove(model)
            if model_name_from_unit(model.unit) is None:
                self.units.untrack(model.unit)
            self._emit(
                Event(
                    EventKind.FORGET,
                    model.name,
                    model.unit,
                    f"model {model.name} forgotten: it ended {ended:.0f}s ago, past EndedModelTTLSec={ttl}",
                    fields={"GPUSCHED_REASON": "ended-ttl"},
                )
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
