"""Models are units of their own: restarting, stopping or crashing the daemon must leave them exactly as they were,
and the daemon must find them again with the right states."""

from __future__ import annotations

import pytest
from sysutil import (
    Models,
    cgroup_frozen,
    cgroup_pids,
    gpusched,
    list_models,
    model_property,
    model_unit,
    name_has_owner,
    run,
    unit_property,
    wait_until,
)


def daemon_pid() -> int:
    return int(unit_property("gpuschedd.service", "MainPID"))


@pytest.mark.parametrize(
    "how",
    [
        ["systemctl", "restart", "gpuschedd.service"],
        # a crash: Restart=on-failure brings it back
        ["systemctl", "kill", "--signal=SIGKILL", "gpuschedd.service"],
    ],
    ids=["restart", "crash"],
)
def test_daemon_restart_leaves_models_untouched(models: Models, how: list[str]) -> None:
    frozen, count_frozen = models.run("frozen")
    running, count_running = models.run("running")
    gpusched("freeze", frozen)
    count_frozen.assert_still(0.1)
    before = {name: cgroup_pids(model_unit(name)) for name in (frozen, running)}
    old_pid = daemon_pid()

    run(*how)
    wait_until("a new gpuschedd", lambda: daemon_pid() not in (0, old_pid) and name_has_owner(), timeout=30)
    wait_until("gpuschedd.service active", lambda: unit_property("gpuschedd.service", "ActiveState") == "active")

    # untouched: same processes, the frozen one still frozen and still, the running one still counting
    assert {name: cgroup_pids(model_unit(name)) for name in (frozen, running)} == before
    assert cgroup_frozen(model_unit(frozen))
    assert unit_property(model_unit(frozen), "FreezerState") == "frozen"
    count_frozen.assert_still()
    count_running.assert_moving()
    # and found again, with the right states
    listed = list_models()
    assert (listed[frozen]["state"], listed[running]["state"]) == ("frozen", "running")
    assert model_property(frozen, "State") == "frozen"
    assert set(model_property(running, "Pids")) == before[running]

    # still controllable after the restart
    gpusched("thaw", frozen)
    count_frozen.assert_moving()


def test_daemon_stop_leaves_models_running(models: Models) -> None:
    name, counter = models.run("keep")
    pids = cgroup_pids(model_unit(name))
    try:
        run("systemctl", "stop", "gpuschedd.service")
        counter.assert_moving()
        assert cgroup_pids(model_unit(name)) == pids
    finally:
        run("systemctl", "start", "gpuschedd.service", timeout=60)
    wait_until("org.gpusched1 to have an owner", name_has_owner)
    assert list_models()[name]["state"] == "running"


def test_bus_activation_starts_the_daemon() -> None:
    """The D-Bus activation file hands the start to systemd (SystemdService=dbus-org.gpusched1.service), which
    exists as an alias only once the unit is enabled."""
    run("systemctl", "enable", "gpuschedd.service")
    try:
        run("systemctl", "stop", "gpuschedd.service")
        assert not name_has_owner()
        out = run("busctl", "--system", "get-property", "org.gpusched1", "/org/gpusched1", "org.gpusched1.Manager",
                  "Version", timeout=60).stdout  # fmt: skip
        assert out.startswith('s "')
        assert unit_property("gpuschedd.service", "ActiveState") == "active"
    finally:
        run("systemctl", "disable", "gpuschedd.service")
        run("systemctl", "start", "gpuschedd.service", timeout=60)
