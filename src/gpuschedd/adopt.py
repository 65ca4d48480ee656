"""What may be adopted: checks on unit names and on processes (psutil, /proc), without D-Bus.

`Adopt(name, unit)` manages an existing unit in place; `AdoptProcesses(name, pids)` moves running processes into
the transient scope `gpusched-adopt-NAME.scope` (systemd refuses scopes with an instance, hence no '@')."""

from __future__ import annotations

import os
import re
import select

from .errors import InvalidArgs, ModelExists
from .names import MODEL_UNIT_PREFIX, SLICE
from .procfs import cmdline as cmdline  # the engine reads a taken-over unit's command through adopt
from .procfs import process_uid

DAEMON_UNIT = "gpuschedd.service"
ADOPT_SCOPE_PREFIX = "gpusched-adopt-"
ADOPT_SCOPE_SUFFIX = ".scope"
# Unit types whose processes can be a model: they have a cgroup of their own that FreezeUnit/ThawUnit act on.
# A slice holds other units (the daemon's own, perhaps), so it is not one model.
ADOPTABLE_SUFFIXES = (".service", ".scope")
# systemd's unit name alphabet (unit_name_is_valid), at most 255 bytes.
UNIT_NAME_RE = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.[a-z]+")
MAX_PIDS = 1024
PF_KTHREAD = 0x00200000


def scope_unit(name: str) -> str:
    return f"{ADOPT_SCOPE_PREFIX}{name}{ADOPT_SCOPE_SUFFIX}"


def check_unit_name(unit: object) -> str:
    """A unit that may be adopted, by its name alone; raises InvalidArgs with the reason otherwise."""
    if not isinstance(unit, str) or len(unit) > 255 or not UNIT_NAME_RE.fullmatch(unit):
        raise InvalidArgs("invalid unit name: give a full name such as vllm.service")
    if not unit.endswith(ADOPTABLE_SUFFIXES):
        raise InvalidArgs(f"only services and scopes can be adopted, not {unit}")
    if "@." in unit:
        raise InvalidArgs(f"{unit} is a template: adopt one of its instances (NAME@INSTANCE.service)")
    if unit == DAEMON_UNIT:
        raise InvalidArgs("gpuschedd's own unit cannot be adopted")
    if unit.startswith(MODEL_UNIT_PREFIX) or unit.startswith(ADOPT_SCOPE_PREFIX) or unit == SLICE:
        raise InvalidArgs(f"{unit} is gpuschedd's own: it is a model already, or was one (see gpusched list)")
    return unit


class Pins:
    """The processes of an AdoptProcesses call, held by pidfd from their check to their move: a PID checked before
    the polkit wait may meanwhile have ended and been given to another process, which must not be moved in its
    place. A pidfd refers to one process for good; until it has exited and been reaped its PID is not reused."""

    def __init__(self, pids: list[int]) -> None:
        self.fds: dict[int, int] = {}
        _check_count(pids)  # before a descriptor is opened
        try:
            for pid in pids:
                if isinstance(pid, int) and pid > 0 and pid not in self.fds:
                    self.fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            self.close()
            raise InvalidArgs(f"no such process: {pid}") from None
        except OSError as e:
            self.close()
            raise InvalidArgs(f"process {pid} cannot be held: {e.strerror}") from None

    def verify(self) -> None:
        """Every pinned process still lives, so each PID still names the process that was checked; raises
        InvalidArgs naming the first that ended (nothing has been moved yet)."""
        for pid, fd in self.fds.items():
            # A pidfd turns readable once its process has exited (no signal sent: the daemon has no CAP_KILL).
            if select.select([fd], [], [], 0)[0]:
                raise InvalidArgs(
                    f"process {pid} ended while the call was being authorized (its PID may be another process's"
                    " now): nothing was adopted"
                )

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_kernel_thread(pid: int) -> bool:
    """PF_KTHREAD in /proc/PID/stat's flags: psutil does not expose a process's flags."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return bool(int(fields[6]) & PF_KTHREAD)  # field 9 of stat; the 7th after the command
    except (OSError, ValueError, IndexError):
        return False


def process_cgroup(pid: int) -> str:
    """The process's cgroup v2 path (psutil does not read cgroups)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return ""


def _check_count(pids: object) -> None:
    if not isinstance(pids, list) or not pids:
        raise InvalidArgs("give at least one PID")
    if len(pids) > MAX_PIDS:
        raise InvalidArgs(f"at most {MAX_PIDS} PIDs")


def check_pids(pids: object) -> dict[int, int]:
    """Processes that may be moved into a scope: pid → owner uid. Refuses PID 1, the daemon itself, kernel threads,
    processes that do not exist, and processes already in gpusched.slice (another model's)."""
    _check_count(pids)
    owners: dict[int, int] = {}
    for pid in pids:
        if not isinstance(pid, int) or pid <= 0:
            raise InvalidArgs("PIDs are positive integers")
        if pid == 1:
            raise InvalidArgs("PID 1 cannot be adopted")
        if pid == os.getpid():
            raise InvalidArgs("gpuschedd cannot adopt itself")
        uid = process_uid(pid)
        if uid is None:
            raise InvalidArgs(f"no such process: {pid}")
        if is_kernel_thread(pid):
            raise InvalidArgs(f"{pid} is a kernel thread")
        if f"/{SLICE}/" in process_cgroup(pid) + "/":
            raise ModelExists(f"process {pid} belongs to a model already")
        owners[pid] = uid
    return owners


def common_owner(uids: list[int], default: int) -> int:
    """The one uid every process runs as; `default` when they differ (or there are none)."""
    found = set(uids)
    return found.pop() if len(found) == 1 else default
