"""Faults, for real: the daemon is SIGKILLed in the middle of a freeze and of a thaw (the fake libcuda made slow so the
kill lands inside a driver call), systemd restarts it, and every model must be accounted for, consistent and usable.
Also what the driver can do wrong (a lock that times out, a checkpoint that fails in one process of two), a model
that dies while frozen, status while a freeze is slow, and `systemctl stop` / a package upgrade under way."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import dbus
import pytest
from fakegpu_sys import (
    DAEMON,
    FAKE_DIR,
    GPU0,
    LIB_DIR,
    MIB,
    FakeModels,
    check_consistent,
    journal_entries,
    kill_daemon,
    manager_property,
    restart_daemon,
    wait_for_daemon,
)
from sysutil import (
    REPO,
    cgroup_frozen,
    gpusched,
    install_project,
    list_models,
    log,
    model_path,
    model_property,
    run,
    unit_property,
    wait_until,
)

from gpuschedd.checkpoint import CudaState
from gpuschedd.testing.fakegpu import FakeGpuDir

R, L, C = CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED
SLOW_MS = 8000  # a driver call this slow: the kill lands inside it


def states(fake: FakeGpuDir, pids: list[int]) -> list[CudaState | None]:
    return [fake.state(pid) for pid in pids]


def background(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["gpusched", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recovery_entry(name: str, interrupted: str) -> dict:
    return wait_until(
        f"a recovery entry for {name}",
        lambda: [
            e
            for e in journal_entries(f"GPUSCHED_MODEL={name}", "GPUSCHED_RECOVERY=1")
            if e.get("GPUSCHED_INTERRUPTED") == interrupted
        ],
    )[0]


def test_the_daemon_runs_on_the_fake_driver(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("basic")
    a, b = model.cuda_pids(fake)
    # ListModels answers from the table, whose VRAM the daemon re-reads from NVML every 2 s
    wait_until("ListModels to show the VRAM", lambda: list_models()[model.name]["vram_bytes"] == 2 * 64 * MIB)
    gpusched("freeze", model.name)
    assert states(fake, [a, b]) == [C, C] and check_consistent(model.name, fake) == "frozen"
    assert model_property(model.name, "SnapshotBytes") >= 2 * 64 * MIB * 0.9
    model.assert_still()
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"
    model.assert_moving()


# --- kill -9 in the middle --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slow", "when"),
    [
        ("checkpoint", [L, L]),  # both locked, the first checkpoint under way
        ("checkpoint", [C, L]),  # the first checkpointed, the second under way
    ],
    ids=["during-first-checkpoint", "during-second-checkpoint"],
)
def test_kill_during_a_freeze(fmodels: FakeModels, fake: FakeGpuDir, slow: str, when: list[CudaState]) -> None:
    bystander_frozen, bystander_running = fmodels.run("still", procs=1), fmodels.run("busy", procs=1)
    gpusched("freeze", bystander_frozen.name)
    model = fmodels.run("victim")
    a, b = model.cuda_pids(fake)
    fake.delay(a if when == [L, L] else b, slow, SLOW_MS)
    client = background("freeze", model.name)
    wait_until(f"the freeze to reach {when}", lambda: states(fake, [a, b]) == when)
    assert model_property(model.name, "State") == "freezing"
    fake.clear_delays()  # the call under way sleeps on; the recovery must not
    log(f"killing gpuschedd with pids {a}, {b} in {when}")
    kill_daemon()
    assert client.wait(30) != 0, "the caller of an interrupted freeze gets an error, not a success"

    # The rule: an interrupted freeze is rolled back to running.
    assert check_consistent(model.name, fake) == "running"
    assert states(fake, [a, b]) == [R, R]
    model.assert_moving()
    entry = recovery_entry(model.name, "freeze")
    assert "rolled back to running" in entry["MESSAGE"]
    # Every other model is accounted for, as it was.
    assert check_consistent(bystander_frozen.name, fake) == "frozen"
    assert check_consistent(bystander_running.name, fake) == "running"
    bystander_frozen.assert_still()
    # And usable.
    gpusched("freeze", model.name)
    assert check_consistent(model.name, fake) == "frozen"
    gpusched("thaw", model.name)
    gpusched("thaw", bystander_frozen.name)
    bystander_frozen.assert_moving()


@pytest.mark.parametrize(
    ("slow", "when"),
    [
        ("restore", [L, C]),  # the first restored (locked), the second restore under way
        ("unlock", [R, L]),  # the first unlocked, the second unlock under way
    ],
    ids=["during-second-restore", "during-second-unlock"],
)
def test_kill_during_a_thaw(fmodels: FakeModels, fake: FakeGpuDir, slow: str, when: list[CudaState]) -> None:
    bystander = fmodels.run("still", procs=1)
    gpusched("freeze", bystander.name)
    model = fmodels.run("victim")
    a, b = model.cuda_pids(fake)
    gpusched("freeze", model.name)
    fake.delay(b, slow, SLOW_MS)
    client = background("thaw", model.name)
    wait_until(f"the thaw to reach {when}", lambda: states(fake, [a, b]) == when)
    assert model_property(model.name, "State") == "thawing"
    fake.clear_delays()
    kill_daemon()
    client.wait(30)

    # The rule: an interrupted thaw is finished.
    assert check_consistent(model.name, fake) == "running"
    assert states(fake, [a, b]) == [R, R]
    model.assert_moving()
    assert manager_property("RamFrozenBytes") == model_property(bystander.name, "SnapshotBytes")
    assert "thaw finished" in recovery_entry(model.name, "thaw")["MESSAGE"]
    assert check_consistent(bystander.name, fake) == "frozen"
    gpusched("freeze", model.name)
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"


def test_a_frozen_model_keeps_its_thaw_check_across_a_crash(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """What the thaw needs free on each GPU was known only to the daemon before the crash: it must still be."""
    model = fmodels.run("parked", vram=512 * MIB)  # two processes: 1 GiB
    gpusched("freeze", model.name)
    snapshot = model_property(model.name, "SnapshotBytes")
    kill_daemon()
    assert check_consistent(model.name, fake) == "frozen"
    assert model_property(model.name, "SnapshotBytes") == snapshot
    assert manager_property("RamFrozenBytes") >= snapshot
    fake.allocate("squatter", 3584 * MIB, GPU0)  # 4 GiB GPU: 512 MiB free, the model needs 1 GiB
    try:
        proc = gpusched("thaw", model.name, check=False)
        assert proc.returncode != 0 and "InsufficientGpuMemory" in proc.stderr, proc.stderr
        assert check_consistent(model.name, fake) == "frozen"
        assert not any(fake.broken(pid) for pid in model.cuda_pids(fake))
    finally:
        fake.free("squatter")
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"
    model.assert_moving()


def test_a_model_saved_frozen_but_found_running_is_running(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Thawed wholly behind the daemon's back while none ran (systemctl thaw, then the driver's restore and unlock
    by hand): the saved table says frozen, the driver and NVML say it runs and holds its VRAM. The restarted daemon
    reports it running with that VRAM, and touches nothing (docs/reliability.md, rule 5)."""
    model = fmodels.run("byhand")
    pids = model.cuda_pids(fake)
    gpusched("freeze", model.name)
    run("systemctl", "stop", DAEMON)  # the models stay as they are
    run("systemctl", "thaw", model.unit)
    env = [f"PYTHONPATH={REPO / 'src'}", f"GPUSCHED_LIBCUDA={LIB_DIR / 'libcuda.so.1'}", f"FAKECUDA_DIR={FAKE_DIR}"]
    for action in ("restore", "unlock"):
        for pid in pids:
            run("env", *env, sys.executable, "-m", "gpuschedd.checkpoint.helper", "--action", action, "--pid", str(pid))
    model.assert_moving()
    restart_daemon()
    assert check_consistent(model.name, fake) == "running" and states(fake, pids) == [R, R]
    assert model_property(model.name, "VramBytes") == 2 * 64 * MIB and model_property(model.name, "SnapshotBytes") == 0
    entry = wait_until(
        "the recovery entry",
        lambda: journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_RECOVERY=1", "GPUSCHED_EVENT=thaw"),
    )[0]
    assert "saved frozen, found running" in entry["MESSAGE"]
    model.assert_moving()
    gpusched("freeze", model.name)
    assert check_consistent(model.name, fake) == "frozen"


def test_forget_of_an_ended_model_does_not_say_its_unit_runs_on(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("ended", procs=1)
    run("kill", "-9", str(int(unit_property(model.unit, "MainPID"))))
    wait_until("the model to be reported failed", lambda: model_property(model.name, "State") == "failed")
    gpusched("forget", model.name)
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=forget")
    assert entry["MESSAGE"] == f"model {model.name} forgotten", entry["MESSAGE"]


def test_a_model_killed_during_a_freeze_is_reported_ended(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Killed while the driver checkpoints it: the call fails saying the model ended, the model is failed, and its
    exit says it was freezing, not frozen."""
    model = fmodels.run("killedmid", procs=1)
    [pid] = model.cuda_pids(fake)
    fake.delay(pid, "checkpoint", SLOW_MS)
    client = background("freeze", model.name)
    wait_until("the checkpoint under way", lambda: states(fake, [pid]) == [L])
    run("systemctl", "kill", "--signal=KILL", model.unit)
    _out, err = client.communicate(timeout=60)
    fake.clear_delays()
    assert client.returncode != 0 and "the model ended meanwhile: it is failed" in err, err
    assert "the model is frozen" not in err
    assert check_consistent(model.name, fake) == "failed"
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=exit")
    assert entry["GPUSCHED_STATE_BEFORE"] == "freezing" and "while frozen" not in entry["MESSAGE"]


# --- faults of the driver and of the model --------------------------------------------------------------------


def test_a_lock_timeout_leaves_the_model_running(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("busy")
    a, b = model.cuda_pids(fake)
    fake.busy(b, 60_000)  # b is inside a long kernel: it cannot be locked within LockTimeoutSec=1
    t0 = time.monotonic()
    proc = gpusched("freeze", model.name, check=False)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and "CheckpointFailed" in proc.stderr, proc.stderr
    assert f"lock of pid {b} failed: CUDA_ERROR_NOT_READY" in proc.stderr
    assert 1 <= took < 10, f"the lock timeout was not honoured ({took:.1f}s)"
    assert check_consistent(model.name, fake) == "running"
    assert states(fake, [a, b]) == [R, R]
    model.assert_moving()


def test_a_checkpoint_failure_in_one_process_brings_every_process_back(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("tp", procs=3)  # one model, three CUDA processes (tensor parallel)
    pids = model.cuda_pids(fake)
    fake.fail(pids[2], "checkpoint", "CUDA_ERROR_UNKNOWN")
    proc = gpusched("freeze", model.name, check=False)
    assert proc.returncode != 0 and "CheckpointFailed" in proc.stderr
    assert f"checkpoint of pid {pids[2]} failed" in proc.stderr and "rolled back to running" in proc.stderr
    assert check_consistent(model.name, fake) == "running"
    assert states(fake, pids) == [R, R, R]
    model.assert_moving()
    fake.clear_failures()
    gpusched("freeze", model.name)
    assert states(fake, pids) == [C, C, C]


def test_a_model_that_dies_while_frozen_is_reported_and_its_ram_released(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("doomed", procs=1, vram=256 * MIB)
    gpusched("freeze", model.name)
    snapshot = model_property(model.name, "SnapshotBytes")
    frozen_before = manager_property("RamFrozenBytes")
    assert snapshot > 0 and frozen_before >= snapshot
    main = int(unit_property(model.unit, "MainPID"))
    run("kill", "-9", str(main))  # a frozen task still dies of SIGKILL (cgroup v2 freezer)
    wait_until("the model to be reported failed", lambda: model_property(model.name, "State") == "failed")
    assert model_property(model.name, "SnapshotBytes") == 0
    assert manager_property("RamFrozenBytes") == frozen_before - snapshot
    entry = wait_until(
        "an exit entry",
        lambda: [e for e in journal_entries(f"GPUSCHED_MODEL={model.name}") if e["GPUSCHED_EVENT"] == "exit"],
    )[0]
    assert int(entry["GPUSCHED_BYTES"]) == snapshot and "while frozen" in entry["MESSAGE"]
    assert entry["GPUSCHED_STATE_BEFORE"] == "frozen"


# --- concurrency ----------------------------------------------------------------------------------------------


def test_status_never_waits_on_a_slow_freeze(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """ListModels and a property read, over and over while a freeze spends 2 x 1.5 s in the driver."""
    model = fmodels.run("slow")
    other = fmodels.run("other", procs=1)
    fake.delay(None, "checkpoint", 1500)
    bus = dbus.SystemBus()
    manager = dbus.Interface(bus.get_object("org.gpusched1", "/org/gpusched1"), "org.gpusched1.Manager")
    props = dbus.Interface(
        bus.get_object("org.gpusched1", model_path(model.name)),
        dbus.PROPERTIES_IFACE,
    )
    manager.ListModels()  # warm
    client = background("freeze", model.name)
    wait_until("the freeze to start", lambda: props.Get("org.gpusched1.Model", "State") == "freezing")
    latencies: list[float] = []
    seen: set[str] = set()
    while client.poll() is None:
        t0 = time.perf_counter()
        rows = manager.ListModels()
        seen.add(str(props.Get("org.gpusched1.Model", "State")))
        latencies.append(time.perf_counter() - t0)
        assert {str(r[0]) for r in rows} >= {model.name, other.name}
    assert client.returncode == 0, client.stderr.read() if client.stderr else ""
    assert "freezing" in seen
    latencies.sort()
    p50, p99, worst = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1], latencies[-1]
    log(
        f"status during a {model_property(model.name, 'LastFreezeUSec') / 1e6:.2f}s freeze: {len(latencies)} reads "
        f"(ListModels + Get State), p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms"
    )
    assert len(latencies) > 20
    assert worst < 0.5, f"a status read took {worst:.3f}s during the freeze"


def test_different_models_freeze_in_parallel(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Per-model locks: two models' freezes are inside the driver's checkpoint at the same time (the fake driver
    holds each there until released) instead of one queueing behind the other."""
    a, b = fmodels.run("a", procs=1), fmodels.run("b", procs=1)
    [pa], [pb] = a.cuda_pids(fake), b.cuda_pids(fake)
    for pid in (pa, pb):
        fake.hold(pid, "checkpoint")
    clients = [background("freeze", m.name) for m in (a, b)]
    try:
        wait_until("both checkpoints under way at once", lambda: states(fake, [pa, pb]) == [L, L])
    finally:
        for pid in (pa, pb):
            fake.release(pid, "checkpoint")
    assert [c.wait(30) for c in clients] == [0, 0]
    assert check_consistent(a.name, fake) == check_consistent(b.name, fake) == "frozen"


# --- stopping and upgrading the daemon ---------------------------------------------------------------------------


def test_systemctl_stop_never_stops_or_thaws_models(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    running, frozen, freezing = fmodels.run("running"), fmodels.run("frozen"), fmodels.run("freezing")
    gpusched("freeze", frozen.name)
    fake.delay(None, "checkpoint", 1000)
    client = background("freeze", freezing.name)
    wait_until("the freeze to be under way", lambda: model_property(freezing.name, "State") == "freezing")
    fake.clear_delays()
    run("systemctl", "stop", "gpuschedd.service", timeout=120)
    try:
        # The freeze under way was let finish, not cut in half.
        assert client.wait(30) == 0, client.stderr.read() if client.stderr else ""
        for model, state in ((running, "running"), (frozen, "frozen"), (freezing, "frozen")):
            assert unit_property(model.unit, "ActiveState") == "active"
            assert cgroup_frozen(model.unit) == (state == "frozen")
            want = R if state == "running" else C
            assert states(fake, model.cuda_pids(fake)) == [want, want]
        running.assert_moving()
        frozen.assert_still()
    finally:
        run("systemctl", "reset-failed", "gpuschedd.service", check=False)
        run("systemctl", "start", "gpuschedd.service", timeout=120)
        wait_for_daemon()
    listed = list_models()
    assert [listed[m.name]["state"] for m in (running, frozen, freezing)] == ["running", "frozen", "frozen"]
    for model in (running, frozen, freezing):
        check_consistent(model.name, fake)


def test_a_package_upgrade_never_stops_or_thaws_models(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """What a package upgrade does: new files over the old (make install), the maintainer scripts (post-install),
    then `systemctl try-restart gpuschedd` as debhelper's postinst does."""
    running, frozen = fmodels.run("running"), fmodels.run("frozen")
    gpusched("freeze", frozen.name)
    pids = {m.name: m.cuda_pids(fake) for m in (running, frozen)}
    install_project()
    old = int(unit_property("gpuschedd.service", "MainPID"))
    run("systemctl", "reset-failed", "gpuschedd.service", check=False)
    run("systemctl", "try-restart", "gpuschedd.service", timeout=120)
    wait_for_daemon(old)
    assert {m.name: m.cuda_pids(fake) for m in (running, frozen)} == pids
    assert check_consistent(running.name, fake) == "running"
    assert check_consistent(frozen.name, fake) == "frozen"
    running.assert_moving()
    frozen.assert_still()


def test_restart_with_many_models_in_flight(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Four freezes and two thaws under way at once when the daemon is killed: each ends consistent."""
    models = [fmodels.run(f"m{i}", procs=1, vram=32 * MIB) for i in range(6)]
    for m in models[4:]:
        gpusched("freeze", m.name)
    fake.delay(None, "checkpoint", SLOW_MS)
    fake.delay(None, "restore", SLOW_MS)
    clients = [background("freeze", m.name) for m in models[:4]] + [background("thaw", m.name) for m in models[4:]]
    wait_until(
        "every transition under way",
        lambda: [list_models()[m.name]["state"] for m in models] == ["freezing"] * 4 + ["thawing"] * 2,
    )
    fake.clear_delays()
    kill_daemon()
    for client in clients:
        client.wait(30)
    for m in models:
        assert check_consistent(m.name, fake) == "running"
        m.assert_moving()
