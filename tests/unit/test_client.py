"""The SDK's promises, against a private dbus-daemon: every error is a GpuschedError (no bus, no answer in time, an
argument dbus-fast cannot send), the blocking client works where an event loop already runs (Jupyter), and what it
returns is plain Python."""

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus
from fake_units import FakeUnits

from gpuschedd import client, client_events
from gpuschedd.bus.manager import ManagerInterface
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.client import AsyncGpuSched, GpuSched, NoBus, TimedOut
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import GpuschedError, InvalidArgs
from gpuschedd.names import BUS_NAME, MANAGER_PATH
from gpuschedd.telemetry import NoGpus


@pytest.fixture
def session_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dbus-daemon of the test's own, as the session bus."""
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
    yield address
    proc.terminate()
    proc.wait()


@contextlib.contextmanager
def daemon(manager: bool) -> Iterator[None]:
    """org.gpusched1 on the session bus, served from a thread of its own (as the real daemon is another process):
    the real Manager object (manager=True), or a daemon that never answers."""
    ready, done = threading.Event(), threading.Event()

    async def serve() -> None:
        bus = await MessageBus(bus_type=BusType.SESSION).connect()
        if manager:
            engine = Engine(FakeUnits(), NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1))
            bus.export(MANAGER_PATH, ManagerInterface(engine, None))  # type: ignore[arg-type]
        else:
            bus.add_message_handler(lambda msg: msg.path == MANAGER_PATH or None)  # swallowed: no reply
        await bus.request_name(BUS_NAME)
        ready.set()
        await asyncio.to_thread(done.wait)
        bus.disconnect()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        done.set()
        thread.join()


def plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, str | int | float | bool)


def test_no_bus_is_a_typed_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    with GpuSched() as gs, pytest.raises(NoBus) as info:
        gs.status()
    assert isinstance(info.value, GpuschedError) and "system bus" in info.value.message
    with pytest.raises(NoBus):
        asyncio.run(AsyncGpuSched().status())


def test_blocking_client_works_inside_a_running_loop(session_bus: str) -> None:
    async def in_a_notebook() -> dict[str, Any]:  # an event loop runs in this thread: Jupyter's case
        with GpuSched(bus_type="session") as gs:
            return gs.status()

    with daemon(manager=True):
        status = asyncio.run(in_a_notebook())
    assert status["RamBudgetBytes"] == 1 and status["Gpus"] == [] and plain(status), status


def test_no_answer_in_time_and_unsendable_arguments_are_typed_errors(session_bus: str) -> None:
    with daemon(manager=False), GpuSched(bus_type="session") as gs:
        with pytest.raises(TimedOut) as info:
            gs.freeze("m", timeout=0.2)
        assert isinstance(info.value, GpuschedError) and isinstance(info.value, TimeoutError)
        with pytest.raises(InvalidArgs):
            gs.freeze(3)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgs):
            gs.adopt_processes("m", [-1])


def test_calls_that_change_something_wait_longer_than_reads(session_bus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A freeze of tens of GB takes minutes: Freeze's default timeout is the long one, a read's the short one."""
    monkeypatch.setattr(client, "LONG_CALL_TIMEOUT_S", 0.4)
    monkeypatch.setattr(client, "CALL_TIMEOUT_S", 0.1)
    with daemon(manager=False), GpuSched(bus_type="session") as gs:
        for call, waited in ((lambda: gs.freeze("m"), "0.4 s"), (gs.status, "0.1 s")):
            with pytest.raises(TimedOut) as info:
                call()
            assert f"within {waited}" in info.value.message


def test_values_are_unwrapped() -> None:
    value = client_events.unwrap(
        {"Gpus": Variant("aa{sv}", [{"index": Variant("u", 0)}]), "State": Variant("s", "running")}
    )
    assert value == {"Gpus": [{"index": 0}], "State": "running"} and plain(value)
