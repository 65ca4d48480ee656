"""The .deb and the .rpm take psutil, systemd-python and aiohttp from the distribution and bundle the rest
(docs/packaging.md): the names and version floors in debian/control, debian/rules and the spec agree with
pyproject.toml, and what is bundled can be installed without its dependencies (pip --no-deps)."""

from __future__ import annotations

import importlib.util
import re
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pydeps", REPO / "packaging" / "pydeps.py")
assert _spec and _spec.loader
pydeps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pydeps)

# project name -> (Debian package, Fedora's Python provide)
DISTRIBUTION = {
    "psutil": ("python3-psutil", "python3dist(psutil)"),
    "systemd-python": ("python3-systemd", "python3dist(systemd-python)"),
    "aiohttp": ("python3-aiohttp", "python3dist(aiohttp)"),
}
CONTROL = (REPO / "packaging/debian/control").read_text()
RULES = (REPO / "packaging/debian/rules").read_text()
SPEC = (REPO / "packaging/rpm/gpuschedd.spec").read_text()


def floor(name: str) -> str:
    [requirement] = [r for r in pydeps.requirements() if pydeps.project_name(r) == name]
    return re.search(r">=\s*([\w.]+)", requirement)[1]  # type: ignore[index]


def test_both_packagings_take_the_same_from_the_distribution() -> None:
    rules = re.search(r"^SYSTEM_PYDEPS := (.*)$", RULES, re.M)
    spec = re.search(r'SYSTEM_PYDEPS="([^"]*)"', SPEC)
    assert rules and spec
    assert sorted(rules[1].split()) == sorted(spec[1].split()) == sorted(DISTRIBUTION)


@pytest.mark.parametrize("name", sorted(DISTRIBUTION))
def test_distribution_floors_are_pyprojects(name: str) -> None:
    """The package requires the distribution's package at least as new as pyproject.toml says the code needs."""
    debian, fedora = DISTRIBUTION[name]
    depends = re.search(r"^Depends:(.*?)^\S", CONTROL, re.M | re.S)
    assert depends and f"{debian} (>= {floor(name)})," in depends[1]
    assert re.search(rf"^Requires:\s+{re.escape(fedora)} >= {re.escape(floor(name))}$", SPEC, re.M)


def test_bundled_is_the_rest() -> None:
    bundled = {pydeps.project_name(r) for r in pydeps.bundled(sorted(DISTRIBUTION))}
    assert bundled == {"dbus-fast", "nvidia-ml-py", "prometheus-client"}
    with pytest.raises(SystemExit, match="not a requirement of gpuschedd: psutl"):
        pydeps.bundled(["psutl"])


def test_bundled_wheels_need_nothing_else() -> None:
    """pip installs the bundled requirements with --no-deps: none of their wheels (build/wheels, what the packages
    are built from) may require another project outside an extra."""
    wheels = {pydeps.normalized(w.name.split("-")[0]): w for w in (REPO / "build" / "wheels").glob("*.whl")}
    for name in {pydeps.project_name(r) for r in pydeps.bundled(sorted(DISTRIBUTION))}:
        with zipfile.ZipFile(wheels[name]) as whl:
            [metadata] = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
            requires = [line for line in whl.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
        assert not [r for r in requires if "extra ==" not in r], (name, requires)
