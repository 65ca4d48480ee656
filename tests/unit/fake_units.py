"""An in-memory stand-in for systemd's unit API, for engine tests that need no PID 1.

It behaves like the real one where the engine can tell: a started unit is active with a main PID, freezing
a stopped unit fails, a unit that exits reports inactive/failed to watchers, and any operation can be told
to fail with UnitFailed the way systemd refuses a job."""

from __future__ import annotations

import itertools

from gpuschedd.errors import UnitFailed
from gpuschedd.units import UnitSpec, UnitStatus, UnitWatcher


class FakeUnits:
    name = "fake"

    def __init__(self) -> None:
        self.units: dict[str, UnitStatus] = {}
        self.specs: dict[str, UnitSpec] = {}
        self.fail: dict[str, str] = {}  # operation → unit that fails it
        self.calls: list[tuple[str, str]] = []
        self._watchers: list[UnitWatcher] = []
        self.tracked: set[str] = set()  # units watched by name (adopted)
        self.wake: dict[str, tuple[int, int, str, str]] = {}  # model name → its open public port (port, backend, …)
        self._pids = itertools.count(1000)

    async def setup(self) -> None:
        pass

    def _check(self, op: str, unit: str) -> None:
        self.calls.append((op, unit))
        if self.fail.get(op) == unit:
            raise UnitFailed(f"{op} of {unit} failed (injected)")

    def _live(self, unit: str) -> UnitStatus:
        status = self.units.get(unit)
        if status is None or status.active_state != "active":
            raise UnitFailed(f"unit {unit} is not active")
        return status

    async def start(self, spec: UnitSpec) -> UnitStatus:
        self._check("start", spec.unit)
        if spec.unit in self.units and self.units[spec.unit].active_state == "active":
            raise UnitFailed(f"unit {spec.unit} already exists")
        pid = next(self._pids)
        status = UnitStatus(spec.unit, "active", pid, [pid], False, spec.user, list(spec.argv))
        self.units[spec.unit] = status
        self.specs[spec.unit] = spec
        return status

    async def stop(self, unit: str) -> None:
        self._check("stop", unit)
        self.units.pop(unit, None)

    def _replace(self, unit: str, **changes: object) -> None:
        old = self._live(unit)
        fields = {**old.__dict__, **changes}
        self.units[unit] = UnitStatus(**fields)  # type: ignore[arg-type]

    async def freeze(self, unit: str) -> None:
        self._check("freeze", unit)
        self._replace(unit, frozen=True)

    async def thaw(self, unit: str) -> None:
        self._check("thaw", unit)
        self._replace(unit, frozen=False)

    async def status(self, unit: str) -> UnitStatus | None:
        return self.units.get(unit)

    async def list_units(self, prefix: str) -> list[UnitStatus]:
        return [s for name, s in self.units.items() if name.startswith(prefix)]

    def watch(self, callback: UnitWatcher) -> None:
        self._watchers.append(callback)

    def track(self, unit: str) -> None:
        self.tracked.add(unit)

    def untrack(self, unit: str) -> None:
        self.tracked.discard(unit)

    async def start_scope(
        self, unit: str, pids: list[int], description: str, slice: str = "gpusched.slice"
    ) -> UnitStatus:
        self._check("start_scope", unit)
        if unit in self.units and self.units[unit].active_state == "active":
            raise UnitFailed(f"unit {unit} already exists")
        status = UnitStatus(unit, "active", 0, sorted(pids), False)
        self.units[unit] = status
        return status

    async def start_wake(self, name: str, port: int, backend_port: int, user: str, address: str = "") -> None:
        self._check("start_wake", name)
        self.wake[name] = (port, backend_port, user, address)

    async def stop_wake(self, name: str) -> None:
        self._check("stop_wake", name)
        self.wake.pop(name, None)

    def add_unit(self, unit: str, pids: list[int], user: str = "", command: list[str] | None = None) -> UnitStatus:
        """A unit that runs already, started by someone else (for Adopt)."""
        status = UnitStatus(unit, "active", pids[0] if pids else 0, list(pids), False, user, list(command or ["x"]))
        self.units[unit] = status
        return status

    def exit(self, unit: str, result: str = "success") -> None:
        """The unit's main process exits by itself."""
        self.units.pop(unit)
        state = "inactive" if result == "success" else "failed"
        for watcher in self._watchers:
            watcher(UnitStatus(unit, state, 0, [], False, result=result))
