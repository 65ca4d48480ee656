"""Calls that reach the daemon between owning its name and the end of its recovery wait for the engine, then are
answered in the order they came (daemon.serve: the name is owned before anything is touched)."""

from __future__ import annotations

from dbus_fast import Message, MessageType
from dbus_fast.annotations import DBusStr
from dbus_fast.service import ServiceInterface, method

from gpuschedd.bus.connection import CallerAwareBus, current_message


class Echo(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.example.Echo")
        self.seen: list[tuple[str, str | None]] = []

    @method()
    def Say(self, text: DBusStr) -> DBusStr:
        caller = current_message.get()
        self.seen.append((text, caller.sender if caller else None))
        return text


def call(text: str) -> Message:
    return Message(path="/", interface="org.example.Echo", member="Say", signature="s", body=[text], serial=1,
                   sender=f":1.{text}")  # fmt: skip


async def test_calls_before_ready_are_held_then_answered_in_order() -> None:
    bus = CallerAwareBus(bus_address="unix:path=/nonexistent")
    echo = Echo()
    say = next(m for m in ServiceInterface._get_methods(echo) if m.name == "Say")
    handler = bus._make_method_handler(echo, say)
    replies: list[Message] = []
    handler(call("1"), replies.append)
    handler(call("2"), replies.append)
    assert echo.seen == [] and replies == []  # the engine is not ready: nothing ran
    bus.ready()
    handler(call("3"), replies.append)
    assert echo.seen == [("1", ":1.1"), ("2", ":1.2"), ("3", ":1.3")]  # in order, each seeing its own caller
    assert [r.body for r in replies] == [["1"], ["2"], ["3"]]
    assert all(r.message_type == MessageType.METHOD_RETURN for r in replies)
