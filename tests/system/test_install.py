"""What `make install` put on the system, checked by the tools that read it: systemd, dbus-daemon, the launchers."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sysutil import REPO, gpusched, run, unit_property

UNITS = ["/usr/lib/systemd/system/gpuschedd.service", "/usr/lib/systemd/system/gpusched.slice"]


def test_units_verify() -> None:
    proc = run("systemd-analyze", "verify", "--man=no", *UNITS, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gpusched" not in proc.stderr, proc.stderr  # warnings about our units, even with exit 0


def test_daemon_unit_as_loaded() -> None:
    expected = {
        "Type": "dbus",
        "BusName": "org.gpusched1",
        "Restart": "on-failure",
        "RuntimeDirectory": "gpuschedd",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "gpuschedd",
        "ConfigurationDirectory": "gpusched",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "LoadState": "loaded",
    }
    assert {key: unit_property("gpuschedd.service", key) for key in expected} == expected
    assert "path=/usr/libexec/gpuschedd " in unit_property("gpuschedd.service", "ExecStart")
    # the daemon may open any device (libcuda needs /dev/nvidia*): no device policy sneaked in by another option
    assert unit_property("gpuschedd.service", "DevicePolicy") == "auto"
    assert unit_property("gpuschedd.service", "DeviceAllow") == ""
    assert unit_property("gpusched.slice", "LoadState") == "loaded"


def test_enable_creates_the_bus_alias() -> None:
    run("systemctl", "enable", "gpuschedd.service")
    try:
        assert Path("/etc/systemd/system/dbus-org.gpusched1.service").resolve().name == "gpuschedd.service"
        assert "dbus-org.gpusched1.service" in unit_property("gpuschedd.service", "Names").split()
        assert Path("/etc/systemd/system/multi-user.target.wants/gpuschedd.service").exists()
    finally:
        run("systemctl", "disable", "gpuschedd.service")


def test_bus_files_installed_and_loaded() -> None:
    policy = Path("/usr/share/dbus-1/system.d/org.gpusched1.conf")
    activation = Path("/usr/share/dbus-1/system-services/org.gpusched1.service")
    assert policy.read_bytes() == (REPO / "dbus/org.gpusched1.conf").read_bytes()
    run("xmllint", "--noout", str(policy))
    text = activation.read_text()
    assert re.search(r"^SystemdService=dbus-org\.gpusched1\.service$", text, re.M)
    assert re.search(r"^Exec=/bin/false$", text, re.M)
    # dbus-daemon lists the name as activatable: it parsed the activation file
    names = run("busctl", "--system", "list", "--activatable", "--no-legend", "--no-pager").stdout.split()
    assert "org.gpusched1" in names


def test_launchers_are_isolated(tmp_path: Path) -> None:
    """-I: a root daemon ignores PYTHONPATH. A poisoned gpuschedd package on PYTHONPATH must not be imported."""
    for launcher in ("/usr/libexec/gpuschedd", "/usr/bin/gpusched"):
        first = Path(launcher).read_text().splitlines()[0]
        assert first == "#!/usr/bin/python3 -I", first
        assert os.access(launcher, os.X_OK)
    evil = tmp_path / "gpuschedd"
    evil.mkdir()
    (evil / "__init__.py").write_text("raise SystemExit('imported from PYTHONPATH')\n")
    (evil / "cli.py").write_text("")
    proc = run("env", f"PYTHONPATH={tmp_path}", "gpusched", "list", check=False)
    assert "imported from PYTHONPATH" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert run("/usr/libexec/gpuschedd", "--version").stdout.startswith("gpuschedd ")


def test_default_config_installed() -> None:
    conf = Path("/etc/gpusched/gpuschedd.conf")
    assert conf.read_bytes() == (REPO / "conf/gpuschedd.conf").read_bytes()
    assert all(not line or line.startswith(("#", "[")) for line in conf.read_text().splitlines())


def test_install_keeps_the_admins_config(tmp_path: Path) -> None:
    """A second install (an upgrade) must not overwrite /etc; DESTDIR installs land only under DESTDIR."""
    dest = tmp_path / "root"
    (dest / "etc/gpusched").mkdir(parents=True)
    (dest / "etc/gpusched/gpuschedd.conf").write_text("[Daemon]\nRamBudget=1G\n")
    run(
        "make", "-C", str(REPO), "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/gs",
        "PIP_FLAGS=--no-index --find-links build/wheels", timeout=300,
    )  # fmt: skip
    assert (dest / "etc/gpusched/gpuschedd.conf").read_text() == "[Daemon]\nRamBudget=1G\n"
    unit = (dest / "opt/gs/lib/systemd/system/gpuschedd.service").read_text()
    assert "ExecStart=/opt/gs/libexec/gpuschedd\n" in unit
    assert (dest / "opt/gs/share/dbus-1/system.d/org.gpusched1.conf").exists()
    assert 'sys.path.insert(0, "/opt/gs/lib/gpuschedd/python")' in (dest / "opt/gs/bin/gpusched").read_text()
    assert (dest / "opt/gs/lib/gpuschedd/python/gpuschedd/daemon.py").exists()


def test_cli_talks_to_the_installed_daemon() -> None:
    assert gpusched("status").returncode == 0
