"""The fast path: the agents that park a model's memory across a freeze."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from typing import TypeVar

from .. import spill
from ..agentlink import GRACE_S, AgentFailed, AgentLink
from ..errors import (
    InvalidState,
)
from ..model import Model
from .core import Core

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# What a thaw has a model's agents read of their spill files ahead, while the driver restores their contexts
# (0.2-0.3 s for a 7B's on the H200, when its disk reads 1.4-2 GB/s): host memory, held until their unpark.
READ_AHEAD_BYTES = 512 << 20


class Parking(Core):
    """The agents' connections (one per parked process) and their waits, which a Stop cuts short."""

    async def _park(self, model: Model, pids: list[int]) -> int:
        """The fast path: each process's agent copies its memory out and releases it, keeping the addresses.
        Returns the host memory the agents keep beside the parked bytes until the unpark (the interposer's
        staging ring), which the snapshot counts.
        A process without an agent, or whose agent fails or misses the deadline, is left whole to the driver's
        checkpoint that follows, which works for any process. A Stop cuts the wait: the freeze is rolled back
        (nothing was checkpointed or frozen yet) and raises InvalidState."""
        directory = os.path.join(self.config.agent_root, model.name)
        timeout_ms = self.config.agent_timeout_ms
        deadline_s = timeout_ms / 1000 + GRACE_S

        async def park_one(pid: int) -> tuple[AgentLink | None, int, str]:
            link = None
            try:
                # One deadline for the whole call: reaching the agent, the request and its whole answer.
                async with asyncio.timeout(deadline_s):
                    link = await AgentLink.connect(directory, pid, timeout_ms / 1000)
                    return (link, await link.park(timeout_ms), "") if link else (None, 0, "")
            except (AgentFailed, TimeoutError) as e:
                if link is not None:
                    link.close()  # a park that finishes late is undone by the agent when it sees this
                return None, 0, str(e) if isinstance(e, AgentFailed) else f"no whole answer in {deadline_s:g}s"
            except asyncio.CancelledError:
                if link is not None:
                    link.close()
                raise

        results = await self._agent_wait(model, asyncio.gather(*(park_one(pid) for pid in pids)))
        if results is None:
            raise InvalidState(f"model {model.name!r} is being stopped: its freeze was cancelled, nothing was changed")
        model.parked_bytes = sum(n for _link, n, _error in results)
        links = [link for link, _n, _error in results if link is not None]
        if links:
            self._parked[model.name] = links
        for pid, (link, n, error) in zip(pids, results, strict=True):
            if error:
                log.warning("freeze of %s: pid %d takes the driver path: %s", model.name, pid, error)
            elif link is not None:
                log.info("freeze of %s: the agent of pid %d parked %d bytes in %.3fs", model.name, pid, n, link.seconds)
        return sum(link.staging_bytes for link in links)

    async def _unpark(self, model: Model) -> str:
        """Give the agents their memory back; returns what failed ("" when nothing did). An agent that answered
        with a failure (no room on the GPU) keeps its memory parked and its connection, for the next thaw; one
        that cannot be reached (or whose wait a Stop cut) unparks by itself once its connection is gone."""

        async def unpark_one(link: AgentLink) -> str:
            try:
                await link.unpark(self.config.agent_timeout_ms / 1000)
                log.info("thaw of %s: the agent of pid %d unparked in %.3fs", model.name, link.pid, link.seconds)
            except AgentFailed as e:
                if e.answered:
                    return str(e)
            link.close()
            return ""

        links = self._parked.pop(model.name, [])
        errors = await self._agent_wait(model, asyncio.gather(*(unpark_one(link) for link in links)))
        if errors is None:
            for link in links:
                link.close()
            return ""
        kept = [link for link, error in zip(links, errors, strict=True) if error]
        if kept:
            self._parked[model.name] = kept
        return "; ".join(error for error in errors if error)

    async def _read_ahead(self, model: Model) -> None:
        """A thaw of a model with spill files, beside the driver's restore: each agent starts reading its file's
        first bytes (its share of READ_AHEAD_BYTES), which its unpark then takes from RAM, so the disk does not
        wait for the restore. A refusal costs only that head start."""
        links = [link for link in self._parked.get(model.name, []) if link.spilled]
        if not links:
            return

        async def one(link: AgentLink) -> None:
            try:
                started = await link.read_ahead(READ_AHEAD_BYTES // len(links), self.config.agent_timeout_ms / 1000)
                log.info("thaw of %s: the agent of pid %d reads %d bytes ahead", model.name, link.pid, started)
            except AgentFailed as e:
                log.warning("thaw of %s: the agent of pid %d reads nothing ahead: %s", model.name, link.pid, e)

        await self._agent_wait(model, asyncio.gather(*(one(link) for link in links)))

    def _spill_links(self, model: Model) -> list[AgentLink]:
        """The agents whose parked bytes a page-out writes to spill files: those that said where they lie."""
        if not self.config.spill_directory:
            return []
        return [link for link in self._parked.get(model.name, []) if link.host_address and not link.spilled]

    async def _spill(self, model: Model) -> int:
        """The disk tier's lane for parked memory (spill.py): each agent's parked bytes written to a file of the
        daemon's, then handed to the agent, which gives its host memory back; its process must run for that, so
        the frozen cgroup is thawed for the moment of the request (the CUDA work stays held: by the driver's lock,
        or with KeepContext by the agent's gate). Returns the bytes spilled. Bytes that cannot be written (no
        room: SpillDirectory= full) or an agent that refuses leave them in RAM, for the swap."""
        links = self._spill_links(model)
        claimed = sum(link.parked_bytes for link in links)
        if not links:
            return 0
        if claimed > model.vram_bytes:  # what the agents say they parked is more than NVML saw on the GPU
            log.warning("page-out of %s: its agents claim %d parked bytes, more than the %d bytes of GPU memory it"
                        " held; not spilled", model.name, claimed, model.vram_bytes)  # fmt: skip
            return 0
        files: list[tuple[AgentLink, int]] = []
        for link in links:
            try:
                fd = await asyncio.to_thread(
                    spill.spill_area, self.config.spill_directory, link.pid, link.host_address, link.parked_bytes
                )
                files.append((link, fd))
            except spill.SpillError as e:
                log.warning("page-out of %s: pid %d's parked bytes stay in RAM: %s", model.name, link.pid, e)
        if not files:
            return 0
        spilled = 0
        await self.units.thaw(model.unit)
        try:
            for link, fd in files:
                try:
                    await link.spill(fd, self.config.agent_timeout_ms / 1000)
                    spilled += link.parked_bytes
                except AgentFailed as e:
                    log.warning("page-out of %s: the agent of pid %d kept its bytes: %s", model.name, link.pid, e)
                    if not e.answered:  # the connection is gone: the agent unparks by itself at the thaw
                        link.close()
                        self._parked[model.name].remove(link)
                finally:
                    os.close(fd)
        finally:
            await self.units.freeze(model.unit)
        return spilled

    async def _agent_wait(self, model: Model, work: Awaitable[_T]) -> _T | None:
        """Wait for `work` on a model's agents, in a task a Stop of the model cancels (None when it did): agent
        I/O is bounded by its deadline, but a Stop does not wait even that long."""
        task = asyncio.ensure_future(work)
        if model.name in self._stop_requested:
            task.cancel()
        self._agent_waits[model.name] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this call itself is cancelled (the daemon stops), not only the agents' wait
            return None
        finally:
            self._agent_waits.pop(model.name, None)

    def _drop_parked(self, name: str) -> None:
        """The model's processes are gone: their agents' connections with them."""
        for link in self._parked.pop(name, []):
            link.close()
