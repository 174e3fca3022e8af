/*
 * fakelib_state.h: the state file cache, its locking and the per-call
 * protocol (enter/leave) of a stand-in library; see fakelib.h for how to
 * include it.  Needs state_t (with `generation` and `inj`), default_state(),
 * parse_line() and render_state() declared before it.
 */
#ifndef FAKELIB_STATE_H
#define FAKELIB_STATE_H

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static state_t g_mem;  /* used when the state variable is unset */
static int g_mem_ready;
static state_t g_file; /* parsed copy of the state file */
static char g_file_path[PATH_MAX];
static int g_file_valid; /* g_file matches g_file_id */
static struct {
    int exists;
    dev_t dev;
    ino_t ino;
    off_t size;
    long long mtime_ns;
} g_file_id;
static int g_lock_fd = -1;
static char g_lock_path[PATH_MAX + 8];
static int g_flocked; /* the sidecar lock is held by the current call */
static int g_dirty;   /* the current call mutated state: leave() writes it */

static void parse_state(state_t *s, char *text)
{
    default_state(s);
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        size_t n = strlen(line);
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (line[0] == '\0' || line[0] == '#')
            continue;
        char *sp = strchr(line, ' ');
        if (sp == NULL)
            continue;
        *sp = '\0';
        long long x;
        if (strcmp(line, "generation") == 0) {
            if (parse_ll(sp + 1, &x) == 0)
                s->generation = x;
        } else if (!parse_injection(&s->inj, -1, line, sp + 1)) {
            parse_line(s, line, sp + 1);
        }
    }
}

static char *write_state_text(const state_t *s, size_t *len_out)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return NULL;
    fprintf(f, "# %s state (written by the stand-in library)\n", FAKE_NAME);
    fprintf(f, "generation %lld\n", s->generation);
    render_state(s, f);
    render_injections(f, &s->inj);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len_out = len;
    return buf;
}

static long long stat_mtime_ns(const struct stat *st)
{
    return (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

static void remember_file_id(const struct stat *st)
{
    g_file_id.exists = 1;
    g_file_id.dev = st->st_dev;
    g_file_id.ino = st->st_ino;
    g_file_id.size = st->st_size;
    g_file_id.mtime_ns = stat_mtime_ns(st);
}

/* Current state: the file's (reloaded if it changed) or the in-memory one. */
static state_t *load_state(const char *path)
{
    if (path == NULL || path[0] == '\0') {
        if (!g_mem_ready) {
            default_state(&g_mem);
            g_mem_ready = 1;
        }
        return &g_mem;
    }
    if (strcmp(path, g_file_path) != 0) {
        copy_str(g_file_path, sizeof(g_file_path), path);
        g_file_valid = 0;
    }
    struct stat st;
    int exists = stat(path, &st) == 0;
    if (g_file_valid && exists == g_file_id.exists &&
        (!exists || (st.st_dev == g_file_id.dev && st.st_ino == g_file_id.ino &&
                     st.st_size == g_file_id.size && stat_mtime_ns(&st) == g_file_id.mtime_ns)))
        return &g_file;
    if (!exists) {
        default_state(&g_file);
    } else {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            default_state(&g_file);
        } else {
            struct stat fst;
            if (fstat(fd, &fst) == 0)
                st = fst; /* identity of exactly what we read */
            size_t cap = (size_t)st.st_size + 1, len = 0;
            char *text = malloc(cap);
            if (text != NULL) {
                ssize_t r;
                while (len + 1 < cap && (r = read(fd, text + len, cap - 1 - len)) > 0)
                    len += (size_t)r;
                text[len] = '\0';
                parse_state(&g_file, text);
                free(text);
            } else {
                default_state(&g_file);
            }
            close(fd);
        }
    }
    if (exists)
        remember_file_id(&st);
    else
        g_file_id.exists = 0;
    g_file_valid = 1;
    return &g_file;
}

/* Write the file-backed state atomically; called with the exclusive flock held. */
static void save_state(const char *path, state_t *s)
{
    s->generation++;
    size_t len = 0;
    char *text = write_state_text(s, &len);
    if (text == NULL)
        return;
    char tmp[PATH_MAX + 64];
    snprintf(tmp, sizeof(tmp), "%s.tmp.%ld.%lx", path, (long)getpid(), (unsigned long)pthread_self());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        free(text);
        return;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    free(text);
    /* Strictly increasing mtime so a reader never mistakes a new file for a
     * cached one (inode numbers get reused, coarse clocks repeat). */
    long long mt = now_ns(CLOCK_REALTIME);
    if (g_file_id.exists && mt <= g_file_id.mtime_ns + 1000)
        mt = g_file_id.mtime_ns + 1000;
    struct timespec times[2];
    times[0].tv_sec = mt / 1000000000LL;
    times[0].tv_nsec = mt % 1000000000LL;
    times[1] = times[0];
    futimens(fd, times);
    struct stat st;
    int have = fstat(fd, &st) == 0;
    close(fd);
    if (off != len || rename(tmp, path) != 0) {
        unlink(tmp);
        g_file_valid = 0;
        return;
    }
    if (have) {
        remember_file_id(&st);
        g_file_valid = 1;
    } else {
        g_file_valid = 0;
    }
}

static const char *state_path(void)
{
    const char *p = getenv(FAKE_STATE_ENV);
    return (p != NULL && p[0] != '\0') ? p : NULL;
}

static void take_flock(const char *path, int exclusive)
{
    if (path == NULL)
        return;
    char want[PATH_MAX + 8];
    snprintf(want, sizeof(want), "%s.lock", path);
    if (g_lock_fd < 0 || strcmp(want, g_lock_path) != 0) {
        if (g_lock_fd >= 0)
            close(g_lock_fd);
        copy_str(g_lock_path, sizeof(g_lock_path), want);
        g_lock_fd = open(want, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (g_lock_fd < 0) /* e.g. a read-only directory: a shared lock still works */
            g_lock_fd = open(want, O_RDONLY | O_CLOEXEC);
    }
    if (g_lock_fd < 0)
        return;
    while (flock(g_lock_fd, exclusive ? LOCK_EX : LOCK_SH) != 0 && errno == EINTR) {
    }
    g_flocked = 1;
}

static void drop_flock(void)
{
    if (g_flocked && g_lock_fd >= 0)
        flock(g_lock_fd, LOCK_UN);
    g_flocked = 0;
}

/*
 * Start a call: lock, load state, honour an injected delay (sleeping with no
 * lock held, and waking early if the delay is cleared), then leave the mutex
 * and the sidecar flock held for the operation.  Returns the state.
 */
static state_t *enter(const char *fn, int gpu, int exclusive)
{
    long long start = now_ns(CLOCK_MONOTONIC);
    for (;;) {
        pthread_mutex_lock(&g_mu);
        g_dirty = 0;
        const char *path = state_path();
        take_flock(path, exclusive);
        state_t *s = load_state(path);
        long long delay_ms = lookup_inj(&s->inj, INJ_DELAY, gpu, fn, 0);
        if (delay_ms == 0)
            return s;
        long long remaining = delay_ms < 0 ? 20000000LL
                                           : start + delay_ms * 1000000LL - now_ns(CLOCK_MONOTONIC);
        if (remaining <= 0)
            return s;
        drop_flock();
        pthread_mutex_unlock(&g_mu);
        if (remaining > 20000000LL)
            remaining = 20000000LL; /* re-check every 20 ms */
        struct timespec ts = {(time_t)(remaining / 1000000000LL), (long)(remaining % 1000000000LL)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

/* End a call: write the state back if it changed, unlock, return `rc`. */
static int leave(state_t *s, int rc)
{
    const char *path = state_path();
    if (g_dirty && path != NULL && s == &g_file)
        save_state(path, s);
    g_dirty = 0;
    drop_flock();
    pthread_mutex_unlock(&g_mu);
    return rc;
}

#endif /* FAKELIB_STATE_H */
