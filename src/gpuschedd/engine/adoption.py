"""Adopt: manage a unit, or running processes, that gpuschedd did not start."""

from __future__ import annotations

import contextlib
import logging
import os

from .. import adopt, events
from ..errors import (
    AccessDenied,
    InvalidArgs,
    InvalidState,
    ModelExists,
)
from ..model import ENDED, Model
from ..names import validate_model_name
from ..options import Policies
from ..units import UnitStatus
from .core import Core

log = logging.getLogger(__name__)


class Adoption(Core):
    """Adopt and AdoptProcesses: checks that read the unit or /proc, then admission as for a Run."""

    def _check_new_model(self, name: str, unit: str, pids: list[int]) -> None:
        """The name is free, and neither the unit nor any of the PIDs belongs to a live model. Without an await, so
        it holds until the caller's next await."""
        self._check_name_free(name)
        for other in self.models.values():
            if other.state in ENDED:
                continue
            if other.unit == unit:
                raise ModelExists(f"{unit} is managed already, as model {other.name!r}")
            shared = sorted(set(other.pids) & set(pids))
            if shared:
                raise ModelExists(f"process {shared[0]} belongs to model {other.name!r} already")

    async def adoptable_unit(self, name: str, unit: str) -> tuple[UnitStatus, int]:
        """An existing unit that may become model `name`, and its owner (its User=, else the uid every process runs
        as, else root). Raises a typed error saying why not."""
        validate_model_name(name)
        adopt.check_unit_name(unit)
        self._check_new_model(name, unit, [])
        status = await self.units.status(unit)
        if status is None:
            raise InvalidArgs(f"no such unit: {unit}")
        if status.active_state not in ("active", "reloading"):
            raise InvalidState(f"{unit} is {status.active_state}, not active: only a running unit can be adopted")
        if not status.pids:
            raise InvalidState(f"{unit} has no processes")
        if status.frozen:
            raise InvalidState(f"{unit} is frozen already (not by gpuschedd): thaw it first")
        if os.getpid() in status.pids:
            raise InvalidArgs(f"{unit} holds gpuschedd itself: it cannot be adopted")
        self._check_new_model(name, unit, status.pids)
        if status.user:
            owner = self._owner_of(status)
        else:
            uids = [adopt.process_uid(pid) for pid in status.pids]
            owner = adopt.common_owner([u for u in uids if u is not None], 0)
        return status, owner

    async def adopt(
        self, name: str, unit: str, caller: int, others: bool = False, policies: Policies | None = None
    ) -> Model:
        """Manage an existing unit in place: it keeps its name, restart policy and logs. Only a unit the caller owns,
        unless `others` (the bus layer grants it with `manage`)."""
        if caller < 0:
            raise AccessDenied("unknown caller")
        status, owner = await self.adoptable_unit(name, unit)
        if owner != caller and caller != 0 and not others:
            raise AccessDenied(f"{unit} runs as uid {owner}: only its owner may adopt it")
        self._check_new_model(name, unit, status.pids)  # again: the status was read with an await
        command = list(status.command) or adopt.cmdline(status.main_pid or status.pids[0])
        model = Model(name=name, unit=unit, owner=owner, command=command)
        self._set_policies(model, policies or Policies())
        self._apply_status(model, status)
        self._check_limits(model, caller)
        existing = self.models.get(name)
        if existing is not None:
            self._remove(existing)  # an ended model of that name
        self.units.track(unit)
        self._add(model)
        self._emit(events.adopted_unit(model))
        return model

    def adoptable_pids(self, name: str, pids: list[int]) -> dict[int, int]:
        """Processes that may become model `name`: pid → owner uid. Raises a typed error saying why not."""
        validate_model_name(name)
        owners = adopt.check_pids(pids)
        self._check_new_model(name, adopt.scope_unit(name), list(owners))
        return owners

    async def adopt_processes(
        self,
        name: str,
        pids: list[int],
        caller: int,
        others: bool = False,
        policies: Policies | None = None,
        pins: adopt.Pins | None = None,
    ) -> Model:
        """Move running processes into the transient scope gpusched-adopt-NAME.scope in gpusched.slice. Only
        processes the caller owns, unless `others` (the bus layer grants it with `manage`). `pins`: the processes
        as the caller's checks saw them, held since (adopt.Pins); without, they are pinned here."""
        if caller < 0:
            raise AccessDenied("unknown caller")
        with adopt.Pins(pids) if pins is None else contextlib.nullcontext(pins) as held:
            return await self._adopt_pinned(name, pids, caller, others, policies, held)

    async def _adopt_pinned(
        self, name: str, pids: list[int], caller: int, others: bool, policies: Policies | None, pins: adopt.Pins
    ) -> Model:
        owners = self.adoptable_pids(name, pids)
        pins.verify()  # what was just read from /proc is of the processes checked before
        foreign = sorted(pid for pid, uid in owners.items() if uid != caller)
        if foreign and caller != 0 and not others:
            raise AccessDenied(f"process {foreign[0]} runs as uid {owners[foreign[0]]}: only its owner may adopt it")
        unit = adopt.scope_unit(name)
        owner = adopt.common_owner(list(owners.values()), caller)
        command = adopt.cmdline(min(owners))
        model = Model(name=name, unit=unit, owner=owner, command=command)
        self._set_policies(model, policies or Policies())

        async def move() -> UnitStatus:
            pins.verify()  # the last moment before PID 1 is handed the numbers
            return await self.units.start_scope(unit, sorted(owners), f"gpusched adopted processes {name}")

        status = await self._admit(model, move, caller)
        self._announce(
            status,
            events.adopted_processes(model, sorted(owners)),
        )
        return model
