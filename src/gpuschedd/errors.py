"""Typed failures. Each carries the D-Bus error name callers branch on; the engine raises them without
knowing D-Bus, and the bus layer turns them into error replies one to one."""

from __future__ import annotations


class GpuschedError(Exception):
    """Base of every failure a caller may see. `message` must never hold a traceback or internal path."""

    dbus_name = "org.freedesktop.DBus.Error.Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchModel(GpuschedError):
    dbus_name = "org.gpusched1.Error.NoSuchModel"


class ModelExists(GpuschedError):
    dbus_name = "org.gpusched1.Error.ModelExists"


class InvalidState(GpuschedError):
    dbus_name = "org.gpusched1.Error.InvalidState"


class InsufficientGpuMemory(GpuschedError):
    dbus_name = "org.gpusched1.Error.InsufficientGpuMemory"


class RamBudgetExceeded(GpuschedError):
    dbus_name = "org.gpusched1.Error.RamBudgetExceeded"


class CheckpointFailed(GpuschedError):
    dbus_name = "org.gpusched1.Error.CheckpointFailed"


class NotSupported(GpuschedError):
    dbus_name = "org.gpusched1.Error.NotSupported"


class UnitFailed(GpuschedError):
    """systemd (or the cgroupfs backend) refused or failed a unit operation."""

    dbus_name = "org.gpusched1.Error.UnitFailed"


class InvalidArgs(GpuschedError):
    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"


class AccessDenied(GpuschedError):
    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"


class InteractiveAuthorizationRequired(GpuschedError):
    dbus_name = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


ALL_ERRORS: tuple[type[GpuschedError], ...] = (
    NoSuchModel,
    ModelExists,
    InvalidState,
    InsufficientGpuMemory,
    RamBudgetExceeded,
    CheckpointFailed,
    NotSupported,
    UnitFailed,
    InvalidArgs,
    AccessDenied,
    InteractiveAuthorizationRequired,
)
