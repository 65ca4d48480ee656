"""The daemon's end of the fast path: talk to the agent inside a model process (gpuschedd.agent.protocol).

Asyncio sockets on the daemon's event loop, not worker threads: an agent is code of the model's user, and a
thread blocked on a slow or silent agent would be a thread every other freeze and checkpoint call waits for.
Every call (connect, request, whole reply) has one overall deadline and a bounded reply, so a hostile agent
(drip-feeding, silent, garbage, endless line, hanging up) costs only its own process's park, and a caller can
cancel the wait (a Stop). Anything that goes wrong raises AgentFailed, and the engine then takes the driver
path for that process, which works for every process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from typing import Any

from .agent.protocol import MAX_LINE, MAX_READ_AHEAD, ProtocolError, encode, parse, peer_credentials, socket_path

GRACE_S = 5.0  # beyond the agent's own deadline: the time to answer once it gave up


class AgentFailed(Exception):
    """The agent could not be reached, refused, or failed; the message says why. `answered`: the agent itself
    replied with the failure (it is alive and kept its state), rather than the connection failing."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class AgentLink:
    """One connection to the agent of one process. A park lasts as long as the connection: close it only after
    an unpark, or to let the agent unpark by itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int) -> None:
        self.reader, self.writer, self.pid = reader, writer, pid
        self.seconds = 0.0  # the agent's time for its last park or unpark, as it reported it
        # Host memory the agent keeps beside its parked bytes until the unpark (the interposer's staging ring)
        self.staging_bytes = 0
        # The last park's bytes and where they lie in the process (0: the agent did not say), and whether they
        # went to a spill file since (spill.py)
        self.parked_bytes = self.host_address = 0
        self.spilled = False

    @classmethod
    async def connect(cls, directory: str, pid: int, timeout_s: float) -> AgentLink | None:
        """The agent of `pid`, or None where the process has none (no socket: it did not enable one)."""
        path = socket_path(directory, pid)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AgentFailed(f"{path} is not a socket")
        except FileNotFoundError:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        except TimeoutError:
            raise AgentFailed(f"cannot reach the agent of pid {pid}: no answer in {timeout_s:g}s") from None
        except OSError as e:
            raise AgentFailed(f"cannot reach the agent of pid {pid}: {e.strerror or e}") from None
        link = cls(reader, writer, pid)
        try:
            # Whoever can write the model's directory could put a socket there: only `pid` itself may answer.
            peer = peer_credentials(writer.get_extra_info("socket"))[0]
        except OSError as e:
            link.close()
            raise AgentFailed(f"cannot reach the agent of pid {pid}: {e.strerror or e}") from None
        if peer != pid:
            link.close()
            raise AgentFailed(f"{path} is served by pid {peer}, not {pid}")
        return link

    async def _call(self, message: dict[str, Any], timeout_s: float, file: int = -1) -> dict[str, Any]:
        """One request (with `file` passed along, SCM_RIGHTS) and its whole reply within `timeout_s`, the reply at
        most one MAX_LINE line."""
        try:
            async with asyncio.timeout(timeout_s):
                if file >= 0:
                    self._send_with(encode(message), file)
                else:
                    self.writer.write(encode(message))
                    await self.writer.drain()
                reply = parse(await self.reader.readuntil(b"\n"))
        except TimeoutError:
            raise AgentFailed(f"agent of pid {self.pid}: no whole answer in {timeout_s:g}s") from None
        except asyncio.LimitOverrunError:
            raise AgentFailed(f"agent of pid {self.pid}: message too long") from None
        except asyncio.IncompleteReadError:
            raise AgentFailed(f"agent of pid {self.pid}: connection closed") from None
        except (OSError, ProtocolError) as e:
            raise AgentFailed(f"agent of pid {self.pid}: {e}") from None
        if reply.get("ok") is not True:
            raise AgentFailed(f"agent of pid {self.pid}: {str(reply.get('error', 'failed'))[:500]}", answered=True)
        return reply

    def _send_with(self, data: bytes, file: int) -> None:
        """`data` and a copy of descriptor `file` in one message, on the stream's socket (asyncio's streams carry
        no descriptors). Nothing of the stream's may be waiting to go out before it."""
        sock = self.writer.get_extra_info("socket")
        if sock is None or self.writer.transport.get_write_buffer_size():
            raise OSError("the connection is not idle")
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:  # non-blocking, as the stream's own socket
            if socket.send_fds(raw, [data], [file]) != len(data):
                raise OSError("the message went out in part")

    async def park(self, timeout_ms: int) -> int:
        """Park; returns the bytes parked (the agent's own time for it in `seconds`, the host memory it keeps
        beside them in `staging_bytes`, where they lie in `host_address`)."""
        reply = await self._call({"op": "park", "timeout_ms": timeout_ms}, timeout_ms / 1000 + GRACE_S)
        parked, staging = reply.get("parked_bytes"), reply.get("staging_bytes", 0)
        address = reply.get("host_address", 0)
        if any(type(n) is not int or n < 0 for n in (parked, staging, address)):
            raise AgentFailed(f"agent of pid {self.pid}: bad reply {reply!r:.200}")
        self.staging_bytes, self.parked_bytes, self.host_address, self.spilled = staging, parked, address, False
        self._took(reply)
        return parked

    async def spill(self, file: int, timeout_s: float) -> None:
        """The parked bytes are in `file` (spill.py wrote them): the agent keeps a copy of the descriptor, gives
        its host memory back, and reads them from the file at the unpark."""
        self._took(await self._call({"op": "spill"}, timeout_s, file))
        self.spilled = True

    async def read_ahead(self, size: int, timeout_s: float) -> int:
        """A thaw begins: the agent starts reading its spill file's first `size` bytes (no more than it spilled)
        while the driver restores the process; returns how many it reads (an earlier call's figure, if one
        started it)."""
        reply = await self._call({"op": "read_ahead", "bytes": size}, timeout_s)
        started = reply.get("bytes")
        if type(started) is not int or not 0 <= started <= MAX_READ_AHEAD:
            raise AgentFailed(f"agent of pid {self.pid}: bad reply {reply!r:.200}")
        return started

    async def unpark(self, timeout_s: float) -> None:
        self._took(await self._call({"op": "unpark"}, timeout_s))

    def _took(self, reply: dict[str, Any]) -> None:
        seconds = reply.get("seconds")
        self.seconds = float(seconds) if type(seconds) in (int, float) else 0.0

    def close(self) -> None:
        """Hang up now (no wait for the peer: a hostile one could make a graceful close wait)."""
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.transport.abort()
