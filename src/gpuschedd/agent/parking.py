"""Parkable device memory: every segment is its own reserved address range with physical memory mapped into
it. Parking copies each segment's bytes to host memory, then unmaps and releases the physical memory while the
address range stays reserved; unparking maps fresh physical memory at the same addresses and copies the bytes
back. Pointers held anywhere (tensors, CUDA graphs, caches) stay valid across a park.

Framework-neutral: torch_pool.py feeds malloc/free from PyTorch's allocator; tests drive it directly."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from .cuda import Cuda, CudaError
from .staging import DEFAULT_CHUNK, DEFAULT_MODE, DEFAULT_THREADS, Copier, HostArea, Piece, ReadAhead, split, timed

log = logging.getLogger(__name__)


@dataclass
class Segment:
    address: int  # start of the reserved range, handed to the allocator's caller
    size: int  # rounded up to the device's allocation granularity
    device: int
    context: int  # the CUDA context current at malloc: copies run in it
    handle: int = 0  # the physical allocation while mapped; 0 while parked


@dataclass
class ParkReport:
    parked_bytes: int = 0
    segments: int = 0
    copy_s: float = 0.0
    total_s: float = 0.0
    mode: str = DEFAULT_MODE
    host_address: int = 0  # where the parked bytes lie (a park's), 0 when there are none
    errors: list[str] = field(default_factory=list)


class ParkError(Exception):
    """A park or unpark could not complete; the message says where the memory is."""


class ParkingLot:
    """The segments of one process. malloc/free may come from any thread; park/unpark are serialized with them."""

    def __init__(
        self, cuda: Cuda, mode: str = DEFAULT_MODE, threads: int = DEFAULT_THREADS, chunk: int = DEFAULT_CHUNK
    ) -> None:
        self.cuda, self.mode, self.threads, self.chunk = cuda, mode, threads, chunk
        self.segments: dict[int, Segment] = {}
        self.area: HostArea | None = None  # the parked bytes, while parked
        self._spare: HostArea | None = None  # the last unpark's area, given back lazily, for the next park
        # The daemon's file holding the parked bytes once it wrote them there (spill()): read back by the unpark
        self._spill_file, self._spilled = -1, 0
        self._ahead: ReadAhead | None = None  # the spill file's first bytes, read ahead for the unpark (read_ahead())
        self._plans: list[tuple[int, list[Segment], list[Piece]]] = []
        self._lock = threading.Lock()

    @property
    def parked(self) -> bool:
        return self.area is not None or self._spill_file >= 0

    def managed_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self.segments.values())

    # ---------------------------------------------------------------- the allocator's side

    def malloc(self, size: int, device: int) -> int:
        """A new segment of at least `size` bytes; raises CudaError (out of memory, ...) with nothing left behind."""
        cuda = self.cuda
        g = cuda.granularity(device)
        rounded = max(g, -(-size // g) * g)
        with self._lock:
            if self.parked:
                raise ParkError("allocation while the process's memory is parked")
            context = cuda.current_context()
            address = cuda.reserve(rounded, g)
            handle = 0
            try:
                handle = cuda.create(rounded, device)
                cuda.map(address, rounded, handle, device)
            except CudaError:
                if handle:
                    cuda.release(handle)
                cuda.address_free(address, rounded)
                raise
            self.segments[address] = Segment(address, rounded, device, context, handle)
        return address

    def free(self, address: int) -> None:
        with self._lock:
            seg = self.segments.pop(address, None)
            if seg is None:
                log.error("free of %#x, which this allocator did not hand out", address)
                return
            if seg.handle:
                self.cuda.unmap(seg.address, seg.size)
                self.cuda.release(seg.handle)
            self.cuda.address_free(seg.address, seg.size)

    # ---------------------------------------------------------------- park and unpark

    def _plan(self) -> list[tuple[int, list[Segment], list[Piece]]]:
        """Per CUDA context: its segments and their pieces, laid out back to back in one host area."""
        groups: dict[int, list[Segment]] = {}
        for seg in sorted(self.segments.values(), key=lambda s: s.address):
            groups.setdefault(seg.context, []).append(seg)
        plans, offset = [], 0
        for context, segs in groups.items():
            plans.append((context, segs, split([(s.address, s.size) for s in segs], self.chunk, offset)))
            offset += sum(s.size for s in segs)
        return plans

    def _copy(self, context: int, pieces: list[Piece], to_host: bool) -> float:
        copier = Copier(self.cuda, context, self.mode, self.threads, self.chunk)
        if self._spill_file >= 0:
            ahead = self._ahead.done() if self._ahead else None
            return timed(lambda: copier.back_from_file(pieces, self._spill_file, ahead))
        assert self.area is not None
        return timed(lambda: (copier.out if to_host else copier.back)(pieces, self.area))  # type: ignore[arg-type]

    def park(self) -> ParkReport:
        """Copy every segment out, then give its physical memory back. A failure while copying changes nothing;
        a failure while releasing maps back what was released, so a failed park leaves everything in place."""
        t0 = time.monotonic()
        report = ParkReport(mode=self.mode)
        with self._lock:
            if self.parked:
                raise ParkError("already parked")
            plans = self._plan()
            self.area = HostArea.reusing(self._spare, sum(s.size for s in self.segments.values()))
            self._spare = None
            try:
                for context, _segs, pieces in plans:
                    self.cuda.set_context(context)
                    self.cuda.synchronize()  # work queued on any stream must finish before its memory is copied
                    report.copy_s += self._copy(context, pieces, to_host=True)
            except CudaError as e:
                self.area.close()
                self.area = None
                raise ParkError(f"copying out failed ({e}); nothing was released") from e
            self._plans = plans
            released: list[Segment] = []
            try:
                for seg in (s for _c, segs, _p in plans for s in segs):
                    self.cuda.unmap(seg.address, seg.size)
                    self.cuda.release(seg.handle)
                    seg.handle = 0
                    released.append(seg)
            except CudaError as e:
                self._unpark_locked(only=released)
                raise ParkError(f"releasing GPU memory failed ({e}); what was released is mapped back") from e
            report.parked_bytes, report.segments = self.area.size, len(self.segments)
            report.host_address = self.area.address if self.area.size else 0
        report.total_s = time.monotonic() - t0
        return report

    def spill(self, file: int) -> ParkReport:
        """The daemon wrote the parked bytes to `file` (read-only; offset 0, laid out as in the host area): give
        the host area back; the unpark reads them from the file, which it closes then. ParkError changes nothing
        (the caller keeps `file`)."""
        t0 = time.monotonic()
        with self._lock:
            if self._spill_file >= 0:
                raise ParkError("already spilled")
            if self.area is None:
                raise ParkError("not parked")
            if not self.area.size:
                raise ParkError("nothing parked to spill")
            try:
                st, flags = os.fstat(file), fcntl.fcntl(file, fcntl.F_GETFL)
            except OSError as e:
                raise ParkError(f"the file passed is unusable ({e.strerror})") from e
            if not stat.S_ISREG(st.st_mode) or st.st_size < self.area.size or flags & os.O_ACCMODE == os.O_WRONLY:
                raise ParkError(
                    f"the file passed is not a readable file of at least the {self.area.size} parked bytes;"
                    " nothing was given back"
                )
            self._spill_file, self._spilled = file, self.area.size
            self.area.close()
            if self._spare is not None:
                self._spare.close()
            self.area = self._spare = None
        return ParkReport(parked_bytes=self._spilled, total_s=time.monotonic() - t0, mode=self.mode)

    def read_ahead(self, size: int) -> int:
        """Start reading the spill file's first `size` bytes into host memory (at most what was spilled, whole
        pages), for the unpark to take from there; returns how many. Once per spill: asking again answers the
        first call's figure. ParkError: nothing was spilled."""
        with self._lock:
            if self._spill_file < 0:
                raise ParkError("nothing spilled to read ahead")
            if self._ahead is None:
                size = min(size, self._spilled)
                size -= size % mmap.PAGESIZE  # whole pages: direct I/O wants aligned pieces
                if size <= 0:
                    return 0
                self._ahead = ReadAhead(self._spill_file, size)
            return self._ahead.area.size

    def unpark(self) -> ParkReport:
        """Map fresh physical memory at every parked address and copy the bytes back. If the GPU has no room, the
        bytes stay parked (what was mapped stays mapped) and a later unpark finishes the job."""
        with self._lock:
            return self._unpark_locked()

    def _unpark_locked(self, only: list[Segment] | None = None) -> ParkReport:
        t0 = time.monotonic()
        if not self.parked:
            raise ParkError("not parked")
        report = ParkReport(parked_bytes=self.area.size if self.area else self._spilled, mode=self.mode)
        live = [
            (context, [s for s in segs if self.segments.get(s.address) is s and (only is None or s in only)])
            for context, segs, _p in self._plans
        ]
        try:
            for context, segs in live:
                self.cuda.set_context(context)
                for seg in segs:
                    if not seg.handle:
                        handle = self.cuda.create(seg.size, seg.device)
                        try:
                            self.cuda.map(seg.address, seg.size, handle, seg.device)
                        except CudaError:
                            self.cuda.release(handle)
                            raise
                        seg.handle = handle
            for (context, segs), (_c, _s, pieces) in zip(live, self._plans, strict=True):
                wanted = {s.address for s in segs}
                mine = [p for p in pieces if _owner(p, segs) in wanted]
                report.copy_s += self._copy(context, mine, to_host=False)
        except (CudaError, OSError) as e:
            what = "reading the spilled bytes" if isinstance(e, OSError) else "restoring GPU memory"
            raise ParkError(f"{what} failed ({e}); the bytes stay parked: unpark again") from e
        if self._spill_file >= 0:
            # The last descriptor of the daemon's unlinked file: closing it frees its blocks, which took 4-6 s for
            # 20 GB on the H200 VM's ext4 (bench/disk_tier, run 6); not on the unpark's path.
            threading.Thread(target=os.close, args=(self._spill_file,), name="gpusched-spill-close").start()
            self._spill_file, self._spilled = -1, 0
            if self._ahead is not None:
                self._ahead.close()
                self._ahead = None
        else:
            assert self.area is not None
            self._spare = self.area if self.area.give_back_lazily() else None
        self.area, self._plans = None, []
        report.segments = sum(len(segs) for _c, segs in live)
        report.total_s = time.monotonic() - t0
        return report


def _owner(piece: Piece, segs: list[Segment]) -> int:
    """The address of the segment a piece belongs to."""
    for seg in segs:
        if seg.address <= piece.device < seg.address + seg.size:
            return seg.address
    return -1
