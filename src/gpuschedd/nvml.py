"""GPU telemetry through NVML (nvidia-ml-py), keyed by GPU UUID: what each GPU has free, and the VRAM each
compute process holds. A checkpointed process is absent from NVML's process list, which is how a freeze
shows up here. Without NVML (no driver, no library) the answer is NoGpus: nothing to report."""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any

from .telemetry import GpuInfo, GpuTelemetry, NoGpus

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlTelemetry:
    """GpuTelemetry over an initialized pynvml (or anything shaped like it: the tests pass a stub)."""

    def __init__(self, nvml: ModuleType | Any) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        # GPU UUID → the newest utilization sample's timestamp seen (NVML returns samples newer than it).
        self._seen: dict[str, int] = {}
        nvml.nvmlInit()

    def _handles(self) -> list[tuple[int, Any]]:
        nvml = self._nvml
        return [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]

    def gpus(self) -> list[GpuInfo]:
        nvml = self._nvml
        out = []
        with self._lock:
            for index, handle in self._handles():
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append(
                    GpuInfo(
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        index=index,
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        total_bytes=int(mem.total),
                        used_bytes=int(mem.used),
                        free_bytes=int(mem.free),
                    )
                )
        return out

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        nvml = self._nvml
        out: dict[int, dict[str, int]] = {}
        with self._lock:
            for _, handle in self._handles():
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    # usedGpuMemory is None where NVML cannot tell (some containers, MIG): count 0 but
                    # keep the PID, so the process still counts as a CUDA process on that GPU.
                    used = int(proc.usedGpuMemory or 0)
                    per = out.setdefault(int(proc.pid), {})
                    per[uuid] = per.get(uuid, 0) + used
        return out

    def busy_pids(self) -> set[int] | None:
        """nvmlDeviceGetProcessUtilization since the last call: NVML_ERROR_NOT_FOUND means no process ran work
        (no samples); a GPU that does not support it makes the answer None (unknown), so nothing is called idle."""
        nvml = self._nvml
        busy: set[int] = set()
        with self._lock:
            for _, handle in self._handles():
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                try:
                    samples = nvml.nvmlDeviceGetProcessUtilization(handle, self._seen.get(uuid, 0))
                except nvml.NVMLError as e:
                    if getattr(e, "value", None) == getattr(nvml, "NVML_ERROR_NOT_FOUND", 6):
                        continue
                    log.debug("no per-process utilization on %s: %s", uuid, e)
                    return None
                for sample in samples:
                    self._seen[uuid] = max(self._seen.get(uuid, 0), int(sample.timeStamp))
                    if int(sample.smUtil) > 0:
                        busy.add(int(sample.pid))
        return busy


def load_telemetry() -> GpuTelemetry:
    """NVML when it initializes, else NoGpus. (The test fake is the daemon's choice, not this module's.)"""
    try:
        import pynvml

        return NvmlTelemetry(pynvml)
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        log.info("no NVML (%s): GPU telemetry off", e)
        return NoGpus()
