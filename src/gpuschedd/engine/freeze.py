"""The freeze pipeline, and the settling of a failed step shared with thaw and start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .. import events, procfs, recovery
from ..checkpoint import CheckpointError
from ..errors import (
    CheckpointFailed,
    GpuschedError,
)
from ..model import ENDED, Model, State, require
from ..units import UnitStatus
from .core import Core, Requester

log = logging.getLogger(__name__)


@dataclass
class _FreezeStep:
    """What a freeze under way has done so far, for its steps and for the rollback of a failed one."""

    cuda: list[int] = field(default_factory=list)
    kept: bool = False  # KeepContext honoured: no driver call
    staging: int = 0  # host memory the agents keep beside their parked bytes (in RSS before rss_before is read)
    rss_before: dict[int, int] = field(default_factory=dict)
    reached: State = State.RUNNING  # where a failure leaves the model; a rollback that cannot run ends it frozen


@dataclass
class _CudaScan:
    """A scan for CUDA processes under way: the model's PIDs, those NVML saw holding VRAM before, the answer (about
    those of them that may hold a CUDA context)."""

    pids: list[int]
    holding: set[int]
    cuda: asyncio.Future[list[int]]


class Freezing(Core):
    """Freeze, as named steps; and the settling of a failed step (shared with thaw and start-up)."""

    async def freeze(self, name: str, reason: str = "", why: str = "", by: Requester | None = None) -> Model:
        """An entry point. `reason` and `why`: a freeze the daemon decided itself (idle, eviction), said in its
        event. `by`: whose rights a stop for room in the RAM budget has (default: the model owner's).

        One model lock, never two: the room in the RAM budget is made before this model's lock is taken (each
        stopped model under its own lock, one at a time), so two opposite swaps cannot deadlock. No await between
        check and reservation: _check_ram and the move to freezing (which counts the model against the budget for
        the next check) run with no await between them."""
        model = self.get(name)
        if model.state == State.RUNNING and self.config.ram_budget_action != "refuse":
            await self._make_ram_room(model, by or Requester(model.owner))
        async with model.lock:
            if model.state == State.FROZEN:
                return model
            require(model, "freeze")
            # An eviction is there to give the GPU back: no context is kept.
            await self._freeze_locked(model, reason, why, release_gpu=reason == "evicted")
        return model

    async def _freeze_locked(self, model: Model, reason: str = "", why: str = "", release_gpu: bool = False) -> None:
        """The pipeline, under the model's lock: read its PIDs, check the RAM budget, find its CUDA processes, let
        the agents park, checkpoint and freeze the cgroup (taking late CUDA processes), size the snapshot.
        release_gpu: the driver checkpoints every CUDA process even of a KeepContext model (a migration, an
        eviction). A failed step leaves the model running (rolled back) or, if that cannot be done, frozen."""
        t0 = time.monotonic()
        holding = await self.refresh(model, quick=True)
        self._check_ram(model)
        # The scan only reads (nothing is acted on before `freezing` is saved): started first, its worker thread's
        # wake-up and the driver's answers overlap the saving and announcing of `freezing` instead of following them.
        scan = self._scan_cuda(model, holding)
        self._set_state(model, State.FREEZING)
        step = _FreezeStep()
        try:
            step.cuda = await self._find_cuda(model, scan)
            model.parked_bytes = 0
            if model.agent:
                step.staging = await self._park(model, step.cuda)
            self._copied_out(model)
            # KeepContext: when every CUDA process's agent parked, the driver is not called at all; each process
            # keeps its CUDA context (and what it allocated outside parkable()) on the GPU, frozen by the cgroup.
            parked_pids = {link.pid for link in self._parked.get(model.name, [])}
            step.kept = model.keep_context and not release_gpu and bool(step.cuda) and parked_pids >= set(step.cuda)
            step.rss_before = {pid: self.rss(pid) for pid in step.cuda}
            await self._checkpoint_and_freeze(model, step)
            model.snapshot_bytes = self._snapshot_size(model, step)
            model.swapped_bytes = model.spilled_bytes = 0  # a new snapshot, in RAM
        except BaseException:
            if not await self._ended_meanwhile(model):
                model.cuda_pids = step.cuda if step.reached == State.FROZEN else []
                if step.reached == State.RUNNING:
                    await self._unpark(model)
                self._set_state(model, step.reached)
            raise
        # cgroup: no process was checkpointed (CheckpointBackend none, or no CUDA process): its GPU memory stays held
        parked = self._parked.get(model.name)
        model.freeze_path = "agent-only" if step.kept else "agent" if parked else "driver" if step.cuda else "cgroup"
        model.cuda_pids = step.cuda
        model.last_freeze_usec = int((time.monotonic() - t0) * 1e6)
        self._set_state(model, State.FROZEN)
        self._emit(events.frozen(model, len(step.cuda), self.checkpoint.name, step.kept, reason, why))

    def _scan_cuda(self, model: Model, vram_by_pid: dict[int, dict[str, int]] | None = None) -> _CudaScan:
        """Start asking the checkpoint backend which of the model's processes have a CUDA context (on a worker
        thread, at once: not at the caller's next await); _find_cuda awaits the answer. `vram_by_pid`: what NVML
        said just before, read for these PIDs (the refresh that read them), so NVML is not asked twice.

        Only about the processes that may hold one: a process with a CUDA context keeps the driver's device files
        open (/dev/nvidiactl, /dev/nvidiaN, /dev/nvidia-uvm) for its whole life, so one that holds none open is not
        asked (a GetState each, on a worker thread: no thread at all for a model without CUDA). One that NVML sees
        holding GPU memory is asked whatever its descriptors say: _find_cuda refuses a freeze that would leave it
        holding its memory unseen by the backend. One whose descriptors cannot be read is asked too."""
        # NVML first: a process that creates its CUDA context in between is then seen by the driver too, instead of
        # being taken for a process whose context the driver cannot see. One list of PIDs throughout: a status read
        # meanwhile may replace model.pids with a newer one (a process forked since, or a context created since the
        # descriptors were read, is caught by the check after the cgroup freeze).
        pids = list(model.pids)
        holding = set(self.telemetry.vram_by_pid() if vram_by_pid is None else vram_by_pid)
        devices = self.checkpoint.devices
        asked = [pid for pid in pids if pid in holding or procfs.holds_open(pid, devices) is not False]
        loop = asyncio.get_running_loop()
        cuda: asyncio.Future[list[int]]
        if asked:
            cuda = loop.run_in_executor(None, self.checkpoint.cuda_pids, asked)
        else:
            cuda = loop.create_future()
            cuda.set_result([])
        return _CudaScan(pids, holding, cuda)

    async def _find_cuda(self, model: Model, scan: _CudaScan) -> list[int]:
        """The model's CUDA processes, as the checkpoint backend sees them; CheckpointFailed (nothing changed) when
        NVML sees one holding VRAM that the backend cannot see."""
        pids, holding = scan.pids, scan.holding
        try:
            cuda = await scan.cuda
        except CheckpointError as e:
            raise CheckpointFailed(f"model {model.name}: {e}; nothing was changed") from e
        unseen = sorted((set(pids) & holding) - set(cuda))
        if unseen and self.checkpoint.name != "none":
            raise CheckpointFailed(
                f"model {model.name}: pid {unseen[0]} holds VRAM (NVML) but the checkpoint backend cannot see"
                " its CUDA context; nothing was changed"
            )
        return cuda

    async def _checkpoint_and_freeze(self, model: Model, step: _FreezeStep) -> None:
        """Checkpoint the CUDA processes (unless their contexts are kept) and freeze the cgroup; a CUDA process that
        appeared meanwhile is taken in a new round (three at most). On failure the model is settled and
        step.reached says where."""
        for _attempt in range(3):
            try:
                if step.cuda and not step.kept:  # no CUDA process: no worker thread to wake
                    await asyncio.to_thread(
                        recovery.drive, self.checkpoint, step.cuda, True, self.config.lock_timeout_ms
                    )
            except CheckpointError as e:
                step.reached, errors = await self._settle(model, step.cuda, frozen=False)
                raise CheckpointFailed(
                    f"model {model.name}: {e}; {await self._left(model, step.reached, errors)}"
                ) from e
            late = await self._freeze_cgroup(model, step)
            if not late:
                return
            step.rss_before.update({pid: self.rss(pid) for pid in late})
            step.cuda = step.cuda + late
            step.kept = False  # a process whose agent did not park: the driver checkpoints them all
        step.reached, errors = await self._settle(model, step.cuda, frozen=False)
        raise CheckpointFailed(
            f"model {model.name}: new CUDA processes kept appearing during the freeze; "
            f"{await self._left(model, step.reached, errors)}"
        )

    async def _freeze_cgroup(self, model: Model, step: _FreezeStep) -> list[int]:
        """Freeze the cgroup, and return the CUDA processes that appeared since the scan (the cgroup thawed again
        for them); none: the model is frozen."""
        try:
            await self.units.freeze(model.unit)
            # With the cgroup frozen the set of processes and contexts holds still: check it once more. A process
            # forked, or a context created, since the scan would be frozen holding its VRAM.
            late = await self._late_cuda_pids(model, step.cuda)
            if late:
                log.info("freeze of %s: CUDA process(es) %s appeared meanwhile: taking them", model.name, late)
                await self.units.thaw(model.unit)
            return late
        except BaseException:
            step.reached, _errors = await self._settle(model, step.cuda, frozen=False)
            raise

    def _snapshot_size(self, model: Model, step: _FreezeStep) -> int:
        """The snapshot lives in the targets' own memory: what the agents parked (and keep to copy it back), plus the
        driver's part, their RSS growth since. Where that does not show (RSS not readable), the VRAM NVML saw is the
        estimate."""
        grown = sum(self.rss(pid) - before for pid, before in step.rss_before.items())
        if step.kept:
            return max(grown, 0) + model.parked_bytes + step.staging
        return grown + model.parked_bytes + step.staging if grown > 0 else (model.vram_bytes if step.cuda else 0)

    async def _late_cuda_pids(self, model: Model, known: list[int]) -> list[int]:
        """Processes of the (frozen) unit that hold GPU memory the freeze has not checkpointed. NVML answers, not
        the driver: GetState blocks on a process the cgroup freezer holds (measured on driver 580, H100)."""
        if not await self._read_pids(model):
            return []
        holding = self.telemetry.vram_by_pid()
        return [pid for pid in model.pids if pid in holding and pid not in known]

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
