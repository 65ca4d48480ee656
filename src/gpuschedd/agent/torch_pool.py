"""PyTorch's side of the agent: a memory pool whose segments come from a ParkingLot.

PyTorch's caching allocator stays in charge (block splitting, caching, streams); only the segments it asks for
(2 MiB and up, a few hundred for a 7B model) come from us, through ctypes callbacks registered as a pluggable
allocator backing a `torch.cuda.MemPool`. The thread that enables the pool routes its allocations there from
then on; allocations of other threads, and CUDA graphs' private pools, stay with the default allocator and are
moved by the driver's checkpoint like any process's memory. (Routing every thread with PyTorch's
`_cuda_beginAllocateToPool` would also take graph captures' allocations, and leaves the allocator believing a
capture is always under way: not done.)"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from .parking import ParkingLot

log = logging.getLogger(__name__)

# PyTorch's pluggable allocator: void* alloc(ssize_t size, int device, cudaStream_t stream);
# void free(void* ptr, ssize_t size, int device, cudaStream_t stream).
_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)


class TorchPool:
    """Keeps the callbacks, the allocator and the pool alive for the life of the process."""

    def __init__(self, lot: ParkingLot) -> None:
        import torch

        self.lot = lot

        def alloc(size: int, device: int, stream: int) -> int:
            try:
                return lot.malloc(size, device)
            except Exception as e:  # PyTorch turns a NULL into its own out-of-memory error
                log.warning("gpusched agent: allocation of %d bytes on device %d failed: %s", size, device, e)
                return 0

        def free(ptr: int, size: int, device: int, stream: int) -> None:
            try:
                lot.free(ptr)
            except Exception as e:  # an exception cannot cross into PyTorch's C++
                log.error("gpusched agent: free of %#x failed: %s", ptr or 0, e)

        self._alloc, self._free = _ALLOC(alloc), _FREE(free)
        addr = ctypes.cast(self._alloc, ctypes.c_void_p).value
        faddr = ctypes.cast(self._free, ctypes.c_void_p).value
        self.allocator = torch._C._cuda_customAllocator(addr, faddr)
        self.pool = torch.cuda.MemPool(self.allocator)
        self._routing: Any = None

    def route(self) -> None:
        """From now on, the calling thread's CUDA tensors are allocated in the pool."""
        import torch

        self._routing = torch.cuda.use_mem_pool(self.pool)
        self._routing.__enter__()

    def release_cache(self) -> None:
        """Give cached, unused blocks of every pool back (so they are neither parked nor checkpointed)."""
        import torch

        torch.cuda.empty_cache()
