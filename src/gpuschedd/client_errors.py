"""The SDK's errors beyond the daemon's own (gpuschedd.errors): what the bus itself answers (no daemon, no bus, no
answer in time, a lost connection), and the mapping of an error reply to the typed exception callers branch on."""

from __future__ import annotations

from dbus_fast import Message

from .errors import ALL_ERRORS, GpuschedError

_ERRORS_BY_NAME = {cls.dbus_name: cls for cls in ALL_ERRORS}
# What a call to a daemon that is not running (and cannot be started by activation) is answered with.
_NOT_RUNNING = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
}


class BusError(GpuschedError):
    """A D-Bus error that is none of ours."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.dbus_name = name


class DaemonNotRunning(BusError):
    """Nobody owns org.gpusched1 and the bus could not start gpuschedd (`systemctl start gpuschedd`)."""


class NoBus(BusError):
    """The system bus cannot be reached (no dbus-daemon or dbus-broker, or its socket refuses this process)."""

    def __init__(self, error: Exception) -> None:
        super().__init__("org.freedesktop.DBus.Error.NoServer", f"cannot connect to the system bus: {error}")


class TimedOut(BusError, TimeoutError):
    """No answer (or no event, or not the state waited for) within the timeout. For a call, the daemon may still be
    doing it: check the model's state, or pass a longer `timeout`. Also a TimeoutError, as asyncio's are."""

    def __init__(self, message: str) -> None:
        super().__init__("org.freedesktop.DBus.Error.Timeout", message)


class BusLost(BusError):
    """The connection to the system bus ended during a call (dbus restarted): whether the call took effect is
    unknown; the daemon comes back by itself and the call may be repeated (Freeze and Thaw are idempotent)."""

    def __init__(self) -> None:
        super().__init__(
            "org.freedesktop.DBus.Error.Disconnected",
            "the system bus connection was lost during the call; check the result and retry",
        )


def error_of(reply: Message) -> GpuschedError:
    name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
    text = str(reply.body[0]) if reply.body else name
    if name in _NOT_RUNNING:
        return DaemonNotRunning(name, f"gpuschedd is not running ({text}); try: systemctl start gpuschedd")
    cls = _ERRORS_BY_NAME.get(name)
    return cls(text) if cls else BusError(name, text)
