/*
 * fakelib.h: what every stand-in driver library (fakenvml, fakeamdsmi) shares.
 *
 * A stand-in keeps its simulated GPUs in a text state file shared by every
 * process that loads it (daemon, client, test), logs each call, and honours
 * injected errors and delays.  This header holds that machinery once; the
 * including file supplies only what is specific to its driver API.
 *
 * Use it in two steps:
 *
 *   #define FAKE_STATE_ENV "FAKENVML_STATE"      path of the state file
 *   #define FAKE_LOG_ENV   "FAKENVML_LOG"        path of the call log
 *   #define FAKE_NAME      "fakenvml"            first line of a written file
 *   #define FAKE_EXTRA_INJ_KINDS "field_return"  (optional) kinds after error/delay
 *   #include "fakelib.h"        -> types, logging, injections, number parsing
 *
 *   typedef struct { ...; long long generation; inj_table_t inj; } state_t;
 *   static void default_state(state_t *s);
 *   static void parse_line(state_t *s, const char *key, const char *value);
 *   static void render_state(const state_t *s, FILE *f);
 *   #include "fakelib_state.h"  -> state file cache, locking, enter()/leave()
 *
 * State file protocol (shared with tests/fakelib/__init__.py): one `key value`
 * per line.  Writers hold an exclusive flock on the sidecar `<state>.lock`
 * (the state file is replaced by rename, so it cannot carry the lock), write a
 * temp file whose mtime is strictly greater than the previous one and rename
 * it over the state file; readers hold a shared flock.  The library re-parses
 * the file when its identity (device, inode, size, mtime_ns) changes.  Without
 * the state variable the library simulates its default GPUs in memory.
 *
 * Injections: `<kind>.<function> <value>` for every GPU (and system calls),
 * `gpu.<i>.<kind>.<function> <value>` for one GPU.  Kind `error` makes the call
 * return that status, kind `delay` makes it sleep that many milliseconds
 * before answering (-1: until the entry is cleared), re-checking the state
 * every 20 ms with no lock held.
 *
 * With the log variable set, every call appends `<function> <gpu or -1>
 * [args...]` with a single O_APPEND write(), so lines never interleave.
 */
#ifndef FAKELIB_H
#define FAKELIB_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
/* Helpers a given stand-in may not use must not trip -Werror=unused-function. */
#define FAKE_FN static __attribute__((unused))

#define MAX_GPUS 64
#define MAX_INJ 256
#define FN_LEN 64

enum { INJ_ERROR = 0, INJ_DELAY = 1 };

static const char *const inj_kind_names[] = {
    "error",
    "delay",
#ifdef FAKE_EXTRA_INJ_KINDS
    FAKE_EXTRA_INJ_KINDS,
#endif
};
#define N_INJ_KINDS ((int)(sizeof(inj_kind_names) / sizeof(inj_kind_names[0])))

typedef struct {
    int kind;
    int gpu;           /* -1: every GPU / global */
    char name[FN_LEN]; /* function name (or what the kind addresses) */
    long long value;
} inj_t;

typedef struct {
    int n;
    inj_t e[MAX_INJ];
} inj_table_t;

FAKE_FN long long now_ns(int clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

FAKE_FN void copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src);
}

FAKE_FN int parse_ll(const char *v, long long *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 0);
    if (errno != 0 || end == v)
        return -1;
    *out = x;
    return 0;
}

/* In an X-macro over integer fields: store `value` in obj->f when `key` names f, and return. */
#define FAKE_SET_IF(obj, key, value, f)                                                            \
    if (strcmp((key), #f) == 0) {                                                                  \
        (obj)->f = (value);                                                                        \
        return;                                                                                    \
    }

/* ---- call log ---- */

static void log_call(const char *fn, int gpu, const char *fmt, ...) __attribute__((format(printf, 3, 4), unused));

static void log_call(const char *fn, int gpu, const char *fmt, ...)
{
    const char *path = getenv(FAKE_LOG_ENV);
    if (path == NULL || path[0] == '\0')
        return;
    char buf[1024];
    size_t cap = sizeof(buf) - 1; /* room for the newline */
    int n = snprintf(buf, cap, "%s %d", fn, gpu);
    if (n < 0)
        return;
    size_t len = (size_t)n < cap ? (size_t)n : cap - 1;
    if (fmt != NULL && fmt[0] != '\0' && len + 1 < cap) {
        buf[len++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(buf + len, cap - len, fmt, ap);
        va_end(ap);
        if (m > 0)
            len += (size_t)m < cap - len ? (size_t)m : cap - len - 1;
    }
    buf[len++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0)
        return;
    if (write(fd, buf, len) < 0) {
        /* nothing sensible to do: logging must never break a call */
    }
    close(fd);
}

/* ---- injections ---- */

FAKE_FN inj_t *find_inj(inj_table_t *t, int kind, int gpu, const char *name)
{
    for (int i = 0; i < t->n; i++) {
        inj_t *e = &t->e[i];
        if (e->kind == kind && e->gpu == gpu && strcmp(e->name, name) == 0)
            return e;
    }
    return NULL;
}

FAKE_FN void add_inj(inj_table_t *t, int kind, int gpu, const char *name, long long value)
{
    inj_t *e = find_inj(t, kind, gpu, name);
    if (e == NULL) {
        if (t->n >= MAX_INJ)
            return;
        e = &t->e[t->n++];
        e->kind = kind;
        e->gpu = gpu;
        copy_str(e->name, sizeof(e->name), name);
    }
    e->value = value;
}

/* The GPU's own entry, else the one for every GPU, else `dflt`. */
FAKE_FN long long lookup_inj(inj_table_t *t, int kind, int gpu, const char *name, long long dflt)
{
    inj_t *e = NULL;
    if (gpu >= 0)
        e = find_inj(t, kind, gpu, name);
    if (e == NULL)
        e = find_inj(t, kind, -1, name);
    return e != NULL ? e->value : dflt;
}

/* `key` is `<kind>.<name>` (after any `gpu.<i>.`): record it and return 1, else 0. */
FAKE_FN int parse_injection(inj_table_t *t, int gpu, const char *key, const char *v)
{
    long long x;
    for (int kind = 0; kind < N_INJ_KINDS; kind++) {
        size_t n = strlen(inj_kind_names[kind]);
        if (strncmp(key, inj_kind_names[kind], n) == 0 && key[n] == '.') {
            if (parse_ll(v, &x) == 0)
                add_inj(t, kind, gpu, key + n + 1, x);
            return 1;
        }
    }
    return 0;
}

FAKE_FN void render_injections(FILE *f, const inj_table_t *t)
{
    for (int i = 0; i < t->n; i++) {
        const inj_t *e = &t->e[i];
        if (e->gpu < 0)
            fprintf(f, "%s.%s %lld\n", inj_kind_names[e->kind], e->name, e->value);
        else
            fprintf(f, "gpu.%d.%s.%s %lld\n", e->gpu, inj_kind_names[e->kind], e->name, e->value);
    }
}

/* `gpu.<i>.<rest>`: the index (or -1 when malformed), `*rest` set past the dot. */
FAKE_FN int parse_gpu_prefix(const char *key, const char **rest)
{
    if (strncmp(key, "gpu.", 4) != 0)
        return -1;
    char *end;
    long idx = strtol(key + 4, &end, 10);
    if (end == key + 4 || *end != '.' || idx < 0 || idx >= MAX_GPUS)
        return -1;
    *rest = end + 1;
    return (int)idx;
}

#endif /* FAKELIB_H */
