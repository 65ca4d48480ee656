/* The daemon's side of the program: a listener thread that speaks the agent protocol of
 * src/gpuschedd/agent/protocol.py (one JSON object per line on DIR/agent-PID.sock), as server.py does for a Python
 * agent, so the daemon's AgentLink cannot tell the two apart:
 *   {"op": "park", "timeout_ms": N} -> {"ok": true, "parked_bytes": B, "staging_bytes": R, "segments": S,
 *                                        "seconds": T, "host_address": A}
 *   {"op": "spill"} + a file (SCM_RIGHTS) -> {"ok": true, "spilled_bytes": B, "seconds": T}
 *   {"op": "read_ahead", "bytes": N} -> {"ok": true, "bytes": K}   (spilled: reading the file's first K <= N)
 *   {"op": "unpark"}                 -> {"ok": true, "seconds": T}
 *   a failure                        -> {"ok": false, "error": "..."}
 * Only root and $GPUSCHED_AGENT_DAEMON_UID are served (SO_PEERCRED). A park belongs to its connection: if the
 * connection ends while parked, the memory is unparked here, retrying until the GPU has room; the gate keeps the
 * program's work waiting meanwhile. A line that is not a JSON object ends the connection, as in server.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "preload.h"

#define MAX_LINE 4096
#define MAX_PARK_TIMEOUT_MS 600000
#define MAX_READ_AHEAD (1LL << 30) /* protocol.py's MAX_READ_AHEAD */
#define RETRY_UNPARK_S 1

static _Atomic int started;
static int listen_fd = -1;
static pid_t listen_pid;
static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static unsigned daemon_uid;

/* ---------------------------------------------------------------- a JSON object, flat: just what the protocol needs */

struct request {
	char op[64];
	int has_op;	 /* "op" is a string */
	int has_timeout; /* "timeout_ms" is an integer */
	long long timeout;
	int has_bytes; /* "bytes" is an integer */
	long long bytes;
};

static const char *ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

/* A JSON string at p (the opening quote); its first outlen-1 bytes (escapes decoded, \u as '?') into out. */
static const char *string(const char *p, char *out, size_t outlen)
{
	size_t n = 0;
	if (*p++ != '"')
		return NULL;
	for (;;) {
		char c = *p++;
		if (c == '"')
			break;
		if ((unsigned char)c < 0x20)
			return NULL;
		if (c == '\\') {
			c = *p++;
			if (c == 'u') {
				for (int i = 0; i < 4; i++)
					if (!strchr("0123456789abcdefABCDEF", *p++) || !p[-1])
						return NULL;
				c = '?';
			} else if (c && strchr("\"\\/", c)) {
			} else if (c && strchr("bfnrt", c)) {
				c = "\b\f\n\r\t"[strchr("bfnrt", c) - "bfnrt"];
			} else {
				return NULL;
			}
		}
		if (out && n + 1 < outlen)
			out[n++] = c;
	}
	if (out)
		out[n] = 0;
	return p;
}

static const char *number(const char *p, int *is_int, long long *value)
{
	const char *s = p;
	int neg = *p == '-';
	long long v = 0;
	p += neg;
	if (*p == '0')
		p++;
	else if (*p >= '1' && *p <= '9')
		for (; *p >= '0' && *p <= '9'; p++)
			v = v > 1000000000000LL ? v : v * 10 + (*p - '0'); /* saturates: anything this big is out of range */
	else
		return NULL;
	*is_int = 1;
	if (*p == '.') {
		*is_int = 0;
		if (*++p < '0' || *p > '9')
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E') {
		*is_int = 0;
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (*p < '0' || *p > '9')
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	*value = neg ? -v : v;
	return p > s ? p : NULL;
}

static const char *value(const char *p, int depth);

/* Whether the JSON value at v is an integer (into *out). */
static int integer(const char *v, long long *out)
{
	int is_int = 0;
	return (*v == '-' || (*v >= '0' && *v <= '9')) && number(v, &is_int, out) && is_int;
}

static const char *members(const char *p, int depth, char close, struct request *req)
{
	p = ws(p + 1);
	if (*p == close)
		return p + 1;
	for (;;) {
		char key[32] = "";
		if (close == '}') {
			if (!(p = string(p, key, sizeof key)))
				return NULL;
			p = ws(p);
			if (*p++ != ':')
				return NULL;
			p = ws(p);
		}
		const char *v = p;
		if (!(p = value(p, depth + 1)))
			return NULL;
		if (req && !strcmp(key, "op")) {
			req->has_op = *v == '"';
			if (req->has_op)
				string(v, req->op, sizeof req->op);
		} else if (req && !strcmp(key, "timeout_ms")) {
			req->has_timeout = integer(v, &req->timeout);
		} else if (req && !strcmp(key, "bytes")) {
			req->has_bytes = integer(v, &req->bytes);
		}
		p = ws(p);
		if (*p == close)
			return p + 1;
		if (*p++ != ',')
			return NULL;
		p = ws(p);
	}
}

static const char *value(const char *p, int depth)
{
	int is_int;
	long long v;
	if (depth > 32)
		return NULL;
	switch (*p) {
	case '{':
		return members(p, depth, '}', NULL);
	case '[':
		return members(p, depth, ']', NULL);
	case '"':
		return string(p, NULL, 0);
	case 't':
		return strncmp(p, "true", 4) ? NULL : p + 4;
	case 'f':
		return strncmp(p, "false", 5) ? NULL : p + 5;
	case 'n':
		return strncmp(p, "null", 4) ? NULL : p + 4;
	default:
		return number(p, &is_int, &v);
	}
}

/* 0: `line` is one JSON object (its op and timeout_ms in req); -1: it is not. */
static int parse_request(const char *line, struct request *req)
{
	memset(req, 0, sizeof *req);
	const char *p = ws(line);
	if (*p != '{' || !(p = members(p, 0, '}', req)))
		return -1;
	return *ws(p) ? -1 : 0;
}

/* ---------------------------------------------------------------- replies */

static int reply(int fd, const char *text)
{
	size_t n = strlen(text), done = 0;
	while (done < n) {
		ssize_t w = send(fd, text + done, n - done, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		done += (size_t)w;
	}
	return 0;
}

static void reply_error(int fd, const char *error)
{
	char out[1024];
	size_t n = (size_t)snprintf(out, sizeof out, "{\"ok\":false,\"error\":\"");
	for (const char *e = error; *e && n < sizeof out - 16; e++) {
		unsigned char c = (unsigned char)*e;
		if (c == '"' || c == '\\')
			n += (size_t)snprintf(out + n, sizeof out - n, "\\%c", c);
		else if (c < 0x20)
			n += (size_t)snprintf(out + n, sizeof out - n, "\\u%04x", c);
		else
			out[n++] = (char)c;
	}
	snprintf(out + n, sizeof out - n, "\"}\n");
	reply(fd, out);
}

/* ---------------------------------------------------------------- the session */

/* Returns whether the memory is (still) parked. */
static int do_park(int fd, const struct request *req)
{
	char err[512], out[256];
	struct park_report rep;
	if (!req->has_timeout || req->timeout < 0 || req->timeout > MAX_PARK_TIMEOUT_MS) {
		snprintf(err, sizeof err, "timeout_ms must be an integer in [0, %d]", MAX_PARK_TIMEOUT_MS);
		reply_error(fd, err);
		return 0;
	}
	double t0 = preload_now(), budget = (double)req->timeout / 1000;
	if (preload_gate_close(budget) != 0) {
		snprintf(err, sizeof err, "the model stayed busy for %lld ms", req->timeout);
		reply_error(fd, err);
		return 0;
	}
	/* what is left of the daemon's timeout for the work in flight, at least 1 s (its link waits 5 s more) */
	double left = budget - (preload_now() - t0);
	int rc = park_out(left > 1 ? left : 1, &rep, err, sizeof err);
	if (rc != 0) {
		if (rc == -1)
			preload_gate_open();
		reply_error(fd, err);
		return rc == -2;
	}
	snprintf(out, sizeof out,
		 "{\"ok\":true,\"parked_bytes\":%llu,\"staging_bytes\":%llu,\"segments\":%u,\"seconds\":%.6f,"
		 "\"host_address\":%llu}\n",
		 rep.bytes, rep.staging, rep.segments, rep.seconds, rep.address);
	reply(fd, out);
	return 1;
}

/* The daemon wrote the parked bytes to `file`: give the host area back (park.c keeps the file for the unpark). */
static void do_spill(int fd, int *file)
{
	char err[512], out[128];
	struct park_report rep;
	if (*file < 0) {
		reply_error(fd, "spill needs the file the parked bytes were written to (SCM_RIGHTS)");
		return;
	}
	if (park_spill(*file, &rep, err, sizeof err) != 0) {
		reply_error(fd, err);
		close(*file);
	} else {
		snprintf(out, sizeof out, "{\"ok\":true,\"spilled_bytes\":%llu,\"seconds\":%.6f}\n", rep.bytes, rep.seconds);
		reply(fd, out);
	}
	*file = -1;
}

/* A thaw begins: read the spill file's first bytes while the daemon's driver restores the contexts. */
static void do_read_ahead(int fd, const struct request *req)
{
	char err[512], out[96];
	size_t started = 0;
	if (!req->has_bytes || req->bytes < 0 || req->bytes > MAX_READ_AHEAD) {
		snprintf(err, sizeof err, "bytes must be an integer in [0, %lld]", MAX_READ_AHEAD);
		reply_error(fd, err);
	} else if (park_read_ahead((size_t)req->bytes, &started, err, sizeof err) != 0) {
		reply_error(fd, err);
	} else {
		snprintf(out, sizeof out, "{\"ok\":true,\"bytes\":%zu}\n", started);
		reply(fd, out);
	}
}

/* recv(), keeping the last file descriptor passed with the bytes in `*file` (an earlier one not used is closed). */
static ssize_t receive(int fd, char *buf, size_t len, int *file)
{
	union {
		struct cmsghdr h;
		char space[CMSG_SPACE(4 * sizeof(int))];
	} control;
	struct iovec iov = {buf, len};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
		.msg_controllen = sizeof control.space};
	ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
	if (n < 0)
		return n;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < count; i++) {
			int passed;
			memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof passed);
			if (*file >= 0)
				close(*file);
			*file = passed;
		}
	}
	return n;
}

static int do_unpark(int fd)
{
	char err[512], out[128];
	struct park_report rep;
	if (park_in(&rep, err, sizeof err) != 0) {
		reply_error(fd, err);
		return 1;
	}
	preload_gate_open();
	snprintf(out, sizeof out, "{\"ok\":true,\"seconds\":%.6f}\n", rep.seconds);
	reply(fd, out);
	return 0;
}

static void unpark_alone(void)
{
	char err[512];
	struct park_report rep;
	while (park_in(&rep, err, sizeof err) != 0) {
		fprintf(stderr, "gpusched-preload: unpark failed, retrying: %s\n", err);
		sleep(RETRY_UNPARK_S);
	}
	preload_gate_open();
}

static void session(int fd)
{
	char buf[MAX_LINE + 1];
	size_t have = 0;
	int parked = 0, file = -1;
	for (;;) {
		char *nl = memchr(buf, '\n', have);
		if (!nl) {
			if (have >= MAX_LINE)
				break; /* message too long */
			ssize_t n = receive(fd, buf + have, MAX_LINE - have, &file);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			have += (size_t)n;
			continue;
		}
		*nl = 0;
		struct request req;
		int bad = memchr(buf, 0, (size_t)(nl - buf)) != NULL || parse_request(buf, &req) != 0;
		size_t used = (size_t)(nl - buf) + 1;
		memmove(buf, nl + 1, have - used);
		have -= used;
		if (bad)
			break; /* not a JSON object: the connection ends */
		if (req.has_op && !strcmp(req.op, "park") && !parked) {
			parked = do_park(fd, &req);
		} else if (req.has_op && !strcmp(req.op, "spill") && parked) {
			do_spill(fd, &file);
		} else if (req.has_op && !strcmp(req.op, "read_ahead") && parked) {
			do_read_ahead(fd, &req);
		} else if (req.has_op && !strcmp(req.op, "unpark") && parked) {
			parked = do_unpark(fd);
		} else {
			char err[160];
			snprintf(err, sizeof err, "unexpected request %s%.64s%s while %s", req.has_op ? "'" : "",
				 req.has_op ? req.op : "None", req.has_op ? "'" : "", parked ? "parked" : "not parked");
			reply_error(fd, err);
		}
	}
	if (file >= 0)
		close(file);
	if (parked) {
		fprintf(stderr, "gpusched-preload: daemon connection ended while parked: unparking\n");
		unpark_alone();
	}
}

static void *serve(void *arg)
{
	(void)arg;
	for (;;) {
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return NULL;
		}
		struct ucred cred;
		socklen_t len = sizeof cred;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && (cred.uid == 0 || cred.uid == daemon_uid))
			session(fd);
		else
			fprintf(stderr, "gpusched-preload: refused a connection from uid %d\n", (int)cred.uid);
		close(fd);
	}
}

/* ---------------------------------------------------------------- start */

void agent_start(void)
{
	const char *dir = getenv("GPUSCHED_AGENT_DIR");
	if (!dir || !*dir || atomic_exchange(&started, 1))
		return;
	const char *uid = getenv("GPUSCHED_AGENT_DAEMON_UID");
	char *end;
	unsigned long u = uid ? strtoul(uid, &end, 10) : 0;
	daemon_uid = uid && !*end ? (unsigned)u : 0;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (snprintf(sa.sun_path, sizeof sa.sun_path, "%s/agent-%d.sock", dir, (int)getpid()) >= (int)sizeof sa.sun_path) {
		fprintf(stderr, "gpusched-preload: %s is too long for a socket path; no fast path\n", dir);
		return;
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	unlink(sa.sun_path); /* left by an earlier process with this pid */
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || chmod(sa.sun_path, 0600) != 0 ||
	    listen(fd, 4) != 0) {
		fprintf(stderr, "gpusched-preload: cannot listen on %s: %s; no fast path\n", sa.sun_path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	listen_fd = fd, listen_pid = getpid();
	memcpy(sock_path, sa.sun_path, sizeof sock_path);
	/* The thread takes no signal of the program's, and the program never waits for it. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, serve, NULL) != 0) {
		fprintf(stderr, "gpusched-preload: cannot start the listener; no fast path\n");
		close(fd);
		unlink(sock_path);
		listen_fd = -1;
	}
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* A forked child has no listener thread: it starts its own at its own cuInit. */
void agent_forked(void)
{
	if (listen_fd >= 0)
		close(listen_fd);
	listen_fd = -1;
	atomic_store(&started, 0);
}

__attribute__((destructor)) static void agent_stop(void)
{
	if (listen_fd >= 0 && listen_pid == getpid())
		unlink(sock_path);
}
