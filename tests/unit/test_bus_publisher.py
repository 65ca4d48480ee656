"""BusPublisher: what a model's change costs the Manager's properties. Its emitting ones (RamFrozenBytes, Gpus) count
what models hold, in snapshots and on GPUs: a change of a model that held neither, before or after, leaves them
unread (the GPUs are not asked); any other change recomputes them and sends what moved."""

from typing import Any

from fake_units import FakeUnits

from gpuschedd.bus.manager import ManagerInterface
from gpuschedd.bus.publisher import BusPublisher
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.model import Model, State
from gpuschedd.telemetry import GpuInfo


class CountingGpus:
    """One GPU whose used memory the test sets; counts how often it is read."""

    def __init__(self) -> None:
        self.reads = 0
        self.used = 0

    def gpus(self) -> list[GpuInfo]:
        self.reads += 1
        return [GpuInfo("GPU-0", 0, "Fake", 100, self.used, 100 - self.used)]

    def vram_by_pid(self) -> dict[int, dict[str, int]]:
        return {}

    def busy_pids(self) -> set[int] | None:
        return None


class Bus:
    """What the publisher asks of a bus when nothing is connected."""

    def add_message_handler(self, handler: Any) -> None:
        pass

    def export(self, path: str, iface: Any) -> None:
        pass

    def unexport(self, path: str, iface: Any) -> None:
        pass


def test_the_manager_is_recomputed_only_for_a_model_that_holds_or_held_memory() -> None:
    gpus = CountingGpus()
    engine = Engine(FakeUnits(), NoCheckpoint(), gpus, Config(ram_budget_bytes=1))
    manager = ManagerInterface(engine, None)  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    manager.emit_properties_changed = sent.append  # type: ignore[method-assign]
    publisher = BusPublisher(Bus(), engine, None, manager)  # type: ignore[arg-type]
    model = Model("m", "u", 0, ["x"], pids=[5])
    engine.models[model.name] = model
    publisher.model_added(model)
    reads = gpus.reads

    model.state = State.FREEZING  # a model without CUDA: no GPU memory, no snapshot
    publisher.model_changed(model)
    model.state = State.FROZEN
    publisher.model_changed(model)
    assert gpus.reads == reads, "the GPUs were not read for it"

    model.state, model.vram_bytes, gpus.used = State.RUNNING, 30, 30  # it loaded weights
    publisher.model_changed(model)
    assert gpus.reads == reads + 1 and sent[-1]["Gpus"][0]["used"].value == 30

    model.state, model.vram_bytes, gpus.used = State.STOPPED, 0, 0  # it ended: what it held is free again
    publisher.model_changed(model)
    assert gpus.reads == reads + 2 and sent[-1]["Gpus"][0]["used"].value == 0

    model.snapshot_bytes, model.cuda_pids, model.state = 20, [5], State.FROZEN  # a snapshot in host RAM
    publisher.model_changed(model)
    assert gpus.reads == reads + 3 and sent[-1]["RamFrozenBytes"] == 20
