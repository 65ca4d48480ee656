"""A model's life through the CLI: run, freeze, thaw, swap, stop, and a model that ends by itself. Every claim is
checked where it really happens: the counter file (work done), the kernel's cgroup.events, systemd's unit
properties, and the daemon's own D-Bus state."""

from __future__ import annotations

import json
from pathlib import Path

import dbus
import pytest
from sysutil import (
    SLICE,
    Models,
    cgroup_frozen,
    cgroup_pids,
    gpusched,
    list_models,
    model_path,
    model_property,
    model_unit,
    pid_alive,
    run,
    unit_property,
    wait_until,
)


def assert_frozen(name: str) -> None:
    unit = model_unit(name)
    assert cgroup_frozen(unit), "cgroup.events says frozen 0"
    assert unit_property(unit, "FreezerState") == "frozen"
    assert model_property(name, "State") == "frozen"


def assert_running(name: str) -> None:
    unit = model_unit(name)
    assert unit_property(unit, "ActiveState") == "active"
    assert not cgroup_frozen(unit), "cgroup.events says frozen 1"
    assert unit_property(unit, "FreezerState") == "running"
    assert model_property(name, "State") == "running"


def test_run_starts_a_unit_in_the_slice(models: Models) -> None:
    name, counter = models.run("a")
    unit = model_unit(name)
    assert_running(name)
    assert unit_property(unit, "Slice") == SLICE
    main_pid = int(unit_property(unit, "MainPID"))
    assert main_pid in cgroup_pids(unit)
    # the daemon sees the same process tree systemd does
    assert set(model_property(name, "Pids")) == cgroup_pids(unit)
    assert model_property(name, "Unit") == unit
    assert model_property(name, "Name") == name
    assert model_property(name, "Command") == counter.argv()
    assert model_property(name, "Owner") == 0
    row = list_models()[name]
    assert (row["state"], row["unit"], row["main_pid"]) == ("running", unit, main_pid)


def test_run_options_reach_the_unit(models: Models) -> None:
    name, _ = models.run("opts", "--description", "Test model with options", "--workdir", "/run", "-E", "GREETING=hi")
    unit = model_unit(name)
    assert unit_property(unit, "Description") == "Test model with options"
    assert unit_property(unit, "WorkingDirectory") == "/run"
    assert "GREETING=hi" in unit_property(unit, "Environment").split()
    pid = int(unit_property(unit, "MainPID"))
    assert b"GREETING=hi" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_freeze_stops_the_work_and_thaw_resumes_it(models: Models) -> None:
    name, counter = models.run("ft")
    gpusched("freeze", name)
    assert_frozen(name)
    counter.assert_still()
    assert model_property(name, "LastFreezeUSec") > 0
    gpusched("thaw", name)
    assert_running(name)
    counter.assert_moving()


def test_state_reads_the_same_through_busctl_gdbus_and_dbus_python(models: Models) -> None:
    name, _ = models.run("readers")
    gpusched("freeze", name)
    path = model_path(name)
    assert model_property(name, "State") == "frozen"
    out = run(
        "gdbus", "call", "--system", "--dest", "org.gpusched1", "--object-path", path,
        "--method", "org.freedesktop.DBus.Properties.Get", "org.gpusched1.Model", "State",
    ).stdout  # fmt: skip
    assert out.strip() == "(<'frozen'>,)"
    obj = dbus.SystemBus().get_object("org.gpusched1", path)
    assert obj.Get("org.gpusched1.Model", "State", dbus_interface=dbus.PROPERTIES_IFACE) == "frozen"
    all_props = obj.GetAll("org.gpusched1.Model", dbus_interface=dbus.PROPERTIES_IFACE)
    assert all_props["Name"] == name and all_props["State"] == "frozen"


def test_freeze_and_thaw_are_idempotent(models: Models) -> None:
    name, counter = models.run("idem")
    gpusched("freeze", name)
    gpusched("freeze", name)
    assert_frozen(name)
    counter.assert_still()
    gpusched("thaw", name)
    gpusched("thaw", name)
    assert_running(name)
    counter.assert_moving()


def test_model_object_methods(models: Models) -> None:
    """The per-model object's own Freeze/Thaw/Stop, as a GUI would call them."""
    name, counter = models.run("objm")
    path = model_path(name)
    run("busctl", "--system", "call", "org.gpusched1", path, "org.gpusched1.Model", "Freeze")
    assert_frozen(name)
    run("busctl", "--system", "call", "org.gpusched1", path, "org.gpusched1.Model", "Thaw")
    assert_running(name)
    counter.assert_moving()
    run("busctl", "--system", "call", "org.gpusched1", path, "org.gpusched1.Model", "Stop")
    wait_until("the model to be stopped", lambda: model_property(name, "State") == "stopped")


def test_swap_freezes_one_and_thaws_the_other(models: Models) -> None:
    a, count_a = models.run("a")
    b, count_b = models.run("b")
    gpusched("freeze", b)
    assert_frozen(b)
    gpusched("swap", a, b)
    assert_frozen(a)
    assert_running(b)
    count_a.assert_still()
    count_b.assert_moving()


def test_swap_is_both_or_neither(models: Models) -> None:
    """The thaw side does not exist: the freeze side must be left running, not frozen."""
    a, count_a = models.run("a")
    proc = gpusched("swap", a, models.name("missing"), check=False)
    assert proc.returncode == 4, proc.stderr
    assert_running(a)
    count_a.assert_moving()


@pytest.mark.parametrize("frozen_first", [False, True], ids=["running", "frozen"])
def test_stop_removes_the_unit(models: Models, frozen_first: bool) -> None:
    name, counter = models.run("stop")
    unit = model_unit(name)
    pids = cgroup_pids(unit)
    if frozen_first:
        gpusched("freeze", name)
    gpusched("stop", name)
    wait_until("the unit to be gone", lambda: unit_property(unit, "ActiveState") in ("inactive", ""))
    assert unit_property(unit, "LoadState") in ("not-found", "")  # transient: gone once stopped
    wait_until("the processes to end", lambda: not any(pid_alive(p) for p in pids))
    wait_until("the model to be stopped", lambda: model_property(name, "State") == "stopped")
    counter.assert_still()


def test_model_that_exits_0_is_stopped(models: Models) -> None:
    name, _ = models.run("exit0", argv=["/bin/sh", "-c", "sleep 0.3; exit 0"])
    wait_until("State stopped", lambda: model_property(name, "State") == "stopped")


def test_model_that_exits_3_is_failed(models: Models) -> None:
    name, _ = models.run("exit3", argv=["/bin/sh", "-c", "sleep 0.3; exit 3"])
    wait_until("State failed", lambda: model_property(name, "State") == "failed")
    assert list_models()[name]["state"] == "failed"


def test_two_models_at_once(models: Models) -> None:
    a, count_a = models.run("a")
    b, count_b = models.run("b")
    assert cgroup_pids(model_unit(a)).isdisjoint(cgroup_pids(model_unit(b)))
    gpusched("freeze", a)
    count_a.assert_still()
    count_b.assert_moving()
    assert_running(b)
    listed = list_models()
    assert (listed[a]["state"], listed[b]["state"]) == ("frozen", "running")


def test_forget_leaves_the_unit_running(models: Models) -> None:
    name, counter = models.run("forget")
    gpusched("forget", name)
    assert name not in list_models()
    assert unit_property(model_unit(name), "ActiveState") == "active"
    counter.assert_moving()


def test_run_twice_is_model_exists(models: Models) -> None:
    name, counter = models.run("twice")
    proc = gpusched("run", "--name", name, "--", *counter.argv(), check=False)
    assert proc.returncode == 1
    assert "org.gpusched1.Error.ModelExists" in proc.stderr


def test_cli_list_and_status_json(models: Models) -> None:
    name, _ = models.run("json")
    rows = json.loads(gpusched("list", "--json").stdout)
    row = next(r for r in rows if r["name"] == name)
    assert set(row) >= {"name", "state", "unit", "owner", "main_pid", "vram_bytes", "snapshot_bytes"}
    assert (row["state"], row["unit"], row["owner"]) == ("running", model_unit(name), 0)
    json.loads(gpusched("status", "--json").stdout)
    assert name in gpusched("status").stdout
    assert name in gpusched("list").stdout


def test_cli_run_json(models: Models) -> None:
    name = models.name("runjson")
    counter = models.counter(name)
    models.names.append(name)
    out = json.loads(gpusched("run", "--name", name, "--json", "--", *counter.argv()).stdout)
    assert out["name"] == name and out["path"] == model_path(name)
    counter.assert_moving()


def test_systemctl_status_of_a_model(models: Models) -> None:
    name, _ = models.run("sysctl")
    out = run("systemctl", "status", "--no-pager", f"gpusched-model@{name}").stdout
    assert f"gpusched-model@{name}.service" in out
    assert "Active: active (running)" in out
