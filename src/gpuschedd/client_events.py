"""The daemon's signals as events for SDK users: ModelEvent, and EventStream (an async iterator that subscribes to
them on the system bus)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .client_errors import TimedOut
from .errors import GpuschedError
from .names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MODEL_IFACE, MODEL_PATH_PREFIX, model_name_from_path

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"


class Connection(Protocol):
    """What an EventStream needs of its client (AsyncGpuSched): its bus, once connected, and one call."""

    bus: MessageBus | None

    async def connect(self) -> Any: ...

    async def _call(
        self, member: str, signature: str, body: list[Any], destination: str, path: str, interface: str
    ) -> list[Any]: ...


@dataclass(frozen=True)
class ModelEvent:
    """A signal of the daemon: kind "changed" (a model's PropertiesChanged), "new" (ModelNew) or "removed"
    (ModelRemoved). `changed` holds the properties that changed, by their D-Bus names (State, Pids, ...)."""

    kind: str
    name: str
    path: str
    changed: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str | None:
        """The new state, when this event changed it."""
        return self.changed.get("State")


def unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def event_of(msg: Message) -> ModelEvent | None:
    """The ModelEvent a signal of the daemon stands for, or None for any other message."""
    if msg.message_type != MessageType.SIGNAL:
        return None
    if msg.interface == MANAGER_IFACE and msg.path == MANAGER_PATH and msg.member in ("ModelNew", "ModelRemoved"):
        name, path = msg.body
        return ModelEvent("new" if msg.member == "ModelNew" else "removed", name, path)
    if msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged" and msg.body[0] == MODEL_IFACE:
        name = model_name_from_path(msg.path or "")
        if name is not None:
            return ModelEvent("changed", name, msg.path or "", unwrap(msg.body[1]))
    return None


class EventStream:
    """The daemon's signals as an async iterator of ModelEvent. Subscribes on start() (or the first
    iteration); close() unsubscribes. Signals are matched by the well-known name, so a restarted daemon's
    signals keep coming."""

    def __init__(self, client: Connection) -> None:
        self._client = client
        self._queue: asyncio.Queue[ModelEvent] = asyncio.Queue()
        self._rules = [
            f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_IFACE}',member='PropertiesChanged',"
            f"path_namespace='{MODEL_PATH_PREFIX.rstrip('/')}'",
            f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_IFACE}',path='{MANAGER_PATH}'",
        ]
        self._bus: MessageBus | None = None

    def _handler(self, msg: Message) -> None:
        event = event_of(msg)
        if event is not None:
            self._queue.put_nowait(event)

    async def start(self) -> EventStream:
        if self._bus is None:
            await self._client.connect()
            self._bus = self._client.bus
            assert self._bus is not None
            self._bus.add_message_handler(self._handler)
            for rule in self._rules:
                await self._client._call("AddMatch", "s", [rule], *DBUS)
        return self

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.remove_message_handler(self._handler)
        if bus.connected:
            for rule in self._rules:
                with contextlib.suppress(GpuschedError):
                    await self._client._call("RemoveMatch", "s", [rule], *DBUS)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ModelEvent:
        await self.start()
        return await self._queue.get()

    async def get(self, timeout: float | None = None) -> ModelEvent:
        """The next event; TimedOut after `timeout` seconds without one."""
        await self.start()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise TimedOut(f"no event of gpuschedd within {timeout:g} s") from None

    async def __aenter__(self) -> EventStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
