"""The installed daemon on a fake GPU, inside the sandbox: the fake libcuda (tests/fakecuda) built into the guest,
its state directory, and a drop-in for gpuschedd.service that points the daemon's driver backend and telemetry at
them (docs/checkpoint.md, "The fake GPU for CI"). Models are tests/fakecuda/fake_model.py processes: CUDA
processes as far as the daemon can tell, each counting in a file while its CUDA state is RUNNING.

Also the checks every reliability test ends with: a model's state as the daemon reports it matches its unit, its
cgroup (the kernel's cgroup.events) and the fake driver's state of every one of its processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sysutil import (
    GUEST_PYTHON,
    REPO,
    WORKDIR,
    cgroup_frozen,
    get_property,
    gpusched,
    list_models,
    model_unit,
    name_has_owner,
    run,
    unit_property,
    wait_until,
)

from gpuschedd.checkpoint import CudaState
from gpuschedd.testing.fakegpu import FakeGpuDir

sys.path.insert(0, str(REPO / "tests" / "fakecuda"))
from build import build

FAKE_DIR = Path("/run/fakegpu")
LIB_DIR = Path("/run/fakegpu-lib")
DROPIN = Path("/run/systemd/system/gpuschedd.service.d/50-fakegpu.conf")
CONF = Path("/etc/gpusched/gpuschedd.conf")
FAKE_MODEL = REPO / "tests" / "fakecuda" / "fake_model.py"
GPU0 = "GPU-f0f0f0f0-0000-1111-2222-333344440000"
GPU1 = "GPU-f0f0f0f0-0000-1111-2222-333344441111"
GIB = 1 << 30
MIB = 1 << 20
LOCK_TIMEOUT_SEC = 1

DAEMON = "gpuschedd.service"


def daemon_pid() -> int:
    return int(unit_property(DAEMON, "MainPID") or 0)


def wait_for_daemon(old_pid: int = 0, timeout: float = 60) -> int:
    """A gpuschedd other than old_pid owns the bus name (so it has taken over every model) and is active."""
    wait_until(
        "a new gpuschedd owning org.gpusched1",
        lambda: daemon_pid() not in (0, old_pid) and name_has_owner(),
        timeout,
    )
    wait_until("gpuschedd.service active", lambda: unit_property(DAEMON, "ActiveState") == "active", timeout)
    return daemon_pid()


def restart_daemon() -> int:
    old = daemon_pid()
    run("systemctl", "reset-failed", DAEMON, check=False)  # clears the start rate limit too
    run("systemctl", "restart", DAEMON, timeout=120)
    return wait_for_daemon(old)


def kill_daemon() -> int:
    """kill -9 the daemon, as a crash would; systemd restarts it (Restart=on-failure). Returns the new PID."""
    old = daemon_pid()
    assert old
    run("systemctl", "reset-failed", DAEMON, check=False)  # many restarts in a row must not hit the start limit
    os.kill(old, signal.SIGKILL)
    return wait_for_daemon(old)


def manager_property(prop: str) -> Any:
    return get_property("/org/gpusched1", "org.gpusched1.Manager", prop)


@contextlib.contextmanager
def fake_gpu_daemon(gpu_bytes: int = 4 * GIB) -> Iterator[FakeGpuDir]:
    """gpuschedd.service on the fake GPU (two GPUs of gpu_bytes) for the duration; put back as it was after."""
    shutil.rmtree(FAKE_DIR, ignore_errors=True)
    fake = FakeGpuDir(str(FAKE_DIR))
    fake.add_gpu(GPU0, 0, gpu_bytes)
    fake.add_gpu(GPU1, 1, gpu_bytes)
    lib = build(str(LIB_DIR))
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text(
        "[Service]\n"
        f"Environment=GPUSCHED_LIBCUDA={lib} GPUSCHED_FAKE_GPU_DIR={FAKE_DIR} FAKECUDA_DIR={FAKE_DIR}"
        f" GPUSCHED_NVIDIA_DEVICES={fake.devices}\n"
        # ProtectSystem=strict: the fake driver keeps its state in files the daemon writes
        f"ReadWritePaths={FAKE_DIR}\n"
    )
    saved_conf = CONF.read_text() if CONF.exists() else None
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(f"[Daemon]\nCheckpointBackend=driver\nLockTimeoutSec={LOCK_TIMEOUT_SEC}\n")
    os.makedirs(WORKDIR, exist_ok=True)
    try:
        run("systemctl", "daemon-reload")
        restart_daemon()
        assert manager_property("CheckpointBackend") == "driver"
        yield fake
    finally:
        DROPIN.unlink(missing_ok=True)
        if saved_conf is None:
            CONF.unlink(missing_ok=True)
        else:
            CONF.write_text(saved_conf)
        run("systemctl", "daemon-reload")
        restart_daemon()


# --- models ----------------------------------------------------------------------------------------------------


@dataclass
class FakeModel:
    name: str
    procs: int

    @property
    def unit(self) -> str:
        return model_unit(self.name)

    def counter_path(self, i: int = 0) -> Path:
        base = WORKDIR / f"{self.name}.count"
        return base if i == 0 else Path(f"{base}.{i}")

    def count(self, i: int = 0) -> int:
        try:
            return int(self.counter_path(i).read_text())
        except (OSError, ValueError):
            return 0

    def cuda_pids(self, fake: FakeGpuDir) -> list[int]:
        """The unit's processes that hold a fake CUDA context, the main process first."""
        main = int(unit_property(self.unit, "MainPID") or 0)
        pids = {c.pid for c in fake.contexts()} & cgroup_pids_of(self.unit)
        return sorted(pids, key=lambda p: (p != main, p))

    def assert_moving(self, timeout: float = 10) -> None:
        for i in range(self.procs):
            start = self.count(i)
            wait_until(f"{self.counter_path(i)} to count past {start + 1}", lambda: self.count(i) > start + 1, timeout)  # noqa: B023

    def assert_still(self, seconds: float = 0.4) -> None:
        start = [self.count(i) for i in range(self.procs)]
        time.sleep(seconds)
        assert [self.count(i) for i in range(self.procs)] == start, f"{self.name} still counts"


def cgroup_pids_of(unit: str) -> set[int]:
    cg = unit_property(unit, "ControlGroup")
    if not cg:
        return set()
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup" + cg).rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def fake_model_argv(name: str, vram: int, procs: int, gpu: str = GPU0) -> list[str]:
    return [
        GUEST_PYTHON, str(FAKE_MODEL), "--dir", str(FAKE_DIR), "--vram", str(vram), "--gpu", gpu,
        "--counter", str(WORKDIR / f"{name}.count"), "--procs", str(procs),
    ]  # fmt: skip


@dataclass
class FakeModels:
    """Runs fake CUDA models through the CLI; removes whatever a test left behind."""

    prefix: str
    fake: FakeGpuDir
    started: list[FakeModel] = field(default_factory=list)

    def run(self, suffix: str, vram: int = 64 * MIB, procs: int = 2, gpu: str = GPU0) -> FakeModel:
        model = FakeModel(f"{self.prefix}-{suffix}", procs)
        self.started.append(model)
        gpusched("run", "--name", model.name, "--", *fake_model_argv(model.name, vram, procs, gpu))
        wait_until(f"{model.name}'s {procs} CUDA processes", lambda: len(model.cuda_pids(self.fake)) == procs)
        model.assert_moving()
        return model

    def cleanup(self) -> None:
        self.fake.clear_holds()  # first: a held copy would keep the stops waiting
        for model in self.started:
            gpusched("stop", model.name, check=False)
            gpusched("forget", model.name, check=False)
            run("systemctl", "stop", model.unit, check=False)
            run("systemctl", "reset-failed", model.unit, check=False)
            for i in range(model.procs):
                model.counter_path(i).unlink(missing_ok=True)
        self.fake.clear_failures()
        self.fake.clear_delays()
        for name in os.listdir(os.path.join(self.fake.path, "busy")):
            os.unlink(os.path.join(self.fake.path, "busy", name))


# --- the truth, checked --------------------------------------------------------------------------------------------


def check_consistent(name: str, fake: FakeGpuDir) -> str:
    """The daemon's state of a model agrees with systemd, the kernel and the driver; returns that state.

    running: unit active, FreezerState running, cgroup.events frozen 0, every CUDA process RUNNING.
    frozen: unit active, FreezerState frozen, cgroup.events frozen 1, every CUDA process CHECKPOINTED.
    stopped/failed: no process left in a live unit."""
    state = list_models()[name]["state"]
    unit = model_unit(name)
    active = unit_property(unit, "ActiveState")
    if state in ("stopped", "failed"):
        assert active in ("inactive", "failed", ""), f"{name} is {state} but its unit is {active}"
        return state
    assert state in ("running", "frozen"), f"{name} is still {state}"
    assert active == "active", f"{name} is {state} but its unit is {active}"
    frozen = state == "frozen"
    assert unit_property(unit, "FreezerState") == state, f"{name}: FreezerState is not {state}"
    assert cgroup_frozen(unit) == frozen, f"{name}: cgroup.events disagrees with {state}"
    want = CudaState.CHECKPOINTED if frozen else CudaState.RUNNING
    pids = {c.pid for c in fake.contexts()} & cgroup_pids_of(unit)
    got = {pid: fake.state(pid) for pid in pids}
    assert all(s == want for s in got.values()), f"{name} is {state} but its CUDA processes are {got}"
    return state


def journal_entries(*matches: str) -> list[dict[str, Any]]:
    out = run("journalctl", "--no-pager", "-o", "json", *matches).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]
