"""Is a model's counter moving? Shared by the tests whose models count in a file.

Asking "did it move?" and "did it stay still?" need different clocks on a loaded CI machine: movement is
awaited for up to `timeout` (a thawed process may take a while to be scheduled), stillness is watched for a
fixed window after a short settle (an increment already under way when the process was stopped may land)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

Reader = Callable[[], int]

SETTLE = 0.05
STILL_WINDOW = 0.3
MOVE_TIMEOUT = 5.0


def file_counter(path: Path | str) -> Reader:
    def read() -> int:
        try:
            return int(Path(path).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    return read


def moves(read: Reader, timeout: float = MOVE_TIMEOUT) -> bool:
    before, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read() > before:
            return True
        time.sleep(0.01)
    return False


def still(read: Reader, window: float = STILL_WINDOW) -> bool:
    time.sleep(SETTLE)
    before = read()
    time.sleep(window)
    return read() == before


async def amoves(read: Reader, timeout: float = MOVE_TIMEOUT) -> bool:
    return await asyncio.to_thread(moves, read, timeout)


async def astill(read: Reader, window: float = STILL_WINDOW) -> bool:
    return await asyncio.to_thread(still, read, window)
