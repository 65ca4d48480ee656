"""The agent's listener: a thread in the model process that answers the daemon's park and unpark requests
(protocol.py), and the gate that keeps the model's own work away from its memory while it is parked."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from .parking import ParkError, ParkingLot
from .protocol import AGENT_DIR_ENV, MAX_READ_AHEAD, ProtocolError, Reader, peer_credentials, send, socket_path

log = logging.getLogger(__name__)

MAX_PARK_TIMEOUT_MS = 600_000
RETRY_UNPARK_S = 1.0


class Agent:
    def __init__(
        self,
        lot: ParkingLot,
        directory: str | None,
        daemon_uid: int = 0,
        before_park: Callable[[], None] | None = None,
        routing: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.lot, self.directory, self.before_park, self.routing = lot, directory, before_park, routing
        self.allowed_uids = {0, daemon_uid}
        self.gate = threading.Lock()  # held by the model around its work, and by the agent while parked
        self.path = socket_path(directory, os.getpid()) if directory else ""
        self._listener: socket.socket | None = None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold around each unit of GPU work (a request, a training step): a park waits for it to end, and work
        waits while the memory is parked."""
        with self.gate:
            yield

    @contextlib.contextmanager
    def parkable(self) -> Iterator[None]:
        """Allocate inside this scope what a freeze should park: load the model, allocate its caches. Like
        busy(), a park waits for it (so never open it inside busy() or itself: the gate is one lock); capture
        CUDA graphs outside it."""
        with self.gate, self.routing() if self.routing else contextlib.nullcontext():
            yield

    def start(self) -> None:
        """Listen for the daemon, if it gave this process an agent directory."""
        if not self.path:
            log.info("gpusched agent: no $%s, so no daemon to serve; memory is parkable, never parked", AGENT_DIR_ENV)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by an earlier process with this PID
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(4)
        self._listener = listener
        atexit.register(self._remove_socket)
        threading.Thread(target=self._serve, name="gpusched-agent", daemon=True).start()

    def close(self) -> None:
        """Stop listening (the process is going away, or a test is done)."""
        if self._listener is not None:
            self._listener.close()
            self._remove_socket()

    def _remove_socket(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                _pid, uid, _gid = peer_credentials(conn)
                if uid not in self.allowed_uids:
                    log.warning("gpusched agent: refused a connection from uid %d", uid)
                    continue
                self._session(conn)
            except Exception:
                log.exception("gpusched agent: session failed")
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        """One daemon connection. A park made here is undone here if the connection ends without an unpark."""
        reader, parked = Reader(conn), False
        try:
            while True:
                message = reader.read()
                op = message.get("op")
                if op == "park" and not parked:
                    parked = self._park(conn, message.get("timeout_ms"))
                elif op == "spill" and parked:
                    self._spill(conn, reader.take_file())
                elif op == "read_ahead" and parked:
                    self._read_ahead(conn, message.get("bytes"))
                elif op == "unpark" and parked:
                    parked = not self._unpark(conn)
                else:
                    state = "parked" if parked else "not parked"
                    send(conn, {"ok": False, "error": f"unexpected request {op!r} while {state}"})
        except (ProtocolError, OSError) as e:
            if parked:
                log.warning("gpusched agent: daemon connection ended while parked (%s): unparking", e)
        finally:
            reader.close()
            if parked:
                self._unpark_alone()

    def _park(self, conn: socket.socket, timeout_ms: object) -> bool:
        if type(timeout_ms) is not int or not 0 <= timeout_ms <= MAX_PARK_TIMEOUT_MS:
            send(conn, {"ok": False, "error": f"timeout_ms must be an integer in [0, {MAX_PARK_TIMEOUT_MS}]"})
            return False
        if not self.gate.acquire(timeout=timeout_ms / 1000):
            send(conn, {"ok": False, "error": f"the model stayed busy for {timeout_ms} ms"})
            return False
        try:
            if self.before_park is not None:
                self.before_park()
            report = self.lot.park()
        except (ParkError, RuntimeError) as e:
            self.gate.release()
            send(conn, {"ok": False, "error": str(e)})
            return False
        send(conn, {
            "ok": True, "parked_bytes": report.parked_bytes, "segments": report.segments, "seconds": report.total_s,
            "host_address": report.host_address,
        })  # fmt: skip
        return True

    def _spill(self, conn: socket.socket, file: int) -> None:
        """The daemon wrote the parked bytes to `file`: the host memory goes, the unpark reads them from there."""
        if file < 0:
            send(conn, {"ok": False, "error": "spill needs the file the parked bytes were written to (SCM_RIGHTS)"})
            return
        try:
            report = self.lot.spill(file)
        except ParkError as e:
            os.close(file)
            send(conn, {"ok": False, "error": str(e)})
            return
        send(conn, {"ok": True, "spilled_bytes": report.parked_bytes, "seconds": report.total_s})

    def _read_ahead(self, conn: socket.socket, size: object) -> None:
        """A thaw begins: read the spill file's first bytes while the driver restores the contexts."""
        if type(size) is not int or not 0 <= size <= MAX_READ_AHEAD:
            send(conn, {"ok": False, "error": f"bytes must be an integer in [0, {MAX_READ_AHEAD}]"})
            return
        try:
            started = self.lot.read_ahead(size)
        except ParkError as e:
            send(conn, {"ok": False, "error": str(e)})
            return
        send(conn, {"ok": True, "bytes": started})

    def _unpark(self, conn: socket.socket) -> bool:
        try:
            report = self.lot.unpark()
        except ParkError as e:
            send(conn, {"ok": False, "error": str(e)})
            return False
        self.gate.release()
        send(conn, {"ok": True, "seconds": report.total_s})
        return True

    def _unpark_alone(self) -> None:
        """Without a daemon to ask: keep trying (the GPU may be full for a while); the model cannot work without
        its memory, and the gate keeps it waiting meanwhile."""
        while True:
            try:
                self.lot.unpark()
                break
            except ParkError as e:
                log.error("gpusched agent: unpark failed, retrying: %s", e)
                time.sleep(RETRY_UNPARK_S)
        self.gate.release()
