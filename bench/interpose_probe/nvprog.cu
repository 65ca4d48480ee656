// The nvcc-built programs of the probe (runtime API, statically linked cudart as nvcc does by default).
//   count N   cudaMalloc x3, cudaMemset x1, N launches, cudaMemcpy DtoH x1, cudaFree x3
//   async N   a stream; cudaMallocAsync x2, N launches, cudaMemcpyAsync x1, cudaFreeAsync x2, stream sync x1
//   graph N   capture 10 launches into a graph, cudaGraphLaunch N times
//   bench N T T threads (own stream each) launch an empty kernel N times; prints ns per launch
//   vmm       cost of cuMemAlloc/cuMemFree against reserve+create+map+setaccess / unmap+release+free
#include <cuda.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)
#define DK(x) do { CUresult e_ = (x); if (e_ != CUDA_SUCCESS) { fprintf(stderr, "%s: %d\n", #x, (int)e_); exit(1); } } while (0)

__global__ void inc(float *p, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) p[i] += 1.0f; }
__global__ void empty() {}

static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static long N;
static void *bench_thread(void *) {
	cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	for (long i = 0; i < N; i++) empty<<<1, 1, 0, s>>>();
	CK(cudaStreamSynchronize(s));
	return NULL;
}

int main(int argc, char **argv) {
	const char *mode = argc > 1 ? argv[1] : "count";
	N = argc > 2 ? atol(argv[2]) : 1000;
	int n = 1 << 18;
	if (!strcmp(mode, "count")) {
		float *a, *b, *c, h;
		CK(cudaMalloc(&a, n * 4)); CK(cudaMalloc(&b, 64 << 20)); CK(cudaMalloc(&c, 2 << 20));
		CK(cudaMemset(a, 0, n * 4));
		for (long i = 0; i < N; i++) inc<<<n / 256, 256>>>(a, n);
		CK(cudaMemcpy(&h, a, 4, cudaMemcpyDeviceToHost));
		CK(cudaFree(a)); CK(cudaFree(b)); CK(cudaFree(c));
		printf("expect: malloc 3, memset 1, launch %ld, memcpy 1, free 3; result %.0f (want %ld)\n", N, h, N);
	} else if (!strcmp(mode, "async")) {
		cudaStream_t s; float *a, *b, h;
		CK(cudaStreamCreate(&s));
		CK(cudaMallocAsync(&a, n * 4, s)); CK(cudaMallocAsync(&b, 32 << 20, s));
		CK(cudaMemsetAsync(a, 0, n * 4, s));
		for (long i = 0; i < N; i++) inc<<<n / 256, 256, 0, s>>>(a, n);
		CK(cudaMemcpyAsync(&h, a, 4, cudaMemcpyDeviceToHost, s));
		CK(cudaFreeAsync(a, s)); CK(cudaFreeAsync(b, s));
		CK(cudaStreamSynchronize(s));
		printf("expect: mallocasync 2, memsetasync 1, launch %ld, memcpyasync 1, freeasync 2, streamsync 1; result %.0f (want %ld)\n", N, h, N);
	} else if (!strcmp(mode, "graph")) {
		cudaStream_t s; float *a, h; cudaGraph_t g; cudaGraphExec_t ge;
		CK(cudaStreamCreate(&s)); CK(cudaMalloc(&a, n * 4)); CK(cudaMemset(a, 0, n * 4));
		CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
		for (int i = 0; i < 10; i++) inc<<<n / 256, 256, 0, s>>>(a, n);
		CK(cudaStreamEndCapture(s, &g)); CK(cudaGraphInstantiate(&ge, g, 0));
		for (long i = 0; i < N; i++) CK(cudaGraphLaunch(ge, s));
		CK(cudaStreamSynchronize(s));
		CK(cudaMemcpy(&h, a, 4, cudaMemcpyDeviceToHost));
		printf("expect: graphlaunch %ld, launches captured 10 (not executed as launches); result %.0f (want %ld)\n", N, h, 10 * N);
	} else if (!strcmp(mode, "bench")) {
		int T = argc > 3 ? atoi(argv[3]) : 1;
		pthread_t th[64];
		CK(cudaFree(0));
		long keep = N; N = 2000; bench_thread(NULL); N = keep;  // warm up
		double t0 = now();
		for (int i = 0; i < T; i++) pthread_create(&th[i], NULL, bench_thread, NULL);
		for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
		double t = now() - t0;
		printf("bench threads=%d launches=%ld total_s=%.4f ns_per_launch=%.1f\n", T, N * T, t, t * 1e9 / (N * T));
	} else if (!strcmp(mode, "vmm")) {
		CK(cudaFree(0));
		CUdevice dev; DK(cuCtxGetDevice(&dev));
		CUmemAllocationProp prop; memset(&prop, 0, sizeof prop);
		prop.type = CU_MEM_ALLOCATION_TYPE_PINNED; prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE; prop.location.id = dev;
		size_t gran; DK(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
		CUmemAccessDesc acc; acc.location = prop.location; acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
		size_t sizes[] = {2u << 20, 20u << 20, 256u << 20, 2048ul << 20};
		printf("granularity %zu\n", gran);
		for (int k = 0; k < 4; k++) {
			size_t sz = sizes[k]; int reps = sz >= (256u << 20) ? 20 : 200;
			double ta = 0, tf = 0, va = 0, vf = 0;
			for (int r = 0; r < reps; r++) {
				CUdeviceptr p; double t0 = now();
				DK(cuMemAlloc(&p, sz)); double t1 = now(); DK(cuMemFree(p)); double t2 = now();
				ta += t1 - t0; tf += t2 - t1;
				CUmemGenericAllocationHandle h; double u0 = now();
				DK(cuMemAddressReserve(&p, sz, 0, 0, 0)); DK(cuMemCreate(&h, sz, &prop, 0));
				DK(cuMemMap(p, sz, 0, h, 0)); DK(cuMemSetAccess(p, sz, &acc, 1)); double u1 = now();
				DK(cuMemUnmap(p, sz)); DK(cuMemRelease(h)); DK(cuMemAddressFree(p, sz)); double u2 = now();
				va += u1 - u0; vf += u2 - u1;
			}
			printf("vmm size_mib=%zu reps=%d cuMemAlloc_us=%.1f cuMemFree_us=%.1f vmm_alloc_us=%.1f vmm_free_us=%.1f\n",
			       sz >> 20, reps, ta / reps * 1e6, tf / reps * 1e6, va / reps * 1e6, vf / reps * 1e6);
		}
	}
	CK(cudaDeviceSynchronize());
	return 0;
}
