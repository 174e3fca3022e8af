/*
 * loadgen: a small, fast HTTP/SSE load generator for the zeusd benchmarks.
 *
 * One thread, epoll, nonblocking sockets, UNIX domain sockets or TCP on
 * loopback. Every mode runs for a bounded time and stops by itself; results
 * are printed as one JSON object on stdout, together with the generator's own
 * CPU time (getrusage) so that a reader can check it was not the bottleneck.
 *
 *   loadgen http  TARGET --conns N --method M --path P [--duration S] [--count C] [--warmup S] [--path2 P2]
 *       N keep-alive connections, each sending the same request again as soon
 *       as the previous response is complete; per-request latency from the
 *       write of the request to the last byte of the response (CLOCK_MONOTONIC).
 *       With --path2 P2 the requests alternate between P and P2 (e.g. two
 *       power limits, so that every command really changes the device).
 *
 *   loadgen sse   TARGET --conns N --path P --duration S --period-ms MS [--batch K] [--sync]
 *       N subscribers (at most K subscribing at once); once every one has its
 *       response headers, events are counted for S seconds. The chunked body is
 *       de-chunked and searched line by line for `data: ` events (an event may
 *       span chunk and read boundaries). Per connection, consecutive events give
 *       two gaps: between their "timestamp_ms" values and between their arrival
 *       times; their deviation from the nominal period is the jitter.
 *
 *   loadgen stall TARGET --conns N --path P --duration S [--rcvbuf B] [--sync]
 *       N subscribers that send their request and then never read, with a
 *       small receive buffer; reports which of them the server disconnected
 *       and when.
 *
 *   loadgen serve --unix PATH --duration S
 *       A trivial HTTP server (fixed 200 response per request): the ceiling
 *       the generator reaches when the server costs nothing.
 *
 * TARGET is --unix PATH or --tcp HOST:PORT. With --sync (sse, stall), the
 * generator writes "READY <n>" on stderr when the measurement window starts,
 * "END" when it ends, and then keeps its connections (and keeps reading) until
 * a line or EOF arrives on stdin, so that a driver can sample the server at
 * exactly those moments.
 *
 * Build: gcc -O2 -Wall -Werror -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF (64 * 1024)
#define HEAD_MAX (16 * 1024)
#define LINE_MAX_LEN 4096
#define MAX_EVENTS 256

/* ------------------------------------------------------------------ utilities */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

typedef struct {
    int64_t *v;
    size_t n, cap;
} vec_t;

static void vec_push(vec_t *a, int64_t x)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 4096;
        a->v = realloc(a->v, a->cap * sizeof(int64_t));
        if (a->v == NULL)
            die("out of memory");
    }
    a->v[a->n++] = x;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted vector (0 when empty). */
static int64_t pct(const vec_t *a, double q)
{
    if (a->n == 0)
        return 0;
    size_t rank = (size_t)(q * (double)a->n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > a->n)
        rank = a->n;
    return a->v[rank - 1];
}

static double mean_of(const vec_t *a)
{
    if (a->n == 0)
        return 0;
    double s = 0;
    for (size_t i = 0; i < a->n; i++)
        s += (double)a->v[i];
    return s / (double)a->n;
}

/* {"p50":..,"p90":..,"p99":..,"max":..,"mean":..,"n":..} in the vector's unit divided by div. */
static void print_dist(const char *name, vec_t *a, double div)
{
    qsort(a->v, a->n, sizeof(int64_t), cmp_i64);
    printf("\"%s\":{\"n\":%zu,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f,\"mean\":%.1f}", name, a->n,
           pct(a, 0.50) / div, pct(a, 0.90) / div, pct(a, 0.99) / div, a->n ? a->v[a->n - 1] / div : 0.0,
           mean_of(a) / div);
}

static void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl: %s", strerror(errno));
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ------------------------------------------------------------------ options */

typedef struct {
    const char *mode;
    const char *unix_path;
    const char *tcp;
    int conns;
    double duration;
    long long count;
    double warmup;
    const char *method;
    const char *path;
    const char *path2;
    double period_ms;
    int batch;
    int rcvbuf;
    int sync;
    double subscribe_timeout;
} opts_t;

static opts_t O = {
    .conns = 1,
    .duration = 5,
    .count = 0,
    .warmup = 0,
    .method = "GET",
    .path = "/discover",
    .period_ms = 50,
    .batch = 64,
    .rcvbuf = 4096,
    .sync = 0,
    .subscribe_timeout = 60,
};

/* One row per command-line option: its name, how to parse it, where it goes. */
typedef enum { OPT_STR, OPT_INT, OPT_LONG, OPT_DOUBLE, OPT_FLAG } opt_kind_t;
typedef struct {
    const char *name;
    opt_kind_t kind;
    void *target;
} option_t;

static const option_t OPTIONS[] = {
    {"--unix", OPT_STR, &O.unix_path},
    {"--tcp", OPT_STR, &O.tcp},
    {"--conns", OPT_INT, &O.conns},
    {"--duration", OPT_DOUBLE, &O.duration},
    {"--count", OPT_LONG, &O.count},
    {"--warmup", OPT_DOUBLE, &O.warmup},
    {"--method", OPT_STR, &O.method},
    {"--path", OPT_STR, &O.path},
    {"--path2", OPT_STR, &O.path2},
    {"--period-ms", OPT_DOUBLE, &O.period_ms},
    {"--batch", OPT_INT, &O.batch},
    {"--rcvbuf", OPT_INT, &O.rcvbuf},
    {"--subscribe-timeout", OPT_DOUBLE, &O.subscribe_timeout},
    {"--sync", OPT_FLAG, &O.sync},
};

static struct sockaddr_storage g_addr;
static socklen_t g_addrlen;
static int g_family;

static void resolve_target(void)
{
    memset(&g_addr, 0, sizeof(g_addr));
    if (O.unix_path != NULL) {
        struct sockaddr_un *un = (struct sockaddr_un *)&g_addr;
        if (strlen(O.unix_path) >= sizeof(un->sun_path))
            die("socket path too long");
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, O.unix_path);
        g_addrlen = sizeof(*un);
        g_family = AF_UNIX;
        return;
    }
    if (O.tcp == NULL)
        die("need --unix PATH or --tcp HOST:PORT");
    char host[256];
    const char *colon = strrchr(O.tcp, ':');
    if (colon == NULL || (size_t)(colon - O.tcp) >= sizeof(host))
        die("bad --tcp %s", O.tcp);
    memcpy(host, O.tcp, (size_t)(colon - O.tcp));
    host[colon - O.tcp] = '\0';
    struct sockaddr_in *in = (struct sockaddr_in *)&g_addr;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
        die("--tcp needs a numeric IPv4 address, got %s", host);
    if ((ntohl(in->sin_addr.s_addr) >> 24) != 127)
        die("refusing a non-loopback target %s", host);
    g_addrlen = sizeof(*in);
    g_family = AF_INET;
}

/* A blocking connect (loopback: immediate), then nonblocking. -1 on failure. */
static int open_conn(int rcvbuf)
{
    int fd = socket(g_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if (connect(fd, (struct sockaddr *)&g_addr, g_addrlen) < 0) {
        close(fd);
        return -1;
    }
    if (g_family == AF_INET) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    set_nonblocking(fd);
    return fd;
}

static char g_request[2][2048];
static size_t g_request_len[2];
static int g_nrequests = 1;
static unsigned long long g_sent;

static size_t format_request(char *out, size_t cap, const char *path)
{
    int n;
    if (strcmp(O.method, "POST") == 0)
        n = snprintf(out, cap, "POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", path);
    else
        n = snprintf(out, cap, "%s %s HTTP/1.1\r\nHost: localhost\r\n\r\n", O.method, path);
    if (n < 0 || (size_t)n >= cap)
        die("request too long");
    return (size_t)n;
}

/* One request, or two (--path2) that alternate, request by request, across all connections. */
static void build_request(void)
{
    g_request_len[0] = format_request(g_request[0], sizeof(g_request[0]), O.path);
    g_nrequests = 1;
    if (O.path2 != NULL) {
        g_request_len[1] = format_request(g_request[1], sizeof(g_request[1]), O.path2);
        g_nrequests = 2;
    }
}

static int send_request(int fd)
{
    int k = (int)(g_sent++ % (unsigned long long)g_nrequests);
    ssize_t w = write(fd, g_request[k], g_request_len[k]);
    return w == (ssize_t)g_request_len[k] ? 0 : -1;
}

/* ------------------------------------------------------------------ HTTP parsing */

/* Response head: status code, Content-Length (-1 if absent), chunked flag. */
typedef struct {
    int status;
    long long content_length;
    int chunked;
} head_t;

static const char *find_header(const char *head, size_t len, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = head; p + nl < head + len; p++) {
        if ((p == head || p[-1] == '\n') && strncasecmp(p, name, nl) == 0)
            return p + nl;
    }
    return NULL;
}

static int parse_head(const char *buf, size_t len, head_t *h)
{
    if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0)
        return -1;
    h->status = atoi(buf + 9);
    h->content_length = -1;
    h->chunked = 0;
    const char *cl = find_header(buf, len, "content-length:");
    if (cl != NULL)
        h->content_length = strtoll(cl, NULL, 10);
    const char *te = find_header(buf, len, "transfer-encoding:");
    if (te != NULL) {
        while (*te == ' ')
            te++;
        h->chunked = strncasecmp(te, "chunked", 7) == 0;
    }
    return 0;
}

/* Incremental chunked-body decoder. */
enum { CK_SIZE, CK_EXT, CK_SIZE_LF, CK_DATA, CK_DATA_CR, CK_DATA_LF, CK_TRAILER, CK_TRAILER_LF, CK_DONE, CK_ERROR };

typedef struct {
    int state;
    unsigned long long remain;
    int digits;
    int trailer_len;
} chunker_t;

typedef void (*sink_fn)(void *ctx, const char *data, size_t n);

/* Feeds n bytes; decoded payload goes to sink. Returns bytes consumed (stops after the last chunk). */
static size_t chunker_feed(chunker_t *c, const char *p, size_t n, sink_fn sink, void *ctx)
{
    size_t i = 0;
    while (i < n && c->state != CK_DONE && c->state != CK_ERROR) {
        char ch = p[i];
        switch (c->state) {
        case CK_SIZE:
            if (isxdigit((unsigned char)ch)) {
                int v = isdigit((unsigned char)ch) ? ch - '0' : (tolower((unsigned char)ch) - 'a' + 10);
                c->remain = c->remain * 16 + (unsigned)v;
                if (++c->digits > 15)
                    c->state = CK_ERROR;
                i++;
            } else if (ch == ';' || ch == ' ') {
                c->state = CK_EXT;
                i++;
            } else if (ch == '\r') {
                c->state = CK_SIZE_LF;
                i++;
            } else if (ch == '\n') {
                i++;
                goto size_done;
            } else {
                c->state = CK_ERROR;
            }
            break;
        case CK_EXT:
            if (ch == '\n') {
                i++;
                goto size_done;
            }
            i++;
            break;
        case CK_SIZE_LF:
            if (ch != '\n') {
                c->state = CK_ERROR;
                break;
            }
            i++;
        size_done:
            if (c->digits == 0) {
                c->state = CK_ERROR;
            } else if (c->remain == 0) {
                c->state = CK_TRAILER;
                c->trailer_len = 0;
            } else {
                c->state = CK_DATA;
            }
            break;
        case CK_DATA: {
            size_t take = n - i;
            if (take > c->remain)
                take = (size_t)c->remain;
            if (sink != NULL)
                sink(ctx, p + i, take);
            c->remain -= take;
            i += take;
            if (c->remain == 0)
                c->state = CK_DATA_CR;
            break;
        }
        case CK_DATA_CR:
            if (ch == '\r') {
                c->state = CK_DATA_LF;
                i++;
            } else if (ch == '\n') {
                i++;
                c->state = CK_SIZE;
                c->digits = 0;
                c->remain = 0;
            } else {
                c->state = CK_ERROR;
            }
            break;
        case CK_DATA_LF:
            if (ch != '\n') {
                c->state = CK_ERROR;
                break;
            }
            i++;
            c->state = CK_SIZE;
            c->digits = 0;
            c->remain = 0;
            break;
        case CK_TRAILER: /* trailer lines until an empty one */
            i++;
            if (ch == '\n') {
                if (c->trailer_len == 0)
                    c->state = CK_DONE;
                c->trailer_len = 0;
            } else if (ch != '\r') {
                c->trailer_len++;
            }
            break;
        }
    }
    return i;
}

static void chunker_reset(chunker_t *c)
{
    memset(c, 0, sizeof(*c));
    c->state = CK_SIZE;
}

/* ------------------------------------------------------------------ http mode */

typedef struct {
    int fd;
    int in_head; /* reading the response head */
    char head[HEAD_MAX];
    size_t head_len;
    head_t h;
    long long body_left; /* Content-Length bodies */
    chunker_t ck;        /* chunked bodies */
    int64_t sent_at;
    int busy;
} hconn_t;

static struct {
    long long issued, completed, recorded, errors, non2xx, reconnects;
    vec_t lat_ns;
    int64_t measure_from, first_recorded, last_recorded;
} H;

static int g_ep;
static volatile sig_atomic_t g_stop_signal;

static void on_signal(int sig)
{
    (void)sig;
    g_stop_signal = 1;
}

static void ep_add(int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev = {.events = events, .data.u64 = data};
    if (epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static int http_may_issue(int64_t now, int64_t deadline)
{
    if (now >= deadline || g_stop_signal)
        return 0;
    if (O.count > 0 && H.recorded + H.issued - H.completed >= O.count)
        return 0;
    return 1;
}

static void http_issue(hconn_t *c, int64_t now)
{
    c->in_head = 1;
    c->head_len = 0;
    c->sent_at = now;
    c->busy = 1;
    H.issued++;
    if (send_request(c->fd) < 0) {
        H.errors++;
        c->busy = 0;
    }
}

static int http_reconnect(hconn_t *c, int index)
{
    if (c->fd >= 0) {
        epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = open_conn(0);
    c->busy = 0;
    if (c->fd < 0)
        return -1;
    ep_add(c->fd, EPOLLIN, (uint64_t)index);
    H.reconnects++;
    return 0;
}

static void http_complete(hconn_t *c, int64_t now)
{
    H.completed++;
    c->busy = 0;
    if (c->h.status < 200 || c->h.status > 299)
        H.non2xx++;
    if (c->sent_at >= H.measure_from) {
        vec_push(&H.lat_ns, now - c->sent_at);
        H.recorded++;
        if (H.first_recorded == 0)
            H.first_recorded = c->sent_at;
        H.last_recorded = now;
    }
}

/* Consumes bytes of a response; returns 1 when the response is complete, -1 on error. */
static int http_consume(hconn_t *c, const char *p, size_t n, size_t *used)
{
    size_t i = 0;
    if (c->in_head) {
        /* Append to head buffer until the blank line. */
        while (i < n) {
            if (c->head_len >= HEAD_MAX - 1)
                return -1;
            c->head[c->head_len++] = p[i++];
            if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) {
                c->head[c->head_len] = '\0';
                if (parse_head(c->head, c->head_len, &c->h) < 0)
                    return -1;
                c->in_head = 0;
                if (c->h.chunked) {
                    chunker_reset(&c->ck);
                    c->body_left = -1;
                } else {
                    c->body_left = c->h.content_length < 0 ? 0 : c->h.content_length;
                }
                break;
            }
        }
        if (c->in_head) {
            *used = i;
            return 0;
        }
    }
    if (c->h.chunked) {
        i += chunker_feed(&c->ck, p + i, n - i, NULL, NULL);
        *used = i;
        if (c->ck.state == CK_ERROR)
            return -1;
        return c->ck.state == CK_DONE;
    }
    size_t take = n - i;
    if ((long long)take > c->body_left)
        take = (size_t)c->body_left;
    c->body_left -= (long long)take;
    i += take;
    *used = i;
    return c->body_left == 0;
}

static void print_common(double cpu, double window_s)
{
    printf("\"target\":\"%s\",\"loadgen_cpu_s\":%.4f,\"loadgen_cpu_per_s\":%.4f", O.unix_path ? "unix" : "tcp", cpu,
           window_s > 0 ? cpu / window_s : 0.0);
}

static int run_http(void)
{
    build_request();
    hconn_t *conns = calloc((size_t)O.conns, sizeof(hconn_t));
    if (conns == NULL)
        die("out of memory");
    for (int i = 0; i < O.conns; i++) {
        conns[i].fd = open_conn(0);
        if (conns[i].fd < 0)
            die("connect: %s", strerror(errno));
        ep_add(conns[i].fd, EPOLLIN, (uint64_t)i);
    }
    int64_t start = now_ns(CLOCK_MONOTONIC);
    H.measure_from = start + (int64_t)(O.warmup * 1e9);
    int64_t deadline = start + (int64_t)((O.warmup + O.duration) * 1e9);
    double cpu0 = cpu_seconds(), cpu_measure0 = -1;
    for (int i = 0; i < O.conns; i++)
        http_issue(&conns[i], now_ns(CLOCK_MONOTONIC));

    static char buf[READ_BUF];
    struct epoll_event evs[MAX_EVENTS];
    int64_t hard_stop = deadline + 2000000000LL; /* outstanding responses get 2 s more */
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (cpu_measure0 < 0 && now >= H.measure_from)
            cpu_measure0 = cpu_seconds();
        int busy = 0;
        for (int i = 0; i < O.conns; i++)
            busy += conns[i].busy;
        if (busy == 0 || now >= hard_stop)
            break;
        int timeout_ms = (int)((hard_stop - now) / 1000000) + 1;
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < n; e++) {
            int idx = (int)evs[e].data.u64;
            hconn_t *c = &conns[idx];
            ssize_t r = read(c->fd, buf, sizeof(buf));
            int64_t t = now_ns(CLOCK_MONOTONIC);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                if (c->busy)
                    H.errors++;
                if (http_reconnect(c, idx) == 0 && http_may_issue(t, deadline))
                    http_issue(c, t);
                continue;
            }
            size_t off = 0;
            while (off < (size_t)r) {
                size_t used = 0;
                int done = http_consume(c, buf + off, (size_t)r - off, &used);
                off += used;
                if (done < 0) {
                    H.errors++;
                    if (http_reconnect(c, idx) == 0 && http_may_issue(t, deadline))
                        http_issue(c, t);
                    break;
                }
                if (done == 1) {
                    http_complete(c, t);
                    if (http_may_issue(t, deadline))
                        http_issue(c, t);
                    else
                        break;
                }
                if (used == 0)
                    break;
            }
        }
    }
    double cpu1 = cpu_seconds();
    if (cpu_measure0 < 0)
        cpu_measure0 = cpu0;
    double window = H.last_recorded > H.first_recorded ? (H.last_recorded - H.first_recorded) / 1e9 : 0;
    printf("{\"mode\":\"http\",\"conns\":%d,\"method\":\"%s\",\"path\":\"%s\",", O.conns, O.method, O.path);
    print_common(cpu1 - cpu_measure0, window);
    printf(",\"count\":%lld,\"errors\":%lld,\"non2xx\":%lld,\"reconnects\":%lld,\"window_s\":%.3f,\"rps\":%.1f,", H.recorded,
           H.errors, H.non2xx, H.reconnects, window, window > 0 ? H.recorded / window : 0.0);
    print_dist("latency_us", &H.lat_ns, 1000.0);
    printf("}\n");
    for (int i = 0; i < O.conns; i++)
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    free(conns);
    return 0;
}

/* ------------------------------------------------------------------ sse mode */

#define STDIN_TAG UINT64_MAX

/* With --sync, the measurement window has ended: say so and keep the
 * connections until the driver writes to stdin. Returns 0 when the run should
 * just stop. */
static int hold_after_window(void)
{
    if (!O.sync || g_stop_signal)
        return 0;
    fprintf(stderr, "END\n");
    fflush(stderr);
    set_nonblocking(0);
    ep_add(0, EPOLLIN, STDIN_TAG);
    return 1;
}


enum { S_HEAD, S_BODY, S_CLOSED };

typedef struct {
    int fd;
    int state;
    char head[HEAD_MAX];
    size_t head_len;
    head_t h;
    chunker_t ck;
    char line[LINE_MAX_LEN];
    size_t line_len;
    int line_overflow;
    long long events;       /* in the window */
    long long events_total; /* since subscribing */
    int64_t prev_ts_ms;
    int64_t prev_arrival;
    int64_t arrival; /* of the read being processed */
    int64_t arrival_wall;
} sconn_t;

static struct {
    int measuring;
    long long events, keepalives, other_lines, missed, closed, failed, subscribed, pending, opened, errors, bad_ts;
    vec_t ts_dev_us, arr_dev_us, lag_us;
    int64_t period_us;
} S;

static void sse_event(sconn_t *c, const char *line, size_t len)
{
    c->events_total++;
    int64_t ts = -1;
    const char *key = memmem(line, len, "\"timestamp_ms\":", 15);
    if (key != NULL) {
        const char *p = key + 15;
        const char *end = line + len;
        int64_t v = 0;
        int digits = 0;
        while (p < end && *p >= '0' && *p <= '9' && digits < 19) {
            v = v * 10 + (*p - '0');
            p++;
            digits++;
        }
        if (digits > 0)
            ts = v;
    }
    if (S.measuring) {
        S.events++;
        c->events++;
        if (ts < 0)
            S.bad_ts++;
        if (ts >= 0 && c->prev_ts_ms > 0) {
            int64_t gap_us = (ts - c->prev_ts_ms) * 1000;
            int64_t dev = gap_us - S.period_us;
            vec_push(&S.ts_dev_us, dev < 0 ? -dev : dev);
            if (gap_us * 2 > S.period_us * 3)
                S.missed += (gap_us + S.period_us / 2) / S.period_us - 1;
        }
        if (c->prev_arrival > 0) {
            int64_t dev = (c->arrival - c->prev_arrival) / 1000 - S.period_us;
            vec_push(&S.arr_dev_us, dev < 0 ? -dev : dev);
        }
        if (ts >= 0)
            vec_push(&S.lag_us, c->arrival_wall / 1000 - ts * 1000);
    }
    if (ts >= 0)
        c->prev_ts_ms = ts;
    c->prev_arrival = c->arrival;
}

static void sse_line(sconn_t *c, const char *line, size_t len)
{
    if (len > 0 && line[len - 1] == '\r')
        len--;
    if (len == 0)
        return;
    if (len >= 6 && memcmp(line, "data: ", 6) == 0)
        sse_event(c, line, len);
    else if (line[0] == ':')
        S.keepalives += S.measuring;
    else
        S.other_lines += S.measuring;
}

/* Sink for de-chunked bytes: split into lines. */
static void sse_sink(void *ctx, const char *p, size_t n)
{
    sconn_t *c = ctx;
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        size_t room = LINE_MAX_LEN - 1 - c->line_len;
        size_t copy = seg < room ? seg : room;
        memcpy(c->line + c->line_len, p, copy);
        c->line_len += copy;
        if (copy < seg)
            c->line_overflow = 1;
        if (nl == NULL)
            return;
        c->line[c->line_len] = '\0';
        sse_line(c, c->line, c->line_len);
        c->line_len = 0;
        c->line_overflow = 0;
        p = nl + 1;
        n -= seg + 1;
    }
}

static void sse_close(sconn_t *c, int failed)
{
    if (c->state == S_CLOSED)
        return;
    if (c->state == S_HEAD) {
        S.pending--;
        S.failed++;
    } else if (failed) {
        S.closed++;
    }
    epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = S_CLOSED;
}

static void sse_data(sconn_t *c, const char *p, size_t n)
{
    size_t i = 0;
    if (c->state == S_HEAD) {
        while (i < n) {
            if (c->head_len >= HEAD_MAX - 1) {
                sse_close(c, 1);
                return;
            }
            c->head[c->head_len++] = p[i++];
            if (c->head_len >= 4 && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0) {
                c->head[c->head_len] = '\0';
                if (parse_head(c->head, c->head_len, &c->h) < 0 || c->h.status != 200) {
                    S.errors++;
                    sse_close(c, 1);
                    return;
                }
                c->state = S_BODY;
                chunker_reset(&c->ck);
                S.pending--;
                S.subscribed++;
                break;
            }
        }
    }
    if (c->state != S_BODY || i >= n)
        return;
    if (c->h.chunked) {
        chunker_feed(&c->ck, p + i, n - i, sse_sink, c);
        if (c->ck.state == CK_ERROR) {
            S.errors++;
            sse_close(c, 1);
        } else if (c->ck.state == CK_DONE) {
            sse_close(c, 1);
        }
    } else {
        sse_sink(c, p + i, n - i);
    }
}

static int stdin_line_ready(void)
{
    char b[256];
    ssize_t r = read(0, b, sizeof(b));
    return r <= 0 || memchr(b, '\n', (size_t)r) != NULL;
}


static int run_sse(void)
{
    build_request();
    S.period_us = (int64_t)(O.period_ms * 1000);
    sconn_t *conns = calloc((size_t)O.conns, sizeof(sconn_t));
    if (conns == NULL)
        die("out of memory");
    static char buf[READ_BUF];
    struct epoll_event evs[MAX_EVENTS];
    int64_t t_start = now_ns(CLOCK_MONOTONIC);
    int64_t sub_deadline = t_start + (int64_t)(O.subscribe_timeout * 1e9);
    int64_t window_start = 0, window_end = 0, subscribed_at = 0;
    double cpu_w0 = 0, cpu_w1 = 0;
    int holding = 0;
    int next = 0;
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        /* Open connections, at most O.batch subscribing at once. */
        while (!S.measuring && !holding && next < O.conns && S.pending < O.batch && !g_stop_signal) {
            sconn_t *c = &conns[next];
            c->fd = open_conn(0);
            S.opened++;
            if (c->fd < 0) {
                S.failed++;
                c->state = S_CLOSED;
                next++;
                continue;
            }
            c->state = S_HEAD;
            S.pending++;
            ep_add(c->fd, EPOLLIN, (uint64_t)next);
            if (send_request(c->fd) < 0)
                sse_close(c, 1);
            next++;
        }
        if (!S.measuring && !holding && window_start == 0 &&
            ((next == O.conns && S.pending == 0) || now >= sub_deadline || g_stop_signal)) {
            subscribed_at = now;
            window_start = now;
            window_end = now + (int64_t)(O.duration * 1e9);
            S.measuring = 1;
            cpu_w0 = cpu_seconds();
            if (O.sync) {
                fprintf(stderr, "READY %lld\n", S.subscribed);
                fflush(stderr);
            }
        }
        if (S.measuring && (now >= window_end || g_stop_signal)) {
            S.measuring = 0;
            cpu_w1 = cpu_seconds();
            window_end = now;
            if (!hold_after_window())
                break;
            holding = 1;
        }
        int timeout_ms = 100;
        if (S.measuring) {
            int64_t left = (window_end - now) / 1000000 + 1;
            if (left < timeout_ms)
                timeout_ms = (int)left;
        }
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        int stop_holding = 0;
        for (int e = 0; e < n; e++) {
            if (evs[e].data.u64 == STDIN_TAG) {
                if (stdin_line_ready())
                    stop_holding = 1;
                continue;
            }
            sconn_t *c = &conns[evs[e].data.u64];
            if (c->state == S_CLOSED)
                continue;
            ssize_t r = read(c->fd, buf, sizeof(buf));
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                sse_close(c, 1);
                continue;
            }
            c->arrival = now_ns(CLOCK_MONOTONIC);
            c->arrival_wall = now_ns(CLOCK_REALTIME);
            sse_data(c, buf, (size_t)r);
        }
        if (holding && (stop_holding || g_stop_signal))
            break;
    }
    double window = (window_end - window_start) / 1e9;
    vec_t per_conn = {0};
    for (int i = 0; i < O.conns; i++)
        if (conns[i].state == S_BODY || conns[i].events > 0)
            vec_push(&per_conn, conns[i].events);
    qsort(per_conn.v, per_conn.n, sizeof(int64_t), cmp_i64);
    printf("{\"mode\":\"sse\",\"conns\":%d,\"path\":\"%s\",\"period_ms\":%.3f,", O.conns, O.path, O.period_ms);
    print_common(cpu_w1 - cpu_w0, window);
    printf(",\"subscribed\":%lld,\"failed\":%lld,\"subscribe_s\":%.3f,\"window_s\":%.3f,\"events\":%lld,"
           "\"events_per_s\":%.1f,\"expected_events_per_s\":%.1f,\"keepalives\":%lld,\"other_lines\":%lld,"
           "\"missed_ticks\":%lld,\"closed_by_server\":%lld,\"errors\":%lld,\"events_without_timestamp\":%lld,"
           "\"events_per_conn\":{\"min\":%lld,\"median\":%lld,\"max\":%lld},",
           S.subscribed, S.failed, (subscribed_at - t_start) / 1e9, window, S.events,
           window > 0 ? S.events / window : 0.0, S.subscribed * 1e6 / (double)S.period_us, S.keepalives,
           S.other_lines, S.missed, S.closed, S.errors, S.bad_ts, per_conn.n ? (long long)per_conn.v[0] : 0,
           (long long)pct(&per_conn, 0.5), per_conn.n ? (long long)per_conn.v[per_conn.n - 1] : 0);
    print_dist("timestamp_jitter_us", &S.ts_dev_us, 1.0);
    printf(",");
    print_dist("arrival_jitter_us", &S.arr_dev_us, 1.0);
    printf(",");
    print_dist("delivery_lag_us", &S.lag_us, 1.0);
    printf("}\n");
    for (int i = 0; i < O.conns; i++)
        if (conns[i].state != S_CLOSED && conns[i].fd >= 0)
            close(conns[i].fd);
    free(conns);
    return 0;
}

/* ------------------------------------------------------------------ stall mode */

static int run_stall(void)
{
    build_request();
    int *fds = calloc((size_t)O.conns, sizeof(int));
    int64_t *dropped_at = calloc((size_t)O.conns, sizeof(int64_t));
    if (fds == NULL || dropped_at == NULL)
        die("out of memory");
    int connected = 0;
    for (int i = 0; i < O.conns; i++) {
        fds[i] = open_conn(O.rcvbuf);
        if (fds[i] < 0 || send_request(fds[i]) < 0) {
            if (fds[i] >= 0)
                close(fds[i]);
            fds[i] = -1;
            continue;
        }
        connected++;
    }
    /* Wait (peeking, never consuming) until each has its response head. */
    int subscribed = 0;
    int64_t t_peek_end = now_ns(CLOCK_MONOTONIC) + 10000000000LL;
    char *seen = calloc((size_t)O.conns, 1);
    char peek[64];
    while (subscribed < connected && now_ns(CLOCK_MONOTONIC) < t_peek_end && !g_stop_signal) {
        for (int i = 0; i < O.conns; i++) {
            if (fds[i] < 0 || seen[i])
                continue;
            ssize_t r = recv(fds[i], peek, sizeof(peek), MSG_PEEK);
            if (r >= 12 && memcmp(peek, "HTTP/1.1 200", 12) == 0) {
                seen[i] = 1;
                subscribed++;
            }
        }
        usleep(2000);
    }
    for (int i = 0; i < O.conns; i++)
        if (fds[i] >= 0)
            ep_add(fds[i], EPOLLRDHUP, (uint64_t)i); /* no EPOLLIN: HUP/ERR/RDHUP only */
    int64_t start = now_ns(CLOCK_MONOTONIC);
    int64_t end = start + (int64_t)(O.duration * 1e9);
    double cpu0 = cpu_seconds();
    if (O.sync) {
        fprintf(stderr, "READY %d\n", subscribed);
        fflush(stderr);
    }
    vec_t drops = {0};
    struct epoll_event evs[MAX_EVENTS];
    int holding = 0;
    for (;;) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (!holding && (now >= end || g_stop_signal)) {
            if (!hold_after_window())
                break;
            holding = 1;
        }
        int timeout_ms = holding ? 100 : (int)((end - now) / 1000000) + 1;
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        int stop = 0;
        for (int e = 0; e < n; e++) {
            if (evs[e].data.u64 == STDIN_TAG) {
                stop |= stdin_line_ready();
                continue;
            }
            int i = (int)evs[e].data.u64;
            if (fds[i] < 0)
                continue;
            epoll_ctl(g_ep, EPOLL_CTL_DEL, fds[i], NULL);
            close(fds[i]);
            fds[i] = -1;
            dropped_at[i] = now_ns(CLOCK_MONOTONIC);
            if (!holding)
                vec_push(&drops, dropped_at[i] - start);
        }
        if (holding && (stop || g_stop_signal))
            break;
    }
    int still_open = 0;
    for (int i = 0; i < O.conns; i++) {
        if (fds[i] >= 0) {
            still_open++;
            close(fds[i]);
        }
    }
    double window = O.duration;
    printf("{\"mode\":\"stall\",\"conns\":%d,\"path\":\"%s\",\"rcvbuf\":%d,", O.conns, O.path, O.rcvbuf);
    print_common(cpu_seconds() - cpu0, window);
    printf(",\"connected\":%d,\"subscribed\":%d,\"duration_s\":%.3f,\"dropped_in_window\":%zu,\"open_at_end\":%d,", connected,
           subscribed, window, drops.n, still_open);
    print_dist("drop_after_s", &drops, 1e9);
    printf("}\n");
    free(fds);
    free(dropped_at);
    free(seen);
    return 0;
}

/* ------------------------------------------------------------------ serve mode */

static const char RESPONSE[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

static int run_serve(void)
{
    if (O.unix_path == NULL)
        die("serve needs --unix PATH");
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    if (strlen(O.unix_path) >= sizeof(un.sun_path))
        die("socket path too long");
    strcpy(un.sun_path, O.unix_path);
    unlink(O.unix_path);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&un, sizeof(un)) < 0 || listen(lfd, 1024) < 0)
        die("listen %s: %s", O.unix_path, strerror(errno));
    ep_add(lfd, EPOLLIN, UINT64_MAX - 1);
    /* Per fd: how many bytes of "\r\n\r\n" were matched at the end of the last read. */
    int cap = 65536;
    unsigned char *match = calloc((size_t)cap, 1);
    long long requests = 0;
    int64_t end = now_ns(CLOCK_MONOTONIC) + (int64_t)(O.duration * 1e9);
    double cpu0 = cpu_seconds();
    static char buf[READ_BUF];
    static char out[READ_BUF];
    struct epoll_event evs[MAX_EVENTS];
    while (!g_stop_signal) {
        int64_t now = now_ns(CLOCK_MONOTONIC);
        if (now >= end)
            break;
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, (int)((end - now) / 1000000) + 1);
        for (int e = 0; e < n; e++) {
            if (evs[e].data.u64 == UINT64_MAX - 1) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (fd >= cap) {
                        close(fd);
                        continue;
                    }
                    match[fd] = 0;
                    ep_add(fd, EPOLLIN, (uint64_t)fd);
                }
                continue;
            }
            int fd = (int)evs[e].data.u64;
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                epoll_ctl(g_ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                continue;
            }
            static const char term[] = "\r\n\r\n";
            size_t outlen = 0;
            int m = match[fd];
            for (ssize_t i = 0; i < r; i++) {
                if (buf[i] == term[m]) {
                    if (++m == 4) {
                        m = 0;
                        requests++;
                        if (outlen + sizeof(RESPONSE) - 1 > sizeof(out)) {
                            if (write(fd, out, outlen) < 0)
                                break;
                            outlen = 0;
                        }
                        memcpy(out + outlen, RESPONSE, sizeof(RESPONSE) - 1);
                        outlen += sizeof(RESPONSE) - 1;
                    }
                } else {
                    m = buf[i] == '\r' ? 1 : 0;
                }
            }
            match[fd] = (unsigned char)m;
            if (outlen > 0 && write(fd, out, outlen) < 0) {
                epoll_ctl(g_ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    printf("{\"mode\":\"serve\",\"requests\":%lld,\"cpu_s\":%.4f}\n", requests, cpu_seconds() - cpu0);
    unlink(O.unix_path);
    free(match);
    return 0;
}

/* ------------------------------------------------------------------ main */

static void usage(void) __attribute__((noreturn));
static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen http|sse|stall|serve (--unix PATH | --tcp 127.0.0.1:PORT) [--conns N]\n"
            "       [--duration S] [--count N] [--warmup S] [--method GET|POST] [--path P] [--path2 P2]\n"
            "       [--period-ms MS] [--batch K] [--rcvbuf B] [--sync] [--subscribe-timeout S]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    O.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const option_t *opt = NULL;
        for (size_t k = 0; k < sizeof(OPTIONS) / sizeof(OPTIONS[0]); k++)
            if (strcmp(argv[i], OPTIONS[k].name) == 0)
                opt = &OPTIONS[k];
        if (opt == NULL)
            usage();
        if (opt->kind == OPT_FLAG) {
            *(int *)opt->target = 1;
            continue;
        }
        if (++i >= argc)
            usage();
        const char *v = argv[i];
        switch (opt->kind) {
        case OPT_STR: *(const char **)opt->target = v; break;
        case OPT_INT: *(int *)opt->target = atoi(v); break;
        case OPT_LONG: *(long long *)opt->target = atoll(v); break;
        case OPT_DOUBLE: *(double *)opt->target = atof(v); break;
        default: usage();
        }
    }
    /* Bounded load: every mode stops by itself. */
    if (O.conns < 1 || O.conns > 10000 || O.duration <= 0 || O.duration > 600 || O.warmup < 0 || O.warmup > 60 ||
        O.batch < 1 || O.period_ms <= 0)
        die("options out of range (conns 1..10000, duration 0..600 s)");
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    raise_nofile();
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0)
        die("epoll_create1: %s", strerror(errno));
    if (strcmp(O.mode, "serve") == 0)
        return run_serve();
    resolve_target();
    if (strcmp(O.mode, "http") == 0)
        return run_http();
    if (strcmp(O.mode, "sse") == 0)
        return run_sse();
    if (strcmp(O.mode, "stall") == 0)
        return run_stall();
    usage();
}
