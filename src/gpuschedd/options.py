"""The options of Run, Adopt and AdoptProcesses: one declaration each.

Each option is one field of Policies or RunOptions, and the field's metadata (`Option`) says everything the rest of
the code needs: its D-Bus key and signature in Run's a{sv}, the check of a caller's value, the CLI flag and its help.
The field name is the SDK's keyword and the CLI's argparse dest. From these declarations follow the bus layer's
parsing (bus/manager.py), the SDK's keywords (client.py), the CLI's run and adopt flags (cli.py), and
docs/dbus-api.md's table (tests/unit/test_api_declarations.py checks it). The engine reads the dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import validate

# Policy durations (IdleFreezeSec, FrozenTTLSec) up to a year: beyond that a typo, not a policy.
MAX_POLICY_SEC = 366 * 24 * 3600


def _policy_seconds(value: int) -> int:
    if value > MAX_POLICY_SEC:
        raise ValueError(f"{value} seconds is more than {MAX_POLICY_SEC}")
    return int(value)


def _ip_address(address: str) -> str:
    """An IP address, IPv6 in brackets as systemd's ListenStream= wants it; empty: every address."""
    if not address:
        return ""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"must be an IP address, not {validate.shown(address, 64)!r}") from None
    return f"[{address}]" if ":" in address else address


@dataclass(frozen=True)
class Option:
    """How one option travels. `signatures`: the D-Bus types accepted (the first is what the SDK sends); `check`:
    a caller's value to the field's (raises InvalidArgs, or ValueError that the bus layer names the option in);
    `flags`: the CLI's (none: the CLI does not offer it); `cli`: how the CLI reads it (`int`, `str`, `flag`,
    `list`: comma-separated, `append`: repeatable, `size`: 8G, 512M). Those of Policies are also
    Adopt's and AdoptProcesses'."""

    key: str
    signatures: tuple[str, ...]
    check: Callable[[Any], Any]
    flags: tuple[str, ...] = ()
    cli: str = "str"
    help: str = ""


def option(key: str, signatures: str, default: Any, check: Callable[[Any], Any], **how: Any) -> Any:
    """A dataclass field declaring option `key` (`signatures`: "t|u" for either; `default`: `list` for [])."""
    spec = Option(key, tuple(signatures.split("|")), check, **how)
    if default is list:  # a fresh list for each instance
        return dataclasses.field(default_factory=list, metadata={"option": spec})
    return dataclasses.field(default=default, metadata={"option": spec})


@dataclass
class Policies:
    """A model's policies (docs/configuration.md): options of Run, Adopt and AdoptProcesses alike."""

    # eviction order: a thaw may freeze models of lower (or equal, least recently used) priority
    priority: int = option(
        "Priority",
        "i",
        0,
        int,
        flags=("--priority",),
        cli="int",
        help="eviction priority (higher is evicted later)",
    )
    # freeze after this long without GPU use; -1 (absent): the daemon's IdleFreezeSec=, 0: never
    idle_freeze_sec: int = option(
        "IdleFreezeSec",
        "t|u",
        -1,
        _policy_seconds,
        flags=("--idle-freeze-sec",),
        cli="int",
        help="freeze after this long without GPU use (0: never)",
    )
    # stop the model once frozen this long; 0: never
    frozen_ttl_sec: int = option(
        "FrozenTTLSec",
        "t|u",
        0,
        _policy_seconds,
        flags=("--frozen-ttl-sec",),
        cli="int",
        help="stop after this long frozen (0: never)",
    )


@dataclass
class RunOptions(Policies):
    """Run's options: the policies, and what starting a unit needs (Adopt and AdoptProcesses take no others)."""

    description: str = option("Description", "s", "", validate.description, flags=("--description",))
    working_directory: str = option(
        "WorkingDirectory",
        "s",
        "",
        validate.working_directory,
        flags=("--workdir",),
        help="working directory (default: the current one, so relative paths in the command work)",
    )
    environment: list[str] = option(  # noqa: RUF009 (option() is a dataclasses.field)
        "Environment",
        "as",
        list,
        validate.environment,
        flags=("-E", "--setenv"),
        cli="append",
        help="NAME=VALUE, repeatable",
    )
    gpus: list[str] = option(  # noqa: RUF009 (option() is a dataclasses.field)
        "Gpus",
        "as",
        list,
        validate.gpus,
        flags=("--gpus",),
        cli="list",
        help="comma-separated GPU indices or UUIDs (CUDA_VISIBLE_DEVICES)",
    )
    # run as this user instead of the owner (the bus layer allows it only with `manage`)
    user: str = option(
        "User", "s", "", validate.user, flags=("--user",), help="run as this user (needs the manage privilege)"
    )
    # Wake on first connection: the public TCP port (systemd's socket unit) and the model's own port on 127.0.0.1.
    port: int = option(
        "Port", "q", 0, int, flags=("--port",), cli="int", help="wake on first connection: the public TCP port"
    )
    backend_port: int = option(
        "BackendPort",
        "q",
        0,
        int,
        flags=("--backend-port",),
        cli="int",
        help="the port the model serves on, on 127.0.0.1",
    )
    listen_address: str = option(
        "ListenAddress",
        "s",
        "",
        _ip_address,
        flags=("--listen-address",),
        help="the public port's address (default: every address)",
    )
    # Bytes the model needs free on each GPU it will use (its gpus, else every GPU), made room for before it starts
    # (evicting with EvictOnThaw=yes); 0: not checked.
    gpu_memory: int = option(
        "GpuMemory",
        "t",
        0,
        int,
        flags=("--gpu-memory",),
        cli="size",
        help="GPU memory the model needs free on each of its GPUs before it starts (e.g. 8G)",
    )
    # the model enables gpuschedd.agent: freezes park its memory through it (fast path)
    agent: bool = option(
        "Agent",
        "b",
        False,
        bool,
        flags=("--agent",),
        cli="flag",
        help="the model enables gpuschedd.agent: the fast path",
    )
    # with agent: a freeze whose agents all parked leaves the CUDA contexts on the GPU
    keep_context: bool = option(
        "KeepContext",
        "b",
        False,
        bool,
        flags=("--keep-context",),
        cli="flag",
        help="with --agent: a freeze leaves the CUDA contexts on the GPU (faster; some VRAM stays held)",
    )
    # the daemon preloads its interposer (native/preload) into an unmodified program: an agent model without its help
    inject_agent: bool = option(
        "InjectAgent",
        "b",
        False,
        bool,
        flags=("--inject-agent",),
        cli="flag",
        help="the fast path for a program that does not import gpuschedd.agent: the daemon preloads its interposer",
    )


def declared(cls: type[Policies] = RunOptions) -> list[tuple[dataclasses.Field[Any], Option]]:
    """The options a dataclass declares, in order, with their fields."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def default_of(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def check_wake_ports(options: RunOptions) -> None:
    """Port, BackendPort, ListenAddress: wake on first connection (gpuschedd.wake) needs both ports, unequal. Of Run's
    options (bus/manager.py) and of a catalog file's (catalog.py) alike."""
    if not options.port and (options.backend_port or options.listen_address):
        raise validate.InvalidArgs("BackendPort and ListenAddress need Port")
    if options.port and not options.backend_port:
        raise validate.InvalidArgs("Port needs BackendPort: the port the model itself listens on, on 127.0.0.1")
    if options.port and options.port == options.backend_port:
        raise validate.InvalidArgs("Port and BackendPort must differ: both are on this host")


def to_dbus(kwargs: dict[str, Any], cls: type[Policies] = RunOptions) -> dict[str, tuple[str, Any]]:
    """SDK keywords (the field names) to Run's options as (signature, value) by key. An option left at its default
    (or None) is not sent, so the daemon's default applies. An unknown keyword is a TypeError, as Python's own."""
    fields = {f.name: (f, spec) for f, spec in declared(cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"unknown option keyword(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    sent = {}
    for name, value in kwargs.items():
        f, spec = fields[name]
        if value is not None and value != default_of(f):
            sent[spec.key] = (spec.signatures[0], value)
    return sent
