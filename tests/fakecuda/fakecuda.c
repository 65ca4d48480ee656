/*
 * A fake libcuda.so.1 for CI: the CUDA checkpoint entry points with the driver's own struct layouts,
 * return codes and state machine, so the driver backend's glue, ordering and rollback are tested
 * without a GPU.  State lives in files under $FAKECUDA_DIR so every process (the daemon, a restarted
 * daemon, the test, a cuda-checkpoint stand-in) sees the same driver.  Layout (see
 * gpuschedd/testing/fakegpu.py, which reads the same files for fake NVML):
 *
 *   gpus                 "<uuid> <index> <total bytes> <name>" per line: the fake GPUs
 *   dev/nvidiactl        the fake driver's device file: cuInit opens it and it stays open for the process's life,
 *                        as the real cuInit opens /dev/nvidiactl (a process without it open holds no context)
 *   ctx/<pid>            a process that holds a CUDA context: "vram=<bytes>\ngpu=<uuid>\nagent=<0|1>\n"
 *   state/<pid>          its CUprocessState (absent: RUNNING)
 *   alloc/<name>         "<bytes> <uuid>": memory held on a GPU by something that is not a model
 *   fail/<pid>.<step>    the error name that step returns for that pid (lock, checkpoint, restore, unlock,
 *                        get-state), until the file is removed
 *   busy/<pid>           milliseconds the process stays busy: a lock with a shorter timeout waits that
 *                        timeout and fails with CUDA_ERROR_NOT_READY, the process left RUNNING
 *   delay/<pid>.<step>   milliseconds that step (lock, checkpoint, restore, unlock) sleeps before it acts, for
 *   delay/all.<step>     that pid or every pid: a slow driver, so a test can kill the caller mid-operation
 *                        (ctx-sync: cuCtxSynchronize, as if the context's work took that long)
 *   hold/<pid>.<step>    while this file exists, that step (checkpoint, restore; park, unpark: each copy of an agent
 *                        in that process, device to host and host to device) stays in its copy, up to 30 s: a
 *                        copy that lasts until the test lets it end, so the order of two models' steps shows
 *                        whether they overlapped. As on the real driver, a checkpoint holds the process's GPU
 *                        memory until its copy ends (and fail/<pid>.checkpoint read after the hold fails it
 *                        there, memory still held); a restore claims the memory before its copy
 *   broken/<pid>         a restore ran out of memory: every later restore fails with
 *                        CUDA_ERROR_OPERATING_SYSTEM, as the real driver does (cuda-checkpoint issue 44)
 *   req/<pid>, ack/<pid> with agent=1 the copy runs inside the target, like the real driver's restore
 *                        thread: the call waits for the target's agent thread to answer, so a target
 *                        frozen by the cgroup freezer cannot be checkpointed or restored
 *   (the virtual memory management, copy and stream calls gpuschedd.agent uses are below, over host memory;
 *   so are cuMemAlloc/cuMemFree, launches of fake kernels (host functions run by the launching thread: memory
 *   they touch must be mapped, as on a GPU) and cuGetProcAddress{,_v2}, for the interposer, native/preload)
 *   log                  one line per call: "<step> <pid> <result name>" (cuInit: "init <caller pid>")
 *
 * Build: gcc -shared -fPIC -O2 -o libcuda.so.1 fakecuda.c
 * (-DFAKECUDA_NO_CHECKPOINT builds a driver older than the checkpoint API: cuInit and cuGetErrorName only.)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../../native/preload/cuda_abi.h" /* the driver's types and error codes, as the interposer has them */

static const struct {
    CUresult code;
    const char *name;
} error_names[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT"},
    {CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM"},
    {CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED"},
    {CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"},
    {CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"},
    {CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN"},
};

CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    if (!pStr)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++) {
        if (error_names[i].code == error) {
            *pStr = error_names[i].name;
            return CUDA_SUCCESS;
        }
    }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

static int initialized_pid; /* cuInit is per process: a forked child must call it again */

CUresult cuInit(unsigned int flags);

#ifndef FAKECUDA_NO_CHECKPOINT

/* ---------------------------------------------------------------- the driver's structs */

typedef struct {
    unsigned char bytes[16];
} CUuuid;

typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;

typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    uint64_t reserved1[7];
} CUcheckpointLockArgs;

typedef struct {
    uint64_t reserved[8];
} CUcheckpointCheckpointArgs;

typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[44];
    uint64_t reserved1;
} CUcheckpointRestoreArgs;

typedef struct {
    uint64_t reserved[8];
} CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointCheckpointArgs) == 64, "checkpoint args are 64 bytes");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args are 64 bytes");
_Static_assert(sizeof(CUcheckpointUnlockArgs) == 64, "unlock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "a GPU pair is two 16-byte UUIDs");

typedef enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3,
} CUprocessState;

/* ---------------------------------------------------------------- state files */

static const char *dir(void)
{
    const char *d = getenv("FAKECUDA_DIR");
    return d && *d ? d : "/tmp/fakecuda";
}

static void path(char *out, const char *sub, int pid, const char *suffix)
{
    if (pid >= 0)
        snprintf(out, PATH_MAX, "%s/%s/%d%s", dir(), sub, pid, suffix ? suffix : "");
    else
        snprintf(out, PATH_MAX, "%s/%s", dir(), sub);
}

static int read_file(const char *p, char *buf, size_t size)
{
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, size - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return 0;
}

static void write_file(const char *p, const char *text)
{
    char tmp[PATH_MAX + 48];
    snprintf(tmp, sizeof tmp, "%s.%d.%ld", p, getpid(), (long)syscall(SYS_gettid)); /* one per thread */
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fputs(text, f);
    fclose(f);
    rename(tmp, p); /* readers never see a half-written state */
}

static void mkdirs(void)
{
    static const char *subs[] = {"ctx", "state", "alloc", "fail", "busy", "broken", "req", "ack", "delay", "hold", "dev"};
    char p[PATH_MAX];
    mkdir(dir(), 0755);
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        path(p, subs[i], -1, NULL);
        mkdir(p, 0755);
    }
}

/* Serializes read-modify-write of the state files across processes and across threads of one process (the daemon
   calls the driver from several worker threads at once, as the real, thread-safe, driver allows): each holder has
   its own open file description, so no thread can release another's lock. */
static int big_lock(void)
{
    char p[PATH_MAX];
    path(p, "lock", -1, NULL);
    int fd = open(p, O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    if (fd >= 0)
        flock(fd, LOCK_EX);
    return fd;
}

static void big_unlock(int fd)
{
    if (fd >= 0) {
        flock(fd, LOCK_UN);
        close(fd);
    }
}

static const char *name_of(CUresult r)
{
    const char *s = NULL;
    cuGetErrorName(r, &s);
    return s ? s : "CUDA_ERROR_UNKNOWN";
}

static CUresult logged(const char *step, int pid, CUresult r)
{
    char p[PATH_MAX], line[128];
    path(p, "log", -1, NULL);
    int n = snprintf(line, sizeof line, "%s %d %s\n", step, pid, name_of(r));
    int fd = open(p, O_CREAT | O_WRONLY | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t w = write(fd, line, (size_t)n); /* O_APPEND: one line, one write, never interleaved */
        (void)w;
        close(fd);
    }
    return r;
}

static CUresult code_of(const char *name)
{
    for (size_t i = 0; i < sizeof error_names / sizeof error_names[0]; i++)
        if (strcmp(error_names[i].name, name) == 0)
            return error_names[i].code;
    return CUDA_ERROR_UNKNOWN;
}

/* An injected failure for this step, or CUDA_SUCCESS. */
static CUresult injected(int pid, const char *step)
{
    char p[PATH_MAX], buf[128], suffix[32];
    snprintf(suffix, sizeof suffix, ".%s", step);
    path(p, "fail", pid, suffix);
    if (read_file(p, buf, sizeof buf) != 0)
        return CUDA_SUCCESS;
    return code_of(buf);
}

static void sleep_ms(long ms);
static long long now_ms(void);

/* An injected delay for this step: delay/<pid>.<step>, else delay/all.<step> (milliseconds). */
static void injected_delay(int pid, const char *step)
{
    char p[PATH_MAX], buf[32], suffix[32];
    snprintf(suffix, sizeof suffix, ".%s", step);
    path(p, "delay", pid, suffix);
    if (read_file(p, buf, sizeof buf) != 0) {
        snprintf(p, sizeof p, "%s/delay/all.%s", dir(), step);
        if (read_file(p, buf, sizeof buf) != 0)
            return;
    }
    sleep_ms(atol(buf));
}

/* A held copy: while hold/<pid>.<step> exists (at most 30 s, so a test that never lets go does not hang). */
static void injected_hold(int pid, const char *step)
{
    char p[PATH_MAX], suffix[32];
    snprintf(suffix, sizeof suffix, ".%s", step);
    path(p, "hold", pid, suffix);
    long long deadline = now_ms() + 30000;
    while (access(p, F_OK) == 0 && now_ms() < deadline)
        sleep_ms(2);
}

struct ctx {
    long long vram;
    char gpu[96];
    int agent;
};

static int alive(int pid)
{
    return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

/* 0: the pid holds a (fake) CUDA context. Otherwise the error the driver gives. */
static CUresult find_ctx(int pid, struct ctx *c)
{
    char p[PATH_MAX], buf[512];
    if (!alive(pid))
        return CUDA_ERROR_INVALID_VALUE;
    path(p, "ctx", pid, NULL);
    if (read_file(p, buf, sizeof buf) != 0)
        return CUDA_ERROR_OPERATING_SYSTEM; /* a live process without CUDA: what driver 580 answers (H100) */
    memset(c, 0, sizeof *c);
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "vram=", 5) == 0)
            c->vram = atoll(line + 5);
        else if (strncmp(line, "gpu=", 4) == 0)
            snprintf(c->gpu, sizeof c->gpu, "%s", line + 4);
        else if (strncmp(line, "agent=", 6) == 0)
            c->agent = atoi(line + 6);
    }
    return CUDA_SUCCESS;
}

static CUprocessState get_state(int pid)
{
    char p[PATH_MAX], buf[32];
    path(p, "state", pid, NULL);
    if (read_file(p, buf, sizeof buf) != 0)
        return CU_PROCESS_STATE_RUNNING;
    return (CUprocessState)atoi(buf);
}

static void set_state(int pid, CUprocessState s)
{
    char p[PATH_MAX], buf[16];
    path(p, "state", pid, NULL);
    snprintf(buf, sizeof buf, "%d\n", (int)s);
    write_file(p, buf);
}

static int exists(const char *sub, int pid)
{
    char p[PATH_MAX];
    path(p, sub, pid, NULL);
    return access(p, F_OK) == 0;
}

static void mark_broken(int pid)
{
    char p[PATH_MAX];
    path(p, "broken", pid, NULL);
    write_file(p, "1\n");
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Bytes held on a GPU by the entries of ctx/ (contexts that hold their memory: running or locked) or
   alloc/ (foreign allocations), leaving out except_pid. */
static long long sum_dir(const char *sub, const char *uuid, int except_pid)
{
    char d[PATH_MAX];
    long long used = 0;
    int is_ctx = strcmp(sub, "ctx") == 0;
    path(d, sub, -1, NULL);
    DIR *dp = opendir(d);
    if (!dp)
        return 0;
    struct dirent *e;
    while ((e = readdir(dp)) != NULL) {
        if (e->d_name[0] == '.' || strchr(e->d_name, '.'))
            continue; /* dot files and write_file's temporaries */
        char p[PATH_MAX + 256], buf[512];
        snprintf(p, sizeof p, "%s/%s", d, e->d_name);
        if (is_ctx) {
            int pid = atoi(e->d_name);
            struct ctx c;
            if (pid == except_pid || find_ctx(pid, &c) != CUDA_SUCCESS)
                continue;
            if (strcmp(c.gpu, uuid) == 0 && get_state(pid) != CU_PROCESS_STATE_CHECKPOINTED)
                used += c.vram;
        } else if (read_file(p, buf, sizeof buf) == 0) {
            long long bytes = 0;
            char gpu[96] = "";
            if (sscanf(buf, "%lld %95s", &bytes, gpu) == 2 && strcmp(gpu, uuid) == 0)
                used += bytes;
        }
    }
    closedir(dp);
    return used;
}

static long long gpu_used(const char *uuid, int except_pid)
{
    return sum_dir("ctx", uuid, except_pid) + sum_dir("alloc", uuid, -1);
}

/* Total bytes of a GPU per the gpus file; -1 without a gpus file (no memory check then), -2 for a GPU
   the file does not list. */
static long long gpu_total(const char *uuid)
{
    char p[PATH_MAX], line[256];
    path(p, "gpus", -1, NULL);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    long long total = -2;
    while (fgets(line, sizeof line, f)) {
        char u[96];
        int index;
        long long t;
        if (sscanf(line, "%95s %d %lld", u, &index, &t) == 3 && strcmp(u, uuid) == 0)
            total = t;
    }
    fclose(f);
    return total;
}

/* The copy runs inside the target: ask its agent thread and wait for the answer. */
static CUresult run_in_target(int pid, const char *what, const struct ctx *c)
{
    if (!c->agent)
        return CUDA_SUCCESS;
    char req[PATH_MAX], ack[PATH_MAX], buf[64], token[64];
    static unsigned seq;
    snprintf(token, sizeof token, "%s %d.%u", what, getpid(), __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED));
    path(req, "req", pid, NULL);
    path(ack, "ack", pid, NULL);
    write_file(req, token);
    const char *t = getenv("FAKECUDA_AGENT_TIMEOUT_MS");
    long long deadline = now_ms() + (t ? atoll(t) : 5000);
    while (now_ms() < deadline) {
        if (read_file(ack, buf, sizeof buf) == 0 && strcmp(buf, token) == 0)
            return CUDA_SUCCESS;
        sleep_ms(2);
    }
    unlink(req);
    /* The real driver would block here until the target runs again; a test must not hang. */
    return CUDA_ERROR_TIMEOUT;
}

static CUresult prologue(int pid, struct ctx *c, const char *step)
{
    if (initialized_pid != getpid())
        return CUDA_ERROR_NOT_INITIALIZED;
    mkdirs();
    CUresult r = find_ctx(pid, c);
    if (r != CUDA_SUCCESS)
        return r;
    return injected(pid, step);
}

/* from → to, or CUDA_ERROR_ILLEGAL_STATE when the process is in any other state. */
static CUresult transition(int pid, CUprocessState from, CUprocessState to)
{
    CUresult r = CUDA_SUCCESS;
    int fd = big_lock();
    if (get_state(pid) != from)
        r = CUDA_ERROR_ILLEGAL_STATE;
    else
        set_state(pid, to);
    big_unlock(fd);
    return r;
}

/* Whether the process is stopped (SIGSTOP) or held by the cgroup freezer. */
static int held(int pid)
{
    char p[64], buf[2048];
    snprintf(p, sizeof p, "/proc/%d/stat", pid);
    if (read_file(p, buf, sizeof buf) == 0) {
        char *r = strrchr(buf, ')');
        if (r && r[1] == ' ' && (r[2] == 'T' || r[2] == 't'))
            return 1;
    }
    snprintf(p, sizeof p, "/proc/%d/cgroup", pid);
    if (read_file(p, buf, sizeof buf) == 0 && strncmp(buf, "0::", 3) == 0) {
        char *nl = strchr(buf, '\n');
        if (nl)
            *nl = '\0';
        char events[PATH_MAX + 64], text[512];
        snprintf(events, sizeof events, "/sys/fs/cgroup%s/cgroup.events", buf + 3);
        if (read_file(events, text, sizeof text) == 0 && strstr(text, "frozen 1"))
            return 1;
    }
    return 0;
}

/* As the real driver (measured on 580, H100), GetState needs the target to run: on a stopped or frozen process
   it blocks until the process runs again. Here it gives up after FAKECUDA_AGENT_TIMEOUT_MS with
   CUDA_ERROR_TIMEOUT and logs it, so a test that asks about a frozen process fails instead of hanging. */
CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
{
    struct ctx c;
    if (!state)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = prologue(pid, &c, "get-state");
    if (r != CUDA_SUCCESS)
        return r; /* not logged: status reads would drown the ordering the log is for */
    const char *t = getenv("FAKECUDA_AGENT_TIMEOUT_MS");
    long long deadline = now_ms() + (t ? atoll(t) : 5000);
    while (held(pid)) {
        if (now_ms() > deadline)
            return logged("get-state-frozen", pid, CUDA_ERROR_TIMEOUT);
        sleep_ms(5);
    }
    *state = get_state(pid);
    return CUDA_SUCCESS;
}

CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
    struct ctx c;
    if (!tid)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = prologue(pid, &c, "get-restore-tid");
    if (r == CUDA_SUCCESS)
        *tid = pid;
    return r;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
    struct ctx c;
    CUresult r = prologue(pid, &c, "lock");
    if (r != CUDA_SUCCESS)
        return logged("lock", pid, r);
    injected_delay(pid, "lock");
    unsigned timeout = args ? args->timeoutMs : 0;
    char p[PATH_MAX], buf[32];
    path(p, "busy", pid, NULL);
    if (read_file(p, buf, sizeof buf) == 0) {
        long busy = atol(buf);
        if (timeout && (long)timeout < busy) {
            sleep_ms(timeout);
            return logged("lock", pid, CUDA_ERROR_NOT_READY); /* left RUNNING */
        }
        sleep_ms(busy);
    }
    return logged("lock", pid, transition(pid, CU_PROCESS_STATE_RUNNING, CU_PROCESS_STATE_LOCKED));
}

CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
    (void)args;
    struct ctx c;
    CUresult r = prologue(pid, &c, "checkpoint");
    if (r != CUDA_SUCCESS)
        return logged("checkpoint", pid, r);
    if (get_state(pid) != CU_PROCESS_STATE_LOCKED)
        return logged("checkpoint", pid, CUDA_ERROR_ILLEGAL_STATE);
    injected_delay(pid, "checkpoint");
    injected_hold(pid, "checkpoint"); /* the copy: the memory is held until it ends */
    r = injected(pid, "checkpoint");  /* a copy that fails at its end */
    if (r == CUDA_SUCCESS)
        r = run_in_target(pid, "checkpoint", &c);
    if (r == CUDA_SUCCESS)
        set_state(pid, CU_PROCESS_STATE_CHECKPOINTED);
    return logged("checkpoint", pid, r);
}

static void uuid_text(const CUuuid *u, char *out)
{
    const unsigned char *b = u->bytes;
    sprintf(out, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
            b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
{
    struct ctx c;
    CUresult r = prologue(pid, &c, "restore");
    if (r == CUDA_ERROR_OUT_OF_MEMORY)
        mark_broken(pid); /* an injected OOM breaks the process exactly like a real one */
    if (r != CUDA_SUCCESS)
        return logged("restore", pid, r);
    if (get_state(pid) != CU_PROCESS_STATE_CHECKPOINTED)
        return logged("restore", pid, CUDA_ERROR_ILLEGAL_STATE);
    if (exists("broken", pid))
        return logged("restore", pid, CUDA_ERROR_OPERATING_SYSTEM);
    injected_delay(pid, "restore");
    char target[96];
    snprintf(target, sizeof target, "%s", c.gpu);
    if (args && args->gpuPairsCount) {
        int mapped = 0;
        for (unsigned i = 0; i < args->gpuPairsCount; i++) {
            char old[64], new[64];
            uuid_text(&args->gpuPairs[i].oldUuid, old);
            uuid_text(&args->gpuPairs[i].newUuid, new);
            if (strcmp(old, c.gpu) == 0) {
                snprintf(target, sizeof target, "%s", new);
                mapped = 1;
            }
        }
        if (!mapped) /* the pairs must cover every checkpointed GPU */
            return logged("restore", pid, CUDA_ERROR_INVALID_VALUE);
    }
    int fd = big_lock();
    long long total = gpu_total(target);
    if (total == -2) {
        big_unlock(fd);
        return logged("restore", pid, CUDA_ERROR_INVALID_DEVICE);
    }
    if (total >= 0 && gpu_used(target, pid) + c.vram > total) {
        mark_broken(pid);
        big_unlock(fd);
        return logged("restore", pid, CUDA_ERROR_OUT_OF_MEMORY); /* stays CHECKPOINTED, and broken */
    }
    /* Claim the memory before the copy, so two restores cannot both fit in the same free space. */
    set_state(pid, CU_PROCESS_STATE_LOCKED);
    big_unlock(fd);
    injected_hold(pid, "restore"); /* the copy, into memory already claimed */
    r = run_in_target(pid, "restore", &c);
    if (r != CUDA_SUCCESS) {
        set_state(pid, CU_PROCESS_STATE_CHECKPOINTED);
        return logged("restore", pid, r);
    }
    if (strcmp(target, c.gpu) != 0) {
        char p[PATH_MAX], buf[256];
        path(p, "ctx", pid, NULL);
        snprintf(buf, sizeof buf, "vram=%lld\ngpu=%s\nagent=%d\n", c.vram, target, c.agent);
        write_file(p, buf);
    }
    return logged("restore", pid, CUDA_SUCCESS);
}

CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
    (void)args;
    struct ctx c;
    CUresult r = prologue(pid, &c, "unlock");
    if (r != CUDA_SUCCESS)
        return logged("unlock", pid, r);
    injected_delay(pid, "unlock");
    return logged("unlock", pid, transition(pid, CU_PROCESS_STATE_LOCKED, CU_PROCESS_STATE_RUNNING));
}


/* ---------------------------------------------------------------- virtual memory management (gpuschedd.agent)
 *
 * Device memory is host memory: a reservation is a PROT_NONE mapping, a physical allocation a memfd, a map
 * maps the memfd at the reserved address (inaccessible until cuMemSetAccess), an unmap puts PROT_NONE back,
 * so a stale pointer faults as it would on the GPU.  cuMemCreate and cuMemRelease add to and take from the
 * caller's ctx/<pid> vram= (what fake NVML shows), and cuMemCreate fails with CUDA_ERROR_OUT_OF_MEMORY when the
 * GPU is full.  Every call blocks while the caller is locked or checkpointed, as a real CUDA call does.
 * fail/<pid>.<step> injects a failure for steps mem-create, mem-map, memcpy, host-register. */

#include <pthread.h>
#include <sys/mman.h>

#define GRANULARITY (2ULL << 20)
#define MAX_ENTRIES 4096

struct reservation {
    CUdeviceptr base;
    size_t size;
    void *raw; /* what mmap returned (base is aligned inside it) */
    size_t raw_size;
};
struct physical {
    int fd;
    size_t size;
    int device;
};
struct mapping {
    CUdeviceptr ptr;
    size_t size;
    int accessible;
};

static pthread_mutex_t vmm_lock = PTHREAD_MUTEX_INITIALIZER;
static struct reservation reservations[MAX_ENTRIES];
static struct physical physicals[MAX_ENTRIES]; /* handle = index + 1 */
static struct mapping mappings[MAX_ENTRIES];
static void *registered[MAX_ENTRIES];

static CUresult vmm_prologue(const char *step)
{
    if (initialized_pid != getpid())
        return CUDA_ERROR_NOT_INITIALIZED;
    while (get_state(getpid()) != CU_PROCESS_STATE_RUNNING)
        sleep_ms(2);
    return injected(getpid(), step);
}

/* Add delta bytes to the caller's vram=, failing (nothing changed) if the GPU would be over its total. A fake
   process has one GPU (its ctx's gpu=), device ordinal 0. */
static CUresult charge(int device, long long delta)
{
    int pid = getpid(), fd = big_lock();
    struct ctx c;
    char p[PATH_MAX], buf[256];
    CUresult r = find_ctx(pid, &c);
    if (r == CUDA_SUCCESS && device != 0)
        r = CUDA_ERROR_INVALID_DEVICE;
    if (r == CUDA_SUCCESS && delta > 0) {
        long long total = gpu_total(c.gpu);
        if (total >= 0 && gpu_used(c.gpu, pid) + c.vram + delta > total)
            r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (r == CUDA_SUCCESS) {
        path(p, "ctx", pid, NULL);
        snprintf(buf, sizeof buf, "vram=%lld\ngpu=%s\nagent=%d\n", c.vram + delta, c.gpu, c.agent);
        write_file(p, buf);
    }
    big_unlock(fd);
    return r;
}

static struct mapping *find_mapping(CUdeviceptr ptr, size_t size, int exact)
{
    for (int i = 0; i < MAX_ENTRIES; i++) {
        struct mapping *m = &mappings[i];
        if (!m->size)
            continue;
        if (exact ? (m->ptr == ptr && m->size == size) : (ptr >= m->ptr && ptr + size <= m->ptr + m->size))
            return m;
    }
    return NULL;
}

static int overlaps_mapping(CUdeviceptr ptr, size_t size)
{
    for (int i = 0; i < MAX_ENTRIES; i++)
        if (mappings[i].size && ptr < mappings[i].ptr + mappings[i].size && mappings[i].ptr < ptr + size)
            return 1;
    return 0;
}

static struct reservation *find_reservation(CUdeviceptr ptr, size_t size)
{
    for (int i = 0; i < MAX_ENTRIES; i++) {
        struct reservation *r = &reservations[i];
        if (r->size && ptr >= r->base && ptr + size <= r->base + r->size)
            return r;
    }
    return NULL;
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop, int option)
{
    (void)option;
    if (!granularity || !prop)
        return CUDA_ERROR_INVALID_VALUE;
    *granularity = GRANULARITY;
    return CUDA_SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags)
{
    (void)addr;
    CUresult r = vmm_prologue("mem-reserve");
    if (r != CUDA_SUCCESS)
        return r;
    if (!ptr || !size || size % GRANULARITY || flags)
        return CUDA_ERROR_INVALID_VALUE;
    size_t align = alignment > GRANULARITY ? alignment : GRANULARITY;
    size_t raw_size = size + align;
    void *raw = mmap(NULL, raw_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUdeviceptr base = ((CUdeviceptr)raw + align - 1) / align * align;
    pthread_mutex_lock(&vmm_lock);
    int i = 0;
    while (i < MAX_ENTRIES && reservations[i].size)
        i++;
    if (i == MAX_ENTRIES) {
        pthread_mutex_unlock(&vmm_lock);
        munmap(raw, raw_size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    reservations[i] = (struct reservation){base, size, raw, raw_size};
    pthread_mutex_unlock(&vmm_lock);
    *ptr = base;
    return CUDA_SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    CUresult r = vmm_prologue("mem-free");
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&vmm_lock);
    struct reservation *res = find_reservation(ptr, size);
    if (!res || res->base != ptr || res->size != size || overlaps_mapping(ptr, size)) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_INVALID_VALUE; /* the driver wants every mapping in the range gone first */
    }
    munmap(res->raw, res->raw_size);
    memset(res, 0, sizeof *res);
    pthread_mutex_unlock(&vmm_lock);
    return CUDA_SUCCESS;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                     unsigned long long flags)
{
    CUresult r = vmm_prologue("mem-create");
    if (r != CUDA_SUCCESS)
        return r;
    if (!handle || !prop || !size || size % GRANULARITY || flags || prop->type != 1 || prop->location.type != 1)
        return CUDA_ERROR_INVALID_VALUE;
    r = charge(prop->location.id, (long long)size);
    if (r != CUDA_SUCCESS)
        return r;
    int fd = memfd_create("fakecuda-vram", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
        if (fd >= 0)
            close(fd);
        charge(prop->location.id, -(long long)size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_lock(&vmm_lock);
    int i = 0;
    while (i < MAX_ENTRIES && physicals[i].size)
        i++;
    if (i < MAX_ENTRIES)
        physicals[i] = (struct physical){fd, size, prop->location.id};
    pthread_mutex_unlock(&vmm_lock);
    if (i == MAX_ENTRIES) {
        close(fd);
        charge(prop->location.id, -(long long)size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *handle = (CUmemGenericAllocationHandle)i + 1;
    return CUDA_SUCCESS;
}

static struct physical *find_physical(CUmemGenericAllocationHandle handle)
{
    if (handle < 1 || handle > MAX_ENTRIES || !physicals[handle - 1].size)
        return NULL;
    return &physicals[handle - 1];
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CUresult r = vmm_prologue("mem-release");
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&vmm_lock);
    struct physical *ph = find_physical(handle);
    if (!ph) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    struct physical gone = *ph;
    memset(ph, 0, sizeof *ph);
    pthread_mutex_unlock(&vmm_lock);
    close(gone.fd); /* a mapping still using it keeps the memory, as the driver does until cuMemUnmap */
    charge(gone.device, -(long long)gone.size);
    return CUDA_SUCCESS;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags)
{
    CUresult r = vmm_prologue("mem-map");
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&vmm_lock);
    struct physical *ph = find_physical(handle);
    int i = 0;
    while (i < MAX_ENTRIES && mappings[i].size)
        i++;
    if (!ph || flags || offset + size > ph->size || !find_reservation(ptr, size) || overlaps_mapping(ptr, size) ||
        i == MAX_ENTRIES) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (mmap((void *)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, ph->fd, (off_t)offset) == MAP_FAILED) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    mappings[i] = (struct mapping){ptr, size, 0};
    pthread_mutex_unlock(&vmm_lock);
    return CUDA_SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    CUresult r = vmm_prologue("mem-access");
    if (r != CUDA_SUCCESS)
        return r;
    if (!desc || count != 1 || desc->location.type != 1 || desc->flags != 3)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&vmm_lock);
    struct mapping *m = find_mapping(ptr, size, 1);
    if (!m || mprotect((void *)ptr, size, PROT_READ | PROT_WRITE) != 0) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    m->accessible = 1;
    pthread_mutex_unlock(&vmm_lock);
    return CUDA_SUCCESS;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    CUresult r = vmm_prologue("mem-unmap");
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&vmm_lock);
    struct mapping *m = find_mapping(ptr, size, 1);
    if (!m) {
        pthread_mutex_unlock(&vmm_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    mmap((void *)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    memset(m, 0, sizeof *m);
    pthread_mutex_unlock(&vmm_lock);
    return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- copies, streams, contexts, host memory */

/* cuMemAlloc's memory (below): anonymous host memory, charged like cuMemCreate's. */
struct allocation {
    CUdeviceptr ptr;
    size_t size;
};
static struct allocation allocations[MAX_ENTRIES];

static int in_allocation(CUdeviceptr ptr, size_t size)
{
    for (int i = 0; i < MAX_ENTRIES; i++)
        if (allocations[i].size && ptr >= allocations[i].ptr && ptr + size <= allocations[i].ptr + allocations[i].size)
            return 1;
    return 0;
}

static CUresult device_range(CUdeviceptr ptr, size_t size)
{
    pthread_mutex_lock(&vmm_lock);
    struct mapping *m = find_mapping(ptr, size, 0);
    int ok = (m && m->accessible) || in_allocation(ptr, size);
    pthread_mutex_unlock(&vmm_lock);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t size, void *stream)
{
    (void)stream;
    CUresult r = vmm_prologue("memcpy");
    if (r == CUDA_SUCCESS)
        r = dst ? device_range(src, size) : CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS) {
        injected_hold(getpid(), "park");
        memcpy(dst, (const void *)src, size);
    }
    return r;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t size, void *stream)
{
    (void)stream;
    CUresult r = vmm_prologue("memcpy");
    if (r == CUDA_SUCCESS)
        r = src ? device_range(dst, size) : CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS) {
        injected_hold(getpid(), "unpark");
        memcpy((void *)dst, src, size);
    }
    return r;
}

static int fake_stream;

CUresult cuStreamCreate(void **stream, unsigned int flags)
{
    (void)flags;
    CUresult r = vmm_prologue("stream");
    if (r == CUDA_SUCCESS)
        *stream = &fake_stream;
    return r;
}

CUresult cuStreamSynchronize(void *stream)
{
    return stream == &fake_stream ? vmm_prologue("stream") : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuStreamDestroy_v2(void *stream)
{
    return stream == &fake_stream ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static int fake_context;

CUresult cuCtxGetCurrent(void **ctx)
{
    if (initialized_pid != getpid())
        return CUDA_ERROR_NOT_INITIALIZED;
    *ctx = &fake_context;
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(void *ctx)
{
    return ctx == &fake_context ? vmm_prologue("ctx") : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuCtxSynchronize(void)
{
    injected_delay(getpid(), "ctx-sync"); /* work that takes that long to finish */
    return vmm_prologue("ctx");
}

CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned int flags)
{
    (void)flags;
    CUresult r = vmm_prologue("host-register");
    if (r != CUDA_SUCCESS)
        return r;
    if (!p || !size)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&vmm_lock);
    int free_slot = -1;
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (registered[i] == p) {
            pthread_mutex_unlock(&vmm_lock);
            return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
        }
        if (!registered[i] && free_slot < 0)
            free_slot = i;
    }
    if (free_slot >= 0)
        registered[free_slot] = p;
    pthread_mutex_unlock(&vmm_lock);
    return free_slot >= 0 ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuMemHostUnregister(void *p)
{
    pthread_mutex_lock(&vmm_lock);
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (registered[i] == p) {
            registered[i] = NULL;
            pthread_mutex_unlock(&vmm_lock);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&vmm_lock);
    return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
}

CUresult cuCtxGetDevice(int *device)
{
    CUresult r = vmm_prologue("ctx");
    if (r == CUDA_SUCCESS && !device)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS)
        *device = 0;
    return r;
}

/* ---------------------------------------------------------------- cuMemAlloc, launches, cuGetProcAddress
   (what an interposer sees of a CUDA program: native/preload and tests/unit/test_preload.py) */

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t size)
{
    CUresult r = vmm_prologue("mem-alloc");
    if (r != CUDA_SUCCESS)
        return r;
    if (!ptr || !size)
        return CUDA_ERROR_INVALID_VALUE;
    size_t rounded = (size + GRANULARITY - 1) / GRANULARITY * GRANULARITY; /* the driver's pages are 2 MiB too */
    if ((r = charge(0, (long long)rounded)) != CUDA_SUCCESS)
        return r;
    void *p = mmap(NULL, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_mutex_lock(&vmm_lock);
    int i = 0;
    while (i < MAX_ENTRIES && allocations[i].size)
        i++;
    if (p != MAP_FAILED && i < MAX_ENTRIES)
        allocations[i] = (struct allocation){(CUdeviceptr)p, rounded};
    pthread_mutex_unlock(&vmm_lock);
    if (p == MAP_FAILED || i == MAX_ENTRIES) {
        if (p != MAP_FAILED)
            munmap(p, rounded);
        charge(0, -(long long)rounded);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *ptr = (CUdeviceptr)p;
    return CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr ptr)
{
    CUresult r = vmm_prologue("mem-alloc");
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&vmm_lock);
    struct allocation gone = {0, 0};
    for (int i = 0; i < MAX_ENTRIES; i++)
        if (allocations[i].size && allocations[i].ptr == ptr) {
            gone = allocations[i];
            memset(&allocations[i], 0, sizeof allocations[i]);
        }
    pthread_mutex_unlock(&vmm_lock);
    if (!gone.size)
        return CUDA_ERROR_INVALID_VALUE; /* not a cuMemAlloc pointer (a VMM one included) */
    munmap((void *)gone.ptr, gone.size);
    charge(0, -(long long)gone.size);
    return CUDA_SUCCESS;
}

/* A fake kernel is a host function void f(void **params), run in the launching thread: what it touches must be
   mapped, as on a GPU, or the process faults. */
typedef void (*fake_kernel)(void **params);

static CUresult launch(void *f, void **params)
{
    CUresult r = vmm_prologue("launch");
    if (r == CUDA_SUCCESS && !f)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS)
        ((fake_kernel)f)(params);
    return r;
}

#define LAUNCH_PARAMS void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, \
    unsigned shared, void *stream, void **params, void **extra
CUresult cuLaunchKernel(LAUNCH_PARAMS)
{
    (void)gx, (void)gy, (void)gz, (void)bx, (void)by, (void)bz, (void)shared, (void)stream, (void)extra;
    return launch(f, params);
}

CUresult cuLaunchKernel_ptsz(LAUNCH_PARAMS)
{
    (void)gx, (void)gy, (void)gz, (void)bx, (void)by, (void)bz, (void)shared, (void)stream, (void)extra;
    return launch(f, params);
}

CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra)
{
    (void)extra;
    return config ? launch(f, params) : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuLaunchKernelEx_ptsz(const void *config, void *f, void **params, void **extra)
{
    (void)extra;
    return config ? launch(f, params) : CUDA_ERROR_INVALID_VALUE;
}

/* The driver's lookup: a base name, a version and flags → the variant it serves (per-thread default stream
   variants for CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM = 2), from a table, never through dlsym. */
static const struct {
    const char *name;
    void *fn, *per_thread;
} procs[] = {
    {"cuInit", (void *)cuInit, NULL},
    {"cuGetErrorName", (void *)cuGetErrorName, NULL},
    {"cuMemAlloc", (void *)cuMemAlloc_v2, NULL},
    {"cuMemFree", (void *)cuMemFree_v2, NULL},
    {"cuLaunchKernel", (void *)cuLaunchKernel, (void *)cuLaunchKernel_ptsz},
    {"cuLaunchKernelEx", (void *)cuLaunchKernelEx, (void *)cuLaunchKernelEx_ptsz},
    {"cuMemcpyDtoHAsync", (void *)cuMemcpyDtoHAsync_v2, NULL},
    {"cuMemcpyHtoDAsync", (void *)cuMemcpyHtoDAsync_v2, NULL},
    {"cuStreamCreate", (void *)cuStreamCreate, NULL},
    {"cuStreamSynchronize", (void *)cuStreamSynchronize, NULL},
    {"cuStreamDestroy", (void *)cuStreamDestroy_v2, NULL},
    {"cuCtxGetCurrent", (void *)cuCtxGetCurrent, NULL},
    {"cuCtxSetCurrent", (void *)cuCtxSetCurrent, NULL},
    {"cuCtxGetDevice", (void *)cuCtxGetDevice, NULL},
    {"cuCtxSynchronize", (void *)cuCtxSynchronize, NULL},
    {"cuMemGetAllocationGranularity", (void *)cuMemGetAllocationGranularity, NULL},
    {"cuMemAddressReserve", (void *)cuMemAddressReserve, NULL},
    {"cuMemAddressFree", (void *)cuMemAddressFree, NULL},
    {"cuMemCreate", (void *)cuMemCreate, NULL},
    {"cuMemRelease", (void *)cuMemRelease, NULL},
    {"cuMemMap", (void *)cuMemMap, NULL},
    {"cuMemUnmap", (void *)cuMemUnmap, NULL},
    {"cuMemSetAccess", (void *)cuMemSetAccess, NULL},
    {"cuMemHostRegister", (void *)cuMemHostRegister_v2, NULL},
    {"cuMemHostUnregister", (void *)cuMemHostUnregister, NULL},
};

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status);

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags)
{
    return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status)
{
    if (!symbol || !pfn || version < 1000)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    if (!strcmp(symbol, "cuGetProcAddress"))
        *pfn = (void *)cuGetProcAddress_v2;
    for (size_t i = 0; !*pfn && i < sizeof procs / sizeof procs[0]; i++)
        if (!strcmp(procs[i].name, symbol))
            *pfn = (flags & 2) && procs[i].per_thread ? procs[i].per_thread : procs[i].fn;
    if (status)
        *status = *pfn ? 0 : 1; /* CU_GET_PROC_ADDRESS_SUCCESS, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND */
    return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

#endif /* FAKECUDA_NO_CHECKPOINT */

#ifndef FAKECUDA_NO_CHECKPOINT
static int device_fd = -1; /* dev/nvidiactl, open from cuInit on (a forked child inherits it, as a real one does) */
#endif

CUresult cuInit(unsigned int flags)
{
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
#ifndef FAKECUDA_NO_CHECKPOINT
    mkdirs();
    if (device_fd < 0) {
        char p[PATH_MAX];
        path(p, "dev/nvidiactl", -1, NULL);
        device_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (device_fd < 0)
            return logged("init", getpid(), CUDA_ERROR_NO_DEVICE); /* as the real driver without /dev/nvidiactl */
    }
    logged("init", getpid(), CUDA_SUCCESS);
#endif
    initialized_pid = getpid();
    return CUDA_SUCCESS;
}
