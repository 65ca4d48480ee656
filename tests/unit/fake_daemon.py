"""A fake of the front door's Daemon (gpuschedd over the SDK) that behaves like the real one where the router relies
on it: the state rules of model.REQUIRES (Thaw of a running model and Freeze of a frozen one are InvalidState),
Swap both-or-neither, GPU memory (a thaw or start that does not fit is InsufficientGpuMemory and changes nothing),
Start of a running or frozen model doing nothing, NoSuchModel for a name not in the table, the moving states while
a call is under way (thawing, freezing), and a daemon that is gone (DaemonNotRunning, as the SDK raises it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gpuschedd.client_errors import DaemonNotRunning
from gpuschedd.errors import InsufficientGpuMemory, InvalidState, NoSuchModel
from gpuschedd.frontdoor.router import Entry


@dataclass
class FakeModel:
    entry: Entry
    state: str = "stopped"
    vram: int = 1
    # how many port probes after a start find the port closed (the server still loading)
    loading: int = 0


@dataclass
class FakeDaemon:
    gpu: int = 100  # GPU memory, in the models' units
    delay: float = 0.0  # each transition takes this long (thawing, freezing meanwhile)
    down: bool = False
    models: dict[str, FakeModel] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    catalog_reads: int = 0
    # set to make the next start end in a crash (state failed) instead of a running server
    crash_on_start: set[str] = field(default_factory=set)

    def add(self, name: str, port: int, state: str = "stopped", aliases: tuple[str, ...] = (), priority: int = 0,
            vram: int = 1, loading: int = 0) -> FakeModel:  # fmt: skip
        model = FakeModel(Entry(name, aliases, port, priority), state, vram, loading)
        self.models[name] = model
        return model

    def _check(self) -> None:
        if self.down:
            raise DaemonNotRunning("org.freedesktop.DBus.Error.ServiceUnknown", "gpuschedd is not running")

    def _get(self, name: str) -> FakeModel:
        self._check()
        if name not in self.models:
            raise NoSuchModel(f"no model named {name!r}")
        return self.models[name]

    def _used(self) -> int:
        return sum(m.vram for m in self.models.values() if m.state in ("running", "thawing", "freezing"))

    def _fits(self, model: FakeModel, freed: int = 0) -> None:
        if self._used() - freed + model.vram > self.gpu:
            raise InsufficientGpuMemory(f"{model.entry.name} needs {model.vram}", model.vram, self.gpu - self._used())

    async def _move(self, model: FakeModel, moving: str, end: str) -> None:
        model.state = moving
        await asyncio.sleep(self.delay)
        model.state = end

    async def catalog(self) -> list[Entry]:
        self._check()
        self.catalog_reads += 1
        return [m.entry for m in self.models.values()]

    async def states(self) -> dict[str, str]:
        self._check()
        return {name: m.state for name, m in self.models.items()}

    async def start(self, name: str) -> None:
        model = self._get(name)
        self.calls.append(("start", name))
        if model.state not in ("stopped", "failed"):
            return
        self._fits(model)
        model.state = "running"
        await asyncio.sleep(self.delay)
        if name in self.crash_on_start:
            model.state = "failed"

    async def freeze(self, name: str) -> None:
        model = self._get(name)
        self.calls.append(("freeze", name))
        if model.state != "running":
            raise InvalidState(f"model {name!r} is {model.state}, not running")
        await self._move(model, "freezing", "frozen")

    async def thaw(self, name: str) -> None:
        model = self._get(name)
        self.calls.append(("thaw", name))
        if model.state != "frozen":
            raise InvalidState(f"model {name!r} is {model.state}, not frozen")
        self._fits(model)
        await self._move(model, "thawing", "running")

    async def swap(self, freeze_name: str, thaw_name: str) -> None:
        out, into = self._get(freeze_name), self._get(thaw_name)
        self.calls.append(("swap", freeze_name, thaw_name))
        if out.state not in ("running", "frozen") or into.state not in ("running", "frozen"):
            raise InvalidState("swap needs a running and a frozen model")
        self._fits(into, freed=out.vram if out.state == "running" else 0)
        out.state, into.state = "freezing", "thawing"
        await asyncio.sleep(self.delay)
        out.state, into.state = "frozen", "running"

    async def accepts(self, port: int) -> bool:
        """The router's port probe: a running model's port accepts once it finished loading."""
        for model in self.models.values():
            if model.entry.backend_port == port and model.state == "running":
                if model.loading > 0:
                    model.loading -= 1
                    return False
                return True
        return False
