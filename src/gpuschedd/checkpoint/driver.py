"""The `driver` checkpoint backend: the CUDA driver's checkpoint API through ctypes on libcuda.so.1.

No CUDA toolkit or Python binding is needed: the driver library the NVIDIA driver installs is enough.
GPUSCHED_LIBCUDA overrides the library path (the tests point it at a fake libcuda).

cuInit(0) is called once, when the backend is opened: the checkpoint calls need it in the calling process.
cuInit creates no context, so the daemon should hold no VRAM; whether that is so on the real driver is
measured on the GPU machine (tests/gpu). If it were not, the same calls run out of process through
`python -m gpuschedd.checkpoint.helper` (see helper.py and `helper_backend()`)."""

from __future__ import annotations

import ctypes
import logging

from ..libcuda import CUDA_SUCCESS, CUresult, device_prefix, error_name, library_path, open_library
from . import CheckpointError, CudaState

log = logging.getLogger(__name__)

# A PID for which GetState fails with one of these holds no CUDA context. The driver documents
# INVALID_VALUE and NOT_INITIALIZED for GetState; measured on driver 580.159.04 (H100), a live process that never
# used CUDA answers OPERATING_SYSTEM. Since a broken CUDA process could answer that too, the engine cross-checks
# with NVML and refuses to freeze a PID that holds VRAM but is not seen here.
NO_CONTEXT_ERRORS = frozenset(
    {"CUDA_ERROR_NOT_INITIALIZED", "CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_OPERATING_SYSTEM"}
)

_STATES = {0: CudaState.RUNNING, 1: CudaState.LOCKED, 2: CudaState.CHECKPOINTED, 3: CudaState.FAILED}

CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessGetRestoreThreadId",
)


# ---------------------------------------------------------------------------- the driver's structs (cuda.h)


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * 44),
        ("reserved1", ctypes.c_uint64),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


for _struct in (CUcheckpointLockArgs, CUcheckpointCheckpointArgs, CUcheckpointRestoreArgs, CUcheckpointUnlockArgs):
    assert ctypes.sizeof(_struct) == 64, _struct.__name__


def uuid_bytes(uuid: str) -> bytes:
    """NVML's 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx' (or bare hex) → the 16 bytes of a CUuuid."""
    text = uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a GPU UUID: {uuid!r}")
    return raw


class DriverUnavailable(Exception):
    """libcuda is missing, too old for the checkpoint API, or cuInit failed."""


class DriverCheckpoint:
    """CheckpointBackend over libcuda. Every call is blocking and thread-safe (the driver serializes
    itself); ctypes drops the GIL during a call, so a long checkpoint never stalls the event loop's thread."""

    name = "driver"

    def __init__(self, path: str | None = None) -> None:
        self.path = library_path(path)
        self.devices = device_prefix()
        try:
            lib = open_library(self.path)
        except OSError as e:
            raise DriverUnavailable(f"cannot load {self.path}: {e}") from None
        missing = [s for s in CHECKPOINT_SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise DriverUnavailable(f"{self.path} has no CUDA checkpoint API (missing {', '.join(missing)})")
        self._lib = lib
        self._declare()
        rc = lib.cuInit(0)
        if rc != CUDA_SUCCESS:
            raise DriverUnavailable(f"cuInit(0) failed: {self.error_name(rc)}")

    def _declare(self) -> None:
        lib, c_int = self._lib, ctypes.c_int
        for fn, args in (
            ("cuCheckpointProcessLock", CUcheckpointLockArgs),
            ("cuCheckpointProcessCheckpoint", CUcheckpointCheckpointArgs),
            ("cuCheckpointProcessRestore", CUcheckpointRestoreArgs),
            ("cuCheckpointProcessUnlock", CUcheckpointUnlockArgs),
        ):
            getattr(lib, fn).argtypes = [c_int, ctypes.POINTER(args)]
            getattr(lib, fn).restype = CUresult
        lib.cuCheckpointProcessGetState.argtypes = [c_int, ctypes.POINTER(c_int)]
        lib.cuCheckpointProcessGetState.restype = CUresult
        lib.cuCheckpointProcessGetRestoreThreadId.argtypes = [c_int, ctypes.POINTER(c_int)]
        lib.cuCheckpointProcessGetRestoreThreadId.restype = CUresult

    def error_name(self, rc: int) -> str:
        return error_name(self._lib, rc)

    def _check(self, pid: int, step: str, rc: int) -> None:
        if rc != CUDA_SUCCESS:
            raise CheckpointError(pid, step, self.error_name(rc))

    # ---------------------------------------------------------------- CheckpointBackend

    def state(self, pid: int) -> CudaState:
        value = ctypes.c_int(-1)
        self._check(pid, "get-state", self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(value)))
        try:
            return _STATES[value.value]
        except KeyError:
            # Newer drivers add transient states (checkpointing/restoring to custom storage), never ours.
            raise CheckpointError(pid, "get-state", f"unknown CUprocessState {value.value}") from None

    def cuda_pids(self, pids: list[int]) -> list[int]:
        found = []
        for pid in pids:
            try:
                self.state(pid)
            except CheckpointError as e:
                if e.reason in NO_CONTEXT_ERRORS:
                    continue
                raise  # NOT_SUPPORTED, ...: refuse rather than freeze a process we skipped
            found.append(pid)
        return found

    def restore_thread_id(self, pid: int) -> int:
        tid = ctypes.c_int(0)
        self._check(pid, "get-restore-tid", self._lib.cuCheckpointProcessGetRestoreThreadId(pid, ctypes.byref(tid)))
        return tid.value

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = CUcheckpointLockArgs(timeoutMs=max(0, int(timeout_ms)))
        self._check(pid, "lock", self._lib.cuCheckpointProcessLock(pid, ctypes.byref(args)))

    def checkpoint(self, pid: int) -> None:
        args = CUcheckpointCheckpointArgs()
        self._check(pid, "checkpoint", self._lib.cuCheckpointProcessCheckpoint(pid, ctypes.byref(args)))

    def restore(self, pid: int, gpu_pairs: list[tuple[str, str]] | None = None) -> None:
        args = CUcheckpointRestoreArgs()
        pairs = None
        if gpu_pairs:
            try:
                pairs = (CUcheckpointGpuPair * len(gpu_pairs))()
                for i, (old, new) in enumerate(gpu_pairs):
                    pairs[i].oldUuid.bytes[:] = list(uuid_bytes(old))
                    pairs[i].newUuid.bytes[:] = list(uuid_bytes(new))
            except ValueError as e:
                raise CheckpointError(pid, "restore", str(e)) from None
            args.gpuPairs = ctypes.cast(pairs, ctypes.POINTER(CUcheckpointGpuPair))
            args.gpuPairsCount = len(gpu_pairs)
        # `pairs` stays referenced until the call returns.
        self._check(pid, "restore", self._lib.cuCheckpointProcessRestore(pid, ctypes.byref(args)))
        del pairs

    def unlock(self, pid: int) -> None:
        args = CUcheckpointUnlockArgs()
        self._check(pid, "unlock", self._lib.cuCheckpointProcessUnlock(pid, ctypes.byref(args)))


def load_driver_backend(path: str | None = None) -> DriverCheckpoint | None:
    """The driver backend, or None (with the reason logged) where libcuda or its checkpoint API is absent."""
    try:
        return DriverCheckpoint(path)
    except DriverUnavailable as e:
        log.info("driver checkpoint backend unavailable: %s", e)
        return None
