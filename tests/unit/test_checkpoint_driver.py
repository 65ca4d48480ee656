"""The driver backend's ctypes glue, through the fake libcuda: struct layouts, cuInit, the state machine,
error names, CUDA-PID detection, migration pairs, and the failures the real driver has."""

from __future__ import annotations

import ctypes
import os
import time

import pytest
from fakegpu_fixtures import GIB, GPU0, GPU1, MIB
from polling import wait_until

from gpuschedd.checkpoint import CheckpointError, CudaState
from gpuschedd.checkpoint.driver import (
    CUcheckpointGpuPair,
    CUcheckpointLockArgs,
    CUcheckpointRestoreArgs,
    DriverCheckpoint,
    load_driver_backend,
    uuid_bytes,
)
from gpuschedd.testing.fakegpu import FakeGpuTelemetry


def test_structs_match_the_driver_header() -> None:
    assert ctypes.sizeof(CUcheckpointLockArgs) == 64
    assert CUcheckpointLockArgs.timeoutMs.offset == 0 and CUcheckpointLockArgs.reserved1.offset == 8
    assert ctypes.sizeof(CUcheckpointRestoreArgs) == 64
    assert CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert ctypes.sizeof(CUcheckpointGpuPair) == 32


def test_uuid_bytes() -> None:
    assert uuid_bytes("GPU-00112233-4455-6677-8899-aabbccddeeff") == bytes.fromhex("00112233445566778899aabbccddeeff")
    with pytest.raises(ValueError):
        uuid_bytes("GPU-0011")


def test_missing_or_old_driver_means_no_backend(fakecuda_lib) -> None:  # type: ignore[no-untyped-def]
    assert load_driver_backend("/nonexistent/libcuda.so.1") is None
    assert load_driver_backend(str(fakecuda_lib.parent / "nockpt" / "libcuda.so.1")) is None


def test_cuinit_runs_in_the_calling_process(gpu_dir) -> None:  # type: ignore[no-untyped-def]
    DriverCheckpoint()
    assert ("init", os.getpid(), "CUDA_SUCCESS") in gpu_dir.log()


def test_full_cycle_moves_vram_into_the_process(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    model = spawn_model(vram=128 * MIB)
    pid = model.pids[0]
    driver = DriverCheckpoint()
    nvml = FakeGpuTelemetry(gpu_dir.path)
    assert driver.state(pid) == CudaState.RUNNING
    assert nvml.vram_by_pid() == {pid: {GPU0: 128 * MIB}}

    driver.lock(pid, 1000)
    assert driver.state(pid) == CudaState.LOCKED
    assert model.still(), "a locked process blocks in its next CUDA call"
    rss = _rss(pid)
    driver.checkpoint(pid)
    assert driver.state(pid) == CudaState.CHECKPOINTED
    assert _rss(pid) - rss >= 128 * MIB * 0.9, "the snapshot lives in the target's RSS"
    assert pid not in nvml.vram_by_pid(), "NVML stops listing a checkpointed process"
    assert nvml.gpus()[0].free_bytes == GIB

    driver.restore(pid)
    assert driver.state(pid) == CudaState.LOCKED
    driver.unlock(pid)
    assert driver.state(pid) == CudaState.RUNNING
    assert model.moves()
    # the process gives the snapshot up right after answering the restore, as the driver's thread frees its copy
    wait_until("the snapshot leaves the RSS", lambda: _rss(pid) < rss + 16 * MIB)
    steps = [(step, result) for step, p, result in gpu_dir.log() if p == pid]
    assert steps == [(s, "CUDA_SUCCESS") for s in ("lock", "checkpoint", "restore", "unlock")]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize(
    ("setup", "step"),
    [([], "checkpoint"), ([], "restore"), ([], "unlock"), (["lock", "checkpoint"], "lock"), (["lock"], "restore")],
)
def test_wrong_state_is_illegal_state(gpu_dir, spawn_model, setup, step) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    driver = DriverCheckpoint()
    for done in setup:
        getattr(driver, done)(pid, *([1000] if done == "lock" else []))
    before = driver.state(pid)
    with pytest.raises(CheckpointError) as e:
        getattr(driver, step)(pid, *([1000] if step == "lock" else []))
    assert (e.value.pid, e.value.step, e.value.reason) == (pid, step, "CUDA_ERROR_ILLEGAL_STATE")
    assert driver.state(pid) == before


def test_lock_timeout_leaves_the_process_running(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    model = spawn_model()
    pid = model.pids[0]
    gpu_dir.busy(pid, 5000)
    driver = DriverCheckpoint()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        driver.lock(pid, 200)
    assert 0.15 < time.monotonic() - t0 < 2.0, "the lock waits its timeout, not the busy time"
    assert e.value.reason == "CUDA_ERROR_NOT_READY"
    assert driver.state(pid) == CudaState.RUNNING
    assert model.moves()


def test_cuda_pids_keeps_only_processes_with_a_context(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    driver = DriverCheckpoint()
    assert driver.cuda_pids([os.getpid(), pid, dead]) == [pid]
    with pytest.raises(CheckpointError) as e:
        driver.state(os.getpid())
    assert e.value.reason == "CUDA_ERROR_OPERATING_SYSTEM"


def test_cuda_pids_refuses_an_unexpected_driver_error(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    gpu_dir.fail(pid, "get-state", "CUDA_ERROR_NOT_SUPPORTED")
    with pytest.raises(CheckpointError) as e:
        DriverCheckpoint().cuda_pids([pid])
    assert (e.value.step, e.value.reason) == ("get-state", "CUDA_ERROR_NOT_SUPPORTED")


def test_restore_out_of_memory_breaks_the_process_like_the_real_driver(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model(vram=512 * MIB).pids[0]
    driver = DriverCheckpoint()
    driver.lock(pid, 1000)
    driver.checkpoint(pid)
    gpu_dir.allocate("hog", 768 * MIB, GPU0)
    with pytest.raises(CheckpointError) as e:
        driver.restore(pid)
    assert e.value.reason == "CUDA_ERROR_OUT_OF_MEMORY"
    assert driver.state(pid) == CudaState.CHECKPOINTED
    gpu_dir.free("hog")
    with pytest.raises(CheckpointError) as e:
        driver.restore(pid)
    assert e.value.reason == "CUDA_ERROR_OPERATING_SYSTEM", "cuda-checkpoint issue 44: unrecoverable"


def test_restore_onto_another_gpu(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model(vram=256 * MIB).pids[0]
    driver = DriverCheckpoint()
    driver.lock(pid, 1000)
    driver.checkpoint(pid)
    with pytest.raises(CheckpointError) as e:
        driver.restore(pid, [(GPU1, GPU0)])
    assert e.value.reason == "CUDA_ERROR_INVALID_VALUE", "the pairs must cover the process's GPU"
    driver.restore(pid, [(GPU0, GPU1), (GPU1, GPU0)])
    driver.unlock(pid)
    assert FakeGpuTelemetry(gpu_dir.path).vram_by_pid() == {pid: {GPU1: 256 * MIB}}


def test_restore_needs_the_target_running(gpu_dir, spawn_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The restore work runs on a thread inside the target: a stopped target cannot be restored, nor asked."""
    monkeypatch.setenv("FAKECUDA_AGENT_TIMEOUT_MS", "300")
    pid = spawn_model().pids[0]
    driver = DriverCheckpoint()
    driver.lock(pid, 1000)
    driver.checkpoint(pid)
    os.kill(pid, 19)  # SIGSTOP, as the cgroup freezer would
    try:
        with pytest.raises(CheckpointError):
            driver.restore(pid)
        # Nor can its state be read: the real driver blocks (measured on 580, H100), the fake times out.
        with pytest.raises(CheckpointError, match="CUDA_ERROR_TIMEOUT"):
            driver.state(pid)
    finally:
        os.kill(pid, 18)  # SIGCONT
    assert driver.state(pid) == CudaState.CHECKPOINTED
    driver.restore(pid)
    driver.unlock(pid)
