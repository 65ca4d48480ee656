"""Migrate through the installed daemon on the fake GPU (two GPUs): the CLI and the bus move a model onto the other
GPU and back, and a move that cannot happen changes nothing. (The real two-GPU move needs a machine with two
GPUs: docs/gpu-results.md.)"""

from __future__ import annotations

from fakegpu_sys import GPU0, GPU1, FakeModels, check_consistent, journal_entries
from sysutil import gpusched, manager_call, model_property

from gpuschedd.testing.fakegpu import FakeGpuDir, FakeGpuTelemetry


def placed(fake: FakeGpuDir, pids: list[int]) -> set[str]:
    return {c.gpu for c in fake.contexts() if c.pid in pids}


def test_migrate_there_and_back(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("m")
    pids = model.cuda_pids(fake)
    gpusched("migrate", model.name, "--to", "1")
    assert placed(fake, pids) == {GPU1} and model_property(model.name, "Gpus") == [GPU1]
    assert check_consistent(model.name, fake) == "running"
    model.assert_moving()
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=migrate")
    assert (entry["GPUSCHED_GPU_FROM"], entry["GPUSCHED_GPU_TO"]) == (GPU0, GPU1)
    manager_call("Migrate", "ss", model.name, GPU0)
    assert placed(fake, pids) == {GPU0} and check_consistent(model.name, fake) == "running"


def test_a_migration_that_cannot_happen_changes_nothing(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = fmodels.run("n")
    pids = model.cuda_pids(fake)
    for target, error in (("9", "InvalidArgs"), ("../x", "InvalidArgs")):
        reply = gpusched("migrate", model.name, "--to", target, check=False)
        assert reply.returncode == 1 and error in reply.stderr
        assert placed(fake, pids) == {GPU0} and check_consistent(model.name, fake) == "running"
    fake.allocate("hog", fake_free(fake, GPU1) - 1, GPU1)
    try:
        reply = gpusched("migrate", model.name, "--to", GPU1, check=False)
        assert reply.returncode == 1 and "InsufficientGpuMemory" in reply.stderr
        assert placed(fake, pids) == {GPU0} and check_consistent(model.name, fake) == "running"
    finally:
        fake.free("hog")


def fake_free(fake: FakeGpuDir, uuid: str) -> int:
    return next(g.free_bytes for g in FakeGpuTelemetry(fake.path).gpus() if g.uuid == uuid)
