"""The .deb, the way an admin meets it: built by `make deb`, installed with apt into a fresh systemd (enabled and
started), used by a member of the group gpusched through busctl, upgraded to a rebuilt package while that user's
model is frozen (the model must not notice), removed (the model is left alone: docs/packaging.md), purged (nothing
of the package is left), and installed again (the new daemon takes the model over).

The steps run in order and share the guest; each asserts what an admin would check with systemctl, dpkg and busctl.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import secutil
import sysutil
from pkgtest import SHARED_PATHS, VERSION
from secutil import ALICE, BOB, GROUP, run_as, uid_of, user_counter
from sysutil import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    REPO,
    cgroup_frozen,
    list_models,
    log,
    model_unit,
    name_has_owner,
    pid_alive,
    run,
    unit_property,
    wait_until,
)

UPGRADE = f"{VERSION}+upgrade1"  # what a rebuilt package's version would be; dpkg orders it after VERSION
SERVICE = "gpuschedd.service"
MODEL = "pkg-counter"
ENABLE_LINKS = [
    Path("/etc/systemd/system/multi-user.target.wants/gpuschedd.service"),
    Path("/etc/systemd/system/dbus-org.gpusched1.service"),
]
# What purge must leave no trace of, besides the package's own files
RUNTIME_DIRS = [Path("/etc/gpusched"), Path("/var/lib/gpuschedd"), Path("/run/gpuschedd"), Path("/usr/lib/gpuschedd")]

os.environ["DEBIAN_FRONTEND"] = "noninteractive"


class Story:
    """What the steps hand on to each other."""

    debs: dict[str, Path]
    rules_d_stat: tuple[int, int, int]
    model_pid: int
    invocation: str
    counter: sysutil.Counter


S = Story()


def apt_get(*args: str) -> str:
    proc = run("apt-get", "-y", "-q", "--no-install-recommends", *args, timeout=180)
    return proc.stdout + proc.stderr


def busctl_as(user: str, method: str, signature: str = "", *args: str, check: bool = True):
    argv = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, method]
    if signature:
        argv += [signature, *args]
    return run_as(user, *argv, check=check)


def installed_version() -> str | None:
    proc = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", "gpuschedd", check=False)
    return proc.stdout.split()[-1] if proc.returncode == 0 and proc.stdout.startswith("ii") else None


def daemon_pid() -> int:
    return int(unit_property(SERVICE, "MainPID"))


def model_frozen_and_untouched() -> None:
    """The model's unit was never restarted, its process is the same one, frozen by the kernel, and it does no work."""
    unit = model_unit(MODEL)
    assert unit_property(unit, "ActiveState") == "active"
    assert unit_property(unit, "InvocationID") == S.invocation, f"{unit} was restarted"
    assert int(unit_property(unit, "MainPID")) == S.model_pid and pid_alive(S.model_pid)
    assert unit_property(unit, "FreezerState") == "frozen"
    assert cgroup_frozen(unit)
    S.counter.assert_still()


def package_files(deb: Path) -> list[Path]:
    """The regular files and symlinks in a .deb (not its directories: some are shared with other packages)."""
    listing = run("dpkg-deb", "-c", str(deb)).stdout.splitlines()
    return [Path(line.split()[5].removeprefix(".")) for line in listing if line[0] in "-l"]


def leftovers() -> list[str]:
    """Every path with gpusched in its name under /etc, /usr and /var, and the package's runtime directories."""
    found = run("find", "/etc", "/usr", "/var", "-xdev", "-name", "*gpusched*", check=False).stdout.split()
    found += [str(p) for p in RUNTIME_DIRS if p.exists()]
    return sorted(set(found))


@pytest.fixture(scope="module", autouse=True)
def _fresh_machine() -> None:
    """The guest is a fresh Debian: gpuschedd is not installed, and services start when packages ask (the host may
    be a container whose policy-rc.d forbids that; the guest's copy of it is removed, in the guest's overlay)."""
    assert installed_version() is None, "gpuschedd is already installed in the guest: not a fresh machine"
    assert unit_property(SERVICE, "LoadState") == "not-found"
    Path("/usr/sbin/policy-rc.d").unlink(missing_ok=True)
    sysutil.ensure_workdir()


def test_build(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`make deb` builds the package, and a rebuilt one with a higher version for the upgrade step."""
    out = tmp_path_factory.mktemp("debs")
    S.debs = {}
    for version in (VERSION, UPGRADE):
        env_version = version if version != VERSION else ""
        run("env", f"DEB_VERSION={env_version}", "make", "-C", str(REPO), "--no-print-directory", "deb",
            f"PKG_OUT={out / version}", timeout=300)  # fmt: skip
        [deb] = (out / version).glob("gpuschedd_*.deb")
        S.debs[version] = deb
    deb = S.debs[VERSION]
    assert deb_field(deb, "Version") == VERSION and deb_field(S.debs[UPGRADE], "Version") == UPGRADE
    assert deb_field(deb, "Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    depends = [d.strip() for d in deb_field(deb, "Depends").split(",")]
    for wanted in (
        "python3 (>= 3.11)",
        "python3-psutil (>= 5.9)",
        "python3-systemd (>= 235)",
        "python3-aiohttp (>= 3.8)",
        "systemd",
        "dbus",
        "polkitd | policykit-1",
    ):
        assert wanted in depends, depends
    files = {str(p) for p in package_files(deb)}
    # The private directory bundles what Debian lacks or has too old, and nothing Debian's own packages provide.
    bundled = {Path(f).parts[5] for f in files if f.startswith("/usr/lib/gpuschedd/python/")}
    assert {"dbus_fast", "prometheus_client", "pynvml.py", "gpuschedd"} <= bundled, bundled
    assert not bundled & {"psutil", "systemd", "aiohttp"}, bundled
    for path in (
        *SHARED_PATHS,
        "/lib/systemd/system/gpuschedd.service",
        "/lib/systemd/system/gpusched.slice",
        "/usr/lib/gpuschedd/python/gpuschedd/__init__.py",
    ):
        assert path in files, f"{path} not in the package"
    assert not [f for f in files if f.startswith("/usr/local/")]
    # The maintainer scripts stop, restart or disable the daemon (and the front door, which they never enable or
    # start), and nothing else: never the slice or a model.
    scripts = out / "control"
    run("dpkg-deb", "--control", str(deb), str(scripts))
    acting = re.compile(r"\b(stop|kill|restart|try-restart|disable|mask|freeze|thaw|isolate)\b")
    actions = []
    for script in ("preinst", "postinst", "prerm", "postrm"):
        if not (scripts / script).exists():
            continue
        for line in (scripts / script).read_text().splitlines():
            line = line.strip()
            if line.startswith(("#", "echo ")) or not acting.search(line):
                continue
            actions.append(line)
            assert "gpusched.slice" not in line and "gpusched-model" not in line, f"{script}: {line}"
            if re.search(r"deb-systemd-invoke|systemctl", line):
                assert re.search(r"'gpuschedd\.service'|'gpusched-frontdoor\.(socket|service)'", line), (
                    f"{script} acts on something else than the daemon and the front door: {line}"
                )
    assert any("stop 'gpuschedd.service'" in line for line in actions), actions


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed (apt install lintian)")
def test_lintian() -> None:
    """Debian's checker finds nothing to warn about (pedantic remarks are printed, not failed)."""
    for deb in S.debs.values():
        lint = run("lintian", "--pedantic", "--fail-on", "error,warning", str(deb), check=False, timeout=180)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        log(lint.stdout)


def deb_field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def test_install_enables_and_starts() -> None:
    rules_d = Path("/usr/share/polkit-1/rules.d").stat()
    S.rules_d_stat = (rules_d.st_mode, rules_d.st_uid, rules_d.st_gid)
    out = apt_get("install", str(S.debs[VERSION]))
    log(out)
    assert installed_version() == VERSION
    assert run("systemctl", "is-enabled", SERVICE).stdout.strip() == "enabled"
    assert run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
    assert all(link.is_symlink() for link in ENABLE_LINKS), "enabled: the wants link and the bus alias"
    wait_until("org.gpusched1 to have an owner", name_has_owner)
    assert sysutil.get_property(MANAGER_PATH, MANAGER_IFACE, "Version") == VERSION
    assert "/usr/libexec/gpuschedd" in Path(f"/proc/{daemon_pid()}/cmdline").read_text()
    # the postinst's parts: the group, the conffile, byte-compiled files; polkitd's rules.d left as polkitd has it
    run("getent", "group", GROUP)
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "gpuschedd").stdout
    assert "/etc/gpusched/gpuschedd.conf" in conffiles
    assert list(Path("/usr/lib/gpuschedd/python/gpuschedd").glob("__pycache__/*.pyc"))
    rules_d = Path("/usr/share/polkit-1/rules.d").stat()
    assert (rules_d.st_mode, rules_d.st_uid, rules_d.st_gid) == S.rules_d_stat


def test_group_member_runs_and_freezes_through_busctl() -> None:
    # users come after the package: the group is the package's (sysusers), not the test's
    for user, groups in ((ALICE, ["--groups", GROUP]), (BOB, [])):
        run("useradd", "--create-home", *groups, user)
    S.counter = user_counter(ALICE, MODEL)
    reply = busctl_as(ALICE, "Run", "sasa{sv}", MODEL, str(len(S.counter.argv())), *S.counter.argv(), "0")
    assert reply.stdout.strip() == f'o "{sysutil.model_path(MODEL)}"'
    S.counter.assert_moving()
    unit = model_unit(MODEL)
    S.model_pid = int(unit_property(unit, "MainPID"))
    S.invocation = unit_property(unit, "InvocationID")
    assert secutil.proc_ids(S.model_pid)["Uid"][0] == uid_of(ALICE), "the model runs as its caller"
    assert unit_property(unit, "Slice") == "gpusched.slice"
    # a user outside the group is refused by the shipped polkit rules
    refused = secutil.call_as(BOB, "Run", "sasa{sv}", "pkg-bob", ["/bin/true"], {})
    assert refused.error == "org.freedesktop.DBus.Error.AccessDenied", refused
    busctl_as(ALICE, "Freeze", "s", MODEL)
    assert list_models()[MODEL]["state"] == "frozen"
    model_frozen_and_untouched()


def test_upgrade_restarts_the_daemon_and_leaves_the_frozen_model_alone() -> None:
    before = daemon_pid()
    frozen_at = S.counter.value()
    out = apt_get("install", str(S.debs[UPGRADE]))
    log(out)
    assert f"Unpacking gpuschedd ({UPGRADE}) over ({VERSION})" in out
    assert installed_version() == UPGRADE
    assert run("systemctl", "is-active", SERVICE).stdout.strip() == "active"
    assert daemon_pid() != before, "the upgrade restarts the daemon"
    model_frozen_and_untouched()
    assert S.counter.value() == frozen_at
    # the new daemon knows the model, as it is
    wait_until("org.gpusched1 to have an owner", name_has_owner)
    model = wait_until("the new daemon to list the model", lambda: list_models().get(MODEL))
    assert (model["state"], model["main_pid"], model["owner"]) == ("frozen", S.model_pid, uid_of(ALICE))
    # and its owner can thaw it: it goes on counting from where it stopped
    busctl_as(ALICE, "Thaw", "s", MODEL)
    S.counter.assert_moving()
    assert S.counter.value() > frozen_at
    busctl_as(ALICE, "Freeze", "s", MODEL)
    model_frozen_and_untouched()


def test_remove_stops_the_daemon_and_leaves_models_alone() -> None:
    out = apt_get("remove", "gpuschedd")
    log(out)
    assert f"these models keep running (or stay frozen): {model_unit(MODEL)}" in out
    assert run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "gpuschedd").stdout.strip() == "rc"
    assert unit_property(SERVICE, "ActiveState") == "inactive"
    assert unit_property(SERVICE, "LoadState") == "not-found"
    assert not Path("/usr/lib/gpuschedd").exists() and not Path("/usr/bin/gpusched").exists()
    assert Path("/etc/gpusched/gpuschedd.conf").exists(), "removal keeps the configuration"
    wait_until("dbus-daemon to forget the activatable name", lambda: not name_activatable())
    model_frozen_and_untouched()


def name_activatable() -> bool:
    return BUS_NAME in run("busctl", "--system", "list", "--activatable", "--no-legend", "--no-pager").stdout.split()


def test_purge_leaves_nothing_behind() -> None:
    out = apt_get("purge", "gpuschedd")
    log(out)
    assert run("dpkg-query", "-W", "gpuschedd", check=False).returncode != 0, "dpkg still knows the package"
    assert run("dpkg", "-L", "gpuschedd", check=False).returncode != 0
    present = [p for p in package_files(S.debs[UPGRADE]) if p.exists() or p.is_symlink()]
    assert not present, f"files of the package left: {present}"
    assert not [link for link in ENABLE_LINKS if link.is_symlink()]
    assert leftovers() == [], "traces of gpuschedd left after purge"
    unit_files = run("systemctl", "list-unit-files", "--no-legend", SERVICE, "gpusched.slice", check=False)
    assert unit_files.stdout.strip() == "", "systemd still has the unit files"
    # the choice of docs/packaging.md: the user's model is not the package's to stop
    model_frozen_and_untouched()


def test_reinstall_takes_the_model_over_then_purge_again() -> None:
    apt_get("install", str(S.debs[UPGRADE]))
    assert installed_version() == UPGRADE
    wait_until("org.gpusched1 to have an owner", name_has_owner)
    model = wait_until("the daemon to find the model", lambda: list_models().get(MODEL))
    assert (model["state"], model["main_pid"]) == ("frozen", S.model_pid)
    busctl_as(ALICE, "Thaw", "s", MODEL)
    S.counter.assert_moving()
    busctl_as(ALICE, "Stop", "s", MODEL)
    wait_until("the model's unit to go", lambda: unit_property(model_unit(MODEL), "ActiveState") != "active")
    apt_get("purge", "gpuschedd")
    assert leftovers() == []
    run("systemctl", "stop", "gpusched.slice")
