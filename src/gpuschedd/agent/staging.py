"""Copy device memory into ordinary host memory and back, at PCIe speed, without leaving large page-locked
regions registered while the driver checkpoints the process (pinned memory makes the driver's checkpoint and
restore slow, and pinning gigabytes takes seconds).

Modes (bench/staging.py measures them; docs/fast-path.md has the figures):
- ``ring``: each worker thread owns one small pinned bounce buffer (registered only for the copy); the DMA
  fills it, and the worker copies it into the ordinary destination with memmove (no GIL, so workers overlap).
- ``pin``: each worker page-locks its own piece of the destination just for that piece's copy.
- ``pageable``: the driver copies straight into the ordinary destination (it bounces through its own buffers).
- ``register``: the destination is page-locked for the copy and unlocked afterwards.

The host side is one anonymous mapping with transparent huge pages asked for: fewer page faults and TLB
misses. Once copied back it is given back lazily (MADV_FREE): the kernel takes its pages whenever it wants memory,
and until then the next park writes into them without faulting in fresh zeroed pages, which bounds the copy out
(docs/fast-path.md)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .cuda import Cuda

MODES = ("ring", "pin", "pageable", "register")
DEFAULT_MODE = "ring"
DEFAULT_THREADS = min(16, max(2, len(os.sched_getaffinity(0))))  # the copy is CPU-bound (memmove)
DEFAULT_CHUNK = 4 << 20  # small pieces keep the workers' DMA and memmove overlapping (measured: docs/fast-path.md)
# Copying back from a spill file: a disk reads best in large pieces, a few at a time (bench/disk_tier/io.py: 16 x 4 MiB
# read 1.04 GB/s on the H200 VM's disk, 4-8 x 32-64 MiB 1.46-1.52)
FILE_THREADS, FILE_CHUNK = 4, 32 << 20


@dataclass(frozen=True)
class Piece:
    """`size` bytes at device address `device` ↔ host area offset `offset`."""

    device: int
    offset: int
    size: int


class HostArea:
    """Anonymous host memory for parked bytes, THP-advised."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.capacity = max(size, mmap.PAGESIZE)
        self._map = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    @classmethod
    def reusing(cls, spare: HostArea | None, size: int) -> HostArea:
        """An area of `size` bytes: `spare` (lazily given back) if it is large enough, else a fresh one."""
        if spare is not None and spare.capacity >= size:
            spare.size = size
            return spare
        if spare is not None:
            spare.close()
        return cls(size)

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self._map)[offset : offset + size]

    def give_back_lazily(self) -> bool:
        """Let the kernel take the pages when it wants memory (MADV_FREE); until then they stay for reuse. False:
        the kernel refused the advice, and the memory was given back at once (closed)."""
        try:
            self._map.madvise(mmap.MADV_FREE)
        except OSError:
            self.close()
            return False
        return True

    def close(self) -> None:
        """Give the memory back; the caller holds no views any more."""
        self._map.close()


def coalesce(pieces: list[Piece], chunk: int) -> list[Piece]:
    """Pieces that follow each other on the device and in the host area, joined up to `chunk` bytes."""
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if (
            last
            and (last.device + last.size, last.offset + last.size) == (p.device, p.offset)
            and last.size + p.size <= chunk
        ):
            out[-1] = Piece(last.device, last.offset, last.size + p.size)
        else:
            out.append(p)
    return out


def split(segments: Iterable[tuple[int, int]], chunk: int, offset: int = 0) -> list[Piece]:
    """(device address, size) segments → pieces of at most `chunk` bytes, laid out back to back on the host
    from `offset`."""
    pieces = []
    for device, size in segments:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            pieces.append(Piece(device + done, offset + done, n))
            done += n
        offset += size
    return pieces


class Copier:
    """Moves pieces between the GPU and a HostArea with `threads` workers, each with its own stream."""

    def __init__(
        self, cuda: Cuda, context: int, mode: str = DEFAULT_MODE, threads: int = DEFAULT_THREADS,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"staging mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.cuda, self.context, self.mode, self.threads, self.chunk = cuda, context, mode, threads, chunk

    def out(self, pieces: list[Piece], area: HostArea) -> None:
        self._run(pieces, area, to_host=True)

    def back(self, pieces: list[Piece], area: HostArea) -> None:
        self._run(pieces, area, to_host=False)

    def back_from_file(self, pieces: list[Piece], file: int, ahead: HostArea | None = None) -> None:
        """Copy back from `file` (the bytes laid out as in the host area), read straight into the bounce buffers in
        large pieces (FILE_THREADS x FILE_CHUNK, whatever this copier's own sizes): no host area is needed. The
        pieces within `ahead` (the file's first bytes, read ahead: ReadAhead) come from there instead."""
        reader = Copier(self.cuda, self.context, "ring", FILE_THREADS, FILE_CHUNK)
        reader._run(coalesce(pieces, FILE_CHUNK), ahead, to_host=False, file=file)

    def _run(self, pieces: list[Piece], area: HostArea | None, to_host: bool, file: int = -1) -> None:
        if not pieces:
            return
        assert area is not None or file >= 0
        if self.mode == "register":
            assert area is not None
            self.cuda.host_register(area.address, area.size)
        try:
            shares = [pieces[i :: self.threads] for i in range(min(self.threads, len(pieces)))]
            with ThreadPoolExecutor(len(shares), thread_name_prefix="gpusched-stage") as pool:
                for future in [pool.submit(self._worker, share, area, to_host, file) for share in shares]:
                    future.result()
        finally:
            if self.mode == "register":
                assert area is not None
                self.cuda.host_unregister(area.address)

    def _worker(self, share: list[Piece], area: HostArea | None, to_host: bool, file: int) -> None:
        cuda = self.cuda
        cuda.set_context(self.context)
        stream = cuda.stream()
        try:
            if self.mode == "pin":
                for p in share:
                    host = area.address + p.offset
                    cuda.host_register(host, p.size)
                    try:
                        (cuda.copy_out if to_host else cuda.copy_in)(*self._direct(p, area, to_host), stream)
                        cuda.stream_sync(stream)
                    finally:
                        cuda.host_unregister(host)
                return
            if self.mode != "ring":
                for p in share:
                    (cuda.copy_out if to_host else cuda.copy_in)(*self._direct(p, area, to_host), stream)
                cuda.stream_sync(stream)
                return
            with _Bounce(cuda, max(p.size for p in share)) as bounce:
                for p in share:
                    if to_host:
                        cuda.copy_out(bounce.address, p.device, p.size, stream)
                        cuda.stream_sync(stream)
                        ctypes.memmove(area.address + p.offset, bounce.address, p.size)
                    else:
                        if file >= 0 and (area is None or p.offset + p.size > area.size):
                            with bounce.area.view(0, p.size) as view:
                                read_whole(file, view, p.offset)
                        else:
                            assert area is not None
                            ctypes.memmove(bounce.address, area.address + p.offset, p.size)
                        cuda.copy_in(p.device, bounce.address, p.size, stream)
                        cuda.stream_sync(stream)
        finally:
            cuda.stream_destroy(stream)

    @staticmethod
    def _direct(p: Piece, area: HostArea | None, to_host: bool) -> tuple[int, int, int]:
        assert area is not None
        host = area.address + p.offset
        return (host, p.device, p.size) if to_host else (p.device, host, p.size)


class ReadAhead:
    """The first `size` bytes of a spill file read into host memory, FILE_THREADS pieces of FILE_CHUNK at a time, on
    threads of their own: the daemon asks for it as a thaw begins, so the disk works while the driver restores the
    process's contexts (the reads need no CUDA), and the unpark then takes those bytes from here."""

    def __init__(self, file: int, size: int) -> None:
        self.area = HostArea(size)
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._read, args=(file,), name="gpusched-read-ahead", daemon=True)
        self._thread.start()

    def _read(self, file: int) -> None:
        def piece(offset: int) -> None:
            with self.area.view(offset, min(FILE_CHUNK, self.area.size - offset)) as view:
                read_whole(file, view, offset)

        try:
            with ThreadPoolExecutor(FILE_THREADS, thread_name_prefix="gpusched-read-ahead") as pool:
                list(pool.map(piece, range(0, self.area.size, FILE_CHUNK)))
        except Exception as e:  # whatever it was, the unpark reads these bytes from the file instead
            self.error = e

    def done(self) -> HostArea | None:
        """Wait for the reads: the area holding them, or None where they failed (the unpark reads the file)."""
        self._thread.join()
        return None if self.error else self.area

    def close(self) -> None:
        self._thread.join()
        self.area.close()


def read_whole(file: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `file` at `offset`. Direct I/O (the daemon opens its spill files so) while the piece's
    alignment allows; a refusal (EINVAL) turns it off for the file and reads through the page cache. OSError
    (ENODATA where the file ends early)."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(file, [view[done:]], offset + done)
        except OSError as e:
            flags = fcntl.fcntl(file, fcntl.F_GETFL)
            if e.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            fcntl.fcntl(file, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            continue
        if n == 0:
            raise OSError(errno.ENODATA, "the file ends before the parked bytes do")
        done += n


class _Bounce:
    """A page-locked bounce buffer that is registered only while it is in use."""

    def __init__(self, cuda: Cuda, size: int) -> None:
        self.cuda, self.area = cuda, HostArea(size)
        self.address = self.area.address

    def __enter__(self) -> _Bounce:
        ctypes.memset(self.address, 0, self.area.size)  # fault it in before pinning
        self.cuda.host_register(self.address, self.area.size)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.host_unregister(self.address)
        self.area.close()


def timed(fn: Callable[[], None]) -> float:
    """Seconds `fn` took (for the agent's reports and the staging benchmark)."""
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0
