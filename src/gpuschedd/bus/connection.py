"""A system-bus connection that tells each method call who is calling.

dbus-fast hands a method only its arguments. We wrap the bus's method dispatch so that, while a handler is
being invoked, a context variable holds the incoming Message. Coroutine handlers are wrapped in a Task at
that moment, and a Task copies the current context when created, so every `await` inside the handler still
sees its own message: no global "last caller", no race between concurrent calls.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, Message

from .writer import QueueingWriterBus

# dbus-daemon lets one connection have at most max_replies_per_connection (128 on the system bus) calls awaiting
# their replies and answers the next with LimitsExceeded: under a flood of reads, each asking systemd, every caller's
# calls failed. Calls beyond this many wait their turn instead (polkit's checks, at most 32, are among them).
MAX_CALLS_IN_FLIGHT = 96

current_message: contextvars.ContextVar[Message | None] = contextvars.ContextVar("current_message", default=None)


class CallerAwareBus(QueueingWriterBus):
    """Also holds method calls that arrive before ready(): the daemon owns its name before it takes over the
    models (so a second daemon touches nothing), and a call in between waits for the engine instead of finding
    it half started. Held calls are dispatched in the order they came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[Callable[[], None]] | None = []
        self.calls_in_flight = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)

    def ready(self) -> None:
        held, self._held = self._held or [], None
        for dispatch in held:
            dispatch()

    def _make_method_handler(self, interface: Any, method: Any) -> Callable[[Message, Callable[[Message], None]], None]:
        inner = super()._make_method_handler(interface, method)

        def dispatch(msg: Message, send_reply: Callable[[Message], None]) -> None:
            token = current_message.set(msg)
            try:
                inner(msg, send_reply)
            finally:
                current_message.reset(token)

        def handler(msg: Message, send_reply: Callable[[Message], None]) -> None:
            if self._held is not None:
                self._held.append(lambda: dispatch(msg, send_reply))
            else:
                dispatch(msg, send_reply)

        return handler

    async def flush(self, timeout: float) -> bool:
        """Wait, at most `timeout` seconds, until every method call dispatched has its reply written to the socket:
        a stopping daemon answers the freeze it let finish before it disconnects. True when all went out. (dbus-fast
        keeps each coroutine method's future in _pending_futures until its reply has been handed to the writer.)"""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._pending_futures or (self._writer is not None and not self._writer.idle()):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _default_properties_handler(self, msg: Message, send_reply: Any) -> None:
        # Properties.Get/GetAll too: a property that is not for every reader (a model's Command) must know who asks.
        token = current_message.set(msg)
        try:
            super()._default_properties_handler(msg, send_reply)
        finally:
            current_message.reset(token)


async def connect_system_bus() -> CallerAwareBus:
    return await CallerAwareBus(bus_type=BusType.SYSTEM).connect()
