"""Journal writes never block the caller: a journal that does not read fills a bounded queue, the overflow is
counted, and the count is written as a warning once the journal reads again. Entries go in journald's native
protocol, written by the daemon itself."""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
from pathlib import Path

import pytest

from gpuschedd import journal as journal_module
from gpuschedd.events import Event, EventKind
from gpuschedd.journal import JournalQueue, JournalWriter, NativeJournal, encode_entry


def test_a_stalled_journal_never_blocks_and_drops_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    resume = threading.Event()
    written: list[int] = []

    def stalled_send(n: int) -> None:
        resume.wait()  # journald SIGSTOPped: the send blocks
        written.append(n)

    journal = JournalQueue(size=4)
    for n in range(10):
        journal.put(stalled_send, n)  # returns at once although nothing is written
    dropped = journal.dropped
    assert written == [] and dropped >= 5
    with caplog.at_level(logging.WARNING, logger="gpuschedd.journal"):
        resume.set()
        journal.close(5)
    assert written == sorted(written) and len(written) + dropped == 10
    assert any(f"{dropped} journal entries were dropped" in r.getMessage() for r in caplog.records)
    assert journal.dropped == 0


def test_native_entries_as_journald_reads_them(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "socket"))
    journal = NativeJournal(str(tmp_path / "socket"))
    journal.send("two\nlines", PRIORITY="3")
    assert server.recv(4096) == b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\nPRIORITY=3\n"
    big = "x" * (1 << 20)  # over a datagram's limit: a sealed memfd
    journal.send(big)
    _, ancdata, _, _ = server.recvmsg(16, socket.CMSG_SPACE(4))
    fd = array.array("i", ancdata[0][2])[0]
    with os.fdopen(fd, "rb") as f:
        f.seek(0)  # journald reads the memfd from its start
        assert f.read() == encode_entry({"MESSAGE": big})


def test_events_go_at_once_while_journald_reads_and_keep_their_order_when_it_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "socket"))
    monkeypatch.setattr(journal_module, "JOURNAL_SOCKET", str(tmp_path / "socket"))
    queue = JournalQueue()
    writer = JournalWriter(queue)

    def event(n: int) -> None:
        writer.event(Event(EventKind.FREEZE, "m", "gpusched-model@m.service", f"entry {n}"))

    event(0)  # nothing queued: sent by the caller itself, no thread involved
    assert queue.idle() and b"MESSAGE=entry 0\n" in server.recv(4096)
    # journald not reading: its socket queue (net.unix.max_dgram_qlen) fills, the rest waits in the JournalQueue,
    # and nothing sent at once overtakes what waits there.
    entries = 60
    for n in range(1, entries + 1):
        event(n)
    assert not queue.idle()
    got = [server.recv(4096).split(b"\n")[0] for _ in range(entries)]
    assert got == [f"MESSAGE=entry {n}".encode() for n in range(1, entries + 1)]
    queue.close(5)
