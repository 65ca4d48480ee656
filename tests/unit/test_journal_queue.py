"""Journal writes never block the caller: a journal that does not read fills a bounded queue, the overflow is
counted, and the count is written as a warning once the journal reads again."""

from __future__ import annotations

import logging
import threading

import pytest

from gpuschedd.journal import JournalQueue


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
