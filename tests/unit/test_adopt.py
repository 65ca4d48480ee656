"""Adopt (an existing unit, in place) and AdoptProcesses (running processes into gpusched-adopt-NAME.scope), with
systemd faked at the edge; the processes are real (their owner is read from /proc)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest
from fake_units import FakeUnits
from polling import wait_until

from gpuschedd import adopt
from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import AccessDenied, InvalidArgs, InvalidState, ModelExists, NoSuchModel
from gpuschedd.events import Event, EventKind
from gpuschedd.model import State, now_usec
from gpuschedd.options import Policies
from gpuschedd.statefile import StateFile
from gpuschedd.telemetry import NoGpus

ME = os.getuid()
MY_NAME = pwd.getpwuid(ME).pw_name
NOBODY = 65534


async def make_engine(units: FakeUnits, state: Path | None = None) -> tuple[Engine, list[Event]]:
    engine = Engine(
        units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1 << 30), StateFile(str(state)) if state else None
    )
    events: list[Event] = []

    class Listener:
        def model_added(self, model: object) -> None: ...
        def model_changed(self, model: object) -> None: ...
        def model_removed(self, model: object) -> None: ...
        def event(self, event: Event) -> None:
            events.append(event)

    engine.add_listener(Listener())  # type: ignore[arg-type]
    await engine.start()
    return engine, events


# ------------------------------------------------------------------------------------------- Adopt


async def test_adopt_manages_a_unit_in_place() -> None:
    units = FakeUnits()
    units.add_unit("vllm.service", [4242, 4243], user=MY_NAME, command=["vllm", "serve"])
    engine, events = await make_engine(units)
    model = await engine.adopt("llm", "vllm.service", ME)
    assert (model.unit, model.owner, model.command, model.pids) == ("vllm.service", ME, ["vllm", "serve"], [4242, 4243])
    assert "vllm.service" in units.tracked  # its exit is heard though its name is not ours
    assert events[-1].kind == EventKind.ADOPT
    await engine.freeze("llm")
    assert units.units["vllm.service"].frozen and model.state == State.FROZEN
    await engine.thaw("llm")
    assert not units.units["vllm.service"].frozen and model.state == State.RUNNING
    assert [c for c in units.calls if c[0] == "start"] == []  # nothing was started


async def test_adopt_refusals() -> None:
    units = FakeUnits()
    units.add_unit("root.service", [10], user="root")
    units.add_unit("mine.service", [11], user=MY_NAME)
    units.add_unit("gpuschedd.service", [12])
    units.add_unit("self.service", [os.getpid()], user=MY_NAME)
    units.add_unit("idle.service", [13], user=MY_NAME)
    units.units["idle.service"] = units.units["idle.service"].__class__("idle.service", "inactive", 0, [], False)
    units.add_unit("cold.service", [14], user=MY_NAME)
    await units.freeze("cold.service")
    engine, _ = await make_engine(units)
    caller = ME or 1000  # a caller that is not root
    cases: list[tuple[str, str, type[Exception]]] = [
        ("a", "gpuschedd.service", InvalidArgs),
        ("a", "gpusched-model@x.service", InvalidArgs),
        ("a", "gpusched-adopt-x.scope", InvalidArgs),
        ("a", "getty@.service", InvalidArgs),
        ("a", "gpusched.slice", InvalidArgs),
        ("a", "user.slice", InvalidArgs),
        ("a", "nothere.service", InvalidArgs),
        ("a", "bad/name.service", InvalidArgs),
        ("a", "idle.service", InvalidState),
        ("a", "cold.service", InvalidState),
        ("a", "self.service", InvalidArgs),
        ("../x", "mine.service", InvalidArgs),
    ]
    if caller != 0:
        cases.append(("a", "root.service", AccessDenied))
    for name, unit, error in cases:
        with pytest.raises(error):
            await engine.adopt(name, unit, caller if unit != "root.service" else 1000)
    assert engine.models == {}
    await engine.adopt("a", "root.service", 1000, others=True)  # `manage` granted by the bus layer
    assert engine.models["a"].owner == 0
    with pytest.raises(ModelExists):
        await engine.adopt("b", "root.service", 0)  # the unit is a model already
    with pytest.raises(ModelExists):
        await engine.adopt("a", "mine.service", ME)  # the name is taken


async def test_an_adopted_unit_that_exits_is_reported() -> None:
    units = FakeUnits()
    units.add_unit("vllm.service", [4242], user=MY_NAME)
    engine, _ = await make_engine(units)
    await engine.adopt("llm", "vllm.service", ME)
    units.exit("vllm.service", "exit-code")
    assert engine.models["llm"].state == State.FAILED


async def test_adopted_units_survive_a_restart_and_forget_lets_go(tmp_path: Path) -> None:
    units = FakeUnits()
    units.add_unit("vllm.service", [4242], user=MY_NAME)
    units.add_unit("other.service", [4250], user=MY_NAME)
    state = tmp_path / "models.json"
    engine, _ = await make_engine(units, state)
    await engine.adopt("llm", "vllm.service", ME)
    await engine.adopt("other", "other.service", ME)
    await engine.freeze("other")

    units.tracked.clear()
    again, _ = await make_engine(units, state)
    assert again.models["llm"].unit == "vllm.service" and again.models["llm"].state == State.RUNNING
    assert again.models["other"].state == State.FROZEN
    assert {"vllm.service", "other.service"} <= units.tracked

    with pytest.raises(InvalidState):
        await again.forget("other")  # frozen: thaw first
    await again.forget("llm")
    assert "vllm.service" not in units.tracked and units.units["vllm.service"].active_state == "active"
    third, _ = await make_engine(units, state)
    assert "llm" not in third.models and "other" in third.models
    # Adopting it again is allowed.
    await third.adopt("llm", "vllm.service", ME)


async def test_adopted_models_take_policies_like_run(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    units = FakeUnits()
    units.add_unit("vllm.service", [4242], user=MY_NAME)
    state = tmp_path / "models.json"
    engine, events = await make_engine(units, state)
    llm = await engine.adopt("llm", "vllm.service", ME, policies=Policies(priority=3, frozen_ttl_sec=10))
    nb = await engine.adopt_processes("nb", [sleeper.pid], ME, policies=Policies(priority=-1, idle_freeze_sec=0))
    plain = await engine.adopt("plain", units.add_unit("p.service", [4243], user=MY_NAME).unit, ME)
    assert (llm.priority, llm.idle_freeze_sec, llm.frozen_ttl_sec) == (3, -1, 10)
    assert (nb.priority, nb.idle_freeze_sec, nb.frozen_ttl_sec) == (-1, 0, 0)
    assert (plain.priority, plain.idle_freeze_sec, plain.frozen_ttl_sec) == (0, -1, 0)
    again, events = await make_engine(units, state)
    kept = again.models["llm"]
    assert (kept.priority, kept.frozen_ttl_sec, again.models["nb"].idle_freeze_sec) == (3, 10, 0)
    await again.freeze("llm")
    again.now_usec = lambda: now_usec() + 11_000_000  # type: ignore[method-assign]
    await again.apply_policies()
    assert kept.state == State.STOPPED and events[-1].fields["GPUSCHED_REASON"] == "frozen-ttl"


# ------------------------------------------------------------------------------------------- AdoptProcesses


async def test_adopt_processes_moves_them_into_a_scope(sleeper: subprocess.Popen[bytes]) -> None:
    units = FakeUnits()
    engine, events = await make_engine(units)
    model = await engine.adopt_processes("nb", [sleeper.pid], ME)
    assert model.unit == "gpusched-adopt-nb.scope" == adopt.scope_unit("nb")
    assert ("start_scope", "gpusched-adopt-nb.scope") in units.calls
    assert model.pids == [sleeper.pid] and model.owner == ME and model.command == ["sleep", "60"]
    assert events[-1].kind == EventKind.ADOPT
    await engine.freeze("nb")
    assert units.units["gpusched-adopt-nb.scope"].frozen
    with pytest.raises(ModelExists):
        await engine.adopt_processes("nb2", [sleeper.pid], ME)  # in a model already
    with pytest.raises(ModelExists):
        await engine.adopt_processes("nb", [os.getppid()], 0)  # the name is taken
    await engine.thaw("nb")
    await engine.forget("nb")
    with pytest.raises(NoSuchModel):
        engine.get("nb")


async def test_adopt_processes_refusals(sleeper: subprocess.Popen[bytes]) -> None:
    engine, _ = await make_engine(FakeUnits())
    for pids in ([], [1], [os.getpid()], [0], [2**22 + 12345]):
        with pytest.raises(InvalidArgs):
            await engine.adopt_processes("x", pids, ME)
    if adopt.is_kernel_thread(2):
        with pytest.raises(InvalidArgs):
            await engine.adopt_processes("x", [2], 0)
    with pytest.raises(AccessDenied):
        await engine.adopt_processes("x", [sleeper.pid], ME + 1 if ME else NOBODY)  # not the caller's
    assert engine.models == {}
    await engine.adopt_processes("x", [sleeper.pid], NOBODY if ME == 0 else ME + 1, others=True)
    assert engine.models["x"].owner == ME


def test_unit_names() -> None:
    assert adopt.check_unit_name("vllm.service") == "vllm.service"
    assert adopt.check_unit_name("getty@tty1.service") == "getty@tty1.service"
    assert adopt.check_unit_name("run-u12.scope") == "run-u12.scope"
    for bad in ("vllm", "x.socket", "getty@.service", "gpuschedd.service", "a b.service", "x" * 300 + ".service", 3):
        with pytest.raises(InvalidArgs):
            adopt.check_unit_name(bad)


@pytest.mark.skipif(ME != 0, reason="changing uids needs root")
def test_a_process_whose_uids_differ_counts_as_the_other_user() -> None:
    """A setuid program (effective uid not the real one) holds the other user's rights: it counts as that user's,
    so its real user alone may not adopt it. Each of effective, saved and filesystem uid counts."""
    for flag, counts_as in (("--euid", NOBODY), ("--ruid", 0)):
        proc = subprocess.Popen(["setpriv", f"{flag}={NOBODY}", "--", "sleep", "30"])
        try:
            # setpriv has changed the uid and run sleep
            wait_until("setpriv to run sleep", lambda pid=proc.pid: adopt.cmdline(pid)[:1] == ["sleep"])
            ids = Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split()[:4]
            assert len(set(ids)) > 1, ids
            assert adopt.process_uid(proc.pid) == counts_as
        finally:
            proc.kill()
            proc.wait()


async def test_a_process_that_ends_before_the_move_is_not_adopted(sleeper: subprocess.Popen[bytes]) -> None:
    """The pidfds held from the check (before the polkit wait) to the move: a process that ended meanwhile, its PID
    free for another, fails the call with InvalidArgs and nothing is moved."""
    units = FakeUnits()
    engine, _events = await make_engine(units)
    with adopt.Pins([sleeper.pid]) as pins:
        engine.adoptable_pids("nb", [sleeper.pid])
        pins.verify()
        sleeper.kill()
        sleeper.wait()  # reaped: the PID may now be given to any new process
        with pytest.raises(InvalidArgs, match=f"process {sleeper.pid} ended while the call was being authorized"):
            pins.verify()
        with pytest.raises(InvalidArgs):
            await engine.adopt_processes("nb", [sleeper.pid], ME, pins=pins)
    assert "nb" not in engine.models and not [c for c in units.calls if c[0] == "start_scope"]
    with pytest.raises(InvalidArgs, match="no such process"):
        adopt.Pins([sleeper.pid])
