/*
 * sse_upstream.c -- a fast fake Anthropic upstream for clproxy's load benchmark.
 *
 * A drop-in for benchmarks/upstream.py (asyncio), which at 1,000 concurrent paced streams burns
 * about 60% of a core by itself; this does the same thing on the wire for about 33%, nearly all
 * of it the kernel's loopback TCP work that any upstream pays (user time: 3% against 30%).
 * It mirrors upstream.py exactly: the same command line, the same response bytes, the same
 * minimal HTTP/1.1 parsing (keep-alive, pipelining, a Content-Length body, 400 + close for what
 * it does not take), and the same paced SSE stream for a streaming POST /v1/messages: the head
 * and message_start / content_block_start / ping at once, then --deltas text deltas, delta k due
 * at t0 + k * --interval-ms (an absolute schedule, no drift), each delta's text starting with
 * CLOCK_MONOTONIC nanoseconds (Python's time.monotonic_ns()) taken at the moment of its write,
 * the last delta written together with content_block_stop / message_delta / message_stop and the
 * terminal chunk. Pipelined requests behind a stream wait until it ends.
 *
 * Known differences from upstream.py, all outside what the benchmark sends: a negative
 * Content-Length is answered 400 + close (upstream.py mis-slices its buffer); "localhost" binds
 * 127.0.0.1 only (asyncio binds every address it resolves to); a half-close by the client ends a
 * running stream at once; a delta may be written up to COALESCE_NS (250 us) before it is due,
 * where upstream.py writes it up to ~1 ms after (see run_due()).
 *
 * Single thread, epoll (level-triggered), non-blocking sockets, one shared 256 KiB receive buffer.
 * Stream deadlines sit in a binary min-heap (each connection knows its slot, so a connection
 * that goes away mid-stream leaves no entry behind); the wait for the earliest one has nanosecond
 * resolution (epoll_pwait2, or a timerfd in the epoll set on kernels before 5.11), never a
 * millisecond-rounded epoll timeout. See run_due() for how due deltas are batched.
 *
 * Build: cc -O2 -Wall -Wextra -o sse_upstream benchmarks/load/sse_upstream.c
 * Run:   sse_upstream --port 0   (prints "READY <port>", runs until SIGTERM/SIGINT)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h> /* isfinite, a macro: no -lm needed */
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
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_BODY_BYTES (64LL * 1024 * 1024)
#define RECV_BYTES (256 * 1024)
#ifndef COALESCE_NS
#define COALESCE_NS 250000 /* see run_due() */
#endif

/* ---- the bytes on the wire: identical to upstream.py's constants -------------------------- */

#define COMMON_HEADERS \
    "request-id: req_011CTbenchFakeUpstream00001\r\n" \
    "anthropic-organization-id: 00000000-0000-4000-8000-000000000000\r\n" \
    "via: 1.1 google\r\n" \
    "cf-cache-status: DYNAMIC\r\n"

/* json.dumps(MESSAGE, separators=(",", ":")) */
#define MESSAGE_BODY \
    "{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\"," \
    "\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[{\"type\":\"text\"," \
    "\"text\":\"The weight table is rebuilt on every call of compute_value; I moved it to " \
    "module level and cached it with functools.lru_cache, which removes the quadratic step " \
    "the benchmark was hitting. The three callers keep their signatures, and the existing " \
    "tests pass unchanged.\"}],\"stop_reason\":\"end_turn\",\"stop_sequence\":null," \
    "\"usage\":{\"input_tokens\":5123,\"cache_creation_input_tokens\":0," \
    "\"cache_read_input_tokens\":4870,\"output_tokens\":78,\"service_tier\":\"standard\"}}"
#define MESSAGE_HEAD \
    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" COMMON_HEADERS "content-length: 598\r\n"
_Static_assert(sizeof(MESSAGE_BODY) - 1 == 598, "MESSAGE_BODY length");

static const char MESSAGE_RESPONSE[] = MESSAGE_HEAD "\r\n" MESSAGE_BODY;
static const char MESSAGE_RESPONSE_CLOSE[] = MESSAGE_HEAD "connection: close\r\n\r\n" MESSAGE_BODY;

#define HEALTH_BODY "{\"status\":\"ok\"}"
_Static_assert(sizeof(HEALTH_BODY) - 1 == 15, "HEALTH_BODY length");
static const char HEALTH_RESPONSE[] =
    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n" HEALTH_BODY;

#define NOT_FOUND_BODY \
    "{\"type\":\"error\",\"error\":{\"type\":\"not_found_error\",\"message\":\"not found\"}}"
_Static_assert(sizeof(NOT_FOUND_BODY) - 1 == 73, "NOT_FOUND_BODY length");
static const char NOT_FOUND[] =
    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 73\r\n\r\n"
    NOT_FOUND_BODY;

#define BAD_REQUEST_BODY \
    "{\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"bad request\"}}"
_Static_assert(sizeof(BAD_REQUEST_BODY) - 1 == 81, "BAD_REQUEST_BODY length");
static const char BAD_REQUEST[] =
    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    "content-length: 81\r\n\r\n" BAD_REQUEST_BODY;

static const char STREAM_HEAD[] =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    "cache-control: no-cache\r\ntransfer-encoding: chunked\r\n" COMMON_HEADERS "\r\n";

static const char START_EVENTS[] =
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{"
    "\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\","
    "\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,"
    "\"stop_sequence\":null,\"usage\":{\"input_tokens\":5123,\"cache_creation_input_tokens\":0,"
    "\"cache_read_input_tokens\":4870,\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n"
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,"
    "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"
    "event: ping\ndata: {\"type\":\"ping\"}\n\n";

static const char DELTA_PREFIX[] =
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
    "\"delta\":{\"type\":\"text_delta\",\"text\":\"";
static const char DELTA_SUFFIX[] = "| cached the weight table\"}}\n\n";

static const char END_EVENTS[] =
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\","
    "\"stop_sequence\":null},\"usage\":{\"output_tokens\":78}}\n\n"
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#define LIT(s) (s), (sizeof(s) - 1)

/* Built at start-up with chunk(): STREAM_HEAD + chunk(START_EVENTS), chunk(END_EVENTS) + "0\r\n\r\n". */
static char stream_start[sizeof(STREAM_HEAD) + sizeof(START_EVENTS) + 32];
static size_t stream_start_len;
static char end_chunks[sizeof(END_EVENTS) + 32];
static size_t end_chunks_len;

/* Chunked framing: "%x\r\n<payload>\r\n" (lowercase hex); returns the bytes written to out. */
static size_t chunk(char *out, const char *payload, size_t len)
{
    size_t n = (size_t)sprintf(out, "%zx\r\n", len);
    memcpy(out + n, payload, len);
    memcpy(out + n + len, "\r\n", 2);
    return n + len + 2;
}

/* ---- state --------------------------------------------------------------------------------- */

struct buf { char *data; size_t off, len, cap; };  /* bytes data[off, len) are pending */

struct conn {
    int fd;             /* -1 once closed; the struct itself is freed after the epoll batch */
    uint32_t interest;  /* epoll events currently registered */
    bool streaming;     /* a stream is being paced: later (pipelined) requests wait */
    bool close_after;   /* the current request asked for close */
    bool closing;       /* close once the output is flushed (asyncio's transport.close()) */
    int sent;           /* deltas written in the current stream */
    long heap_pos;      /* index in the deadline heap, -1 when not scheduled */
    int64_t t0, due;    /* stream start and next delta's deadline, CLOCK_MONOTONIC ns */
    struct buf in, out;
    struct conn *next_dead;
};

static int ep, listen_fd, timer_fd = -1, signal_fd;
static char LISTEN_TAG, TIMER_TAG, SIGNAL_TAG;  /* epoll data.ptr of the non-connection fds */
static int deltas = 40;
static int64_t interval_ns = 20000000;
static unsigned long long n_requests, n_streams, n_done;
static struct conn **heap;
static long heap_n, heap_cap;
static struct conn *dead;      /* closed during this epoll batch, freed after it: a later event of
                                  the same batch may still point at it (no use-after-free) */
static char rbuf[RECV_BYTES];  /* one receive buffer shared by every connection */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *xrealloc(void *p, size_t n)
{
    if (!(p = realloc(p, n))) {
        fputs("upstream: out of memory\n", stderr);
        exit(1);
    }
    return p;
}

static void buf_append(struct buf *b, const char *p, size_t n)
{
    if (b->len + n > b->cap && b->off > 0) {  /* reuse the consumed front before growing */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off == b->len) {  /* empty: give the memory back (10,000 idle connections add up) */
        free(b->data);
        memset(b, 0, sizeof *b);
    }
}

/* ---- the deadline heap: a binary min-heap on due; each conn knows its index ---------------- */

static void heap_set(long i, struct conn *c) { heap[i] = c; c->heap_pos = i; }

static void heap_sift(long i)  /* move heap[i] up or down to its place */
{
    struct conn *c = heap[i];
    for (; i > 0 && heap[(i - 1) / 2]->due > c->due; i = (i - 1) / 2)
        heap_set(i, heap[(i - 1) / 2]);
    for (long k; (k = 2 * i + 1) < heap_n; i = k) {
        if (k + 1 < heap_n && heap[k + 1]->due < heap[k]->due)
            k++;
        if (heap[k]->due >= c->due)
            break;
        heap_set(i, heap[k]);
    }
    heap_set(i, c);
}

static void heap_push(struct conn *c)
{
    if (heap_n == heap_cap) {
        heap_cap = heap_cap ? heap_cap * 2 : 1024;
        heap = xrealloc(heap, (size_t)heap_cap * sizeof *heap);
    }
    heap[heap_n] = c;
    heap_sift(heap_n++);
}

static void heap_remove(struct conn *c)
{
    long i = c->heap_pos;
    if (i < 0)
        return;
    c->heap_pos = -1;
    if (i < --heap_n) {
        heap[i] = heap[heap_n];
        heap_sift(i);
    }
}

/* ---- connections ---------------------------------------------------------------------------- */

static void conn_close(struct conn *c)
{
    if (c->fd < 0)
        return;
    heap_remove(c);  /* a stream cut short must not tick on a dead connection */
    close(c->fd);    /* also drops it from the epoll set */
    c->fd = -1;
    free(c->in.data);
    free(c->out.data);
    memset(&c->in, 0, sizeof c->in);
    memset(&c->out, 0, sizeof c->out);
    c->next_dead = dead;
    dead = c;
}

static void set_interest(struct conn *c)
{
    uint32_t want = (c->closing ? 0 : EPOLLIN) | (c->out.len > c->out.off ? EPOLLOUT : 0);
    if (want != c->interest) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->interest = want;
    }
}

/* Like asyncio's transport.close(): stop reading, flush what is queued, then close. */
static void conn_finish(struct conn *c)
{
    heap_remove(c);
    if (c->out.len > c->out.off) {
        c->closing = true;
        set_interest(c);
    } else {
        conn_close(c);
    }
}

static bool would_block(void) { return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR; }

/* Write now; whatever the socket does not take is queued, in order, behind earlier bytes (sent
 * on EPOLLOUT). Returns false if the connection is gone (reset, EPIPE: closed quietly). */
static bool conn_write(struct conn *c, const char *p, size_t n)
{
    if (c->out.len == c->out.off) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && !would_block()) {
            conn_close(c);
            return false;
        }
        w = w < 0 ? 0 : w;
        p += w;
        if ((n -= (size_t)w) == 0)
            return true;
    }
    buf_append(&c->out, p, n);
    set_interest(c);
    return true;
}

static void on_writable(struct conn *c)
{
    while (c->out.len > c->out.off) {
        ssize_t w = send(c->fd, c->out.data + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL);
        if (w < 0) {
            if (!would_block())
                conn_close(c);
            return;
        }
        buf_consume(&c->out, (size_t)w);
    }
    if (c->closing)
        conn_close(c);
    else
        set_interest(c);
}

/* ---- requests ------------------------------------------------------------------------------- */

static bool is_space(char ch)  /* what Python's bytes.strip() and re's \s take */
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

static void trim(const char **p, size_t *n)
{
    for (; *n && is_space(**p); (*p)++, (*n)--) {}
    for (; *n && is_space((*p)[*n - 1]); (*n)--) {}
}

static bool eq(const char *p, size_t n, const char *lit) { return n == strlen(lit) && !memcmp(p, lit, n); }
static bool ieq(const char *p, size_t n, const char *lit) { return n == strlen(lit) && !strncasecmp(p, lit, n); }

/* Python's int() on a stripped value: [+-]digits, single '_' between digits. Values over the
 * body limit saturate (rejected later anyway); a negative length is refused. */
static bool parse_length(const char *s, size_t n, long long *out)
{
    size_t i = 0;
    bool neg = false, digit = false;
    long long v = 0;
    if (n > 0 && (s[0] == '+' || s[0] == '-'))
        neg = s[i++] == '-';
    for (; i < n; i++) {
        if (s[i] >= '0' && s[i] <= '9') {
            v = v <= MAX_BODY_BYTES ? v * 10 + (s[i] - '0') : v;
            digit = true;
        } else if (s[i] == '_' && digit && i + 1 < n) {
            digit = false;
        } else {
            return false;
        }
    }
    *out = v;
    return digit && !(neg && v != 0);
}

/* The regex "stream"\s*:\s*true anywhere in the body. */
static bool wants_stream(const char *body, size_t n)
{
    const char *end = body + n, *p = body, *q;
    while ((p = memmem(p, (size_t)(end - p), "\"stream\"", 8)) != NULL) {
        for (q = p + 8, p++; q < end && is_space(*q); q++) {}
        if (q == end || *q++ != ':')
            continue;
        for (; q < end && is_space(*q); q++) {}
        if (end - q >= 4 && memcmp(q, "true", 4) == 0)
            return true;
    }
    return false;
}

static void fail(struct conn *c)
{
    if (conn_write(c, LIT(BAD_REQUEST)))
        conn_finish(c);
}

static void start_stream(struct conn *c)
{
    c->streaming = true;
    c->sent = 0;
    n_streams++;
    c->t0 = now_ns();
    if (conn_write(c, stream_start, stream_start_len)) {
        c->due = c->t0 + interval_ns;
        heap_push(c);
    }
}

/* Answer every complete request in buf[0, len) in order, as upstream.py's _process does; stops at
 * a stream (the rest waits for its end), an incomplete request, or a close. Returns the bytes
 * consumed; the caller checks c->fd, c->closing and c->streaming. */
static size_t process(struct conn *c, const char *buf, size_t len)
{
    size_t pos = 0;
    while (c->fd >= 0 && !c->closing && !c->streaming) {
        const char *p = buf + pos, *end = memmem(p, len - pos, "\r\n\r\n", 4);
        if (!end) {
            if (len - pos > MAX_HEADER_BYTES)
                fail(c);
            return pos;
        }
        size_t head_len = (size_t)(end - p), n = len - pos;
        const char *eol = memmem(p, head_len, "\r\n", 2);
        size_t line_len = eol ? (size_t)(eol - p) : head_len;
        /* request line: exactly three space-separated parts */
        const char *sp1 = memchr(p, ' ', line_len);
        const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', line_len - (size_t)(sp1 + 1 - p)) : NULL;
        if (!sp2 || memchr(sp2 + 1, ' ', line_len - (size_t)(sp2 + 1 - p))) {
            fail(c);
            return pos;
        }
        const char *method = p, *target = sp1 + 1, *version = sp2 + 1;
        size_t method_len = (size_t)(sp1 - p), target_len = (size_t)(sp2 - target);
        bool close = eq(version, line_len - (size_t)(version - p), "HTTP/1.0");
        long long length = 0;
        /* header lines: name ':' value, both stripped; names case-insensitive */
        for (size_t at = line_len; at < head_len;) {
            const char *line = p + at + 2;  /* past the CRLF ending the previous line */
            const char *next = memmem(line, head_len - (at + 2), "\r\n", 2);
            size_t ln = next ? (size_t)(next - line) : head_len - (at + 2);
            at += 2 + ln;
            const char *colon = memchr(line, ':', ln), *name = line, *value = colon ? colon + 1 : "";
            size_t name_len = colon ? (size_t)(colon - line) : ln, value_len = colon ? ln - name_len - 1 : 0;
            trim(&name, &name_len);
            trim(&value, &value_len);
            bool bad = false;
            if (ieq(name, name_len, "content-length"))
                bad = !parse_length(value, value_len, &length);
            else if (ieq(name, name_len, "connection"))
                close = ieq(value, value_len, "close") || (close && !ieq(value, value_len, "keep-alive"));
            else if (ieq(name, name_len, "transfer-encoding"))
                bad = true;  /* chunked requests are not needed here */
            if (bad) {
                fail(c);
                return pos;
            }
        }
        if (length > MAX_BODY_BYTES) {
            fail(c);
            return pos;
        }
        size_t start = head_len + 4;
        if (n - start < (size_t)length)
            return pos;  /* wait for the rest of the body */
        const char *body = p + start;
        pos += start + (size_t)length;
        c->close_after = close;
        n_requests++;
        const char *q = memchr(target, '?', target_len);
        size_t path_len = q ? (size_t)(q - target) : target_len;
        bool ok;
        if (eq(method, method_len, "POST") && eq(target, path_len, "/v1/messages")) {
            if (wants_stream(body, (size_t)length)) {
                start_stream(c);
                return pos;
            }
            ok = close ? conn_write(c, LIT(MESSAGE_RESPONSE_CLOSE)) : conn_write(c, LIT(MESSAGE_RESPONSE));
        } else if (eq(method, method_len, "GET") && eq(target, path_len, "/health")) {
            ok = conn_write(c, LIT(HEALTH_RESPONSE));
        } else {
            ok = conn_write(c, LIT(NOT_FOUND));
        }
        if (ok && close)
            conn_finish(c);
    }
    return pos;
}

/* Process what is queued in c->in (after a stream ended, or when new bytes joined old ones). */
static void consume_input(struct conn *c)
{
    size_t used = process(c, c->in.data + c->in.off, c->in.len - c->in.off);
    if (c->fd >= 0 && used)
        buf_consume(&c->in, used);
}

static void on_readable(struct conn *c)
{
    ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (n < 0) {
        if (!would_block())
            conn_close(c);
    } else if (n == 0) {  /* peer closed: asyncio closes the transport (flushing), ending a stream */
        c->streaming = false;
        conn_finish(c);
    } else if (c->in.len == c->in.off && !c->streaming) {
        /* the common case: parse straight from the shared buffer, keep only an incomplete tail */
        size_t used = process(c, rbuf, (size_t)n);
        if (c->fd >= 0 && !c->closing && used < (size_t)n)
            buf_append(&c->in, rbuf + used, (size_t)n - used);
    } else {
        buf_append(&c->in, rbuf, (size_t)n);
        if (!c->streaming)
            consume_input(c);
    }
}

/* ---- the paced stream ----------------------------------------------------------------------- */

/* Delta number c->sent + 1 is due: write it (with the stream's end if it is the last). */
static void tick(struct conn *c)
{
    char payload[sizeof(DELTA_PREFIX) + 24 + sizeof(DELTA_SUFFIX)];
    char msg[16 + sizeof payload + sizeof end_chunks];
    bool last = ++c->sent >= deltas;
    size_t plen = sizeof(DELTA_PREFIX) - 1;
    memcpy(payload, DELTA_PREFIX, plen);
    plen += (size_t)sprintf(payload + plen, "%lld", (long long)now_ns());  /* stamp at the write */
    memcpy(payload + plen, DELTA_SUFFIX, sizeof(DELTA_SUFFIX) - 1);
    size_t len = chunk(msg, payload, plen + sizeof(DELTA_SUFFIX) - 1);
    if (last) {  /* the last delta goes out in the same write as the end */
        memcpy(msg + len, end_chunks, end_chunks_len);
        len += end_chunks_len;
    }
    if (!conn_write(c, msg, len))
        return;
    if (!last) {
        c->due = c->t0 + (int64_t)(c->sent + 1) * interval_ns;  /* absolute: no drift */
        heap_push(c);
        return;
    }
    c->streaming = false;
    n_done++;
    if (c->close_after)
        conn_finish(c);
    else if (c->in.len > c->in.off)
        consume_input(c);  /* pipelined requests that waited for the stream */
}

/* Write every delta that is due, and those due within the next COALESCE_NS as well. Each wake-up
 * (timer interrupt, context switch, and one more wake-up of the reader) costs this process tens
 * of microseconds of kernel time on a VM, several deltas' send()s' worth; at 1,000 streams
 * (50,000 deltas/s) batching what falls due within 250 us saves a good part of the CPU. Deltas
 * are thus never late beyond the kernel's wake-up slack and at most COALESCE_NS early (1.25% of
 * the default interval; the stamp is taken at the write either way). The clock is read again
 * before giving up, so deadlines that passed while writing do not cost another wake-up. */
static void run_due(void)
{
    int64_t now = now_ns();
    while (heap_n > 0) {
        struct conn *c = heap[0];
        if (c->due > now + COALESCE_NS && c->due > (now = now_ns()) + COALESCE_NS)
            break;
        heap_remove(c);
        tick(c);
    }
}

/* Waiting for the next deadline: epoll_pwait2 (Linux 5.11+) takes a nanosecond timeout itself;
 * where it is missing (ENOSYS), a timerfd armed for the earliest deadline (CLOCK_MONOTONIC,
 * TFD_TIMER_ABSTIME) joins the epoll set instead. Either way no delta waits on a millisecond
 * rounding of epoll_wait's timeout. */
#ifdef FORCE_TIMERFD  /* cc -DFORCE_TIMERFD tests the fallback */
static bool have_pwait2 = false;
#else
static bool have_pwait2 = true;
#endif

/* Wait for I/O, the earliest stream deadline, or resume_at (-1: none), whichever comes first. */
static int wait_events(struct epoll_event *events, int max, int64_t resume_at)
{
    int64_t wake_at = heap_n > 0 ? heap[0]->due : -1;
    if (have_pwait2) {
        if (resume_at >= 0 && (wake_at < 0 || resume_at < wake_at))
            wake_at = resume_at;
        int64_t left = wake_at - now_ns();
        left = left > 0 ? left : 0;
        struct timespec ts = {left / 1000000000, left % 1000000000};
        int n = epoll_pwait2(ep, events, max, wake_at >= 0 ? &ts : NULL, NULL);
        if (n >= 0 || errno != ENOSYS)
            return n;
        have_pwait2 = false;
    }
    if (timer_fd < 0) {
        timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &TIMER_TAG};
        if (timer_fd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, timer_fd, &ev) < 0) {
            perror("upstream: timerfd");
            exit(1);
        }
    }
    if (wake_at >= 0) {
        wake_at = wake_at > 0 ? wake_at : 1;  /* an all-zero it_value would disarm */
        struct itimerspec its = {.it_value = {wake_at / 1000000000, wake_at % 1000000000}};
        timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    }
    int64_t left = resume_at - now_ns();
    return epoll_wait(ep, events, max, resume_at < 0 ? -1 : left > 0 ? (int)(left / 1000000) + 1 : 0);
}

/* ---- the server ----------------------------------------------------------------------------- */

/* Returns false when accept() ran out of file descriptors (the caller pauses accepting). */
static bool accept_all(void)
{
    for (int i = 0; i < 1024; i++) {  /* bounded, so a connect storm cannot delay due deltas */
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                perror("upstream: accept");
                return false;
            }
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return true;  /* EAGAIN, or a transient error: wait for the next readiness */
        }
        int one = 1;  /* asyncio sets TCP_NODELAY on every connection */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (!c || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        c->fd = fd;
        c->heap_pos = -1;
        c->interest = EPOLLIN;
    }
    return true;
}

static int listen_on(const char *host, long port)
{
    bool v6 = strcmp(host, "::1") == 0;
    int one = 1, fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                              .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    struct sockaddr *sa = v6 ? (struct sockaddr *)&a6 : (struct sockaddr *)&a4;
    socklen_t sl = v6 ? sizeof a6 : sizeof a4;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (v6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (fd < 0 || bind(fd, sa, sl) < 0 || listen(fd, 4096) < 0 || getsockname(fd, sa, &sl) < 0) {
        perror("upstream: listen");
        exit(1);
    }
    listen_fd = fd;
    return ntohs(v6 ? a6.sin6_port : a4.sin_port);
}

static const char USAGE[] =
    "usage: sse_upstream [-h] [--host HOST] [--port PORT] [--deltas DELTAS] [--interval-ms INTERVAL_MS]\n";

static void usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "%ssse_upstream: error: ", USAGE);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    exit(2);
}

static long parse_int(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        usage_error("argument %s: invalid int value", opt);
    return v;
}

int main(int argc, char **argv)
{
    static const char *const names[] = {"--host", "--port", "--deltas", "--interval-ms", "--help"};
    const char *host = "127.0.0.1";
    long port = 0;
    double interval_ms = 20.0;
    for (int i = 1; i < argc; i++) {
        const char *arg = strcmp(argv[i], "-h") ? argv[i] : "--help", *eqs = strchr(arg, '=');
        size_t len = eqs ? (size_t)(eqs - arg) : strlen(arg);
        int found = -1;  /* as argparse: an unambiguous prefix of an option will do */
        for (int k = 0; k < 5 && len > 2 && !strncmp(arg, "--", 2); k++) {
            if (strncmp(names[k], arg, len) == 0) {
                if (strlen(names[k]) == len) {
                    found = k;
                    break;
                }
                if (found >= 0)
                    usage_error("ambiguous option: %s", arg);
                found = k;
            }
        }
        if (found < 0)
            usage_error("unrecognized arguments: %s", arg);
        if (found == 4) {
            printf("%s\nA fast fake Anthropic upstream for the load benchmark (C mirror of "
                   "benchmarks/upstream.py).\n", USAGE);
            return 0;
        }
        if (!eqs && i + 1 == argc)
            usage_error("argument %s: expected one argument", names[found]);
        const char *value = eqs ? eqs + 1 : argv[++i];
        if (found == 0) {
            host = value;
        } else if (found == 1) {
            port = parse_int("--port", value);
        } else if (found == 2) {
            deltas = (int)parse_int("--deltas", value);
        } else {
            char *end;
            interval_ms = strtod(value, &end);
            if (end == value || *end || !isfinite(interval_ms))
                usage_error("argument --interval-ms: invalid float value: '%s'", value);
        }
    }
    if (strcmp(host, "127.0.0.1") && strcmp(host, "localhost") && strcmp(host, "::1"))
        usage_error("%s", "the fake upstream only listens on the loopback interface");
    if (port < 0 || port > 65535)
        usage_error("argument --port: %s", "out of range 0-65535");
    deltas = deltas < 1 ? 1 : deltas;
    interval_ns = (int64_t)(interval_ms * 1e6 + (interval_ms < 0 ? -0.5 : 0.5));  /* no libm */

    struct rlimit rl;  /* raise the soft descriptor limit to the hard one: 10,000+ connections */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t want = rl.rlim_max != RLIM_INFINITY ? rl.rlim_max : 65536;
        if (rl.rlim_cur < want) {
            rl.rlim_cur = want;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }
    signal(SIGPIPE, SIG_IGN);

    stream_start_len = sizeof(STREAM_HEAD) - 1;
    memcpy(stream_start, STREAM_HEAD, stream_start_len);
    stream_start_len += chunk(stream_start + stream_start_len, LIT(START_EVENTS));
    end_chunks_len = chunk(end_chunks, LIT(END_EVENTS));
    memcpy(end_chunks + end_chunks_len, "0\r\n\r\n", 5);
    end_chunks_len += 5;

    int bound = listen_on(host, port);
    /* SIGTERM/SIGINT arrive as a readable signalfd in the same epoll set: no races, no EINTR */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &LISTEN_TAG};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &SIGNAL_TAG};
    if (signal_fd < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, signal_fd, &sev) < 0) {
        perror("upstream: setup");
        return 1;
    }
    printf("READY %d\n", bound);
    fflush(stdout);

    struct epoll_event events[1024];
    bool stop = false;
    int64_t accept_resume = -1;  /* out of descriptors: retry accepting after 1 s, like asyncio */
    while (!stop) {
        int n = wait_events(events, 1024, accept_resume);
        if (n < 0 && errno != EINTR) {
            perror("upstream: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            uint32_t what = events[i].events;
            if (tag == &LISTEN_TAG) {
                if (!accept_all()) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, listen_fd, NULL);
                    accept_resume = now_ns() + 1000000000;
                }
            } else if (tag == &TIMER_TAG) {
                uint64_t expirations;  /* clear it; run_due() below does the work */
                ssize_t r = read(timer_fd, &expirations, sizeof expirations);
                (void)r;
            } else if (tag == &SIGNAL_TAG) {
                stop = true;
            } else {
                struct conn *c = tag;
                if (c->fd >= 0 && !c->closing && (what & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                    on_readable(c);
                else if (c->fd >= 0 && c->closing && (what & (EPOLLHUP | EPOLLERR)))
                    conn_close(c);
                if (c->fd >= 0 && (what & EPOLLOUT))
                    on_writable(c);
            }
        }
        run_due();
        if (accept_resume >= 0 && now_ns() >= accept_resume) {
            epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev);
            accept_resume = -1;
        }
        while (dead) {
            struct conn *next = dead->next_dead;
            free(dead);
            dead = next;
        }
    }
    fprintf(stderr, "upstream: %llu requests, %llu streams started, %llu finished\n",
            n_requests, n_streams, n_done);
    return 0;
}
