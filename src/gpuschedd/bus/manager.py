"""org.gpusched1.Manager at /org/gpusched1: Run, Adopt, Freeze, Thaw and the rest, and the options of Run and
Adopt parsed from their declarations (options.py)."""

# No `from __future__ import annotations`: dbus-fast reads D-Bus signatures from the live annotations.
import ipaddress
from typing import Any, TypeVar

from dbus_fast import Variant
from dbus_fast.annotations import DBusDict, DBusObjectPath, DBusStr
from dbus_fast.service import method, signal

from .. import __version__, adopt, hostmem, validate
from ..engine import Engine
from ..errors import InvalidArgs
from ..model import ENDED, Model
from ..names import MANAGER_IFACE, is_model_name, model_path, validate_model_name
from ..options import Policies, RunOptions, check_wake_ports, declared
from . import polkit
from .service import (
    ADOPT,
    CONTROL,
    MANAGE,
    READ,
    RUN,
    Announcing,
    Authorizing,
    Exported,
    ModelRows,
    NameAndPath,
    PidList,
    StrList,
    caller_uid,
    exporting,
    exposed,
)

Options = TypeVar("Options", bound=Policies)


def shown(text: str, limit: int = 64) -> str:
    """A caller's string, safe to echo back in an error message: short, quoted, escaped."""
    return repr(validate.shown(text, limit))


def parse_options(options: dict[str, Variant], cls: type[Options] = RunOptions) -> Options:  # type: ignore[assignment]
    """The options of Run (RunOptions: every key) or of Adopt/AdoptProcesses (Policies), from their declarations:
    an unknown key, a wrong type or a bad value is InvalidArgs, before anything changes."""
    specs = {spec.key: (f.name, spec) for f, spec in declared(cls)}
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in specs:
            raise InvalidArgs(f"unknown option {shown(key, 24)}; known: {', '.join(specs)}")
        name, spec = specs[key]
        if value.signature not in spec.signatures:
            raise InvalidArgs(f"option {key} must have type {' or '.join(spec.signatures)}, not {value.signature}")
        try:
            values[name] = spec.check(value.value)
        except ValueError as e:  # the option's own check (validate's InvalidArgs name their field already)
            raise InvalidArgs(f"option {key}: {e}") from None
    parsed = cls(**values)
    if isinstance(parsed, RunOptions):
        check_wake_ports(parsed)
    return parsed


def _check_run(argv: list[str], options: dict[str, Variant]) -> None:
    """Run's arguments on their own: argv, the options, and what they would keep in all (validate.command_bytes)."""
    validate.command_bytes(validate.argv(argv), parse_options(options).environment)


def _gpus(iface: "ManagerInterface") -> list[dict[str, Variant]]:
    return [
        {
            "uuid": Variant("s", gpu.uuid),
            "index": Variant("u", gpu.index),
            "name": Variant("s", gpu.name),
            "total": Variant("t", gpu.total_bytes),
            "used": Variant("t", gpu.used_bytes),
            "free": Variant("t", gpu.free_bytes),
        }
        for gpu in iface.engine.telemetry.gpus()
    ]


# The Manager's properties (docs/dbus-api.md; dbus/org.gpusched1.xml says what each means). `emits`: sent in
# PropertiesChanged when a model's change changed it (ManagerInterface.changed); `const`: fixed while the daemon runs
# (its configuration is read once); TransparentHugepages is the kernel's, which an admin may change at any time.
MANAGER_PROPERTIES = (
    Exported("Version", "s", lambda iface: __version__, const=True),
    Exported("CheckpointBackend", "s", lambda iface: iface.engine.checkpoint.name, const=True),
    Exported("UnitBackend", "s", lambda iface: iface.engine.units.name, const=True),
    Exported("RamBudgetBytes", "t", lambda iface: iface.engine.config.ram_budget_bytes, const=True),
    Exported("RamFrozenBytes", "t", lambda iface: iface.engine.ram_frozen_bytes(), emits=True),
    Exported("Gpus", "aa{sv}", _gpus, emits=True),
    Exported("TransparentHugepages", "s", lambda iface: hostmem.thp_mode()),
    Exported("SwapTotalBytes", "t", lambda iface: hostmem.swap_bytes()[0]),
    Exported("SwapFreeBytes", "t", lambda iface: hostmem.swap_bytes()[1]),
    Exported("Zswap", "b", lambda iface: hostmem.zswap_enabled()),
)


@exporting(MANAGER_PROPERTIES)
class ManagerInterface(Authorizing, Announcing):
    """/org/gpusched1: the model table's methods (handlers: read the arguments, polkit, the engine, reply)."""

    def __init__(self, engine: Engine, authority: polkit.Authority) -> None:
        self.engine = engine
        self.authority = authority
        # changed(), after a model's change: those of RamFrozenBytes and Gpus that moved (a freeze changes the frozen
        # RAM and the GPUs' used and free memory; a Pids refresh may not)
        super().__init__(MANAGER_IFACE, sent_now=False)

    def _model_for(self, args: tuple[Any, ...]) -> Model | None:
        name = validate_model_name(args[0]) if args else ""
        return self.engine.get(name)

    def _name_in(self, args: tuple[Any, ...]) -> str:
        name = args[0] if args else None
        return name if isinstance(name, str) and is_model_name(name) else ""

    # ------------------------------------------------------------- methods

    @method()
    @exposed(RUN, precheck=lambda name, argv, options: _check_run(argv, options))
    async def Run(self, name: DBusStr, argv: StrList, options: DBusDict) -> DBusObjectPath:
        validate_model_name(name)
        run_options = parse_options(options)
        if run_options.user:
            # Running as somebody else is a root-only choice.
            await self._authorize(MANAGE, "run", (name,), {"user": run_options.user})
        await self._check_priority("run", name, run_options)
        await self._check_wake(name, run_options)
        await self._replace_ended(name, "run")
        by = await self._requester()
        model = await self.engine.run(name, validate.argv(argv), run_options, caller_uid.get(), by)
        return model_path(model.name)

    async def _check_wake(self, name: str, options: RunOptions) -> None:
        """The public port is opened by PID 1: a port below UnprivilegedPortStart= (unless in WakeAllowPorts=) and
        an address off loopback (unless in WakeAllowAddresses=) need `manage`. A caller other than root that names
        no address gets loopback."""
        if not options.port:
            return
        config = self.engine.config
        if options.port < config.unprivileged_port_start and options.port not in config.wake_allow_ports:
            await self._authorize(MANAGE, "run", (name,), {"port": str(options.port)})
        if not options.listen_address and caller_uid.get() != 0:
            options.listen_address = "127.0.0.1"
        address = ipaddress.ip_address(options.listen_address.strip("[]")) if options.listen_address else None
        if (address is None or not address.is_loopback) and str(address) not in config.wake_allow_addresses:
            await self._authorize(MANAGE, "run", (name,), {"listen_address": str(address or "")})

    @method()
    @exposed(ADOPT)
    async def Adopt(self, name: DBusStr, unit: DBusStr, options: DBusDict) -> DBusObjectPath:
        policies = parse_options(options, Policies)
        await self._check_priority("adopt", name, policies)
        uid = caller_uid.get()
        _status, owner = await self.engine.adoptable_unit(name, unit)
        others = owner != uid and uid != 0
        if others:
            # Someone else's unit: a root-only choice.
            await self._authorize(MANAGE, "adopt", (name, unit), {"unit": unit, "owner": str(owner)})
        await self._replace_ended(name, "adopt")
        model = await self.engine.adopt(name, unit, uid, others, policies)
        return model_path(model.name)

    @method()
    @exposed(ADOPT)
    async def AdoptProcesses(self, name: DBusStr, pids: PidList, options: DBusDict) -> DBusObjectPath:
        policies = parse_options(options, Policies)
        await self._check_priority("adopt", name, policies)
        uid = caller_uid.get()
        with adopt.Pins(list(pids)) as pins:  # held across the polkit wait: a PID reused meanwhile is not moved
            owners = self.engine.adoptable_pids(name, list(pids))
            pins.verify()
            foreign = sorted({owner for owner in owners.values() if owner != uid})
            others = bool(foreign) and uid != 0
            if others:
                # Someone else's processes: a root-only choice.
                await self._authorize(MANAGE, "adopt", (name,), {"unit": "", "owner": ",".join(map(str, foreign))})
            await self._replace_ended(name, "adopt")
            model = await self.engine.adopt_processes(name, list(pids), uid, others, policies, pins)
        return model_path(model.name)

    async def _replace_ended(self, name: str, verb: str) -> None:
        """A new model of a name (Run, Adopt, AdoptProcesses: `verb`) replaces its ended model: forgetting someone
        else's model needs control-any."""
        ended = self.engine.models.get(name)
        if ended is not None and ended.state in ENDED and ended.owner != caller_uid.get():
            await self._authorize(CONTROL, verb, (name,))

    @method()
    @exposed(CONTROL)
    async def Start(self, name: DBusStr) -> DBusObjectPath:
        model = await self.engine.start_catalog(name, await self._requester(self.engine.get(name)))
        return model_path(model.name)

    @method()
    @exposed(MANAGE)
    async def Reload(self) -> None:
        await self.engine.reload_catalog()

    @method()
    @exposed(CONTROL)
    async def Freeze(self, name: DBusStr) -> None:
        await self.engine.freeze(name, by=await self._requester(self.engine.get(name)))

    @method()
    @exposed(CONTROL)
    async def Thaw(self, name: DBusStr) -> None:
        await self.engine.thaw(name, await self._requester(self.engine.get(name)))

    @method()
    @exposed(CONTROL)
    async def PageOut(self, name: DBusStr) -> None:
        await self.engine.page_out(name)

    @method()
    @exposed(CONTROL)
    async def FreezeToDisk(self, name: DBusStr) -> None:
        await self.engine.freeze_to_disk(name, await self._requester(self.engine.get(name)))

    @method()
    @exposed(CONTROL)
    async def Swap(self, freeze_name: DBusStr, thaw_name: DBusStr) -> None:
        # Both models are acted on: the caller needs the right to control each.
        out = self.engine.get(freeze_name)  # authorized by exposed(), no await since
        await self._authorize(CONTROL, "swap", (validate_model_name(thaw_name),))
        by = await self._requester(self.engine.get(thaw_name))
        self._still_there(out)
        await self.engine.swap(freeze_name, thaw_name, by)

    @method()
    @exposed(CONTROL)
    async def Stop(self, name: DBusStr) -> None:
        await self.engine.stop(name)

    @method()
    @exposed(CONTROL)
    async def Forget(self, name: DBusStr) -> None:
        await self.engine.forget(name)

    @method()
    @exposed(CONTROL)
    async def Migrate(self, name: DBusStr, gpu: DBusStr) -> None:
        await self.engine.migrate(name, validate.gpus([gpu])[0])

    @method()
    @exposed(READ)
    async def ListModels(self) -> ModelRows:
        # From the table as events (unit state changes) and the periodic refresh (PIDs, VRAM) keep it: no systemd
        # call per model per call, so the answer is one pass over memory however many models there are.
        return [
            [m.name, str(m.state), m.unit, m.owner, m.main_pid, m.vram_bytes, m.snapshot_bytes]
            for m in list(self.engine.models.values())
        ]

    @method()
    @exposed(READ)
    async def GetModel(self, name: DBusStr) -> DBusObjectPath:
        return model_path(self.engine.get(validate_model_name(name)).name)

    # ------------------------------------------------------------- signals

    @signal()
    def ModelNew(self, name: DBusStr, path: DBusObjectPath) -> NameAndPath:
        return [name, path]

    @signal()
    def ModelRemoved(self, name: DBusStr, path: DBusObjectPath) -> NameAndPath:
        return [name, path]
