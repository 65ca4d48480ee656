"""The bus writer against a peer that does not read (dbus-fast's EAGAIN bug, python-dbus-next #153): the library's
own writer disconnects the bus, ours waits and delivers every byte in order once the peer reads."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from dbus_fast import Message
from dbus_fast.aio.message_bus import _MessageWriter

from gpuschedd.bus.writer import QueueingWriter, QueueingWriterBus

BIG = "x" * (256 * 1024)


def fake_bus(sock: socket.socket) -> Any:
    lost: list[Exception] = []
    bus = SimpleNamespace(
        _negotiate_unix_fd=False,
        _sock=sock,
        _loop=asyncio.get_running_loop(),
        _fd=sock.fileno(),
        unique_name=":1.1",
        _user_disconnect=False,
        lost=lost,
    )
    bus._finalize = lost.append
    return bus


def message(serial: int) -> Message:
    return Message(path="/a", interface="a.b", member="C", signature="s", body=[BIG], serial=serial)


async def flood(writer_class: type[_MessageWriter]) -> tuple[Any, list[asyncio.Future[Any]], socket.socket]:
    """Eight 256 KiB messages into a socket pair whose other end has not read yet."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    bus = fake_bus(ours)
    writer = writer_class(bus)
    futures = []
    for serial in range(1, 9):
        fut = asyncio.get_running_loop().create_future()
        writer.schedule_write(message(serial), fut)
        futures.append(fut)
        await asyncio.sleep(0)
    return bus, futures, peer


async def test_the_library_writer_disconnects_on_a_full_socket() -> None:
    """Shows the bug this module works around; when it fails, the upstream fix has landed (drop the override)."""
    bus, _, peer = await flood(_MessageWriter)
    assert any(isinstance(e, BlockingIOError) for e in bus.lost)
    peer.close()


async def read_all(peer: socket.socket, size: int) -> bytes:
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        data += await loop.sock_recv(peer, 1 << 20)
    return data


async def test_the_queueing_writer_waits_and_delivers_in_order() -> None:
    bus, futures, peer = await flood(QueueingWriter)
    assert bus.lost == []
    assert not all(f.done() for f in futures)  # the socket is full: some wait
    expected = b"".join(bytes(message(serial)._marshall(False)) for serial in range(1, 9))
    received = await asyncio.wait_for(read_all(peer, len(expected)), 10)
    assert received == expected
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert bus.lost == []
    peer.close()


async def test_a_real_socket_error_still_loses_the_bus() -> None:
    bus, futures, peer = await flood(QueueingWriter)
    peer.close()
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert bus.lost and isinstance(bus.lost[0], OSError)


async def test_the_bus_installs_the_queueing_writer() -> None:
    bus = QueueingWriterBus(bus_address="unix:path=/nonexistent")
    bus._writer = _MessageWriter.__new__(_MessageWriter)  # what connect() does, once connected
    assert isinstance(bus._writer, QueueingWriter)
    bus._writer = None
    assert bus._writer is None
