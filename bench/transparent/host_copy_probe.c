/* Where the copy out's host side goes (docs/fast-path.md, "Measured"): 16 threads move GIB GiB out of 4 MiB source
 * buffers (standing in for the pinned bounce buffers) into host memory, each way a park could keep it:
 *   fault   fresh anonymous memory (THP advised), memcpy into it: the kernel zeroes each page first (today)
 *   memfd   pwrite into a memfd per thread (tmpfs page cache): a full-page write needs no zeroing, unless the
 *           kernel zeroes every allocation anyway (init_on_alloc=1)
 *   warm    memcpy into memory faulted in beforehand (the bound: no allocation at all)
 * and back (the copy in): memcpy from the anonymous memory, pread from the memfds.
 * Build and run: cc -O2 -pthread -o /tmp/hcp bench/transparent/host_copy_probe.c && /tmp/hcp [GIB] */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define THREADS 16
#define PIECE (4UL << 20)

static size_t per_thread;
static int mode; /* 0 fault, 1 memfd, 2 warm, 3 read anon, 4 pread memfd */
static char *areas[THREADS];
static int fds[THREADS];
static char *src[THREADS];

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *work(void *arg)
{
    long i = (long)arg;
    for (size_t off = 0; off < per_thread; off += PIECE) {
        switch (mode) {
        case 0: case 2: memcpy(areas[i] + off, src[i], PIECE); break;
        case 1: if (pwrite(fds[i], src[i], PIECE, off) != (ssize_t)PIECE) abort(); break;
        case 3: memcpy(src[i], areas[i] + off, PIECE); break;
        case 4: if (pread(fds[i], src[i], PIECE, off) != (ssize_t)PIECE) abort(); break;
        }
    }
    return NULL;
}

static double run(int m)
{
    pthread_t t[THREADS];
    mode = m;
    double t0 = now();
    for (long i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    return per_thread * THREADS / (now() - t0) / 1e9;
}

static void fresh_anon(void)
{
    for (int i = 0; i < THREADS; i++) {
        if (areas[i]) munmap(areas[i], per_thread);
        areas[i] = mmap(NULL, per_thread, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        madvise(areas[i], per_thread, MADV_HUGEPAGE);
    }
}

int main(int argc, char **argv)
{
    size_t gib = argc > 1 ? strtoul(argv[1], NULL, 10) : 16;
    per_thread = (gib << 30) / THREADS / PIECE * PIECE;
    for (int i = 0; i < THREADS; i++) {
        src[i] = aligned_alloc(4096, PIECE);
        memset(src[i], i + 1, PIECE);
    }
    for (int round = 0; round < 3; round++) {
        fresh_anon();
        double fault = run(0), warm = run(2), back = run(3);
        for (int i = 0; i < THREADS; i++) {
            fds[i] = memfd_create("park", 0);
        }
        double memfd = run(1), pr = run(4);
        for (int i = 0; i < THREADS; i++)
            close(fds[i]);
        printf("round %d, %zu GiB, %d threads, 4 MiB pieces: out: fault %.1f GB/s, memfd %.1f, warm %.1f;"
               " in: anon %.1f, memfd pread %.1f\n", round, gib, THREADS, fault, memfd, warm, back, pr);
        fflush(stdout);
    }
    return 0;
}
