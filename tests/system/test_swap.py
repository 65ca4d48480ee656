"""Swap through the installed daemon on the fake GPU (issue 17, overlapped swaps): the thaw runs while the freeze's
copy is held (FakeGpuDir.hold: memory held as the real driver holds it), its journal entry says it overlapped and
how long it took; both or neither when either side fails; opposite swaps at once; a Stop in the middle. Each ends
with both models consistent with systemd, the kernel and the fake driver."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from fakegpu_sys import FakeModel, FakeModels, check_consistent, journal_entries
from secutil import Reply, calls_as, manager
from sysutil import list_models, manager_call, wait_until

from gpuschedd.testing.fakegpu import FakeGpuDir

ERRORS = "org.gpusched1.Error."


def two(fmodels: FakeModels) -> tuple[FakeModel, FakeModel]:
    """`a` running, `b` frozen."""
    a, b = fmodels.run("a", procs=1), fmodels.run("b", procs=1)
    manager_call("Freeze", "s", b.name)
    return a, b


def state(model: FakeModel) -> str:
    return list_models()[model.name]["state"]


def swap(*pairs: tuple[FakeModel, FakeModel]) -> list[Reply]:
    """Swap calls by root, all at once on one connection; their replies with the exact error names."""
    return calls_as("root", [manager("Swap", "ss", out.name, into.name) for out, into in pairs], parallel=True)


def swap_entries(into: FakeModel) -> list[dict[str, str]]:
    return journal_entries("GPUSCHED_EVENT=swap", f"GPUSCHED_MODEL={into.name}")


def test_a_swap_overlaps_and_its_entry_says_so(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    a, b = two(fmodels)
    [pid] = a.cuda_pids(fake)
    fake.hold(pid, "checkpoint")
    with ThreadPoolExecutor(1) as pool:
        swap = pool.submit(manager_call, "Swap", "ss", a.name, b.name)
        wait_until("b running while a's checkpoint copies", lambda: state(b) == "running")
        assert state(a) == "freezing"
        fake.release(pid, "checkpoint")
        swap.result()
    assert check_consistent(a.name, fake) == "frozen" and check_consistent(b.name, fake) == "running"
    b.assert_moving()
    a.assert_still()
    [entry] = wait_until("the swap's journal entry", lambda: swap_entries(b))
    assert entry["GPUSCHED_SWAP_OUT"] == a.name and entry["GPUSCHED_OVERLAPPED"] == "1"
    assert int(entry["GPUSCHED_DURATION_USEC"]) > 0 and "overlapped" in entry["MESSAGE"]


def test_an_overlapped_swap_is_both_or_neither(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    a, b = two(fmodels)
    [pid_a], [pid_b] = a.cuda_pids(fake), b.cuda_pids(fake)
    # The thaw fails: a, frozen meanwhile, is thawed back.
    fake.fail(pid_b, "restore", "CUDA_ERROR_UNKNOWN")
    [reply] = swap((a, b))
    assert reply.error == ERRORS + "CheckpointFailed", str(reply)
    assert check_consistent(a.name, fake) == "running" and check_consistent(b.name, fake) == "frozen"
    fake.clear_failures()
    # The freeze fails: b, thawed meanwhile, is frozen again (as a swap that waited for the freeze leaves it).
    fake.fail(pid_a, "checkpoint", "CUDA_ERROR_UNKNOWN")
    [reply] = swap((a, b))
    assert reply.error == ERRORS + "CheckpointFailed", str(reply)
    assert check_consistent(a.name, fake) == "running" and check_consistent(b.name, fake) == "frozen"
    again = journal_entries("GPUSCHED_EVENT=freeze", f"GPUSCHED_MODEL={b.name}", "GPUSCHED_REASON=swap-rollback")
    assert again and a.name in again[-1]["MESSAGE"]
    assert not swap_entries(b)
    a.assert_moving()
    b.assert_still()
    fake.clear_failures()
    manager_call("Swap", "ss", a.name, b.name)
    assert check_consistent(a.name, fake) == "frozen" and check_consistent(b.name, fake) == "running"


def test_opposite_swaps_at_once(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Neither deadlocks: each step holds one model's lock. Each call succeeds or is refused as InvalidState (a
    model caught mid-transition), and both models end consistent."""
    a, b = two(fmodels)
    for _round in range(3):
        for reply in swap((a, b), (b, a)):
            assert reply.ok or reply.error == ERRORS + "InvalidState", str(reply)
        states = {check_consistent(a.name, fake), check_consistent(b.name, fake)}
        assert states <= {"running", "frozen"}
        if states == {"running"}:
            manager_call("Freeze", "s", b.name)
        elif states == {"frozen"}:
            manager_call("Thaw", "s", a.name)


def test_a_stop_mid_swap(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """A Stop of the outgoing model waits for its freeze (that model's lock only): the swap completes, then it
    stops; nothing is left of it."""
    a, b = two(fmodels)
    [pid] = a.cuda_pids(fake)
    fake.hold(pid, "checkpoint")
    with ThreadPoolExecutor(2) as pool:
        swap = pool.submit(manager_call, "Swap", "ss", a.name, b.name)
        wait_until("b running while a's checkpoint copies", lambda: state(b) == "running")
        stop = pool.submit(manager_call, "Stop", "s", a.name)
        time.sleep(0.5)  # the Stop on its way (the outcome is the same should it arrive after the release)
        fake.release(pid, "checkpoint")
        swap.result()
        stop.result()
    assert check_consistent(a.name, fake) == "stopped" and check_consistent(b.name, fake) == "running"
    assert not a.cuda_pids(fake)
    b.assert_moving()
