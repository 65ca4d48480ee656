"""Adopt and AdoptProcesses against the real systemd of the sandbox: units started with systemd-run (as root and as
alice) are managed in place, processes started by hand are moved into gpusched-adopt-NAME.scope."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from secutil import ALICE, BOB, call_as, ensure_users, uid_of, user_counter
from sysutil import (
    WORKDIR,
    Counter,
    cgroup_frozen,
    cgroup_pids,
    ensure_workdir,
    gpusched,
    list_models,
    manager_call,
    model_property,
    name_has_owner,
    run,
    unit_property,
    wait_until,
)


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Names and units to remove after the test: every model forgotten, every unit stopped."""
    things: list[str] = []
    yield things
    for thing in things:
        if "." in thing and thing.rsplit(".", 1)[1] in ("service", "scope"):
            run("systemctl", "stop", thing, check=False)
            run("systemctl", "reset-failed", thing, check=False)
        else:
            gpusched("thaw", thing, check=False)
            gpusched("forget", thing, check=False)


def start_unit(unit: str, counter: Counter, user: str = "") -> None:
    run("systemd-run", f"--unit={unit}", *([f"--uid={user}"] if user else []), "--", *counter.argv())
    counter.assert_moving()


def test_adopt_a_root_unit_freeze_thaw_forget_restart(cleanup: list[str]) -> None:
    ensure_workdir()
    unit, name = "adopt-root-svc.service", "adopted-root"
    cleanup += [name, unit]
    counter = Counter(WORKDIR / f"{name}.count")
    start_unit(unit, counter)
    pids = cgroup_pids(unit)

    gpusched("adopt", name, "--unit", unit)
    assert list_models()[name]["unit"] == unit
    assert model_property(name, "Owner") == 0
    assert gpusched("adopt", "again", "--unit", unit, check=False).returncode != 0  # managed already

    gpusched("freeze", name)
    assert cgroup_frozen(unit) and unit_property(unit, "FreezerState") == "frozen"
    counter.assert_still()
    gpusched("thaw", name)
    counter.assert_moving()

    old = int(unit_property("gpuschedd.service", "MainPID"))
    run("systemctl", "restart", "gpuschedd.service")
    wait_until("a new gpuschedd", lambda: int(unit_property("gpuschedd.service", "MainPID")) not in (0, old))
    wait_until("the bus name", name_has_owner)
    assert list_models()[name]["state"] == "running" and cgroup_pids(unit) == pids

    gpusched("forget", name)
    assert name not in list_models()
    counter.assert_moving()  # the unit runs on
    assert unit_property(unit, "ActiveState") == "active"
    run("systemctl", "restart", "gpuschedd.service")
    wait_until("the bus name", name_has_owner)
    time.sleep(0.5)
    assert name not in list_models()  # not taken over again


def test_an_adopted_unit_that_ends_is_reported(cleanup: list[str]) -> None:
    ensure_workdir()
    unit, name = "adopt-ends.service", "adopted-ends"
    cleanup += [name, unit]
    counter = Counter(WORKDIR / f"{name}.count")
    start_unit(unit, counter)
    gpusched("adopt", name, "--unit", unit)
    run("systemctl", "kill", "--signal=SIGKILL", unit)
    wait_until("the model reported failed", lambda: list_models()[name]["state"] == "failed")


def test_adopt_with_policies(cleanup: list[str]) -> None:
    """Adopt takes Run's policy options; the model object shows them, and so does `gpusched status`. A Run option
    that is about starting a unit is refused, and nothing is adopted."""
    ensure_workdir()
    unit, name = "adopt-policies.service", "adopted-policies"
    cleanup += [name, unit]
    start_unit(unit, Counter(WORKDIR / f"{name}.count"))
    bad = manager_call("Adopt", "ssa{sv}", name, unit, "1", "Port", "q", "8000", check=False)
    assert bad.returncode != 0 and "unknown option 'Port'; known: Priority" in bad.stderr
    bad = manager_call("Adopt", "ssa{sv}", name, unit, "1", "Priority", "s", "high", check=False)
    assert bad.returncode != 0 and "option Priority must have type i" in bad.stderr
    assert name not in list_models()
    gpusched("adopt", name, "--unit", unit, "--priority", "4", "--idle-freeze-sec", "0", "--frozen-ttl-sec", "900")
    props = [model_property(name, p) for p in ("Priority", "IdleFreezeSec", "FrozenTTLSec")]
    assert props == [4, 0, 900]
    shown = gpusched("status", name).stdout
    assert "Policies: priority 4, idle freeze never, stop when frozen after 900s" in shown


def test_refusals(cleanup: list[str]) -> None:
    for unit in ("gpuschedd.service", "nothere.service", "getty@.service", "-.slice", "dbus.socket"):
        proc = gpusched("adopt", "x", f"--unit={unit}", check=False)
        assert proc.returncode != 0 and "InvalidArgs" in proc.stderr, (unit, proc.stderr)
    proc = gpusched("adopt", "x", "--pid", "1", check=False)
    assert proc.returncode != 0 and "InvalidArgs" in proc.stderr
    assert "x" not in list_models()


def test_alice_adopts_her_unit_bob_cannot(cleanup: list[str]) -> None:
    ensure_users()
    unit, name = "adopt-alice.service", "adopted-alice"
    cleanup += [name, unit]
    counter = user_counter(ALICE, name)
    start_unit(unit, counter, user=ALICE)
    reply = call_as(BOB, "Adopt", "ssa{sv}", name, unit, {})
    assert reply.error == "org.freedesktop.DBus.Error.AccessDenied", reply
    # org.gpusched1.adopt is for admins by default (polkit/org.gpusched1.policy): alice is refused too.
    reply = call_as(ALICE, "Adopt", "ssa{sv}", name, unit, {})
    assert reply.error == "org.freedesktop.DBus.Error.AccessDenied", reply
    # root adopts it for her: the model is hers, she controls it, bob does not.
    gpusched("adopt", name, "--unit", unit)
    assert model_property(name, "Owner") == uid_of(ALICE)
    assert call_as(BOB, "Freeze", "s", name).error == "org.freedesktop.DBus.Error.AccessDenied"
    assert call_as(ALICE, "Freeze", "s", name).ok
    counter.assert_still()
    assert call_as(ALICE, "Thaw", "s", name).ok
    counter.assert_moving()


def test_adopt_processes(cleanup: list[str]) -> None:
    ensure_users()
    name = "adopted-procs"
    scope = f"gpusched-adopt-{name}.scope"
    cleanup += [name, scope]
    counter = user_counter(ALICE, name)
    proc = subprocess.Popen(["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--init-groups", "--", *counter.argv()])
    try:
        counter.assert_moving()
        reply = call_as(BOB, "AdoptProcesses", "saua{sv}", name, [proc.pid], {})
        assert reply.error == "org.freedesktop.DBus.Error.AccessDenied", reply
        gpusched("adopt", name, "--pid", str(proc.pid))  # as root (adopt is for admins by default)
        assert proc.pid in cgroup_pids(scope)
        assert unit_property(scope, "Slice") == "gpusched.slice"
        assert model_property(name, "Owner") == uid_of(ALICE)
        gpusched("freeze", name)
        assert cgroup_frozen(scope)
        counter.assert_still()
        gpusched("thaw", name)
        counter.assert_moving()
        # Processes of a model cannot be adopted again.
        again = gpusched("adopt", "other", "--pid", str(proc.pid), check=False)
        assert again.returncode != 0 and "ModelExists" in again.stderr
    finally:
        proc.kill()
        proc.wait()
    wait_until("the model reported ended", lambda: list_models()[name]["state"] in ("failed", "stopped"))
