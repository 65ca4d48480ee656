"""The model record and its states. Plain data: the engine owns the transitions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    RUNNING = "running"
    FREEZING = "freezing"
    FROZEN = "frozen"
    THAWING = "thawing"
    STOPPED = "stopped"
    FAILED = "failed"


ENDED = (State.STOPPED, State.FAILED)


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
    keep_context: bool = False
    freeze_path: str = ""
    parked_bytes: int = 0
    # Wake on first connection (Run options): the public port of gpusched-wake@NAME.socket (0: none), the model's own
    # port on 127.0.0.1, and the public port's address (empty: every address).
    port: int = 0
    backend_port: int = 0
    listen_address: str = ""
    # Serializes every transition of this model; never held across two models at once.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)
