"""The state machine as code (model.TRANSITIONS, transition, require): every edge of the table is walked, every
other pair refused; each verb's guard accepts exactly its states, with the refusal texts callers see."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gpuschedd.errors import InvalidState
from gpuschedd.model import ENDED, REQUIRES, TRANSITIONS, IllegalTransition, Model, State, require, transition


def model_in(state: State) -> Model:
    model = Model(name="m", unit="gpusched-m.service", owner=1000, command=["x"])
    model.state = state
    return model


def test_the_table_covers_every_state_and_ended_is_final() -> None:
    assert set(TRANSITIONS) == set(State)
    for state in ENDED:
        assert not TRANSITIONS[state]
    for state in set(State) - set(ENDED):
        assert set(ENDED) <= TRANSITIONS[state], f"{state} must be able to end (a crash, a Stop)"


def test_every_state_is_reachable_from_running() -> None:
    seen, todo = {State.RUNNING}, [State.RUNNING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(State)


@pytest.mark.parametrize(("before", "after"), list(itertools.product(State, State)))
def test_transition_takes_exactly_the_edges_of_the_table(before: State, after: State) -> None:
    model = model_in(before)
    model.state_change_usec = 0
    if after in TRANSITIONS[before]:
        transition(model, after)
        assert model.state == after and model.state_change_usec > 0
    else:
        with pytest.raises(IllegalTransition):
            transition(model, after)
        assert model.state == before and model.state_change_usec == 0


@pytest.mark.parametrize(("verb", "state"), list(itertools.product(REQUIRES, State)))
def test_require_accepts_exactly_the_verbs_states(verb: str, state: State) -> None:
    allowed, _refusal = REQUIRES[verb]
    if state in allowed:
        require(model_in(state), verb)
    else:
        with pytest.raises(InvalidState, match=rf"^model 'm' is {state}"):
            require(model_in(state), verb)


def test_the_refusals_say_what_they_said_before() -> None:
    with pytest.raises(InvalidState, match=r"^model 'm' is frozen, not running$"):
        require(model_in(State.FROZEN), "freeze")
    with pytest.raises(InvalidState, match=r"^model 'm' is running, not frozen$"):
        require(model_in(State.RUNNING), "thaw")
    with pytest.raises(InvalidState, match=r"^model 'm' is stopped, not running or frozen$"):
        require(model_in(State.STOPPED), "migrate")
    with pytest.raises(InvalidState, match=r"^model 'm' is frozen: thaw it before forgetting it$"):
        require(model_in(State.FROZEN), "forget")


def test_a_verb_that_starts_a_transition_is_only_allowed_where_the_table_has_its_edge() -> None:
    """freeze leaves running for freezing, thaw frozen for thawing: the guard never lets a step start on an edge the
    table does not have."""
    for verb, first_step in (("freeze", State.FREEZING), ("thaw", State.THAWING)):
        for state in REQUIRES[verb][0]:
            assert first_step in TRANSITIONS[state]


def test_clear_runtime_forgets_the_processes_and_what_they_held() -> None:
    model = model_in(State.FROZEN)
    model.pids, model.main_pid, model.cuda_pids = [1, 2], 1, [2]
    model.snapshot_bytes = model.vram_bytes = model.parked_bytes = 5
    model.clear_runtime()
    assert (model.pids, model.main_pid, model.cuda_pids) == ([], 0, [])
    assert model.snapshot_bytes == model.vram_bytes == model.parked_bytes == 0


def test_the_table_in_the_architecture_document_is_the_code() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    block = doc.split("<!-- state-table: checked by tests/unit/test_state_machine.py -->\n```\n", 1)[1].split("```")[0]
    written: dict[State, frozenset[State]] = {}
    for line in block.strip().splitlines():
        before, after = (part.strip() for part in line.split("->"))
        written[State(before)] = frozenset() if after == "(none)" else frozenset(State(s) for s in after.split(", "))
    assert written == TRANSITIONS
