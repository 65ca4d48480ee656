"""A unit backend made of plain process groups, for engine tests that need real processes (the fake CUDA
models) but no cgroups: freeze is SIGSTOP to the group (done once every process shows state T), thaw is
SIGCONT. It stops processes as surely as the freezer does, which is all the checkpoint ordering depends on.
The cgroupfs backend itself is tested against real cgroups in test_cgroupfs.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

from gpuschedd.errors import UnitFailed
from gpuschedd.units import UnitSpec, UnitStatus, UnitWatcher


def _group_members(pgid: int) -> dict[int, str]:
    """pid → state letter of every live process in the process group."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out[int(name)] = fields[0]
    return out


class ProcessUnits:
    name = "process"

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.frozen: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def setup(self) -> None:
        pass

    async def start(self, spec: UnitSpec) -> UnitStatus:
        self.calls.append(("start", spec.unit))
        env = dict(os.environ)
        env.update(item.split("=", 1) for item in spec.environment)
        if spec.runtime_directory:
            os.makedirs(spec.runtime_directory, exist_ok=True)
        self.procs[spec.unit] = subprocess.Popen(spec.argv, start_new_session=True, env=env)
        status = await self.status(spec.unit)
        assert status is not None
        return status

    def _pgid(self, unit: str) -> int:
        proc = self.procs.get(unit)
        if proc is None or proc.poll() is not None:
            raise UnitFailed(f"unit {unit} is not active")
        return proc.pid

    async def _signal(self, unit: str, signum: int, stopped: bool) -> None:
        pgid = self._pgid(unit)
        os.killpg(pgid, signum)
        for _ in range(500):
            if all((state in "Tt") == stopped for state in _group_members(pgid).values()):
                return
            await asyncio.sleep(0.002)
        raise UnitFailed(f"unit {unit} did not {'stop' if stopped else 'continue'}")

    async def freeze(self, unit: str) -> None:
        self.calls.append(("freeze", unit))
        await self._signal(unit, signal.SIGSTOP, True)
        self.frozen.add(unit)

    async def thaw(self, unit: str) -> None:
        self.calls.append(("thaw", unit))
        await self._signal(unit, signal.SIGCONT, False)
        self.frozen.discard(unit)

    async def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))
        proc = self.procs.pop(unit, None)
        if proc is not None:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signum)
            proc.wait()
        self.frozen.discard(unit)

    async def status(self, unit: str) -> UnitStatus | None:
        proc = self.procs.get(unit)
        if proc is None:
            return None
        if proc.poll() is not None:
            return UnitStatus(unit, "inactive", 0, [], False)
        pids = sorted(_group_members(proc.pid), key=lambda p: (p != proc.pid, p))
        return UnitStatus(unit, "active", proc.pid, pids, unit in self.frozen)

    async def list_units(self, prefix: str) -> list[UnitStatus]:
        out = []
        for unit in self.procs:
            status = await self.status(unit)
            if unit.startswith(prefix) and status is not None:
                out.append(status)
        return out

    def watch(self, callback: UnitWatcher) -> None:
        pass

    def track(self, unit: str) -> None:
        pass

    def untrack(self, unit: str) -> None:
        pass

    async def close(self) -> None:
        for unit in list(self.procs):
            await self.stop(unit)
