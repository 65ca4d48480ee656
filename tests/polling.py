"""The one wait-until helper of every test tier (unit, system, packaging): poll a condition until it holds, and
fail naming what was awaited. Tests wait for the effect they need, never for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

TIMEOUT = 10.0
POLL = 0.01


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = TIMEOUT, poll: float = POLL) -> Any:
    """Poll until predicate() is truthy and return its value; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(poll)


async def until(what: str, predicate: Callable[[], Any], timeout: float = TIMEOUT, poll: float = POLL) -> Any:
    """wait_until on the event loop: the loop runs (the engine's tasks move on) between two polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(poll)
