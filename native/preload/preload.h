/* What the interposer's parts share: the driver's real entry points (resolved from the libcuda the program
 * loaded), the gate, the parking lot (park.c) and the daemon's listener (agent.c). */
#ifndef GPUSCHED_PRELOAD_H
#define GPUSCHED_PRELOAD_H
#include "cuda_abi.h"

/* Built with -fvisibility=hidden: only the wrappers and the hooks are exported. */
#define EXPORT __attribute__((visibility("default")))

/* Driver calls the interposer makes itself without wrapping them. */
#define USED(X) \
	X(cuCtxGetCurrent) X(cuCtxSetCurrent) X(cuCtxGetDevice) X(cuCtxSynchronize) X(cuStreamCreate) \
	X(cuStreamSynchronize) X(cuStreamDestroy_v2) X(cuMemHostRegister_v2) X(cuMemHostUnregister) \
	X(cuMemGetAllocationGranularity) X(cuMemAddressReserve) X(cuMemAddressFree) X(cuGetErrorName)
#define REAL_EXTERN(n) extern void *real_##n;
USED(REAL_EXTERN)
REAL_EXTERN(cuMemAlloc_v2) REAL_EXTERN(cuMemFree_v2) REAL_EXTERN(cuMemCreate) REAL_EXTERN(cuMemRelease)
REAL_EXTERN(cuMemMap) REAL_EXTERN(cuMemUnmap) REAL_EXTERN(cuMemSetAccess) REAL_EXTERN(cuMemExportToShareableHandle)
REAL_EXTERN(cuMemGetAllocationPropertiesFromHandle) REAL_EXTERN(cuMemRetainAllocationHandle)
REAL_EXTERN(cuMemcpyDtoHAsync_v2) REAL_EXTERN(cuMemcpyHtoDAsync_v2)

/* Call the driver's NAME (resolved: the wrapper that led here resolved it) with the given signature. */
#define DRV(n, ret, params) ((ret(*) params)real_##n)

void preload_resolve(void *inside);
void preload_gate_enter(void);
void preload_gate_exit(void);
int preload_gate_close(double seconds);
void preload_gate_open(void);

/* park.c: the memory it parks, the program's own VMM allocations included (handles translated). */
CUresult park_alloc(CUdeviceptr *dptr, size_t size);
CUresult park_free(CUdeviceptr dptr);
CUresult park_cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
			  unsigned long long flags);
CUresult park_cuMemRelease(CUmemGenericAllocationHandle h);
CUresult park_cuMemMap(CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h,
		       unsigned long long flags);
CUresult park_cuMemUnmap(CUdeviceptr p, size_t size);
CUresult park_cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t n);
CUresult park_cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, int type,
					   unsigned long long flags);
CUresult park_cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle h);
CUresult park_cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr);

struct park_report {
	unsigned long long bytes;
	unsigned long long staging; /* host memory kept beside the parked bytes until the unpark: the staging ring */
	unsigned segments;
	double seconds;
	unsigned long long address; /* park_out: where the parked bytes lie in this process (0 when there are none) */
};
/* 0, or -1 (nothing parked) or -2 (some still parked) with `err` saying what happened and where the memory is
 * (the gate is the caller's business). park_out waits at most `seconds` for the program's GPU work to finish. */
int park_out(double seconds, struct park_report *rep, char *err, size_t errlen);
int park_in(struct park_report *rep, char *err, size_t errlen);
int park_is_parked(void);
/* The daemon wrote the parked bytes to the file behind `fd` (offset 0, as laid out in the host area): give the
 * host area back and read the bytes from the file at the unpark; the file is closed then. 0, or -1 with `err`
 * (nothing changed; `fd` is the caller's to close). */
int park_spill(int fd, struct park_report *rep, char *err, size_t errlen);
/* Spilled: start reading the file's first `bytes` (at most what was spilled, whole pages) into host memory on
 * threads of their own, for the unpark to take from there; `*started` says how many (what an earlier call
 * started, if one did). 0, or -1 with `err` (not spilled, no memory). */
int park_read_ahead(size_t bytes, size_t *started, char *err, size_t errlen);

/* agent.c */
void agent_start(void);
void agent_forked(void);

double preload_now(void);
#endif
