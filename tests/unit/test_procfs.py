"""procfs.holds_open: what the freeze's scan reads to spare the driver a question about a process without CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpuschedd.procfs import holds_open


@pytest.fixture
def device(tmp_path: Path) -> Path:
    path = tmp_path / "dev" / "nvidiactl"
    path.parent.mkdir()
    path.touch()
    return path


def test_a_process_holding_the_device_open(device: Path) -> None:
    with device.open("rb") as f:
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        assert holds_open(proc.pid, str(device.parent / "nvidia")) is True
        assert holds_open(proc.pid, str(device.parent / "nvidia-uvm")) is False, "a prefix, not any file"
    finally:
        proc.kill()
        proc.wait()


def test_a_process_without_it(device: Path, sleeper: subprocess.Popen[bytes]) -> None:
    assert holds_open(sleeper.pid, str(device.parent / "nvidia")) is False


def test_a_process_gone(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.kill()
    sleeper.wait()
    assert holds_open(sleeper.pid, "/") is False
