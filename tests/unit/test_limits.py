"""Per-user limits, the ended-model TTL and safe text, through the engine with systemd faked at the edge
(tests/system/test_limits.py drives the installed daemon as unprivileged users)."""

from __future__ import annotations

import pytest
from engine_kit import Recorder, make_engine
from fake_units import FakeUnits

from gpuschedd import validate
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import InvalidArgs, LimitExceeded
from gpuschedd.events import Event, EventKind
from gpuschedd.options import RunOptions

NOBODY = 65534  # a uid with a user name on every host


@pytest.fixture
async def setup() -> tuple[Engine, FakeUnits, Recorder]:
    units = FakeUnits()
    config = Config(ram_budget_bytes=1 << 30, max_models_per_user=2, max_command_bytes_per_user=100)
    engine, events = make_engine(units, config=config)
    await engine.start()
    return engine, units, events


async def test_model_count_limit(setup: tuple[Engine, FakeUnits, Recorder]) -> None:
    engine, units, events = setup
    await engine.run("a", ["sleep"], RunOptions(), NOBODY)
    await engine.run("b", ["sleep"], RunOptions(), NOBODY)
    with pytest.raises(LimitExceeded, match="MaxModelsPerUser"):
        await engine.run("c", ["sleep"], RunOptions(), NOBODY)
    assert "c" not in engine.models and "gpusched-model@c.service" not in units.units
    assert events.events[-1].kind == EventKind.REFUSAL
    await engine.run("c", ["sleep"], RunOptions(), 0)  # root is exempt
    await engine.stop("a")
    with pytest.raises(LimitExceeded):  # an ended model still counts
        await engine.run("d", ["sleep"], RunOptions(), NOBODY)
    await engine.run("a", ["sleep"], RunOptions(), NOBODY)  # but running its name again replaces it


async def test_command_bytes_limit_counts_argv_and_environment(setup: tuple[Engine, FakeUnits, Recorder]) -> None:
    engine, _units, _events = setup
    await engine.run("a", ["x" * 49], RunOptions(), NOBODY)  # 50 bytes with its NUL
    with pytest.raises(LimitExceeded, match="MaxCommandBytesPerUser"):
        await engine.run("b", ["y" * 9], RunOptions(environment=["A=" + "z" * 40]), NOBODY)  # 10 + 43
    assert "b" not in engine.models
    await engine.run("b", ["y" * 9], RunOptions(environment=["A=" + "z" * 36]), NOBODY)  # 10 + 39: 99 in all


async def test_ended_models_are_dropped_after_their_ttl(setup: tuple[Engine, FakeUnits, Recorder]) -> None:
    engine, _units, events = setup
    engine.config.ended_model_ttl_sec = 60
    clock = [engine.now_usec()]
    engine.now_usec = lambda: clock[0]
    await engine.run("a", ["sleep"], RunOptions(), 0)
    await engine.run("b", ["sleep"], RunOptions(), 0)
    await engine.stop("a")
    clock[0] += 59_000_000
    await engine.apply_policies()
    assert "a" in engine.models
    clock[0] += 2_000_000
    await engine.apply_policies()
    assert "a" not in engine.models and "b" in engine.models
    forget = events.events[-1]
    assert forget.kind == EventKind.FORGET and forget.fields == {"GPUSCHED_REASON": "ended-ttl"}
    engine.config.ended_model_ttl_sec = 0
    await engine.stop("b")
    clock[0] += 10**12
    await engine.apply_policies()
    assert "b" in engine.models  # 0: kept until Forget


def test_shown_escapes_controls_and_format_characters() -> None:
    assert validate.shown("a\nb\u202ec\u200bd\te") == "a\\nb\\u202ec\\u200bd\\te"
    assert validate.shown("héllo 日本") == "héllo 日本"
    assert validate.shown("x" * 10, 4) == "xxxx…"
    event = Event(EventKind.REFUSAL, "m", "", "command not found: evil\nFAKE LINE")
    assert "\n" not in event.message and "\\nFAKE LINE" in event.message


def test_description_refuses_format_characters() -> None:
    assert validate.description("Qwen 7B — chat, ünïcode") == "Qwen 7B — chat, ünïcode"
    for bad in ("a\u202eb", "zero\u200bwidth", "tab\t", "line\u2028sep", "del\x7f"):
        with pytest.raises(InvalidArgs):
            validate.description(bad)


def test_one_run_keeps_at_most_a_mebibyte() -> None:
    assert validate.command_bytes(["a", "bc"], ["X=1"]) == 2 + 3 + 4
    with pytest.raises(InvalidArgs):
        validate.command_bytes(["x" * 60_000] * 10, ["A=" + "y" * 60_000] * 8)
