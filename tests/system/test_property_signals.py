"""What the interface XML declares EmitsChangedSignal=true is really sent, on the fake GPU (a freeze there moves
memory, so RamFrozenBytes and Gpus change): a client that caches on the annotation's word stays right. And only
what moved is sent."""

from __future__ import annotations

from fakegpu_sys import FakeModels, manager_property
from sysutil import MANAGER_IFACE, MANAGER_PATH, gpusched, model_path, model_property, wait_until
from test_bus import Monitor

from gpuschedd.testing.fakegpu import FakeGpuDir


def test_declared_emitting_properties_are_sent(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    monitor = Monitor()
    try:
        model = fmodels.run("emits")
        wait_until("MainPid known", lambda: model_property(model.name, "MainPid") != 0)
        gpusched("freeze", model.name)
        frozen_bytes = manager_property("RamFrozenBytes")
        gpusched("thaw", model.name)
    finally:
        out = monitor.stop()
    props = "org.freedesktop.DBus.Properties.PropertiesChanged"
    of_model = [line for line in out.splitlines() if line.startswith(f"{model_path(model.name)}: {props}")]
    of_manager = [line for line in out.splitlines() if line.startswith(f"{MANAGER_PATH}: {props} ('{MANAGER_IFACE}'")]
    last_freeze = model_property(model.name, "LastFreezeUSec")
    assert any(f"'LastFreezeUSec': <uint64 {last_freeze}>" in line for line in of_model), out
    assert frozen_bytes > 0
    sent = [line for line in of_manager if "'RamFrozenBytes'" in line]
    at_freeze = next(i for i, line in enumerate(sent) if f"'RamFrozenBytes': <uint64 {frozen_bytes}>" in line)
    assert any("'RamFrozenBytes': <uint64 0>" in line for line in sent[at_freeze + 1 :]), out
    assert any("'Gpus':" in line for line in of_manager), out


def test_a_models_signals_carry_only_what_moved(fmodels: FakeModels, fake: FakeGpuDir) -> None:
    """Once its PIDs are announced, a freeze and a thaw send its State (and what the freeze moved), never its PIDs
    again: a PropertiesChanged carries the properties that changed, as the Manager's does."""
    model = fmodels.run("moved")
    wait_until("MainPid known", lambda: model_property(model.name, "MainPid") != 0)
    gpusched("freeze", model.name)
    gpusched("thaw", model.name)  # every property has been announced since the model appeared
    monitor = Monitor()
    try:
        gpusched("freeze", model.name)
        gpusched("thaw", model.name)
    finally:
        out = monitor.stop()
    props = "org.freedesktop.DBus.Properties.PropertiesChanged"
    of_model = [line for line in out.splitlines() if line.startswith(f"{model_path(model.name)}: {props}")]
    for state in ("freezing", "frozen", "thawing", "running"):
        assert any(f"'State': <'{state}'>" in line for line in of_model), out
    assert not any("'Pids'" in line or "'MainPid'" in line for line in of_model), out
    assert any("'SnapshotBytes'" in line for line in of_model), "what a freeze moves is sent"
