/* The parking lot: device memory that can leave the GPU and come back at the same address (the C counterpart of
 * src/gpuschedd/agent/parking.py and staging.py).
 *
 * Two kinds of segment. "Ours": a cuMemAlloc served from virtual memory management (reserve an address range,
 * create physical memory, map it there, grant access). "The program's": a VMM allocation it made itself (PyTorch's
 * expandable segments, vLLM's CuMemAllocator): its handles are translated (the program holds a stand-in value), so
 * a park can release the physical memory and an unpark create new memory behind the same stand-in. A handle
 * exported for IPC, retained by address or mapped other than whole at offset 0 is left alone (the driver's
 * checkpoint moves it), as is memory from stream-ordered pools, managed memory and cuMemAllocPitch.
 *
 * A park: synchronize every context that owns a segment, copy every segment out through pinned bounce buffers
 * (two per worker thread, so a DMA and a memcpy overlap), then unmap and release its physical memory; the
 * address range stays reserved. An unpark: create and map physical memory at each address, copy back. The caller
 * (agent.c) holds the gate closed from the park to the unpark, and every call that changes this table passes the
 * gate, so nothing changes under a park. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "preload.h"

#define MIN_VMM_BYTES (64u << 10) /* smaller cuMemAllocs stay with the driver: VMM rounds up to 2 MiB */
#define SYNTH_BASE 0x6770726500000000ULL /* stand-in handle values: never a real handle (not a user address) */
#define MAX_ACCESS 4
/* An unpark from a spill file: reads of 32 MiB, four in flight. Measured on the H200 VM's disk
 * (bench/disk_tier/io.py): 16 x 4 MiB (the ring's shape) read 1.04 GB/s, 4-8 x 32-64 MiB 1.46-1.52. */
#define SPILL_THREADS 4
#define SPILL_CHUNK ((size_t)32 << 20)

enum { LIVE, PARKED, EMPTY }; /* EMPTY: mapped again, its bytes not copied back yet */

struct seg {
	CUdeviceptr addr; /* where it is mapped (0: not mapped) */
	size_t size;
	int ours;
	unsigned long long synth; /* the program's stand-in handle (0 for ours) */
	CUmemGenericAllocationHandle real; /* the physical memory (0 while parked, or once the program released it) */
	size_t hsize;
	CUmemAllocationProp prop;
	CUcontext ctx;
	CUmemAccessDesc acc[MAX_ACCESS];
	int nacc;
	int program_released; /* the program released its handle while mapped (the mapping keeps the memory) */
	int unparkable;
	int state;
	size_t host_off;
	size_t reserved; /* ours: the reservation's size */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct seg **segs;
static size_t nsegs, capsegs;
static unsigned long long next_synth = SYNTH_BASE;
static char *host_area; /* the parked bytes */
static size_t host_size;
/* The last unpark's host area, given back lazily (MADV_FREE): the kernel takes its pages when it wants memory, and
 * until then the next park writes into them without the page faults and zeroing of fresh memory, which bound the
 * copy out on the H200 (docs/fast-path.md). GPUSCHED_PRELOAD_KEEP_HOST=0 unmaps it instead. */
static char *spare_area;
static size_t spare_size;
static size_t parked_total; /* the parked bytes' size: host_area's first bytes, or the spill file's */
/* The daemon's file holding the parked bytes once it wrote them there (park_spill): the unpark reads them from it
 * straight into the bounce buffers, so the host area is given back while parked and no host memory is needed to
 * thaw. The file is unlinked (the daemon's); it is gone when this closes it after the unpark. */
static int spill_fd = -1;
/* The spill file's first bytes, read into host memory by park_read_ahead's threads while the daemon's driver
 * restores the contexts (reading needs no CUDA): the unpark takes ahead_ready of them from here, once it has
 * joined the threads and none failed, instead of waiting for the disk. */
static char *ahead;
static size_t ahead_size, ahead_ready;
static pthread_t ahead_threads[SPILL_THREADS];
static int ahead_nthreads;
static _Atomic size_t ahead_next;
static _Atomic int ahead_failed;

static struct seg *add_seg(void)
{
	if (nsegs == capsegs) {
		size_t cap = capsegs ? capsegs * 2 : 256;
		struct seg **n = realloc(segs, cap * sizeof *n);
		if (!n)
			return NULL;
		segs = n, capsegs = cap;
	}
	struct seg *s = calloc(1, sizeof *s);
	if (s)
		segs[nsegs++] = s;
	return s;
}

static void drop_seg(struct seg *s)
{
	for (size_t i = 0; i < nsegs; i++)
		if (segs[i] == s) {
			segs[i] = segs[--nsegs];
			free(s);
			return;
		}
}

static struct seg *by_synth(unsigned long long h)
{
	if ((h & ~0xffffffffULL) != SYNTH_BASE)
		return NULL;
	for (size_t i = 0; i < nsegs; i++)
		if (segs[i]->synth == h)
			return segs[i];
	return NULL;
}

static struct seg *ours_at(CUdeviceptr p)
{
	for (size_t i = 0; i < nsegs; i++)
		if (segs[i]->ours && segs[i]->addr == p)
			return segs[i];
	return NULL;
}

static CUcontext current_ctx(void)
{
	CUcontext c = NULL;
	if (DRV(cuCtxGetCurrent, CUresult, (CUcontext *))(&c) != CUDA_SUCCESS)
		return NULL;
	return c;
}

static void default_access(struct seg *s)
{
	s->acc[0] = (CUmemAccessDesc){{CU_MEM_LOCATION_TYPE_DEVICE, s->prop.location.id}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
	s->nacc = 1;
}

static int agent_wanted(void)
{
	const char *d = getenv("GPUSCHED_AGENT_DIR");
	return d && *d;
}

/* ---------------------------------------------------------------- cuMemAlloc / cuMemFree */

static CUresult vmm_alloc(CUdeviceptr *dptr, size_t size, CUcontext ctx)
{
	CUdevice dev;
	CUresult r = DRV(cuCtxGetDevice, CUresult, (CUdevice *))(&dev);
	if (r != CUDA_SUCCESS)
		return r;
	CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED, .location = {CU_MEM_LOCATION_TYPE_DEVICE, dev}};
	size_t g = 0;
	r = DRV(cuMemGetAllocationGranularity, CUresult, (size_t *, const CUmemAllocationProp *, int))(
		&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
	if (r != CUDA_SUCCESS || !g)
		return r ? r : CUDA_ERROR_NOT_SUPPORTED;
	size_t rounded = (size + g - 1) / g * g;
	CUdeviceptr a = 0;
	CUmemGenericAllocationHandle h = 0;
	r = DRV(cuMemAddressReserve, CUresult, (CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long))(
		&a, rounded, 0, 0, 0);
	if (r != CUDA_SUCCESS)
		return r;
	r = DRV(cuMemCreate, CUresult, (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
		unsigned long long))(&h, rounded, &prop, 0);
	if (r == CUDA_SUCCESS) {
		r = DRV(cuMemMap, CUresult, (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
			unsigned long long))(a, rounded, 0, h, 0);
		if (r == CUDA_SUCCESS) {
			struct seg tmp = {.prop = prop};
			default_access(&tmp);
			r = DRV(cuMemSetAccess, CUresult, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))(
				a, rounded, tmp.acc, 1);
			struct seg *s = r == CUDA_SUCCESS ? add_seg() : NULL;
			if (s) {
				*s = tmp;
				s->addr = a, s->size = s->hsize = s->reserved = rounded, s->ours = 1, s->real = h;
				s->ctx = ctx, s->state = LIVE;
				*dptr = a;
				return CUDA_SUCCESS;
			}
			if (r == CUDA_SUCCESS)
				r = CUDA_ERROR_OUT_OF_MEMORY;
			DRV(cuMemUnmap, CUresult, (CUdeviceptr, size_t))(a, rounded);
		}
		DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(h);
	}
	DRV(cuMemAddressFree, CUresult, (CUdeviceptr, size_t))(a, rounded);
	return r;
}

CUresult park_alloc(CUdeviceptr *dptr, size_t size)
{
	CUresult (*real)(CUdeviceptr *, size_t) = DRV(cuMemAlloc_v2, CUresult, (CUdeviceptr *, size_t));
	CUcontext ctx;
	if (!dptr || size < MIN_VMM_BYTES || !agent_wanted() || !(ctx = current_ctx()))
		return real(dptr, size);
	pthread_mutex_lock(&mu);
	CUresult r = vmm_alloc(dptr, size, ctx);
	pthread_mutex_unlock(&mu);
	/* Out of memory is the program's answer; anything else (VMM not supported here): the driver's own call. */
	if (r != CUDA_SUCCESS && r != CUDA_ERROR_OUT_OF_MEMORY)
		r = real(dptr, size);
	return r;
}

CUresult park_free(CUdeviceptr p)
{
	pthread_mutex_lock(&mu);
	struct seg *s = p ? ours_at(p) : NULL;
	if (!s) {
		pthread_mutex_unlock(&mu);
		return DRV(cuMemFree_v2, CUresult, (CUdeviceptr))(p);
	}
	/* The driver's cuMemFree synchronizes with the work using the memory; do as it does. */
	CUresult r = DRV(cuCtxSynchronize, CUresult, (void))();
	if (r == CUDA_SUCCESS)
		r = DRV(cuMemUnmap, CUresult, (CUdeviceptr, size_t))(s->addr, s->size);
	if (r == CUDA_SUCCESS) {
		DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(s->real);
		DRV(cuMemAddressFree, CUresult, (CUdeviceptr, size_t))(s->addr, s->reserved);
		drop_seg(s);
	}
	pthread_mutex_unlock(&mu);
	return r;
}

/* ---------------------------------------------------------------- the program's own VMM calls */

CUresult park_cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop,
			  unsigned long long flags)
{
	CUresult r = DRV(cuMemCreate, CUresult, (CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
		unsigned long long))(h, size, prop, flags);
	if (r != CUDA_SUCCESS || !agent_wanted())
		return r;
	pthread_mutex_lock(&mu);
	struct seg *s = add_seg();
	if (s) {
		s->synth = ++next_synth, s->real = *h, s->hsize = size, s->prop = *prop, s->state = LIVE;
		s->unparkable = flags != 0 || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED;
		*h = s->synth;
	}
	pthread_mutex_unlock(&mu);
	return r; /* without room to track it, the program keeps the real handle: the driver's checkpoint moves it */
}

CUresult park_cuMemRelease(CUmemGenericAllocationHandle h)
{
	pthread_mutex_lock(&mu);
	struct seg *s = by_synth(h);
	CUresult r = CUDA_SUCCESS;
	if (!s)
		r = DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(h);
	else if (s->program_released)
		r = CUDA_ERROR_INVALID_VALUE;
	else {
		if (s->real)
			r = DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(s->real);
		if (r == CUDA_SUCCESS) {
			s->real = 0;
			if (s->addr)
				s->program_released = 1; /* the mapping keeps the memory until the program unmaps it */
			else
				drop_seg(s);
		}
	}
	pthread_mutex_unlock(&mu);
	return r;
}

CUresult park_cuMemMap(CUdeviceptr p, size_t size, size_t off, CUmemGenericAllocationHandle h,
		       unsigned long long flags)
{
	CUresult (*real)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) =
		DRV(cuMemMap, CUresult, (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long));
	pthread_mutex_lock(&mu);
	struct seg *s = by_synth(h);
	CUresult r;
	if (!s)
		r = real(p, size, off, h, flags);
	else if (!s->real)
		r = CUDA_ERROR_INVALID_VALUE;
	else if ((r = real(p, size, off, s->real, flags)) == CUDA_SUCCESS) {
		if (s->addr || off || size != s->hsize || !(s->ctx = current_ctx()))
			s->unparkable = 1; /* mapped twice, or in part: left to the driver */
		if (!s->addr) {
			s->addr = p, s->size = size;
			default_access(s);
			s->nacc = 0; /* no access until the program grants it */
		}
	}
	pthread_mutex_unlock(&mu);
	return r;
}

CUresult park_cuMemUnmap(CUdeviceptr p, size_t size)
{
	pthread_mutex_lock(&mu);
	CUresult r = DRV(cuMemUnmap, CUresult, (CUdeviceptr, size_t))(p, size);
	if (r == CUDA_SUCCESS) {
		for (size_t i = 0; i < nsegs;) {
			struct seg *s = segs[i];
			if (!s->ours && s->addr && s->addr >= p && s->addr + s->size <= p + size) {
				s->addr = 0, s->nacc = 0;
				if (s->program_released) {
					drop_seg(s);
					continue;
				}
			}
			i++;
		}
	}
	pthread_mutex_unlock(&mu);
	return r;
}

CUresult park_cuMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc *d, size_t n)
{
	pthread_mutex_lock(&mu);
	CUresult r = DRV(cuMemSetAccess, CUresult, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))(p, size, d, n);
	if (r == CUDA_SUCCESS) {
		for (size_t i = 0; i < nsegs; i++) {
			struct seg *s = segs[i];
			if (!s->addr || s->addr + s->size <= p || p + size <= s->addr)
				continue;
			if (n > MAX_ACCESS || s->addr < p || s->addr + s->size > p + size)
				s->unparkable = 1; /* access granted to part of it, or to more devices than kept here */
			else
				memcpy(s->acc, d, n * sizeof *d), s->nacc = (int)n;
		}
	}
	pthread_mutex_unlock(&mu);
	return r;
}

CUresult park_cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle h, int type,
					   unsigned long long flags)
{
	pthread_mutex_lock(&mu);
	struct seg *s = by_synth(h);
	if (s)
		s->unparkable = 1; /* another process may map it: its memory must stay */
	CUmemGenericAllocationHandle real = s ? s->real : h;
	pthread_mutex_unlock(&mu);
	return DRV(cuMemExportToShareableHandle, CUresult, (void *, CUmemGenericAllocationHandle, int,
		unsigned long long))(out, real, type, flags);
}

CUresult park_cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle h)
{
	pthread_mutex_lock(&mu);
	struct seg *s = by_synth(h);
	CUmemGenericAllocationHandle real = s ? s->real : h;
	pthread_mutex_unlock(&mu);
	return DRV(cuMemGetAllocationPropertiesFromHandle, CUresult, (CUmemAllocationProp *,
		CUmemGenericAllocationHandle))(prop, real);
}

CUresult park_cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr)
{
	CUresult r = DRV(cuMemRetainAllocationHandle, CUresult, (CUmemGenericAllocationHandle *, void *))(h, addr);
	if (r != CUDA_SUCCESS)
		return r;
	pthread_mutex_lock(&mu);
	for (size_t i = 0; i < nsegs; i++)
		if (segs[i]->real == *h)
			segs[i]->unparkable = 1; /* the program now holds the real handle */
	pthread_mutex_unlock(&mu);
	return r;
}

/* ---------------------------------------------------------------- copies */

struct piece {
	CUdeviceptr dev;
	size_t off, n;
};

struct job {
	CUcontext ctx;
	struct piece *pieces;
	size_t npieces, chunk;
	int to_host, keep; /* keep: the copy threads keep their ring slots (a park of one context) */
	_Atomic size_t next;
	_Atomic int failed;
	CUresult err;
	int sys_err; /* an errno instead of a CUresult (reading the spill file) */
	const char *where;
};

static void job_fail(struct job *j, CUresult r, const char *where)
{
	int expected = 0;
	if (atomic_compare_exchange_strong(&j->failed, &expected, 1))
		j->err = r, j->sys_err = r ? 0 : errno, j->where = where;
}

/* The bytes of `p` from the spill file into `buf`, whole. Direct I/O (the daemon opened the file so) while the
 * piece's alignment allows it; a refusal (EINVAL) turns it off for the file and reads through the page cache. */
static int read_piece(char *buf, const struct piece *p)
{
	for (size_t done = 0; done < p->n;) {
		ssize_t n = pread(spill_fd, buf + done, p->n - done, (off_t)(p->off + done));
		if (n < 0 && errno == EINVAL) {
			int fl = fcntl(spill_fd, F_GETFL);
			if (fl >= 0 && (fl & O_DIRECT) && fcntl(spill_fd, F_SETFL, fl & ~O_DIRECT) == 0) {
				fprintf(stderr, "gpusched-preload: direct I/O refused for the spill file (offset %zu, %zu bytes);"
					" reading through the page cache\n", p->off + done, p->n - done);
				continue;
			}
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			errno = n ? errno : ENODATA; /* the file ends early: the daemon checked its size, so it shrank */
			return -1;
		}
		done += (size_t)n;
	}
	return 0;
}

static void *ahead_reader(void *arg)
{
	(void)arg;
	for (;;) {
		size_t off = atomic_fetch_add(&ahead_next, SPILL_CHUNK);
		if (off >= ahead_size || atomic_load(&ahead_failed))
			return NULL;
		struct piece p = {.off = off, .n = ahead_size - off < SPILL_CHUNK ? ahead_size - off : SPILL_CHUNK};
		if (read_piece(ahead + off, &p))
			atomic_store(&ahead_failed, 1);
	}
}

/* Wait for the read-ahead's threads; its bytes are the unpark's from then on, unless a read failed. */
static void ahead_join(void)
{
	for (int i = 0; i < ahead_nthreads; i++)
		pthread_join(ahead_threads[i], NULL);
	ahead_nthreads = 0;
	ahead_ready = ahead && !atomic_load(&ahead_failed) ? ahead_size : 0;
}

static void ahead_free(void)
{
	ahead_join();
	if (ahead)
		munmap(ahead, ahead_size);
	ahead = NULL, ahead_size = ahead_ready = 0;
}

/* Where the unpark takes `p`'s bytes from: the host area, the read-ahead, or (NULL) the spill file. */
static const char *source(const struct piece *p)
{
	if (spill_fd < 0)
		return host_area;
	return p->off + p->n <= ahead_ready ? ahead : NULL;
}

int park_read_ahead(size_t bytes, size_t *started, char *err, size_t errlen)
{
	pthread_mutex_lock(&mu);
	int rc = 0;
	size_t n = bytes < parked_total ? bytes : parked_total;
	n -= n % (size_t)sysconf(_SC_PAGESIZE); /* whole pages: direct I/O wants aligned pieces */
	if (spill_fd < 0) {
		snprintf(err, errlen, "nothing spilled to read ahead");
		rc = -1;
	} else if (!ahead && n) {
		ahead = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (ahead == MAP_FAILED) {
			ahead = NULL;
			snprintf(err, errlen, "no host memory to read ahead into");
			rc = -1;
		} else {
			ahead_size = n, ahead_ready = 0;
			atomic_store(&ahead_next, 0);
			atomic_store(&ahead_failed, 0);
			while (ahead_nthreads < SPILL_THREADS &&
			       pthread_create(&ahead_threads[ahead_nthreads], NULL, ahead_reader, NULL) == 0)
				ahead_nthreads++;
			if (!ahead_nthreads) {
				ahead_free();
				snprintf(err, errlen, "no thread to read ahead with");
				rc = -1;
			}
		}
	}
	*started = ahead_size;
	pthread_mutex_unlock(&mu);
	return rc;
}

/* The staging ring: for each copy thread two pinned bounce buffers and two streams. A park's ring is kept, with
 * the parked bytes, until the unpark's copy is over, so the unpark starts copying at once instead of allocating and
 * registering pinned memory again (16 threads' set-up took 22-40 ms of a park on the H200); it holds
 * 2 x threads x chunk bytes (128 MiB by default) while parked, in the frozen process's RSS. Only a park of one
 * context keeps it (its streams and registrations belong to that context). */
struct slot {
	CUcontext ctx;
	char *bounce[2];
	int registered[2];
	CUstream st[2];
	size_t chunk;
};
static struct slot ring[128];

/* Free a slot's buffers and streams, its context current meanwhile (registrations belong to it). */
static void slot_free(struct slot *sl)
{
	if (!sl->ctx)
		return;
	DRV(cuCtxSetCurrent, CUresult, (CUcontext))(sl->ctx);
	for (int k = 0; k < 2; k++) {
		if (sl->st[k])
			DRV(cuStreamDestroy_v2, CUresult, (CUstream))(sl->st[k]);
		if (sl->registered[k])
			DRV(cuMemHostUnregister, CUresult, (void *))(sl->bounce[k]);
		if (sl->bounce[k])
			munmap(sl->bounce[k], sl->chunk);
	}
	*sl = (struct slot){0};
}

/* Make `sl` a slot of `ctx` with buffers of `chunk` bytes, reusing what it holds; `ctx` is current afterwards. */
static CUresult slot_ready(struct slot *sl, CUcontext ctx, size_t chunk, const char **where)
{
	if (sl->ctx && (sl->ctx != ctx || sl->chunk != chunk))
		slot_free(sl);
	CUresult r = DRV(cuCtxSetCurrent, CUresult, (CUcontext))(ctx);
	if (r != CUDA_SUCCESS) {
		*where = "cuCtxSetCurrent";
		return r;
	}
	if (sl->ctx)
		return CUDA_SUCCESS; /* kept from the park */
	sl->ctx = ctx, sl->chunk = chunk;
	for (int k = 0; k < 2; k++) {
		sl->bounce[k] = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (sl->bounce[k] == MAP_FAILED) {
			sl->bounce[k] = NULL;
			*where = "host memory for the bounce buffers";
			return CUDA_ERROR_OUT_OF_MEMORY;
		}
		if ((r = DRV(cuMemHostRegister_v2, CUresult, (void *, size_t, unsigned))(sl->bounce[k], chunk, 0))) {
			*where = "cuMemHostRegister";
			return r;
		}
		sl->registered[k] = 1;
		if ((r = DRV(cuStreamCreate, CUresult, (CUstream *, unsigned))(&sl->st[k], CU_STREAM_NON_BLOCKING))) {
			*where = "cuStreamCreate";
			return r;
		}
	}
	return CUDA_SUCCESS;
}

struct worker_arg {
	struct job *job;
	struct slot *slot;
};

static void *worker(void *arg)
{
	struct job *j = ((struct worker_arg *)arg)->job;
	struct slot *sl = ((struct worker_arg *)arg)->slot;
	struct piece *pend[2] = {0};
	const char *where = NULL;
	CUresult r = slot_ready(sl, j->ctx, j->chunk, &where);
	if (r != CUDA_SUCCESS) {
		job_fail(j, r, where);
		goto out;
	}
	CUstream *st = sl->st;
	char **bounce = sl->bounce;
	CUresult (*d2h)(void *, CUdeviceptr, size_t, CUstream) =
		DRV(cuMemcpyDtoHAsync_v2, CUresult, (void *, CUdeviceptr, size_t, CUstream));
	CUresult (*h2d)(CUdeviceptr, const void *, size_t, CUstream) =
		DRV(cuMemcpyHtoDAsync_v2, CUresult, (CUdeviceptr, const void *, size_t, CUstream));
	CUresult (*sync)(CUstream) = DRV(cuStreamSynchronize, CUresult, (CUstream));
	/* Two slots: while one buffer's DMA runs, the other's bytes move between it and the host area. */
	for (int k = 0, done = 0; !done || pend[0] || pend[1]; k ^= 1) {
		if (pend[k]) {
			if ((r = sync(st[k]))) {
				job_fail(j, r, "cuStreamSynchronize");
				break;
			}
			if (j->to_host)
				memcpy(host_area + pend[k]->off, bounce[k], pend[k]->n);
			pend[k] = NULL;
		}
		if (done || atomic_load(&j->failed)) {
			done = 1;
			continue;
		}
		size_t i = atomic_fetch_add(&j->next, 1);
		if (i >= j->npieces) {
			done = 1;
			continue;
		}
		struct piece *p = &j->pieces[i];
		if (j->to_host) {
			r = d2h(bounce[k], p->dev, p->n, st[k]);
		} else if (!source(p) && read_piece(bounce[k], p)) {
			job_fail(j, CUDA_SUCCESS, "reading the spilled bytes");
			done = 1;
			continue;
		} else {
			if (source(p))
				memcpy(bounce[k], source(p) + p->off, p->n);
			r = h2d(p->dev, bounce[k], p->n, st[k]);
		}
		if (r) {
			job_fail(j, r, j->to_host ? "cuMemcpyDtoHAsync" : "cuMemcpyHtoDAsync");
			done = 1;
			continue;
		}
		pend[k] = p;
	}
out:
	for (int k = 0; k < 2; k++)
		if (pend[k])
			DRV(cuStreamSynchronize, CUresult, (CUstream))(sl->st[k]); /* its DMA may still use the buffer */
	if (!j->keep || atomic_load(&j->failed))
		slot_free(sl);
	return NULL;
}

/* Host memory the ring holds now. */
static unsigned long long ring_bytes(void)
{
	unsigned long long n = 0;
	for (size_t i = 0; i < sizeof ring / sizeof ring[0]; i++)
		n += ring[i].ctx ? 2 * ring[i].chunk : 0;
	return n;
}

/* Free what is left of the ring (with the host area), the calling thread's current context kept. */
static void ring_free(void)
{
	CUcontext current = NULL;
	DRV(cuCtxGetCurrent, CUresult, (CUcontext *))(&current);
	for (size_t i = 0; i < sizeof ring / sizeof ring[0]; i++)
		slot_free(&ring[i]);
	DRV(cuCtxSetCurrent, CUresult, (CUcontext))(current);
}

static long env_long(const char *name, long dflt, long lo, long hi)
{
	const char *v = getenv(name);
	char *end;
	long x = v ? strtol(v, &end, 10) : dflt;
	return v && (*end || x < lo || x > hi) ? dflt : x;
}

static const char *err_name(CUresult r)
{
	const char *s = NULL;
	if (real_cuGetErrorName)
		DRV(cuGetErrorName, CUresult, (CUresult, const char **))(r, &s);
	return s ? s : "CUDA error";
}

/* Whether a copy of the segments in state `state` moves `s`. */
static int moved(const struct seg *s, int state)
{
	return s->state == state && !s->unparkable && s->addr;
}

/* Whether segs[i] is the first segment such a copy moves in its context (each context's job runs once). */
static int first_of_context(size_t i, int state)
{
	if (!moved(segs[i], state))
		return 0;
	for (size_t k = 0; k < i; k++)
		if (segs[k]->ctx == segs[i]->ctx && moved(segs[k], state))
			return 0;
	return 1;
}

/* Copy the segments in state `state` between the GPU and the host area, context by context. */
static int copy_all(int to_host, int state, char *err, size_t errlen)
{
	long threads = env_long("GPUSCHED_PRELOAD_THREADS", 16, 1, 128);
	size_t chunk = (size_t)env_long("GPUSCHED_PRELOAD_CHUNK_KIB", 4096, 64, 1 << 20) << 10;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpu > 0 && threads > ncpu)
		threads = ncpu < 2 ? 2 : ncpu;
	if (!to_host && spill_fd >= 0) { /* a disk reads best in large pieces, a few at a time: */
		threads = env_long("GPUSCHED_PRELOAD_SPILL_THREADS", SPILL_THREADS, 1, 128);
		chunk = (size_t)env_long("GPUSCHED_PRELOAD_SPILL_CHUNK_KIB", SPILL_CHUNK >> 10, 64, 1 << 20) << 10;
	}
	int rc = 0, contexts = 0;
	for (size_t i = 0; i < nsegs; i++)
		contexts += first_of_context(i, state);
	for (size_t i = 0; i < nsegs && !rc; i++) {
		if (!first_of_context(i, state))
			continue;
		CUcontext ctx = segs[i]->ctx;
		size_t np = 0;
		for (size_t k = 0; k < nsegs; k++)
			if (segs[k]->ctx == ctx && moved(segs[k], state))
				np += (segs[k]->size + chunk - 1) / chunk;
		struct job j = {.ctx = ctx, .chunk = chunk, .to_host = to_host, .keep = to_host && contexts == 1,
			.pieces = calloc(np, sizeof(struct piece))};
		if (!j.pieces) {
			snprintf(err, errlen, "no host memory for the copy plan");
			return -1;
		}
		for (size_t k = 0; k < nsegs; k++) {
			struct seg *s = segs[k];
			if (s->ctx != ctx || !moved(s, state))
				continue;
			for (size_t d = 0; d < s->size; d += chunk)
				j.pieces[j.npieces++] = (struct piece){s->addr + d, s->host_off + d,
					s->size - d < chunk ? s->size - d : chunk};
		}
		long nt = (long)np < threads ? (long)np : threads;
		pthread_t tid[128];
		struct worker_arg args[128];
		long started = 0;
		for (; started < nt; started++) {
			args[started] = (struct worker_arg){&j, &ring[started]};
			if (pthread_create(&tid[started], NULL, worker, &args[started]))
				break;
		}
		if (!started)
			job_fail(&j, CUDA_ERROR_OUT_OF_MEMORY, "starting the copy threads");
		for (long t = 0; t < started; t++)
			pthread_join(tid[t], NULL);
		if (atomic_load(&j.failed)) {
			snprintf(err, errlen, "%s: %s", j.where, j.err ? err_name(j.err) : strerror(j.sys_err));
			rc = -1;
		}
		free(j.pieces);
	}
	return rc;
}

/* ---------------------------------------------------------------- park / unpark */

/* Mapped, with access granted (memory nobody may read cannot be copied), in a known context. */
static int parkable(const struct seg *s)
{
	return s->state == LIVE && s->addr && s->nacc && !s->unparkable && s->ctx;
}

int park_is_parked(void)
{
	pthread_mutex_lock(&mu);
	int parked = host_area != NULL || spill_fd >= 0;
	pthread_mutex_unlock(&mu);
	return parked;
}

/* Give the host area back: lazily, kept as the spare for the next park, when `keep` and the knob allow. */
static void free_area(int keep)
{
	if (host_area && keep && env_long("GPUSCHED_PRELOAD_KEEP_HOST", 1, 0, 1) &&
	    madvise(host_area, host_size, MADV_FREE) == 0) {
		if (spare_area)
			munmap(spare_area, spare_size);
		spare_area = host_area, spare_size = host_size;
	} else if (host_area) {
		munmap(host_area, host_size);
	}
	host_area = NULL, host_size = 0;
	ring_free();
}

/* A host area of at least `total` bytes: the spare when it is large enough, else fresh memory. */
static char *new_area(size_t total, size_t *size)
{
	char *a = spare_area;
	*size = spare_size, spare_area = NULL, spare_size = 0;
	if (a && *size >= total)
		return a;
	if (a)
		munmap(a, *size);
	a = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	*size = a == MAP_FAILED ? 0 : total;
	if (a == MAP_FAILED)
		return NULL;
	madvise(a, total, MADV_HUGEPAGE); /* fewer faults and TLB misses, as staging.py does */
	return a;
}

static void *close_fd(void *fd)
{
	close((int)(intptr_t)fd);
	return NULL;
}

/* Close `fd` on a thread of its own: the last descriptor of the unlinked spill file frees its blocks, which took
 * 4-6 s for 20 GB on the H200 VM's ext4, after the bytes were all on the GPU (bench/disk_tier, run 6). */
static void close_later(int fd)
{
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, close_fd, (void *)(intptr_t)fd) != 0)
		close(fd);
	pthread_attr_destroy(&attr);
}

static int unpark_locked(struct park_report *rep, char *err, size_t errlen)
{
	double t0 = preload_now();
	ahead_join();
	for (size_t i = 0; i < nsegs; i++) {
		struct seg *s = segs[i];
		if (s->state != PARKED)
			continue;
		CUmemGenericAllocationHandle h = 0;
		CUresult r = DRV(cuMemCreate, CUresult, (CUmemGenericAllocationHandle *, size_t,
			const CUmemAllocationProp *, unsigned long long))(&h, s->hsize, &s->prop, 0);
		if (r == CUDA_SUCCESS) {
			r = DRV(cuMemMap, CUresult, (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
				unsigned long long))(s->addr, s->size, 0, h, 0);
			if (r == CUDA_SUCCESS && s->nacc)
				r = DRV(cuMemSetAccess, CUresult, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))(
					s->addr, s->size, s->acc, (size_t)s->nacc);
			if (r != CUDA_SUCCESS) {
				DRV(cuMemUnmap, CUresult, (CUdeviceptr, size_t))(s->addr, s->size);
				DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(h);
			}
		}
		if (r != CUDA_SUCCESS) {
			snprintf(err, errlen, "restoring GPU memory failed (%s); the bytes stay parked: unpark again",
				 err_name(r));
			return -1;
		}
		s->real = h, s->state = EMPTY;
	}
	if (copy_all(0, EMPTY, err, errlen)) {
		size_t n = strlen(err);
		snprintf(err + n, errlen - n, "; the bytes stay parked: unpark again");
		return -1;
	}
	unsigned long long bytes = 0;
	unsigned count = 0;
	for (size_t i = 0; i < nsegs; i++) {
		struct seg *s = segs[i];
		if (s->state != EMPTY)
			continue;
		if (s->program_released) {
			DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(s->real); /* as the program left it */
			s->real = 0;
		}
		s->state = LIVE, bytes += s->size, count++;
	}
	ahead_free();
	if (spill_fd >= 0)
		close_later(spill_fd), spill_fd = -1; /* the daemon's unlinked file goes with it */
	free_area(1);
	rep->bytes = bytes, rep->staging = 0, rep->segments = count, rep->seconds = preload_now() - t0;
	return 0;
}

/* A context's synchronize, run by its own thread so that the park can give up waiting: work the gate let in
 * may wait on something only a thread held at the gate would do (a host function taking the program's lock).
 * Whoever of the two finishes last frees it. */
struct sync_job {
	CUcontext ctx;
	CUresult r;
	int done, abandoned;
	pthread_mutex_t m;
	pthread_cond_t c;
};

static void *sync_thread(void *arg)
{
	struct sync_job *j = arg;
	CUresult r = DRV(cuCtxSetCurrent, CUresult, (CUcontext))(j->ctx);
	if (r == CUDA_SUCCESS)
		r = DRV(cuCtxSynchronize, CUresult, (void))();
	pthread_mutex_lock(&j->m);
	j->r = r, j->done = 1;
	int abandoned = j->abandoned;
	pthread_cond_signal(&j->c);
	pthread_mutex_unlock(&j->m);
	if (abandoned)
		free(j);
	return NULL;
}

/* CUDA_SUCCESS, the synchronize's error, or CUDA_ERROR_NOT_READY once `deadline` (preload_now()) passed. */
static CUresult sync_until(CUcontext ctx, double deadline)
{
	struct sync_job *j = calloc(1, sizeof *j);
	pthread_t t;
	if (!j)
		return CUDA_ERROR_OUT_OF_MEMORY;
	j->ctx = ctx;
	pthread_mutex_init(&j->m, NULL);
	pthread_cond_init(&j->c, NULL);
	if (pthread_create(&t, NULL, sync_thread, j) != 0) {
		free(j);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	pthread_detach(t);
	struct timespec ts;
	double whole = 0, frac = modf(deadline - preload_now(), &whole);
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += (time_t)(whole > 0 ? whole : 0), ts.tv_nsec += frac > 0 ? (long)(frac * 1e9) : 0;
	if (ts.tv_nsec >= 1000000000)
		ts.tv_sec++, ts.tv_nsec -= 1000000000;
	pthread_mutex_lock(&j->m);
	while (!j->done && pthread_cond_timedwait(&j->c, &j->m, &ts) == 0)
		;
	CUresult r = j->done ? j->r : CUDA_ERROR_NOT_READY;
	j->abandoned = !j->done;
	pthread_mutex_unlock(&j->m);
	if (r != CUDA_ERROR_NOT_READY)
		free(j);
	return r;
}

int park_out(double seconds, struct park_report *rep, char *err, size_t errlen)
{
	double t0 = preload_now();
	pthread_mutex_lock(&mu);
	int rc = -1;
	if (host_area || spill_fd >= 0) {
		snprintf(err, errlen, "already parked");
		goto out;
	}
	size_t total = 0;
	unsigned count = 0;
	for (size_t i = 0; i < nsegs; i++) {
		struct seg *s = segs[i];
		if (!parkable(s))
			continue;
		int first = 1; /* work queued on any stream must finish before its memory is copied: once per context */
		for (size_t k = 0; k < i && first; k++)
			first = !(parkable(segs[k]) && segs[k]->ctx == s->ctx);
		CUresult r = first ? sync_until(s->ctx, t0 + seconds) : CUDA_SUCCESS;
		if (r == CUDA_ERROR_NOT_READY) {
			snprintf(err, errlen, "the program's GPU work did not finish within %.0f ms; nothing was parked",
				 seconds * 1000);
			goto out;
		}
		if (r != CUDA_SUCCESS) {
			snprintf(err, errlen, "synchronizing the program's work failed (%s); nothing was parked",
				 err_name(r));
			goto out;
		}
		s->host_off = total, total += s->size, count++;
	}
	if (total) {
		host_area = new_area(total, &host_size);
		if (!host_area) {
			snprintf(err, errlen, "no host memory for %zu bytes (%s); nothing was parked", total, strerror(errno));
			goto out;
		}
		/* LIVE segments only: mark them first so copy_all picks exactly this park's set. */
		for (size_t i = 0; i < nsegs; i++)
			if (parkable(segs[i]))
				segs[i]->state = EMPTY;
		if (copy_all(1, EMPTY, err, errlen)) {
			for (size_t i = 0; i < nsegs; i++)
				if (segs[i]->state == EMPTY)
					segs[i]->state = LIVE;
			free_area(0);
			size_t n = strlen(err);
			snprintf(err + n, errlen - n, "; copying out failed, nothing was released");
			goto out;
		}
	}
	for (size_t i = 0; i < nsegs; i++) {
		struct seg *s = segs[i];
		if (s->state != EMPTY)
			continue;
		CUresult r = DRV(cuMemUnmap, CUresult, (CUdeviceptr, size_t))(s->addr, s->size);
		if (r == CUDA_SUCCESS && s->real)
			DRV(cuMemRelease, CUresult, (CUmemGenericAllocationHandle))(s->real);
		if (r != CUDA_SUCCESS) {
			/* Map back what was released; its bytes are in the host area. */
			for (size_t k = 0; k < nsegs; k++)
				if (segs[k]->state == EMPTY && segs[k] != s && k > i)
					segs[k]->state = LIVE;
			s->state = LIVE;
			struct park_report back;
			char why[256];
			int n = snprintf(err, errlen, "releasing GPU memory failed (%s); ", err_name(r));
			if (unpark_locked(&back, why, sizeof why) == 0)
				snprintf(err + n, errlen - (size_t)n, "what was released is mapped back");
			else
				snprintf(err + n, errlen - (size_t)n, "mapping back what was released failed too: %s", why);
			rc = host_area ? -2 : -1;
			goto out;
		}
		s->real = 0, s->state = PARKED;
	}
	if (!total)
		host_area = MAP_FAILED; /* parked, with nothing to hold: still one park at a time */
	parked_total = total;
	rep->bytes = total, rep->staging = ring_bytes(), rep->segments = count, rep->seconds = preload_now() - t0;
	rep->address = total ? (unsigned long long)(uintptr_t)host_area : 0;
	rc = 0;
out:
	pthread_mutex_unlock(&mu);
	return rc;
}

int park_in(struct park_report *rep, char *err, size_t errlen)
{
	pthread_mutex_lock(&mu);
	int rc;
	if (!host_area && spill_fd < 0) {
		snprintf(err, errlen, "not parked");
		rc = -1;
	} else if (host_area == MAP_FAILED) {
		host_area = NULL;
		*rep = (struct park_report){0};
		rc = 0;
	} else {
		rc = unpark_locked(rep, err, errlen);
	}
	pthread_mutex_unlock(&mu);
	return rc;
}

int park_spill(int fd, struct park_report *rep, char *err, size_t errlen)
{
	double t0 = preload_now();
	struct stat st;
	int fl = fcntl(fd, F_GETFL);
	pthread_mutex_lock(&mu);
	int rc = -1;
	if (spill_fd >= 0)
		snprintf(err, errlen, "already spilled");
	else if (!host_area)
		snprintf(err, errlen, "not parked");
	else if (host_area == MAP_FAILED)
		snprintf(err, errlen, "nothing parked to spill");
	else if (fl < 0 || (fl & O_ACCMODE) == O_WRONLY || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
		 (unsigned long long)st.st_size < parked_total)
		snprintf(err, errlen, "the file passed is not a readable file of at least the %zu parked bytes; nothing"
			 " was given back", parked_total);
	else {
		munmap(host_area, host_size);
		if (spare_area)
			munmap(spare_area, spare_size);
		host_area = spare_area = NULL, host_size = spare_size = 0;
		spill_fd = fd;
		*rep = (struct park_report){.bytes = parked_total, .staging = ring_bytes(), .seconds = preload_now() - t0};
		rc = 0;
	}
	pthread_mutex_unlock(&mu);
	return rc;
}

double preload_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + t.tv_nsec / 1e9;
}
