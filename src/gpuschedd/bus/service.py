"""org.gpusched1 on the system bus: the Manager object and one object per model.

Every method goes through `exposed()`, which authorizes the caller and maps every failure to a typed D-Bus
error. Its default is the strictest action (`manage`), so a method added without thinking about access fails
closed. Reading (properties, ListModels, introspection) is open to everyone.
"""

# No `from __future__ import annotations`: dbus-fast reads D-Bus signatures from the live annotations.
import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDict,
    DBusInt32,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusUInt64,
)
from dbus_fast.errors import DBusError
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from .. import __version__, adopt, hostmem, validate
from ..engine import Engine, Requester
from ..errors import GpuschedError, InvalidArgs, NoSuchModel, Refused
from ..events import EngineListener
from ..model import ENDED, Model
from ..names import MANAGER_IFACE, MODEL_IFACE, is_model_name, model_path, model_unit, validate_model_name
from ..options import Policies, RunOptions
from . import polkit
from .connection import current_message

log = logging.getLogger(__name__)

READ = "read"
RUN = "run"
CONTROL = "control"  # becomes control or control-any depending on who owns the model
ADOPT = "adopt"
MANAGE = "manage"

_ACTIONS = {RUN: polkit.ACTION_RUN, ADOPT: polkit.ACTION_ADOPT, MANAGE: polkit.ACTION_MANAGE}

# An error's journal entry names the caller's uid if the bus says it within this time (else its bus name only).
REPORT_UID_TIMEOUT_S = 1.0

caller_uid: contextvars.ContextVar[int] = contextvars.ContextVar("caller_uid", default=-1)

Handler = Callable[..., Awaitable[Any]]

# D-Bus signatures as type hints (dbus-fast reads them).
StrList = Annotated[list[str], DBusSignature("as")]
PidList = Annotated[list[int], DBusSignature("au")]
ModelRows = Annotated[list[list[Any]], DBusSignature("a(sssuutt)")]
GpuList = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
NameAndPath = Annotated[list[str], DBusSignature("so")]


def exposed(access: str = MANAGE, precheck: Callable[..., object] | None = None) -> Callable[[Handler], Handler]:
    """Authorize, run, and turn any failure into a typed D-Bus error (never a traceback). `precheck`: checks of the
    arguments alone (sizes, syntax), made before polkit is asked, so a call that could never pass is not held (with
    its megabyte of argv) while polkitd thinks."""

    def decorate(fn: Handler) -> Handler:
        verb = fn.__name__.lower()

        @functools.wraps(fn)
        async def wrapper(self: Any, *args: Any) -> Any:
            try:
                if precheck is not None:
                    precheck(*args)
                if access != READ:
                    await self._authorize(access, verb, args)
                return await fn(self, *args)
            except GpuschedError as e:
                if access != READ:
                    await self._report(fn.__name__, args, e)
                raise DBusError(e.dbus_name, e.message) from None
            except DBusError:
                raise
            except Exception:
                log.exception("%s failed", fn.__name__)
                internal = GpuschedError("internal error; see the journal of gpuschedd")
                await self._report(fn.__name__, args, internal)
                raise DBusError(internal.dbus_name, internal.message) from None

        return wrapper

    return decorate


class _Authorizing:
    """Shared by both interfaces: resolve the action for a call and ask polkit."""

    engine: Engine
    authority: polkit.Authority

    def _model_for(self, args: tuple[Any, ...]) -> Model | None:
        raise NotImplementedError

    def _name_in(self, args: tuple[Any, ...]) -> str:
        """The model a call names, if it names a valid one (for the journal); "" otherwise."""
        raise NotImplementedError

    async def _report(self, method: str, args: tuple[Any, ...], error: GpuschedError) -> None:
        """An error answered to a caller of a method that changes things becomes a journal event (refusal or
        failure) naming the method, the model and the caller, so an admin sees who was turned away and why."""
        msg = current_message.get()
        sender = (msg.sender if msg is not None else None) or ""
        uid = None
        if msg is not None and sender and self.authority is not None:
            uid = self.authority.known_uid(sender)
            if uid is None:  # refused before polkit was asked: one quick question to the bus
                with contextlib.suppress(GpuschedError, TimeoutError):
                    uid = await asyncio.wait_for(self.authority.caller_uid(msg), REPORT_UID_TIMEOUT_S)
        who = f"uid {uid}" if uid is not None else f"caller {sender or 'unknown'}"
        name = self._name_in(args)
        outcome = "refused" if isinstance(error, Refused) else "failed"
        fields = {"GPUSCHED_METHOD": method, "GPUSCHED_CALLER": sender}
        if uid is not None:
            fields["GPUSCHED_CALLER_UID"] = str(uid)
        text = f"{method}{' of ' + name if name else ''} {outcome} for {who}: {error.message}"
        self.engine.report_error(error, name, text, fields)

    async def _authorize(
        self, access: str, verb: str, args: tuple[Any, ...], extra: dict[str, str] | None = None
    ) -> Model | None:
        """Ask polkit whether the caller may do `verb`; return the model it was authorized for, if any.

        Details for admins' rules: verb, model, unit, and owner (the model owner's uid) when a model exists."""
        msg = current_message.get()
        if msg is None:  # only reachable if a handler is invoked outside the bus dispatch
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", "unknown caller")
        details = {"verb": verb}
        model = self._model_for(args) if access == CONTROL else None
        if model is not None:
            uid = await self.authority.caller_uid(msg)
            action = polkit.ACTION_CONTROL if uid == model.owner else polkit.ACTION_CONTROL_ANY
            details.update(model=model.name, unit=model.unit, owner=str(model.owner))
        else:
            action = _ACTIONS.get(access, polkit.ACTION_MANAGE)
            if args and isinstance(args[0], str):
                name = validate_model_name(args[0])
                details.update(model=name, unit=model_unit(name))
                if access == ADOPT:  # Adopt(name, unit, …) names the unit; AdoptProcesses(name, pids, …) has none
                    details["unit"] = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        details.update(extra or {})
        caller_uid.set(await self.authority.check(msg, action, details))
        if model is not None:
            self._still_there(model)
        return model

    async def _requester(self, model: Model | None = None) -> Requester:
        """The rights of the (authorized) caller that an automatic decision taken for it has (an eviction, a stop for
        room in the RAM budget): its own models; every model for root and for a caller polkit allows control-any
        without asking (a probe, never a prompt: the caller did not ask to touch anyone's model). polkit is asked
        only where such a policy is on, after which `model`, authorized before, must still be the one named."""
        uid = caller_uid.get()
        config = self.engine.config
        if uid == 0:
            return Requester(0, any_model=True)
        if not (config.evict_on_thaw or config.ram_budget_action == "stop-oldest"):
            return Requester(uid)
        msg = current_message.get()
        any_model = msg is not None
        try:
            if msg is not None:
                await self.authority.check(msg, polkit.ACTION_CONTROL_ANY, {"verb": "evict"}, ask=False)
        except GpuschedError:
            any_model = False
        if model is not None:
            self._still_there(model)
        return Requester(uid, any_model)

    async def _check_priority(self, verb: str, name: str, policies: Policies) -> None:
        """A Priority above the admin's MaxUserPriority= needs `manage`: priority decides whose model an eviction
        freezes."""
        if policies.priority > self.engine.config.max_user_priority:
            await self._authorize(MANAGE, verb, (name,), {"priority": str(policies.priority)})

    def _still_there(self, model: Model) -> None:
        """The model a caller was authorized for is still the one its name refers to. polkit answers
        asynchronously: meanwhile the model may have been stopped, forgotten and its name run again by someone
        else, and an authorization for the old one must not act on the new one."""
        if self.engine.models.get(model.name) is not model:
            raise NoSuchModel(f"model {model.name!r} was replaced while the call was being authorized; retry")


def _shown(text: str, limit: int = 64) -> str:
    """A caller's string, safe to echo back in an error message: short, quoted, escaped."""
    return repr(validate.shown(text, limit))


# Policy durations (IdleFreezeSec, FrozenTTLSec) up to a year: beyond that a typo, not a policy.
MAX_POLICY_SEC = 366 * 24 * 3600


# D-Bus signatures of the known options (strings: dbus-fast's Variant.signature is one; "t|u": either)
OPTION_TYPES = {
    "Description": "s",
    "WorkingDirectory": "s",
    "Environment": "as",
    "Gpus": "as",
    "User": "s",
    "Port": "q",  # wake on first connection: the public TCP port
    "BackendPort": "q",  # the port the model listens on, on 127.0.0.1
    "ListenAddress": "s",  # the public port's address; absent: every address
    "Priority": "i",
    "IdleFreezeSec": "t|u",  # seconds; 0: never (absent: the daemon's IdleFreezeSec=)
    "FrozenTTLSec": "t|u",  # seconds; 0: never
    "GpuMemory": "t",  # bytes needed free on each GPU the model will use, made room for before it starts
    "Agent": "b",  # the fast path: the model runs gpuschedd.agent
    "KeepContext": "b",  # with Agent: a freeze leaves the CUDA contexts on the GPU (no driver checkpoint)
}
# What Adopt and AdoptProcesses take: the policies. The rest is about starting a unit, which they do not.
POLICY_OPTIONS = ("Priority", "IdleFreezeSec", "FrozenTTLSec")


def _parse_options(options: dict[str, Variant], known: tuple[str, ...] = tuple(OPTION_TYPES)) -> RunOptions:
    """The options of Run (every key) or of Adopt/AdoptProcesses (`known`: the policies), checked alike: an unknown
    key, a wrong type or a bad value is InvalidArgs, before anything changes."""
    for key, value in options.items():
        if key not in known:
            raise InvalidArgs(f"unknown option {_shown(key, 24)}; known: {', '.join(known)}")
        if value.signature not in OPTION_TYPES[key].split("|"):
            raise InvalidArgs(
                f"option {key} must have type {OPTION_TYPES[key].replace('|', ' or ')}, not {value.signature}"
            )
    get = {key: value.value for key, value in options.items()}
    for key in ("IdleFreezeSec", "FrozenTTLSec"):
        if get.get(key, 0) > MAX_POLICY_SEC:
            raise InvalidArgs(f"option {key}: {get[key]} seconds is more than {MAX_POLICY_SEC}")
    return RunOptions(
        description=validate.description(get.get("Description", "")),
        working_directory=validate.working_directory(get.get("WorkingDirectory", "")),
        environment=validate.environment(get.get("Environment", [])),
        gpus=validate.gpus(get.get("Gpus", [])),
        user=validate.user(get.get("User", "")),
        **_wake_options(get),
        priority=int(get.get("Priority", 0)),
        idle_freeze_sec=int(get.get("IdleFreezeSec", -1)),
        frozen_ttl_sec=int(get.get("FrozenTTLSec", 0)),
        agent=bool(get.get("Agent", False)),
        keep_context=bool(get.get("KeepContext", False)),
        gpu_memory=int(get.get("GpuMemory", 0)),
    )


def _check_run(argv: list[str], options: dict[str, Variant]) -> None:
    """Run's arguments on their own: argv, the options, and what they would keep in all (validate.command_bytes)."""
    validate.command_bytes(validate.argv(argv), _parse_options(options).environment)


def _wake_options(get: dict[str, Any]) -> dict[str, Any]:
    """Port, BackendPort, ListenAddress: wake on first connection (gpuschedd.wake)."""
    port, backend = int(get.get("Port", 0)), int(get.get("BackendPort", 0))
    address = get.get("ListenAddress", "")
    if not port and (backend or address):
        raise InvalidArgs("BackendPort and ListenAddress need Port")
    if port and not backend:
        raise InvalidArgs("Port needs BackendPort: the port the model itself listens on, on 127.0.0.1")
    if port and port == backend:
        raise InvalidArgs("Port and BackendPort must differ: both are on this host")
    if address:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise InvalidArgs(f"ListenAddress must be an IP address, not {_shown(address)}") from None
        if ":" in address:
            address = f"[{address}]"
    return {"port": port, "backend_port": backend, "listen_address": address}


class ManagerInterface(_Authorizing, ServiceInterface):
    def __init__(self, engine: Engine, authority: polkit.Authority) -> None:
        super().__init__(MANAGER_IFACE)
        self.engine = engine
        self.authority = authority

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
        run_options = _parse_options(options)
        if run_options.user:
            # Running as somebody else is a root-only choice.
            await self._authorize(MANAGE, "run", (name,), {"user": run_options.user})
        await self._check_priority("run", name, run_options)
        await self._check_wake(name, run_options)
        ended = self.engine.models.get(name)
        if ended is not None and ended.state in ENDED and ended.owner != caller_uid.get():
            # Running a name again replaces its ended model: forgetting someone else's model needs control-any.
            await self._authorize(CONTROL, "run", (name,))
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
        policies = _parse_options(options, POLICY_OPTIONS)
        await self._check_priority("adopt", name, policies)
        uid = caller_uid.get()
        _status, owner = await self.engine.adoptable_unit(name, unit)
        others = owner != uid and uid != 0
        if others:
            # Someone else's unit: a root-only choice.
            await self._authorize(MANAGE, "adopt", (name, unit), {"unit": unit, "owner": str(owner)})
        await self._replace_ended(name)
        model = await self.engine.adopt(name, unit, uid, others, policies)
        return model_path(model.name)

    @method()
    @exposed(ADOPT)
    async def AdoptProcesses(self, name: DBusStr, pids: PidList, options: DBusDict) -> DBusObjectPath:
        policies = _parse_options(options, POLICY_OPTIONS)
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
            await self._replace_ended(name)
            model = await self.engine.adopt_processes(name, list(pids), uid, others, policies, pins)
        return model_path(model.name)

    async def _replace_ended(self, name: str) -> None:
        """A new model of a name replaces its ended model: forgetting someone else's model needs control-any."""
        ended = self.engine.models.get(name)
        if ended is not None and ended.state in ENDED and ended.owner != caller_uid.get():
            await self._authorize(CONTROL, "adopt", (name,))

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

    # ------------------------------------------------------------- properties

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def CheckpointBackend(self) -> DBusStr:
        return self.engine.checkpoint.name

    @dbus_property(access=PropertyAccess.READ)
    def UnitBackend(self) -> DBusStr:
        return self.engine.units.name

    @dbus_property(access=PropertyAccess.READ)
    def RamBudgetBytes(self) -> DBusUInt64:
        return self.engine.config.ram_budget_bytes

    @dbus_property(access=PropertyAccess.READ)
    def RamFrozenBytes(self) -> DBusUInt64:
        return self.engine.ram_frozen_bytes()

    @dbus_property(access=PropertyAccess.READ)
    def Gpus(self) -> GpuList:
        return [
            {
                "uuid": Variant("s", gpu.uuid),
                "index": Variant("u", gpu.index),
                "name": Variant("s", gpu.name),
                "total": Variant("t", gpu.total_bytes),
                "used": Variant("t", gpu.used_bytes),
                "free": Variant("t", gpu.free_bytes),
            }
            for gpu in self.engine.telemetry.gpus()
        ]

    @dbus_property(access=PropertyAccess.READ)
    def TransparentHugepages(self) -> DBusStr:
        return hostmem.thp_mode()

    # ------------------------------------------------------------- signals

    @signal()
    def ModelNew(self, name: DBusStr, path: DBusObjectPath) -> NameAndPath:
        return [name, path]

    @signal()
    def ModelRemoved(self, name: DBusStr, path: DBusObjectPath) -> NameAndPath:
        return [name, path]


class ModelInterface(_Authorizing, ServiceInterface):
    def __init__(self, engine: Engine, authority: polkit.Authority, model: Model) -> None:
        super().__init__(MODEL_IFACE)
        self.engine = engine
        self.authority = authority
        self.model = model

    def _model_for(self, args: tuple[Any, ...]) -> Model | None:
        return self.model

    def _name_in(self, args: tuple[Any, ...]) -> str:
        return self.model.name

    def changed(self) -> None:
        m = self.model
        self.emit_properties_changed(
            {
                "State": str(m.state),
                "Pids": m.pids,
                "Gpus": m.gpus,
                "VramBytes": m.vram_bytes,
                "SnapshotBytes": m.snapshot_bytes,
                "LastFreezeUSec": m.last_freeze_usec,
                "LastThawUSec": m.last_thaw_usec,
                "StateChangeTimestamp": m.state_change_usec,
                "FreezePath": m.freeze_path,
                "ParkedBytes": m.parked_bytes,
            }
        )

    @method()
    @exposed(CONTROL)
    async def Freeze(self) -> None:
        await self.engine.freeze(self.model.name, by=await self._requester(self.model))

    @method()
    @exposed(CONTROL)
    async def Thaw(self) -> None:
        await self.engine.thaw(self.model.name, await self._requester(self.model))

    @method()
    @exposed(CONTROL)
    async def Stop(self) -> None:
        await self.engine.stop(self.model.name)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.model.name

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> DBusStr:
        return self.model.unit

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return str(self.model.state)

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> DBusUInt32:
        return self.model.owner

    @dbus_property(access=PropertyAccess.READ)
    def Pids(self) -> PidList:
        return self.model.pids

    @dbus_property(access=PropertyAccess.READ)
    def MainPid(self) -> DBusUInt32:
        return self.model.main_pid

    @dbus_property(access=PropertyAccess.READ)
    def Gpus(self) -> StrList:
        return self.model.gpus

    @dbus_property(access=PropertyAccess.READ)
    def VramBytes(self) -> DBusUInt64:
        return self.model.vram_bytes

    @dbus_property(access=PropertyAccess.READ)
    def SnapshotBytes(self) -> DBusUInt64:
        return self.model.snapshot_bytes

    @dbus_property(access=PropertyAccess.READ)
    def LastFreezeUSec(self) -> DBusUInt64:
        return self.model.last_freeze_usec

    @dbus_property(access=PropertyAccess.READ)
    def LastThawUSec(self) -> DBusUInt64:
        return self.model.last_thaw_usec

    @dbus_property(access=PropertyAccess.READ)
    def StateChangeTimestamp(self) -> DBusUInt64:
        return self.model.state_change_usec

    @dbus_property(access=PropertyAccess.READ)
    async def Command(self) -> StrList:
        """Only the model's owner and root read it: a command line carries secrets (tokens, passwords); anyone
        else reads an empty array (docs/security.md)."""
        msg = current_message.get()
        try:
            uid = await self.authority.caller_uid(msg) if msg is not None else -1
        except GpuschedError:
            uid = -1
        return list(self.model.command) if uid in (0, self.model.owner) else []

    @dbus_property(access=PropertyAccess.READ)
    def Agent(self) -> DBusBool:
        return self.model.agent

    @dbus_property(access=PropertyAccess.READ)
    def KeepContext(self) -> DBusBool:
        return self.model.keep_context

    @dbus_property(access=PropertyAccess.READ)
    def FreezePath(self) -> DBusStr:
        return self.model.freeze_path

    @dbus_property(access=PropertyAccess.READ)
    def ParkedBytes(self) -> DBusUInt64:
        return self.model.parked_bytes

    @dbus_property(access=PropertyAccess.READ)
    def Priority(self) -> DBusInt32:
        return self.model.priority

    @dbus_property(access=PropertyAccess.READ)
    def IdleFreezeSec(self) -> DBusUInt64:
        return self.engine.idle_limit(self.model)

    @dbus_property(access=PropertyAccess.READ)
    def FrozenTTLSec(self) -> DBusUInt64:
        return self.model.frozen_ttl_sec


def _get_all_of_empty_interface(bus: MessageBus, msg: Message) -> bool:
    """Properties.GetAll with an empty interface asks for every property of the object (D-Bus specification);
    generic tools send it, and dbus-fast refuses it. It is answered as GetAll of the object's gpusched interface,
    through the same dispatch (and checks) as any GetAll."""
    if (
        msg.message_type != MessageType.METHOD_CALL
        or (msg.interface, msg.member, msg.signature) != ("org.freedesktop.DBus.Properties", "GetAll", "s")
        or msg.body != [""]
    ):
        return False
    ours = [name for name in bus._path_exports.get(msg.path, {}) if name in (MANAGER_IFACE, MODEL_IFACE)]
    if not ours:
        return False
    bus._process_message(
        Message(
            destination=msg.destination,
            path=msg.path,
            interface=msg.interface,
            member=msg.member,
            flags=msg.flags,
            sender=msg.sender,
            signature="s",
            body=[ours[0]],
            serial=msg.serial,
        )
    )
    return True


class BusPublisher(EngineListener):
    """Keeps the bus in step with the engine: one object per model, signals on every change."""

    def __init__(self, bus: MessageBus, engine: Engine, authority: polkit.Authority, manager: ManagerInterface):
        self.bus = bus
        self.engine = engine
        self.authority = authority
        self.manager = manager
        self.objects: dict[str, ModelInterface] = {}
        bus.add_message_handler(functools.partial(_get_all_of_empty_interface, bus))

    def model_added(self, model: Model) -> None:
        iface = ModelInterface(self.engine, self.authority, model)
        path = model_path(model.name)
        self.bus.export(path, iface)
        self.objects[model.name] = iface
        self.manager.ModelNew(model.name, path)

    def model_changed(self, model: Model) -> None:
        iface = self.objects.get(model.name)
        if iface is not None and iface.model is model:
            iface.changed()

    def model_removed(self, model: Model) -> None:
        iface = self.objects.pop(model.name, None)
        if iface is not None:
            path = model_path(model.name)
            self.bus.unexport(path, iface)
            self.manager.ModelRemoved(model.name, path)
