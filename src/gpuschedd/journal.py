"""Every event becomes one structured journal entry with a fixed MESSAGE_ID per kind (explained by the
shipped catalog), so `journalctl MESSAGE_ID=…`, `journalctl GPUSCHED_MODEL=llama` and `journalctl -u
gpusched-model@llama` (through OBJECT_SYSTEMD_UNIT=) all find it."""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from .errors import InvalidArgs, InvalidState, ModelExists, NoSuchModel, NotSupported
from .events import MESSAGE_IDS, EngineListener, Event, EventKind, timespan

log = logging.getLogger(__name__)

# syslog priorities: failures are errors, refusals warnings, the rest notices. A refusal that only answers a
# caller's own mistake (a name that does not exist, a thaw of a running model) is a notice.
_PRIORITY = {EventKind.FAILURE: 3, EventKind.REFUSAL: 4}
_TIMED = {EventKind.RUN, EventKind.FREEZE, EventKind.THAW, EventKind.SWAP, EventKind.STOP, EventKind.PAGE_OUT}
_SIZED = {EventKind.FREEZE, EventKind.THAW, EventKind.PAGE_OUT}
_CALLER_MISTAKES = {cls.dbus_name for cls in (NoSuchModel, ModelExists, InvalidState, InvalidArgs, NotSupported)}


def journal_fields(event: Event) -> dict[str, Any]:
    priority = _PRIORITY.get(event.kind, 5)
    if event.kind == EventKind.REFUSAL and event.fields.get("GPUSCHED_ERROR") in _CALLER_MISTAKES:
        priority = 5
    fields: dict[str, Any] = {
        "MESSAGE_ID": MESSAGE_IDS[event.kind],
        "PRIORITY": str(priority),
        "GPUSCHED_EVENT": str(event.kind),
        "SYSLOG_IDENTIFIER": "gpuschedd",
    }
    # A refusal may name no valid model (a malformed name is never written back).
    if event.model:
        fields["GPUSCHED_MODEL"] = event.model
    if event.unit:
        fields["OBJECT_SYSTEMD_UNIT"] = event.unit
    # The catalog's text cites these fields for the kinds that always carry them (a missing one would show as
    # its bare name there), so they are written even when zero.
    if event.duration_usec or event.kind in _TIMED:
        fields["GPUSCHED_DURATION_USEC"] = str(event.duration_usec)
        fields["GPUSCHED_DURATION"] = timespan(event.duration_usec)  # for people: the catalog's texts cite it
    if event.bytes or event.kind in _SIZED:
        fields["GPUSCHED_BYTES"] = str(event.bytes)
    if event.gpus:
        fields["GPUSCHED_GPUS"] = " ".join(event.gpus)
    fields.update(event.fields)
    return fields


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def encode_entry(fields: dict[str, Any]) -> bytes:
    """journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): KEY=value lines, or for a value with a
    newline KEY, its length as 64-bit little endian, the value, a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeJournal:
    """Sends entries to journald's socket itself. systemd-python's journal.send() keeps the GIL while its send
    blocks, so a stopped journald stopped every thread of the daemon, the event loop included; a Python socket
    releases the GIL while it waits. An entry too large for one datagram goes as a sealed memfd, as sd_journal does."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, message: str, **fields: Any) -> None:
        data = encode_entry({"MESSAGE": message, **fields})
        try:
            self._sock.sendto(data, self.path)
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_large(data)

    def send_nowait(self, message: str, **fields: Any) -> bool:
        """Send at once if journald takes it without waiting; False if not (its queue full, the entry too large for
        one datagram, the socket gone), for the caller to queue it instead. Never raises, never blocks."""
        try:
            self._sock.sendto(encode_entry({"MESSAGE": message, **fields}), socket.MSG_DONTWAIT, self.path)
        except OSError:
            return False
        return True

    def _send_large(self, data: bytes) -> None:
        fd = os.memfd_create("gpuschedd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            )
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, self.path)
        finally:
            os.close(fd)


def _native_journal() -> NativeJournal | None:
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    return NativeJournal(JOURNAL_SOCKET)


# Entries waiting for journald. A burst of events is a few hundred; a journald stopped for a minute under a busy
# daemon is not worth more memory than this.
QUEUE_SIZE = 4096


class JournalQueue:
    """Writes to the journal (events and log records) from one thread: what the event loop cannot send without
    waiting (JournalWriter sends an event itself only when journald takes it at once and nothing is queued).

    journald's sockets block their writer when it does not read (a datagram queue of max_dgram_qlen=10 entries, a
    stream buffer): a journald stopped or stalled would stop every Freeze, Thaw and ListModels with it. Non-blocking
    sends would drop an entry on every full socket, even in a short burst that journald catches up on a moment
    later; a bounded queue drained by a thread absorbs the burst, keeps the order, and drops only when it is full. A
    drop is never silent: the count is written as a warning as soon as journald takes entries again."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]] | None] = queue.Queue(size)
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._drain, name="journal", daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        """Nothing queued and nothing being written: a write made now cannot overtake an earlier one."""
        return self._queue.unfinished_tasks == 0

    def put(self, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            self._queue.put_nowait((write, args, kwargs))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            write, args, kwargs = item
            try:
                write(*args, **kwargs)
            except Exception as e:  # the journal is gone (a reinstall, a test): the entry only
                print(f"gpuschedd: cannot write to the journal: {e}", file=sys.stderr)
            self._queue.task_done()
            with self._lock:
                dropped, self.dropped = self.dropped, 0
            if dropped:
                log.warning("%d journal entries were dropped while journald was not reading", dropped)

    def close(self, timeout: float) -> None:
        """Let the entries already queued reach the journal, waiting at most `timeout` seconds for it."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


_queue: JournalQueue | None = None


def journal_queue() -> JournalQueue:
    global _queue
    if _queue is None:
        _queue = JournalQueue()
    return _queue


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=DEV:INODE when stderr is connected to journald (systemd.exec(5))."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


class QueuedLogHandler(logging.Handler):
    """The daemon's log lines, through the JournalQueue to stderr. Under systemd each line starts with its syslog
    priority (<3> for an error: journald's SyslogLevelPrefix=), so `journalctl -p warning` shows errors and
    warnings; without a prefix journald would file every line at info."""

    def __init__(self, journal: JournalQueue) -> None:
        super().__init__()
        self._journal = journal
        self._prefix = _stderr_is_journal()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self._prefix:
            text = f"<{_syslog_priority(record.levelno)}>{text}"
        self._journal.put(_write_stderr, text + "\n")


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def _write_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def setup_logging(level: int = logging.INFO) -> JournalQueue:
    """The daemon's logging, through the journal queue: no log call blocks the event loop."""
    journal = journal_queue()
    handler = QueuedLogHandler(journal)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    return journal


class JournalWriter(EngineListener):
    """Each event as one structured entry: sent at once when journald takes it without waiting and nothing is queued
    before it, else written by the JournalQueue's thread. Waking that thread for every entry put a thread switch
    (and the two threads' turns at the GIL) into every freeze's reply (bench/control_plane.py)."""

    def __init__(self, journal: JournalQueue | None = None) -> None:
        self._native = _native_journal()
        self._journal = journal or journal_queue()
        if self._native is None:
            log.warning("no journald (%s): events go to the plain log only", JOURNAL_SOCKET)

    def event(self, event: Event) -> None:
        if self._native is None:
            log.info("%s", event.message)
            return
        fields = journal_fields(event)
        if self._journal.idle() and self._native.send_nowait(event.message, **fields):
            return
        self._journal.put(self._native.send, event.message, **fields)
