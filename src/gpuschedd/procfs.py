"""What a process is, read from /proc: its arguments, the uid it counts as, its parent, the files it holds open.
Neutral: the daemon's adoption checks, the cgroupfs unit backend and the freeze's scan for CUDA processes ask."""

from __future__ import annotations

import os

import psutil


def process_uid(pid: int) -> int | None:
    """The uid a process counts as (/proc/PID/status Uid: real, effective, saved, filesystem), None when it does
    not exist. One whose uids differ (a setuid program, a process half-way through changing user) counts as the
    first that is not its real uid: it holds that user's rights, so only that user (or `manage`) may adopt it.
    Read by hand: psutil's uids() lacks the filesystem uid."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, *others = (int(u) for u in line.split()[1:5])
                    return next((u for u in others if u != real), real)
    except (OSError, ValueError, IndexError):
        return None
    return None


def cmdline(pid: int) -> list[str]:
    """The process's arguments; [] when it is gone or a zombie."""
    try:
        return [arg for arg in psutil.Process(pid).cmdline() if arg]
    except psutil.Error:
        return []


def ppid(pid: int) -> int:
    """The parent's PID; 0 when the process is gone."""
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return 0


def holds_open(pid: int, prefix: str) -> bool | None:
    """Whether the process holds a file open whose path starts with `prefix` (its /proc/PID/fd links); False when
    it is gone, None when its descriptors cannot be read (no right to: then nothing can be told)."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}").startswith(prefix):
                return True
        except OSError:  # closed meanwhile
            continue
    return False
