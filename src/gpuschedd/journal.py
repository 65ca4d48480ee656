"""Every event becomes one structured journal entry with a fixed MESSAGE_ID per kind (explained by the
shipped catalog), so `journalctl MESSAGE_ID=…`, `journalctl GPUSCHED_MODEL=llama` and `journalctl -u
gpusched-model@llama` (through OBJECT_SYSTEMD_UNIT=) all find it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .engine import EngineListener
from .events import Event, EventKind

log = logging.getLogger(__name__)

MESSAGE_IDS: dict[EventKind, str] = {
    EventKind.RUN: "cb57558bd23447f9a14a0bd4316686c1",
    EventKind.FREEZE: "4fe48b83b1b04f82ac3ece8dd506c426",
    EventKind.THAW: "5389f99ed3ff4728ae672ab45d370485",
    EventKind.SWAP: "f771a2e6d3db49c6b8775bcd0ed9612d",
    EventKind.STOP: "1c7bd5e44d494e8ba189a31d745afa1f",
    EventKind.EXIT: "c54537ba923647cd9f9503ccac4581a6",
    EventKind.FAILURE: "9d5d0bbb392d404fa3929c0bb00957bc",
    EventKind.REFUSAL: "1bec027d9f7947d1a84457cbc4efe55c",
    EventKind.ADOPT: "4820b1fefb24437aa4988a0d61583a23",
    EventKind.FORGET: "9cfd0d9195b04603a3b703a4dc520de5",
    EventKind.MIGRATE: "bacfcd76f96d467ebe962da40948e1e0",
}

# syslog priorities: failures are errors, refusals warnings, the rest notices.
_PRIORITY = {EventKind.FAILURE: 3, EventKind.REFUSAL: 4}


def journal_fields(event: Event) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "MESSAGE_ID": MESSAGE_IDS[event.kind],
        "PRIORITY": str(_PRIORITY.get(event.kind, 5)),
        "GPUSCHED_MODEL": event.model,
        "GPUSCHED_EVENT": str(event.kind),
        "OBJECT_SYSTEMD_UNIT": event.unit,
        "SYSLOG_IDENTIFIER": "gpuschedd",
    }
    if event.duration_usec:
        fields["GPUSCHED_DURATION_USEC"] = str(event.duration_usec)
    if event.bytes:
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


class JournalWriter(EngineListener):
    def __init__(self) -> None:
        self._send = _journal_sender()
        if self._send is None:
            log.warning("systemd-python is not installed: events go to the plain log only")

    def event(self, event: Event) -> None:
        if self._send is None:
            log.info("%s", event.message)
            return
        self._send(event.message, **journal_fields(event))
