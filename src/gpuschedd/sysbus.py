"""One method call to a system service over D-Bus (systemd, polkit), shared by the unit backend and the bus.

It lives below both on purpose: `units.systemd` (a backend) talks to PID 1 and `bus.polkit` (the daemon's own
service) to polkitd, and a backend must not import the daemon's bus package to do so."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol, runtime_checkable

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError


@runtime_checkable
class CallLimited(Protocol):
    """A connection that bounds its calls awaiting replies (the daemon's bus: see bus.connection)."""

    calls_in_flight: asyncio.Semaphore


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> list[Any]:
    """One method call; an error reply is raised as DBusError (callers map it to our typed errors)."""
    limit = bus.calls_in_flight if isinstance(bus, CallLimited) else contextlib.nullcontext()
    message = Message(
        destination=destination, path=path, interface=interface, member=member, signature=signature, body=body or []
    )
    async with limit:
        reply = await bus.call(message)
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", (reply.body or [""])[0])
    return list(reply.body)
