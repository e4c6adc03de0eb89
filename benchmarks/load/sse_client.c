/*
 * sse_client.c -- paced-SSE load client for clproxy's load benchmark.
 *
 * A drop-in for benchmarks/stream_client.py (asyncio), which at 1,000 streams burns ~40% of a core,
 * CPU the daemon under test needs on a 2-core machine. It mirrors stream_client.py step by step:
 * the same options and defaults, the same workers (warm-up, ramped closed loop, --once wave, drain,
 * hard stop), the same incremental parsing (status line and headers, chunked / Content-Length /
 * close-delimited body, SSE events split on blank lines), the same measurements and the same output
 * (one JSON object with --json, else the one-line summary). Change both together.
 *
 * Measurements, in CLOCK_MONOTONIC nanoseconds (Python's time.monotonic_ns() and loop.time()):
 * TTFB = first response byte read - request written; per text delta, arrival - the stamp the
 * upstream wrote at the start of the delta's text, arrival being when the read that completed the
 * event returned.
 *
 * Differences: the request is read from --request-file (the Python side writes it with
 * payload.request_bytes), so the path of --url is only reported; a negative chunk size counts as
 * "bad chunk size"; when several resolved addresses all fail to connect the failure is
 * "connect: OSError" (as asyncio's combined exception); no "worker error: ..." (no exceptions here).
 *
 * Single thread, level-triggered epoll, non-blocking sockets, one shared 256 KiB receive buffer.
 * Every live worker has exactly one pending timer (start / 50 ms retry, connect timeout or stream
 * timeout) in a binary min-heap; one timerfd (CLOCK_MONOTONIC, TFD_TIMER_ABSTIME) armed for the
 * earliest lives in the epoll set, so timers are not rounded to epoll's milliseconds.
 *
 * Build: cc -O2 -Wall -Wextra -o sse_client benchmarks/load/sse_client.c -lm
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000LL /* ns per ms, as in stream_client.py */
#define SEC 1000000000LL
#define RECV_BYTES (256 * 1024)
#define MAX_HEAD 65536
#define MAX_ADDRS 8
#define TIMER_TAG UINT64_MAX

static const char TS_PREFIX[] = "\"text_delta\",\"text\":\""; /* TS_RE without its (\d+)\| */
static const char STOP[] = "event: message_stop";

static struct {
    const char *url, *request_file;
    long concurrency, warmup, deltas;
    double duration, ramp, drain_timeout, stream_timeout;
    bool once, json;
} opt = {NULL, NULL, 100, 10, 40, 8.0, 1.0, 20.0, 30.0, false, false};

/* ---- small containers ----------------------------------------------------------------------- */

static void *xrealloc(void *p, size_t n) {
    if (!(p = realloc(p, n))) { perror("sse_client"); exit(1); }
    return p;
}

typedef struct { char *p; size_t len, cap; } buf_t;
static void buf_add(buf_t *b, const char *p, size_t n) {
    if (b->len + n > b->cap) b->p = xrealloc(b->p, b->cap = 2 * (b->len + n) + 256);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

typedef struct { int64_t *v; size_t n, cap; } vec_t;
static void vec_push(vec_t *a, int64_t x) {
    if (a->n == a->cap) a->v = xrealloc(a->v, (a->cap = a->cap ? 2 * a->cap : 4096) * sizeof *a->v);
    a->v[a->n++] = x;
}

/* reason -> count, in first-seen order like a Python dict */
typedef struct { char **key; long *count; int n; } counter_t;
static void counter_add(counter_t *c, const char *key) {
    for (int i = 0; i < c->n; i++)
        if (!strcmp(c->key[i], key)) { c->count[i]++; return; }
    c->key = xrealloc(c->key, (c->n + 1) * sizeof *c->key);
    c->count = xrealloc(c->count, (c->n + 1) * sizeof *c->count);
    c->key[c->n] = strdup(key);
    c->count[c->n++] = 1;
}

static struct {
    long started, completed, deltas;
    counter_t failed, status;
    vec_t ttfb, delays; /* ns */
} res;

static void fail(const char *reason) { counter_add(&res.failed, reason); }

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * SEC + ts.tv_nsec;
}

static int64_t sec_ns(double s) { /* clamped so that inf or huge options cannot overflow */
    return s >= 1e9 ? (int64_t)1e18 : s <= -1e9 ? (int64_t)-1e18 : (int64_t)llround(s * 1e9);
}

/* Python's int(text, base) for the few fields parsed (whitespace and a sign allowed). */
static bool py_int(const char *p, size_t n, int base, long long *out) {
    char tmp[64];
    while (n && isspace((unsigned char)*p)) p++, n--;
    while (n && isspace((unsigned char)p[n - 1])) n--;
    if (n == 0 || n >= sizeof tmp) return false;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    *out = strtoll(tmp, &end, base);
    return end == tmp + n && !errno;
}

/* ---- workers -------------------------------------------------------------------------------- */

enum { W_SLEEP, W_CONNECTING, W_STREAM, W_DONE };           /* where the Python worker awaits */
enum { P_HEAD, P_BODY, P_DATA, P_CRLF, P_TRAILER };         /* StreamProtocol.state */

typedef struct {
    int fd, state, heap_pos, ai, last_err, pstate, status;
    uint32_t gen; /* bumped per socket: an event left over from a closed socket is ignored */
    bool record, once, keep_alive, want_out, first, stopped, chunked, has_length, done;
    int64_t stop_at, hard_stop, deadline, t_sent, length, chunk_left;
    size_t wrote;
    long count;             /* text deltas of the current stream */
    const char *reason;     /* when done: NULL = complete, else the failure */
    char reason_buf[48];
    buf_t raw, sse;         /* undecoded bytes; decoded body not yet split into events */
} worker_t;

static worker_t *workers;
static long nworkers, active;
static worker_t **heap;
static long heap_n;
static int ep, tfd;
static int64_t armed = -1;
static char *request;
static size_t request_len;
static struct sockaddr_storage addrs[MAX_ADDRS];
static socklen_t addr_lens[MAX_ADDRS];
static int naddrs;
static char recv_buf[RECV_BYTES]; /* one buffer for every read: the loop is single-threaded */

/* ---- timers: a binary min-heap of workers by deadline --------------------------------------- */

static void heap_swap(long a, long b) {
    worker_t *t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    heap[a]->heap_pos = a;
    heap[b]->heap_pos = b;
}
static void heap_fix(long i) {
    while (i > 0 && heap[i]->deadline < heap[(i - 1) / 2]->deadline) heap_swap(i, (i - 1) / 2), i = (i - 1) / 2;
    for (;;) {
        long l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_n && heap[l]->deadline < heap[m]->deadline) m = l;
        if (r < heap_n && heap[r]->deadline < heap[m]->deadline) m = r;
        if (m == i) return;
        heap_swap(i, m);
        i = m;
    }
}
static void timer_set(worker_t *w, int64_t at) {
    w->deadline = at;
    if (w->heap_pos < 0) heap[w->heap_pos = heap_n++] = w;
    heap_fix(w->heap_pos);
}
static void timer_del(worker_t *w) {
    long i = w->heap_pos;
    if (i < 0) return;
    w->heap_pos = -1;
    if (i < --heap_n) {
        heap[i] = heap[heap_n];
        heap[i]->heap_pos = i;
        heap_fix(i);
    }
}

/* max(0.1, min(limit, hard_stop - now)), the Python's bound on every wait */
static int64_t bounded(double limit_s, int64_t left) {
    int64_t t = sec_ns(limit_s) < left ? sec_ns(limit_s) : left;
    return t > 100 * NS ? t : 100 * NS;
}

/* ---- connections ---------------------------------------------------------------------------- */

static void ep_ctl(worker_t *w, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)w->gen << 32 | (uint64_t)(w - workers)};
    epoll_ctl(ep, op, w->fd, &ev);
}

static void close_conn(worker_t *w) {
    if (w->fd >= 0) close(w->fd); /* also leaves the epoll set */
    w->fd = -1;
    w->want_out = false;
}

static const char *errno_name(int e) { /* the OSError subclass Python raises for errno e */
    switch (e) {
    case ECONNREFUSED: return "ConnectionRefusedError";
    case ECONNRESET: return "ConnectionResetError";
    case ECONNABORTED: return "ConnectionAbortedError";
    case EPIPE: case ESHUTDOWN: return "BrokenPipeError";
    case ETIMEDOUT: return "TimeoutError";
    case EACCES: case EPERM: return "PermissionError";
    case EAGAIN: case EALREADY: case EINPROGRESS: return "BlockingIOError";
    case EINTR: return "InterruptedError";
    default: return "OSError";
    }
}

static void worker_next(worker_t *w);

static void worker_end(worker_t *w) {
    timer_del(w);
    close_conn(w);
    w->state = W_DONE;
    active--;
}

/* Python's _finish: the stream is over; the worker carries on from settle() */
static void finish(worker_t *w, const char *reason) {
    if (w->done) return;
    if (!reason && w->status != 200) {
        snprintf(w->reason_buf, sizeof w->reason_buf, "HTTP %d", w->status);
        reason = w->reason_buf;
    } else if (!reason && !w->stopped) {
        reason = "ended without message_stop";
    }
    if (reason) w->keep_alive = false;
    w->done = true;
    w->reason = reason;
}

static void body(worker_t *w, const char *data, size_t n, int64_t now, bool final);

static void conn_lost(worker_t *w) {
    close_conn(w);
    if (w->state != W_STREAM || w->done) return;
    if (w->pstate == P_BODY && !w->has_length && !w->chunked) body(w, NULL, 0, mono_ns(), true); /* close-delimited */
    finish(w, "connection closed before message_stop");
}

static void write_some(worker_t *w) { /* the ~20 KB request may not fit the socket buffer at once */
    while (w->wrote < request_len) {
        ssize_t n = send(w->fd, request + w->wrote, request_len - w->wrote, MSG_NOSIGNAL);
        if (n > 0) { w->wrote += n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            if (!w->want_out) ep_ctl(w, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            w->want_out = true;
            return;
        }
        conn_lost(w);
        return;
    }
    if (w->want_out) ep_ctl(w, EPOLL_CTL_MOD, EPOLLIN);
    w->want_out = false;
}

static void send_request(worker_t *w) { /* StreamProtocol._reset + send */
    w->state = W_STREAM;
    w->done = w->first = w->stopped = w->chunked = w->has_length = false;
    w->keep_alive = true;
    w->reason = NULL;
    w->pstate = P_HEAD;
    w->raw.len = w->sse.len = 0;
    w->status = 0;
    w->count = 0;
    w->wrote = 0;
    if (w->record) res.started++;
    w->t_sent = mono_ns();
    write_some(w);
    int64_t now = mono_ns();
    timer_set(w, now + bounded(opt.stream_timeout, w->hard_stop - now));
}

static void connect_failed(worker_t *w, const char *name) {
    close_conn(w);
    if (w->record) {
        char reason[64];
        snprintf(reason, sizeof reason, "connect: %s", name);
        fail(reason);
    }
    w->state = W_SLEEP;
    timer_set(w, mono_ns() + 50 * NS); /* retry after 50 ms */
}

static void connected(worker_t *w) {
    ep_ctl(w, EPOLL_CTL_MOD, EPOLLIN);
    send_request(w);
}

/* Like asyncio's create_connection: the resolved addresses in order until one connects. */
static void try_address(worker_t *w) {
    for (; w->ai < naddrs; w->ai++) {
        int fd = socket(addrs[w->ai].ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) { w->last_err = errno; continue; }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        w->fd = fd;
        w->gen++;
        int r = connect(fd, (struct sockaddr *)&addrs[w->ai], addr_lens[w->ai]);
        if (r == 0 || errno == EINPROGRESS) {
            /* registered only now: an unconnected TCP socket polls as writable */
            ep_ctl(w, EPOLL_CTL_ADD, EPOLLOUT);
            if (r == 0) connected(w);
            return;
        }
        w->last_err = errno;
        close_conn(w);
    }
    connect_failed(w, naddrs == 1 ? errno_name(w->last_err) : "OSError");
}

static void connect_done(worker_t *w) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(w->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (!err) { connected(w); return; }
    w->last_err = err;
    close_conn(w);
    w->ai++;
    try_address(w);
}

/* the top of the Python worker's while loop */
static void worker_next(worker_t *w) {
    int64_t now = mono_ns();
    if (now >= w->stop_at) { worker_end(w); return; }
    if (w->fd >= 0 && w->keep_alive) { send_request(w); return; }
    close_conn(w);
    w->state = W_CONNECTING;
    w->ai = 0;
    timer_set(w, now + bounded(10.0, w->hard_stop - now));
    try_address(w);
}

/* the stream's outcome, then the next iteration (no recursion: see settle) */
static void stream_done(worker_t *w) {
    timer_del(w);
    w->state = W_SLEEP;
    if (w->record) {
        if (!w->reason) {
            res.completed++;
            res.deltas += w->count;
            if (w->count != opt.deltas) {
                char reason[96];
                snprintf(reason, sizeof reason, "complete with %ld deltas instead of %ld", w->count, opt.deltas);
                fail(reason);
            }
        } else {
            fail(w->reason);
        }
        if (w->once) { worker_end(w); return; }
    }
    worker_next(w);
}

/* Called after every event or timer: a request write can fail at once, ending the next stream too. */
static void settle(worker_t *w) {
    while (w->state == W_STREAM && w->done) stream_done(w);
}

/* ---- response parsing (StreamProtocol) ------------------------------------------------------ */

static void trim(const char **p, const char **e) {
    while (*p < *e && isspace((unsigned char)**p)) (*p)++;
    while (*e > *p && isspace((unsigned char)(*e)[-1])) (*e)--;
}

static bool is(const char *p, const char *e, const char *word) {
    return (size_t)(e - p) == strlen(word) && !strncasecmp(p, word, e - p);
}

/* false when Content-Length is not a number (asyncio then drops the connection) */
static bool parse_head(worker_t *w, const char *h, size_t n) {
    const char *end = h + n, *eol = memmem(h, n, "\r\n", 2);
    if (!eol) eol = end;
    const char *f = memchr(h, ' ', eol - h); /* int(lines[0].split(b" ", 2)[1]) */
    long long v;
    if (f) {
        f++;
        const char *fe = memchr(f, ' ', eol - f);
        if (py_int(f, (fe ? fe : eol) - f, 10, &v) && v >= -99999999 && v <= 999999999) w->status = (int)v;
    }
    for (const char *line = eol + 2; eol < end; line = eol + 2) {
        eol = memmem(line, end - line, "\r\n", 2);
        if (!eol) eol = end;
        const char *colon = memchr(line, ':', eol - line), *ne = colon ? colon : eol;
        const char *vp = colon ? colon + 1 : eol, *ve = eol, *np = line;
        trim(&np, &ne);
        trim(&vp, &ve);
        if (is(np, ne, "transfer-encoding")) {
            for (const char *s = vp; s + 7 <= ve; s++)
                if (!strncasecmp(s, "chunked", 7)) { w->chunked = true; break; }
        } else if (is(np, ne, "content-length")) {
            if (!py_int(vp, ve - vp, 10, &v)) return false;
            w->length = v;
            w->has_length = true;
        } else if (is(np, ne, "connection") && is(vp, ve, "close")) {
            w->keep_alive = false;
        }
    }
    if (w->record) {
        char key[16];
        snprintf(key, sizeof key, "%d", w->status);
        counter_add(&res.status, key);
    }
    return true;
}

/* TS_RE.findall and STOP over the completed events */
static void scan(worker_t *w, const char *p, size_t n, int64_t now) {
    const char *s = p, *e = p + n, *m;
    size_t plen = sizeof TS_PREFIX - 1;
    while ((m = memmem(s, e - s, TS_PREFIX, plen))) {
        const char *d = m + plen, *q = d;
        int64_t stamp = 0;
        while (q < e && *q >= '0' && *q <= '9') stamp = stamp * 10 + (*q++ - '0');
        if (q == d || q == e || *q != '|') { s = m + 1; continue; }
        w->count++;
        if (w->record) vec_push(&res.delays, now - stamp);
        s = q + 1;
    }
    if (memmem(p, n, STOP, sizeof STOP - 1)) w->stopped = true;
}

static void body(worker_t *w, const char *data, size_t n, int64_t now, bool final) {
    buf_t *s = &w->sse;
    if (n) buf_add(s, data, n);
    /* As stream_client.py: it compares the unsplit remainder, not the whole body, with
       Content-Length (only non-SSE answers such as a 404 carry one). */
    if (w->has_length && !w->chunked && (int64_t)s->len >= w->length) final = true;
    size_t cut = 0; /* just past the last "\n\n" */
    for (size_t i = s->len; i >= 2; i--)
        if (s->p[i - 1] == '\n' && s->p[i - 2] == '\n') { cut = i; break; }
    if (cut) {
        scan(w, s->p, cut, now);
        memmove(s->p, s->p + cut, s->len - cut);
        s->len -= cut;
    }
    if (final) finish(w, NULL);
}

/* Python's _dechunk: decoded data goes to w->sse; returns how many bytes were consumed. */
static size_t dechunk(worker_t *w, const char *p, size_t len, int64_t now) {
    size_t pos = 0, mark = w->sse.len;
    const char *eol;
    long long n;
    while (pos < len) {
        switch (w->pstate) {
        case P_BODY: /* a chunk-size line */
            if (!(eol = memmem(p + pos, len - pos, "\r\n", 2))) goto out;
            const char *semi = memchr(p + pos, ';', eol - (p + pos));
            if (!py_int(p + pos, (semi ? semi : eol) - (p + pos), 16, &n) || n < 0) {
                w->sse.len = mark; /* Python drops what this read decoded */
                finish(w, "bad chunk size");
                return len;
            }
            pos = eol + 2 - p;
            if (n == 0) { w->pstate = P_TRAILER; break; }
            w->chunk_left = n;
            w->pstate = P_DATA;
            break;
        case P_DATA: {
            size_t take = (size_t)w->chunk_left < len - pos ? (size_t)w->chunk_left : len - pos;
            buf_add(&w->sse, p + pos, take);
            pos += take;
            if ((w->chunk_left -= take) == 0) w->pstate = P_CRLF;
            break;
        }
        case P_CRLF: /* not checked, as in Python */
            if (len - pos < 2) goto out;
            pos += 2;
            w->pstate = P_BODY;
            break;
        case P_TRAILER:
            if (!(eol = memmem(p + pos, len - pos, "\r\n", 2))) goto out;
            if (eol == p + pos) { /* end of the trailer: the response is over */
                body(w, NULL, 0, now, true);
                return pos + 2;
            }
            pos = eol + 2 - p;
            break;
        }
    }
out:
    if (w->sse.len > mark) body(w, NULL, 0, now, false);
    return pos;
}

/* Python's data_received */
static void on_data(worker_t *w, const char *data, size_t n, int64_t now) {
    if (!w->first) {
        w->first = true;
        if (w->record) vec_push(&res.ttfb, now - w->t_sent);
    }
    const char *p = data;
    size_t len = n;
    bool from_raw = w->raw.len > 0; /* the common case parses straight from the receive buffer */
    if (from_raw) {
        buf_add(&w->raw, data, n);
        p = w->raw.p;
        len = w->raw.len;
    }
    if (w->pstate == P_HEAD) {
        const char *end = memmem(p, len, "\r\n\r\n", 4);
        if (!end) {
            if (!from_raw) buf_add(&w->raw, data, n);
            if (w->raw.len > MAX_HEAD) finish(w, "response headers too large");
            return;
        }
        if (!parse_head(w, p, end - p)) { conn_lost(w); return; }
        len -= end + 4 - p;
        p = end + 4;
        w->pstate = P_BODY;
    }
    if (!w->chunked) {
        w->raw.len = 0; /* p stays valid: only sse grows */
        body(w, p, len, now, false);
        return;
    }
    size_t used = dechunk(w, p, len, now);
    if (from_raw) { /* keep the undecoded rest (a partial size line or CRLF) */
        memmove(w->raw.p, p + used, len - used);
        w->raw.len = len - used;
    } else {
        w->raw.len = 0;
        buf_add(&w->raw, p + used, len - used);
    }
}

/* ---- the event loop ------------------------------------------------------------------------- */

static void on_event(worker_t *w, uint32_t events) {
    if (w->state == W_CONNECTING) { connect_done(w); return; }
    uint32_t gen = w->gen;
    if ((events & EPOLLOUT) && w->want_out) write_some(w);
    if (w->fd < 0 || w->gen != gen || !(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    ssize_t n = recv(w->fd, recv_buf, sizeof recv_buf, 0); /* one read per wake-up, as asyncio */
    if (n > 0) {
        if (w->state == W_STREAM && !w->done) on_data(w, recv_buf, n, mono_ns());
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        conn_lost(w);
    }
}

static void on_timer(worker_t *w) {
    if (w->state == W_SLEEP) {
        worker_next(w); /* start time or connect retry */
    } else if (w->state == W_CONNECTING) {
        connect_failed(w, "TimeoutError");
    } else if (w->state == W_STREAM && !w->done) {
        finish(w, "timed out"); /* also marks the connection not reusable */
    }
    settle(w);
}

static void arm(int64_t at) {
    if (at == armed) return;
    struct itimerspec its = {0};
    if (at != INT64_MAX) its.it_value = (struct timespec){at / SEC, at % SEC};
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
    armed = at;
}

/* until every worker is done or `deadline` */
static void run_loop(int64_t deadline) {
    static struct epoll_event evs[1024];
    for (;;) {
        int64_t now = mono_ns();
        while (heap_n && heap[0]->deadline <= now) {
            worker_t *w = heap[0];
            timer_del(w);
            on_timer(w);
        }
        if (active == 0 || now >= deadline) return;
        arm(heap_n && heap[0]->deadline < deadline ? heap[0]->deadline : deadline);
        int n = epoll_wait(ep, evs, sizeof evs / sizeof *evs, -1);
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            if (d == TIMER_TAG) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0) { /* EAGAIN: re-armed since */ }
                continue;
            }
            worker_t *w = &workers[d & 0xffffffff];
            if (w->fd < 0 || w->gen != d >> 32) continue; /* closed while this batch was handled */
            on_event(w, evs[i].events);
            settle(w);
        }
    }
}

static void start_worker(worker_t *w, bool record, bool once, int64_t start_at, int64_t stop_at, int64_t hard_stop) {
    *w = (worker_t){.fd = -1, .heap_pos = -1, .record = record, .once = once, .stop_at = stop_at,
                    .hard_stop = hard_stop, .state = W_SLEEP};
    active++;
    timer_set(w, start_at);
}

/* ---- output --------------------------------------------------------------------------------- */

/* Python's repr(float) (json.dumps writes the same, but Infinity / NaN) */
static char *pyfloat(char *out, double v, bool json) {
    if (isnan(v)) return strcpy(out, json ? "NaN" : "nan");
    if (isinf(v)) return strcpy(out, v > 0 ? (json ? "Infinity" : "inf") : (json ? "-Infinity" : "-inf"));
    char e[40], digits[24];
    for (int prec = 0; prec < 17; prec++) { /* the shortest digits that read back as v */
        snprintf(e, sizeof e, "%.*e", prec, v);
        if (strtod(e, NULL) == v) break;
    }
    const char *s = e + (e[0] == '-');
    int nd = 0;
    for (; *s != 'e'; s++)
        if (isdigit((unsigned char)*s)) digits[nd++] = *s;
    int exp = atoi(s + 1);
    char *o = out;
    if (e[0] == '-') *o++ = '-';
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            o += sprintf(o, "0.%.*s%.*s", -exp - 1, "0000", nd, digits);
        } else {
            for (int i = 0; i <= exp; i++) *o++ = i < nd ? digits[i] : '0';
            o += sprintf(o, ".%.*s", nd > exp + 1 ? nd - exp - 1 : 1, nd > exp + 1 ? digits + exp + 1 : "0");
        }
    } else {
        *o++ = digits[0];
        if (nd > 1) o += sprintf(o, ".%.*s", nd - 1, digits + 1);
        sprintf(o, "e%c%02d", exp < 0 ? '-' : '+', abs(exp));
    }
    return out;
}

static double pyround(double v, int nd) { /* Python's round(v, nd): correctly rounded, like printf */
    char tmp[400];
    snprintf(tmp, sizeof tmp, "%.*f", nd, v);
    return strtod(tmp, NULL);
}

static void put_str(const char *s) { /* json.dumps with ensure_ascii */
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p;) {
        unsigned c = *p, need = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc0 ? 1 : 0, i;
        for (i = 1; i <= need && (p[i] & 0xc0) == 0x80; i++) c = (c << 6) | (p[i] & 0x3f);
        if (c >= 0x80 && (need == 0 || i <= need)) { printf("\\udc%02x", *p++); continue; } /* surrogateescape */
        c &= need == 3 ? 0x1fffff : need == 2 ? 0xffff : need == 1 ? 0x7ff : 0x7f;
        p += need + 1;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c == '\r') fputs("\\r", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c == '\b') fputs("\\b", stdout);
        else if (c == '\f') fputs("\\f", stdout);
        else if (c < 0x20 || (c > 0x7e && c < 0x10000)) printf("\\u%04x", c);
        else if (c >= 0x10000) printf("\\u%04x\\u%04x", 0xd800 + ((c - 0x10000) >> 10), 0xdc00 + ((c - 0x10000) & 0x3ff));
        else putchar((int)c);
    }
    putchar('"');
}

static void put_counter(const counter_t *c) {
    putchar('{');
    for (int i = 0; i < c->n; i++) {
        if (i) fputs(", ", stdout);
        put_str(c->key[i]);
        printf(": %ld", c->count[i]);
    }
    putchar('}');
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* stream_client.percentiles: nearest rank, ms rounded to 3 decimals; keys in the Python's order */
static const double POINTS[] = {50, 90, 99, 99.9};
static const char *const POINT_KEYS[] = {"p50", "p90", "p99", "p99.9"};
typedef struct { long n; double mean, min, max, p[4]; } pct_t;

static pct_t percentiles(vec_t *a) {
    pct_t r = {.n = (long)a->n};
    if (!a->n) return r;
    qsort(a->v, a->n, sizeof *a->v, cmp64);
    int64_t sum = 0;
    for (size_t i = 0; i < a->n; i++) sum += a->v[i];
    r.mean = pyround((double)sum / (double)r.n / NS, 3);
    r.min = pyround((double)a->v[0] / NS, 3);
    r.max = pyround((double)a->v[a->n - 1] / NS, 3);
    for (int k = 0; k < 4; k++) {
        /* int(-(-p * n // 100)), with Python's float floor division for p = 99.9 */
        double vx = -POINTS[k] * (double)r.n, mod = fmod(vx, 100.0), div = (vx - mod) / 100.0;
        if (mod < 0) div -= 1.0;
        double fl = floor(div);
        if (div - fl > 0.5) fl += 1.0;
        long rank = -(long)fl;
        rank = rank < 1 ? 1 : rank > r.n ? r.n : rank;
        r.p[k] = pyround((double)a->v[rank - 1] / NS, 3);
    }
    return r;
}

static void put_pct(const pct_t *r) {
    char f[4][40];
    if (!r->n) { fputs("{\"count\": 0}", stdout); return; }
    printf("{\"count\": %ld, \"mean\": %s, \"min\": %s, \"max\": %s", r->n, pyfloat(f[0], r->mean, true),
           pyfloat(f[1], r->min, true), pyfloat(f[2], r->max, true));
    for (int k = 0; k < 4; k++) printf(", \"%s\": %s", POINT_KEYS[k], pyfloat(f[3], r->p[k], true));
    putchar('}');
}

/* ---- setup ---------------------------------------------------------------------------------- */

static const char USAGE[] =
    "usage: sse_client [-h] --url URL --request-file PATH [--concurrency N] [--duration S] [--ramp S]\n"
    "                  [--warmup N] [--drain-timeout S] [--stream-timeout S] [--deltas N] [--once] [--json]\n";

static void usage_error(const char *fmt, const char *arg) {
    fputs(USAGE, stderr);
    fputs("sse_client: error: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static const char *const names[] = {"--url", "--request-file", "--concurrency", "--duration", "--ramp", "--warmup",
                                        "--drain-timeout", "--stream-timeout", "--deltas", "--once", "--json", "--help"};
    enum { N_NAMES = sizeof names / sizeof *names };
    for (int i = 1; i < argc; i++) {
        char *arg = argv[i], *val = NULL, *eq = strchr(arg, '=');
        size_t len = eq && !strncmp(arg, "--", 2) ? (size_t)(eq - arg) : strlen(arg);
        int k = strcmp(arg, "-h") ? -1 : 11, matches = k < 0 ? 0 : 1;
        for (int j = 0; j < N_NAMES && len > 2 && matches < 2; j++) { /* argparse takes unambiguous prefixes */
            if (strncmp(names[j], arg, len)) continue;
            if (strlen(names[j]) == len) { k = j; matches = 1; break; }
            if (!matches++) k = j;
        }
        if (k < 0 || matches > 1) usage_error(matches > 1 ? "ambiguous option: %s" : "unrecognized arguments: %s", arg);
        if (k == 11) { fputs(USAGE, stdout); exit(0); }
        if (k == 9 || k == 10) {
            if (eq) usage_error("argument %s: ignored explicit argument", arg);
            *(k == 9 ? &opt.once : &opt.json) = true;
            continue;
        }
        if (eq) val = eq + 1;
        else if (i + 1 < argc) val = argv[++i];
        else usage_error("argument %s: expected one argument", names[k]);
        char *end;
        if (k <= 1) { *(k ? &opt.request_file : &opt.url) = val; continue; }
        if (k == 2 || k == 5 || k == 8) {
            long v = strtol(val, &end, 10);
            if (end == val || *end) usage_error("invalid int value: '%s'", val);
            *(k == 2 ? &opt.concurrency : k == 5 ? &opt.warmup : &opt.deltas) = v;
        } else {
            double v = strtod(val, &end);
            if (end == val || *end) usage_error("invalid float value: '%s'", val);
            *(k == 3 ? &opt.duration : k == 4 ? &opt.ramp : k == 6 ? &opt.drain_timeout : &opt.stream_timeout) = v;
        }
    }
    if (!opt.url || !opt.request_file)
        usage_error("the following arguments are required: %s", !opt.url ? "--url" : "--request-file");
    if (opt.concurrency < 1 || !(opt.duration > 0)) usage_error("%s", "--concurrency and --duration must be positive");
}

static void raise_nofile(long need) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t want = rl.rlim_max != RLIM_INFINITY ? rl.rlim_max : (rlim_t)(need > 65536 ? need : 65536);
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < (rlim_t)need)
        fprintf(stderr, "sse_client: RLIMIT_NOFILE is %llu, below the %ld needed\n", (unsigned long long)rl.rlim_cur, need);
}

static void die2(const char *msg) {
    fprintf(stderr, "sse_client: %s\n", msg);
    exit(2);
}

/* urlsplit's hostname and port; only loopback hosts, as stream_client.py */
static void resolve_url(const char *url) {
    if (strncasecmp(url, "http://", 7)) die2("only http:// URLs are supported");
    const char *nl = url + 7, *ne = nl + strcspn(nl, "/?#"), *at = memrchr(nl, '@', ne - nl);
    if (at) nl = at + 1;
    const char *hp = nl, *he, *port = NULL;
    if (*nl == '[' && (he = memchr(nl, ']', ne - nl))) {
        hp = nl + 1;
        const char *colon = memchr(he, ':', ne - he);
        if (colon) port = colon + 1;
    } else {
        he = memchr(nl, ':', ne - nl);
        if (he) port = he + 1;
        else he = ne;
    }
    char host[64] = "", service[16] = "80";
    if (he - hp < (long)sizeof host)
        for (long i = 0; i < he - hp; i++) host[i] = (char)tolower((unsigned char)hp[i]);
    if (strcmp(host, "127.0.0.1") && strcmp(host, "localhost") && strcmp(host, "::1"))
        die2("only talks to the loopback interface");
    if (port && port < ne) {
        long long v;
        if (ne - port > 5 || strspn(port, "0123456789") < (size_t)(ne - port) || !py_int(port, ne - port, 10, &v) || v > 65535)
            die2("the port in --url is not a number in 0-65535");
        if (v) snprintf(service, sizeof service, "%d", (int)v); /* url.port or 80 */
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai, *a;
    int err = getaddrinfo(host, service, &hints, &ai);
    if (err) { fprintf(stderr, "sse_client: %s: %s\n", host, gai_strerror(err)); exit(2); }
    for (a = ai; a && naddrs < MAX_ADDRS; a = a->ai_next) {
        memcpy(&addrs[naddrs], a->ai_addr, a->ai_addrlen);
        addr_lens[naddrs++] = a->ai_addrlen;
    }
    freeaddrinfo(ai);
}

static void read_request(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "sse_client: %s: %s\n", path, strerror(errno)); exit(2); }
    buf_t b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf_add(&b, chunk, n);
    fclose(f);
    if (!b.len) die2("the request file is empty");
    request = b.p;
    request_len = b.len;
}

static int64_t cpu_ns(void) { /* time.process_time() */
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * SEC + ts.tv_nsec;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_nofile(opt.concurrency + opt.warmup + 64);
    resolve_url(opt.url);
    read_request(opt.request_file);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.u64 = TIMER_TAG};
    if (ep < 0 || tfd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev)) { perror("sse_client"); return 1; }
    long warmup = opt.warmup > 0 ? opt.warmup : 0, n = opt.concurrency;
    nworkers = warmup + n;
    workers = xrealloc(NULL, nworkers * sizeof *workers);
    heap = xrealloc(NULL, nworkers * sizeof *heap);

    /* warm-up: unrecorded, all at once, one stream each (stop_at = t + 1 ms), and awaited */
    int64_t t = mono_ns();
    for (long i = 0; i < warmup; i++)
        start_worker(&workers[i], false, false, t, t + NS, t + sec_ns(opt.stream_timeout));
    run_loop(INT64_MAX);

    int64_t cpu0 = cpu_ns(), t0 = mono_ns();
    double t0_s = (double)t0 / 1e9;
    double stop_s = opt.once ? t0_s + opt.ramp + 1.0 : t0_s + opt.duration; /* once: one wave */
    int64_t stop_at = t0 + sec_ns(opt.once ? opt.ramp + 1.0 : opt.duration);
    int64_t hard_stop = stop_at + sec_ns(opt.drain_timeout);
    for (long i = 0; i < n; i++)
        start_worker(&workers[warmup + i], true, opt.once, t0 + sec_ns(opt.ramp * i / n), stop_at, hard_stop);
    run_loop(hard_stop + SEC);
    if (active > 0) { /* streams still open 1 s after the hard stop are abandoned, counted once */
        for (long i = warmup; i < nworkers; i++)
            if (workers[i].state != W_DONE) worker_end(&workers[i]);
        fail("worker cancelled at the hard stop");
    }
    double elapsed = (double)mono_ns() / 1e9 - t0_s, cpu = (double)(cpu_ns() - cpu0) / 1e9;

    pct_t ttfb = percentiles(&res.ttfb), delay = percentiles(&res.delays);
    char f[6][40];
    double window_stop = stop_s < t0_s + elapsed ? stop_s : t0_s + elapsed;
    double span = opt.duration < elapsed ? opt.duration : elapsed;
    const char *rate = opt.once ? "null" : pyfloat(f[0], pyround(res.started / (span > 1e-9 ? span : 1e-9), 1), true);
    const char *cpu_pct = elapsed > 0 ? pyfloat(f[1], pyround(100.0 * cpu / elapsed, 1), true) : "null";
    if (opt.json) {
        fputs("{\"url\": ", stdout);
        put_str(opt.url);
        printf(", \"mode\": \"%s\", \"concurrency\": %ld, \"window_start\": %s, \"window_stop\": %s, \"ramp_s\": %s, "
               "\"streams_per_s\": %s, \"duration_s\": %s, \"started\": %ld, \"completed\": %ld, \"incomplete\": %ld, "
               "\"failures\": ",
               opt.once ? "wave" : "sustained", n, pyfloat(f[2], pyround(t0_s, 6), true),
               pyfloat(f[3], pyround(window_stop, 6), true), pyfloat(f[4], opt.ramp, true), rate,
               pyfloat(f[5], pyround(elapsed, 3), true), res.started, res.completed, res.started - res.completed);
        put_counter(&res.failed);
        fputs(", \"status\": ", stdout);
        put_counter(&res.status);
        printf(", \"deltas_received\": %ld, \"deltas_expected_per_stream\": %ld, \"ttfb_ms\": ", res.deltas, opt.deltas);
        put_pct(&ttfb);
        fputs(", \"event_delay_ms\": ", stdout);
        put_pct(&delay);
        printf(", \"client_cpu_s\": %s, \"client_cpu_pct\": %s}\n", pyfloat(f[2], pyround(cpu, 3), true), cpu_pct);
    } else {
        char p[4][40];
        printf("%ld/%ld complete; ttfb p50 %s ms p99 %s ms; delay p50 %s ms p99 %s ms; client cpu %s%%\n",
               res.completed, res.started, ttfb.n ? pyfloat(p[0], ttfb.p[0], false) : "None",
               ttfb.n ? pyfloat(p[1], ttfb.p[2], false) : "None", delay.n ? pyfloat(p[2], delay.p[0], false) : "None",
               delay.n ? pyfloat(p[3], delay.p[2], false) : "None", elapsed > 0 ? cpu_pct : "None");
        if (res.failed.n) { /* print("failures:", dict) */
            fputs("failures: {", stdout);
            for (int i = 0; i < res.failed.n; i++) printf("%s'%s': %ld", i ? ", " : "", res.failed.key[i], res.failed.count[i]);
            puts("}");
        }
    }
    return 0;
}
