"""The cli backend (cuda-checkpoint's command line) against a stand-in that runs the driver helper over the
fake libcuda: the flags it passes, state parsing, the tool's stderr as the reason, and the helper mode."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from fakegpu_fixtures import FAKECUDA, GPU0, GPU1

from gpuschedd.checkpoint import CheckpointError, CudaState
from gpuschedd.checkpoint.cuda_checkpoint import CliCheckpoint
from gpuschedd.checkpoint.helper import helper_backend


@pytest.fixture
def cli(gpu_dir, monkeypatch) -> CliCheckpoint:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKECUDA_PYTHON", sys.executable)
    return CliCheckpoint(str(FAKECUDA / "cuda-checkpoint"))


def argv_log(gpu_dir) -> list[str]:  # type: ignore[no-untyped-def]
    return (Path(gpu_dir.path) / "cli-argv").read_text().splitlines()


def test_cycle_with_the_tools_flags(cli, gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    assert cli.name == "cli"
    assert cli.state(pid) == CudaState.RUNNING
    cli.lock(pid, 1500)
    cli.checkpoint(pid)
    assert cli.state(pid) == CudaState.CHECKPOINTED
    cli.restore(pid, [(GPU0, GPU1), (GPU1, GPU0)])
    cli.unlock(pid)
    assert cli.state(pid) == CudaState.RUNNING
    assert argv_log(gpu_dir) == [
        f"--get-state --pid {pid}",
        f"--action lock --pid {pid} --timeout 1500",
        f"--action checkpoint --pid {pid}",
        f"--get-state --pid {pid}",
        f"--action restore --pid {pid} --device-map {GPU0}={GPU1},{GPU1}={GPU0}",
        f"--action unlock --pid {pid}",
        f"--get-state --pid {pid}",
    ]


def test_failure_carries_the_tools_stderr(cli, gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    with pytest.raises(CheckpointError) as e:
        cli.checkpoint(pid)
    assert (e.value.pid, e.value.step) == (pid, "checkpoint")
    assert "CUDA_ERROR_ILLEGAL_STATE" in e.value.reason
    assert cli.state(pid) == CudaState.RUNNING


def test_cuda_pids(cli, spawn_model) -> None:  # type: ignore[no-untyped-def]
    pid = spawn_model().pids[0]
    assert cli.cuda_pids([os.getpid(), pid]) == [pid]


def test_missing_binary() -> None:
    cli = CliCheckpoint("/nonexistent/cuda-checkpoint")
    with pytest.raises(CheckpointError) as e:
        cli.cuda_pids([1])
    assert e.value.reason.endswith("not found")


def test_helper_mode_is_the_driver_out_of_process(gpu_dir, spawn_model) -> None:  # type: ignore[no-untyped-def]
    model = spawn_model()
    pid = model.pids[0]
    helper = helper_backend()
    assert helper.name == "driver"
    helper.lock(pid, 1000)
    helper.checkpoint(pid)
    with pytest.raises(CheckpointError) as e:
        helper.checkpoint(pid)
    assert e.value.reason == "CUDA_ERROR_ILLEGAL_STATE", "the same reason as the in-process driver"
    helper.restore(pid)
    helper.unlock(pid)
    assert model.moves()
    inits = [p for step, p, _ in gpu_dir.log() if step == "init"]
    assert len(set(inits)) == 5 and os.getpid() not in inits, "each step ran cuInit in its own short-lived helper"
