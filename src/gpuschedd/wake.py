"""gpusched-wake: the proxy behind a model's public port (wake on first connection).

gpuschedd never touches TCP (its unit has PrivateNetwork=yes and AF_UNIX only). For a model run with the Port=
option it starts, next to the model's unit, the transient socket unit gpusched-wake@NAME.socket (systemd owns the
listening socket) and gpusched-wake@NAME.service, which runs this module as the model's user with the socket passed
in (LISTEN_FDS). For each connection: if the model is frozen, ask gpuschedd to thaw it (Thaw over the system bus,
authorized like any call of the owner), wait until it runs, then connect to 127.0.0.1:BACKEND_PORT and copy bytes
both ways. Concurrent connections share one thaw. Only the standard library and the SDK.

The backend must be the model's own server: the connection is handed over only when the socket that answered it
belongs to the proxy's own user, the model's (the kernel's socket table, /proc/net/tcp, names the owner of the
listening socket each accepted connection came from). Another user's or root's loopback service on BACKEND_PORT is
never exposed through a model's public port. The check is of the very connection made, so no other listener can
take the port between check and use.

Usage: python3 -m gpuschedd.wake NAME BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import sys

from .client import AsyncGpuSched
from .errors import GpuschedError

log = logging.getLogger("gpusched-wake")
SD_LISTEN_FDS_START = 3
THAW_TIMEOUT = 120.0  # a CUDA restore of a large model takes seconds; the kernel keeps the client waiting
BACKEND_TIMEOUT = 120.0  # a model that was just started may take this long to listen
CHUNK = 1 << 16


def listen_sockets() -> list[socket.socket]:
    """The sockets systemd passed (sd_listen_fds(3)); empty when not socket-activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


class ForeignBackend(OSError):
    """BACKEND_PORT is served by a socket of another user: not the model's server."""


def _endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An address of /proc/net/tcp{,6} (32-bit words in host order, then the port), IPv4-mapped made IPv4."""
    addr, port = text.split(":")
    packed = b"".join(struct.pack("=I", int(addr[i : i + 8], 16)) for i in range(0, len(addr), 8))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, int(port, 16)
    return ip, int(port, 16)


def server_uid(sock: socket.socket) -> int | None:
    """The owner of the socket at the other end of a connection to this host (the listening socket's owner, which
    its accepted connections keep), from the kernel's socket table; None if it is not listed."""
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    want_local = (ipaddress.ip_address(peer[0]), peer[1])
    want_peer = (ipaddress.ip_address(local[0]), local[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if (_endpoint(fields[1]), _endpoint(fields[2])) == (want_local, want_peer):
                        return int(fields[7])
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return None


async def check_own(writer: asyncio.StreamWriter, uid: int) -> None:
    """Refuse a backend connection whose server is not `uid`'s. The server's end of a connection just made over
    loopback is listed at once or within a few milliseconds (the handshake's last step)."""
    sock = writer.get_extra_info("socket")
    for _ in range(50):
        owner = server_uid(sock)
        if owner is not None:
            break
        await asyncio.sleep(0.01)
    if owner != uid:
        raise ForeignBackend(f"port {sock.getpeername()[1]} is served by uid {owner}, not by this model's user {uid}")


class Waker:
    def __init__(self, name: str, backend_port: int, client: AsyncGpuSched) -> None:
        self.name = name
        self.backend_port = backend_port
        self.client = client
        self._lock = asyncio.Lock()  # one thaw for many connections

    async def ensure_running(self) -> None:
        async with self._lock:
            state = await self.client.state(self.name)
            if state == "running":
                return
            if state == "frozen":
                log.info("connection to frozen model %s: thawing it", self.name)
                with contextlib.suppress(GpuschedError):  # someone else may be thawing it right now
                    await self.client.thaw(self.name)
            await self.client.wait_for_state(self.name, "running", timeout=THAW_TIMEOUT)

    async def backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BACKEND_TIMEOUT
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.02)
                continue
            try:
                await check_own(writer, os.geteuid())
            except BaseException:
                writer.close()
                raise
            return reader, writer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.ensure_running()
            b_reader, b_writer = await self.backend()
        except (GpuschedError, OSError, TimeoutError) as e:
            log.warning("cannot hand a connection to model %s: %s", self.name, e)
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, b_writer), _pipe(b_reader, writer))
        finally:
            b_writer.close()
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction; pass its end on as a half-close, a reset as a close."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def serve(name: str, backend_port: int, sockets: list[socket.socket]) -> None:
    async with AsyncGpuSched(interactive=False) as client:
        waker = Waker(name, backend_port, client)
        servers = [await asyncio.start_server(waker.handle, sock=sock) for sock in sockets]
        log.info("model %s: %d socket(s) handed to 127.0.0.1:%d", name, len(servers), backend_port)
        await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args) != 2 or not args[1].isdigit():
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    sockets = listen_sockets()
    if not sockets:
        print("gpusched-wake: no socket passed by systemd (LISTEN_FDS)", file=sys.stderr)
        return 2
    asyncio.run(serve(args[0], int(args[1]), sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
