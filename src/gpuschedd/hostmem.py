"""Host memory facts: MemAvailable, a process's RSS and swapped bytes, swap, and the transparent-huge-page mode.

A checkpointed CUDA process keeps its VRAM snapshot in its own anonymous memory, so frozen models cost host
RAM; the kernel's MemAvailable is the hard limit. THP `always` measured 1.3-1.8x faster checkpoints (the
snapshot is one large anonymous mapping), so the mode is reported beside the timings. The same memory can be paged
out to swap (pageout.py, docs/disk-tier.md): where swap is, and how much of a process went there."""

from __future__ import annotations

import psutil

THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
ZSWAP_PATH = "/sys/module/zswap/parameters/enabled"


def mem_available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (MemAvailable; 0 if unreadable: refuse, not
    guess)."""
    try:
        return psutil.virtual_memory().available
    except OSError:
        return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def swap_bytes() -> tuple[int, int]:
    """The host's swap: (SwapTotal, SwapFree) in bytes; (0, 0) where there is none or it cannot be read."""
    try:
        swap = psutil.swap_memory()
    except OSError:
        return 0, 0
    return swap.total, swap.free


def swap_cached_bytes() -> int:
    """SwapCached of /proc/meminfo: pages that are in swap and still in RAM as a clean copy (0 if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapCached:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def swapped_bytes(pid: int) -> int:
    """A process's memory that is in swap now (VmSwap of /proc/PID/status; psutil reads it only by walking the
    whole smaps); 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmSwap:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def zswap_enabled(path: str = ZSWAP_PATH) -> bool:
    """Whether zswap is on: then pages paged out are compressed into RAM first and reach the disk only when its
    pool is full, so they still take (less) host RAM."""
    try:
        with open(path) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def thp_mode(path: str = THP_PATH) -> str:
    """always, madvise or never (the bracketed choice), or "" where the kernel has no THP."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""
