"""What happened, as data. The engine emits Events; the journal module writes them, the bus module
turns state changes into PropertiesChanged. Kinds are the journal's GPUSCHED_EVENT= values."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class EventKind(StrEnum):
    RUN = "run"
    FREEZE = "freeze"
    THAW = "thaw"
    SWAP = "swap"
    STOP = "stop"
    EXIT = "exit"
    FAILURE = "failure"
    REFUSAL = "refusal"
    ADOPT = "adopt"
    FORGET = "forget"
    MIGRATE = "migrate"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    model: str
    unit: str
    message: str
    duration_usec: int = 0
    bytes: int = 0
    gpus: tuple[str, ...] = ()
    fields: dict[str, str] = field(default_factory=dict)
