#!/usr/bin/python3
"""packaging/pydeps.py [NAME...]: pyproject.toml's runtime requirements (its dependencies and the `journal` extra)
but those named, one a line: what a distribution package bundles in gpuschedd's private Python directory because the
distribution's own packages do not provide it, or provide it too old (docs/packaging.md).

`make install SYSTEM_PYDEPS="psutil systemd-python"` writes this list to a requirements file and hands it to pip
with `--no-deps`, so the named projects come from the distribution (packaging/debian/control's Depends:, the spec's
Requires:). The bundled ones have no dependencies of their own (tests/unit/test_packaging.py checks the wheels).
A name that is no requirement of the project is an error, so a typo cannot bundle everything silently."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def normalized(name: str) -> str:
    """PEP 503: Systemd_Python and systemd-python are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_name(requirement: str) -> str:
    return normalized(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0])


def requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["journal"]]


def bundled(system: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The requirements not provided by the distribution (`system`: project names)."""
    reqs = requirements(pyproject)
    unknown = {normalized(n) for n in system} - {project_name(r) for r in reqs}
    if unknown:
        raise SystemExit(f"pydeps.py: not a requirement of gpuschedd: {' '.join(sorted(unknown))}")
    return [r for r in reqs if project_name(r) not in {normalized(n) for n in system}]


if __name__ == "__main__":
    print("\n".join(bundled(sys.argv[1:])))
