"""Typed failures. Each carries the D-Bus error name callers branch on; the engine raises them without
knowing D-Bus, and the bus layer turns them into error replies one to one."""

from __future__ import annotations


class GpuschedError(Exception):
    """Base of every failure a caller may see. `message` must never hold a traceback or internal path."""

    dbus_name = "org.freedesktop.DBus.Error.Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # Set once the failure has its journal event, so a layer above does not write a second one.
        self.journaled = False


class Refused(GpuschedError):
    """Refused before anything changed: bad input, not allowed, or not possible now (journal event kind
    `refusal`). Every other GpuschedError is a failure: the daemon tried and the system did not comply."""


class NoSuchModel(Refused):
    dbus_name = "org.gpusched1.Error.NoSuchModel"


class ModelExists(Refused):
    dbus_name = "org.gpusched1.Error.ModelExists"


class InvalidState(Refused):
    dbus_name = "org.gpusched1.Error.InvalidState"


class InsufficientGpuMemory(Refused):
    """A GPU lacks free memory for a thaw, a start with GpuMemory or a migration. `needed`, `free` and `gpu` (UUID)
    say where and how much, for the eviction that may make room; a client rebuilding the error from its D-Bus
    name has the message only (0, 0, "")."""

    dbus_name = "org.gpusched1.Error.InsufficientGpuMemory"

    def __init__(self, message: str, needed: int = 0, free: int = 0, gpu: str = "") -> None:
        super().__init__(message)
        self.needed, self.free, self.gpu = needed, free, gpu


class RamBudgetExceeded(Refused):
    dbus_name = "org.gpusched1.Error.RamBudgetExceeded"


class LimitExceeded(Refused):
    """A per-user limit of gpuschedd.conf (MaxModelsPerUser=, MaxCommandBytesPerUser=) would be exceeded."""

    dbus_name = "org.gpusched1.Error.LimitExceeded"


class InsufficientSwap(Refused):
    """Paging a frozen model out (the disk tier) would not fit in the host's free swap: nothing is moved."""

    dbus_name = "org.gpusched1.Error.InsufficientSwap"


class CheckpointFailed(GpuschedError):
    dbus_name = "org.gpusched1.Error.CheckpointFailed"


class NotSupported(Refused):
    dbus_name = "org.gpusched1.Error.NotSupported"


class UnitFailed(GpuschedError):
    """systemd (or the cgroupfs backend) refused or failed a unit operation."""

    dbus_name = "org.gpusched1.Error.UnitFailed"


class InvalidArgs(Refused):
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class AccessDenied(Refused):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class InteractiveAuthorizationRequired(Refused):
    dbus_name = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


ALL_ERRORS: tuple[type[GpuschedError], ...] = (
    NoSuchModel,
    ModelExists,
    InvalidState,
    InsufficientGpuMemory,
    RamBudgetExceeded,
    LimitExceeded,
    InsufficientSwap,
    CheckpointFailed,
    NotSupported,
    UnitFailed,
    InvalidArgs,
    AccessDenied,
    InteractiveAuthorizationRequired,
)
