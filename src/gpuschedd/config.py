"""Daemon settings from /etc/gpusched/gpuschedd.conf and its drop-ins /etc/gpusched/gpuschedd.conf.d/*.conf
(systemd-style INI, section [Daemon])."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import validate
from .settings_file import (
    ConfigError,
    Table,
    apply,
    parse_boolean,
    parse_count,
    parse_int,
    parse_listen,
    parsed,
    read_section,
)

DEFAULT_PATH = "/etc/gpusched/gpuschedd.conf"


def parse_size(text: str) -> int:
    """validate.parse_size, a bad size being a ConfigError."""
    try:
        return validate.parse_size(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_percent_or_size(text: str, total: int) -> int:
    text = text.strip()
    if text.endswith("%"):
        return int(total * float(text[:-1]) / 100)
    return parse_size(text)


def parse_milliseconds(text: str) -> int:
    """Seconds (2.5) as milliseconds."""
    try:
        return int(float(text) * 1000)
    except ValueError:
        raise ValueError("expected seconds") from None


def one_of(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return parse


BUDGET_ACTIONS = ("page-out", "stop-oldest")


def parse_budget_action(text: str) -> str:
    """RamBudgetAction=: refuse, or page-out and/or stop-oldest, space-separated, in the order they are tried."""
    words = text.split()
    if words == ["refuse"]:
        return "refuse"
    if not words or len(set(words)) != len(words) or any(w not in BUDGET_ACTIONS for w in words):
        raise ValueError("expected refuse, or one or both of page-out and stop-oldest in the order to try them")
    return " ".join(words)


def parse_ports(text: str) -> frozenset[int]:
    """Space-separated ports and ranges (80 443 8000-8099)."""
    ports: set[int] = set()
    for item in text.split():
        low, _, high = item.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{item!r} is not a port or a range of ports") from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"{item!r} is not within 1-65535")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def parse_addresses(text: str) -> frozenset[str]:
    """Space-separated IP addresses, kept in their normal form (:: and 0:0::0 are one)."""
    return frozenset(str(ipaddress.ip_address(item)) for item in text.split())


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Config:
    # Host RAM that frozen models may hold in total (their snapshots live in their own RSS).
    ram_budget_bytes: int
    # cuCheckpointProcessLock timeout: a process that cannot be locked in time stays running.
    lock_timeout_ms: int = 10_000
    checkpoint_backend: str = "auto"  # auto, driver, cli, none
    cuda_checkpoint: str = "cuda-checkpoint"  # the binary the cli backend runs
    unit_backend: str = "auto"  # auto, systemd, cgroupfs
    cgroup_root: str = "/sys/fs/cgroup/gpusched"  # cgroupfs backend only
    metrics_listen: str = ""  # HOST:PORT for Prometheus' /metrics; empty: off
    metrics_textfile: str = ""  # a .prom file for node_exporter's textfile collector; empty: off
    # Policies (docs/configuration.md): freeze a running model whose processes used no GPU for this long (0: off);
    # on a thaw short of VRAM, freeze lower-priority (then least recently used) models first; on a freeze over the
    # RAM budget, page out the least recently used frozen model(s) and/or stop the oldest instead of refusing.
    idle_freeze_sec: int = 0
    evict_on_thaw: bool = False
    ram_budget_action: str = "refuse"  # refuse, or page-out and/or stop-oldest in the order tried
    # The fast path: how long a model's agent may take to park its memory before the driver path is taken, and
    # where the models' agent directories are (systemd creates each as the unit's RuntimeDirectory).
    agent_timeout_ms: int = 30_000
    agent_root: str = "/run/gpusched-agent"
    # The disk tier: where a page-out writes the agents' parked bytes (spill.py; empty: they go to swap as the rest)
    spill_directory: str = "/var/lib/gpuschedd/spill"
    # What a caller without `manage` may ask for (docs/security.md): a Priority up to this; a public port (Port=) from
    # unprivileged_port_start up, or one of wake_allow_ports; a ListenAddress on loopback, or one of
    # wake_allow_addresses. The daemon has PrivateNetwork=yes, so it cannot read the host's
    # net.ipv4.ip_unprivileged_port_start: UnprivilegedPortStart= says it.
    max_user_priority: int = 0
    unprivileged_port_start: int = 1024
    wake_allow_ports: frozenset[int] = frozenset()
    wake_allow_addresses: frozenset[str] = frozenset()
    # Per-user limits (root is exempt; 0: no limit): models in the table, running or ended, and the bytes of their
    # argv and Environment that gpuschedd and systemd keep for them. Every local user can call Run.
    max_models_per_user: int = 64
    max_command_bytes_per_user: int = 1 << 20
    # An ended (stopped, failed) model is dropped from the table this long after it ended (0: kept until Forget).
    ended_model_ttl_sec: int = 3600

    @classmethod
    def load(cls, path: str = DEFAULT_PATH) -> Config:
        """The main file, then its drop-ins; every setting absent keeps its default. A file that cannot be parsed,
        an unknown key or a bad value is a ConfigError naming the file(s) and the key."""
        section, where = read_section(path, "Daemon")
        cfg = cls(ram_budget_bytes=parsed(where, "RamBudget", parse_ram_budget, section.get("RamBudget", "50%")))
        apply(cfg, SETTINGS, section, where, "Daemon", also=("RamBudget",))
        return cfg


def parse_ram_budget(text: str) -> int:
    return parse_percent_or_size(text, host_ram_bytes())


# Every setting of [Daemon] but RamBudget (required, default 50% of the host's RAM): key -> (Config field, parser).
# A parser raises ValueError with what it expected; load() names the file and the key.
SETTINGS: Table = {
    "LockTimeoutSec": ("lock_timeout_ms", parse_milliseconds),
    "AgentTimeoutSec": ("agent_timeout_ms", parse_milliseconds),
    "CheckpointBackend": ("checkpoint_backend", one_of("auto", "driver", "cli", "none")),
    "UnitBackend": ("unit_backend", one_of("auto", "systemd", "cgroupfs")),
    "RamBudgetAction": ("ram_budget_action", parse_budget_action),
    "CudaCheckpoint": ("cuda_checkpoint", str),
    "CgroupRoot": ("cgroup_root", str),
    "SpillDirectory": ("spill_directory", str),
    "MetricsListen": ("metrics_listen", parse_listen),
    "MetricsTextfile": ("metrics_textfile", str),
    "IdleFreezeSec": ("idle_freeze_sec", parse_count),
    "EndedModelTTLSec": ("ended_model_ttl_sec", parse_count),
    "MaxModelsPerUser": ("max_models_per_user", parse_count),
    "MaxCommandBytesPerUser": ("max_command_bytes_per_user", validate.parse_size),
    "EvictOnThaw": ("evict_on_thaw", parse_boolean),
    "MaxUserPriority": ("max_user_priority", parse_int),
    "UnprivilegedPortStart": ("unprivileged_port_start", parse_int),
    "WakeAllowPorts": ("wake_allow_ports", parse_ports),
    "WakeAllowAddresses": ("wake_allow_addresses", parse_addresses),
}
