"""The options of Run, Adopt and AdoptProcesses, as plain data: the bus layer parses them, the engine reads them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Policies:
    """A model's policies (docs/configuration.md): options of Run, Adopt and AdoptProcesses alike."""

    priority: int = 0  # eviction order: a thaw may freeze models of lower (or equal, least recently used) priority
    idle_freeze_sec: int = -1  # freeze after this long without GPU use; -1: the daemon's IdleFreezeSec=, 0: never
    frozen_ttl_sec: int = 0  # stop the model once frozen this long; 0: never


@dataclass
class RunOptions(Policies):
    description: str = ""
    working_directory: str = ""
    environment: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    user: str = ""  # run as this user instead of the owner (the bus layer allows it only with `manage`)
    # Wake on first connection: the public TCP port (systemd's socket unit) and the model's own port on 127.0.0.1.
    port: int = 0
    backend_port: int = 0
    listen_address: str = ""  # empty: every address
    # Bytes the model needs free on each GPU it will use (its gpus, else every GPU), made room for before it starts
    # (evicting with EvictOnThaw=yes); 0: not checked.
    gpu_memory: int = 0
    agent: bool = False  # the model enables gpuschedd.agent: freezes park its memory through it (fast path)
    keep_context: bool = False  # with agent: a freeze whose agents all parked leaves the CUDA contexts on the GPU
