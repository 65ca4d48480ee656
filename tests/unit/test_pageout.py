"""gpuschedd.pageout: the kernel's limits kept (iovec count, bytes per call), a call the kernel cuts short or refuses
part of resumed past the refused range, a refusal of the whole process raised; and the real syscall on a real child
process (the kernel advises its anonymous memory whether or not there is swap to move it to)."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

import pytest

from gpuschedd import pageout
from gpuschedd.pageout import MADV_PAGEOUT, PIECE, UIO_MAXIOV, PageOutError


def test_pieces_and_batches_stay_within_the_kernels_limits() -> None:
    ranges = [(0x10000000, 3 * PIECE + 4096), *[(0x900000000 + i * 0x10000, 4096) for i in range(3000)]]
    cut = pageout.pieces(ranges)
    assert max(length for _start, length in cut) <= PIECE
    assert sum(length for _start, length in cut) == sum(length for _start, length in ranges)
    calls = pageout.batches(cut)
    assert all(len(call) <= UIO_MAXIOV and sum(n for _s, n in call) <= PIECE for call in calls)
    assert [r for call in calls for r in call] == cut, "every piece once, in order"


class FakeSyscall:
    """process_madvise as the kernel answers it: bytes advised up to the first range it refuses (`refuse`: start →
    errno), that errno when it refuses the first; `whole`: an errno for the whole process, on the first call;
    `interrupt`: answer EINTR once."""

    def __init__(self, refuse: dict[int, int] | None = None, whole: int = 0, interrupt: bool = False) -> None:
        self.refuse, self.whole, self.interrupt = refuse or {}, whole, interrupt
        self.advised: list[tuple[int, int]] = []

    def __call__(self, pidfd: int, ranges: list[tuple[int, int]], advice: int) -> int:
        assert advice == MADV_PAGEOUT and len(ranges) <= UIO_MAXIOV
        if self.whole:
            return -self.whole
        if self.interrupt:
            self.interrupt = False
            return -errno.EINTR
        done = 0
        for start, length in ranges:
            if start in self.refuse:
                return done or -self.refuse[start]
            self.advised.append((start, length))
            done += length
        return done


@pytest.fixture
def child() -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """A live process with private anonymous memory (64 MiB touched), and its anonymous ranges."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(w)
        buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, len(buf), 4096):
            buf[off] = 1
        os.write(ready_w, b"x")
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)
        yield pid, pageout.anonymous_ranges(pid)
    finally:
        os.close(w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def test_a_refused_range_is_skipped_and_the_rest_advised(child: tuple[int, list[tuple[int, int]]]) -> None:
    pid, ranges = child
    wanted = pageout.pieces(ranges)
    refused = wanted[len(wanted) // 2]
    fake = FakeSyscall(refuse={refused[0]: errno.EINVAL}, interrupt=True)
    done = pageout.page_out(pid, fake, threads=1)
    assert fake.advised == [r for r in wanted if r != refused]
    assert done.bytes == sum(n for _s, n in fake.advised)
    assert done.skipped == [(*refused, 0)], "cut short after the ranges before it: they count as advised"
    first = FakeSyscall(refuse={wanted[0][0]: errno.ENOMEM})
    assert pageout.page_out(pid, first, threads=1).skipped == [(*wanted[0], errno.ENOMEM)]
    assert first.advised == wanted[1:]
    # From several threads at once: the same ranges, each once.
    many = FakeSyscall(refuse={refused[0]: errno.EINVAL})
    assert [skip[:2] for skip in pageout.page_out(pid, many, threads=4).skipped] == [refused]
    assert sorted(many.advised) == sorted(r for r in wanted if r != refused)


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_a_refusal_of_the_whole_process_is_an_error(child: tuple[int, list[tuple[int, int]]], err: int) -> None:
    pid, _ranges = child
    with pytest.raises(PageOutError) as raised:
        pageout.page_out(pid, FakeSyscall(whole=err))
    assert raised.value.errno == err


def test_a_process_gone_meanwhile_is_said_not_raised(child: tuple[int, list[tuple[int, int]]]) -> None:
    pid, _ranges = child
    assert pageout.page_out(pid, FakeSyscall(whole=errno.ESRCH)).gone
    assert pageout.page_out(2**22 + 12345).gone, "no such process"


def test_only_private_anonymous_memory_is_chosen(child: tuple[int, list[tuple[int, int]]]) -> None:
    pid, ranges = child
    with open(f"/proc/{pid}/maps") as f:
        maps = {int(line.split("-")[0], 16): line for line in f}
    for start, _length in ranges:
        fields = maps[start].split()
        assert fields[1][3] == "p" and fields[4] == "0", maps[start]


@pytest.mark.skipif(os.geteuid() != 0, reason="process_madvise on another process needs CAP_SYS_NICE")
def test_the_real_syscall_advises_every_anonymous_range(child: tuple[int, list[tuple[int, int]]]) -> None:
    """Without swap the kernel moves nothing, but it takes the advice for every byte: the ctypes call, its iovecs
    and its answer are right. The page-out itself, with swap, is tested in tests/system/test_disk_tier.py."""
    pid, ranges = child
    done = pageout.page_out(pid)
    assert (done.bytes, done.skipped, done.gone) == (sum(n for _s, n in ranges), [], False)
    assert pageout.prefetch(pid).bytes == done.bytes
