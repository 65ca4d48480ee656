"""Bringing models to a consistent state: after a failed step, and after a daemon restart.

A model is consistent when every CUDA process is RUNNING and its cgroup runs (state `running`), or every CUDA process
is CHECKPOINTED and its cgroup is frozen (state `frozen`). `drive()` moves a set of PIDs towards one of the two
from whatever mix of driver states they are in, skipping what is already done, so the same call finishes an
interrupted freeze or thaw, undoes one, or retries one. The order is always the driver's: lock every PID before
checkpointing any; restore every PID before unlocking any.

On start the daemon compares what it saved (statefile) with the truth (the units systemd lists, their FreezerState,
each PID's checkpoint state) and decides each model's state by the rules in `target_for()`, which
docs/reliability.md states for admins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import CheckpointBackend, CheckpointError, CudaState
from .model import ENDED, State


def drive(
    checkpoint: CheckpointBackend,
    pids: list[int],
    frozen: bool,
    lock_timeout_ms: int,
    gpu_pairs: list[tuple[str, str]] | None = None,
) -> None:
    """Blocking (run it in a worker thread). Move every PID to CHECKPOINTED (frozen=True) or RUNNING, whatever
    mix of states they start in; raise the first CheckpointError. The cgroup must not be frozen: the driver's
    copies run on a thread inside each target. gpu_pairs (old UUID, new UUID) restores onto other GPUs."""
    steps: list[tuple[CudaState, Callable[[int], None]]]
    if frozen:
        steps = [
            (CudaState.RUNNING, lambda pid: checkpoint.lock(pid, lock_timeout_ms)),
            (CudaState.LOCKED, checkpoint.checkpoint),
        ]
        want, verb = CudaState.CHECKPOINTED, "checkpoint"
    else:
        steps = [
            (CudaState.CHECKPOINTED, lambda pid: checkpoint.restore(pid, gpu_pairs)),
            (CudaState.LOCKED, checkpoint.unlock),
        ]
        want, verb = CudaState.RUNNING, "unlock"
    for from_state, step in steps:
        for pid in pids:
            if checkpoint.state(pid) == from_state:
                step(pid)
    for pid in pids:
        state = checkpoint.state(pid)
        if state != want:
            raise CheckpointError(pid, verb, f"the process is {state}, not {want}")


def cuda_states(checkpoint: CheckpointBackend, pids: list[int]) -> dict[int, CudaState]:
    """Blocking. The driver state of each PID that holds a CUDA context (GetState answers for it)."""
    try:
        candidates = checkpoint.cuda_pids(pids)
    except CheckpointError:
        candidates = list(pids)  # an unexpected answer for some PID: ask each one below
    out = {}
    for pid in candidates:
        try:
            out[pid] = checkpoint.state(pid)
        except CheckpointError:
            continue  # no context, or gone
    return out


def frozen_cuda_states(
    pids: list[int], checkpointed: list[int], holding: set[int], kept_contexts: bool = False
) -> dict[int, CudaState]:
    """The driver state of each CUDA PID of a unit the cgroup freezer holds, without asking the driver: its
    GetState blocks on a frozen process (measured on driver 580, H100). A PID that NVML sees holding GPU memory
    has not been checkpointed (taken as running: settling thaws the cgroup and asks the driver then); one the
    saved table says was checkpointed, and that holds none, is checkpointed. kept_contexts: the model was frozen
    keeping its CUDA contexts (KeepContext, FreezePath agent-only): its saved processes hold GPU memory by design
    and count as frozen (a thaw's restore finds them running and does nothing; their agents unpark)."""
    saved = set(checkpointed) & set(pids)
    kept = saved if kept_contexts else set()
    out = {pid: CudaState.RUNNING for pid in pids if pid in holding and pid not in kept}
    out.update({pid: CudaState.CHECKPOINTED for pid in saved if pid not in holding or pid in kept})
    return out


def with_nvml(cuda: dict[int, CudaState], pids: list[int], holding: set[int]) -> dict[int, CudaState]:
    """The driver's answers for a unit the cgroup freezer does not hold, completed by NVML: a process of the unit
    that holds GPU memory and that the driver did not answer for runs on the GPU (it is not checkpointed), whatever
    the saved table says. A process that holds none is not running on the GPU unless the driver says so."""
    return {**{pid: CudaState.RUNNING for pid in pids if pid in holding}, **cuda}


@dataclass(frozen=True)
class Truth:
    """What systemd and the driver say about one live unit."""

    cgroup_frozen: bool
    cuda: dict[int, CudaState]

    @property
    def running(self) -> bool:
        return not self.cgroup_frozen and all(s == CudaState.RUNNING for s in self.cuda.values())

    @property
    def frozen(self) -> bool:
        return self.cgroup_frozen and all(s == CudaState.CHECKPOINTED for s in self.cuda.values())


def target_for(saved: State | None, truth: Truth) -> tuple[State, str]:
    """The state a model found on start is brought to, and why (None: no saved record).

    1. A transition the daemon was in the middle of ends in `running`: an interrupted freeze is rolled back (its
       caller got no success, so the model is where it was before the call), an interrupted thaw is finished.
       Only if the GPU has no room for the rest of the thaw, or the restore fails, does it end `frozen` instead.
    2. A model saved `frozen` stays frozen; PIDs found in another state (someone used cuda-checkpoint or
       `systemctl thaw` behind the daemon's back) are checkpointed again and the cgroup frozen again. But one
       found wholly running (cgroup running, every CUDA process RUNNING) is `running`: the saved table is stale
       (a thaw whose record could not be written, or a whole thaw done by hand), and callers may already be
       using it; freezing it again would undo a thaw somebody was told had succeeded.
    3. Otherwise (saved `running`, or no record) the truth decides: consistently frozen is `frozen`, consistently
       running is `running`, and a mix is brought to `running` (or `frozen` where the GPU has no room).
    Nothing is started or stopped, and a consistent model is not touched at all."""
    if saved == State.FREEZING:
        return State.RUNNING, "its freeze was interrupted by a restart of gpuschedd: rolled back to running"
    if saved == State.THAWING:
        return State.RUNNING, "its thaw was interrupted by a restart of gpuschedd: thaw finished"
    if saved == State.FROZEN and truth.running:
        return State.RUNNING, "saved frozen, found running (thawed behind gpuschedd's back, or its thaw not saved)"
    if saved == State.FROZEN:
        return State.FROZEN, "saved frozen, found partly running: frozen again"
    if truth.frozen:
        return State.FROZEN, "found frozen"
    return State.RUNNING, "found partly frozen: brought back to running"


def consistent(state: State, truth: Truth) -> bool:
    return (state == State.RUNNING and truth.running) or (state == State.FROZEN and truth.frozen)


def saved_state(state: State | None) -> State | None:
    """A saved state that says nothing about the live unit (the record of an ended model) counts as none."""
    return None if state in ENDED else state
