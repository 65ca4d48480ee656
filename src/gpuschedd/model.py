"""The model record and its state machine: the allowed edges (TRANSITIONS), the one function that moves a model
along them (transition), and the guard of each verb (require). The engine decides when; this decides what may
follow what."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import InvalidState


class State(StrEnum):
    RUNNING = "running"
    FREEZING = "freezing"
    FROZEN = "frozen"
    THAWING = "thawing"
    STOPPED = "stopped"
    FAILED = "failed"


ENDED = (State.STOPPED, State.FAILED)

# Every edge a model may take. Any live state may end (stopped: a Stop, or a clean exit; failed: a crash), also in
# the middle of a step; a failed freeze rolls back to running, a failed thaw to frozen (recovery.py's rules settle
# either way). An ended model never moves again: a new Run of its name is a new model.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.RUNNING: frozenset({State.FREEZING, *ENDED}),
    State.FREEZING: frozenset({State.FROZEN, State.RUNNING, *ENDED}),
    State.FROZEN: frozenset({State.THAWING, *ENDED}),
    State.THAWING: frozenset({State.RUNNING, State.FROZEN, *ENDED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

# The guard of each verb a caller can ask for: the states it accepts, and what its refusal says after
# "model 'NAME' is STATE". Freeze of a frozen model and thaw of a running one return before the guard (nothing to do).
REQUIRES: dict[str, tuple[frozenset[State], str]] = {
    "freeze": (frozenset({State.RUNNING}), ", not running"),
    "thaw": (frozenset({State.FROZEN}), ", not frozen"),
    "page out": (frozenset({State.FROZEN}), ", not frozen: only a frozen model's snapshot can be paged out"),
    "migrate": (frozenset({State.RUNNING, State.FROZEN}), ", not running or frozen"),
    "forget": (frozenset({State.RUNNING, *ENDED}), ": thaw it before forgetting it"),
    "swap out": (frozenset({State.RUNNING, State.FROZEN}), ", not running"),
    "swap in": (frozenset({State.RUNNING, State.FROZEN}), ", not frozen"),
}


class IllegalTransition(RuntimeError):
    """An edge not in TRANSITIONS: a bug in the engine, never a caller's doing."""


def require(model: Model, verb: str) -> None:
    """Refuse `verb` (InvalidState, nothing changed) unless the model is in a state REQUIRES allows for it."""
    allowed, refusal = REQUIRES[verb]
    if model.state not in allowed:
        raise InvalidState(f"model {model.name!r} is {model.state}{refusal}")


def transition(model: Model, state: State) -> None:
    """Move a model along one edge of TRANSITIONS, stamping when."""
    if state not in TRANSITIONS[model.state]:
        raise IllegalTransition(f"model {model.name}: {model.state} -> {state} is not a transition")
    model.state = state
    model.state_change_usec = now_usec()


def now_usec() -> int:
    """Wall-clock microseconds, the unit systemd uses for its *Timestamp properties."""
    return time.time_ns() // 1000


@dataclass
class Model:
    name: str
    unit: str
    owner: int
    command: list[str]
    # Bytes of the Environment entries it was started with (kept by systemd in its unit; counted against the owner's
    # MaxCommandBytesPerUser= with the command).
    environment_bytes: int = 0
    state: State = State.RUNNING
    main_pid: int = 0
    pids: list[int] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    vram_bytes: int = 0
    snapshot_bytes: int = 0
    # GPU UUID → bytes this model held there, as NVML last saw it running: what a thaw needs free.
    vram_by_gpu: dict[str, int] = field(default_factory=dict)
    cuda_pids: list[int] = field(default_factory=list)
    last_freeze_usec: int = 0
    last_thaw_usec: int = 0
    state_change_usec: int = field(default_factory=now_usec)
    # Policies (Run options): eviction order, idle auto-freeze (-1: the daemon's IdleFreezeSec=, 0: never), time to
    # live frozen (0: forever); and when the model last ran work on a GPU (or started, or thawed), wall clock.
    priority: int = 0
    idle_freeze_sec: int = -1
    frozen_ttl_sec: int = 0
    last_active_usec: int = field(default_factory=now_usec)
    # The fast path (Run option Agent): the model's processes run gpuschedd.agent; how the last freeze went
    # ("agent": their agents parked `parked_bytes`, the driver took the rest; "driver": all by the driver;
    # "agent-only": the agents parked, and with KeepContext the CUDA contexts stayed on the GPU, no driver call).
    agent: bool = False
    inject_agent: bool = False  # Run option InjectAgent: the agent is the daemon's interposer, preloaded
    keep_context: bool = False
    freeze_path: str = ""
    parked_bytes: int = 0
    # The disk tier (docs/disk-tier.md): how much of the frozen model's processes was in swap when last paged out
    # (VmSwap); and how much of what its agents parked the daemon wrote to spill files (spill.py). The snapshot's
    # part of both is on disk, the rest of the snapshot in RAM.
    swapped_bytes: int = 0
    spilled_bytes: int = 0
    # Wake on first connection (Run options): the public port of gpusched-wake@NAME.socket (0: none), the model's own
    # port on 127.0.0.1, and the public port's address (empty: every address).
    port: int = 0
    backend_port: int = 0
    listen_address: str = ""
    # The model catalog (catalog.py): the fingerprint of the file's definition it was listed or started from (""
    # for a model run, adopted or found otherwise), and the other names the front door routes to it.
    catalog_digest: str = ""
    aliases: list[str] = field(default_factory=list)
    # Serializes every transition of this model; never held across two models at once.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    def clear_runtime(self) -> None:
        """Its processes are gone (stopped, exited): nothing of them is left to count, on a GPU or in host RAM."""
        self.pids, self.main_pid, self.cuda_pids = [], 0, []
        self.snapshot_bytes = self.vram_bytes = self.parked_bytes = self.swapped_bytes = self.spilled_bytes = 0

    def snapshot_in_files(self) -> int:
        """Bytes of the snapshot in spill files (none without a snapshot: a thawed model's figure is stale)."""
        return min(self.spilled_bytes, self.snapshot_bytes) if self.cuda_pids else 0

    def snapshot_in_swap(self) -> int:
        """Bytes of the snapshot paged out to swap."""
        return min(self.swapped_bytes, self.snapshot_bytes - self.snapshot_in_files()) if self.cuda_pids else 0

    def snapshot_on_disk(self) -> int:
        """Bytes of the snapshot on disk: in swap or in spill files."""
        return self.snapshot_in_files() + self.snapshot_in_swap()

    def snapshot_in_ram(self) -> int:
        """Bytes of the snapshot in host RAM: what the RAM budget counts."""
        return self.snapshot_bytes - self.snapshot_on_disk() if self.cuda_pids else 0
