import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# fake_units.py and friends live beside the tests; polling.py (shared by every tier) one level up.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

# Fake libcuda / fake GPU fixtures (gpu_dir, spawn_model, ...).
from engine_kit import Recorder, make_engine
from fake_units import FakeUnits
from fakegpu_fixtures import *  # noqa: F403

from gpuschedd.engine import Engine


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A plain process (no CUDA, nothing of gpuschedd), killed at the end."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def units() -> FakeUnits:
    return FakeUnits()


@pytest.fixture
def rec() -> Recorder:
    """What `engine` announced (engine_kit.Recorder)."""
    return Recorder()


@pytest.fixture
async def engine(units: FakeUnits, rec: Recorder) -> Engine:
    """A started engine on fake units (`units`), no checkpoint, no GPUs, `rec` listening."""
    eng, _ = make_engine(units, recorder=rec)
    await eng.start()
    return eng
