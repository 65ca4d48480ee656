"""The disk tier's lane for parked memory: an agent's parked bytes written by the daemon to a file of its own, with
large direct I/O, instead of through swap.

Why: through swap a snapshot leaves RAM at the disk's write speed but comes back at about half its read speed (the
kernel's swap-in reads 4 KiB pages; docs/disk-tier.md has the figures). An agent's parked bytes are one area in its
process, laid out back to back, so they can go to a plain file instead: the daemon reads the area with
process_vm_readv while the process is frozen (it may: CAP_SYS_PTRACE, kept for the checkpoint API) and writes it
with O_DIRECT in large pieces from several threads; it then hands the file to the agent read-only (SCM_RIGHTS,
agentlink.py), which gives its host memory back and, at the thaw, reads the bytes straight into its pinned bounce
buffers and onto the GPU, so a thaw needs no host memory for them.

Why the daemon writes, not the agent: a file the model's process could write would let it fill the daemon's disk;
read-only, the file holds what the daemon wrote, no more. The file is unlinked at once: it is gone when the last
descriptor closes (the agent's, after the unpark, or at the process's end, however it ends); nothing is left
behind by a crash or a restart of either side."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

from .pageout import Iovec, libc

PIECE = 64 << 20  # bytes of one read and one write: large direct I/O is what reaches the disk's bandwidth
THREADS = 4  # pieces in flight: the disk sees a queue, the copy out of the process overlaps the writes
ALIGN = 4096  # direct I/O's alignment of offsets, lengths and buffers (the logical block size, at most a page)
RESERVE = 0.05  # the share of the file system a spill leaves free

libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class SpillError(Exception):
    """The bytes could not be written (no room, the process went away, an I/O error): nothing was given back,
    and the file is closed."""


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def room(directory: str) -> int:
    """Bytes a spill may take in `directory`'s file system: its free space less the reserve."""
    st = os.statvfs(directory)
    return max(0, st.f_bavail * st.f_frsize - int(st.f_blocks * st.f_frsize * RESERVE))


def create(directory: str, size: int) -> int:
    """An unlinked file of `size` bytes allocated in `directory` (made root-only if missing), open for writing with
    direct I/O where the file system has it. SpillError when there is no room."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if _round_up(size) > room(directory):
        raise SpillError(f"{directory} has {room(directory)} bytes to spare, not {size}")
    fd, path = tempfile.mkstemp(prefix="spill-", dir=directory)
    os.unlink(path)
    try:
        with contextlib.suppress(OSError):  # EINVAL: no direct I/O here; the writes then go through the page cache
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        os.posix_fallocate(fd, 0, _round_up(size))
    except OSError as e:
        os.close(fd)
        raise SpillError(f"allocating {size} bytes in {directory}: {e.strerror}") from e
    return fd


def write(fd: int, pid: int, address: int, size: int, threads: int = THREADS) -> None:
    """`size` bytes at `address` in process `pid` into the file from offset 0. Written whole and on the disk when
    this returns (the page cache dropped where direct I/O was refused); SpillError otherwise."""
    offsets = range(0, size, PIECE)
    buffers = [mmap.mmap(-1, PIECE) for _ in range(min(threads, len(offsets)) or 1)]
    free = list(buffers)

    def one(offset: int) -> None:
        buf = free.pop()
        try:
            n = min(PIECE, size - offset)
            _read_process(pid, address + offset, buf, n)
            with memoryview(buf)[: _round_up(n)] as view:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
        finally:
            free.append(buf)

    try:
        with ThreadPoolExecutor(len(buffers), thread_name_prefix="gpusched-spill") as pool:
            for future in [pool.submit(one, offset) for offset in offsets]:
                future.result()
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise SpillError(f"writing {size} bytes of pid {pid}: {e.strerror or e}") from e
    finally:
        for buf in buffers:
            buf.close()


def _read_process(pid: int, address: int, buf: mmap.mmap, n: int) -> None:
    """`n` bytes at `address` of process `pid` into `buf`, whole (OSError: ESRCH when it is gone, EFAULT when the
    range is not mapped there)."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    done = 0
    while done < n:
        local, remote = Iovec(base + done, n - done), Iovec(address + done, n - done)
        got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got == 0:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        done += got


def read_only(fd: int) -> int:
    """A read-only descriptor of the same (unlinked) file, with direct I/O where the file system has it: what the
    agent gets."""
    path = f"/proc/self/fd/{fd}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def spill_area(directory: str, pid: int, address: int, size: int) -> int:
    """The area written to a new file in `directory`; a read-only descriptor of it, the caller's to pass and close.
    SpillError (nothing left behind) otherwise."""
    fd = create(directory, size)
    try:
        write(fd, pid, address, size)
        return read_only(fd)
    except OSError as e:
        raise SpillError(f"reopening the spill file: {e.strerror}") from e
    finally:
        os.close(fd)
