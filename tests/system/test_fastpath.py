"""The fast path through the installed daemon on the fake GPU: `gpusched run --agent` for a model that runs
gpuschedd.agent (fake_model.py --park-bytes). A freeze parks through the agent's socket in the model's
RuntimeDirectory, the driver checkpoints the rest, and the properties, `gpusched status` and the journal say
which path was taken; a thaw gives every byte back; a stop removes the agent's directory. With --keep-context the
driver is not called: the processes keep their contexts on the GPU, frozen by the cgroup, across a daemon restart
too."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fakegpu_sys import (
    FAKE_DIR,
    GPU0,
    LIB_DIR,
    MIB,
    FakeModel,
    FakeModels,
    check_consistent,
    fake_model_argv,
    journal_entries,
    restart_daemon,
)
from sysutil import REPO, WORKDIR, cgroup_frozen, gpusched, list_models, model_property, unit_property, wait_until

from gpuschedd.checkpoint import CudaState
from gpuschedd.testing.fakegpu import FakeGpuDir, FakeGpuTelemetry

PARKED = 48 * MIB  # eight of fake_model.py's 6 MiB segments
AGENT_ROOT = Path("/run/gpusched-agent")


def run_agent_model(fmodels: FakeModels, suffix: str, *flags: str) -> FakeModel:
    model = FakeModel(f"{fmodels.prefix}-{suffix}", 1)
    fmodels.started.append(model)
    env = [f"PYTHONPATH={REPO / 'src'}", f"GPUSCHED_LIBCUDA={LIB_DIR / 'libcuda.so.1'}", f"FAKECUDA_DIR={FAKE_DIR}"]
    argv = [*fake_model_argv(model.name, 64 * MIB, 1), "--park-bytes", str(PARKED)]
    gpusched("run", "--name", model.name, "--agent", *flags, *(f"--setenv={e}" for e in env), "--", *argv)
    wait_until("the agent's socket", lambda: list((AGENT_ROOT / model.name).glob("agent-*.sock")))
    model.assert_moving()
    return model


def test_the_daemon_parks_through_the_agent(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = run_agent_model(fmodels, "fast")
    agent_dir = AGENT_ROOT / model.name
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


def test_keep_context_freezes_without_the_driver_and_survives_a_restart(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    model = run_agent_model(fmodels, "keep", "--keep-context")
    [pid] = model.cuda_pids(fake)
    assert model_property(model.name, "KeepContext") is True
    gpusched("freeze", model.name)
    assert model_property(model.name, "FreezePath") == "agent-only"
    assert model_property(model.name, "ParkedBytes") == PARKED
    assert cgroup_frozen(model.unit) and unit_property(model.unit, "FreezerState") == "frozen"
    assert fake.state(pid) == CudaState.RUNNING, "no driver call: the context stays"
    assert FakeGpuTelemetry(fake.path).vram_by_pid()[pid] == {GPU0: 64 * MIB}, "only the parked memory left"
    model.assert_still()
    assert "keeps its CUDA contexts; last freeze: agent-only" in gpusched("status", model.name).stdout
    [entry] = journal_entries(f"GPUSCHED_MODEL={model.name}", "GPUSCHED_EVENT=freeze")
    assert "CUDA contexts kept on the GPU" in entry["MESSAGE"]

    restart_daemon()  # its connection to the agent ends; the model stays frozen, untouched
    assert list_models()[model.name]["state"] == "frozen" and cgroup_frozen(model.unit)
    assert fake.state(pid) == CudaState.RUNNING
    gpusched("thaw", model.name)
    assert check_consistent(model.name, fake) == "running"
    model.assert_moving()  # the agent unparked by itself; a wrong byte would stop the counter


def run_hostile_model(fmodels: FakeModels, kind: str) -> FakeModel:
    """A model with --agent whose own code serves the agent socket and answers every request in a hostile way
    (fake_model.py --hostile-agent): drip (a byte every 0.2 s), silent, garbage."""
    model = FakeModel(f"{fmodels.prefix}-{kind}", 1)
    fmodels.started.append(model)
    gpusched(
        "run", "--name", model.name, "--agent", "--", *fake_model_argv(model.name, 64 * MIB, 1), "--hostile-agent", kind
    )
    wait_until("the hostile agent's socket", lambda: list((AGENT_ROOT / model.name).glob("agent-*.sock")))
    model.assert_moving()
    return model


def test_hostile_agents_delay_no_other_model_and_a_stop_cuts_their_wait(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """While freezes of models whose agents drip-feed or stay silent wait on them (AgentTimeoutSec, 30 s here),
    another model is frozen and thawed through its own agent as usual; a Stop of a model whose freeze waits on a
    silent agent cuts that wait (the freeze fails, rolled back) and leaves no process; the drip-feeding one takes
    the driver path by its deadline; garbage fails its park at once."""
    hostile = {kind: run_hostile_model(fmodels, kind) for kind in ("drip", "silent", "garbage")}
    fast = run_agent_model(fmodels, "fast")
    freezes = {
        kind: subprocess.Popen(
            ["gpusched", "freeze", m.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for kind, m in hostile.items()
    }
    for kind in ("drip", "silent"):
        wait_until(f"the {kind} model freezing", lambda m=hostile[kind]: list_models()[m.name]["state"] == "freezing")
    gpusched("freeze", fast.name)
    assert model_property(fast.name, "FreezePath") == "agent"
    gpusched("thaw", fast.name)
    fast.assert_moving()
    assert freezes["drip"].poll() is None and freezes["silent"].poll() is None, "they still wait on their agents"

    silent = hostile["silent"]
    [pid] = silent.cuda_pids(fake)
    gpusched("stop", silent.name)
    _out, err = freezes["silent"].communicate(timeout=10)
    assert freezes["silent"].returncode != 0 and "its freeze was cancelled" in err, err
    assert check_consistent(silent.name, fake) == "stopped"
    assert not Path(f"/proc/{pid}").exists() and pid not in {c.pid for c in fake.contexts()}

    assert freezes["garbage"].wait(timeout=60) == 0
    assert model_property(hostile["garbage"].name, "FreezePath") == "driver"
    assert freezes["drip"].wait(timeout=120) == 0, freezes["drip"].stderr.read() if freezes["drip"].stderr else ""
    for kind in ("drip", "garbage"):
        m = hostile[kind]
        assert check_consistent(m.name, fake) == "frozen" and model_property(m.name, "FreezePath") == "driver"
        gpusched("thaw", m.name)
        m.assert_moving()


def test_inject_agent_parks_an_unmodified_program(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """`gpusched run --inject-agent` of a C program that knows nothing of gpuschedd (tests/fakecuda/preload_prog.c,
    linked with the fake libcuda, launching from two threads and checking its buffers after every launch): the
    daemon preloads its installed interposer, and freezes park through it like an agent model's."""
    model = FakeModel(f"{fmodels.prefix}-inject", 1)
    fmodels.started.append(model)
    prog = WORKDIR / "preload_prog"
    source = REPO / "tests" / "fakecuda" / "preload_prog.c"
    subprocess.run(
        ["gcc", "-O2", "-o", str(prog), str(source), f"-L{LIB_DIR}", "-l:libcuda.so.1", "-ldl", "-lpthread"], check=True
    )
    env = [f"LD_LIBRARY_PATH={LIB_DIR}", f"FAKECUDA_DIR={FAKE_DIR}"]
    argv = [str(prog), GPU0, "2", str(model.counter_path())]
    gpusched("run", "--name", model.name, "--inject-agent", *(f"--setenv={e}" for e in env), "--", *argv)
    wait_until("the interposer's socket", lambda: list((AGENT_ROOT / model.name).glob("agent-*.sock")))
    model.assert_moving()
    assert (model_property(model.name, "InjectAgent"), model_property(model.name, "Agent")) == (True, True)
    for _cycle in range(2):
        gpusched("freeze", model.name)
        assert check_consistent(model.name, fake) == "frozen"
        assert model_property(model.name, "FreezePath") == "agent"
        assert model_property(model.name, "ParkedBytes") == 2 * 4 * MIB + 8 * MIB
        model.assert_still()
        assert "Fast path: agent (injected); last freeze: agent" in gpusched("status", model.name).stdout
        gpusched("thaw", model.name)
        assert check_consistent(model.name, fake) == "running"
        model.assert_moving()  # a wrong byte in a buffer would have written CORRUPT and ended the program
    gpusched("stop", model.name)
