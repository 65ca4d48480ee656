"""The fast path's agent over the fake libcuda's virtual memory management: parking keeps every address and byte,
releases the memory, and a failure at any step leaves the memory where a process can use it; the protocol
between the daemon's AgentLink and the agent, including an attacker's and a vanished daemon's cases."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakegpu_fixtures import (
    GPU0,
    MIB,
    files_open_in,
    inherited_by_exec,
    lazily_freed,
    mapped,
    park_as_nobody,
    scribble_over_spill_file,
    spill_parked,
)
from polling import until, wait_until

from gpuschedd.agent import staging
from gpuschedd.agent.cuda import Cuda
from gpuschedd.agent.parking import ParkError, ParkingLot
from gpuschedd.agent.protocol import socket_path
from gpuschedd.agent.server import Agent
from gpuschedd.agent.staging import MODES
from gpuschedd.agentlink import AgentFailed, AgentLink
from gpuschedd.testing.fakegpu import FakeGpuDir


@pytest.fixture
def fake(gpu_dir: FakeGpuDir) -> Iterator[FakeGpuDir]:
    """This test process as a CUDA process of the fake driver (its allocations count as its VRAM)."""
    ctx = Path(gpu_dir.path, "ctx", str(os.getpid()))
    ctx.parent.mkdir(parents=True, exist_ok=True)
    ctx.write_text(f"vram=0\ngpu={GPU0}\nagent=0\n")
    yield gpu_dir
    ctx.unlink()


def vram(gpu_dir: FakeGpuDir) -> int:
    return next(c.vram for c in gpu_dir.contexts() if c.pid == os.getpid())


def filled(lot: ParkingLot, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Segments of these sizes, each filled with its own byte: (address, size asked, byte)."""
    out = []
    for i, size in enumerate(sizes):
        address = lot.malloc(size, 0)
        ctypes.memset(address, i + 7, size)
        out.append((address, size, i + 7))
    return out


def intact(segments: list[tuple[int, int, int]]) -> bool:
    return all(ctypes.string_at(a, n) == bytes([b]) * n for a, n, b in segments)


@pytest.mark.parametrize("mode", MODES)
def test_park_releases_the_memory_and_unpark_restores_it_in_place(fake: FakeGpuDir, mode: str) -> None:
    lot = ParkingLot(Cuda(), mode=mode, threads=3, chunk=1 * MIB)
    segments = filled(lot, [1 * MIB, 5 * MIB, 2 * MIB])
    assert vram(fake) == 10 * MIB, "sizes round up to the 2 MiB granularity"

    report = lot.park()
    assert (report.parked_bytes, report.segments) == (10 * MIB, 3) and lot.parked
    assert vram(fake) == 0, "the physical memory is released"

    lot.unpark()
    assert not lot.parked and vram(fake) == 10 * MIB
    assert intact(segments), "same addresses, same bytes"
    for address, _n, _b in segments:
        lot.free(address)
    assert vram(fake) == 0


def test_the_host_memory_is_given_back_lazily_and_reused_by_the_next_park(fake: FakeGpuDir) -> None:
    """After an unpark the host area is MADV_FREE'd, not unmapped, and the next park copies into it: no fresh
    zeroed pages to fault in on the copy out's path (its bound on the H200, docs/fast-path.md)."""
    lot = ParkingLot(Cuda(), threads=2, chunk=1 * MIB)
    segments = filled(lot, [4 * MIB, 4 * MIB])
    lot.park()
    assert lot.area is not None
    first = lot.area.address
    lot.unpark()
    assert lazily_freed(os.getpid(), first) >= 8 * MIB, "given back lazily"
    for address, size, byte in segments:
        ctypes.memset(address, byte + 100, size)
    lot.park()
    assert lot.area is not None and lot.area.address == first, "the same host memory"
    lot.unpark()
    assert intact([(a, n, b + 100) for a, n, b in segments]), "this park's bytes, not the last one's"


def test_a_kernel_that_refuses_the_lazy_give_back_gets_the_memory_at_once(
    fake: FakeGpuDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpark whose MADV_FREE is refused (a kernel before 4.5) still succeeds: the area is unmapped."""
    lot = ParkingLot(Cuda(), threads=2, chunk=1 * MIB)
    segments = filled(lot, [4 * MIB])
    monkeypatch.setattr(staging.mmap, "MADV_FREE", -1)  # EINVAL, as an unknown advice is
    before = lazily_freed(os.getpid())
    lot.park()
    lot.unpark()
    assert not lot.parked and lazily_freed(os.getpid()) - before < 4 * MIB
    lot.park()
    lot.unpark()
    assert intact(segments)


def test_a_failed_copy_out_releases_nothing(fake: FakeGpuDir) -> None:
    lot = ParkingLot(Cuda(), threads=2, chunk=1 * MIB)
    segments = filled(lot, [4 * MIB, 4 * MIB])
    fake.fail(os.getpid(), "memcpy", "CUDA_ERROR_ILLEGAL_STATE")
    with pytest.raises(ParkError, match="nothing was released"):
        lot.park()
    assert not lot.parked and vram(fake) == 8 * MIB and intact(segments)
    fake.clear_failures()
    lot.park()
    lot.unpark()
    assert intact(segments)


def test_an_unpark_without_room_keeps_the_bytes_parked_until_there_is(fake: FakeGpuDir) -> None:
    lot = ParkingLot(Cuda(), threads=2, chunk=1 * MIB)
    segments = filled(lot, [6 * MIB, 6 * MIB])
    lot.park()
    fake.allocate("squatter", (1 << 30) - 8 * MIB, GPU0)  # room for one segment, not both
    with pytest.raises(ParkError, match="stay parked"):
        lot.unpark()
    assert lot.parked and vram(fake) == 6 * MIB, "what was mapped stays mapped"
    fake.free("squatter")
    lot.unpark()
    assert not lot.parked and vram(fake) == 12 * MIB and intact(segments)


def test_reads_from_a_file_join_what_follows_on_both_sides() -> None:
    """A spill file is read in large pieces: pieces next to each other on the device and in the host area join, up
    to the size asked, and nothing else does."""
    pieces = staging.split([(1 << 40, 10 * MIB), (2 << 40, 4 * MIB)], 2 * MIB)
    joined = staging.coalesce(pieces, 8 * MIB)
    assert [(p.device, p.offset, p.size) for p in joined] == [
        (1 << 40, 0, 8 * MIB), (1 << 40 | 8 * MIB, 8 * MIB, 2 * MIB), (2 << 40, 10 * MIB, 4 * MIB)
    ]  # fmt: skip


def test_a_read_ahead_holds_the_files_first_bytes_or_says_it_failed(tmp_path: Path) -> None:
    """What the unpark relies on: done() gives the bytes read, or None (then it reads them from the file)."""
    data = os.urandom(3 * staging.FILE_CHUNK // 2)
    (tmp_path / "spill").write_bytes(data)
    fd = os.open(tmp_path / "spill", os.O_RDONLY)
    try:
        ahead = staging.ReadAhead(fd, len(data) - 4096)
        area = ahead.done()
        assert area is not None and bytes(area.view(0, area.size)) == data[: len(data) - 4096]
        ahead.close()
    finally:
        os.close(fd)
    unreadable = os.open(tmp_path / "spill", os.O_WRONLY)
    try:
        ahead = staging.ReadAhead(unreadable, 4096)
        assert ahead.done() is None and isinstance(ahead.error, OSError)
        ahead.close()
    finally:
        os.close(unreadable)


def test_no_allocation_while_parked(fake: FakeGpuDir) -> None:
    lot = ParkingLot(Cuda())
    filled(lot, [2 * MIB])
    lot.park()
    with pytest.raises(ParkError):
        lot.malloc(2 * MIB, 0)
    lot.unpark()


# ---------------------------------------------------------------- the protocol


@pytest.fixture
def agent(fake: FakeGpuDir, tmp_path: Path) -> Iterator[tuple[Agent, list[tuple[int, int, int]]]]:
    lot = ParkingLot(Cuda(), threads=2, chunk=1 * MIB)
    segments = filled(lot, [4 * MIB, 2 * MIB])
    agent = Agent(lot, str(tmp_path))
    agent.start()
    yield agent, segments
    agent.close()


async def test_the_daemon_parks_and_unparks_through_the_link(agent, tmp_path: Path, fake: FakeGpuDir) -> None:  # type: ignore[no-untyped-def]
    a, segments = agent
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    assert await link.park(5000) == 6 * MIB
    assert a.lot.parked and vram(fake) == 0
    assert link.seconds > 0, "the agent says how long it took"
    assert not a.gate.acquire(blocking=False), "the model's work waits while parked"
    await link.unpark(5.0)
    assert not a.lot.parked and intact(segments)
    assert a.gate.acquire(blocking=False)
    a.gate.release()
    link.close()


async def test_a_process_without_an_agent_has_no_link(tmp_path: Path) -> None:
    assert await AgentLink.connect(str(tmp_path), os.getpid(), 1.0) is None


async def test_a_busy_model_is_not_parked(agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, _segments = agent
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    with a.busy(), pytest.raises(AgentFailed, match="busy") as e:
        await link.park(100)
    assert e.value.answered and not a.lot.parked
    link.close()


async def test_a_model_loading_inside_parkable_is_not_parked(agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A park waits for the load (its threads may still be writing the memory), as it waits for busy()."""
    a, _segments = agent
    routed = []
    a.routing = lambda: contextlib.nullcontext(routed.append(True))
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    with a.parkable(), pytest.raises(AgentFailed, match="busy"):
        await link.park(100)
    assert routed and not a.lot.parked
    assert await link.park(5000) == 6 * MIB
    await link.unpark(5.0)
    link.close()


async def test_a_spill_gives_the_host_memory_back_and_the_unpark_reads_the_daemons_file(
    agent, tmp_path: Path, fake: FakeGpuDir
) -> None:  # type: ignore[no-untyped-def]
    """As the interposer does (test_preload.py): the daemon's file instead of the host area, read by the unpark
    straight into the bounce buffers; refused without a file, or with one too short, changing nothing."""
    a, segments = agent
    directory = tmp_path / "spill"
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    assert await link.park(5000) == 6 * MIB
    assert a.lot.area is not None and link.host_address == a.lot.area.address
    with pytest.raises(AgentFailed, match="spill needs the file"):
        await link._call({"op": "spill"}, 5.0)
    short = os.open(tmp_path, os.O_RDWR | os.O_TMPFILE)
    try:
        with pytest.raises(AgentFailed, match="at least the 6291456 parked bytes; nothing was given back"):
            await link.spill(short, 5.0)
    finally:
        os.close(short)
    assert mapped(os.getpid(), link.host_address)
    await spill_parked(link, directory)
    assert a.lot.parked and a.lot.area is None and not mapped(os.getpid(), link.host_address), "given back"
    assert not os.listdir(directory) and files_open_in(os.getpid(), directory)
    assert not inherited_by_exec(os.getpid(), directory), "close-on-exec: a program the model runs gets no copy"
    await link.unpark(5.0)
    assert not a.lot.parked and vram(fake) == 6 * MIB and intact(segments)
    wait_until("the file closed after the unpark", lambda: not files_open_in(os.getpid(), directory))
    await link.park(5000)
    await spill_parked(link, directory)
    link.close()  # the daemon goes away: the agent unparks by itself, from the file
    await until("the agent's own unpark", lambda: not a.lot.parked)
    assert intact(segments)


@pytest.mark.parametrize("ahead", [True, False])
async def test_a_read_ahead_gives_the_unpark_the_spill_files_bytes_from_ram(agent, tmp_path: Path, ahead: bool) -> None:  # type: ignore[no-untyped-def]
    """As the interposer does (test_preload.py): the bytes read ahead come from RAM, so the file can be scribbled
    over once they are; without the read-ahead the scribble comes back in the segments."""
    a, segments = agent
    directory = tmp_path / "spill"
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    with pytest.raises(AgentFailed, match="'read_ahead' while not parked"):
        await link.read_ahead(MIB, 5.0)
    await link.park(5000)
    with pytest.raises(AgentFailed, match="nothing spilled to read ahead"):
        await link.read_ahead(MIB, 5.0)
    await spill_parked(link, directory)
    for bad in (-1, True, 1.5, 1 << 31, None):
        with pytest.raises(AgentFailed, match=r"bytes must be an integer in \[0, 1073741824\]"):
            await link._call({"op": "read_ahead", "bytes": bad}, 5.0)
    if ahead:
        assert await link.read_ahead(64 * MIB + 100, 5.0) == 6 * MIB, "at most what was spilled"
        assert await link.read_ahead(MIB, 5.0) == 6 * MIB, "asked again: what the first call started"
        assert a.lot._ahead is not None and a.lot._ahead.done() is not None  # its reads are over
    scribble_over_spill_file(os.getpid(), directory, 6 * MIB)
    await link.unpark(5.0)
    assert intact(segments) == ahead and a.lot._ahead is None
    wait_until("the file closed after the unpark", lambda: not files_open_in(os.getpid(), directory))
    link.close()


async def test_when_the_daemon_goes_away_the_agent_unparks_by_itself(agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, segments = agent
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    await link.park(5000)
    link.close()
    await until("the agent's own unpark", lambda: not a.lot.parked)
    assert intact(segments)
    wait_until("the gate", lambda: a.gate.acquire(blocking=False))
    a.gate.release()


@pytest.mark.parametrize(
    "message",
    [b"not json\n", b"[1]\n", b'{"op": "park", "timeout_ms": -1}\n', b'{"op": "park", "timeout_ms": true}\n',
     b'{"op": "unpark"}\n', b'{"op": "rm -rf"}\n', b"x" * 10000],
)  # fmt: skip
def test_bad_requests_change_nothing(agent, tmp_path: Path, message: bytes) -> None:  # type: ignore[no-untyped-def]
    a, segments = agent
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(socket_path(str(tmp_path), os.getpid()))
        s.sendall(message)
        with contextlib.suppress(OSError):
            reply = s.recv(4096)
            assert not reply or b'"ok":false' in reply
    assert not a.lot.parked and intact(segments)


async def test_a_socket_served_by_another_process_is_refused(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with socket.socket(socket.AF_UNIX) as impostor:
            impostor.bind(socket_path(str(tmp_path), child.pid))  # this process answers for the child
            impostor.listen(1)
            with pytest.raises(AgentFailed, match=f"served by pid {os.getpid()}, not {child.pid}"):
                await AgentLink.connect(str(tmp_path), child.pid, 2.0)
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_not_served(agent) -> None:  # type: ignore[no-untyped-def]
    a, _segments = agent
    directory = tempfile.mkdtemp(prefix="gpusched-agent-test-", dir="/tmp")  # reachable by nobody
    os.chmod(directory, 0o755)
    b = Agent(a.lot, directory)
    b.start()
    path = socket_path(directory, os.getpid())
    os.chmod(path, 0o666)  # even where the file lets them in, the agent checks who connected
    try:
        out = park_as_nobody(path)
    finally:
        b.close()
        os.rmdir(directory)
    assert out.stdout.strip() == "refused", out.stderr
    assert not a.lot.parked


async def test_park_and_work_take_turns(agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A model thread working inside busy() never sees its memory parked."""
    a, segments = agent
    stop, seen_bad = threading.Event(), []

    def work() -> None:
        while not stop.is_set():
            with a.busy():
                if not intact(segments):
                    seen_bad.append(True)

    worker = threading.Thread(target=work)
    worker.start()
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 5.0)
    assert link is not None
    for _ in range(5):
        await link.park(5000)
        await link.unpark(5.0)
    link.close()
    stop.set()
    worker.join()
    assert not seen_bad


async def _drip(writer: asyncio.StreamWriter) -> None:
    while True:  # a valid reply, one byte at a time: every read gets something, the whole never comes
        writer.write(b"{")
        await writer.drain()
        await asyncio.sleep(0.05)


async def _silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def _garbage(writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x00\xff not json\n")
    await writer.drain()


async def _huge(writer: asyncio.StreamWriter) -> None:
    while True:  # an endless line
        writer.write(b"x" * 65536)
        await writer.drain()


async def _hangs_up(writer: asyncio.StreamWriter) -> None:
    writer.write(b'{"ok": true, "parked_by')
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [(_drip, "no whole answer in 0.3s"), (_silent, "no whole answer in 0.3s"), (_garbage, "not JSON"),
     (_huge, "message too long"), (_hangs_up, "connection closed")],
)  # fmt: skip
async def test_a_hostile_agent_fails_only_its_own_call_within_its_deadline(tmp_path: Path, behaviour, error) -> None:  # type: ignore[no-untyped-def]
    """Whatever the agent (code of the model's user) answers, the daemon's call ends by its one deadline with
    AgentFailed, holds no thread, and other work on the event loop goes on meanwhile."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.readuntil(b"\n")
            await behaviour(writer)

    server = await asyncio.start_unix_server(serve, socket_path(str(tmp_path), os.getpid()))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    link = await AgentLink.connect(str(tmp_path), os.getpid(), 1.0)
    assert link is not None
    with pytest.raises(AgentFailed, match=error) as e:
        await link.unpark(0.3)
    assert not e.value.answered
    link.close()
    ticker.cancel()
    server.close()
    if behaviour in (_drip, _silent):
        assert ticks > 1, "the event loop ran on while the agent stalled"
