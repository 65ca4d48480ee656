/* An unmodified "CUDA program" for the interposer's tests (tests/unit/test_preload.py), run against the fake
 * libcuda with native/preload's library in LD_PRELOAD. It reaches the driver the three ways real programs do: the
 * runtime's way (dlopen + dlsym of cuGetProcAddress_v2, then every entry point from it, per-thread-stream variants
 * included), Triton's (dlsym of cuLaunchKernel on the libcuda handle) and a -lcuda program's (calling exported
 * symbols). Then THREADS threads launch fake kernels (fakecuda.c: host functions) that add 1 to every byte of
 * their own buffer, as fast as they can, while the test parks and unparks the process through the daemon's
 * AgentLink. Commands on stdin: "count" prints the launches done so far; "stop" stops the threads, checks every
 * byte of every buffer against what the launches should have left there and prints "intact" or what differs.
 *
 * Usage: preload_prog GPU_UUID THREADS [COUNTER] (FAKECUDA_DIR set; it registers itself as that GPU's CUDA process).
 * With COUNTER (run as a model by the engine, stdin closed), it writes the launches done so far there instead of
 * reading stdin, each thread checks its buffer after every launch, and a buffer found wrong writes CORRUPT there
 * (as tests/fakecuda/fake_model.py does) and exits. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef CUresult (*gpa_t)(const char *, void **, int, uint64_t, int *);
typedef CUresult (*launch_t)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
			     void **, void **);
typedef CUresult (*alloc_t)(CUdeviceptr *, size_t);

/* -lcuda's way: these resolve to the interposer's exports, which come first */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n);
CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra);

#define MIB (1u << 20)
#define MAX_THREADS 16

static launch_t launch_gpa, launch_dlsym;
static CUresult (*init_gpa)(unsigned);
static alloc_t alloc_gpa;
static _Atomic int stop;
static _Atomic long total;
static const char *counter; /* COUNTER, or NULL */

static void write_counter(const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s.tmp", counter);
	FILE *f = fopen(tmp, "w");
	if (f && fputs(text, f) >= 0 && fclose(f) == 0)
		rename(tmp, counter); /* whole, never half written */
}

struct worker {
	pthread_t t;
	int index;
	CUdeviceptr buf;
	size_t size;
	long count;
} workers[MAX_THREADS];

/* the kernels */
static void bump(void **params)
{
	unsigned char *p = *(unsigned char **)params[0];
	size_t n = *(size_t *)params[1];
	for (size_t i = 0; i < n; i++)
		p[i]++;
}

static void fill(void **params)
{
	memset(*(void **)params[0], *(int *)params[2], *(size_t *)params[1]);
}

static void must(CUresult r, const char *what)
{
	if (r) {
		fprintf(stderr, "preload_prog: %s failed: %d\n", what, r);
		exit(2);
	}
}

static void *work(void *arg)
{
	struct worker *w = arg;
	void *params[] = {&w->buf, &w->size};
	int config = 0;
	while (!atomic_load(&stop)) {
		CUresult r;
		switch (w->index % 3) {
		case 0:
			r = launch_gpa((void *)bump, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
			break;
		case 1:
			r = launch_dlsym((void *)bump, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
			break;
		default:
			r = cuLaunchKernelEx(&config, (void *)bump, params, NULL);
		}
		must(r, "launch");
		w->count++;
		atomic_fetch_add(&total, 1);
		unsigned char want = (unsigned char)(w->index * 17 + w->count), *p = (unsigned char *)w->buf;
		if (counter && (p[0] != want || p[w->size - 1] != want)) {
			write_counter("CORRUPT");
			_exit(1);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4)
		return 2;
	counter = argc == 4 ? argv[3] : NULL;
	int threads = atoi(argv[2]);
	if (threads < 1 || threads > MAX_THREADS)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/ctx/%d", getenv("FAKECUDA_DIR"), (int)getpid());
	FILE *f = fopen(path, "w");
	if (!f)
		return 2;
	fprintf(f, "vram=0\ngpu=%s\nagent=0\n", argv[1]);
	fclose(f);

	void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	gpa_t gpa = h ? (gpa_t)dlsym(h, "cuGetProcAddress_v2") : NULL;
	if (!gpa)
		return 2;
	must(gpa("cuInit", (void **)&init_gpa, 12000, 0, NULL), "cuGetProcAddress(cuInit)");
	must(gpa("cuMemAlloc", (void **)&alloc_gpa, 12000, 0, NULL), "cuGetProcAddress(cuMemAlloc)");
	must(gpa("cuLaunchKernel", (void **)&launch_gpa, 12000, 2, NULL), "cuGetProcAddress(cuLaunchKernel)");
	launch_dlsym = (launch_t)dlsym(h, "cuLaunchKernel");
	must(init_gpa(0), "cuInit");

	CUdeviceptr big, small;
	size_t big_size = 8 * MIB, small_size = 4096;
	must(cuMemAlloc_v2(&big, big_size), "cuMemAlloc (exported)");
	must(alloc_gpa(&small, small_size), "cuMemAlloc (small)");
	int big_byte = 0x5a, small_byte = 0x33;
	void *fill_big[] = {&big, &big_size, &big_byte}, *fill_small[] = {&small, &small_size, &small_byte};
	must(launch_gpa((void *)fill, 1, 1, 1, 1, 1, 1, 0, NULL, fill_big, NULL), "fill");
	must(launch_gpa((void *)fill, 1, 1, 1, 1, 1, 1, 0, NULL, fill_small, NULL), "fill");
	for (int i = 0; i < threads; i++) {
		struct worker *w = &workers[i];
		w->index = i, w->size = 3 * MIB;
		must(alloc_gpa(&w->buf, w->size), "cuMemAlloc");
		int seed = i * 17;
		void *params[] = {&w->buf, &w->size, &seed};
		must(launch_gpa((void *)fill, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL), "fill");
	}
	for (int i = 0; i < threads; i++)
		pthread_create(&workers[i].t, NULL, work, &workers[i]);
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	while (counter) {
		char n[32];
		snprintf(n, sizeof n, "%ld", atomic_load(&total));
		write_counter(n);
		usleep(10000);
	}

	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (!strcmp(line, "count\n")) {
			printf("%ld\n", atomic_load(&total));
			fflush(stdout);
		} else if (!strcmp(line, "stop\n")) {
			break;
		}
	}
	atomic_store(&stop, 1);
	int bad = 0;
	for (int i = 0; i < threads; i++) {
		struct worker *w = &workers[i];
		pthread_join(w->t, NULL);
		unsigned char want = (unsigned char)(i * 17 + w->count);
		for (size_t k = 0; k < w->size; k++)
			if (((unsigned char *)w->buf)[k] != want) {
				printf("thread %d: byte %zu is %d, not %d\n", i, k, ((unsigned char *)w->buf)[k], want);
				bad = 1;
				break;
			}
	}
	for (size_t k = 0; k < big_size; k++)
		if (((unsigned char *)big)[k] != big_byte) {
			printf("big buffer: byte %zu changed\n", k);
			bad = 1;
			break;
		}
	for (size_t k = 0; k < small_size; k++)
		if (((unsigned char *)small)[k] != small_byte) {
			printf("small buffer: byte %zu changed\n", k);
			bad = 1;
			break;
		}
	printf(bad ? "corrupt\n" : "intact\n");
	return bad;
}
