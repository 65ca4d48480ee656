"""The disk tier through the installed daemon on the fake GPU (docs/disk-tier.md): a frozen model's snapshot (the fake
driver's private anonymous copy in each process, as the real driver's is) paged out to a real swap file by the
shipped unit (its capabilities and system-call filter as shipped), the properties, status and journal saying where
it is, and a thaw from swap bringing back every page intact; an agent model's parked bytes written to a spill file
of the daemon's instead (with or without swap) and read back by its agent at the thaw. Refusals change nothing. The
swap file lies in the checkout (bind-mounted from the host's disk: swap cannot live on the guest's overlay) and is
switched off after."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakegpu_sys import FakeModels, check_consistent, journal_entries, manager_property, restart_daemon
from secutil import ALICE, call_as, ensure_users
from sysutil import REPO, cgroup_frozen, gpusched, model_property, run, wait_until
from test_fastpath import PARKED, run_agent_model

from gpuschedd.events import MESSAGE_IDS, EventKind
from gpuschedd.testing.fakegpu import FakeGpuDir

SWAPFILE = REPO / "build" / "test-disk-tier.swap"
SPILL_DIR = Path("/var/lib/gpuschedd/spill")  # the shipped SpillDirectory=
MIB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def vm_swap(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSwap:"))


@pytest.fixture
def swap() -> Iterator[None]:
    """A 512 MiB swap file, on for the test. Skips (the real page-out) where the kernel allows no swapon here."""
    SWAPFILE.parent.mkdir(exist_ok=True)
    SWAPFILE.unlink(missing_ok=True)
    run("dd", "if=/dev/zero", f"of={SWAPFILE}", "bs=1M", "count=512", "status=none")
    SWAPFILE.chmod(0o600)
    run("mkswap", str(SWAPFILE))
    on = subprocess.run(["swapon", str(SWAPFILE)], capture_output=True, text=True)
    if on.returncode != 0:
        SWAPFILE.unlink()
        pytest.skip(f"swapon refused here ({on.stderr.strip()}): the real page-out is measured on the GPU machine")
    try:
        yield
    finally:
        run("swapoff", str(SWAPFILE), check=False, timeout=120)
        SWAPFILE.unlink(missing_ok=True)


def test_page_out_and_thaw_from_swap(swap: None, fmodels: FakeModels, fake: FakeGpuDir) -> None:
    assert manager_property("SwapTotalBytes") >= 512 * MIB - 4096
    model = fmodels.run("disk", vram=64 * MIB)
    pids = model.cuda_pids(fake)
    gpusched("freeze", model.name)
    snapshot = model_property(model.name, "SnapshotBytes")
    assert model_property(model.name, "SnapshotRamBytes") == snapshot >= 2 * 64 * MIB * 9 // 10
    ram_before = manager_property("RamFrozenBytes")
    gpusched("page-out", model.name)
    assert all(vm_swap(pid) >= 64 * MIB for pid in pids), "each process's snapshot is in swap"
    on_disk = model_property(model.name, "SnapshotSwapBytes")
    assert on_disk == snapshot and model_property(model.name, "SnapshotRamBytes") == 0
    assert manager_property("RamFrozenBytes") == ram_before - snapshot
    assert check_consistent(model.name, fake) == "frozen"
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", f"MESSAGE_ID={MESSAGE_IDS[EventKind.PAGE_OUT]}")
    assert int(entry["GPUSCHED_BYTES"]) == on_disk and int(entry["GPUSCHED_DURATION_USEC"]) > 0
    status = gpusched("status", model.name).stdout
    assert "paged out to swap" in status
    assert "Swap:" in gpusched("status").stdout
    model.assert_still()
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"
    assert fake.corrupted() == [], "every page of the snapshot came back as it was"
    model.assert_moving()
    [thaw] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=thaw")
    assert int(thaw["GPUSCHED_SWAP_BYTES"]) == on_disk
    # freeze --to-disk: both in one call
    gpusched("freeze", "--to-disk", model.name)
    assert model_property(model.name, "SnapshotSwapBytes") > 0 and check_consistent(model.name, fake) == "frozen"
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running" and fake.corrupted() == []


def spill_files(pid: int) -> list[str]:
    """The process's open descriptors of the daemon's spill files, unlinked (" (deleted)"). By name, not by the
    directory: the path shown is through the daemon's mount namespace, which a restart of the daemon replaces."""
    fds = Path(f"/proc/{pid}/fd")
    targets = (os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())
    return [t for t in targets if os.path.basename(t).startswith("spill-") and t.endswith(" (deleted)")]


@pytest.mark.parametrize("flags", [(), ("--keep-context",)], ids=["agent", "agent-only"])
def test_parked_memory_goes_to_a_spill_file(fmodels: FakeModels, fake: FakeGpuDir, flags: tuple[str]) -> None:
    """The agent's parked bytes are written by the daemon to its own unlinked file (no swap needed), the agent gives
    its host memory back, and the thaw reads them from the file onto the GPU: the model reads every parked byte
    after it (a wrong one stops it). The driver's part (or, with KeepContext, nothing else) stays in RAM where the
    host has no swap."""
    model = run_agent_model(fmodels, "spill-" + (flags[0].strip("-") if flags else "agent"), *flags)
    [pid] = model.cuda_pids(fake)
    gpusched("freeze", model.name)
    rss_frozen = rss(pid)
    gpusched("page-out", model.name)
    assert model_property(model.name, "SnapshotFileBytes") == model_property(model.name, "ParkedBytes") == PARKED
    snapshot = model_property(model.name, "SnapshotBytes")
    in_ram, in_swap = model_property(model.name, "SnapshotRamBytes"), model_property(model.name, "SnapshotSwapBytes")
    assert in_ram + in_swap + PARKED == snapshot
    assert rss(pid) <= rss_frozen - PARKED * 9 // 10, "the parked bytes left the process's memory"
    [held] = spill_files(pid)
    assert held.startswith(f"{SPILL_DIR}/") and not list(SPILL_DIR.iterdir()), "nothing of it is left with a name"
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", f"MESSAGE_ID={MESSAGE_IDS[EventKind.PAGE_OUT]}")
    assert int(entry["GPUSCHED_FILE_BYTES"]) == PARKED and int(entry["GPUSCHED_BYTES"]) >= PARKED
    assert "in spill files" in gpusched("status", model.name).stdout
    assert cgroup_frozen(f"gpusched-model@{model.name}.service"), "frozen again after the agent's moment"
    model.assert_still()
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running" and fake.corrupted() == []
    model.assert_moving()
    wait_until("the agent closes the file: its disk space is free", lambda: spill_files(pid) == [])
    [thaw] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=thaw")
    assert int(thaw["GPUSCHED_FILE_BYTES"]) == PARKED


def test_a_spilled_model_survives_a_daemon_restart(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """The daemon's connection to the agent ends with the restart; the agent keeps the file (the only descriptor of
    it), the daemon keeps where the snapshot is, and at the thaw the agent unparks from the file by itself."""
    model = run_agent_model(fmodels, "spill-restart")
    [pid] = model.cuda_pids(fake)
    gpusched("freeze", model.name)
    gpusched("page-out", model.name)
    assert model_property(model.name, "SnapshotFileBytes") == PARKED
    restart_daemon()
    assert model_property(model.name, "SnapshotFileBytes") == PARKED and len(spill_files(pid)) == 1
    model.assert_still()
    gpusched("thaw", model.name)
    model.assert_moving()  # the agent unparked by itself, from the file; a wrong byte would stop the counter
    assert check_consistent(model.name, fake) == "running" and fake.corrupted() == []
    wait_until("the agent closes the file", lambda: spill_files(pid) == [])
    assert model_property(model.name, "SnapshotFileBytes") == 0


def test_parked_memory_goes_to_swap_with_the_rest(swap: None, fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """With swap, freeze --to-disk puts the agent's parked bytes in a spill file and the rest of the process
    (the driver's part, its own memory) in swap: nothing of the snapshot is left in RAM."""
    model = run_agent_model(fmodels, "disk-agent")
    [pid] = model.cuda_pids(fake)
    gpusched("freeze", "--to-disk", model.name)
    assert model_property(model.name, "SnapshotFileBytes") == PARKED and vm_swap(pid) > 0
    snapshot = model_property(model.name, "SnapshotBytes")
    assert model_property(model.name, "SnapshotSwapBytes") == snapshot - PARKED
    assert model_property(model.name, "SnapshotRamBytes") == 0
    model.assert_still()
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running" and fake.corrupted() == []
    model.assert_moving()


def test_refusals_change_nothing(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """A running model: InvalidState; another user's model: AccessDenied; no swap: NotSupported. The model is left
    as it was each time."""
    model = fmodels.run("refused")
    reply = gpusched("page-out", model.name, check=False)
    assert reply.returncode == 1 and "InvalidState" in reply.stderr
    assert check_consistent(model.name, fake) == "running"
    ensure_users()
    denied = call_as(ALICE, "PageOut", "s", model.name)
    assert denied.error == "org.freedesktop.DBus.Error.AccessDenied"
    gpusched("freeze", model.name)
    if manager_property("SwapTotalBytes") == 0:
        reply = gpusched("page-out", model.name, check=False)
        assert reply.returncode == 1 and "NotSupported" in reply.stderr and "needs swap" in reply.stderr
        reply = gpusched("freeze", "--to-disk", model.name, check=False)
        assert reply.returncode == 1 and "NotSupported" in reply.stderr
    assert model_property(model.name, "SnapshotSwapBytes") == 0
    assert check_consistent(model.name, fake) == "frozen"
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"
