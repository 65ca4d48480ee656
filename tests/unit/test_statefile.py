"""The state file's own guarantees: its mode whatever the umask, no link followed, every save the whole table as it
is (its records kept between saves change nothing in it), and a failed write that is loud, retried, and never lets a
restart undo a Forget."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from fake_units import FakeUnits

from gpuschedd.checkpoint import NoCheckpoint
from gpuschedd.config import Config
from gpuschedd.engine import Engine
from gpuschedd.errors import GpuschedError
from gpuschedd.model import Model, State
from gpuschedd.options import RunOptions
from gpuschedd.statefile import FORMAT_VERSION, StateFile, boot_id, model_to_dict
from gpuschedd.telemetry import NoGpus

MODEL = Model("a", "gpusched-model@a.service", 0, ["x"], state=State.RUNNING, main_pid=1)


def test_the_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    old = os.umask(0o277)  # would leave 0400 to a file created 0600
    try:
        StateFile(str(path)).save([MODEL], {}, [])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_link_planted_in_the_directory_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    path = tmp_path / "models.json"
    (tmp_path / "models.json.tmp").symlink_to(victim)  # the temporary name an older version used
    StateFile(str(path)).save([MODEL], {}, [])
    assert victim.read_text() == "untouched"
    assert not path.is_symlink() and "gpusched-model@a.service" in path.read_text()


def test_every_save_is_the_whole_table_as_it_is_now(tmp_path: Path) -> None:
    """A save encodes again only the records that moved; the file is what json.dumps of the whole table gives, each
    model as it is at that save (one changed without a transition of its own, or a list changed in place, too)."""
    path = tmp_path / "models.json"
    state = StateFile(str(path))
    models = [Model(n, f"gpusched-model@{n}.service", 0, ["x"], pids=[i + 1]) for i, n in enumerate("abc")]

    def saved_is_now(forgotten: dict[str, int], swaps: list[tuple[str, str]], stopping: set[str]) -> None:
        state.save(models, forgotten, swaps, stopping)
        table = {
            "version": FORMAT_VERSION,
            "boot_id": boot_id(),
            "models": [model_to_dict(m) for m in models],
            "forgotten": forgotten,
            "swaps": [list(s) for s in swaps],
            "stopping": sorted(stopping),
        }
        assert path.read_text() == json.dumps(table, separators=(",", ":"))

    saved_is_now({}, [], set())
    models[0].state = State.FREEZING
    models[1].vram_bytes = 7  # read by a refresh: no transition of its own
    models[2].pids.append(9)
    saved_is_now({"u.service": 4}, [("a", "b")], {"c"})
    del models[1]
    saved_is_now({}, [], set())
    assert [m.name for m in state.load().models.values()] == ["a", "c"]
    assert state.load().models["c"].pids == [3, 9]


def full(*args: object, **kwargs: object) -> tuple[int, str]:
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_failed_write_is_kept_as_an_error_and_forget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    units = FakeUnits()
    state_file = StateFile(str(tmp_path / "models.json"))
    engine = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), state_file)
    await engine.start()
    await engine.run("a", ["sleep", "1"], RunOptions(), 0)
    saved = (tmp_path / "models.json").read_bytes()

    monkeypatch.setattr(tempfile, "mkstemp", full)
    await engine.freeze("a")  # what worked is not reported failed
    assert state_file.error and "No space left" in state_file.error
    assert (tmp_path / "models.json").read_bytes() == saved  # the older table stays
    await engine.thaw("a")
    with pytest.raises(GpuschedError, match="cannot forget"):
        await engine.forget("a")
    assert "a" in engine.models  # nothing changed

    monkeypatch.undo()
    await engine.forget("a")  # retried: saved now
    assert state_file.error is None
    again = Engine(units, NoCheckpoint(), NoGpus(), Config(ram_budget_bytes=1), state_file)
    await again.start()
    assert "a" not in again.models  # a restart does not take it over again
