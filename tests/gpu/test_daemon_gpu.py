"""The whole daemon under a real systemd with a real GPU: a PyTorch unit run, frozen and thawed through the CLI
and the bus, checked against NVML, the journal and its own tensors.

Runs inside the GPU sandbox (skipped elsewhere), e.g. on the GPU machine:
    tools/gpu-sandbox.sh with .carry/gpu env PYTHONPATH=.carry/site /opt/torch/.venv/bin/python3 \\
        -m pytest -p no:cacheprovider tests/gpu/test_daemon_gpu.py -v
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

MODEL = str(Path(__file__).with_name("torch_model.py"))
MIB = 1024


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def prop(path: str, iface: str, name: str) -> str:
    return sh("busctl", "get-property", "org.gpusched1", path, iface, name).split(" ", 1)[1].strip()


@pytest.fixture
def daemon() -> None:
    if not os.path.exists("/dev/nvidiactl"):
        pytest.skip("no NVIDIA GPU")
    if shutil.which("gpusched") is None or not os.path.isdir("/run/systemd/system"):
        pytest.skip("needs gpuschedd installed and running under systemd (tools/gpu-sandbox.sh)")
    if subprocess.run(["systemctl", "is-active", "--quiet", "gpuschedd"]).returncode != 0:
        pytest.skip("gpuschedd.service is not running")


def ready(d: Path) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = [int(f.name.split(".")[1]) for f in d.glob("status.*") if not f.name.endswith(".tmp")]
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError("model not ready")


def counter(d: Path, pid: int) -> int:
    return int(json.loads((d / f"status.{pid}").read_text())["counter"])


def test_daemon_freezes_and_thaws_a_pytorch_unit(daemon: None) -> None:
    import pynvml

    d = Path("/var/tmp/gpusched-daemon-test")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    sh("gpusched", "run", "--name", "torch", "--", sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d))
    try:
        [pid] = ready(d)
        path = "/org/gpusched1/model/torch"
        assert prop("/org/gpusched1", "org.gpusched1.Manager", "CheckpointBackend") == '"driver"'
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        # Measured: NVML names the model's PID as the sandbox's PID namespace sees it.
        assert pid in [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        sh("gpusched", "list")  # ListModels refreshes PIDs and VRAM
        assert int(prop(path, "org.gpusched1.Model", "VramBytes")) >= MIB << 20
        used_running = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

        sh("gpusched", "freeze", "torch")
        assert prop(path, "org.gpusched1.Model", "State") == '"frozen"'
        assert int(prop(path, "org.gpusched1.Model", "SnapshotBytes")) >= MIB << 20
        assert used_running - int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) >= (MIB << 20) * 0.9
        unit_cg = sh("systemctl", "show", "-P", "ControlGroup", "gpusched-model@torch.service").strip()
        assert "frozen 1" in Path(f"/sys/fs/cgroup{unit_cg}/cgroup.events").read_text()
        frozen_at = counter(d, pid)
        time.sleep(0.5)
        assert counter(d, pid) == frozen_at

        # busctl, not gdbus: the GPU machine has no GLib tools
        sh("busctl", "call", "org.gpusched1", "/org/gpusched1", "org.gpusched1.Manager", "Thaw", "s", "torch")
        assert prop(path, "org.gpusched1.Model", "State") == '"running"'
        time.sleep(0.5)
        assert counter(d, pid) > frozen_at
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not (d / f"verify.{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads((d / f"verify.{pid}").read_text())["ok"], "tensors changed across freeze/thaw"

        events = sh("journalctl", "--no-pager", "-o", "json", "GPUSCHED_MODEL=torch", "GPUSCHED_EVENT=freeze")
        entry = json.loads(events.splitlines()[-1])
        assert int(entry["GPUSCHED_BYTES"]) >= MIB << 20
        assert entry["OBJECT_SYSTEMD_UNIT"] == "gpusched-model@torch.service"
        print(sh("gpusched", "status"))
    finally:
        subprocess.run(["gpusched", "stop", "torch"])
