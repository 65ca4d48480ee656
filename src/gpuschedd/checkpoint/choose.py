"""Which checkpoint backend the daemon uses (the Manager's CheckpointBackend property says which).

CheckpointBackend= in gpuschedd.conf: `auto` takes the driver API when libcuda has it, else the
cuda-checkpoint binary when it is installed, else `none` (no NVIDIA driver: cgroup-only freeze). Naming
`driver` or `cli` explicitly and not having it is an error: the daemon must not quietly freeze models
without releasing their VRAM.

GPUSCHED_CHECKPOINT_HELPER=1 makes the driver backend run every step in a short-lived helper process
(`python -m gpuschedd.checkpoint.helper`) instead of in the daemon, for drivers where cuInit in a
long-lived process would hold a context or VRAM. GPUSCHED_LIBCUDA picks the library (tests: the fake)."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil

from ..libcuda import library_path
from . import CheckpointBackend, NoCheckpoint
from .cuda_checkpoint import CliCheckpoint
from .driver import CHECKPOINT_SYMBOLS, DriverCheckpoint, DriverUnavailable
from .helper import helper_backend

log = logging.getLogger(__name__)

HELPER_ENV = "GPUSCHED_CHECKPOINT_HELPER"


class BackendUnavailable(Exception):
    """The configured checkpoint backend cannot work on this host."""


def driver_has_checkpoint_api(path: str | None = None) -> bool:
    """Whether libcuda exports the checkpoint API; loads the library without calling anything in it."""
    try:
        lib = ctypes.CDLL(library_path(path))
    except OSError:
        return False
    return all(hasattr(lib, symbol) for symbol in CHECKPOINT_SYMBOLS)


def choose_checkpoint(backend: str = "auto", cuda_checkpoint: str = "cuda-checkpoint") -> CheckpointBackend:
    """backend: auto, driver, cli or none (Config.checkpoint_backend); cuda_checkpoint: Config.cuda_checkpoint."""
    if backend == "none":
        return NoCheckpoint()
    if backend in ("auto", "driver"):
        if os.environ.get(HELPER_ENV) == "1":
            if driver_has_checkpoint_api():
                return helper_backend()
            reason = "libcuda has no CUDA checkpoint API"
        else:
            try:
                return DriverCheckpoint()
            except DriverUnavailable as e:
                reason = str(e)
        if backend == "driver":
            raise BackendUnavailable(f"CheckpointBackend=driver: {reason}")
        log.info("driver checkpoint API unavailable (%s)", reason)
    if backend in ("auto", "cli"):
        if shutil.which(cuda_checkpoint):
            return CliCheckpoint(cuda_checkpoint)
        if backend == "cli":
            raise BackendUnavailable(f"CheckpointBackend=cli: {cuda_checkpoint} not found")
    return NoCheckpoint()
