"""The daemon's end of the fast path: talk to the agent inside a model process (gpuschedd.agent.protocol).

Blocking calls: the engine runs them in worker threads. Anything that goes wrong raises AgentFailed, and the
engine then takes the driver path for that process, which works for every process."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from typing import Any

from .agent.protocol import ProtocolError, Reader, peer_credentials, send, socket_path

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

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid, self._reader = sock, pid, Reader(sock)
        self.seconds = 0.0  # the agent's time for its last park or unpark, as it reported it

    @classmethod
    def connect(cls, directory: str, pid: int, timeout_s: float) -> AgentLink | None:
        """The agent of `pid`, or None where the process has none (no socket: it did not enable one)."""
        path = socket_path(directory, pid)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise AgentFailed(f"{path} is not a socket")
        except FileNotFoundError:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(path)
            # Whoever can write the model's directory could put a socket there: only `pid` itself may answer.
            peer = peer_credentials(sock)[0]
            if peer != pid:
                raise AgentFailed(f"{path} is served by pid {peer}, not {pid}")
        except OSError as e:
            sock.close()
            raise AgentFailed(f"cannot reach the agent of pid {pid}: {e.strerror or e}") from None
        except AgentFailed:
            sock.close()
            raise
        return cls(sock, pid)

    def _call(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        self.sock.settimeout(timeout_s)
        try:
            send(self.sock, message)
            reply = self._reader.read()
        except (OSError, ProtocolError) as e:
            raise AgentFailed(f"agent of pid {self.pid}: {e}") from None
        if reply.get("ok") is not True:
            raise AgentFailed(f"agent of pid {self.pid}: {str(reply.get('error', 'failed'))[:500]}", answered=True)
        return reply

    def park(self, timeout_ms: int) -> int:
        """Park; returns the bytes parked (the agent's own time for it in `seconds`)."""
        reply = self._call({"op": "park", "timeout_ms": timeout_ms}, timeout_ms / 1000 + GRACE_S)
        parked = reply.get("parked_bytes")
        if type(parked) is not int or parked < 0:
            raise AgentFailed(f"agent of pid {self.pid}: bad reply {reply!r:.200}")
        self._took(reply)
        return parked

    def unpark(self, timeout_s: float) -> None:
        self._took(self._call({"op": "unpark"}, timeout_s))

    def _took(self, reply: dict[str, Any]) -> None:
        seconds = reply.get("seconds")
        self.seconds = float(seconds) if type(seconds) in (int, float) else 0.0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
