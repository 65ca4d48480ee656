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
    PAGE_OUT = "page-out"


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
    EventKind.PAGE_OUT: "d2cdf3d84134402380371dc87834b29d",
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


def timespan(usec: int) -> str:
    """A duration for people, in the style of systemd's: 0.860s, 7.312s, 2min 3.500s, 1h 2min 3s."""
    minutes, seconds = divmod(usec / 1e6, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h {minutes}min {int(seconds)}s"
    return f"{minutes}min {seconds:.3f}s" if minutes else f"{seconds:.3f}s"


# The texts of the events, built here so the engine's steps carry no string formatting. Each returns the Event whole.


def ended(
    model: Model, was: str, result: str, released: int, wake: str, away: bool = False, stopped: bool = False
) -> Event:
    """A model's unit ended by itself (`away`: while no daemon ran; `stopped`: then as a Stop had asked). `released`:
    the host RAM its snapshot held; `wake`: what became of its public port."""
    if away:
        message = f"model {model.name} {'stopped' if stopped else 'ended'} while gpuschedd was not running"
        message += f" (it was {was}; result {result})" + (
            f"; {released} bytes of host RAM released" if released else ""
        )
    else:
        message = f"model {model.name} exited ({result})" + (f" while {was}" if was != "running" else "")
        message += f"; its snapshot is lost and {released} bytes of host RAM were released" if released else ""
    return Event(
        EventKind.STOP if stopped else EventKind.EXIT,
        model.name,
        model.unit,
        message + wake,
        bytes=released,
        fields={"GPUSCHED_RESULT": result, "GPUSCHED_STATE_BEFORE": was},
    )


def started(model: Model, duration_usec: int) -> Event:
    return Event(
        EventKind.RUN,
        model.name,
        model.unit,
        f"model {model.name} started as {model.unit}",
        duration_usec=duration_usec,
    )


def frozen(model: Model, cuda: int, backend: str, kept: bool, reason: str, why: str) -> Event:
    """A freeze done: how long, how many CUDA processes, by which path (GPUSCHED_FREEZE_PATH=, the catalog explains
    each), and why when the daemon decided it."""
    how = f"{cuda} CUDA process(es), backend {backend}"
    how += f", {model.parked_bytes} bytes parked by the agent" if model.parked_bytes else ""
    how += ", CUDA contexts kept on the GPU" if kept else ""
    return Event(
        EventKind.FREEZE,
        model.name,
        model.unit,
        f"model {model.name} frozen in {timespan(model.last_freeze_usec)} ({how})" + (f": {why}" if why else ""),
        duration_usec=model.last_freeze_usec,
        bytes=model.snapshot_bytes,
        gpus=tuple(model.gpus),
        fields={"GPUSCHED_FREEZE_PATH": model.freeze_path, "GPUSCHED_CHECKPOINT_BACKEND": backend}
        | ({"GPUSCHED_REASON": reason} if reason else {}),
    )


def thawed(model: Model, in_swap: int = 0, in_files: int = 0) -> Event:
    """A thaw done; bytes of the snapshot that came back from swap and from spill files (the disk tier)."""
    sources = ((in_swap, "swap"), (in_files, "spill files"))
    read = [f"{n} bytes of its snapshot read back from {where}" for n, where in sources if n]
    fields = {"GPUSCHED_FREEZE_PATH": model.freeze_path}
    fields |= {"GPUSCHED_SWAP_BYTES": str(in_swap)} if in_swap else {}
    fields |= {"GPUSCHED_FILE_BYTES": str(in_files)} if in_files else {}
    return Event(
        EventKind.THAW,
        model.name,
        model.unit,
        f"model {model.name} thawed in {timespan(model.last_thaw_usec)}" + (f" ({', '.join(read)})" if read else ""),
        duration_usec=model.last_thaw_usec,
        bytes=model.snapshot_bytes,
        gpus=tuple(model.gpus),
        fields=fields,
    )


def paged_out(model: Model, moved: int, duration_usec: int, skipped: int, reason: str, why: str) -> Event:
    """A page-out done (the disk tier): `moved`, bytes of the snapshot that went to disk by it (swap, or spill files
    for what its agents parked); where the snapshot is now; `skipped`, memory ranges the kernel would not move; why,
    when the daemon decided it."""
    left, in_files = model.snapshot_in_ram(), model.snapshot_in_files()
    message = (
        f"model {model.name} paged out in {timespan(duration_usec)}: {moved} bytes of its snapshot written to disk;"
        f" {model.snapshot_in_swap()} bytes in swap, {in_files} in spill files, {left} in RAM"
    )
    message += f" ({skipped} memory range(s) the kernel would not move)" if skipped else ""
    fields = {
        "GPUSCHED_SWAP_BYTES": str(model.snapshot_in_swap()),
        "GPUSCHED_FILE_BYTES": str(in_files),
        "GPUSCHED_RAM_BYTES": str(left),
    }
    return Event(
        EventKind.PAGE_OUT,
        model.name,
        model.unit,
        message + (f": {why}" if why else ""),
        duration_usec=duration_usec,
        bytes=moved,
        fields=fields | ({"GPUSCHED_REASON": reason} if reason else {}),
    )


def stopped(model: Model, duration_usec: int, reason: str, why: str) -> Event:
    return Event(
        EventKind.STOP,
        model.name,
        model.unit,
        f"model {model.name} stopped" + (f": {why}" if why else ""),
        duration_usec=duration_usec,
        fields={"GPUSCHED_REASON": reason} if reason else {},
    )


def migrated(model: Model, source: str, index: int, target: str, duration_usec: int) -> Event:
    return Event(
        EventKind.MIGRATE,
        model.name,
        model.unit,
        f"model {model.name} migrated from {source} to GPU {index} ({target}) in {timespan(duration_usec)}",
        duration_usec=duration_usec,
        bytes=model.snapshot_bytes,
        gpus=(target,),
        fields={"GPUSCHED_GPU_FROM": source, "GPUSCHED_GPU_TO": target},
    )


def recovered(model: Model, kind: EventKind, why: str, interrupted: str) -> Event:
    """A model brought to a consistent state on start (recovery.py's rules): `interrupted`, the step a restart cut."""
    fields = {"GPUSCHED_RECOVERY": "1"} | ({"GPUSCHED_INTERRUPTED": interrupted} if interrupted else {})
    return Event(kind, model.name, model.unit, f"model {model.name}: {why}", fields=fields)


def lost_pids(model: Model, lost: list[int], share: int) -> Event:
    return Event(
        EventKind.FAILURE,
        model.name,
        model.unit,
        f"model {model.name}: CUDA process(es) {', '.join(map(str, lost))} ended while frozen; their "
        f"snapshot (about {share} bytes of host RAM) is released. The model may need a restart.",
        bytes=share,
    )


def adopted_unit(model: Model) -> Event:
    message = f"unit {model.unit} adopted as model {model.name} (owner uid {model.owner})"
    return Event(EventKind.ADOPT, model.name, model.unit, message)


def adopted_processes(model: Model, pids: list[int]) -> Event:
    message = f"process(es) {', '.join(map(str, pids))} adopted as model {model.name} in {model.unit}"
    return Event(EventKind.ADOPT, model.name, model.unit, message)


def forgotten(model: Model, why: str, reason: str = "") -> Event:
    """A model dropped from the table: by Forget (`why` says whether its unit runs on) or a policy (`reason`)."""
    fields = {"GPUSCHED_REASON": reason} if reason else {}
    return Event(EventKind.FORGET, model.name, model.unit, f"model {model.name} forgotten{why}", fields=fields)


def swapped(out: Model, into: Model, duration_usec: int, overlapped: bool) -> Event:
    """A swap done: the event is the thawed model's, naming the frozen one, and whether the freeze and the thaw ran
    at once (engine/swap.py)."""
    how = "overlapped" if overlapped else "one after the other"
    return Event(
        EventKind.SWAP,
        into.name,
        into.unit,
        f"swapped {out.name} out and {into.name} in: {duration_usec / 1e6:.3f}s, {how}",
        duration_usec=duration_usec,
        fields={"GPUSCHED_SWAP_OUT": out.name, "GPUSCHED_OVERLAPPED": "1" if overlapped else "0"},
    )


def swap_rolled_back(model: Model, other: str, thawed_back: bool) -> Event:
    """A swap cut short by a restart, made "neither" on start: the model to freeze thawed back (`thawed_back`), or
    the model to thaw frozen again (an overlapped swap whose freeze was undone); `other` is the swap's other one."""
    if thawed_back:
        what, fields = f"swap of {model.name} for {other}", {"GPUSCHED_SWAP_IN": other}
    else:
        what, fields = f"swap of {other} for {model.name}", {"GPUSCHED_SWAP_OUT": other}
    done = "thawed back" if thawed_back else "frozen again"
    return Event(
        EventKind.FAILURE,
        model.name,
        model.unit,
        f"{what} was interrupted by a restart of gpuschedd: {model.name} {done}",
        fields={"GPUSCHED_RECOVERY": "1", "GPUSCHED_INTERRUPTED": "swap", **fields},
    )
