"""The engine's side of wake on first connection (the proxy itself is tested in tests/system/test_wake.py): a
model's public port is kept in the saved table across a restart, and its wake units go when the model ends by
itself, as they go on Stop and Forget."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from engine_kit import Recorder, make_engine
from fake_units import FakeUnits
from polling import wait_until

from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.events import EventKind
from gpuschedd.model import Model, State
from gpuschedd.options import RunOptions
from gpuschedd.statefile import StateFile, model_from_dict, model_to_dict
from gpuschedd.wake import server_uid

WAKE = RunOptions(port=8000, backend_port=8001, listen_address="127.0.0.1")


async def engine_on(units: FakeUnits, tmp_path: Path) -> tuple[Engine, Recorder]:
    engine, events = make_engine(
        units, config=Config(ram_budget_bytes=1), state_file=StateFile(str(tmp_path / "m.json"))
    )
    await engine.start()
    return engine, events


def test_wake_ports_round_trip_and_old_records_load() -> None:
    model = Model(name="m", unit="u", owner=0, command=["x"], port=80, backend_port=8080, listen_address="[::1]")
    again = model_from_dict(model_to_dict(model))
    assert (again.port, again.backend_port, again.listen_address) == (80, 8080, "[::1]")
    old = model_to_dict(model)
    for key in ("port", "backend_port", "listen_address"):
        del old[key]
    legacy = model_from_dict(old)
    assert (legacy.port, legacy.backend_port, legacy.listen_address) == (0, 0, "")


async def test_a_restarted_daemon_remembers_the_public_port(tmp_path: Path) -> None:
    units = FakeUnits()
    engine, _ = await engine_on(units, tmp_path)
    await engine.run("web", ["serve"], WAKE, 0)
    assert units.wake["web"] == (8000, 8001, "", "127.0.0.1")
    again, _ = await engine_on(units, tmp_path)
    found = again.get("web")
    assert (found.port, found.backend_port, found.listen_address) == (8000, 8001, "127.0.0.1")
    # ... and so still closes it when the model ends by itself
    units.exit(found.unit, "exit-code")
    assert await again.drain(5)
    assert found.state == State.FAILED and "web" not in units.wake


async def test_a_model_that_ends_by_itself_closes_its_public_port(tmp_path: Path) -> None:
    units = FakeUnits()
    engine, events = await engine_on(units, tmp_path)
    model = await engine.run("web", ["serve"], WAKE, 0)
    plain = await engine.run("plain", ["serve"], RunOptions(), 0)
    units.exit(model.unit)
    units.exit(plain.unit)
    assert await engine.drain(5)
    assert model.state == State.STOPPED and units.wake == {}
    assert ("stop_wake", "plain") not in units.calls, "a model without a port has no wake units to stop"
    [exit_event] = [e for e in events.events if e.kind == EventKind.EXIT and e.model == "web"]
    assert "public port 8000 is closed" in exit_event.message


async def test_a_new_run_of_the_name_keeps_its_new_port(tmp_path: Path) -> None:
    units = FakeUnits()
    engine, _ = await engine_on(units, tmp_path)
    model = await engine.run("web", ["serve"], WAKE, 0)
    units.exit(model.unit)  # the close is a task of its own: the new run comes first
    await engine.run("web", ["serve"], RunOptions(port=9000, backend_port=9001), 0)
    assert await engine.drain(5)
    assert units.wake["web"][0] == 9000


async def test_a_model_that_ended_while_the_daemon_was_down_closes_its_port(tmp_path: Path) -> None:
    units = FakeUnits()
    engine, _ = await engine_on(units, tmp_path)
    model = await engine.run("web", ["serve"], WAKE, 0)
    await units.stop(model.unit)  # while no daemon watched
    again, events = await engine_on(units, tmp_path)
    assert await again.drain(5)
    assert again.get("web").state in (State.STOPPED, State.FAILED) and units.wake == {}
    assert "public port 8000 is closed" in events.events[-1].message


@pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another user needs root")
def test_the_proxy_tells_whose_server_answered() -> None:
    """The wake proxy's check that its backend is the model's own server: the owner of the socket at the other end
    of a connection, IPv4 and dual-stack IPv6 listeners alike (a server run as nobody here)."""
    for host in ("127.0.0.1", "::"):
        code = (
            "import socket,sys; s=socket.create_server((sys.argv[1],0),family=socket.AF_INET6 if ':' in sys.argv[1]"
            " else socket.AF_INET, dualstack_ipv6=':' in sys.argv[1]); print(s.getsockname()[1], flush=True);"
            " sys.stdin.read()"
        )
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code, host]
        server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())  # type: ignore[union-attr]
            with socket.create_connection(("127.0.0.1", port)) as conn:
                wait_until("the server's uid", lambda: server_uid(conn) is not None, 5.0)
                assert server_uid(conn) == 65534
        finally:
            server.kill()
            server.wait()
