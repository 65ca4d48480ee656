"""org.gpusched1 on the system bus: what both interfaces share (bus/manager.py: the Manager object; bus/model_object.py:
one object per model; bus/publisher.py keeps them in step with the engine).

Every method goes through `exposed()`, which authorizes the caller and maps every failure to a typed D-Bus
error. Its default is the strictest action (`manage`), so a method added without thinking about access fails
closed. Reading (properties, ListModels, introspection) is open to everyone.

Properties are declared once (`Exported`: name, signature, getter, whether a change emits it, or it never changes)
and the dbus-fast property methods are generated from the declarations (`exporting`): dbus-fast reads properties from
class members with a signature annotation, so a generated getter per row is what it needs, and the same row gives
PropertiesChanged its value. A property whose getter depends on the caller (Model.Command) stays a written method,
declared with no getter.
"""

# No `from __future__ import annotations`: dbus-fast reads D-Bus signatures from the live annotations.
import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from dbus_fast.annotations import DBusSignature
from dbus_fast.errors import DBusError
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property

from ..engine import Engine, Requester
from ..errors import GpuschedError, NoSuchModel, Refused
from ..model import Model
from ..names import model_unit, validate_model_name
from ..options import Policies
from . import polkit
from .connection import current_message

log = logging.getLogger(__name__)

READ = "read"
RUN = "run"
CONTROL = "control"  # becomes control or control-any depending on who owns the model
ADOPT = "adopt"
MANAGE = "manage"

_ACTIONS = {RUN: polkit.ACTION_RUN, ADOPT: polkit.ACTION_ADOPT, MANAGE: polkit.ACTION_MANAGE}
# What control-catalog allows on a catalog model of another user (control-any, which implies it, allows the rest):
# bringing it in and out of the GPU, never ending it (Stop, Forget) or moving it (Migrate).
CATALOG_VERBS = frozenset({"start", "freeze", "thaw", "swap", "pageout", "freezetodisk"})

# An error's journal entry names the caller's uid if the bus says it within this time (else its bus name only).
REPORT_UID_TIMEOUT_S = 1.0

caller_uid: contextvars.ContextVar[int] = contextvars.ContextVar("caller_uid", default=-1)

Handler = Callable[..., Awaitable[Any]]

# D-Bus signatures as type hints (dbus-fast reads them).
StrList = Annotated[list[str], DBusSignature("as")]
PidList = Annotated[list[int], DBusSignature("au")]
ModelRows = Annotated[list[list[Any]], DBusSignature("a(sssuutt)")]
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


class Authorizing:
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

        Details for admins' rules: verb, model, unit, and owner (the model owner's uid) when a model exists. Another
        user's model needs control-any, or control-catalog for a catalog model's CATALOG_VERBS."""
        msg = current_message.get()
        if msg is None:  # only reachable if a handler is invoked outside the bus dispatch
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", "unknown caller")
        details = {"verb": verb}
        model = self._model_for(args) if access == CONTROL else None
        if model is not None:
            if verb == "start" and not model.catalog_digest:
                raise NoSuchModel(f"no catalog model named {model.name!r}")
            uid = await self.authority.caller_uid(msg)
            action = polkit.ACTION_CONTROL if uid == model.owner else polkit.ACTION_CONTROL_ANY
            if action == polkit.ACTION_CONTROL_ANY and model.catalog_digest and verb in CATALOG_VERBS:
                action = polkit.ACTION_CONTROL_CATALOG
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
        if not (config.evict_on_thaw or config.ram_budget_action != "refuse"):
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


EMITS_CHANGED_SIGNAL = "org.freedesktop.DBus.Property.EmitsChangedSignal"


@dataclass(frozen=True)
class Exported:
    """One exported property: its name and D-Bus signature; `get`: the interface object to its value (None: a
    method written by hand, for a value that depends on the caller); `emits`: sent in PropertiesChanged when it
    changes; `const`: fixed for the object's life. Introspection says which (EmitsChangedSignal: true, const, or
    false for a value that changes unannounced), so a client knows what it may cache and what it must re-read."""

    name: str
    signature: str
    get: Callable[[Any], Any] | None
    emits: bool = False
    const: bool = False

    @property
    def emits_changed_signal(self) -> str:
        return "true" if self.emits else "const" if self.const else "false"


def exporting(table: tuple[Exported, ...]) -> Callable[[type[ServiceInterface]], type[ServiceInterface]]:
    """Class decorator: a read-only dbus-fast property per row of `table` that has a getter, and every row's
    EmitsChangedSignal annotation (dbus-fast's dbus_property has no parameter for it) on its introspection; the
    table is what Announcing.changed announces from."""

    def decorate(cls: type[ServiceInterface]) -> type[ServiceInterface]:
        cls.exported = table  # type: ignore[attr-defined]
        for row in table:
            if row.get is not None:
                setattr(cls, row.name, _property(row))
            getattr(cls, row.name).introspection.annotations[EMITS_CHANGED_SIGNAL] = row.emits_changed_signal
        return cls

    return decorate


class Announcing(ServiceInterface):
    """PropertiesChanged with only those of the emitting properties whose value moved since last sent: each change
    costs the signal (built, written, routed by dbus-daemon to every subscriber) what moved, not the whole table.
    `exported`: the class's property table (set by `exporting`)."""

    exported: tuple[Exported, ...] = ()

    def __init__(self, name: str, sent_now: bool) -> None:
        """sent_now: the values as they are now count as sent (an object new on the bus: a client reads them
        whole), else the first change sends every emitting property."""
        super().__init__(name)
        self._sent: dict[str, Any] = self._emitting() if sent_now else {}

    def _emitting(self) -> dict[str, Any]:
        # lists copied: a value changed in place must not compare equal to the one sent
        return {row.name: _copied(row.get(self)) for row in self.exported if row.emits and row.get}

    def changed(self) -> dict[str, Any]:
        """Send what moved since last sent; returns it ({} when nothing did: no signal)."""
        now = self._emitting()
        moved = {name: value for name, value in now.items() if self._sent.get(name) != value}
        self._sent = now
        if moved:
            self.emit_properties_changed(moved)
        return moved


def _copied(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _property(row: Exported) -> Any:
    get = row.get
    assert get is not None

    def getter(self: ServiceInterface) -> Any:
        return get(self)

    getter.__name__ = getter.__qualname__ = row.name
    getter.__annotations__ = {"return": row.signature}  # dbus-fast takes a signature string as the type
    return dbus_property(access=PropertyAccess.READ)(getter)
