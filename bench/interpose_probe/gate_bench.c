/* The gate's own cost (gate.h): enter+exit pairs per thread, no CUDA. Usage: gate_bench PAIRS THREADS SHARDED */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../../native/preload/gate.h"

static long pairs;
static int sharded;

static void *loop(void *arg)
{
	for (long i = 0; i < pairs; i++) {
		gate_enter(sharded);
		__asm__ volatile("" ::: "memory");
		gate_exit(sharded);
	}
	return arg;
}

int main(int argc, char **argv)
{
	pairs = atol(argv[1]);
	int threads = atoi(argv[2]);
	sharded = atoi(argv[3]);
	pthread_t t[64];
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (int i = 0; i < threads; i++)
		pthread_create(&t[i], NULL, loop, NULL);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / pairs;
	printf("gate %s threads=%d ns_per_enter_exit=%.1f\n", sharded ? "sharded" : "global", threads, ns);
	return 0;
}
