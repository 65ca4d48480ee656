"""Unit backends: where a model's processes live and how they are started, frozen, thawed and stopped.

`systemd` (units.systemd: PID 1 over D-Bus) when PID 1 is systemd; `cgroupfs` elsewhere
(containers, the GPU test machine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# systemd's own default search path for services: what ExecStart= resolves bare names against, and the PATH a
# service gets (the cgroupfs backend gives its units the same).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class UnitSpec:
    """What to start: one model's unit."""

    unit: str
    argv: list[str]
    description: str
    working_directory: str = ""
    environment: list[str] = field(default_factory=list)
    user: str = ""  # empty: the daemon's own user (root)
    slice: str = "gpusched.slice"
    runtime_directory: str = ""  # an absolute path under /run, created for the unit (owned by user), removed after


@dataclass(frozen=True)
class UnitStatus:
    """The truth about one unit, as its manager reports it.

    active_state follows systemd's names: active, activating, deactivating, inactive, failed.
    frozen is True once every process of the unit is stopped by the freezer."""

    unit: str
    active_state: str
    main_pid: int
    pids: list[int]
    frozen: bool
    user: str = ""
    command: list[str] = field(default_factory=list)
    result: str = "success"


UnitWatcher = Callable[[UnitStatus], None]


class UnitBackend(Protocol):
    name: str

    async def setup(self) -> None:
        """Connect to the unit manager and start watching; called once before anything else."""

    async def start(self, spec: UnitSpec) -> UnitStatus:
        """Start the unit and return once its main process runs. Raises UnitFailed."""

    async def stop(self, unit: str) -> None:
        """Stop every process of the unit (a frozen unit included) and forget it."""

    async def freeze(self, unit: str) -> None:
        """Return once every process of the unit is frozen."""

    async def thaw(self, unit: str) -> None:
        """Return once the unit's processes run again."""

    async def status(self, unit: str) -> UnitStatus | None:
        """Current state of the unit, or None if it does not exist (any more)."""

    async def list_units(self, prefix: str) -> list[UnitStatus]:
        """Every live unit whose name starts with prefix: how a restarted daemon finds its models."""

    def watch(self, callback: UnitWatcher) -> None:
        """Call back with the new status whenever a unit's active state changes (exit, crash, stop)."""

    def track(self, unit: str) -> None:
        """Watch this unit too, though it is not one of ours by name (an adopted unit)."""

    def untrack(self, unit: str) -> None:
        """Stop watching a unit given to track() (a forgotten adopted unit)."""

    async def start_scope(
        self, unit: str, pids: list[int], description: str, slice: str = "gpusched.slice"
    ) -> UnitStatus:
        """Move running processes into a new transient scope (AdoptProcesses). Raises UnitFailed."""


@runtime_checkable
class WakeCapable(Protocol):
    """A unit backend that can open a model's public port (Run option Port): wake on first connection through
    gpusched-wake@NAME.socket and its proxy. Only the systemd backend can; the engine asks isinstance."""

    async def start_wake(self, name: str, port: int, backend_port: int, user: str, address: str = "") -> None:
        """Start the wake socket on `port` (on `address`, empty: every address), proxying to `backend_port`."""

    async def stop_wake(self, name: str) -> None:
        """Stop the model's wake socket and proxy; nothing happens when it has none."""


@runtime_checkable
class PidsReader(Protocol):
    """A unit backend that reads a unit's processes alone, in one call (systemd's GetUnitProcesses), where a
    status takes several: a freeze reads them twice."""

    async def pids(self, unit: str) -> list[int] | None:
        """The unit's processes; None when the unit is gone."""
