"""The cgroupfs unit backend against real cgroup v2 groups (needs root and a writable cgroup2 mount; skipped
elsewhere): spawn into a group, freeze until the kernel says frozen, thaw, stop without leftovers, exit codes,
and finding units again after a daemon restart."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from counters import amoves, astill, file_counter
from fakegpu_fixtures import GPU0, MIB, fake_model_argv, registered
from polling import until

from gpuschedd.checkpoint import CudaState
from gpuschedd.checkpoint.driver import DriverCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import UnitFailed
from gpuschedd.model import State
from gpuschedd.options import RunOptions
from gpuschedd.testing.fakegpu import FakeGpuTelemetry
from gpuschedd.units import UnitSpec, UnitStatus
from gpuschedd.units.cgroup import cgroup2_mount, procs_below
from gpuschedd.units.cgroupfs import CgroupfsUnits

COUNTER = 'i=0; while :; do i=$((i+1)); echo $i > "$0"; sleep 0.01; done'


def _cgroup_root() -> str | None:
    mount = cgroup2_mount()
    if os.geteuid() != 0 or mount is None or not os.access(os.path.join(mount, "cgroup.procs"), os.W_OK):
        return None
    return mount


ROOT = _cgroup_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="needs root and a writable cgroup v2 hierarchy")


@pytest.fixture
async def units(tmp_path: Path):  # type: ignore[no-untyped-def]
    assert ROOT is not None
    backend = CgroupfsUnits(os.path.join(ROOT, f"gpusched-test-{uuid.uuid4().hex[:8]}"), log_dir=str(tmp_path / "log"))
    await backend.setup()
    yield backend
    for name in os.listdir(backend.root):
        if os.path.isdir(os.path.join(backend.root, name)):
            await backend.stop(name)
    os.rmdir(backend.root)


def count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def spec(unit: str, *argv: str, **kw: object) -> UnitSpec:
    return UnitSpec(unit=unit, argv=list(argv), description="test", **kw)  # type: ignore[arg-type]


async def test_spawn_freeze_thaw_stop(units: CgroupfsUnits, tmp_path: Path) -> None:
    counter = tmp_path / "n"
    status = await units.start(spec("gpusched-model@a.service", "/bin/sh", "-c", COUNTER, str(counter)))
    group = Path(units.root) / "gpusched-model@a.service"
    assert status.active_state == "active" and status.main_pid in status.pids
    assert int((group / "cgroup.procs").read_text().split()[0]) == status.main_pid
    await until("the model to count", lambda: count(counter) > 0)

    await units.freeze(status.unit)
    assert "frozen 1" in (group / "cgroup.events").read_text()
    assert (await units.status(status.unit)).frozen  # type: ignore[union-attr]
    assert await astill(file_counter(counter))
    await units.thaw(status.unit)
    assert "frozen 0" in (group / "cgroup.events").read_text()
    assert await amoves(file_counter(counter))

    pids = list(status.pids)
    await units.freeze(status.unit)
    await units.stop(status.unit)  # a frozen unit stops too
    assert not group.exists()
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert await units.status(status.unit) is None


async def test_environment_cwd_user_and_log(units: CgroupfsUnits, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(UnitFailed, match="cannot enter"):  # the directory is entered as the user, like systemd
        await units.start(spec("gpusched-model@u.service", "/bin/true", working_directory=str(tmp_path), user="nobody"))
    work = Path(tempfile.mkdtemp(prefix="gpusched-cwd-"))  # pytest's own tmp tree is root-only
    try:
        work.chmod(0o755)
        out = work / "out"
        out.mkdir()
        os.chown(out, nobody.pw_uid, nobody.pw_gid)
        script = 'echo "$GREETING $(id -u) $(pwd)" > out/said; echo to-the-log; exec sleep 60'
        status = await units.start(
            spec(
                "gpusched-model@u.service",
                "/bin/sh",
                "-c",
                script,
                working_directory=str(work),
                environment=["GREETING=hi"],
                user="nobody",
            )
        )
        await until("the unit's output", lambda: (out / "said").exists() and (out / "said").read_text())
        assert (out / "said").read_text().split() == ["hi", str(nobody.pw_uid), str(work)]
        assert status.user == "nobody"
        log = Path(units.log_dir or "") / "gpusched-model@u.service.log"
        await until("the log line", lambda: "to-the-log" in log.read_text())
    finally:
        shutil.rmtree(work)


async def test_exit_is_watched_with_its_result(units: CgroupfsUnits) -> None:
    seen: list[UnitStatus] = []
    units.watch(seen.append)
    await units.start(spec("gpusched-model@ok.service", "/bin/sh", "-c", "sleep 0.1"))
    await units.start(spec("gpusched-model@bad.service", "/bin/sh", "-c", "sleep 60 & exit 3"))
    await until("both units' ends", lambda: len(seen) == 2)
    by_unit = {s.unit: s for s in seen}
    assert by_unit["gpusched-model@ok.service"].active_state == "inactive"
    assert by_unit["gpusched-model@ok.service"].result == "success"
    assert (by_unit["gpusched-model@bad.service"].active_state, by_unit["gpusched-model@bad.service"].result) == (
        "failed",
        "exit-code",
    )
    # The main process left a child behind: it went with the unit, like KillMode=control-group.
    assert not (Path(units.root) / "gpusched-model@bad.service").exists()


async def test_a_restarted_daemon_finds_its_units(units: CgroupfsUnits, tmp_path: Path) -> None:
    first = await units.start(spec("gpusched-model@r.service", "/bin/sleep", "60"))
    await units.freeze(first.unit)
    again = CgroupfsUnits(units.root)
    found = await again.list_units("gpusched-model@")
    assert [(s.unit, s.main_pid, s.command, s.frozen) for s in found] == [
        (first.unit, first.main_pid, ["/bin/sleep", "60"], True)
    ]
    await again.stop(first.unit)
    assert await units.status(first.unit) is None


async def test_start_refuses_a_live_unit_and_a_missing_program(units: CgroupfsUnits) -> None:
    await units.start(spec("gpusched-model@x.service", "/bin/sleep", "60"))
    with pytest.raises(UnitFailed):
        await units.start(spec("gpusched-model@x.service", "/bin/sleep", "60"))
    with pytest.raises(UnitFailed):
        await units.freeze("gpusched-model@nothing.service")


async def test_engine_freezes_a_cuda_model_in_its_cgroup(units: CgroupfsUnits, gpu_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The whole CPU side: engine + cgroupfs + driver backend over the fake libcuda + fake NVML."""
    engine = Engine(units, DriverCheckpoint(), FakeGpuTelemetry(gpu_dir.path), Config(ram_budget_bytes=4 << 30))
    await engine.start()
    argv = fake_model_argv(gpu_dir, tmp_path / "n", 128 * MIB, GPU0, procs=2)
    model = await engine.run("llm", argv, RunOptions(environment=[f"FAKECUDA_DIR={gpu_dir.path}"]), 0)
    await until("registration", lambda: registered(gpu_dir, 2))
    await engine.freeze("llm")
    group = Path(units.root) / model.unit
    assert "frozen 1" in (group / "cgroup.events").read_text()
    assert sorted(model.cuda_pids) == sorted(int(p) for p in (group / "cgroup.procs").read_text().split())
    assert [gpu_dir.state(p) for p in model.cuda_pids] == [CudaState.CHECKPOINTED] * 2
    assert await astill(file_counter(tmp_path / "n"))
    await engine.thaw("llm")
    assert model.state == State.RUNNING and await amoves(file_counter(tmp_path / "n"))
    await engine.stop("llm")
    assert not group.exists()


def test_procs_below_reads_the_group_and_every_group_below(tmp_path: Path) -> None:
    """What systemd's GetUnitProcesses lists, from the files: the group's processes and its descendants'; a group
    that is gone is FileNotFoundError (the caller then asks systemd), a child without a procs file counts empty."""
    group = tmp_path / "gpusched.slice" / "gpusched-model@m.service"
    (group / "payload" / "inner").mkdir(parents=True)
    (group / "cgroup.procs").write_text("10\n11\n")
    (group / "payload" / "cgroup.procs").write_text("20\n")
    (group / "payload" / "inner" / "cgroup.procs").write_text("")
    (group / "empty").mkdir()
    (group / "cgroup.stat").write_text("nr_descendants 3\nnr_dying_descendants 0\n")
    assert sorted(procs_below(str(group))) == [10, 11, 20]
    (group / "payload" / "cgroup.stat").write_text("nr_descendants 1\nnr_dying_descendants 0\n")
    assert procs_below(str(group / "payload")) == [20]
    (group / "payload" / "inner" / "cgroup.stat").write_text("nr_descendants 0\nnr_dying_descendants 0\n")
    assert procs_below(str(group / "payload" / "inner")) == []
    with pytest.raises(FileNotFoundError):
        procs_below(str(tmp_path / "gone.service"))
