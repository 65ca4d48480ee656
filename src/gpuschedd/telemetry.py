"""GPU and host memory facts the engine decides with. NVML lives in gpuschedd.nvml; this module holds the
shapes and the no-GPU default so the engine never imports pynvml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuInfo:
    uuid: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int


class GpuTelemetry(Protocol):
    def gpus(self) -> list[GpuInfo]: ...

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        """Compute processes on every GPU: pid → {GPU UUID: bytes}. A checkpointed PID is absent."""

    def busy_pids(self) -> set[int] | None:
        """PIDs that ran work on a GPU (SM utilization above 0) since the previous call; None when it cannot be
        told (no per-process samples on this GPU or driver), so no policy decides on it."""


class NoGpus:
    """No NVIDIA driver or NVML: nothing to report."""

    def gpus(self) -> list[GpuInfo]:
        return []

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        return {}

    def busy_pids(self) -> set[int] | None:
        return None
