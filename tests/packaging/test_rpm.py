"""The .rpm: built by `make rpm` (on Debian, with the Fedora macros of packaging/rpm/macros.non-rpm-host), every file
where Fedora expects it (`rpm -qlp`), the scriptlets Fedora's, rpmlint clean; then its payload installed with rpm into
the guest, started, and erased, to show the Fedora layout (/usr/lib64 private directory, /usr/lib/systemd/system)
runs. Debian lacks systemd-update-helper, so there the scriptlets' systemd part does nothing: the test starts and
stops the daemon itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pkgtest import SHARED_PATHS, VERSION
from sysutil import MANAGER_IFACE, MANAGER_PATH, REPO, get_property, name_has_owner, run, unit_property, wait_until

PYDIR = "/usr/lib64/gpuschedd/python"
# Fedora's paths (%{_unitdir}, %{_datadir}/dbus-1/..., %{_sysusersdir}, %{_journalcatalogdir}, %{_libexecdir}, ...)
EXPECTED = [
    *SHARED_PATHS,
    f"{PYDIR}/gpuschedd/__init__.py",
    f"{PYDIR}/gpuschedd/__pycache__/__init__.cpython-{{py}}.pyc",
    "/usr/lib/systemd/system/gpuschedd.service",
    "/usr/lib/systemd/system/gpusched.slice",
]
# Where the package may put anything at all; the directories it may own (the others belong to filesystem, systemd,
# dbus, polkit: owning them would fight those packages over their modes)
ALLOWED_PREFIXES = (
    "/etc/gpusched",
    "/usr/bin/gpusched",
    "/usr/libexec/gpuschedd",
    "/usr/libexec/gpusched-frontdoor",
    "/usr/lib64/gpuschedd",
    "/usr/lib/gpusched",  # the vendor model catalog, /usr/lib/gpusched/models.d (gpusched-models.d(5))
    "/usr/lib/.build-id",
    "/usr/lib/systemd/system/",
    "/usr/lib/systemd/catalog/",
    "/usr/lib/sysusers.d/",
    "/usr/share/dbus-1/",
    "/usr/share/polkit-1/actions/",
    "/usr/share/polkit-1/rules.d/",
    "/usr/share/doc/gpuschedd",
    "/usr/share/licenses/gpuschedd",
    "/usr/share/man/",
    "/usr/share/bash-completion/completions/",
)
OWN_DIRS = (
    "/etc/gpusched",
    "/usr/lib64/gpuschedd",
    "/usr/share/doc/gpuschedd",
    "/usr/share/licenses/gpuschedd",  # %license LICENSE
    "/usr/lib/.build-id",
    "/usr/lib/gpusched",  # the vendor model catalog's directory
)


def rpmq(rpm: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, str(rpm)).stdout


def per_file(rpm: Path, tag: str) -> dict[str, str]:
    """{path: the file's TAG}, e.g. FILEMODES:perms -> "-rw-r--r--", FILEFLAGS:fflags -> "cn" (config, noreplace)."""
    out = rpmq(rpm, "--qf", f"[%{{FILENAMES}}\t%{{{tag}}}\n]")
    return dict(line.split("\t", 1) for line in out.splitlines())


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make rpm` (which runs rpmlint too, where it is installed: a lint error fails the build)."""
    out = tmp_path_factory.mktemp("rpms")
    run("make", "-C", str(REPO), "--no-print-directory", "rpm", f"PKG_OUT={out}", timeout=300)
    [binary] = [p for p in out.glob("gpuschedd-*.rpm") if not p.name.endswith(".src.rpm")]
    assert list(out.glob("gpuschedd-*.src.rpm"))
    return binary


def test_files_land_where_fedora_expects(rpm: Path) -> None:
    py = run("/usr/bin/python3", "-c", "import sys; print('%d%d' % sys.version_info[:2])").stdout.strip()
    files = rpmq(rpm, "-l").split()
    for path in EXPECTED:
        assert path.format(py=py) in files, f"{path} not in {rpm.name}"
    bundled = {Path(f).parts[5] for f in files if f.startswith(f"{PYDIR}/")}
    assert {"dbus_fast", "prometheus_client", "pynvml.py"} <= bundled, bundled
    assert not bundled & {"psutil", "systemd", "aiohttp"}, bundled
    stray = [f for f in files if not f.startswith(ALLOWED_PREFIXES)]
    assert not stray, f"files outside gpuschedd's places: {stray}"
    modes = per_file(rpm, "FILEMODES:perms")
    owned_dirs = [f for f, mode in modes.items() if mode.startswith("d")]
    foreign = [d for d in owned_dirs if not d.startswith(OWN_DIRS)]
    assert not foreign, f"directories of other packages owned: {foreign}"
    assert modes["/usr/libexec/gpuschedd"] == "-rwxr-xr-x" and modes["/usr/bin/gpusched"] == "-rwxr-xr-x"
    flags = per_file(rpm, "FILEFLAGS:fflags")
    assert flags.get("/etc/gpusched/gpuschedd.conf") == "cn", "%config(noreplace)"


def test_launchers_and_unit_follow_the_fedora_paths(rpm: Path, tmp_path: Path) -> None:
    cpio = run("bash", "-c", f"cd {tmp_path} && rpm2cpio {rpm} | cpio -idm --quiet")
    assert cpio.returncode == 0
    for launcher in ("usr/bin/gpusched", "usr/libexec/gpuschedd"):
        text = (tmp_path / launcher).read_text()
        assert text.startswith("#!/usr/bin/python3 -I\n") and f'sys.path.insert(0, "{PYDIR}")' in text, text
    unit = (tmp_path / "usr/lib/systemd/system/gpuschedd.service").read_text()
    assert "\nExecStart=/usr/libexec/gpuschedd\n" in unit


def test_scriptlets_are_fedoras_and_touch_only_the_daemon(rpm: Path) -> None:
    scripts = rpmq(rpm, "--scripts")
    for action in ("install-system-units", "remove-system-units", "mark-restart-system-units"):
        assert f"systemd-update-helper {action} gpuschedd.service" in scripts, scripts
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/gpusched.conf" in scripts and "g gpusched" in scripts
    assert "gpusched.slice" not in scripts and "gpusched-model" not in scripts
    requires = rpmq(rpm, "--requires").splitlines()
    assert any(r.startswith("python(abi) = 3.") for r in requires), requires
    for dep in (
        "dbus",
        "polkit",
        "systemd",
        "python3dist(psutil) >= 5.9",
        "python3dist(systemd-python) >= 235",
        "python3dist(aiohttp) >= 3.8",
    ):
        assert dep in requires, requires
    # the private directory's extensions are nobody else's business
    provides = sorted(p.split()[0] for p in rpmq(rpm, "--provides").splitlines())
    assert provides == ["config(gpuschedd)", "gpuschedd", "gpuschedd(x86-64)"], provides


@pytest.mark.skipif(shutil.which("rpmlint") is None, reason="rpmlint not installed (apt install rpmlint)")
def test_rpmlint(rpm: Path) -> None:
    """The binary and the source package (the filters of gpuschedd.rpmlintrc are for both: each must be used)."""
    rpms = sorted(str(p) for p in rpm.parent.glob("gpuschedd-*.rpm"))
    config = ["-c", str(REPO / "packaging/rpm/fedora.toml"), "-r", str(REPO / "packaging/rpm/gpuschedd.rpmlintrc")]
    lint = run("rpmlint", *config, *rpms, check=False)
    assert lint.returncode == 0 and " 0 errors" in lint.stdout, lint.stdout + lint.stderr


def test_payload_installs_runs_and_erases(rpm: Path) -> None:
    if run("dpkg-query", "-W", "gpuschedd", check=False).returncode == 0:  # left by a failed test_deb
        run("apt-get", "-y", "purge", "gpuschedd", check=False)
    run("rpm", "-i", "--nodeps", str(rpm))
    run("getent", "group", "gpusched")  # %pre
    run("systemctl", "daemon-reload")
    run("busctl", "--quiet", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "ReloadConfig")  # fmt: skip
    run("systemctl", "start", "gpuschedd.service", timeout=90)
    try:
        wait_until("org.gpusched1 to have an owner", name_has_owner)
        assert get_property(MANAGER_PATH, MANAGER_IFACE, "Version") == VERSION
        assert (
            "/usr/libexec/gpuschedd"
            in Path(f"/proc/{unit_property('gpuschedd.service', 'MainPID')}/cmdline").read_text()
        )
        assert run("gpusched", "list").returncode == 0
    finally:
        run("systemctl", "stop", "gpuschedd.service", check=False)
    run("rpm", "-e", "--nodeps", "gpuschedd")
    left = [f for f in rpmq(rpm, "-l").split() if f.startswith(OWN_DIRS[:2]) and Path(f).exists()]
    assert not left, left
    assert not Path("/usr/bin/gpusched").exists() and not Path("/usr/lib/systemd/system/gpuschedd.service").exists()
