"""PyTorch's side of the agent: a memory pool whose segments come from a ParkingLot.

PyTorch's caching allocator stays in charge (block splitting, caching, streams); only the segments it asks for
(2 MiB and up, a few hundred for a 7B model) come from us, through ctypes callbacks registered as a pluggable
allocator backing a `torch.cuda.MemPool`. What any thread allocates inside `routing()` lands there: transformers
loads weights in worker threads (measured: routing the calling thread alone, with `use_mem_pool`, left a Qwen2.5
model's weights outside the pool, and PyTorch refuses to route a second thread to the same pool at once).
Outside the scope, activations and CUDA graphs' private pools stay with the default allocator and are moved by
the driver's checkpoint like any process's memory. Routing stays scoped because, while it is on, PyTorch treats
the process as capturing a graph: graph captures' own allocations would land in the pool, and blocks used on
several streams are not recycled."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator

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

    @contextlib.contextmanager
    def routing(self) -> Iterator[None]:
        """Allocate in the pool every thread's CUDA tensors on the current device, inside the scope."""
        import torch

        device = torch.cuda.current_device()
        torch._C._cuda_beginAllocateToPool(device, self.pool.id)
        try:
            yield
        finally:
            torch._C._cuda_endAllocateToPool(device, self.pool.id)
            torch._C._cuda_releasePool(device, self.pool.id)

    def release_cache(self) -> None:
        """Give cached, unused blocks back (so they are neither parked nor checkpointed)."""
        import torch

        torch.cuda.empty_cache()
