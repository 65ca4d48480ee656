import sys
from pathlib import Path

# fake_units.py and friends live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Fake libcuda / fake GPU fixtures (gpu_dir, spawn_model, ...).
from fakegpu_fixtures import *  # noqa: F403
