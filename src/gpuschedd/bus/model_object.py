"""org.gpusched1.Model at /org/gpusched1/model/NAME: one object per model, its properties declared once
(MODEL_PROPERTIES: what the object serves and what PropertiesChanged carries come from the same rows)."""

# No `from __future__ import annotations`: dbus-fast reads D-Bus signatures from the live annotations.
from typing import Any

from dbus_fast.service import PropertyAccess, dbus_property, method

from ..engine import Engine
from ..errors import GpuschedError
from ..model import Model
from ..names import MODEL_IFACE
from . import polkit
from .connection import current_message
from .service import CONTROL, Announcing, Authorizing, Exported, StrList, exporting, exposed


def _model(attribute: str) -> Any:
    """A getter of the model's attribute of that name."""
    return lambda iface: getattr(iface.model, attribute)


# The Model's properties (docs/dbus-api.md; dbus/org.gpusched1.xml says what each means). `emits`: sent in
# PropertiesChanged when a change of the model moved it; `const`: fixed when the model is made (IdleFreezeSec: from the
# model's own option or the daemon's configuration, read once at start).
MODEL_PROPERTIES = (
    Exported("Name", "s", _model("name"), const=True),
    Exported("Unit", "s", _model("unit"), const=True),
    Exported("State", "s", lambda iface: str(iface.model.state), emits=True),
    Exported("Owner", "u", _model("owner"), const=True),
    Exported("Pids", "au", _model("pids"), emits=True),
    Exported("MainPid", "u", _model("main_pid"), emits=True),
    Exported("Gpus", "as", _model("gpus"), emits=True),
    Exported("VramBytes", "t", _model("vram_bytes"), emits=True),
    Exported("SnapshotBytes", "t", _model("snapshot_bytes"), emits=True),
    Exported("LastFreezeUSec", "t", _model("last_freeze_usec"), emits=True),
    Exported("LastThawUSec", "t", _model("last_thaw_usec"), emits=True),
    Exported("StateChangeTimestamp", "t", _model("state_change_usec"), emits=True),
    Exported("Command", "as", None, const=True),  # the caller's own or root's: ModelInterface.Command
    Exported("Agent", "b", _model("agent"), const=True),
    Exported("KeepContext", "b", _model("keep_context"), const=True),
    Exported("InjectAgent", "b", _model("inject_agent"), const=True),
    Exported("FreezePath", "s", _model("freeze_path"), emits=True),
    Exported("ParkedBytes", "t", _model("parked_bytes"), emits=True),
    Exported("SnapshotRamBytes", "t", lambda iface: iface.model.snapshot_in_ram(), emits=True),
    Exported("SnapshotSwapBytes", "t", lambda iface: iface.model.snapshot_in_swap(), emits=True),
    Exported("SnapshotFileBytes", "t", lambda iface: iface.model.snapshot_in_files(), emits=True),
    Exported("Priority", "i", _model("priority"), const=True),
    Exported("IdleFreezeSec", "t", lambda iface: iface.engine.idle_limit(iface.model), const=True),
    Exported("FrozenTTLSec", "t", _model("frozen_ttl_sec"), const=True),
    Exported("Catalog", "b", lambda iface: bool(iface.model.catalog_digest), const=True),
    Exported("Aliases", "as", _model("aliases"), const=True),
    Exported("BackendPort", "q", _model("backend_port"), const=True),
)


@exporting(MODEL_PROPERTIES)
class ModelInterface(Authorizing, Announcing):
    """/org/gpusched1/model/NAME: one model's methods and properties."""

    def __init__(self, engine: Engine, authority: polkit.Authority, model: Model) -> None:
        self.engine = engine
        self.authority = authority
        self.model = model
        # changed(): what moved since the object appeared (a client reads it whole then), or since last sent
        super().__init__(MODEL_IFACE, sent_now=True)

    def _model_for(self, args: tuple[Any, ...]) -> Model | None:
        return self.model

    def _name_in(self, args: tuple[Any, ...]) -> str:
        return self.model.name

    @method()
    @exposed(CONTROL)
    async def Start(self) -> None:
        await self.engine.start_catalog(self.model.name, await self._requester(self.model))

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
    async def PageOut(self) -> None:
        await self.engine.page_out(self.model.name)

    @method()
    @exposed(CONTROL)
    async def FreezeToDisk(self) -> None:
        await self.engine.freeze_to_disk(self.model.name, await self._requester(self.model))

    @method()
    @exposed(CONTROL)
    async def Stop(self) -> None:
        await self.engine.stop(self.model.name)

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
