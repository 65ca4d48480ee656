"""Python SDK: a D-Bus client of gpuschedd, asyncio (`AsyncGpuSched`) and blocking (`GpuSched`).

D-Bus errors come back as the same typed exceptions the daemon raises (gpuschedd.errors), so callers branch
on classes, never on message text:

    from gpuschedd.client import GpuSched
    from gpuschedd.errors import InsufficientGpuMemory

    with GpuSched() as gs:
        gs.run("llama", ["python3", "serve.py"])
        gs.freeze("llama")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from .errors import ALL_ERRORS, GpuschedError
from .names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MODEL_IFACE, model_path

T = TypeVar("T")

_ERRORS_BY_NAME = {cls.dbus_name: cls for cls in ALL_ERRORS}


class BusError(GpuschedError):
    """A D-Bus error that is none of ours (e.g. the daemon is not running: ServiceUnknown)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.dbus_name = name


@dataclass(frozen=True)
class ModelInfo:
    name: str
    state: str
    unit: str
    owner: int
    main_pid: int
    vram_bytes: int
    snapshot_bytes: int


def _unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return _unwrap(value.value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


class AsyncGpuSched:
    def __init__(self, interactive: bool = True, bus_type: BusType = BusType.SYSTEM) -> None:
        """interactive: let polkit ask for a password (the caller's agent answers); False fails at once."""
        self.interactive = interactive
        self.bus_type = bus_type
        self.bus: MessageBus | None = None

    async def connect(self) -> AsyncGpuSched:
        if self.bus is None:
            self.bus = await MessageBus(bus_type=self.bus_type).connect()
        return self

    def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    async def __aenter__(self) -> AsyncGpuSched:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
    ) -> list[Any]:
        await self.connect()
        assert self.bus is not None
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if self.interactive else MessageFlag.NONE
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                flags=flags,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = str(reply.body[0]) if reply.body else name
            cls = _ERRORS_BY_NAME.get(name)
            raise cls(text) if cls else BusError(name, text)
        return list(reply.body)

    # ------------------------------------------------------------- actions

    async def run(
        self,
        name: str,
        argv: list[str],
        *,
        description: str = "",
        working_directory: str = "",
        environment: list[str] | None = None,
        gpus: list[str] | None = None,
        user: str = "",
    ) -> str:
        options: dict[str, Variant] = {}
        if description:
            options["Description"] = Variant("s", description)
        if working_directory:
            options["WorkingDirectory"] = Variant("s", working_directory)
        if environment:
            options["Environment"] = Variant("as", environment)
        if gpus:
            options["Gpus"] = Variant("as", gpus)
        if user:
            options["User"] = Variant("s", user)
        [path] = await self._call("Run", "sasa{sv}", [name, argv, options])
        return str(path)

    async def freeze(self, name: str) -> None:
        await self._call("Freeze", "s", [name])

    async def thaw(self, name: str) -> None:
        await self._call("Thaw", "s", [name])

    async def swap(self, freeze_name: str, thaw_name: str) -> None:
        await self._call("Swap", "ss", [freeze_name, thaw_name])

    async def stop(self, name: str) -> None:
        await self._call("Stop", "s", [name])

    async def forget(self, name: str) -> None:
        await self._call("Forget", "s", [name])

    # ------------------------------------------------------------- reading

    async def models(self) -> list[ModelInfo]:
        [rows] = await self._call("ListModels")
        return [ModelInfo(*row) for row in rows]

    async def model(self, name: str) -> dict[str, Any]:
        """Every property of one model object (Name, State, Pids, VramBytes, ...)."""
        [path] = await self._call("GetModel", "s", [name])
        [props] = await self._call("GetAll", "s", [MODEL_IFACE], path=path, interface="org.freedesktop.DBus.Properties")
        return _unwrap(props)

    async def status(self) -> dict[str, Any]:
        """The Manager's properties (Version, CheckpointBackend, Gpus, RamBudgetBytes, ...)."""
        [props] = await self._call("GetAll", "s", [MANAGER_IFACE], interface="org.freedesktop.DBus.Properties")
        return _unwrap(props)

    async def wait_for_state(self, name: str, state: str, timeout: float = 30.0) -> None:
        """Wait until a model reaches `state` (e.g. after a model exits by itself)."""
        deadline = time.monotonic() + timeout
        path = model_path(name)
        while True:
            [value] = await self._call(
                "Get", "ss", [MODEL_IFACE, "State"], path=path, interface="org.freedesktop.DBus.Properties"
            )
            if _unwrap(value) == state:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {name} did not become {state} within {timeout}s")
            await asyncio.sleep(0.05)


class GpuSched:
    """Blocking twin of AsyncGpuSched: the same methods, each run to completion on a private loop."""

    def __init__(self, interactive: bool = True, bus_type: BusType = BusType.SYSTEM) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncGpuSched(interactive=interactive, bus_type=bus_type)

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        self._client.close()
        self._loop.close()

    def __enter__(self) -> GpuSched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, name: str, argv: list[str], **options: Any) -> str:
        return self._wait(self._client.run(name, argv, **options))

    def freeze(self, name: str) -> None:
        self._wait(self._client.freeze(name))

    def thaw(self, name: str) -> None:
        self._wait(self._client.thaw(name))

    def swap(self, freeze_name: str, thaw_name: str) -> None:
        self._wait(self._client.swap(freeze_name, thaw_name))

    def stop(self, name: str) -> None:
        self._wait(self._client.stop(name))

    def forget(self, name: str) -> None:
        self._wait(self._client.forget(name))

    def models(self) -> list[ModelInfo]:
        return self._wait(self._client.models())

    def model(self, name: str) -> dict[str, Any]:
        return self._wait(self._client.model(name))

    def status(self) -> dict[str, Any]:
        return self._wait(self._client.status())

    def wait_for_state(self, name: str, state: str, timeout: float = 30.0) -> None:
        self._wait(self._client.wait_for_state(name, state, timeout))
