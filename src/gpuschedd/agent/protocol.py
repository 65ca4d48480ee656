"""The daemon ↔ agent protocol: one JSON object per line over a Unix stream socket.

The agent of process PID listens on DIR/agent-PID.sock, where DIR is the model's agent directory (the daemon
passes it as $GPUSCHED_AGENT_DIR; systemd creates it as the unit's RuntimeDirectory, owned by the model's user).
The daemon connects, checks the listener's credentials (it must be PID), and sends:

    {"op": "park", "timeout_ms": N}  →  {"ok": true, "parked_bytes": B, "segments": S, "seconds": T,
                                         "host_address": A}
                                        (the interposer adds "staging_bytes": R, host memory it keeps beside B)
    {"op": "spill"} + a file (SCM_RIGHTS) →  {"ok": true, "spilled_bytes": B, "seconds": T}
    {"op": "read_ahead", "bytes": N}  →  {"ok": true, "bytes": K}   (spilled: start reading the file's first K ≤ N)
    {"op": "unpark"}                  →  {"ok": true, "seconds": T}
    any failure                       →  {"ok": false, "error": "..."}

A park belongs to its connection: the daemon keeps it open while the model is frozen and sends "unpark" on
thaw. If the connection ends while parked (the daemon gave up waiting, or restarted), the agent unparks on its
own as soon as it runs again, so a process is never left without its memory.

The parked bytes lie at `host_address` in the process, B bytes back to back. The disk tier (spill.py) has the
daemon write them to a file of its own and pass it, read-only, with "spill": the agent gives its host memory back
and its unpark reads the bytes from that file. A thaw sends "read_ahead" before the driver restores the process's
contexts: the agent starts reading the file's first bytes into host memory then (no CUDA needed), and the unpark
takes those from there, so the disk does not wait for the restore."""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

AGENT_DIR_ENV = "GPUSCHED_AGENT_DIR"
DAEMON_UID_ENV = "GPUSCHED_AGENT_DAEMON_UID"  # the uid allowed to connect besides root (the daemon's own)
MAX_LINE = 4096
MAX_READ_AHEAD = 1 << 30  # the most a read_ahead may ask for: host memory the agent takes for it until the unpark


def daemon_uid() -> int:
    """The uid the daemon told this process it runs as (root if it did not say)."""
    try:
        return int(os.environ.get(DAEMON_UID_ENV, "0"))
    except ValueError:
        return 0


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"agent-{pid}.sock")


class ProtocolError(Exception):
    """The peer sent something that is not a protocol message, or hung up."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def parse(line: bytes) -> dict[str, Any]:
    """One line (with or without its newline) as a message; ProtocolError if it is not a JSON object."""
    try:
        message = json.loads(line)
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


class Reader:
    """Reads one message per line; a line longer than MAX_LINE or not a JSON object is a ProtocolError. The
    agent's side (blocking, in its own thread); the daemon reads with asyncio (agentlink.py). A file descriptor
    passed with the bytes (SCM_RIGHTS) is kept in `file` for the request that wants it (the last one; an earlier
    one not taken is closed)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""
        self.file = -1

    def take_file(self) -> int:
        """The file passed with the messages so far (-1: none), now the caller's."""
        file, self.file = self.file, -1
        return file

    def close(self) -> None:
        if self.file >= 0:
            os.close(self.take_file())

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("message too long")
            data, fds = receive(self.sock)
            for fd in fds:
                if self.file >= 0:
                    os.close(self.file)
                self.file = fd
            if not data:
                raise ProtocolError("connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return parse(line)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Bytes and the descriptors passed with them (SCM_RIGHTS, at most 4), close-on-exec from the start, so a
    program the model runs meanwhile gets no copy (socket.recv_fds does not pass its flags on: CPython gh-107898)."""
    fds = array.array("i")
    room = socket.CMSG_SPACE(4 * fds.itemsize)
    data, ancillary, _flags, _addr = sock.recvmsg(MAX_LINE, room, socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
