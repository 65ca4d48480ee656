"""Python SDK: a D-Bus client of gpuschedd, asyncio (`AsyncGpuSched`) and blocking (`GpuSched`).

D-Bus errors come back as the same typed exceptions the daemon raises (gpuschedd.errors), so callers branch
on classes, never on message text:

    from gpuschedd.client import GpuSched
    from gpuschedd.errors import InsufficientGpuMemory

    with GpuSched() as gs:
        gs.run("llama", ["python3", "serve.py"])
        gs.freeze("llama")
        for event in gs.events():          # PropertiesChanged, ModelNew, ModelRemoved as they come
            print(event.name, event.kind, event.state)

Both classes have the same methods; the blocking one runs each call to completion on a private event loop in a
thread of its own, so it also works where an event loop already runs (Jupyter). Every error either raises is a
GpuschedError (a missing system bus too: NoBus); what they return is plain Python (str, int, list, dict), never a
dbus-fast type. Every method takes `timeout` (seconds, None: the default): a call that changes something waits up to
LONG_CALL_TIMEOUT_S (a freeze of tens of GB through the driver takes minutes), a read CALL_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from .client_errors import BusError, BusLost, DaemonNotRunning, NoBus, TimedOut, error_of
from .client_events import PROPERTIES_IFACE, EventStream, ModelEvent, unwrap
from .errors import GpuschedError, InvalidArgs
from .names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MODEL_IFACE
from .options import Policies, RunOptions, to_dbus

# The SDK's public names from its two helper modules, importable from here as before.
__all__ = [
    "AsyncGpuSched",
    "BusError",
    "BusLost",
    "DaemonNotRunning",
    "EventStream",
    "Events",
    "GpuSched",
    "ModelEvent",
    "ModelInfo",
    "NoBus",
    "TimedOut",
]

T = TypeVar("T")

# How long a call waits for its answer (seconds). busctl's and gdbus's 25 s suit reads; what changes something may
# wait for polkit's password prompt and for a checkpoint of tens of GB through the driver (minutes).
CALL_TIMEOUT_S = 25.0
LONG_CALL_TIMEOUT_S = 900.0
_LONG_CALLS = {
    "Run", "Start", "Reload", "Adopt", "AdoptProcesses", "Freeze", "Thaw", "Swap", "Stop", "Forget", "Migrate",
    "PageOut", "FreezeToDisk",
}  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """One row of ListModels."""

    name: str
    state: str
    unit: str
    owner: int
    main_pid: int
    vram_bytes: int
    snapshot_bytes: int


def _options(keywords: dict[str, Any], cls: type[Policies] = RunOptions) -> dict[str, Variant]:
    """A method's a{sv} options from the SDK's keywords: the field names of the declarations in options.py. An option
    left at its default is not sent, so the daemon's default applies (idle_freeze_sec=0 is sent: never)."""
    return {key: Variant(signature, value) for key, (signature, value) in to_dbus(keywords, cls).items()}


class AsyncGpuSched:
    def __init__(self, interactive: bool = True, bus_type: BusType | str = BusType.SYSTEM) -> None:
        """interactive: let polkit ask for a password (the caller's agent answers); False fails at once.
        bus_type: "system" (gpuschedd's) or "session" (tests)."""
        self.interactive = interactive
        self.bus_type = BusType[bus_type.upper()] if isinstance(bus_type, str) else bus_type
        self.bus: MessageBus | None = None

    async def connect(self) -> AsyncGpuSched:
        if self.bus is None:
            try:
                self.bus = await MessageBus(bus_type=self.bus_type).connect()
            except (OSError, EOFError, DBusFastError) as e:  # no socket, refused, or the bus turned us away
                raise NoBus(e) from e
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
        destination: str = BUS_NAME,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        timeout: float | None = None,
    ) -> list[Any]:
        await self.connect()
        assert self.bus is not None
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if self.interactive else MessageFlag.NONE
        if timeout is None:
            timeout = LONG_CALL_TIMEOUT_S if member in _LONG_CALLS else CALL_TIMEOUT_S
        try:
            if signature:  # an argument of the wrong type or range is refused here, before anything is sent
                Variant(f"({signature})", body or [])
            message = Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                flags=flags,
            )
            reply = await asyncio.wait_for(self.bus.call(message), timeout)
        except TimeoutError:
            raise TimedOut(
                f"no answer to {member} within {timeout:g} s; it may still be under way: see `gpusched status`"
            ) from None
        except (EOFError, ConnectionError) as e:  # dbus-fast fails a pending call with the reader's EOFError
            self.bus = None
            raise BusLost() from e
        except (TypeError, ValueError) as e:  # an argument dbus-fast cannot send (type, range, path syntax)
            raise InvalidArgs(f"{member}: {e}") from e
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise error_of(reply)
        return list(reply.body)

    # ------------------------------------------------------------- actions

    async def run(self, name: str, argv: list[str], *, timeout: float | None = None, **options: Any) -> str:
        """Start argv as model `name` (unit gpusched-model@NAME.service); returns its object path. The options are
        Run's (docs/dbus-api.md), by the field names of options.RunOptions: description, working_directory,
        environment, gpus, user; port/backend_port/listen_address wake the model on a connection;
        priority/idle_freeze_sec/frozen_ttl_sec are its policies (docs/configuration.md), gpu_memory the bytes it
        needs free on each of its GPUs before it starts (InsufficientGpuMemory when they cannot be had), agent the
        fast path and keep_context its freezes that leave the CUDA contexts on the GPU (docs/fast-path.md). An
        unknown keyword is a TypeError."""
        [path] = await self._call("Run", "sasa{sv}", [name, argv, _options(options)], timeout=timeout)
        return str(path)

    async def start(self, name: str, *, timeout: float | None = None) -> str:
        """Start a model of the catalog (/etc/gpusched/models.d/NAME.conf) as its file defines it; returns its object
        path. One that runs (or is frozen) already is left as it is."""
        [path] = await self._call("Start", "s", [name], timeout=timeout)
        return str(path)

    async def reload(self, *, timeout: float | None = None) -> None:
        """Read the model catalog's files again (needs the manage privilege)."""
        await self._call("Reload", timeout=timeout)

    async def freeze(self, name: str, *, timeout: float | None = None) -> None:
        await self._call("Freeze", "s", [name], timeout=timeout)

    async def thaw(self, name: str, *, timeout: float | None = None) -> None:
        await self._call("Thaw", "s", [name], timeout=timeout)

    async def page_out(self, name: str, *, timeout: float | None = None) -> None:
        """Page a frozen model's snapshot out to swap (docs/disk-tier.md); it stays frozen."""
        await self._call("PageOut", "s", [name], timeout=timeout)

    async def freeze_to_disk(self, name: str, *, timeout: float | None = None) -> None:
        """Freeze (if it runs), then page out."""
        await self._call("FreezeToDisk", "s", [name], timeout=timeout)

    async def swap(self, freeze_name: str, thaw_name: str, *, timeout: float | None = None) -> None:
        """Freeze one model and thaw the other: both or neither."""
        await self._call("Swap", "ss", [freeze_name, thaw_name], timeout=timeout)

    async def stop(self, name: str, *, timeout: float | None = None) -> None:
        await self._call("Stop", "s", [name], timeout=timeout)

    async def forget(self, name: str, *, timeout: float | None = None) -> None:
        await self._call("Forget", "s", [name], timeout=timeout)

    async def adopt(self, name: str, unit: str, *, timeout: float | None = None, **policies: Any) -> str:
        """Manage an existing unit (vllm.service) in place as model `name`; returns its object path. The policies
        are Run's (priority, idle_freeze_sec, frozen_ttl_sec)."""
        [path] = await self._call("Adopt", "ssa{sv}", [name, unit, _options(policies, Policies)], timeout=timeout)
        return str(path)

    async def adopt_processes(
        self, name: str, pids: list[int], *, timeout: float | None = None, **policies: Any
    ) -> str:
        """Move running processes into the scope gpusched-adopt-NAME.scope as model `name`; returns its path. The
        policies are Run's (priority, idle_freeze_sec, frozen_ttl_sec)."""
        body = [name, pids, _options(policies, Policies)]
        [path] = await self._call("AdoptProcesses", "saua{sv}", body, timeout=timeout)
        return str(path)

    async def migrate(self, name: str, gpu: str, *, timeout: float | None = None) -> None:
        """Move a model onto another GPU (an index or a UUID); it runs there afterwards."""
        await self._call("Migrate", "ss", [name, gpu], timeout=timeout)

    # ------------------------------------------------------------- reading

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        [rows] = await self._call("ListModels", timeout=timeout)
        return [ModelInfo(*row) for row in rows]

    async def model(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Every property of one model object (Name, State, Pids, VramBytes, ...)."""
        [path] = await self._call("GetModel", "s", [name], timeout=timeout)
        [props] = await self._call("GetAll", "s", [MODEL_IFACE], path=path, interface=PROPERTIES_IFACE, timeout=timeout)
        return unwrap(props)

    async def state(self, name: str, *, timeout: float | None = None) -> str:
        [path] = await self._call("GetModel", "s", [name], timeout=timeout)
        body = [MODEL_IFACE, "State"]
        [value] = await self._call("Get", "ss", body, path=path, interface=PROPERTIES_IFACE, timeout=timeout)
        return str(unwrap(value))

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The Manager's properties (Version, CheckpointBackend, Gpus, RamBudgetBytes, ...)."""
        [props] = await self._call("GetAll", "s", [MANAGER_IFACE], interface=PROPERTIES_IFACE, timeout=timeout)
        return unwrap(props)

    def events(self) -> EventStream:
        """The daemon's signals as they come: `async for event in gs.events(): ...`."""
        return EventStream(self)

    async def wait_for_state(self, name: str, state: str | Iterable[str], timeout: float = 30.0) -> str:
        """Wait until model `name` is in `state` (one state or several); returns the state reached.
        TimedOut (a TimeoutError) after `timeout` seconds; NoSuchModel if the model is (or becomes) unknown."""
        wanted = {state} if isinstance(state, str) else set(state)
        deadline = time.monotonic() + timeout
        # Subscribe first, then read: a change between the two is not missed.
        async with self.events() as stream:
            current = await self.state(name)
            while current not in wanted:
                left = deadline - time.monotonic()
                try:
                    event = await stream.get(max(left, 0))
                except TimedOut:
                    raise TimedOut(f"model {name} did not become {'/'.join(sorted(wanted))} in {timeout}s") from None
                if event.name != name:
                    continue
                if event.kind == "removed":
                    current = await self.state(name)  # replaced by a new Run of the name, or NoSuchModel
                elif event.state is not None:
                    current = event.state
            return current


class GpuSched:
    """Blocking twin of AsyncGpuSched: the same methods, each run to completion on a private event loop in a thread
    of its own, so the caller's thread may run an event loop of its own (Jupyter, an asyncio program)."""

    def __init__(self, interactive: bool = True, bus_type: BusType | str = BusType.SYSTEM) -> None:
        self._client = AsyncGpuSched(interactive=interactive, bus_type=bus_type)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gpuschedd-client", daemon=True)
        self._thread.start()

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise GpuschedError("this GpuSched is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._wait(self._aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _aclose(self) -> None:
        self._client.close()

    def __enter__(self) -> GpuSched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, name: str, argv: list[str], *, timeout: float | None = None, **options: Any) -> str:
        return self._wait(self._client.run(name, argv, timeout=timeout, **options))

    def start(self, name: str, *, timeout: float | None = None) -> str:
        return self._wait(self._client.start(name, timeout=timeout))

    def reload(self, *, timeout: float | None = None) -> None:
        self._wait(self._client.reload(timeout=timeout))

    def freeze(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.freeze(name, timeout=timeout))

    def thaw(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.thaw(name, timeout=timeout))

    def page_out(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.page_out(name, timeout=timeout))

    def freeze_to_disk(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.freeze_to_disk(name, timeout=timeout))

    def swap(self, freeze_name: str, thaw_name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.swap(freeze_name, thaw_name, timeout=timeout))

    def stop(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.stop(name, timeout=timeout))

    def forget(self, name: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.forget(name, timeout=timeout))

    def adopt(self, name: str, unit: str, *, timeout: float | None = None, **policies: Any) -> str:
        return self._wait(self._client.adopt(name, unit, timeout=timeout, **policies))

    def adopt_processes(self, name: str, pids: list[int], *, timeout: float | None = None, **policies: Any) -> str:
        return self._wait(self._client.adopt_processes(name, pids, timeout=timeout, **policies))

    def migrate(self, name: str, gpu: str, *, timeout: float | None = None) -> None:
        self._wait(self._client.migrate(name, gpu, timeout=timeout))

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._wait(self._client.models(timeout=timeout))

    def model(self, name: str, *, timeout: float | None = None) -> dict[str, Any]:
        return self._wait(self._client.model(name, timeout=timeout))

    def state(self, name: str, *, timeout: float | None = None) -> str:
        return self._wait(self._client.state(name, timeout=timeout))

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._wait(self._client.status(timeout=timeout))

    def wait_for_state(self, name: str, state: str | Iterable[str], timeout: float = 30.0) -> str:
        return self._wait(self._client.wait_for_state(name, state, timeout))

    def events(self, timeout: float | None = None) -> Events:
        """The daemon's signals as they come, subscribed at once (so what a later call causes is seen):
        `for event in gs.events(): ...`, or `with gs.events(timeout=5) as events: gs.freeze(x); next(events)`.
        timeout: TimedOut (a TimeoutError) when no event came for that many seconds."""
        return Events(self, timeout)


class Events:
    """GpuSched.events(): an iterator of ModelEvent over the blocking client; close() (or the with-block's end)
    unsubscribes."""

    def __init__(self, gs: GpuSched, timeout: float | None) -> None:
        self._gs, self.timeout = gs, timeout
        self._stream = gs._client.events()
        gs._wait(self._stream.start())

    def __iter__(self) -> Iterator[ModelEvent]:
        return self

    def __next__(self) -> ModelEvent:
        return self._gs._wait(self._stream.get(self.timeout))

    def close(self) -> None:
        with contextlib.suppress(GpuschedError):  # the client was closed first: nothing left to unsubscribe
            self._gs._wait(self._stream.close())

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
