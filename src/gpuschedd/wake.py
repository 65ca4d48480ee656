"""gpusched-wake: the proxy behind a model's public port (wake on first connection).

gpuschedd never touches TCP (its unit has PrivateNetwork=yes and AF_UNIX only). For a model run with the Port=
option it starts, next to the model's unit, the transient socket unit gpusched-wake@NAME.socket (systemd owns the
listening socket) and gpusched-wake@NAME.service, which runs this module as the model's user with the socket passed
in (LISTEN_FDS). For each connection: if the model is frozen, ask gpuschedd to thaw it (Thaw over the system bus,
authorized like any call of the owner), wait until it runs, then connect to 127.0.0.1:BACKEND_PORT and copy bytes
both ways. Concurrent connections share one thaw. Only the standard library and the SDK.

Usage: python3 -m gpuschedd.wake NAME BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
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
                return await asyncio.open_connection("127.0.0.1", self.backend_port)
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.02)

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
