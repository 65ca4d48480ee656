"""The CUDA driver calls the agent needs, through ctypes on libcuda: virtual memory management (reserve an
address range, create physical memory, map it there, unmap and release it while the range stays reserved),
copies, streams and page-locked host memory.

Why the driver API and not the runtime: the agent runs inside any PyTorch process without a CUDA toolkit,
and the driver library is always there. GPUSCHED_LIBCUDA points it at the fake libcuda in CI."""

from __future__ import annotations

import ctypes
import threading

from ..libcuda import CUDA_SUCCESS, error_name, library_path, open_library

c_size_t, c_ull, c_void_p, c_int = ctypes.c_size_t, ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_int
CUdeviceptr = ctypes.c_uint64

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_STREAM_NON_BLOCKING = 1


class CudaError(Exception):
    """A driver call failed: `call` is the entry point, `reason` the driver's error name."""

    def __init__(self, call: str, reason: str) -> None:
        super().__init__(f"{call} failed: {reason}")
        self.call = call
        self.reason = reason


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", c_int),
        ("requestedHandleTypes", c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", c_int)]


assert ctypes.sizeof(CUmemAllocationProp) == 32 and ctypes.sizeof(CUmemAccessDesc) == 12

_SIGNATURES: dict[str, list[type]] = {
    "cuInit": [ctypes.c_uint],
    "cuCtxGetCurrent": [ctypes.POINTER(c_void_p)],
    "cuCtxSetCurrent": [c_void_p],
    "cuCtxSynchronize": [],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(c_size_t), ctypes.POINTER(CUmemAllocationProp), c_int],
    "cuMemAddressReserve": [ctypes.POINTER(CUdeviceptr), c_size_t, c_size_t, CUdeviceptr, c_ull],
    "cuMemAddressFree": [CUdeviceptr, c_size_t],
    "cuMemCreate": [ctypes.POINTER(c_ull), c_size_t, ctypes.POINTER(CUmemAllocationProp), c_ull],
    "cuMemRelease": [c_ull],
    "cuMemMap": [CUdeviceptr, c_size_t, c_size_t, c_ull, c_ull],
    "cuMemUnmap": [CUdeviceptr, c_size_t],
    "cuMemSetAccess": [CUdeviceptr, c_size_t, ctypes.POINTER(CUmemAccessDesc), c_size_t],
    "cuMemcpyDtoHAsync_v2": [c_void_p, CUdeviceptr, c_size_t, c_void_p],
    "cuMemcpyHtoDAsync_v2": [CUdeviceptr, c_void_p, c_size_t, c_void_p],
    "cuStreamCreate": [ctypes.POINTER(c_void_p), ctypes.c_uint],
    "cuStreamSynchronize": [c_void_p],
    "cuStreamDestroy_v2": [c_void_p],
    "cuMemHostRegister_v2": [c_void_p, c_size_t, ctypes.c_uint],
    "cuMemHostUnregister": [c_void_p],
}


class Cuda:
    """One loaded libcuda. Every method raises CudaError; ctypes drops the GIL during each call, so copies
    on several threads run at once."""

    def __init__(self, path: str | None = None) -> None:
        self.path = library_path(path)
        lib = open_library(self.path)
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, c_int
        self._lib = lib
        self._granularity: dict[int, int] = {}
        self._lock = threading.Lock()
        self._call("cuInit", 0)

    def _call(self, name: str, *args: object) -> None:
        rc = getattr(self._lib, name)(*args)
        if rc != CUDA_SUCCESS:
            raise CudaError(name, error_name(self._lib, rc))

    # ---------------------------------------------------------------- contexts and streams

    def current_context(self) -> int:
        ctx = c_void_p()
        self._call("cuCtxGetCurrent", ctypes.byref(ctx))
        return ctx.value or 0

    def set_context(self, ctx: int) -> None:
        self._call("cuCtxSetCurrent", c_void_p(ctx))

    def synchronize(self) -> None:
        self._call("cuCtxSynchronize")

    def stream(self) -> int:
        s = c_void_p()
        self._call("cuStreamCreate", ctypes.byref(s), CU_STREAM_NON_BLOCKING)
        return s.value or 0

    def stream_sync(self, stream: int) -> None:
        self._call("cuStreamSynchronize", c_void_p(stream))

    def stream_destroy(self, stream: int) -> None:
        self._call("cuStreamDestroy_v2", c_void_p(stream))

    # ---------------------------------------------------------------- virtual memory management

    @staticmethod
    def _prop(device: int) -> CUmemAllocationProp:
        prop = CUmemAllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device)
        return prop

    def granularity(self, device: int) -> int:
        with self._lock:
            if device not in self._granularity:
                g = c_size_t()
                prop = self._prop(device)
                self._call("cuMemGetAllocationGranularity", ctypes.byref(g), ctypes.byref(prop), 0)
                self._granularity[device] = g.value
            return self._granularity[device]

    def reserve(self, size: int, alignment: int = 0, hint: int = 0) -> int:
        ptr = CUdeviceptr()
        self._call("cuMemAddressReserve", ctypes.byref(ptr), size, alignment, hint, 0)
        return ptr.value

    def address_free(self, ptr: int, size: int) -> None:
        self._call("cuMemAddressFree", ptr, size)

    def create(self, size: int, device: int) -> int:
        handle = c_ull()
        prop = self._prop(device)
        self._call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(prop), 0)
        return handle.value

    def release(self, handle: int) -> None:
        self._call("cuMemRelease", handle)

    def map(self, ptr: int, size: int, handle: int, device: int) -> None:
        """Map `handle` at `ptr` and make it readable and writable from `device`."""
        self._call("cuMemMap", ptr, size, 0, handle, 0)
        access = CUmemAccessDesc(CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        try:
            self._call("cuMemSetAccess", ptr, size, ctypes.byref(access), 1)
        except CudaError:
            self._call("cuMemUnmap", ptr, size)
            raise

    def unmap(self, ptr: int, size: int) -> None:
        self._call("cuMemUnmap", ptr, size)

    # ---------------------------------------------------------------- copies and host memory

    def copy_out(self, host: int, device_ptr: int, size: int, stream: int) -> None:
        self._call("cuMemcpyDtoHAsync_v2", c_void_p(host), device_ptr, size, c_void_p(stream))

    def copy_in(self, device_ptr: int, host: int, size: int, stream: int) -> None:
        self._call("cuMemcpyHtoDAsync_v2", device_ptr, c_void_p(host), size, c_void_p(stream))

    def host_register(self, host: int, size: int) -> None:
        self._call("cuMemHostRegister_v2", c_void_p(host), size, 0)

    def host_unregister(self, host: int) -> None:
        self._call("cuMemHostUnregister", c_void_p(host))
