"""What every user of the CUDA driver library shares: where libcuda is, loading it, naming its error codes.

Two programs load libcuda: the daemon's `driver` checkpoint backend and the agent inside a model process. The
agent runs as the model's user and imports nothing of the daemon, so this module imports nothing of gpuschedd."""

from __future__ import annotations

import ctypes
import os

LIBCUDA_ENV = "GPUSCHED_LIBCUDA"  # the tests point it at the fake libcuda
DEFAULT_LIBCUDA = "libcuda.so.1"
# The device files of the driver: a process with a CUDA context holds /dev/nvidiactl, /dev/nvidiaN and
# /dev/nvidia-uvm open for its whole life (cuInit opens them). The tests point it at the fake libcuda's device file.
DEVICES_ENV = "GPUSCHED_NVIDIA_DEVICES"
DEFAULT_DEVICES = "/dev/nvidia"

CUDA_SUCCESS = 0
CUresult = ctypes.c_int


def library_path(path: str | None = None) -> str:
    return path or os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBCUDA


def device_prefix() -> str:
    """The path prefix of the driver's device files (DEVICES_ENV, else /dev/nvidia)."""
    return os.environ.get(DEVICES_ENV) or DEFAULT_DEVICES


def open_library(path: str) -> ctypes.CDLL:
    """The library with cuInit and cuGetErrorName declared; OSError when it cannot be loaded."""
    lib = ctypes.CDLL(path)
    lib.cuInit.argtypes, lib.cuInit.restype = [ctypes.c_uint], CUresult
    lib.cuGetErrorName.argtypes = [CUresult, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorName.restype = CUresult
    return lib


def error_name(lib: ctypes.CDLL, rc: int) -> str:
    """The driver's name for a CUresult (CUDA_ERROR_...), or the number where the driver has none."""
    name = ctypes.c_char_p()
    if lib.cuGetErrorName(rc, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
        return name.value.decode()
    return f"CUresult {rc}"
