"""Page a frozen process's anonymous memory out to swap, and read it back ahead of a thaw.

Why: a frozen model's snapshot is private anonymous memory in its own processes (the driver's checkpoint copy, the
agent's parked memory), so the kernel can move it to swap like any other anonymous memory, without CRIU and
without a memory cgroup. `process_madvise(pidfd, iovecs, MADV_PAGEOUT)` does it for another process (measured on
an H200, driver 580: 8.9 GiB in 3.96 s; the restore then ran straight from swap). A frozen cgroup's processes stay
madvise-able: the advice acts on their memory, not through them. `MADV_WILLNEED` over the same ranges starts
reading the swapped pages back into the swap cache, without waiting, so a restore that follows finds them there.

Why ctypes: Python has os.pidfd_open but no process_madvise (glibc has a wrapper only since 2.36; Debian 12 has
it, but the call is one syscall whose number is the same on every architecture: 440), so it is one `syscall()`.

The kernel's limits this follows: at most UIO_MAXIOV (1024) iovecs a call; one call advises at most MAX_RW_COUNT
(just under 2 GiB), so ranges are cut into pieces of at most 1 GiB and a call carries at most 1 GiB. Several calls
may run at once, from threads (the kernel takes the process's mmap lock for reading only). A call stops
at the first range it cannot advise (a range unmapped meanwhile: ENOMEM; an mlocked or device mapping: EINVAL)
and returns the bytes advised before it; that range is skipped and the rest advised. The caller needs
CAP_SYS_NICE (and ptrace read access) over the target: EPERM otherwise.

Only private anonymous mappings are advised (no file behind them: the heap, the stack, anonymous mmaps): file
pages are dropped, not swapped, by reclaim anyway, and device mappings (/dev/nvidia*) refuse the advice."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

SYS_PROCESS_MADVISE = 440  # the same on every architecture (asm-generic numbering, since 5.10)
MADV_WILLNEED = 3
MADV_PAGEOUT = 21
UIO_MAXIOV = 1024
PIECE = 1 << 30  # bytes of one iovec, and of one call in all (the kernel's limit is 2 GiB)
# Calls at once. Eight on the GPU machine paged out 3-4x slower than one, and scattered the snapshot over the swap
# file so its read-back ran at random (docs/disk-tier.md, run 2; bench/disk_tier/run.py measures it with @N).
THREADS = 1
RETRIES = 8  # calls answered EINTR or EAGAIN, tried again, per process


class PageOutError(Exception):
    """The kernel refused the advice for the whole process (no permission, no such call): nothing was moved by
    this call. `errno` says which."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class Advised:
    """What one pass over a process did: bytes the kernel took advice for (not bytes moved: VmSwap says that),
    ranges it refused (start, length, errno), and whether the process went away meanwhile."""

    bytes: int = 0
    calls: int = 0
    skipped: list[tuple[int, int, int]] = field(default_factory=list)
    gone: bool = False


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _process_madvise(pidfd: int, ranges: list[tuple[int, int]], advice: int) -> int:
    """One process_madvise call: bytes advised, or -errno."""
    iov = (Iovec * len(ranges))(*[Iovec(start, length) for start, length in ranges])
    ret = libc.syscall(
        ctypes.c_long(SYS_PROCESS_MADVISE),
        ctypes.c_int(pidfd),
        iov,
        ctypes.c_size_t(len(ranges)),
        ctypes.c_int(advice),
        ctypes.c_uint(0),
    )
    return int(ret) if ret >= 0 else -ctypes.get_errno()


# The syscall, replaceable by tests (a fake that moves part of a call, or fails, as the kernel can).
Syscall = Callable[[int, list[tuple[int, int]], int], int]


def anonymous_ranges(pid: int) -> list[tuple[int, int]]:
    """The process's private anonymous mappings that hold or may hold pages (readable or writable), from
    /proc/PID/maps: (start, length). Empty when the process is gone."""
    ranges = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                perms, inode = fields[1], fields[4]
                path = fields[5].strip() if len(fields) > 5 else ""
                if perms[3] != "p" or perms[:2] == "--" or inode != "0":
                    continue
                if path and path not in ("[heap]", "[stack]") and not path.startswith("[anon:"):
                    continue  # [vdso], [vvar], memfd and other shared or special mappings
                low, high = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((low, high - low))
    except (FileNotFoundError, ProcessLookupError):
        return []
    return ranges


def pieces(ranges: Iterable[tuple[int, int]], piece: int = PIECE) -> list[tuple[int, int]]:
    """Ranges cut so none is longer than `piece` bytes."""
    out = []
    for start, length in ranges:
        for off in range(0, length, piece):
            out.append((start + off, min(piece, length - off)))
    return out


def batches(ranges: list[tuple[int, int]], most: int = PIECE, count: int = UIO_MAXIOV) -> list[list[tuple[int, int]]]:
    """Consecutive groups of pieces, each at most `count` long and `most` bytes in all (one call each)."""
    out: list[list[tuple[int, int]]] = []
    size = 0
    for r in ranges:
        if not out or len(out[-1]) >= count or size + r[1] > most:
            out.append([])
            size = 0
        out[-1].append(r)
        size += r[1]
    return out


def advise(pid: int, advice: int, syscall: Syscall = _process_madvise, threads: int = THREADS) -> Advised:
    """Give `advice` for every private anonymous range of `pid`, in calls within the kernel's limits, from `threads`
    threads at once; a range the kernel refuses is skipped. PageOutError when it refuses the process (EPERM,
    ENOSYS, EBADF)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return Advised(gone=True)
    except OSError as e:  # ENOSYS: a kernel before 5.3
        raise PageOutError(f"pidfd_open of pid {pid}: {e.strerror}", e.errno or 0) from e
    try:
        todo = batches(pieces(anonymous_ranges(pid)))
        with ThreadPoolExecutor(max(1, min(threads, len(todo))), thread_name_prefix="gpusched-pageout") as pool:
            parts = list(pool.map(lambda batch: _advise_batch(pid, pidfd, batch, advice, syscall), todo))
    finally:
        os.close(pidfd)
    done = Advised(gone=any(part.gone for part in parts))
    for part in parts:
        done.bytes += part.bytes
        done.calls += part.calls
        done.skipped += part.skipped
    return done


def _advise_batch(pid: int, pidfd: int, batch: list[tuple[int, int]], advice: int, syscall: Syscall) -> Advised:
    """One call's worth of ranges, to the end: a call cut short at a range the kernel refuses goes on after it."""
    done, retries, todo = Advised(), 0, [batch]
    while todo:
        batch = todo.pop()
        ret = syscall(pidfd, batch, advice)
        done.calls += 1
        if ret in (-errno.EINTR, -errno.EAGAIN) and retries < RETRIES:
            retries += 1
            todo.append(batch)
            continue
        if ret == -errno.ESRCH:
            done.gone = True
            return done
        if ret in (-errno.EPERM, -errno.ENOSYS, -errno.EBADF):  # about the caller or the process, not a range
            raise PageOutError(f"process_madvise on pid {pid}: {os.strerror(-ret)}", -ret)
        advised = max(ret, 0)
        done.bytes += advised
        if advised >= sum(length for _start, length in batch):
            continue
        # The call stopped at a range it refused: the ones before it were advised whole.
        for i, (start, length) in enumerate(batch):
            if advised < length:
                done.skipped.append((start, length, -ret if ret < 0 else 0))
                if batch[i + 1 :]:
                    todo.append(batch[i + 1 :])
                break
            advised -= length
    return done


def page_out(pid: int, syscall: Syscall = _process_madvise, threads: int = THREADS) -> Advised:
    """MADV_PAGEOUT over the process's anonymous memory: the kernel unmaps its pages and writes them to swap now
    (or to zswap, where it is on); the written copies stay in RAM as clean swap cache, dropped without I/O as soon
    as memory is wanted. Pages shared with another process are left."""
    return advise(pid, MADV_PAGEOUT, syscall, threads)


def prefetch(pid: int, syscall: Syscall = _process_madvise, threads: int = THREADS) -> Advised:
    """MADV_WILLNEED: start reading the process's swapped pages back, without waiting for them."""
    return advise(pid, MADV_WILLNEED, syscall, threads)
