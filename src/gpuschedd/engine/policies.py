"""The automatic decisions: idle freeze, frozen time to live, ended-model time to live."""

from __future__ import annotations

import logging

from .. import events
from ..errors import (
    GpuschedError,
)
from ..model import ENDED, Model, State
from ..names import model_name_from_unit
from .core import DAEMON, Core

log = logging.getLogger(__name__)


class Policies_(Core):
    """One round of the automatic decisions, every second (named with _: options.Policies is the Run options)."""

    def idle_limit(self, model: Model) -> int:
        """The idle time in force for a model: its own IdleFreezeSec, else the daemon's (0: never frozen idle). Not the
        daemon's for a catalog model: the front door freezes those when idle, knowing the requests in flight that GPU
        utilization cannot show (its file's own IdleFreezeSec= still applies)."""
        if model.idle_freeze_sec < 0:
            return 0 if model.catalog_digest else self.config.idle_freeze_sec
        return model.idle_freeze_sec

    async def apply_policies(self) -> None:
        """One round of the automatic decisions (the daemon calls it every second): freeze running models idle for
        their IdleFreezeSec, stop frozen models past their FrozenTTLSec. A model in a transition is left alone;
        a policy that cannot be carried out is logged (and its refusal or failure journaled) and tried again."""
        now = self.now_usec()
        await self._freeze_idle(now)
        await self._stop_frozen_too_long(now)
        self._drop_ended(now)

    async def _freeze_idle(self, now: int) -> None:
        """IdleFreezeSec: freeze running models whose processes used no GPU for that long."""
        watched = [
            m for m in self.models.values() if m.state == State.RUNNING and self.idle_limit(m) > 0 and m.vram_bytes
        ]
        busy = self.telemetry.busy_pids() if watched else None
        for model in watched:
            if busy is None or busy & set(model.pids):
                model.last_active_usec = now  # busy, or utilization unknown: never called idle
                continue
            limit = self.idle_limit(model)
            idle = (now - model.last_active_usec) / 1e6
            if idle < limit or model.lock.locked():
                continue
            why = f"no GPU utilization from its processes for {idle:.0f}s (IdleFreezeSec={limit}), decided by {DAEMON}"
            log.info("model %s: %s: freezing it", model.name, why)
            try:
                await self.freeze(model.name, "idle", why, DAEMON)
            except GpuschedError as e:
                log.warning("idle freeze of %s: %s", model.name, e)
                model.last_active_usec = now  # try again after another idle period, not every second

    async def _stop_frozen_too_long(self, now: int) -> None:
        """FrozenTTLSec: stop frozen models frozen longer than that."""
        for model in list(self.models.values()):
            if model.state != State.FROZEN or model.frozen_ttl_sec <= 0 or model.lock.locked():
                continue
            frozen = (now - model.state_change_usec) / 1e6
            if frozen < model.frozen_ttl_sec:
                continue
            why = f"frozen for {frozen:.0f}s, past its FrozenTTLSec={model.frozen_ttl_sec}, decided by {DAEMON}"
            log.info("model %s: %s: stopping it", model.name, why)
            try:
                await self.stop(model.name, "frozen-ttl", why)
            except GpuschedError as e:
                log.warning("stop of %s past its frozen time to live: %s", model.name, e)

    def _drop_ended(self, now: int) -> None:
        """EndedModelTTLSec=: an ended model is dropped from the table (and the state file) this long after it ended,
        with its command line: nothing a user ran is kept forever, and the table stays small. A catalog model stays:
        it is listed as long as its file is there."""
        ttl = self.config.ended_model_ttl_sec
        if ttl <= 0:
            return
        for model in list(self.models.values()):
            ended = (now - model.state_change_usec) / 1e6
            if model.state not in ENDED or model.catalog_digest or model.lock.locked() or ended < ttl:
                continue
            self._remove(model)
            if model_name_from_unit(model.unit) is None:
                self.units.untrack(model.unit)
            why = f": it ended {ended:.0f}s ago, past EndedModelTTLSec={ttl}"
            self._emit(events.forgotten(model, why, "ended-ttl"))
