"""Policies through the installed daemon on the fake GPU: a model run with IdleFreezeSec and FrozenTTLSec is frozen
once the fake NVML shows its processes idle, then stopped once frozen past its time to live; each decision is a
journal entry saying why; with EvictOnThaw=yes, a start that needs room evicts a lower-priority model."""

from __future__ import annotations

import time

from fakegpu_sys import (
    CONF,
    GPU0,
    FakeModel,
    FakeModels,
    check_consistent,
    fake_model_argv,
    journal_entries,
    restart_daemon,
)
from sysutil import gpusched, list_models, manager_call, run, unit_property, wait_until

from gpuschedd.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from gpuschedd.testing.fakegpu import FakeGpuDir, FakeGpuTelemetry


def test_idle_freeze_then_frozen_ttl(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = FakeModel("pol-idle", 1)
    fmodels.started.append(model)
    argv = fake_model_argv(model.name, 64 << 20, 1)
    options = ["2", "IdleFreezeSec", "t", "4", "FrozenTTLSec", "u", "2"]
    run("busctl", "--system", "call", "--", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Run", "sasa{sv}", model.name,
        str(len(argv)), *argv, *options)  # fmt: skip
    wait_until("its CUDA process", lambda: len(model.cuda_pids(fake)) == 1)
    (pid,) = model.cuda_pids(fake)
    fake.utilization(pid, 60)  # busy from the start (IdleFreezeSec=4 leaves time to say so)
    wait_until("VRAM seen", lambda: list_models()[model.name]["vram_bytes"] > 0)
    model.assert_moving()
    time.sleep(6)
    assert list_models()[model.name]["state"] == "running", "busy: not idle"
    fake.utilization(pid, 0)
    freezes = (f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=freeze")
    wait_until("the idle freeze's journal entry", lambda: journal_entries(*freezes), 15)
    [entry] = journal_entries(*freezes)
    assert entry["GPUSCHED_REASON"] == "idle" and "IdleFreezeSec=4" in entry["MESSAGE"]
    stops = (f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=stop")
    wait_until("the frozen TTL stop's journal entry", lambda: journal_entries(*stops), 15)
    assert list_models()[model.name]["state"] == "stopped"
    [entry] = journal_entries(*stops)
    assert entry["GPUSCHED_REASON"] == "frozen-ttl" and "FrozenTTLSec=2" in entry["MESSAGE"]


def test_bad_policy_options_are_refused(fmodels: FakeModels) -> None:
    refusals = {
        ("Priority", "s", "x"): "must have type i",
        ("IdleFreezeSec", "i", "5"): "must have type t or u",
        ("FrozenTTLSec", "t", str(10**9)): "is more than",
    }
    for option, why in refusals.items():
        reply = manager_call("Run", "sasa{sv}", "pol-bad", "1", "/bin/true", "1", *option, check=False)
        assert reply.returncode != 0 and why in reply.stderr
    assert "pol-bad" not in list_models()


def test_run_with_gpu_memory(fmodels: FakeModels) -> None:
    """`gpusched run --gpu-memory SIZE`: refused with InsufficientGpuMemory, nothing started, when a GPU of the model
    lacks it (EvictOnThaw=no here: nothing is evicted); started when it has it."""
    model = FakeModel("pol-gpumem", 1)
    fmodels.started.append(model)
    argv = ["--", *fake_model_argv(model.name, 64 << 20, 1)]
    refused = gpusched("run", "--name", model.name, "--gpus", "0", "--gpu-memory", "5G", *argv, check=False)
    assert refused.returncode == 1 and "org.gpusched1.Error.InsufficientGpuMemory" in refused.stderr
    assert "needs 5368709120 bytes free on GPU 0" in refused.stderr and "Nothing was started" in refused.stderr
    assert model.name not in list_models() and unit_property(model.unit, "LoadState") == "not-found"
    gpusched("run", "--name", model.name, "--gpus", "0", "--gpu-memory", "1G", *argv)
    wait_until("it runs", lambda: list_models()[model.name]["state"] == "running")


def test_eviction_makes_room_for_a_start_and_a_thaw(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """EvictOnThaw=yes in the daemon's configuration: a model run with GpuMemory that does not fit freezes a running
    model of lower priority (journaled with GPUSCHED_REASON=evicted and why), never one of higher priority; the
    evicted model thaws again once there is room."""
    saved = CONF.read_text()
    CONF.write_text(saved + "EvictOnThaw=yes\n")
    restart_daemon()
    try:
        low = fmodels.run("evict-low", vram=64 << 20, procs=1)  # priority 0
        free = next(g.free_bytes for g in FakeGpuTelemetry(fake.path).gpus() if g.uuid == GPU0)
        fake.allocate("hog", free - (100 << 20), GPU0)  # 100 MiB left: the low model's 64 MiB would make 164
        high = FakeModel(f"{fmodels.prefix}-evict-high", 1)
        fmodels.started.append(high)
        argv = ["--", *fake_model_argv(high.name, 64 << 20, 1)]
        needs = ["--gpus", "0", "--gpu-memory", str(150 << 20)]
        refused = gpusched("run", "--name", high.name, *needs, "--priority", "-1", *argv, check=False)
        assert refused.returncode == 1 and "InsufficientGpuMemory" in refused.stderr, "a higher priority is kept"
        assert list_models()[low.name]["state"] == "running" and high.name not in list_models()
        gpusched("run", "--name", high.name, *needs, "--priority", "5", *argv)
        assert list_models()[low.name]["state"] == "frozen" and check_consistent(low.name, fake) == "frozen"
        wait_until("the new model runs", lambda: list_models()[high.name]["state"] == "running")
        [entry] = journal_entries(f"GPUSCHED_MODEL={low.name}", "GPUSCHED_EVENT=freeze")
        assert entry["GPUSCHED_REASON"] == "evicted" and f"the start of {high.name}" in entry["MESSAGE"]
        wait_until("the new model's VRAM", lambda: len(high.cuda_pids(fake)) == 1)
        fake.free("hog")
        gpusched("thaw", low.name)
        assert check_consistent(low.name, fake) == "running" and list_models()[high.name]["state"] == "running"
        low.assert_moving()
    finally:
        fake.free("hog")
        CONF.write_text(saved)
        restart_daemon()
