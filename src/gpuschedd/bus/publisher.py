"""Keeps the bus in step with the engine: one object per model (bus/model_object.py), the Manager's signals."""

# No `from __future__ import annotations`: dbus-fast reads D-Bus signatures from the live annotations.
import functools

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from ..engine import Engine
from ..events import EngineListener
from ..model import Model
from ..names import MANAGER_IFACE, MODEL_IFACE, model_path
from . import polkit
from .manager import ManagerInterface
from .model_object import ModelInterface


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


# What a model holds that the Manager's emitting properties count: GPU memory (Gpus' used and free bytes) and a
# snapshot (RamFrozenBytes). A change of a model that held neither before it and holds neither after moves neither.
_MEMORY = frozenset({"VramBytes", "SnapshotBytes"})


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
        self.manager.changed()

    def model_changed(self, model: Model) -> None:
        iface = self.objects.get(model.name)
        if iface is not None and iface.model is model:
            moved = iface.changed()
            if not (model.vram_bytes or model.snapshot_bytes or _MEMORY & moved.keys()):
                return  # it held no GPU memory and no snapshot, before or now: none of the Manager's figures moved
        self.manager.changed()

    def model_removed(self, model: Model) -> None:
        iface = self.objects.pop(model.name, None)
        if iface is not None:
            path = model_path(model.name)
            self.bus.unexport(path, iface)
            self.manager.ModelRemoved(model.name, path)
        self.manager.changed()
