"""The disk tier: a frozen model's snapshot paged out to swap (pageout.py), its agents' parked bytes to spill files
(spill.py), on request or to keep the RAM budget, and read back ahead of its thaw. Where a snapshot lives is a
property of a frozen model, not a state of its own: a model paged out is frozen, and thaws as any frozen model does
(docs/disk-tier.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import events, hostmem, pageout
from ..errors import InsufficientSwap, NotSupported, RamBudgetExceeded
from ..model import Model, State, require
from .core import Core, Requester

log = logging.getLogger(__name__)


class Paging(Core):
    """PageOut and FreezeToDisk, and the read-ahead of a thaw. The kernel's side is behind the `_kernel_*` and
    `_swap*` methods, which the tests replace with a fake kernel (as Core's mem_available and rss): page out and
    read ahead one process, one process's swapped bytes, the host's swap and its swap cache."""

    def _kernel_page_out(self, pid: int) -> pageout.Advised:
        return pageout.page_out(pid)

    def _kernel_prefetch(self, pid: int) -> pageout.Advised:
        return pageout.prefetch(pid)

    def _swapped(self, pid: int) -> int:
        return hostmem.swapped_bytes(pid)

    def _swap_space(self) -> tuple[int, int]:
        return hostmem.swap_bytes()

    def _swap_cached(self) -> int:
        return hostmem.swap_cached_bytes()

    def _paged_out_cache(self) -> int:
        """RAM the kernel can take back at once: a page written out by MADV_PAGEOUT stays in RAM as a clean copy
        (SwapCached) until memory is wanted, and MemAvailable does not count it (measured: it did not grow when
        768 MiB were paged out). At most what frozen models have on disk: SwapCached also holds pages read back."""
        on_disk = sum(m.snapshot_in_swap() for m in self.models.values())
        return min(on_disk, self._swap_cached()) if on_disk else 0

    async def page_out(self, name: str, reason: str = "", why: str = "") -> Model:
        """An entry point: page a frozen model's processes out to swap. `reason` and `why`: a page-out the daemon
        decided itself (the RAM budget), said in its event. The model stays frozen wherever its pages end up; a
        kernel that moves only part of them (swap filled meanwhile, pages it will not move) is reported, not an
        error."""
        model = self.get(name)
        async with model.lock:
            require(model, "page out")
            await self._page_out_locked(model, reason, why)
        return model

    async def freeze_to_disk(self, name: str, by: Requester | None = None) -> Model:
        """Freeze (if it runs), then page out: refused before the freeze where there is no swap for it. A thaw by
        someone in between leaves it running (InvalidState from the page-out)."""
        model = self.get(name)
        if model.state == State.RUNNING and not (model.agent and self.config.spill_directory):
            self._check_swap(model, model.vram_bytes)
        await self.freeze(name, by=by)
        return await self.page_out(name)

    def _check_swap(self, model: Model, need: int) -> None:
        """Refuse (nothing moved) where the host has no swap, or less free than `need` bytes."""
        total, free = self._swap_space()
        if total <= 0:
            self._refuse(
                model,
                NotSupported(
                    f"paging {model.name} out needs swap, and this host has none (a swap file: docs/disk-tier.md)"
                ),
            )
        if need > free:
            self._refuse(
                model,
                InsufficientSwap(
                    f"paging {model.name} out would write about {need} bytes to swap; {free} of {total} are free."
                    " Nothing was moved."
                ),
            )

    async def _page_out_locked(self, model: Model, reason: str = "", why: str = "") -> None:
        """Under the model's lock, the model frozen: its agents' parked bytes written to spill files (where it has
        agents and SpillDirectory= is set; no swap needed for them), then every process of it advised
        MADV_PAGEOUT (in a worker thread: the kernel writes for seconds), what went to swap read back from VmSwap.
        The processes that hold the snapshot count; the others (a launcher, a tokenizer worker) are paged out too,
        since they are frozen. Without swap, what the spill files took is all that moves."""
        spillable = sum(link.parked_bytes for link in self._spill_links(model))
        has_swap = self._swap_space()[0] > 0
        if not spillable or has_swap:
            self._check_swap(model, model.snapshot_in_ram() - spillable)
        t0 = time.monotonic()
        before = model.snapshot_on_disk()
        try:
            spilled = await self._spill(model) if spillable else 0
            pids = list(model.pids) if has_swap else []
            if not pids and not spilled:
                raise NotSupported(
                    f"the agents of {model.name} could not write their parked bytes to {self.config.spill_directory}"
                    " (the journal says why), and this host has no swap for them. The model stays frozen."
                )
            skipped = await asyncio.to_thread(self._page_out_all, pids)
        except pageout.PageOutError as e:
            raise NotSupported(
                f"the kernel refused to page {model.name} out ({e}); gpuschedd needs CAP_SYS_NICE for it"
                " (docs/disk-tier.md). The model stays frozen."
            ) from e
        finally:
            if model.state == State.FROZEN:
                # What the agents hold in spill files now, whatever part of the spill went through. Without links
                # (the daemon restarted since the freeze) the saved figure stands: the agents kept their files.
                links = self._parked.get(model.name, [])
                files = sum(link.parked_bytes for link in links if link.spilled) if links else model.spilled_bytes
                moved, model.spilled_bytes = files != model.spilled_bytes, files
                self._refresh_swapped(model, spilled=moved)
        duration = int((time.monotonic() - t0) * 1e6)
        self._emit(events.paged_out(model, model.snapshot_on_disk() - before, duration, skipped, reason, why))

    def _refresh_swapped(self, model: Model, spilled: bool = False) -> None:
        """A frozen model's snapshot bytes in swap, read again from its processes' VmSwap; saved and announced when
        they moved, or when `spilled` (its bytes in spill files moved)."""
        swapped = sum(self._swapped(pid) for pid in model.cuda_pids)
        if swapped != model.swapped_bytes or spilled:
            model.swapped_bytes = swapped
            self._persist()
            for listener in self._listeners:
                listener.model_changed(model)

    def _page_out_all(self, pids: list[int]) -> int:
        """Page out each process; the ranges the kernel would not take, counted."""
        skipped = 0
        for pid in pids:
            done = self._kernel_page_out(pid)
            skipped += len(done.skipped)
            if done.skipped:
                log.info("page-out of pid %d: %d range(s) left in RAM: %s", pid, len(done.skipped), done.skipped[:3])
        return skipped

    def _check_swap_in(self, model: Model) -> None:
        """Refuse a thaw (the model stays frozen, on disk) whose snapshot could not come back into RAM: more on disk
        than the kernel has available, counting the free swap it could move other pages to. Short of that, the
        kernel's OOM killer would choose a process to end during the restore. Spill files are read straight onto
        the GPU through the agents' bounce buffers: they need no room."""
        on_disk = model.snapshot_in_swap()
        if not on_disk:
            return
        room = self.mem_available() + self._paged_out_cache() + self._swap_space()[1]
        if on_disk > room:
            self._refuse(
                model,
                RamBudgetExceeded(
                    f"thawing {model.name} reads {on_disk} bytes back from swap; the host has {room} available"
                    " (MemAvailable and free swap). The model stays frozen."
                ),
            )

    async def _prefetch(self, model: Model) -> None:
        """During a thaw of a model with pages in swap, beside the restore: have the kernel read them back
        (MADV_WILLNEED issues the reads of every page at once, instead of the restore faulting them in a few at a
        time; measured 1 GiB in 0.9-1.2 s instead of 5.5-7.3 s on a virtio disk). A failure only costs the head
        start."""
        pids = list(model.cuda_pids)
        if not model.snapshot_in_swap():
            return
        try:
            await asyncio.to_thread(lambda: [self._kernel_prefetch(pid) for pid in pids])
        except (pageout.PageOutError, OSError) as e:
            log.warning("read-ahead of %s: %s", model.name, e)
