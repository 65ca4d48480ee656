"""One cgroup v2 group through the kernel's files: who is in it (`cgroup.procs`), what it is (`cgroup.events`:
populated, frozen), freezing it (`cgroup.freeze`) and killing it (`cgroup.kill`). The `cgroupfs` backend keeps
the units; this module only knows the files, and reports a missing group as FileNotFoundError."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import psutil

CGROUP2_MAGIC_TYPE = "cgroup2"


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    return next((p.mountpoint for p in psutil.disk_partitions(all=True) if p.fstype == CGROUP2_MAGIC_TYPE), None)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(group: str, name: str, text: str) -> None:
    with open(os.path.join(group, name), "w") as f:
        f.write(text)


def events(group: str) -> dict[str, str]:
    try:
        return dict(line.split(" ", 1) for line in _read(os.path.join(group, "cgroup.events")).splitlines())
    except FileNotFoundError:
        return {}


def procs(group: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(group, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def procs_below(group: str) -> list[int]:
    """Every process in the group and in the groups below it (what systemd's GetUnitProcesses lists, read from the
    kernel's files in microseconds instead of a bus round trip); FileNotFoundError when the group is gone. A child
    group that goes away during the walk counts as empty."""
    with open(os.path.join(group, "cgroup.stat")) as f:  # FileNotFoundError: the group is gone
        leaf = "nr_descendants 0" in f.read().splitlines()
    if leaf:  # the usual case: no walk over the group's ~30 control files
        return procs(group)
    return [pid for directory, _dirs, _files in os.walk(group) for pid in procs(directory)]


def attach(group: str, pid: int) -> None:
    """Move one process (all its threads) into the group."""
    _write(group, "cgroup.procs", str(pid))


async def set_frozen(group: str, frozen: bool, timeout: float) -> bool:
    """Ask the kernel to freeze or thaw the group and wait until `cgroup.events` says it is done; False when it
    was not done within timeout seconds."""
    want = "1" if frozen else "0"
    _write(group, "cgroup.freeze", want)
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while events(group).get("frozen") != want:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


def signal_all(group: str, signum: int) -> None:
    for pid in procs(group):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill(group: str) -> None:
    try:
        _write(group, "cgroup.kill", "1")
    except FileNotFoundError:  # kernel before 5.14: no cgroup.kill
        signal_all(group, signal.SIGKILL)


async def wait_empty(group: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while events(group).get("populated", "0") != "0":
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def rmdir(group: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(group)
