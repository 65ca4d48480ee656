"""Helpers of the system tests: commands inside the sandbox, D-Bus reads through busctl, and counters that show
whether a model's processes really run. Kept out of conftest.py so tests can import them by name."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # polling.py: the wait-until helper of every tier

from polling import wait_until  # noqa: E402  (re-exported: the system tests import it from here)

COUNTER = REPO / "examples" / "counter.py"
# Models run as their own units, outside the test's scope: their files go where every unit sees them (not /tmp,
# which a unit with PrivateTmp= would not share).
WORKDIR = Path("/run/gpusched-test")
GUEST_PYTHON = "/usr/bin/python3"

BUS_NAME = "org.gpusched1"
MANAGER_PATH = "/org/gpusched1"
MANAGER_IFACE = "org.gpusched1.Manager"
MODEL_IFACE = "org.gpusched1.Model"
SLICE = "gpusched.slice"

# How often and how long to poll. Tests wait for a condition, never for a fixed time, except to prove that
# something does NOT change, which needs STILL seconds of watching (the counters tick every TICK seconds).
TICK = 0.05
POLL = 0.02
TIMEOUT = 10.0
STILL = 0.4


def run(
    *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output; on an unexpected failure the assertion message shows everything."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"$ {shlex.join(argv)}\nexit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def install_project() -> None:
    """Install the project into the guest as a package would (`make install`, offline from build/wheels), then what its
    maintainer scripts do (`make post-install`: sysusers, daemon-reload, dbus ReloadConfig). Starts nothing."""
    run(
        "make", "-C", str(REPO), "--no-print-directory", "install",
        "PREFIX=/usr", "PYTHON=/usr/bin/python3", "PIP_FLAGS=--no-index --find-links build/wheels",
        timeout=300,
    )  # fmt: skip
    # dbus-daemon's inotify would see the policy too, but later
    run("make", "-C", str(REPO), "--no-print-directory", "post-install", "PREFIX=/usr")


def in_sandbox() -> bool:
    """True inside tools/sandbox.sh's guest (its systemd records container=sysd-sandbox)."""
    try:
        return Path("/run/systemd/container").read_text().strip() == "sysd-sandbox"
    except OSError:
        return False


# The system and packaging tiers install into / : they run inside the sandbox's guest, where / is an overlay in RAM,
# or where GPUSCHED_SYSTEM_TESTS=1 says the machine is a throw-away one (a VM of their own).
ALLOWED = in_sandbox() or os.environ.get("GPUSCHED_SYSTEM_TESTS") == "1"


def gate_to_sandbox(items: list[pytest.Item], here: Path, what: str) -> None:
    """The one sandbox gate: mark the tests under `here` `system`, and skip them where they may not install into /.
    `what`: the tier and its make target, for the skip's reason."""
    skip = pytest.mark.skip(reason=f"{what} install into / : run them in the sandbox")
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.system)
            if not ALLOWED:
                item.add_marker(skip)


# --- D-Bus through busctl (the tool an admin would use) ---------------------------------------------------------


def bus_label_escape(label: str) -> str:
    """systemd's bus_label_escape(), written again here on purpose: the test must not trust the code it tests."""
    out = []
    for i, byte in enumerate(label.encode()):
        if chr(byte).isascii() and (chr(byte).isalpha() or (i > 0 and chr(byte).isdigit())):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02x}")
    return "".join(out) or "_"


def model_path(name: str) -> str:
    return f"/org/gpusched1/model/{bus_label_escape(name)}"


def model_unit(name: str) -> str:
    return f"gpusched-model@{name}.service"


def busctl_json(*args: str) -> Any:
    """`busctl --json=short ARGS` decoded; returns the "data" member (a property value or a call's reply list)."""
    out = run("busctl", "--system", "--json=short", *args).stdout
    return json.loads(out)["data"]


def get_property(path: str, iface: str, prop: str) -> Any:
    return busctl_json("get-property", BUS_NAME, path, iface, prop)


def model_property(name: str, prop: str) -> Any:
    return get_property(model_path(name), MODEL_IFACE, prop)


def manager_call(method: str, signature: str = "", *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, method]
    if signature:
        argv += [signature, *args]
    return run(*argv, check=check)


def list_models() -> dict[str, dict[str, Any]]:
    """Manager.ListModels() as {name: {state, unit, owner, main_pid, vram_bytes, snapshot_bytes}}."""
    rows = busctl_json("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListModels")[0]
    keys = ("state", "unit", "owner", "main_pid", "vram_bytes", "snapshot_bytes")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}


def name_has_owner(name: str = BUS_NAME) -> bool:
    out = run(
        "busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "NameHasOwner", "s", name, check=False,
    ).stdout  # fmt: skip
    return out.strip() == "b true"


def gpusched(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed CLI (/usr/bin/gpusched, the launcher `make install` wrote), never the checkout's code."""
    return run("gpusched", *args, check=check)


# --- systemd and cgroups ----------------------------------------------------------------------------------------


def unit_property(unit: str, prop: str) -> str:
    return run("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()


def cgroup_dir(unit: str) -> Path:
    cg = unit_property(unit, "ControlGroup")
    assert cg, f"{unit} has no control group (is it running?)"
    return Path("/sys/fs/cgroup" + cg)


def cgroup_frozen(unit: str) -> bool:
    """The kernel's word, not systemd's: `frozen 1` in cgroup.events once every task is frozen."""
    events = dict(line.split() for line in (cgroup_dir(unit) / "cgroup.events").read_text().splitlines())
    return events["frozen"] == "1"


def cgroup_pids(unit: str) -> set[int]:
    pids: set[int] = set()
    for procs in cgroup_dir(unit).rglob("cgroup.procs"):
        pids.update(int(p) for p in procs.read_text().split())
    return pids


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- a model that does visible work --------------------------------------------------------------------------------


class Counter:
    """The file examples/counter.py rewrites every TICK seconds: moving means the model runs, still means it is
    frozen (or dead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def argv(self) -> list[str]:
        return [GUEST_PYTHON, str(COUNTER), str(self.path), str(TICK)]

    def value(self) -> int:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return 0

    def assert_moving(self, timeout: float = TIMEOUT) -> None:
        """Wait for two increments (one could have been in flight when the model was frozen)."""
        start = self.value()
        wait_until(f"{self.path} to count past {start + 1}", lambda: self.value() > start + 1, timeout)

    def assert_still(self, seconds: float = STILL) -> None:
        """The counter does not change for `seconds` (many ticks)."""
        start = self.value()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = self.value()
            assert now == start, f"{self.path} moved from {start} to {now}: the model still runs"
            time.sleep(POLL)


def log(message: str) -> None:
    """Progress in the test's captured output (shown with the failure)."""
    print(message, file=sys.stderr)


def ensure_workdir() -> None:
    os.makedirs(WORKDIR, exist_ok=True)


@dataclass
class Models:
    """Starts counter models through the CLI and removes whatever a test left behind, whatever state it is in."""

    prefix: str
    names: list[str] = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def counter(self, name: str) -> Counter:
        return Counter(WORKDIR / f"{name}.count")

    def run(self, suffix: str, *options: str, argv: list[str] | None = None) -> tuple[str, Counter]:
        """`gpusched run --name PREFIX-SUFFIX OPTIONS -- argv` (default: a counter); waits until it counts."""
        name = self.name(suffix)
        counter = self.counter(name)
        self.names.append(name)
        gpusched("run", "--name", name, *options, "--", *(argv or counter.argv()))
        if argv is None:
            counter.assert_moving()
        return name, counter

    def cleanup(self) -> None:
        for name in self.names:
            unit = model_unit(name)
            gpusched("stop", name, check=False)
            gpusched("forget", name, check=False)
            run("systemctl", "stop", unit, check=False)
            run("systemctl", "reset-failed", unit, check=False)
            self.counter(name).path.unlink(missing_ok=True)
