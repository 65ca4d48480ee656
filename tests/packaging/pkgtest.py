"""What the package tests share: the project's version, and the paths that are the same in the .deb and the .rpm."""

from __future__ import annotations

import tomllib

from sysutil import REPO

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Everything but the unit directory and the private Python directory lands at the same place on Debian and Fedora
SHARED_PATHS = [
    "/usr/bin/gpusched",
    "/usr/libexec/gpuschedd",
    "/usr/share/dbus-1/system.d/org.gpusched1.conf",
    "/usr/share/dbus-1/system-services/org.gpusched1.service",
    "/usr/share/dbus-1/interfaces/org.gpusched1.xml",
    "/usr/share/polkit-1/actions/org.gpusched1.policy",
    "/usr/share/polkit-1/rules.d/50-gpusched.rules",
    "/usr/lib/sysusers.d/gpusched.conf",
    "/usr/lib/systemd/catalog/gpuschedd.catalog",
    "/usr/share/man/man1/gpusched.1.gz",
    "/usr/share/man/man5/gpusched-models.d.5.gz",
    "/usr/share/man/man8/gpuschedd.8.gz",
    "/usr/share/bash-completion/completions/gpusched",
    "/etc/gpusched/gpuschedd.conf",
]
