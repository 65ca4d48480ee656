"""tools/prerequisites.sh: the one list of system packages that make demo, make check and .ci/run install."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "prerequisites.sh"


def listed(kind: str) -> list[str]:
    return subprocess.run([SCRIPT, "list", kind], check=True, capture_output=True, text=True).stdout.split()


def test_one_list() -> None:
    """check needs what demo needs; nobody else names packages (the Makefile and .ci/run call the script)."""
    demo, check = listed("demo"), listed("check")
    assert set(demo) < set(check) and len(check) == len(set(check))
    assert {"python3-pip", "libsystemd-dev", "systemd", "polkitd", "make"} <= set(demo)
    assert {"debhelper", "dh-python", "rpm", "rpmlint", "cpio", "python3-venv"} <= set(check)
    for user in (REPO / "Makefile", REPO / ".ci" / "run"):
        text = user.read_text()
        assert "tools/prerequisites.sh" in text, user
        assert "apt-get install" not in text and "libsystemd-dev" not in text, user


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian-based host")
def test_nothing_to_do_runs_no_apt() -> None:
    """Where every package is installed already (a host that ran .ci/run, like this one) the step is a no-op: it
    says nothing and runs no apt-get, so make demo and make check can run it every time."""
    states = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}\n", *listed("check")], capture_output=True, text=True
    )
    if states.returncode != 0 or any(not s.startswith("ii") for s in states.stdout.splitlines()):
        pytest.skip("some of the packages are not installed here")
    proc = subprocess.run([SCRIPT, "check"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian-based host")
def test_debian_names_exist() -> None:
    """Every name is a package apt knows here (a typo would fail only on a fresh machine)."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *listed("check")], capture_output=True, text=True)
    if "no package" in proc.stderr.lower() and "lists" not in proc.stderr.lower():
        pytest.fail(proc.stderr)
    found = {line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("Package:")}
    assert set(listed("check")) <= found, set(listed("check")) - found
