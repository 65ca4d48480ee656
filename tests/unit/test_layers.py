"""The layers of the source tree (docs/architecture.md), checked on every import of every module (ast, so a
lazy import inside a function or one under TYPE_CHECKING counts too).

Who runs what: the daemon runs as root and holds the backends; clients run as any user; the agent runs inside a
model's process as the model's user. So a client importing a daemon module, or the agent importing anything of
the daemon, would put daemon code (and its assumptions about rights) where it does not belong."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import gpuschedd

SRC = Path(gpuschedd.__file__).parent

# module prefix -> layer; the longest prefix that matches a module decides.
LAYERS: dict[str, list[str]] = {
    # what every layer may use: names, typed errors, events and the model as data, caller-input checks, and the
    # neutral readers (libcuda for the agent and the driver backend, /proc, host memory); the agent's wire protocol
    # is the contract between the daemon and the agent, as names.py is between the daemon and its clients.
    "shared": [
        "gpuschedd",
        "gpuschedd.names",
        "gpuschedd.errors",
        "gpuschedd.events",
        "gpuschedd.model",
        "gpuschedd.options",
        "gpuschedd.validate",
        "gpuschedd.settings_file",
        "gpuschedd.libcuda",
        "gpuschedd.procfs",
        "gpuschedd.hostmem",
        "gpuschedd.agent.protocol",
    ],
    # what the daemon drives: units, checkpoints, GPU telemetry (and its test fake), calls to system services
    "backends": [
        "gpuschedd.units",
        "gpuschedd.checkpoint",
        "gpuschedd.telemetry",
        "gpuschedd.nvml",
        "gpuschedd.sysbus",
        "gpuschedd.testing",
        "gpuschedd.pageout",
        "gpuschedd.spill",
    ],
    # the root daemon
    "daemon": [
        "gpuschedd.engine",
        "gpuschedd.bus",
        "gpuschedd.statefile",
        "gpuschedd.journal",
        "gpuschedd.metrics",
        "gpuschedd.config",
        "gpuschedd.catalog",
        "gpuschedd.daemon",
        "gpuschedd.recovery",
        "gpuschedd.adopt",
        "gpuschedd.agentlink",
        "gpuschedd.preload",
    ],
    # run by any user: the SDK, the CLI, the dashboard, the wake proxy (as the model's user), the front door
    "clients": [
        "gpuschedd.client",
        "gpuschedd.client_errors",
        "gpuschedd.client_events",
        "gpuschedd.cli",
        "gpuschedd.dashboard",
        "gpuschedd.wake",
        "gpuschedd.formatting",
        "gpuschedd.eventlog",
        "gpuschedd.frontdoor",
    ],
    # inside a model's process, as the model's user
    "agent": ["gpuschedd.agent"],
}
MAY_IMPORT: dict[str, set[str]] = {
    "shared": {"shared"},
    "backends": {"shared", "backends"},
    "daemon": {"shared", "backends", "daemon"},
    "clients": {"shared", "clients"},
    "agent": {"shared", "agent"},
}
DBUS_LIBRARIES = ("dbus_fast", "dbus", "dbus_next", "jeepney", "sdbus", "pydbus")
# The only modules that speak D-Bus: our service, the daemon's wiring, the unit backend and the bus calls it
# shares with polkit, and the SDK. Never the engine.
MAY_IMPORT_DBUS = (
    "gpuschedd.bus",
    "gpuschedd.daemon",
    "gpuschedd.sysbus",
    "gpuschedd.units.systemd",
    "gpuschedd.client",
    "gpuschedd.client_errors",
    "gpuschedd.client_events",
)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer(module: str) -> str | None:
    found = [(len(p), name) for name, prefixes in LAYERS.items() for p in prefixes if _matches(module, p)]
    return max(found)[1] if found else None


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module `module` imports (gpuschedd's resolved to the module file, others by their top name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        own = layer(module)
        for target in sorted(t for t in targets if _matches(t, "gpuschedd")):
            if layer(target) not in MAY_IMPORT[own or ""]:
                bad.append(f"{module} ({own}) imports {target} ({layer(target)})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return graph()


def test_every_module_has_a_layer(edges: dict[str, set[str]]) -> None:
    assert [m for m in edges if layer(m) is None] == []


def test_no_module_imports_a_layer_it_may_not(edges: dict[str, set[str]]) -> None:
    assert layer_violations(edges) == []


def test_no_import_cycle(edges: dict[str, set[str]]) -> None:
    assert cycles(edges) == []


def test_only_the_bus_edge_imports_dbus(edges: dict[str, set[str]]) -> None:
    speaking = {m for m, targets in edges.items() if any(t.split(".")[0] in DBUS_LIBRARIES for t in targets)}
    assert {m for m in speaking if not any(_matches(m, p) for p in MAY_IMPORT_DBUS)} == set()
    assert not any(_matches(m, "gpuschedd.engine") for m in speaking)


def test_the_checks_see_what_they_check(edges: dict[str, set[str]]) -> None:
    """The checks would fail on the faults they look for (so an empty answer above means something)."""
    assert "gpuschedd.formatting" in edges["gpuschedd.dashboard"]  # `from .formatting import ...`
    assert "gpuschedd.units" in edges["gpuschedd.units.systemd"]  # `from . import UnitSpec`
    assert "gpuschedd.testing.fakegpu" in edges["gpuschedd.daemon"]  # a lazy import inside a function
    assert "gpuschedd.libcuda" in edges["gpuschedd.agent.cuda"]  # `from ..libcuda import ...`
    assert "dbus_fast" in edges["gpuschedd.units.systemd"]
    faults = {
        "gpuschedd.dashboard": {"gpuschedd.cli"},
        "gpuschedd.cli": {"gpuschedd.dashboard", "gpuschedd.engine"},
        "gpuschedd.agent.cuda": {"gpuschedd.checkpoint.driver"},
    }
    assert cycles(faults) == [["gpuschedd.cli", "gpuschedd.dashboard"]]
    assert layer_violations(faults) == [
        "gpuschedd.agent.cuda (agent) imports gpuschedd.checkpoint.driver (backends)",
        "gpuschedd.cli (clients) imports gpuschedd.engine (daemon)",
    ]
