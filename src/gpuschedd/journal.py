"""Every event becomes one structured journal entry with a fixed MESSAGE_ID per kind (explained by the
shipped catalog), so `journalctl MESSAGE_ID=…`, `journalctl GPUSCHED_MODEL=llama` and `journalctl -u
gpusched-model@llama` (through OBJECT_SYSTEMD_UNIT=) all find it."""

from __future__ import annotations

import logging
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
