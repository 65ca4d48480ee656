"""The state file's own guarantees: its mode whatever the umask, no link followed, and a failed write that is loud,
retried, and never lets a restart undo a Forget."""

from __future__ import annotations

import errno
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
from gpuschedd.statefile import StateFile
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
