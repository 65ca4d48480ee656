"""Checkpoint backends: move a CUDA process's device state into its host memory and back.

Every call is blocking (ctypes into libcuda, or a subprocess) and acts on one PID; the engine runs them
in worker threads and owns the ordering (lock all, checkpoint all; restore all, unlock all) and rollback."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from ..libcuda import DEFAULT_DEVICES


class CudaState(StrEnum):
    """CUprocessState, by the names the driver uses."""

    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"


class CheckpointError(Exception):
    """One step failed for one PID. `step` is lock, checkpoint, restore, unlock or get-state; `reason` is
    the driver's error name (CUDA_ERROR_...) or the tool's stderr."""

    def __init__(self, pid: int, step: str, reason: str) -> None:
        super().__init__(f"{step} of pid {pid} failed: {reason}")
        self.pid = pid
        self.step = step
        self.reason = reason


class CheckpointBackend(Protocol):
    name: str  # "driver", "cli" or "none": shown as the Manager's CheckpointBackend property
    # The path prefix of the driver's device files: a process that holds none of them open holds no CUDA context
    # (libcuda.device_prefix(); the engine does not ask cuda_pids about such a process).
    devices: str

    def cuda_pids(self, pids: list[int]) -> list[int]:
        """The PIDs among `pids` that hold a CUDA context (and so must be checkpointed), in order."""

    def state(self, pid: int) -> CudaState: ...

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        """gpu_pairs: (old GPU UUID, new GPU UUID) for migration; None restores where it was."""

    def unlock(self, pid: int) -> None: ...


class NoCheckpoint:
    """No NVIDIA driver: no process holds a CUDA context, so freezing is the cgroup freezer alone."""

    name = "none"
    devices = DEFAULT_DEVICES

    def cuda_pids(self, pids: list[int]) -> list[int]:
        return []

    def state(self, pid: int) -> CudaState:
        return CudaState.RUNNING

    def _refuse(self, pid: int, step: str) -> None:
        raise CheckpointError(pid, step, "no CUDA checkpoint support on this host")

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._refuse(pid, "lock")

    def checkpoint(self, pid: int) -> None:
        self._refuse(pid, "checkpoint")

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        self._refuse(pid, "restore")

    def unlock(self, pid: int) -> None:
        self._refuse(pid, "unlock")
