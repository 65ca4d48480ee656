"""The whole daemon under a real systemd with a real GPU: a PyTorch unit run, frozen and thawed through the CLI
and the bus, checked against NVML, the journal and its own tensors.

Runs inside the GPU sandbox (skipped elsewhere), e.g. on the GPU machine (.carry/gpu made here by
`tools/gpu-sandbox.sh fetch .carry/gpu`):
    tools/gpu-sandbox.sh with .carry/gpu env PYTHONPATH=.carry/site /opt/torch/.venv/bin/python3 \\
        -m pytest -p no:cacheprovider tests/gpu/test_daemon_gpu.py -v
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polling import wait_until

pytestmark = pytest.mark.gpu

MODEL = str(Path(__file__).with_name("torch_model.py"))
MIB = 1024


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}"
    return done.stdout


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
    return wait_until(
        f"the model in {d} to be ready",
        lambda: [int(f.name.split(".")[1]) for f in d.glob("status.*") if not f.name.endswith(".tmp")],
        120.0,
        poll=0.1,
    )


def counter(d: Path, pid: int) -> int:
    return int(json.loads((d / f"status.{pid}").read_text())["counter"])


def verified(d: Path, pid: int) -> bool:
    """The model re-hashes its tensors (and replays its CUDA graph) and says whether they are as at its start."""
    os.kill(pid, signal.SIGUSR1)
    wait_until(f"process {pid}'s verification", (d / f"verify.{pid}").exists, 60.0, poll=0.1)
    return bool(json.loads((d / f"verify.{pid}").read_text())["ok"])


def model_dir(name: str) -> Path:
    d = Path(f"/var/tmp/gpusched-daemon-test-{name}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def test_daemon_freezes_and_thaws_a_pytorch_unit(daemon: None) -> None:
    import pynvml

    d = model_dir("torch")
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
        assert verified(d, pid), "tensors changed across freeze/thaw"

        events = sh("journalctl", "--no-pager", "-o", "json", "GPUSCHED_MODEL=torch", "GPUSCHED_EVENT=freeze")
        entry = json.loads(events.splitlines()[-1])
        assert int(entry["GPUSCHED_BYTES"]) >= MIB << 20
        assert entry["OBJECT_SYSTEMD_UNIT"] == "gpusched-model@torch.service"
        print(sh("gpusched", "status"))
    finally:
        subprocess.run(["gpusched", "stop", "torch"])


def test_the_fast_path_under_systemd(daemon: None) -> None:
    """gpusched run --agent: the model's agent listens in its unit's RuntimeDirectory, the daemon (sandboxed by
    its unit) parks through it, the driver takes the rest, and every tensor and a CUDA graph come back intact."""
    d = model_dir("fast")
    src = Path(__file__).resolve().parents[2] / "src"  # the model imports gpuschedd.agent from the checkout
    argv = [sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d), "--agent"]
    sh("gpusched", "run", "--name", "fast", "--agent", f"--setenv=PYTHONPATH={src}", "--", *argv)
    try:
        [pid] = ready(d)
        path = "/org/gpusched1/model/fast"
        for _cycle in range(2):
            sh("gpusched", "freeze", "fast")
            assert prop(path, "org.gpusched1.Model", "FreezePath") == '"agent"'
            assert int(prop(path, "org.gpusched1.Model", "ParkedBytes")) >= MIB << 20
            sh("gpusched", "thaw", "fast")
            assert verified(d, pid), "tensors or the CUDA graph changed across freeze/thaw"
        print(sh("gpusched", "status", "fast"))
    finally:
        subprocess.run(["gpusched", "stop", "fast"])


def test_a_page_out_spills_the_parked_bytes_and_the_thaw_reads_them_back(daemon: None) -> None:
    """The disk tier under systemd with the real driver: an agent model's page-out writes what its agent parked to
    a spill file of the daemon's (no swap needed: the rest stays in RAM), the thaw has the agent read the file's
    first bytes ahead beside the driver's restore and the rest after it, and every tensor comes back."""
    d = model_dir("spill")
    src = Path(__file__).resolve().parents[2] / "src"
    argv = [sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d), "--agent"]
    sh("gpusched", "run", "--name", "spill", "--agent", f"--setenv=PYTHONPATH={src}", "--", *argv)
    try:
        [pid] = ready(d)
        path = "/org/gpusched1/model/spill"
        since = sh("date", "+%Y-%m-%d %H:%M:%S").strip()
        sh("gpusched", "freeze", "spill")
        parked = int(prop(path, "org.gpusched1.Model", "ParkedBytes"))
        assert parked >= MIB << 20
        print(sh("gpusched", "page-out", "spill"))
        assert int(prop(path, "org.gpusched1.Model", "SnapshotFileBytes")) == parked
        assert any("(deleted)" in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
        sh("gpusched", "thaw", "spill")
        assert prop(path, "org.gpusched1.Model", "SnapshotFileBytes") == "0"
        assert verified(d, pid), "tensors or the CUDA graph changed across the spill file"
        log = sh("journalctl", "--no-pager", "-u", "gpuschedd", "--since", since)
        assert f"the agent of pid {pid} reads {min(parked, 512 << 20)} bytes ahead" in log  # READ_AHEAD_BYTES
    finally:
        subprocess.run(["gpusched", "stop", "spill"])


def test_an_unmodified_program_of_a_group_member(daemon: None) -> None:
    """Issue 16 under systemd: a user in group gpusched runs, over busctl, a PyTorch program that imports nothing of
    gpuschedd, with InjectAgent; the daemon (sandboxed by its unit) parks it through the preloaded interposer while
    its matmuls run, and every tensor and its CUDA graph come back; the user's own calls are all it takes."""
    user = "gs-gpuuser"
    if subprocess.run(["id", user], capture_output=True).returncode:
        sh("useradd", "--system", "--no-create-home", "--groups", "gpusched", user)
    d = model_dir("inject")
    shutil.chown(d, user)
    argv = [sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d), "--matmul"]
    bus = ["runuser", "-u", user, "--", "busctl", "--timeout=120", "--", "call", "org.gpusched1", "/org/gpusched1"]
    manager = [*bus, "org.gpusched1.Manager"]
    sh(*manager, "Run", "sasa{sv}", "inject", str(len(argv)), *argv, "1", "InjectAgent", "b", "true")
    try:
        [pid] = ready(d)
        path = "/org/gpusched1/model/inject"
        assert prop(path, "org.gpusched1.Model", "Owner") == sh("id", "-u", user).strip()
        assert prop(path, "org.gpusched1.Model", "InjectAgent") == "true"
        assert "libgpuschedd-preload.so" in Path(f"/proc/{pid}/maps").read_text()
        for _cycle in range(2):
            sh(*manager, "Freeze", "s", "inject")
            assert prop(path, "org.gpusched1.Model", "State") == '"frozen"'
            assert prop(path, "org.gpusched1.Model", "FreezePath") == '"agent"'
            assert int(prop(path, "org.gpusched1.Model", "ParkedBytes")) >= MIB << 20
            sh(*manager, "Thaw", "s", "inject")
            assert verified(d, pid), "tensors or the CUDA graph changed across freeze/thaw"
        print(sh("gpusched", "status", "inject"))
    finally:
        subprocess.run(["gpusched", "stop", "inject"])


def first_line(port: int) -> tuple[float, str]:
    """Seconds from connecting to 127.0.0.1:port to the first byte, and the line received."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        first = s.recv(1)
        elapsed = time.monotonic() - t0
        line = (first + s.makefile("rb").readline()).decode().strip()
    return elapsed, line


def test_a_connection_wakes_a_frozen_pytorch_model(daemon: None) -> None:
    """Wake on first connection with a real CUDA model: the first connection to the public port of a frozen model
    thaws it and gets its answer, computed on the GPU from its tensors, as before the freeze. Prints connect ->
    first byte for a cold start, a frozen model and a running one (docs/configuration.md)."""
    d = model_dir("wake")
    port, backend = 18080, 18081
    argv = [sys.executable, MODEL, "--mib", str(MIB), "--dir", str(d), "--port", str(backend)]
    t0 = time.monotonic()
    sh("gpusched", "run", "--name", "wake", "--port", str(port), "--backend-port", str(backend), "--", *argv)
    try:
        cold, answer = first_line(port)
        run_to_byte = time.monotonic() - t0
        path = "/org/gpusched1/model/wake"
        sh("gpusched", "freeze", "wake")
        assert prop(path, "org.gpusched1.Model", "State") == '"frozen"'
        frozen, again = first_line(port)
        assert again == answer, "the model answered differently after the wake"
        assert prop(path, "org.gpusched1.Model", "State") == '"running"'
        running, _ = first_line(port)
        print(
            f"\nwake, {MIB} MiB PyTorch model: connect->first byte: cold start {cold * 1000:.0f} ms (Run->first byte"
            f" {run_to_byte * 1000:.0f} ms), frozen {frozen * 1000:.0f} ms, running {running * 1000:.1f} ms"
        )
    finally:
        subprocess.run(["gpusched", "stop", "wake"])
