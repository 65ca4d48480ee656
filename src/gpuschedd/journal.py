"""Every event becomes one structured journal entry with a fixed MESSAGE_ID per kind (explained by the
shipped catalog), so `journalctl MESSAGE_ID=…`, `journalctl GPUSCHED_MODEL=llama` and `journalctl -u
gpusched-model@llama` (through OBJECT_SYSTEMD_UNIT=) all find it."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from .engine import EngineListener
from .errors import InvalidArgs, InvalidState, ModelExists, NoSuchModel, NotSupported
from .events import MESSAGE_IDS, Event, EventKind

log = logging.getLogger(__name__)

# syslog priorities: failures are errors, refusals warnings, the rest notices. A refusal that only answers a
# caller's own mistake (a name that does not exist, a thaw of a running model) is a notice.
_PRIORITY = {EventKind.FAILURE: 3, EventKind.REFUSAL: 4}
_TIMED = {EventKind.RUN, EventKind.FREEZE, EventKind.THAW, EventKind.SWAP, EventKind.STOP}
_SIZED = {EventKind.FREEZE, EventKind.THAW}
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
    if event.bytes or event.kind in _SIZED:
        fields["GPUSCHED_BYTES"] = str(event.bytes)
    if event.gpus:
        fields["GPUSCHED_GPUS"] = " ".join(event.gpus)
    fields.update(event.fields)
    return fields


def _journal_sender() -> Callable[..., None] | None:
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal.send


# Entries waiting for journald. A burst of events is a few hundred; a journald stopped for a minute under a busy
# daemon is not worth more memory than this.
QUEUE_SIZE = 4096


class JournalQueue:
    """Writes to the journal (events and log records) from one thread, never from the event loop.

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
    """Each event as one structured entry, written by the JournalQueue's thread."""

    def __init__(self, journal: JournalQueue | None = None) -> None:
        self._send = _journal_sender()
        self._journal = journal or journal_queue()
        if self._send is None:
            log.warning("systemd-python is not installed: events go to the plain log only")

    def event(self, event: Event) -> None:
        if self._send is None:
            log.info("%s", event.message)
            return
        self._journal.put(self._send, event.message, **journal_fields(event))
