"""Swap: freeze one model and thaw another, both or neither; overlapped where the incoming model fits beside the
outgoing one.

A checkpoint copies device to host and a restore host to device: opposite directions of the link, so the two run
at once in about the time of the longer (two 1.5B models on the bare driver API: 3.27 s one after the other,
2.29 s overlapped). That is safe only where the incoming model fits in the GPU memory free *while the outgoing one
still holds all of its own*: the outgoing model's freeze may fail after its memory was released (a second process's
checkpoint, the cgroup freeze) and then restores it, and a restore that runs out of memory leaves the process
unrecoverable (cuda-checkpoint issue 44). So where it does not fit, the thaw starts once the freeze is over, as
before: the driver releases a process's memory only at the end of its checkpoint, and an agent's park releases
it only after its whole copy-out (agent/parking.py), with the contexts following at the end of the checkpoint, so
an earlier start would gain little and risk the outgoing model. An eviction is that case by definition (the
incoming model lacks room while its victims hold theirs): evictions stay one after the other.

With agents, the two copies take turns instead of running side by side (_copy_in_turn): two agents' copies, one each
way, move together about what one moves alone (the link carries ~1.2x one direction's bandwidth both ways at once,
and the staging ring needs the cores: docs/gpu-results.md, run 6), so side by side each takes longer. The outgoing
model's park runs beside the incoming model's driver restore (its contexts), and the incoming unpark beside the
outgoing driver checkpoint of the rest. With KeepContext there is no driver step: the swap is the park, then the
unpark.

The thaw starts once the freeze has passed its checks (the model is freezing): a refused freeze (the RAM budget,
an InvalidState) changes nothing, as without overlap.

Locking: each step takes one model's lock, never two (the freeze under the outgoing model's, the thaw under the
incoming one's, concurrently), so opposite swaps cannot deadlock, and a Stop of either model waits only for that
model's own step."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import events
from ..errors import GpuschedError, InvalidArgs, InvalidState
from ..events import EngineListener
from ..model import Model, State, require
from .core import Core, Requester

log = logging.getLogger(__name__)


class Swapping(Core):
    """Swap, one after the other or overlapped."""

    async def swap(self, freeze_name: str, thaw_name: str, by: Requester | None = None) -> None:
        """Freeze one model and thaw another: both or neither. If the thaw fails, the first is thawed back; if the
        freeze fails, the second ends frozen, as it would have had the thaw waited for the freeze (overlapped: it
        is frozen again). `by`: as for freeze and thaw."""
        if freeze_name == thaw_name:
            raise InvalidArgs("swap needs two different models")
        out, into = self.get(freeze_name), self.get(thaw_name)
        require(into, "swap in")
        require(out, "swap out")
        t0 = time.monotonic()
        # Saved while under way, so a restart in the middle still ends both-or-neither (_finish_swap). Only when
        # the first model runs and the second is frozen: thawing back one that was frozen before the swap, or
        # freezing again one that ran before it, would be wrong (either way the swap has nothing to undo).
        entry = (freeze_name, thaw_name)
        if out.state == State.RUNNING and into.state == State.FROZEN:
            self._swaps.append(entry)
        # Decided with no await since the reading: the incoming model fits beside the outgoing one as it is now.
        overlapped = out.state == State.RUNNING and into.state == State.FROZEN and self._gpu_shortfall(into) is None
        try:
            if overlapped:
                overlapped = await self._swap_overlapped(out, into, by)
            else:
                await self.freeze(freeze_name, by=by)
                await self._thaw_or_back(out, into, by)
        finally:
            if entry in self._swaps:
                self._swaps.remove(entry)
                self._persist()
        self._emit(events.swapped(out, into, int((time.monotonic() - t0) * 1e6), overlapped))

    async def _swap_overlapped(self, out: Model, into: Model, by: Requester | None) -> bool:
        """The freeze, and once it has passed its checks (a refusal changes nothing, here too) the thaw beside
        it, each under its own model's lock; then both or neither. Both steps are waited for before anything is
        undone: a thaw back needs the freeze over, a freeze back the thaw. Returns whether they ran at once."""
        copied_out = asyncio.Event()
        turn = (out.name, into.name, copied_out)
        self._copy_turns.append(turn)
        try:
            freezing = await self._freeze_under_way(out, by)
            freezing.add_done_callback(lambda _task: copied_out.set())  # however the freeze ends
            if freezing.done():  # refused, or already over: nothing to overlap
                await freezing
                await self._thaw_or_back(out, into, by)
                return False
            froze, thawed = await asyncio.gather(freezing, self.thaw(into.name, by), return_exceptions=True)
        finally:
            copied_out.set()
            self._copy_turns.remove(turn)
        if isinstance(froze, BaseException):
            if not isinstance(thawed, BaseException):
                await self._freeze_back(into, out)
            raise froze
        if isinstance(thawed, BaseException):
            await self._thaw_back(out, by)
            raise thawed
        return True

    def _copied_out(self, model: Model) -> None:
        """A freeze has passed its agents' copy-out (or had none): the swap's incoming model may copy in."""
        for out, _into, copied_out in self._copy_turns:
            if out == model.name:
                copied_out.set()

    async def _copy_in_turn(self, model: Model) -> None:
        """A thaw about to have its agents copy in waits, when it is an overlapped swap's, for the outgoing
        model's agents to have copied out. Staggered: the outgoing park beside the incoming driver restore, then
        the incoming unpark beside the outgoing driver checkpoint of the rest. Two copies side by side share the
        link and the cores and each takes longer (H200, 7B: park 0.50 → 0.73 s, unpark 0.42 → 0.74 s; with the
        host areas kept, unpark 0.41 → 0.52 s and the swap no shorter: docs/gpu-results.md). A thaw with nothing
        parked, or not a swap's, does not wait."""
        if not self._parked.get(model.name):
            return
        for _out, into, copied_out in list(self._copy_turns):
            if into == model.name:
                await copied_out.wait()

    async def _freeze_under_way(self, out: Model, by: Requester | None) -> asyncio.Task[Model]:
        """Start the freeze of `out`; return its task once the model is freezing (its lock taken, the RAM budget
        checked) or the freeze is over (refused, failed, or nothing to do)."""
        freezing = asyncio.ensure_future(self.freeze(out.name, by=by))
        started = _Leaves(out, State.RUNNING)
        self._listeners.append(started)
        try:
            await asyncio.wait(
                {freezing, asyncio.ensure_future(started.left.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            freezing.cancel()  # the swap itself is cancelled (the daemon stops): the freeze is rolled back
            raise
        finally:
            self._listeners.remove(started)
            started.left.set()  # ends the waiter task, if it still waits
        return freezing

    async def _thaw_or_back(self, out: Model, into: Model, by: Requester | None) -> None:
        """The thaw after the freeze is over; if it fails, the first model is thawed back."""
        try:
            await self.thaw(into.name, by)
        except BaseException:
            await self._thaw_back(out, by)
            raise

    async def _thaw_back(self, out: Model, by: Requester | None) -> None:
        """The thaw failed: the first model is thawed back. A failure here is logged; the thaw's error is the one
        the caller needs."""
        try:
            await self.thaw(out.name, by)
        except InvalidState as e:  # stopped or thawed by someone meanwhile: nothing left to roll back
            log.warning("swap rollback: %s", e.message)
        except Exception as e:
            log.error("swap rollback: thawing %s failed: %s", out.name, e)

    async def _freeze_back(self, into: Model, out: Model) -> None:
        """The freeze failed while the overlapped thaw succeeded: the second model is frozen again, as a swap that
        waited for the freeze would have left it. Under its own lock, with no room made for it (its snapshot was
        counted against the RAM budget until its thaw, and the first model's failed freeze holds none). Should
        this freeze fail too, the model stays where it leaves it (running, if rolled back), and that is logged."""
        why = f"frozen again: the swap of {out.name} for it failed, as {out.name} could not be frozen"
        try:
            async with into.lock:
                if into.state != State.RUNNING:
                    return  # stopped (or frozen) by someone meanwhile: nothing to undo
                await self._freeze_locked(into, "swap-rollback", why)
        except GpuschedError as e:
            log.error("swap rollback: freezing %s again failed: %s", into.name, e)


class _Leaves(EngineListener):
    """Sets `left` when `model` is announced in a state other than `state`: a transition of it has begun."""

    def __init__(self, model: Model, state: State) -> None:
        self.model, self.state, self.left = model, state, asyncio.Event()

    def model_changed(self, model: Model) -> None:
        if model is self.model and model.state != self.state:
            self.left.set()
