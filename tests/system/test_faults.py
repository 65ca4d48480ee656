"""Faults around the daemon rather than inside it (issues 15.1 and 21.1-21.5): read floods by a user outside the
group, the system bus restarted, journald stopped, a second daemon started by hand, an unwritable state directory.
Each ends with every model as it was and consistent with systemd, the kernel and the (fake) driver; the figures
they log are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dbus
from fakegpu_sys import (
    DAEMON,
    FakeModels,
    check_consistent,
    daemon_pid,
    journal_entries,
    wait_for_daemon,
)
from secutil import BOB, as_user_argv, ensure_users
from sysutil import REPO, gpusched, list_models, log, model_path, model_property, run, unit_property, wait_until

from gpuschedd.checkpoint import CudaState

STATE_DIR = Path("/run/gpuschedd")
STATE_FILE = STATE_DIR / "models.json"
FLOOD_SEC = 4
SLOW_MS = 5000


def status_text() -> str:
    return unit_property(DAEMON, "StatusText")


# --- 15.1: read floods -------------------------------------------------------------------------------------------


def test_read_floods_by_a_user_outside_the_group_leave_the_daemon_up(fmodels: FakeModels, fake) -> None:  # type: ignore[no-untyped-def]
    ensure_users()
    frozen, running = fmodels.run("frozen", procs=1), fmodels.run("running", procs=1)
    gpusched("freeze", frozen.name)
    # A model whose Command is ~400 KiB, in arguments of 50 kB (the daemon takes none over 64 KiB): every GetAll of
    # it is a large reply.
    big = f"{fmodels.prefix}-big"
    fmodels.started.append(type(frozen)(big, 0))
    gpusched("run", "--name", big, "--", "sh", "-c", "exec sleep infinity", *(["x" * 50_000] * 8))
    before = daemon_pid()
    flood = subprocess.Popen(
        as_user_argv(BOB, sys.executable, str(REPO / "bench" / "read_flood.py"), "--json", "--seconds",
                     str(FLOOD_SEC), "--model", model_path(big), "--model", model_path(running.name)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(FLOOD_SEC / 2)
    started = time.monotonic()
    assert running.name in list_models()  # another user's read is answered during the flood
    during = time.monotonic() - started
    out, err = flood.communicate(timeout=120)
    flood = subprocess.CompletedProcess(flood.args, flood.returncode, out, err)
    assert flood.returncode == 0, flood.stderr
    result = json.loads(flood.stdout)
    log(f"read flood as {BOB}: {result}; root's ListModels during it: {during * 1000:.0f} ms")
    assert daemon_pid() == before and result["pid_before"] == result["pid_after"] == before
    assert result["ok"] > 0
    assert not [k for k in result["failures"] if k.startswith("client:")], result["failures"]
    assert check_consistent(frozen.name, fake) == "frozen"
    assert check_consistent(running.name, fake) == "running"
    assert list_models()[big]["state"] == "running"
    frozen.assert_still()
    running.assert_moving()


# --- 15.1 / 21.1: the bus goes away ----------------------------------------------------------------------------


def test_a_bus_restart_brings_the_daemon_back_consistent(fmodels: FakeModels, fake) -> None:  # type: ignore[no-untyped-def]
    frozen, running, victim = fmodels.run("frozen", procs=1), fmodels.run("running", procs=1), fmodels.run("victim")
    gpusched("freeze", frozen.name)
    a, _ = victim.cuda_pids(fake)
    fake.delay(a, "checkpoint", SLOW_MS)
    client = subprocess.Popen(["gpusched", "freeze", victim.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until("the freeze to be under way", lambda: fake.state(a) == CudaState.LOCKED)
    fake.clear_delays()
    old = daemon_pid()
    run("systemctl", "reset-failed", DAEMON, check=False)
    started = time.monotonic()
    run("systemctl", "restart", "dbus.service", timeout=60)
    new = wait_for_daemon(old, timeout=30)
    recovered = time.monotonic() - started
    log(f"systemctl restart dbus: gpuschedd {old} -> {new} in {recovered:.2f} s")
    dbus.SystemBus().close()  # this process's shared connection (other tests use it) died with the bus: a new one
    _, err = client.communicate(timeout=30)
    assert client.returncode != 0
    assert b"Traceback" not in err and b"EOFError" not in err, err
    assert b"org.freedesktop.DBus.Error.Disconnected" in err, err
    entries = journal_entries("_SYSTEMD_UNIT=gpuschedd.service", f"_PID={old}", "PRIORITY=3")
    assert any("system bus connection was lost" in e["MESSAGE"] for e in entries)
    assert unit_property(DAEMON, "NRestarts") != "0"
    # The freeze cut in half is settled by the new daemon (rolled back), everything else as it was.
    assert wait_until("the victim settled", lambda: check_consistent(victim.name, fake) == "running")
    assert check_consistent(frozen.name, fake) == "frozen"
    assert check_consistent(running.name, fake) == "running"
    frozen.assert_still()
    victim.assert_moving()
    gpusched("freeze", victim.name)
    assert check_consistent(victim.name, fake) == "frozen"


# --- 21.3: journald stopped --------------------------------------------------------------------------------------


def test_a_stopped_journald_does_not_stop_the_daemon(fmodels: FakeModels, fake) -> None:  # type: ignore[no-untyped-def]
    model = fmodels.run("model", procs=1)
    since = time.time()
    rounds = 12  # 24 events and as many log lines: more than journald's socket queue (max_dgram_qlen=10) holds
    pid = int(unit_property("systemd-journald.service", "MainPID"))

    def round_trips(n: int) -> float:
        started = time.monotonic()
        for _ in range(n):
            gpusched("freeze", model.name)
            assert list_models()[model.name]["state"] == "frozen"
            gpusched("thaw", model.name)
        return (time.monotonic() - started) / n

    running = round_trips(3)
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = round_trips(rounds)
    finally:
        os.kill(pid, signal.SIGCONT)
    log(f"freeze+ListModels+thaw by the CLI: {running * 1000:.0f} ms, {stopped * 1000:.0f} ms with journald stopped")
    assert check_consistent(model.name, fake) == "running"

    def written() -> int:
        entries = journal_entries(f"GPUSCHED_MODEL={model.name}", f"--since=@{since:.6f}")
        return len([e for e in entries if e.get("GPUSCHED_EVENT") in ("freeze", "thaw")])

    # Nothing lost: every event reaches the journal once journald reads again.
    wait_until("every event in the journal", lambda: written() == 2 * (rounds + 3))


# --- 21.4: a second daemon ---------------------------------------------------------------------------------------


def test_a_second_daemon_started_by_hand_touches_nothing(fmodels: FakeModels, fake) -> None:  # type: ignore[no-untyped-def]
    model = fmodels.run("victim")
    a, b = model.cuda_pids(fake)
    fake.delay(a, "checkpoint", SLOW_MS)
    client = subprocess.Popen(["gpusched", "freeze", model.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until("the freeze to be under way", lambda: fake.state(a) == CudaState.LOCKED)
    saved = (STATE_FILE.read_bytes(), STATE_FILE.stat().st_mtime_ns)
    # The same environment as the unit's (the fake driver): were it to act, it would act on the same models.
    env = dict(os.environ)
    for item in unit_property(DAEMON, "Environment").split():
        key, _, value = item.partition("=")
        env[key] = value
    second = subprocess.run(["/usr/libexec/gpuschedd"], env=env, capture_output=True, text=True, timeout=60)
    log(f"second daemon: rc {second.returncode}: {second.stderr.strip()}")
    assert second.returncode != 0
    assert "could not own org.gpusched1" in second.stderr
    assert (STATE_FILE.read_bytes(), STATE_FILE.stat().st_mtime_ns) == saved
    assert model_property(model.name, "State") == "freezing"
    assert fake.state(a) == CudaState.LOCKED and fake.state(b) == CudaState.LOCKED
    fake.clear_delays()
    assert client.wait(30) == 0
    assert check_consistent(model.name, fake) == "frozen"


# --- 21.5: the state directory cannot be written -------------------------------------------------------------


def test_an_unwritable_state_directory_is_loud_and_degraded(fmodels: FakeModels, fake) -> None:  # type: ignore[no-untyped-def]
    model = fmodels.run("model", procs=1)
    assert STATE_FILE.stat().st_mode & 0o777 == 0o600
    since = time.time()
    run("chattr", "+i", str(STATE_DIR))
    try:
        gpusched("freeze", model.name)  # what works is not reported failed
        assert check_consistent(model.name, fake) == "frozen"
        assert "DEGRADED" in status_text() and "cannot save the model table" in status_text()
        errors = journal_entries("_SYSTEMD_UNIT=gpuschedd.service", "PRIORITY=3", f"--since=@{since:.6f}")
        assert any("cannot save the model table" in e["MESSAGE"] for e in errors)
        gpusched("thaw", model.name)
        forget = gpusched("forget", model.name, check=False)
        assert forget.returncode != 0 and "cannot forget" in forget.stderr
        assert model.name in list_models()
    finally:
        run("chattr", "-i", str(STATE_DIR))
    gpusched("freeze", model.name)  # the next change retries, and succeeds
    assert "DEGRADED" not in status_text()
    saved = {m["name"]: m["state"] for m in json.loads(STATE_FILE.read_text())["models"]}
    assert saved[model.name] == "frozen"
    gpusched("thaw", model.name)
