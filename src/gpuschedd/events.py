"""What happened, as data. The engine emits Events; the journal module writes them, the bus module
turns state changes into PropertiesChanged. Kinds are the journal's GPUSCHED_EVENT= values."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from .validate import shown

if TYPE_CHECKING:
    from .model import Model

# An event's MESSAGE is at most this long: it is one journal line, not a place to keep a caller's data.
MAX_MESSAGE = 4096


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


# One fixed journal MESSAGE_ID per kind (the catalog, catalog/gpuschedd.catalog, explains each; admins filter on them):
# never change one.
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

    def __post_init__(self) -> None:
        # Messages quote what callers handed in (a command, an error from systemd about it): rendered safe here,
        # once for every event, so no caller's text can break a MESSAGE into lines or reorder it.
        object.__setattr__(self, "message", shown(self.message, MAX_MESSAGE))


class EngineListener:
    """Receives what the engine does. Override what you need; the defaults ignore everything."""

    def model_added(self, model: Model) -> None:
        pass

    def model_changed(self, model: Model) -> None:
        pass

    def model_removed(self, model: Model) -> None:
        pass

    def event(self, event: Event) -> None:
        pass
