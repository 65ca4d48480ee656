"""What engine tests share: the one listener that records what an engine announces, and an engine built with it."""

from __future__ import annotations

from fake_units import FakeUnits

from gpuschedd.checkpoint import CheckpointBackend, NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.events import EngineListener, Event, EventKind
from gpuschedd.model import Model, State
from gpuschedd.statefile import StateFile
from gpuschedd.telemetry import GpuTelemetry, NoGpus
from gpuschedd.units import UnitBackend


class Recorder(EngineListener):
    """Every event, state change, model added and removed, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.states: list[tuple[str, State]] = []
        self.added: list[str] = []
        self.removed: list[str] = []

    def model_added(self, model: Model) -> None:
        self.added.append(model.name)

    def model_changed(self, model: Model) -> None:
        self.states.append((model.name, model.state))

    def model_removed(self, model: Model) -> None:
        self.removed.append(model.name)

    def event(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[EventKind]:
        return [e.kind for e in self.events]

    def reasons(self) -> list[tuple[EventKind, str, str]]:
        """(kind, model, GPUSCHED_REASON=) of the events that give a reason (policies, evictions)."""
        return [(e.kind, e.model, e.fields["GPUSCHED_REASON"]) for e in self.events if "GPUSCHED_REASON" in e.fields]


def make_engine(
    units: UnitBackend | None = None,
    *,
    checkpoint: CheckpointBackend | None = None,
    telemetry: GpuTelemetry | None = None,
    config: Config | None = None,
    state_file: StateFile | None = None,
    recorder: Recorder | None = None,
) -> tuple[Engine, Recorder]:
    """An engine (not started) with a Recorder (`recorder`, else a new one) listening: fake units, no checkpoint, no
    GPUs, a 1 GiB RAM budget and no state file unless given."""
    engine = Engine(
        units if units is not None else FakeUnits(),
        checkpoint if checkpoint is not None else NoCheckpoint(),
        telemetry if telemetry is not None else NoGpus(),
        config if config is not None else Config(ram_budget_bytes=1 << 30),
        state_file,
    )
    recorder = recorder if recorder is not None else Recorder()
    engine.add_listener(recorder)
    return engine, recorder
