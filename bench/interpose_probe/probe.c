/* Interposition probe for the CUDA driver API (issue 16's research, not the interposer itself).
 *
 * Built two ways (run.sh):
 *   probe.so      — LD_PRELOAD: exports the tracked cu* symbols (origin "sym"), cuGetProcAddress{,_v2} (whose
 *                   answers are swapped for counting trampolines when PROBE_GPA=1: origin "gpa") and dlsym
 *                   (whose answers for libcuda's functions are swapped when PROBE_DLSYM=1: origin "dlsym").
 *   libcuda.so.1  — -DSHIM: a stand-in libcuda found first on LD_LIBRARY_PATH; forwards every export of the real
 *                   one (shim_stubs.S, generated from its dynamic symbols) and counts the tracked ones.
 * Every counted call is a trampoline (lock incq; jmp *real), so arguments pass untouched. PROBE_GATE=1 hands out
 * C wrappers instead for the calls that enqueue work, each inside an enter/exit gate as the issue describes (gate.h;
 * PROBE_GATE=2: the per-thread variant), to
 * measure its cost; PROBE_GATE_PARK_MS=N closes the gate every N ms and measures how long it takes to drain.
 * At exit each process writes $PROBE_DIR/probe.PID.txt. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tracked.h"

#define HID __attribute__((visibility("hidden"), used))

#define DECL(n) HID void *real_##n; HID unsigned long cs_##n, cg_##n, cd_##n; \
	extern void tg_##n(void) __attribute__((visibility("hidden"))); \
	extern void td_##n(void) __attribute__((visibility("hidden")));
TRACKED(DECL)

#define TRAMP(n) __asm__(".text\n.p2align 4\n.globl " #n "\n.type " #n ",@function\n" #n ":\n" \
	"\tlock incq cs_" #n "(%rip)\n\tjmp *real_" #n "(%rip)\n.size " #n ",.-" #n "\n" \
	".p2align 4\n.globl tg_" #n "\n.hidden tg_" #n "\n.type tg_" #n ",@function\ntg_" #n ":\n" \
	"\tlock incq cg_" #n "(%rip)\n\tjmp *real_" #n "(%rip)\n" \
	".p2align 4\n.globl td_" #n "\n.hidden td_" #n "\n.type td_" #n ",@function\ntd_" #n ":\n" \
	"\tlock incq cd_" #n "(%rip)\n\tjmp *real_" #n "(%rip)\n");
TRACKED(TRAMP)

typedef int CUresult;
typedef void *CUfunction, *CUstream, *CUgraphExec;
typedef unsigned long long CUdeviceptr;

#include "../../native/preload/gate.h"

static int opt_gate; /* 1: global counter, 2: sharded */

#define GATED(ret, n, params, args) \
	static ret gw_##n params \
	{ \
		gate_enter(opt_gate == 2); \
		__atomic_fetch_add(&cg_##n, 1, __ATOMIC_RELAXED); \
		ret r = ((ret(*) params)real_##n) args; \
		gate_exit(opt_gate == 2); \
		return r; \
	}
#define LK_P (CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, \
	unsigned sh, CUstream s, void **p, void **e)
#define LK_A (f, gx, gy, gz, bx, by, bz, sh, s, p, e)
GATED(CUresult, cuLaunchKernel, LK_P, LK_A)
GATED(CUresult, cuLaunchKernel_ptsz, LK_P, LK_A)
GATED(CUresult, cuLaunchKernelEx, (const void *c, CUfunction f, void **p, void **e), (c, f, p, e))
GATED(CUresult, cuLaunchKernelEx_ptsz, (const void *c, CUfunction f, void **p, void **e), (c, f, p, e))
GATED(CUresult, cuGraphLaunch, (CUgraphExec g, CUstream s), (g, s))
GATED(CUresult, cuGraphLaunch_ptsz, (CUgraphExec g, CUstream s), (g, s))
GATED(CUresult, cuMemcpyAsync, (CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st), (d, s, n, st))
GATED(CUresult, cuMemcpyAsync_ptsz, (CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st), (d, s, n, st))
GATED(CUresult, cuMemsetD32Async, (CUdeviceptr d, unsigned v, size_t n, CUstream st), (d, v, n, st))

struct entry {
	const char *name;
	void **real;
	unsigned long *cs, *cg, *cd;
	void *tg, *td, *gate;
};
#define ENTRY(n) {#n, &real_##n, &cs_##n, &cg_##n, &cd_##n, (void *)tg_##n, (void *)td_##n, NULL},
static struct entry table[] = {TRACKED(ENTRY)};
#define NTAB (sizeof table / sizeof table[0])

static void *real_gpa, *real_gpa2;
static void *(*real_dlsym)(void *, const char *);
static void *libcuda;
static int opt_gpa, opt_dlsym;
static unsigned long n_gpa_calls, n_gpa_swapped, n_dlsym_cu, n_dlsym_swapped;

#define LOGN 256
static char *log_gpa_miss[LOGN], *log_dlsym[LOGN];
static int n_log_gpa_miss, n_log_dlsym;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

static void log_once(char **logv, int *n, const char *s)
{
	pthread_mutex_lock(&log_mu);
	for (int i = 0; i < *n; i++)
		if (!strcmp(logv[i], s))
			goto out;
	if (*n < LOGN)
		logv[(*n)++] = strdup(s);
out:
	pthread_mutex_unlock(&log_mu);
}

static struct entry *by_real(void *p)
{
	if (!p)
		return NULL;
	for (size_t i = 0; i < NTAB; i++)
		if (*table[i].real == p)
			return &table[i];
	return NULL;
}

CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, uint64_t flags, void *status);
CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, uint64_t flags);

/* What a hooked lookup hands back for the real function p: our wrapper, or p. */
static void *swap(void *p, int origin_gpa)
{
	if (p == real_gpa2)
		return (void *)cuGetProcAddress_v2;
	if (p == real_gpa)
		return (void *)cuGetProcAddress;
	struct entry *e = by_real(p);
	if (!e)
		return p;
	if (opt_gate && e->gate)
		return e->gate;
	return origin_gpa ? e->tg : e->td;
}

static void after_gpa(const char *sym, void **pfn, int ver, uint64_t flags)
{
	__atomic_fetch_add(&n_gpa_calls, 1, __ATOMIC_RELAXED);
	if (!pfn || !*pfn)
		return;
	void *orig = *pfn;
	if (opt_gpa)
		*pfn = swap(orig, 1);
	if (*pfn != orig) {
		__atomic_fetch_add(&n_gpa_swapped, 1, __ATOMIC_RELAXED);
	} else if (!strncmp(sym, "cuMem", 5) || !strncmp(sym, "cuLaunch", 8) || !strncmp(sym, "cuGraphLaunch", 13) ||
		   strstr(sym, "Synchronize")) {
		char b[160];
		snprintf(b, sizeof b, "%s ver=%d flags=%llu", sym, ver, (unsigned long long)flags);
		log_once(log_gpa_miss, &n_log_gpa_miss, b);
	}
}

CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, uint64_t flags, void *status)
{
	CUresult r = ((CUresult(*)(const char *, void **, int, uint64_t, void *))real_gpa2)(sym, pfn, ver, flags, status);
	if (r == 0)
		after_gpa(sym, pfn, ver, flags);
	return r;
}

CUresult cuGetProcAddress(const char *sym, void **pfn, int ver, uint64_t flags)
{
	CUresult r = ((CUresult(*)(const char *, void **, int, uint64_t))real_gpa)(sym, pfn, ver, flags);
	if (r == 0)
		after_gpa(sym, pfn, ver, flags);
	return r;
}

#ifndef SHIM
/* glibc >= 2.34 defines dlsym in libc; RTLD_NEXT from here would mean "after the probe", not after the caller:
 * a limit of this way of hooking (callers passing RTLD_NEXT get the wrong answer); counted below. */
static unsigned long n_dlsym_next;
void *dlsym(void *h, const char *name)
{
	if (!real_dlsym) /* called before our constructor ran */
		real_dlsym = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
	if (!real_dlsym)
		real_dlsym = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
	if (h == RTLD_NEXT)
		__atomic_fetch_add(&n_dlsym_next, 1, __ATOMIC_RELAXED);
	void *p = real_dlsym(h, name);
	if (p && name[0] == 'c' && name[1] == 'u' && libcuda) {
		Dl_info di;
		void *base = NULL;
		if (dladdr(p, &di) && di.dli_fname && strstr(di.dli_fname, "libcuda"))
			base = di.dli_fbase;
		if (base) {
			__atomic_fetch_add(&n_dlsym_cu, 1, __ATOMIC_RELAXED);
			log_once(log_dlsym, &n_log_dlsym, name);
			if (opt_dlsym) {
				void *q = swap(p, 0);
				if (q != p)
					__atomic_fetch_add(&n_dlsym_swapped, 1, __ATOMIC_RELAXED);
				return q;
			}
		}
	}
	return p;
}
#endif

/* ---- the park simulation: close the gate every N ms, time the drain ---- */
static unsigned long park_n;
static double park_max_us, park_sum_us;

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *parker(void *arg)
{
	long ms = (long)arg;
	for (;;) {
		usleep(ms * 1000);
		double t0 = now_us();
		gate_close();
		double d = now_us() - t0;
		usleep(100); /* "parked" */
		gate_open();
		park_n++;
		park_sum_us += d;
		if (d > park_max_us)
			park_max_us = d;
	}
	return NULL;
}

static const char *mode_name(void)
{
#ifdef SHIM
	return "shim";
#else
	return "preload";
#endif
}

__attribute__((constructor)) static void init(void)
{
	opt_gpa = getenv("PROBE_GPA") ? atoi(getenv("PROBE_GPA")) : 0;
	opt_dlsym = getenv("PROBE_DLSYM") ? atoi(getenv("PROBE_DLSYM")) : 0;
	opt_gate = getenv("PROBE_GATE") ? atoi(getenv("PROBE_GATE")) : 0;
#ifdef SHIM
	real_dlsym = dlsym;
	libcuda = dlopen(REAL_LIBCUDA, RTLD_NOW | RTLD_LOCAL);
	extern void shim_resolve(void *h);
	shim_resolve(libcuda);
#else
	real_dlsym = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
	if (!real_dlsym)
		real_dlsym = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
	libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
#endif
	if (!libcuda) {
		fprintf(stderr, "probe: no libcuda: %s\n", dlerror());
		return;
	}
	for (size_t i = 0; i < NTAB; i++)
		*table[i].real = real_dlsym(libcuda, table[i].name);
	real_gpa = real_dlsym(libcuda, "cuGetProcAddress");
	real_gpa2 = real_dlsym(libcuda, "cuGetProcAddress_v2");
#define SETGATE(n) if (real_##n) by_real(real_##n)->gate = (void *)gw_##n;
	SETGATE(cuLaunchKernel) SETGATE(cuLaunchKernel_ptsz) SETGATE(cuLaunchKernelEx) SETGATE(cuLaunchKernelEx_ptsz)
	SETGATE(cuGraphLaunch) SETGATE(cuGraphLaunch_ptsz) SETGATE(cuMemcpyAsync) SETGATE(cuMemcpyAsync_ptsz)
	SETGATE(cuMemsetD32Async)
	const char *pm = getenv("PROBE_GATE_PARK_MS");
	if (opt_gate && pm && atol(pm) > 0) {
		pthread_t t;
		pthread_create(&t, NULL, parker, (void *)atol(pm));
		pthread_detach(t);
	}
}

__attribute__((destructor)) static void fini(void)
{
	const char *dir = getenv("PROBE_DIR");
	if (!dir || !libcuda)
		return;
	char path[512], exe[256] = "";
	snprintf(path, sizeof path, "%s/probe.%d.txt", dir, (int)getpid());
	ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (k > 0)
		exe[k] = 0;
	FILE *f = fopen(path, "w");
	if (!f)
		return;
	fprintf(f, "# %s gpa=%d dlsym=%d gate=%d exe=%s\n", mode_name(), opt_gpa, opt_dlsym, opt_gate, exe);
	for (size_t i = 0; i < NTAB; i++) {
		if (!*table[i].real)
			fprintf(f, "absent %s\n", table[i].name);
		if (*table[i].cs)
			fprintf(f, "count sym %s %lu\n", table[i].name, *table[i].cs);
		if (*table[i].cg)
			fprintf(f, "count gpa %s %lu\n", table[i].name, *table[i].cg);
		if (*table[i].cd)
			fprintf(f, "count dlsym %s %lu\n", table[i].name, *table[i].cd);
	}
	fprintf(f, "stat gpa_calls %lu\nstat gpa_swapped %lu\n", n_gpa_calls, n_gpa_swapped);
	fprintf(f, "stat dlsym_cu %lu\nstat dlsym_swapped %lu\n", n_dlsym_cu, n_dlsym_swapped);
#ifndef SHIM
	fprintf(f, "stat dlsym_rtld_next %lu\n", n_dlsym_next);
#endif
	fprintf(f, "stat gate_waits %lu\n", gate_waits);
	if (park_n)
		fprintf(f, "stat parks %lu drain_mean_us %.2f drain_max_us %.2f\n", park_n, park_sum_us / park_n,
			park_max_us);
	for (int i = 0; i < n_log_gpa_miss; i++)
		fprintf(f, "gpa_unswapped %s\n", log_gpa_miss[i]);
	for (int i = 0; i < n_log_dlsym; i++)
		fprintf(f, "dlsym_name %s\n", log_dlsym[i]);
	fclose(f);
}
