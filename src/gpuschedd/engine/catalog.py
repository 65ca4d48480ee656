"""The model catalog in the table: its models listed (stopped) before they ever run, started by Start, kept in step
with the files on reload (catalog.py reads them; man gpusched-models.d(5) says what an admin sees)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import catalog, events
from ..catalog import Entry
from ..errors import GpuschedError, ModelExists, NoSuchModel
from ..model import ENDED, Model, State
from ..names import model_unit
from ..units import UnitSpec
from .core import Core, Requester

log = logging.getLogger(__name__)


class Catalog(Core):
    """A catalog model is a model of the table like any other, with the fingerprint of its file's definition
    (Model.catalog_digest): listed `stopped` until Start runs it through Run's own path (`run`, as its User=), taken
    over after a restart like any unit (the state file keeps the fingerprint), stopped, frozen and thawed like any.
    What is the catalog's alone: it is listed while its file is there (EndedModelTTLSec= does not drop it), its name
    is not free for Run or Adopt, and when it ends it is listed again as the file now defines it."""

    # Where the files are and whose they must be (the unit tests point them at a directory of their own).
    catalog_dirs: tuple[str, ...] = catalog.DIRS
    catalog_owner = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The definitions the files give now, by model name.
        self.catalog: dict[str, Entry] = {}

    async def reload_catalog(self) -> None:
        """Read the files again (at start, and on Reload): new models are listed, stopped ones take their new
        definition, those whose file is gone leave the table. A running (or frozen) model keeps its definition until
        it stops. Each refused file is one error in the journal, naming the file and line; the rest load."""
        found = await asyncio.to_thread(catalog.read, self.catalog_dirs, self.catalog_owner)
        for error in found.errors:
            log.error("model catalog: %s", error)
        before, self.catalog = self.catalog, found.entries
        ours = {m.name for m in self.models.values() if m.catalog_digest}
        for name in sorted({*before, *self.catalog, *ours}):
            self._relist(name, announce=True)
        log.info(
            "model catalog: %d model(s) from %s%s",
            len(self.catalog),
            " and ".join(self.catalog_dirs),
            f"; {len(found.errors)} file(s) refused" if found.errors else "",
        )

    def _relist(self, name: str, announce: bool = False) -> None:
        """Bring the table's record of `name` in step with the catalog, without an await. A live model (or one in a
        transition) is left as it is (`announce`: say what waits for its end); an ended one that the file defines
        otherwise, or no longer, is replaced or dropped; an ended one of the same definition keeps its last exit."""
        entry = self.catalog.get(name)
        model = self.models.get(name)
        if model is not None and (model.state not in ENDED or model.lock.locked()):
            if announce and entry is None and model.catalog_digest:
                log.info("model catalog: %s's file is gone; it runs on, and leaves the catalog when it ends", name)
            elif announce and entry is not None and model.catalog_digest not in ("", entry.digest):
                log.info("model catalog: %s runs with its earlier definition; the new one applies once it ends", name)
            elif announce and entry is not None and not model.catalog_digest:
                log.warning(
                    "model catalog: %s is run by uid %d, not the catalog: listed once it ends", name, model.owner
                )
            return
        if model is not None and model.catalog_digest and entry is not None and model.catalog_digest == entry.digest:
            return
        if model is not None and (model.catalog_digest or entry is not None):
            self._remove(model)  # a catalog model's earlier definition is replaced silently; anything else is an event
            if entry is None or not model.catalog_digest:
                why = ": its file left the model catalog" if entry is None else ": the model catalog defines its name"
                self._emit(events.forgotten(model, why, "catalog"))
        if entry is not None:
            self._add(self._listed(entry))

    def _listed(self, entry: Entry) -> Model:
        """A catalog model as listed before it runs: stopped, with what Start will give it."""
        spec = UnitSpec(unit=model_unit(entry.name), argv=list(entry.argv), description="")
        model = self._new_model(entry.name, spec, entry.uid, entry.options)
        model.state = State.STOPPED
        model.catalog_digest, model.aliases = entry.digest, list(entry.aliases)
        return model

    def _set_state(self, model: Model, state: State) -> None:
        """Every transition (core.Core._set_state); one that ends a model of the catalog's name lists it again as
        the catalog defines it now, once the step that ended it let go of the model."""
        super()._set_state(model, state)
        if state in ENDED and (model.catalog_digest or model.name in self.catalog):
            self._spawn(lambda: self._relist_after(model))

    async def _relist_after(self, model: Model) -> None:
        async with model.lock:
            pass
        self._relist(model.name)

    async def start_catalog(self, name: str, by: Requester) -> Model:
        """An entry point: Start. Runs a catalog model that is not running (stopped, or failed) as its file defines
        it, through Run's own path (evictions for GpuMemory= with `by`'s rights); one running, frozen or in a
        transition is returned as it is. NoSuchModel for a name the catalog does not define."""
        model = self.get(name)
        if model.catalog_digest and model.state not in ENDED:
            return model
        entry = self.catalog.get(name)
        if entry is None or not model.catalog_digest:
            raise NoSuchModel(f"no catalog model named {name!r}")
        try:
            return await self.run(name, entry.argv, entry.options, entry.uid, by, catalog=entry)
        except ModelExists:
            live = self.models.get(name)
            if live is not None and live.catalog_digest and live.state not in ENDED:
                return live  # a concurrent Start was first
            self._relist(name)
            raise
        except BaseException:
            self._relist(name)  # a start that failed leaves the model listed as before
            raise

    async def preload_catalog(self) -> None:
        """Preload=yes: start those catalog models that do not run, one after the other (at daemon start). An
        eviction for one touches only its own user's models; a start that fails is logged, the others go on."""
        for entry in list(self.catalog.values()):
            model = self.models.get(entry.name)
            if not entry.preload or model is None or not model.catalog_digest or model.state not in ENDED:
                continue
            log.info("model catalog: starting %s (Preload=yes)", entry.name)
            try:
                await self.start_catalog(entry.name, Requester(entry.uid))
            except GpuschedError as e:
                log.error("model catalog: Preload= of %s failed: %s", entry.name, e.message)
