"""GPU telemetry: the NVML glue against a stub of pynvml's API, the fake GPU the system tests use, the
selection of both, the checkpoint backend choice, and the host memory probes."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fakegpu_fixtures import FAKECUDA, GIB, GPU0, GPU1, MIB

from gpuschedd import hostmem
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.checkpoint.choose import BackendUnavailable, choose_checkpoint
from gpuschedd.checkpoint.cuda_checkpoint import CliCheckpoint
from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.daemon import choose_telemetry
from gpuschedd.nvml import NvmlTelemetry, load_telemetry
from gpuschedd.telemetry import GpuInfo, NoGpus
from gpuschedd.testing.fakegpu import FakeGpuTelemetry


class StubNvml:
    """The part of pynvml's API the telemetry uses, with two GPUs and three processes."""

    def __init__(self) -> None:
        self.initialized = False
        self.devices = [
            (GPU0.encode(), b"NVIDIA H100 80GB HBM3", (80 * GIB, 30 * GIB), [(10, 20 * GIB), (11, None)]),
            (GPU1, "NVIDIA H100 80GB HBM3", (80 * GIB, 9 * GIB), [(10, 9 * GIB)]),
        ]

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.initialized
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str | bytes:
        return self.devices[h][0]

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self.devices[h][1]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        total, used = self.devices[h][2]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.devices[h][3]]


def test_nvml_by_uuid() -> None:
    nvml = NvmlTelemetry(StubNvml())
    assert nvml.gpus() == [
        GpuInfo(GPU0, 0, "NVIDIA H100 80GB HBM3", 80 * GIB, 30 * GIB, 50 * GIB),
        GpuInfo(GPU1, 1, "NVIDIA H100 80GB HBM3", 80 * GIB, 9 * GIB, 71 * GIB),
    ]
    # pid 10 spans two GPUs; pid 11's usage is unknown to NVML (None) but it is still a compute process.
    assert nvml.vram_by_pid() == {10: {GPU0: 20 * GIB, GPU1: 9 * GIB}, 11: {GPU0: 0}}


def test_without_nvml_there_is_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUSCHED_FAKE_GPU_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as on a host without nvidia-ml-py
    assert isinstance(load_telemetry(), NoGpus)


def test_the_daemon_chooses_the_fake_gpu_by_env(gpu_dir, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GPUSCHED_FAKE_GPU_DIR", gpu_dir.path)
    assert isinstance(load_telemetry(), NoGpus | NvmlTelemetry)  # NVML's own loader never picks the fake
    telemetry = choose_telemetry()
    assert isinstance(telemetry, FakeGpuTelemetry)
    assert [g.uuid for g in telemetry.gpus()] == [GPU0, GPU1]
    monkeypatch.delenv("GPUSCHED_FAKE_GPU_DIR")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert isinstance(choose_telemetry(), NoGpus)


def test_fake_nvml_counts_like_nvml(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    a = spawn_model(vram=100 * MIB).pids[0]
    b = spawn_model(vram=50 * MIB, gpu=GPU1).pids[0]
    gpu_dir.allocate("other", 10 * MIB, GPU0)
    nvml = FakeGpuTelemetry(gpu_dir.path)
    assert nvml.vram_by_pid() == {a: {GPU0: 100 * MIB}, b: {GPU1: 50 * MIB}}
    assert [(g.used_bytes, g.free_bytes) for g in nvml.gpus()] == [
        (110 * MIB, GIB - 110 * MIB),
        (50 * MIB, GIB - 50 * MIB),
    ]


def test_choose_checkpoint(gpu_dir, fakecuda_lib, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("GPUSCHED_CHECKPOINT_HELPER", raising=False)
    assert isinstance(choose_checkpoint("none"), NoCheckpoint)
    assert isinstance(choose_checkpoint("auto"), DriverCheckpoint)
    monkeypatch.setenv("GPUSCHED_CHECKPOINT_HELPER", "1")
    helper = choose_checkpoint("auto")
    assert isinstance(helper, CliCheckpoint) and helper.name == "driver"
    monkeypatch.delenv("GPUSCHED_CHECKPOINT_HELPER")
    # A driver without the API: auto falls back to the binary if there is one, else none.
    monkeypatch.setenv("GPUSCHED_LIBCUDA", str(fakecuda_lib.parent / "nockpt" / "libcuda.so.1"))
    tool = str(FAKECUDA / "cuda-checkpoint")
    assert choose_checkpoint("auto", tool).name == "cli"
    assert isinstance(choose_checkpoint("auto", str(tmp_path / "missing")), NoCheckpoint)
    with pytest.raises(BackendUnavailable):
        choose_checkpoint("driver")
    with pytest.raises(BackendUnavailable):
        choose_checkpoint("cli", str(tmp_path / "missing"))


def test_host_memory_probes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < hostmem.mem_available_bytes() <= total
    assert hostmem.rss_bytes(os.getpid()) > 1 << 20
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    assert hostmem.rss_bytes(reaped.pid) == 0
    thp = tmp_path / "thp"
    thp.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(thp)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "none")) == ""
