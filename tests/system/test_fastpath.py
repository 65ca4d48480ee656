"""The fast path through the installed daemon on the fake GPU: `gpusched run --agent` for a model that runs
gpuschedd.agent (fake_model.py --park-bytes). A freeze parks through the agent's socket in the model's
RuntimeDirectory, the driver checkpoints the rest, and the properties, `gpusched status` and the journal say
which path was taken; a thaw gives every byte back; a stop removes the agent's directory."""

from __future__ import annotations

from pathlib import Path

from fakegpu_sys import (
    FAKE_DIR,
    LIB_DIR,
    MIB,
    FakeModel,
    FakeModels,
    check_consistent,
    fake_model_argv,
    journal_entries,
)
from sysutil import REPO, gpusched, model_property, wait_until

from gpuschedd.testing.fakegpu import FakeGpuDir

PARKED = 48 * MIB  # eight of fake_model.py's 6 MiB segments
AGENT_ROOT = Path("/run/gpusched-agent")


def test_the_daemon_parks_through_the_agent(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = FakeModel(f"{fmodels.prefix}-fast", 1)
    fmodels.started.append(model)
    env = [f"PYTHONPATH={REPO / 'src'}", f"GPUSCHED_LIBCUDA={LIB_DIR / 'libcuda.so.1'}", f"FAKECUDA_DIR={FAKE_DIR}"]
    argv = [*fake_model_argv(model.name, 64 * MIB, 1), "--park-bytes", str(PARKED)]
    gpusched("run", "--name", model.name, "--agent", *(f"--setenv={e}" for e in env), "--", *argv)
    agent_dir = AGENT_ROOT / model.name
    wait_until("the agent's socket", lambda: list(agent_dir.glob("agent-*.sock")))
    model.assert_moving()
    assert model_property(model.name, "Agent") is True

    for _cycle in range(2):
        gpusched("freeze", model.name)
        assert check_consistent(model.name, fake) == "frozen"
        assert model_property(model.name, "FreezePath") == "agent"
        assert model_property(model.name, "ParkedBytes") == PARKED
        assert model_property(model.name, "SnapshotBytes") >= PARKED + 64 * MIB * 0.9
        model.assert_still()
        assert "Fast path: agent; last freeze: agent" in gpusched("status", model.name).stdout
        gpusched("thaw", model.name)
        assert check_consistent(model.name, fake) == "running"
        model.assert_moving()  # the model reads all its parked memory each step: a wrong byte stops the counter
    freezes = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=freeze")
    assert len(freezes) == 2 and all("parked by the agent" in e["MESSAGE"] for e in freezes)

    gpusched("stop", model.name)
    wait_until("the agent's directory removed", lambda: not agent_dir.exists())
