"""Daemon settings from /etc/gpusched/gpuschedd.conf and its drop-ins /etc/gpusched/gpuschedd.conf.d/*.conf
(systemd-style INI, section [Daemon])."""

from __future__ import annotations

import configparser
import glob
import ipaddress
import os
from dataclasses import dataclass

from . import validate

DEFAULT_PATH = "/etc/gpusched/gpuschedd.conf"


class ConfigError(ValueError):
    pass


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


def parse_boolean(text: str, what: str) -> bool:
    """systemd's booleans: yes/no, true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1", "y", "t"):
        return True
    if value in ("no", "false", "off", "0", "n", "f"):
        return False
    raise ConfigError(f"{what}={text}: expected yes or no")


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
    # RAM budget, stop the oldest frozen model(s) instead of refusing.
    idle_freeze_sec: int = 0
    evict_on_thaw: bool = False
    ram_budget_action: str = "refuse"  # refuse, stop-oldest
    # The fast path: how long a model's agent may take to park its memory before the driver path is taken, and
    # where the models' agent directories are (systemd creates each as the unit's RuntimeDirectory).
    agent_timeout_ms: int = 30_000
    agent_root: str = "/run/gpusched-agent"
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
        # strict=False: a key or section given twice is no error, the last one wins (systemd's rule), also across
        # the drop-ins, read after the main file in lexical order of their names.
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"), strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        dropins = sorted(glob.glob(os.path.join(glob.escape(path + ".d"), "*.conf")))
        for name in [path, *dropins]:
            try:
                with open(name) as f:
                    parser.read_file(f)
            except FileNotFoundError:
                pass
            except configparser.Error as e:
                raise ConfigError(f"{name}: {e.message}") from None
        if dropins:
            path = f"{path} (and {', '.join(dropins)})"  # the errors below name every file a setting may come from
        section = parser["Daemon"] if parser.has_section("Daemon") else {}
        known = {
            "RamBudget",
            "LockTimeoutSec",
            "CheckpointBackend",
            "CudaCheckpoint",
            "UnitBackend",
            "CgroupRoot",
            "MetricsListen",
            "MetricsTextfile",
            "IdleFreezeSec",
            "EvictOnThaw",
            "RamBudgetAction",
            "AgentTimeoutSec",
            "MaxUserPriority",
            "UnprivilegedPortStart",
            "WakeAllowPorts",
            "WakeAllowAddresses",
            "MaxModelsPerUser",
            "MaxCommandBytesPerUser",
            "EndedModelTTLSec",
        }
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) in [Daemon]: {', '.join(sorted(unknown))}")
        cfg = cls(ram_budget_bytes=parse_percent_or_size(section.get("RamBudget", "50%"), host_ram_bytes()))
        for key, attr in (("LockTimeoutSec", "lock_timeout_ms"), ("AgentTimeoutSec", "agent_timeout_ms")):
            if key in section:
                try:
                    setattr(cfg, attr, int(float(section[key]) * 1000))
                except ValueError:
                    raise ConfigError(f"{path}: {key}={section[key]}: expected seconds") from None
        choices = {
            "CheckpointBackend": ("auto", "driver", "cli", "none"),
            "UnitBackend": ("auto", "systemd", "cgroupfs"),
            "RamBudgetAction": ("refuse", "stop-oldest"),
        }
        for key, allowed in choices.items():
            value = section.get(key, "refuse" if key == "RamBudgetAction" else "auto")
            if value not in allowed:
                raise ConfigError(f"{path}: {key}={value}: expected one of {', '.join(allowed)}")
        cfg.checkpoint_backend = section.get("CheckpointBackend", "auto")
        cfg.unit_backend = section.get("UnitBackend", "auto")
        cfg.cuda_checkpoint = section.get("CudaCheckpoint", cfg.cuda_checkpoint)
        cfg.cgroup_root = section.get("CgroupRoot", cfg.cgroup_root)
        cfg.metrics_listen = section.get("MetricsListen", "")
        if cfg.metrics_listen and not cfg.metrics_listen.rpartition(":")[2].isdigit():
            raise ConfigError(f"{path}: MetricsListen={cfg.metrics_listen}: expected HOST:PORT")
        cfg.metrics_textfile = section.get("MetricsTextfile", "")
        cfg.ram_budget_action = section.get("RamBudgetAction", "refuse")
        for key, attr in (
            ("IdleFreezeSec", "idle_freeze_sec"),
            ("EndedModelTTLSec", "ended_model_ttl_sec"),
            ("MaxModelsPerUser", "max_models_per_user"),
        ):
            value = section.get(key, str(getattr(cfg, attr))).strip()
            if not value.isdigit():
                raise ConfigError(f"{path}: {key}={value}: expected a whole number (0: off)")
            setattr(cfg, attr, int(value))
        if "MaxCommandBytesPerUser" in section:
            try:
                cfg.max_command_bytes_per_user = parse_size(section["MaxCommandBytesPerUser"])
            except ConfigError as e:
                raise ConfigError(f"{path}: MaxCommandBytesPerUser: {e}") from None
        cfg.evict_on_thaw = parse_boolean(section.get("EvictOnThaw", "no"), f"{path}: EvictOnThaw")
        for key, attr in (
            ("MaxUserPriority", "max_user_priority"),
            ("UnprivilegedPortStart", "unprivileged_port_start"),
        ):
            if key in section:
                try:
                    setattr(cfg, attr, int(section[key]))
                except ValueError:
                    raise ConfigError(f"{path}: {key}={section[key]}: expected a whole number") from None
        cfg.wake_allow_ports = parse_ports(section.get("WakeAllowPorts", ""), f"{path}: WakeAllowPorts")
        cfg.wake_allow_addresses = parse_addresses(section.get("WakeAllowAddresses", ""), f"{path}: WakeAllowAddresses")
        return cfg


def parse_ports(text: str, what: str) -> frozenset[int]:
    """Space-separated ports and ranges (80 443 8000-8099)."""
    ports: set[int] = set()
    for item in text.split():
        low, _, high = item.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"{what}={text}: {item!r} is not a port or a range of ports") from None
        if not 1 <= first <= last <= 65535:
            raise ConfigError(f"{what}={text}: {item!r} is not within 1-65535")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def parse_addresses(text: str, what: str) -> frozenset[str]:
    """Space-separated IP addresses, kept in their normal form (:: and 0:0::0 are one)."""
    try:
        return frozenset(str(ipaddress.ip_address(item)) for item in text.split())
    except ValueError as e:
        raise ConfigError(f"{what}={text}: {e}") from None
