/* libgpuschedd-preload.so: gpuschedd's fast path for CUDA programs that were not changed (issue 16,
 * docs/fast-path.md "The transparent fast path"). Loaded through LD_PRELOAD, it:
 *  - catches the driver entry points however the program finds them: a dlsym hook and cuGetProcAddress{,_v2}
 *    hooks swap what the driver hands out for this library's wrappers (by the address returned, so every _v2,
 *    _ptsz, _ptds variant maps to its own wrapper), and the wrappers are exported for programs linked with -lcuda;
 *  - keeps a gate (gate.h) around every call that enqueues work or touches memory, so a park finds no work in
 *    flight and none can start until the unpark; blocking waits stay outside it;
 *  - serves cuMemAlloc/cuMemFree from CUDA virtual memory management at stable addresses and tracks the VMM
 *    allocations the program makes itself (park.c), so a park can release their physical memory and an unpark
 *    restore it at the same addresses;
 *  - answers the daemon's park/unpark requests (src/gpuschedd/agent/protocol.py) from a listener thread started at
 *    the first cuInit (agent.c).
 * A process that never calls cuInit sees only the two hooks (no libcuda loaded, no thread started). */
#define _GNU_SOURCE
#include "preload.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gate.h"

/* ---------------------------------------------------------------- the entry points this library wraps */

#define LK_P (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, \
	unsigned sh, CUstream s, void **p, void **e)
#define LK_A (f, gx, gy, gz, bx, by, bz, sh, s, p, e)
#define LC_P (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, \
	unsigned sh, CUstream s, void **p)
#define LC_A (f, gx, gy, gz, bx, by, bz, sh, s, p)
#define LX_P (const void *c, CUfunction f, void **p, void **e)
#define LX_A (c, f, p, e)
#define CP_P (CUdeviceptr d, CUdeviceptr s, size_t n)
#define CP_A (d, s, n)
#define CPA_P (CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st)
#define CPA_A (d, s, n, st)
#define HD_P (CUdeviceptr d, const void *s, size_t n)
#define HDA_P (CUdeviceptr d, const void *s, size_t n, CUstream st)
#define DH_P (void *d, CUdeviceptr s, size_t n)
#define DHA_P (void *d, CUdeviceptr s, size_t n, CUstream st)
#define P1_P (const void *p)
#define P1_A (p)
#define P2_P (const void *p, CUstream st)
#define P2_A (p, st)
#define PE_P (CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n)
#define PE_A (d, dc, s, sc, n)
#define PEA_P (CUdeviceptr d, CUcontext dc, CUdeviceptr s, CUcontext sc, size_t n, CUstream st)
#define PEA_A (d, dc, s, sc, n, st)
#define S8_P (CUdeviceptr d, unsigned char v, size_t n)
#define S16_P (CUdeviceptr d, unsigned short v, size_t n)
#define S32_P (CUdeviceptr d, unsigned int v, size_t n)
#define S_A (d, v, n)
#define S8A_P (CUdeviceptr d, unsigned char v, size_t n, CUstream st)
#define S16A_P (CUdeviceptr d, unsigned short v, size_t n, CUstream st)
#define S32A_P (CUdeviceptr d, unsigned int v, size_t n, CUstream st)
#define SA_A (d, v, n, st)
#define T8_P (CUdeviceptr d, size_t pi, unsigned char v, size_t w, size_t h)
#define T16_P (CUdeviceptr d, size_t pi, unsigned short v, size_t w, size_t h)
#define T32_P (CUdeviceptr d, size_t pi, unsigned int v, size_t w, size_t h)
#define T_A (d, pi, v, w, h)
#define T8A_P (CUdeviceptr d, size_t pi, unsigned char v, size_t w, size_t h, CUstream st)
#define T16A_P (CUdeviceptr d, size_t pi, unsigned short v, size_t w, size_t h, CUstream st)
#define T32A_P (CUdeviceptr d, size_t pi, unsigned int v, size_t w, size_t h, CUstream st)
#define TA_A (d, pi, v, w, h, st)
#define W32_P (CUstream st, CUdeviceptr a, uint32_t v, unsigned fl)
#define W64_P (CUstream st, CUdeviceptr a, uint64_t v, unsigned fl)
#define W_A (st, a, v, fl)
#define BM_P (CUstream st, unsigned n, void *ops, unsigned fl)
#define BM_A (st, n, ops, fl)

/* Calls that enqueue work or touch device memory, and only pass through the gate. A name the installed driver
 * lacks stays unresolved: its wrapper is never handed out. */
#define GATED(X) \
	X(cuLaunchKernel, LK_P, LK_A) X(cuLaunchKernel_ptsz, LK_P, LK_A) \
	X(cuLaunchKernelEx, LX_P, LX_A) X(cuLaunchKernelEx_ptsz, LX_P, LX_A) \
	X(cuLaunchCooperativeKernel, LC_P, LC_A) X(cuLaunchCooperativeKernel_ptsz, LC_P, LC_A) \
	X(cuLaunchHostFunc, (CUstream s, CUhostFn fn, void *u), (s, fn, u)) \
	X(cuLaunchHostFunc_ptsz, (CUstream s, CUhostFn fn, void *u), (s, fn, u)) \
	X(cuGraphLaunch, (CUgraphExec g, CUstream s), (g, s)) X(cuGraphLaunch_ptsz, (CUgraphExec g, CUstream s), (g, s)) \
	X(cuMemcpy, CP_P, CP_A) X(cuMemcpy_ptds, CP_P, CP_A) X(cuMemcpyAsync, CPA_P, CPA_A) \
	X(cuMemcpyAsync_ptsz, CPA_P, CPA_A) X(cuMemcpyDtoD_v2, CP_P, CP_A) X(cuMemcpyDtoD_v2_ptds, CP_P, CP_A) \
	X(cuMemcpyDtoDAsync_v2, CPA_P, CPA_A) X(cuMemcpyDtoDAsync_v2_ptsz, CPA_P, CPA_A) \
	X(cuMemcpyHtoD_v2, HD_P, CP_A) X(cuMemcpyHtoD_v2_ptds, HD_P, CP_A) \
	X(cuMemcpyHtoDAsync_v2, HDA_P, CPA_A) X(cuMemcpyHtoDAsync_v2_ptsz, HDA_P, CPA_A) \
	X(cuMemcpyDtoH_v2, DH_P, CP_A) X(cuMemcpyDtoH_v2_ptds, DH_P, CP_A) \
	X(cuMemcpyDtoHAsync_v2, DHA_P, CPA_A) X(cuMemcpyDtoHAsync_v2_ptsz, DHA_P, CPA_A) \
	X(cuMemcpy2D_v2, P1_P, P1_A) X(cuMemcpy2D_v2_ptds, P1_P, P1_A) X(cuMemcpy2DUnaligned_v2, P1_P, P1_A) \
	X(cuMemcpy2DUnaligned_v2_ptds, P1_P, P1_A) X(cuMemcpy2DAsync_v2, P2_P, P2_A) \
	X(cuMemcpy2DAsync_v2_ptsz, P2_P, P2_A) X(cuMemcpy3D_v2, P1_P, P1_A) X(cuMemcpy3D_v2_ptds, P1_P, P1_A) \
	X(cuMemcpy3DAsync_v2, P2_P, P2_A) X(cuMemcpy3DAsync_v2_ptsz, P2_P, P2_A) \
	X(cuMemcpyPeer, PE_P, PE_A) X(cuMemcpyPeer_ptds, PE_P, PE_A) X(cuMemcpyPeerAsync, PEA_P, PEA_A) \
	X(cuMemcpyPeerAsync_ptsz, PEA_P, PEA_A) \
	X(cuMemsetD8_v2, S8_P, S_A) X(cuMemsetD8_v2_ptds, S8_P, S_A) X(cuMemsetD16_v2, S16_P, S_A) \
	X(cuMemsetD16_v2_ptds, S16_P, S_A) X(cuMemsetD32_v2, S32_P, S_A) X(cuMemsetD32_v2_ptds, S32_P, S_A) \
	X(cuMemsetD8Async, S8A_P, SA_A) X(cuMemsetD8Async_ptsz, S8A_P, SA_A) X(cuMemsetD16Async, S16A_P, SA_A) \
	X(cuMemsetD16Async_ptsz, S16A_P, SA_A) X(cuMemsetD32Async, S32A_P, SA_A) X(cuMemsetD32Async_ptsz, S32A_P, SA_A) \
	X(cuMemsetD2D8_v2, T8_P, T_A) X(cuMemsetD2D8_v2_ptds, T8_P, T_A) X(cuMemsetD2D16_v2, T16_P, T_A) \
	X(cuMemsetD2D16_v2_ptds, T16_P, T_A) X(cuMemsetD2D32_v2, T32_P, T_A) X(cuMemsetD2D32_v2_ptds, T32_P, T_A) \
	X(cuMemsetD2D8Async, T8A_P, TA_A) X(cuMemsetD2D8Async_ptsz, T8A_P, TA_A) \
	X(cuMemsetD2D16Async, T16A_P, TA_A) X(cuMemsetD2D16Async_ptsz, T16A_P, TA_A) \
	X(cuMemsetD2D32Async, T32A_P, TA_A) X(cuMemsetD2D32Async_ptsz, T32A_P, TA_A) \
	X(cuStreamWriteValue32_v2, W32_P, W_A) X(cuStreamWriteValue32_v2_ptsz, W32_P, W_A) \
	X(cuStreamWriteValue64_v2, W64_P, W_A) X(cuStreamWriteValue64_v2_ptsz, W64_P, W_A) \
	X(cuStreamWaitValue32_v2, W32_P, W_A) X(cuStreamWaitValue32_v2_ptsz, W32_P, W_A) \
	X(cuStreamWaitValue64_v2, W64_P, W_A) X(cuStreamWaitValue64_v2_ptsz, W64_P, W_A) \
	X(cuStreamBatchMemOp_v2, BM_P, BM_A) X(cuStreamBatchMemOp_v2_ptsz, BM_P, BM_A)

/* Calls with their own wrappers below (memory, cuInit, the lookups). */
#define SPECIAL(X) \
	X(cuInit) X(cuGetProcAddress) X(cuGetProcAddress_v2) X(cuMemAlloc_v2) X(cuMemFree_v2) X(cuMemCreate) \
	X(cuMemRelease) X(cuMemMap) X(cuMemUnmap) X(cuMemSetAccess) X(cuMemExportToShareableHandle) \
	X(cuMemGetAllocationPropertiesFromHandle) X(cuMemRetainAllocationHandle)

#define REAL_DEF(n, ...) void *real_##n;
GATED(REAL_DEF)
SPECIAL(REAL_DEF)
#define REAL_DEF_USED(n) void *real_##n;
USED(REAL_DEF_USED)

/* Resolve on first use where the program reached an exported wrapper before any lookup was hooked (-lcuda). */
#define REAL(n) (real_##n ? real_##n : (preload_resolve(NULL), real_##n))

#define GATED_WRAPPER(n, params, args) \
	EXPORT CUresult n params \
	{ \
		CUresult(*real) params = (CUresult(*) params)REAL(n); \
		if (!real) \
			return CUDA_ERROR_NOT_INITIALIZED; \
		gate_enter(1); \
		CUresult r = real args; \
		gate_exit(1); \
		return r; \
	}
GATED(GATED_WRAPPER)

void preload_gate_enter(void) { gate_enter(1); }
void preload_gate_exit(void) { gate_exit(1); }
int preload_gate_close(double seconds) { return gate_close_within(seconds); }
void preload_gate_open(void) { gate_open(); }

/* ---------------------------------------------------------------- the memory calls */

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size)
{
	if (!REAL(cuMemAlloc_v2))
		return CUDA_ERROR_NOT_INITIALIZED;
	gate_enter(1);
	CUresult r = park_alloc(dptr, size);
	gate_exit(1);
	return r;
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
	if (!REAL(cuMemFree_v2))
		return CUDA_ERROR_NOT_INITIALIZED;
	gate_enter(1);
	CUresult r = park_free(dptr);
	gate_exit(1);
	return r;
}

#define VMM_WRAPPER(n, params, args) \
	EXPORT CUresult n params \
	{ \
		if (!REAL(n)) \
			return CUDA_ERROR_NOT_INITIALIZED; \
		gate_enter(1); \
		CUresult r = park_##n args; \
		gate_exit(1); \
		return r; \
	}
VMM_WRAPPER(cuMemCreate, (CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
	unsigned long long flags), (h, size, prop, flags))
VMM_WRAPPER(cuMemRelease, (CUmemGenericAllocationHandle h), (h))
VMM_WRAPPER(cuMemMap, (CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h,
	unsigned long long flags), (p, size, off, h, flags))
VMM_WRAPPER(cuMemUnmap, (CUdeviceptr p, size_t size), (p, size))
VMM_WRAPPER(cuMemSetAccess, (CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t n), (p, size, d, n))
VMM_WRAPPER(cuMemExportToShareableHandle, (void *out, CUmemGenericAllocationHandle h, int type,
	unsigned long long flags), (out, h, type, flags))
VMM_WRAPPER(cuMemGetAllocationPropertiesFromHandle, (CUmemAllocationProp *prop, CUmemGenericAllocationHandle h),
	(prop, h))
VMM_WRAPPER(cuMemRetainAllocationHandle, (CUmemGenericAllocationHandle *h, void *addr), (h, addr))

/* ---------------------------------------------------------------- cuInit: the listener starts here */

EXPORT CUresult cuInit(unsigned flags)
{
	CUresult (*real)(unsigned) = (CUresult(*)(unsigned))REAL(cuInit);
	if (!real)
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult r = real(flags);
	if (r == CUDA_SUCCESS)
		agent_start();
	return r;
}

/* ---------------------------------------------------------------- lookups: swap by address */

CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, uint64_t flags, void *status);
CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, uint64_t flags);

struct entry {
	const char *name;
	void **real;
	void *wrapper;
};
#define ENTRY(n, ...) {#n, &real_##n, (void *)n},
static const struct entry table[] = {GATED(ENTRY) SPECIAL(ENTRY)};
#define NTAB (sizeof table / sizeof table[0])
static const char *const used_names[] = {
#define USED_NAME(n) #n,
	USED(USED_NAME)};
static void **const used_slots[] = {
#define USED_SLOT(n) &real_##n,
	USED(USED_SLOT)};

static void *(*real_dlsym)(void *, const char *);
static pthread_mutex_t resolve_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int resolved;
static int log_misses;

static void find_real_dlsym(void)
{
	if (!real_dlsym)
		real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
	if (!real_dlsym)
		real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
}

/* Learn the driver's addresses from the libcuda already loaded (the one `inside` belongs to, else libcuda.so.1 if
 * the program loaded it); never loads a libcuda itself. */
void preload_resolve(void *inside)
{
	if (atomic_load(&resolved))
		return;
	find_real_dlsym();
	pthread_mutex_lock(&resolve_mu);
	if (!atomic_load(&resolved)) {
		void *h = NULL;
		Dl_info di;
		if (inside && dladdr(inside, &di) && di.dli_fname)
			h = dlopen(di.dli_fname, RTLD_NOW | RTLD_NOLOAD);
		if (!h)
			h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
		if (h) {
			for (size_t i = 0; i < NTAB; i++)
				*table[i].real = real_dlsym(h, table[i].name);
			for (size_t i = 0; i < sizeof used_names / sizeof used_names[0]; i++)
				*used_slots[i] = real_dlsym(h, used_names[i]);
			atomic_store(&resolved, 1); /* the handle stays open: libcuda was loaded by the program anyway */
		}
	}
	pthread_mutex_unlock(&resolve_mu);
}

/* What a hooked lookup hands back for the driver's function p: its wrapper, or p. */
static void *swap(void *p)
{
	for (size_t i = 0; i < NTAB; i++)
		if (*table[i].real == p)
			return table[i].wrapper;
	return p;
}

static void after_lookup(const char *sym, void **pfn, int ver, uint64_t flags)
{
	if (!pfn || !*pfn)
		return;
	void *orig = *pfn;
	*pfn = swap(orig);
	if (*pfn == orig && log_misses && sym &&
	    (!strncmp(sym, "cuMem", 5) || !strncmp(sym, "cuLaunch", 8) || !strncmp(sym, "cuGraphLaunch", 13)))
		fprintf(stderr, "gpusched-preload: not wrapped: %s version %d flags %llu\n", sym, ver,
			(unsigned long long)flags);
}

EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, uint64_t flags, void *status)
{
	CUresult (*real)(const char *, void **, int, uint64_t, void *) =
		(CUresult(*)(const char *, void **, int, uint64_t, void *))REAL(cuGetProcAddress_v2);
	if (!real)
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult r = real(sym, pfn, ver, flags, status);
	if (r == CUDA_SUCCESS)
		after_lookup(sym, pfn, ver, flags);
	return r;
}

EXPORT CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, uint64_t flags)
{
	CUresult (*real)(const char *, void **, int, uint64_t) =
		(CUresult(*)(const char *, void **, int, uint64_t))REAL(cuGetProcAddress);
	if (!real)
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult r = real(sym, pfn, ver, flags);
	if (r == CUDA_SUCCESS)
		after_lookup(sym, pfn, ver, flags);
	return r;
}

/* glibc >= 2.34 has dlsym in libc. A caller's dlsym(RTLD_NEXT, ...) resolves from this library's position, not
 * the caller's: a known limit (docs/fast-path.md); no CUDA library does it. */
EXPORT void *dlsym(void *h, const char *name)
{
	find_real_dlsym();
	void *p = real_dlsym(h, name);
	if (!p || name[0] != 'c' || name[1] != 'u')
		return p;
	if (!atomic_load(&resolved)) {
		Dl_info di, mine;
		if (!dladdr(p, &di) || !di.dli_fname)
			return p;
		if (dladdr((void *)dlsym, &mine) && di.dli_fbase == mine.dli_fbase) {
			/* One of this library's exports, found by a global lookup: without a libcuda loaded, the program
			 * would have found nothing, and must not get a wrapper with no driver behind it. */
			preload_resolve(NULL);
			return atomic_load(&resolved) ? p : NULL;
		}
		if (!strstr(di.dli_fname, "libcuda"))
			return p;
		preload_resolve(p);
	}
	return swap(p);
}

static void forked_child(void) { agent_forked(); }

__attribute__((constructor)) static void preload_init(void)
{
	find_real_dlsym();
	const char *v = getenv("GPUSCHED_PRELOAD_LOG");
	log_misses = v && *v == '1';
	pthread_atfork(NULL, NULL, forked_child);
}
