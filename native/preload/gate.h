/* The interposer's gate (issue 16): a park closes it and waits until no call is inside; a call that finds it
 * closed waits outside until it reopens. "sharded" (what the interposer uses): one counter per thread on its own
 * cache line, summed by the parker, so a call's atomic stays local (14-19 ns a call at 1-8 threads, measured by
 * bench/interpose_probe). "global": one shared counter, kept for that probe's comparison (148 ns at 4 threads). */
#ifndef GPUSCHED_GATE_H
#define GPUSCHED_GATE_H
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define GATE_SLOTS 512
struct gate_slot {
	_Atomic long n;
	char pad[56];
} __attribute__((aligned(64)));

static _Atomic long gate_inside;                 /* global variant */
static struct gate_slot gate_slots[GATE_SLOTS]; /* sharded variant (slot 0: threads past GATE_SLOTS) */
static _Atomic int gate_nslots = 1;
static __thread _Atomic long *gate_mine;
static _Atomic int gate_closed;
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static unsigned long gate_waits;

static inline _Atomic long *gate_counter(int sharded)
{
	if (!sharded)
		return &gate_inside;
	if (!gate_mine) {
		int i = atomic_fetch_add(&gate_nslots, 1);
		gate_mine = &gate_slots[i < GATE_SLOTS ? i : 0].n;
	}
	return gate_mine;
}

static inline void gate_enter(int sharded)
{
	_Atomic long *c = gate_counter(sharded);
	for (;;) {
		atomic_fetch_add(c, 1); /* seq_cst: ordered before the read of gate_closed (Dekker with the parker) */
		if (!atomic_load(&gate_closed))
			return;
		atomic_fetch_sub(c, 1);
		pthread_mutex_lock(&gate_mu);
		gate_waits++;
		while (atomic_load(&gate_closed))
			pthread_cond_wait(&gate_cv, &gate_mu);
		pthread_mutex_unlock(&gate_mu);
	}
}

static inline void gate_exit(int sharded) { atomic_fetch_sub_explicit(gate_counter(sharded), 1, memory_order_release); }

static inline long gate_inside_now(void)
{
	long n = atomic_load(&gate_inside);
	int k = atomic_load(&gate_nslots);
	for (int i = 0; i < k && i < GATE_SLOTS; i++)
		n += atomic_load(&gate_slots[i].n);
	return n;
}

static inline double gate_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static inline void gate_open(void);

/* Close the gate and wait until every call inside has left, or reopen it and return -1 once `seconds` passed (a
 * call that never returns: a wait on work that only a caller held outside could enqueue). */
static inline int gate_close_within(double seconds)
{
	double deadline = gate_now() + seconds;
	atomic_store(&gate_closed, 1);
	for (unsigned spins = 0; gate_inside_now() > 0; spins++) {
		if (spins > 1000) {
			if (gate_now() > deadline) {
				gate_open();
				return -1;
			}
			sched_yield();
		}
	}
	return 0;
}

static inline void gate_close(void) { gate_close_within(1e9); }

static inline void gate_open(void)
{
	pthread_mutex_lock(&gate_mu);
	atomic_store(&gate_closed, 0);
	pthread_cond_broadcast(&gate_cv);
	pthread_mutex_unlock(&gate_mu);
}
#endif
