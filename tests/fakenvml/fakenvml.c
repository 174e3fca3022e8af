/*
 * fakenvml: a stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * The real pynvml (nvidia-ml-py) loads this library exactly like the real one,
 * so the daemon, its NVML backend and the official Zeus client all run their
 * real code paths against simulated H100-like GPUs.
 *
 * State lives in a small text file (env FAKENVML_STATE, re-read with getenv on
 * every call) so that several processes (daemon, Zeus client, test process)
 * share one set of GPUs and tests can inspect/modify it between calls.  Format,
 * one `key value` per line:
 *
 *   count 4                       number of GPUs (max 64)
 *   init_error 0                  return code of nvmlInit* (0 = works)
 *   driver_version 550.54.15
 *   nvml_version 12.550.54.15
 *   cuda_driver_version 12040
 *   generation 7                  bumped on every write (informational)
 *   gpu.<i>.<property> <value>    see gpu_t / GPU_INT_FIELDS / write_state_text()
 *   error.<function> <code>       injected return code for every GPU
 *   gpu.<i>.error.<function> <code>
 *   delay.<function> <ms>         sleep before answering (-1: until cleared)
 *   gpu.<i>.delay.<function> <ms>
 *   gpu.<i>.field_return.<fieldId> <code>   per-field nvmlReturn override
 *
 * The library caches the parsed file and re-reads it when its identity
 * (device, inode, size, mtime_ns) changes.  Writers (this library and the
 * Python helper) hold an exclusive flock on the sidecar file
 * `<state>.lock` (the state file itself is replaced by rename, so it cannot
 * carry the lock), write a temp file, give it an mtime strictly greater than
 * the previous one and rename it over the state file.  Readers hold a shared
 * flock on the same sidecar.  Without FAKENVML_STATE the library simulates 4
 * default GPUs in memory.
 *
 * If FAKENVML_LOG is set, every call appends one line
 * `<function> <gpu index or -1> [args...]` to that file with a single
 * O_APPEND write(), so lines from concurrent threads/processes never mix.
 */
#define _GNU_SOURCE
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

/* ---- NVML types and constants (ABI-compatible with nvml.h) ---- */

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_UNKNOWN = 999,
};

enum {
    NVML_VALUE_TYPE_DOUBLE = 0,
    NVML_VALUE_TYPE_UNSIGNED_INT = 1,
    NVML_VALUE_TYPE_UNSIGNED_LONG = 2,
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3,
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4,
    NVML_VALUE_TYPE_SIGNED_INT = 5,
    NVML_VALUE_TYPE_UNSIGNED_SHORT = 6,
};

#define NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION 83
#define NVML_FI_DEV_POWER_AVERAGE 185
#define NVML_FI_DEV_POWER_INSTANT 186

#define NVML_POWER_SCOPE_GPU 0
#define NVML_POWER_SCOPE_MODULE 1
#define NVML_POWER_SCOPE_MEMORY 2

#define NVML_CLOCK_GRAPHICS 0
#define NVML_CLOCK_SM 1
#define NVML_CLOCK_MEM 2
#define NVML_CLOCK_VIDEO 3

#define NVML_TEMPERATURE_V1 0x100000Cu
#define NVML_MEMORY_V2 0x02000028u

typedef union {
    double dVal;
    int siVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    int valueType;
    int nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

/* nvmlPciInfo_t as returned by nvmlDeviceGetPciInfo_v3. */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

/* Layout used by nvmlDeviceGetPciInfo (v1) and nvmlDeviceGetPciInfo_v2. */
typedef struct {
    char busId[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    unsigned int reserved0, reserved1, reserved2, reserved3;
} nvmlPciInfo_v2_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int version;
    int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

typedef struct {
    unsigned int isC2cEnabled;
} nvmlC2cModeInfo_v1_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

struct fake_device {
    int index;
};
typedef struct fake_device *nvmlDevice_t;

/* ---- simulated state ---- */

#define MAX_GPUS 64
#define MAX_INJ 256
#define NAME_LEN 96
#define FN_LEN 64

enum inj_kind { INJ_ERROR = 0, INJ_DELAY = 1, INJ_FIELD = 2 };

typedef struct {
    int kind;
    int gpu; /* -1: every GPU / global */
    char name[FN_LEN]; /* function name, or field id for INJ_FIELD */
    long long value;
} inj_t;

/* A locked clock range (nvmlDeviceSet*LockedClocks), or none. */
typedef struct {
    long long locked, min, max;
} clock_lock_t;

typedef struct {
    char name[NAME_LEN];
    char uuid[NAME_LEN];
    char serial[32];
    long long pci_domain, pci_bus, pci_device, pci_device_id, pci_subsystem_id;
    long long power_mw; /* instant power (field 186); may exceed 32 bits */
    long long power_wobble_mw; /* added to every other field-186 read in a process (0: constant) */
    long long power_value_type;
    long long avg_power_mw; /* nvmlDeviceGetPowerUsage, field 185 */
    long long mem_power_mw; /* field 185/186 with memory scope */
    long long energy_mj, energy_step_mj;
    long long power_limit_mw, min_power_limit_mw, max_power_limit_mw, default_power_limit_mw;
    long long persistence_mode;
    clock_lock_t gpu_lock, mem_lock; /* graphics and memory locked clocks */
    long long instant_power_supported, power_usage_supported, energy_supported;
    long long lost;
    long long temperature_c;
    long long architecture;
    long long c2c_enabled;
} gpu_t;

typedef struct {
    long long count;
    long long init_error;
    long long generation;
    long long cuda_driver_version;
    char driver_version[80];
    char nvml_version[80];
    gpu_t gpus[MAX_GPUS];
    int ninj;
    inj_t inj[MAX_INJ];
} state_t;

static const long long MEMORY_CLOCK_MHZ = 2619;
static const long long MAX_GRAPHICS_CLOCK_MHZ = 1980;
static const long long MIN_GRAPHICS_CLOCK_MHZ = 345;
static const long long GRAPHICS_CLOCK_STEP_MHZ = 15;
static const unsigned long long MEMORY_TOTAL_BYTES = 85520809984ULL; /* 81559 MiB */
static const unsigned long long MEMORY_RESERVED_BYTES = 553648128ULL;
static const unsigned long long MEMORY_USED_BYTES = 1048576ULL * 4;

static void default_gpu(gpu_t *g, int i)
{
    memset(g, 0, sizeof(*g));
    snprintf(g->name, sizeof(g->name), "NVIDIA H100 80GB HBM3");
    snprintf(g->uuid, sizeof(g->uuid), "GPU-fa4e0c1d-5eed-4c0f-9e1a-%012x", 0x1000 + i);
    snprintf(g->serial, sizeof(g->serial), "1652322%06d", 1000 + i);
    g->pci_domain = 0;
    g->pci_bus = 0x18 + i;
    g->pci_device = 0;
    g->pci_device_id = 0x233010DE;
    g->pci_subsystem_id = 0x16C110DE;
    g->power_mw = 150000;
    g->power_value_type = NVML_VALUE_TYPE_UNSIGNED_INT;
    g->avg_power_mw = 140000;
    g->mem_power_mw = 30000;
    g->energy_mj = 500000;
    g->energy_step_mj = 0;
    g->power_limit_mw = 700000;
    g->min_power_limit_mw = 200000;
    g->max_power_limit_mw = 700000;
    g->default_power_limit_mw = 700000;
    g->persistence_mode = 0;
    g->instant_power_supported = 1;
    g->power_usage_supported = 1;
    g->energy_supported = 1;
    g->temperature_c = 40;
    g->architecture = 9; /* NVML_DEVICE_ARCH_HOPPER */
}

static void default_state(state_t *s)
{
    memset(s, 0, sizeof(*s));
    s->count = 4;
    s->cuda_driver_version = 12040;
    snprintf(s->driver_version, sizeof(s->driver_version), "550.54.15");
    snprintf(s->nvml_version, sizeof(s->nvml_version), "12.550.54.15");
    for (int i = 0; i < MAX_GPUS; i++)
        default_gpu(&s->gpus[i], i);
}

/* Integer properties of a GPU, by state-file key. */
#define GPU_INT_FIELDS(X)                                                                          \
    X(pci_domain)                                                                                  \
    X(pci_bus)                                                                                     \
    X(pci_device)                                                                                  \
    X(pci_device_id)                                                                               \
    X(pci_subsystem_id)                                                                            \
    X(power_mw)                                                                                    \
    X(power_wobble_mw)                                                                             \
    X(power_value_type)                                                                            \
    X(avg_power_mw)                                                                                \
    X(mem_power_mw)                                                                                \
    X(energy_mj)                                                                                   \
    X(energy_step_mj)                                                                              \
    X(power_limit_mw)                                                                              \
    X(min_power_limit_mw)                                                                          \
    X(max_power_limit_mw)                                                                          \
    X(default_power_limit_mw)                                                                      \
    X(persistence_mode)                                                                            \
    X(instant_power_supported)                                                                     \
    X(power_usage_supported)                                                                       \
    X(energy_supported)                                                                            \
    X(lost)                                                                                        \
    X(temperature_c)                                                                               \
    X(architecture)                                                                                \
    X(c2c_enabled)

/* ---- process-wide bookkeeping ---- */

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static struct fake_device g_devices[MAX_GPUS];
static unsigned long long g_instant_reads[MAX_GPUS]; /* per process, for power_wobble_mw */
static int g_init_count;

static state_t g_mem;       /* used when FAKENVML_STATE is unset */
static int g_mem_ready;
static state_t g_file;      /* parsed copy of the state file */
static char g_file_path[PATH_MAX];
static int g_file_valid;    /* g_file matches g_file_id */
static struct {
    int exists;
    dev_t dev;
    ino_t ino;
    off_t size;
    long long mtime_ns;
} g_file_id;
static int g_lock_fd = -1;
static char g_lock_path[PATH_MAX + 8];

static int g_flocked;   /* the sidecar lock is held by the current call */
static int g_dirty;     /* the current call mutated state */

static long long now_ns(int clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- call log ---- */

static void log_call(const char *fn, int gpu, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void log_call(const char *fn, int gpu, const char *fmt, ...)
{
    const char *path = getenv("FAKENVML_LOG");
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

/* ---- state file parsing / writing ---- */

static void copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src);
}

static inj_t *find_inj(state_t *s, int kind, int gpu, const char *name)
{
    for (int i = 0; i < s->ninj; i++) {
        inj_t *e = &s->inj[i];
        if (e->kind == kind && e->gpu == gpu && strcmp(e->name, name) == 0)
            return e;
    }
    return NULL;
}

static void add_inj(state_t *s, int kind, int gpu, const char *name, long long value)
{
    inj_t *e = find_inj(s, kind, gpu, name);
    if (e == NULL) {
        if (s->ninj >= MAX_INJ)
            return;
        e = &s->inj[s->ninj++];
        e->kind = kind;
        e->gpu = gpu;
        copy_str(e->name, sizeof(e->name), name);
    }
    e->value = value;
}

static int parse_ll(const char *v, long long *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 0);
    if (errno != 0 || end == v)
        return -1;
    *out = x;
    return 0;
}

static void lock_clocks(clock_lock_t *lock, long long lo, long long hi)
{
    lock->locked = 1;
    lock->min = lo;
    lock->max = hi;
}

static void unlock_clocks(clock_lock_t *lock)
{
    lock->locked = 0;
    lock->min = 0;
    lock->max = 0;
}

/* State file form: "<min> <max>" when locked, anything else ("none") when not. */
static void parse_clocks(const char *v, clock_lock_t *lock)
{
    long long a, b;
    if (sscanf(v, "%lld %lld", &a, &b) == 2)
        lock_clocks(lock, a, b);
    else
        unlock_clocks(lock);
}

static void render_clocks(FILE *f, int i, const char *key, const clock_lock_t *lock)
{
    if (lock->locked)
        fprintf(f, "gpu.%d.%s %lld %lld\n", i, key, lock->min, lock->max);
    else
        fprintf(f, "gpu.%d.%s none\n", i, key);
}

static void parse_gpu_key(state_t *s, int i, const char *key, const char *v)
{
    gpu_t *g = &s->gpus[i];
    long long x;
    if (strcmp(key, "name") == 0) {
        copy_str(g->name, sizeof(g->name), v);
        return;
    }
    if (strcmp(key, "uuid") == 0) {
        copy_str(g->uuid, sizeof(g->uuid), v);
        return;
    }
    if (strcmp(key, "serial") == 0) {
        copy_str(g->serial, sizeof(g->serial), v);
        return;
    }
    if (strcmp(key, "gpu_locked_clocks") == 0) {
        parse_clocks(v, &g->gpu_lock);
        return;
    }
    if (strcmp(key, "mem_locked_clocks") == 0) {
        parse_clocks(v, &g->mem_lock);
        return;
    }
    if (strncmp(key, "error.", 6) == 0 && parse_ll(v, &x) == 0) {
        add_inj(s, INJ_ERROR, i, key + 6, x);
        return;
    }
    if (strncmp(key, "delay.", 6) == 0 && parse_ll(v, &x) == 0) {
        add_inj(s, INJ_DELAY, i, key + 6, x);
        return;
    }
    if (strncmp(key, "field_return.", 13) == 0 && parse_ll(v, &x) == 0) {
        add_inj(s, INJ_FIELD, i, key + 13, x);
        return;
    }
    if (parse_ll(v, &x) != 0)
        return;
#define SET_INT(f)                                                                                 \
    if (strcmp(key, #f) == 0) {                                                                    \
        g->f = x;                                                                                  \
        return;                                                                                    \
    }
    GPU_INT_FIELDS(SET_INT)
#undef SET_INT
}

static void parse_line(state_t *s, char *line)
{
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    if (line[0] == '\0' || line[0] == '#')
        return;
    char *sp = strchr(line, ' ');
    if (sp == NULL)
        return;
    *sp = '\0';
    const char *key = line;
    const char *v = sp + 1;
    long long x;
    if (strncmp(key, "gpu.", 4) == 0) {
        char *end;
        long idx = strtol(key + 4, &end, 10);
        if (end == key + 4 || *end != '.' || idx < 0 || idx >= MAX_GPUS)
            return;
        parse_gpu_key(s, (int)idx, end + 1, v);
        return;
    }
    if (strcmp(key, "driver_version") == 0) {
        copy_str(s->driver_version, sizeof(s->driver_version), v);
        return;
    }
    if (strcmp(key, "nvml_version") == 0) {
        copy_str(s->nvml_version, sizeof(s->nvml_version), v);
        return;
    }
    if (parse_ll(v, &x) != 0)
        return;
    if (strcmp(key, "count") == 0)
        s->count = x < 0 ? 0 : (x > MAX_GPUS ? MAX_GPUS : x);
    else if (strcmp(key, "init_error") == 0)
        s->init_error = x;
    else if (strcmp(key, "generation") == 0)
        s->generation = x;
    else if (strcmp(key, "cuda_driver_version") == 0)
        s->cuda_driver_version = x;
    else if (strncmp(key, "error.", 6) == 0)
        add_inj(s, INJ_ERROR, -1, key + 6, x);
    else if (strncmp(key, "delay.", 6) == 0)
        add_inj(s, INJ_DELAY, -1, key + 6, x);
}

static void parse_state(state_t *s, char *text)
{
    default_state(s);
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save))
        parse_line(s, line);
}

static char *write_state_text(const state_t *s, size_t *len_out)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return NULL;
    fprintf(f, "# fakenvml state (written by libnvidia-ml fake)\n");
    fprintf(f, "generation %lld\n", s->generation);
    fprintf(f, "count %lld\n", s->count);
    fprintf(f, "init_error %lld\n", s->init_error);
    fprintf(f, "driver_version %s\n", s->driver_version);
    fprintf(f, "nvml_version %s\n", s->nvml_version);
    fprintf(f, "cuda_driver_version %lld\n", s->cuda_driver_version);
    for (int i = 0; i < s->count; i++) {
        const gpu_t *g = &s->gpus[i];
        fprintf(f, "gpu.%d.name %s\n", i, g->name);
        fprintf(f, "gpu.%d.uuid %s\n", i, g->uuid);
        fprintf(f, "gpu.%d.serial %s\n", i, g->serial);
#define PUT_INT(fld) fprintf(f, "gpu.%d." #fld " %lld\n", i, g->fld);
        GPU_INT_FIELDS(PUT_INT)
#undef PUT_INT
        render_clocks(f, i, "gpu_locked_clocks", &g->gpu_lock);
        render_clocks(f, i, "mem_locked_clocks", &g->mem_lock);
    }
    static const char *const kind_names[] = {"error", "delay", "field_return"};
    for (int i = 0; i < s->ninj; i++) {
        const inj_t *e = &s->inj[i];
        if (e->gpu < 0)
            fprintf(f, "%s.%s %lld\n", kind_names[e->kind], e->name, e->value);
        else
            fprintf(f, "gpu.%d.%s.%s %lld\n", e->gpu, kind_names[e->kind], e->name, e->value);
    }
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    *len_out = len;
    return buf;
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
                     st.st_size == g_file_id.size &&
                     (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec ==
                         g_file_id.mtime_ns)))
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
    g_file_id.exists = exists;
    if (exists) {
        g_file_id.dev = st.st_dev;
        g_file_id.ino = st.st_ino;
        g_file_id.size = st.st_size;
        g_file_id.mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    }
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
        g_file_id.exists = 1;
        g_file_id.dev = st.st_dev;
        g_file_id.ino = st.st_ino;
        g_file_id.size = st.st_size;
        g_file_id.mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        g_file_valid = 1;
    } else {
        g_file_valid = 0;
    }
}

/* ---- per-call protocol ---- */

static const char *state_path(void)
{
    const char *p = getenv("FAKENVML_STATE");
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

static long long lookup_inj(state_t *s, int kind, int gpu, const char *name, long long dflt)
{
    inj_t *e = NULL;
    if (gpu >= 0)
        e = find_inj(s, kind, gpu, name);
    if (e == NULL)
        e = find_inj(s, kind, -1, name);
    return e != NULL ? e->value : dflt;
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
        long long delay_ms = lookup_inj(s, INJ_DELAY, gpu, fn, 0);
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

static nvmlReturn_t leave(state_t *s, nvmlReturn_t rc)
{
    const char *path = state_path();
    if (g_dirty && path != NULL && s == &g_file)
        save_state(path, s);
    g_dirty = 0;
    drop_flock();
    pthread_mutex_unlock(&g_mu);
    return rc;
}

static int device_index(nvmlDevice_t dev)
{
    uintptr_t p = (uintptr_t)dev, base = (uintptr_t)&g_devices[0];
    if (p < base || p >= base + sizeof(g_devices) || (p - base) % sizeof(g_devices[0]) != 0)
        return -1;
    return (int)((p - base) / sizeof(g_devices[0]));
}

/* Checks shared by every per-device call; 0 when the operation may run. */
static nvmlReturn_t device_checks(state_t *s, const char *fn, int gpu)
{
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (gpu < 0 || gpu >= s->count)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (s->gpus[gpu].lost)
        return NVML_ERROR_GPU_IS_LOST;
    return (nvmlReturn_t)lookup_inj(s, INJ_ERROR, gpu, fn, NVML_SUCCESS);
}

static nvmlReturn_t system_checks(state_t *s, const char *fn)
{
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return (nvmlReturn_t)lookup_inj(s, INJ_ERROR, -1, fn, NVML_SUCCESS);
}

/* Boilerplate for a device call: log, enter, checks; `g` is the gpu_t. */
#define DEVICE_CALL(exclusive, fmt, ...)                                                           \
    int gi = device_index(device);                                                                 \
    log_call(__func__, gi, fmt, ##__VA_ARGS__);                                                    \
    state_t *s = enter(__func__, gi, exclusive);                                                   \
    nvmlReturn_t rc = device_checks(s, __func__, gi);                                              \
    if (rc != NVML_SUCCESS)                                                                        \
        return leave(s, rc);                                                                       \
    gpu_t *g = &s->gpus[gi];                                                                       \
    (void)g

#define SYSTEM_CALL(fmt, ...)                                                                      \
    log_call(__func__, -1, fmt, ##__VA_ARGS__);                                                    \
    state_t *s = enter(__func__, -1, 0);                                                           \
    nvmlReturn_t rc = system_checks(s, __func__);                                                  \
    if (rc != NVML_SUCCESS)                                                                        \
        return leave(s, rc)

static nvmlReturn_t put_string(char *dst, unsigned int length, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    size_t n = strlen(src);
    if (length < n + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

/* ---- marker so tests can prove this library is the one loaded ---- */

EXPORT const char *fakenvmlIdentify(void)
{
    return "fakenvml";
}

/* ---- init / shutdown / errors ---- */

static nvmlReturn_t do_init(const char *fn)
{
    state_t *s = enter(fn, -1, 0);
    nvmlReturn_t rc = (nvmlReturn_t)s->init_error;
    if (rc == NVML_SUCCESS)
        rc = (nvmlReturn_t)lookup_inj(s, INJ_ERROR, -1, fn, NVML_SUCCESS);
    if (rc == NVML_SUCCESS)
        g_init_count++;
    return leave(s, rc);
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    log_call(__func__, -1, "%u", flags);
    return do_init(__func__);
}

EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    log_call(__func__, -1, NULL);
    return do_init(__func__);
}

EXPORT nvmlReturn_t nvmlInit(void)
{
    log_call(__func__, -1, NULL);
    return do_init(__func__);
}

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    log_call(__func__, -1, NULL);
    state_t *s = enter(__func__, -1, 0);
    nvmlReturn_t rc = (nvmlReturn_t)lookup_inj(s, INJ_ERROR, -1, __func__, NVML_SUCCESS);
    if (rc == NVML_SUCCESS) {
        if (g_init_count <= 0)
            rc = NVML_ERROR_UNINITIALIZED;
        else
            g_init_count--;
    }
    return leave(s, rc);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    log_call(__func__, -1, "%d", result);
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* ---- system queries ---- */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    SYSTEM_CALL("%u", length);
    return leave(s, put_string(version, length, s->driver_version));
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    SYSTEM_CALL("%u", length);
    return leave(s, put_string(version, length, s->nvml_version));
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    SYSTEM_CALL(NULL);
    if (cudaDriverVersion == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *cudaDriverVersion = (int)s->cuda_driver_version;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    SYSTEM_CALL(NULL);
    if (cudaDriverVersion == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *cudaDriverVersion = (int)s->cuda_driver_version;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    SYSTEM_CALL(NULL);
    if (deviceCount == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *deviceCount = (unsigned int)s->count;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    SYSTEM_CALL(NULL);
    if (deviceCount == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *deviceCount = (unsigned int)s->count;
    return leave(s, NVML_SUCCESS);
}

/* ---- handles ---- */

static nvmlReturn_t handle_by_index(const char *fn, unsigned int index, nvmlDevice_t *device)
{
    int gi = index < MAX_GPUS ? (int)index : -1;
    log_call(fn, gi, "%u", index);
    state_t *s = enter(fn, gi, 0);
    if (g_init_count <= 0)
        return leave(s, NVML_ERROR_UNINITIALIZED);
    if (device == NULL || gi < 0 || gi >= s->count)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    nvmlReturn_t rc = device_checks(s, fn, gi);
    if (rc != NVML_SUCCESS)
        return leave(s, rc);
    g_devices[gi].index = gi;
    *device = &g_devices[gi];
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(__func__, index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return handle_by_index(__func__, index, device);
}

static void format_bus_id(const gpu_t *g, char *dst, size_t cap, int legacy)
{
    if (legacy)
        snprintf(dst, cap, "%04X:%02X:%02X.0", (unsigned)g->pci_domain & 0xFFFFu,
                 (unsigned)g->pci_bus & 0xFFu, (unsigned)g->pci_device & 0xFFu);
    else
        snprintf(dst, cap, "%08X:%02X:%02X.0", (unsigned)g->pci_domain, (unsigned)g->pci_bus & 0xFFu,
                 (unsigned)g->pci_device & 0xFFu);
}

static nvmlReturn_t handle_by_match(const char *fn, const char *key, int by_uuid, nvmlDevice_t *device)
{
    log_call(fn, -1, "%s", key != NULL ? key : "(null)");
    state_t *s = enter(fn, -1, 0);
    nvmlReturn_t rc = system_checks(s, fn);
    if (rc != NVML_SUCCESS)
        return leave(s, rc);
    if (key == NULL || device == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < s->count; i++) {
        char bus[32], legacy[16];
        format_bus_id(&s->gpus[i], bus, sizeof(bus), 0);
        format_bus_id(&s->gpus[i], legacy, sizeof(legacy), 1);
        int hit = by_uuid ? strcmp(key, s->gpus[i].uuid) == 0
                          : (strcasecmp(key, bus) == 0 || strcasecmp(key, legacy) == 0);
        if (hit) {
            if (s->gpus[i].lost)
                return leave(s, NVML_ERROR_GPU_IS_LOST);
            g_devices[i].index = i;
            *device = &g_devices[i];
            return leave(s, NVML_SUCCESS);
        }
    }
    return leave(s, NVML_ERROR_NOT_FOUND);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    return handle_by_match(__func__, uuid, 1, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    return handle_by_match(__func__, pciBusId, 0, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    DEVICE_CALL(0, NULL);
    if (index == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned int)gi;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    DEVICE_CALL(0, NULL);
    if (minorNumber == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *minorNumber = (unsigned int)gi;
    return leave(s, NVML_SUCCESS);
}

/* ---- identity ---- */

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    DEVICE_CALL(0, "%u", length);
    return leave(s, put_string(name, length, g->name));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    DEVICE_CALL(0, "%u", length);
    return leave(s, put_string(uuid, length, g->uuid));
}

EXPORT nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    DEVICE_CALL(0, "%u", length);
    return leave(s, put_string(serial, length, g->serial));
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    DEVICE_CALL(0, NULL);
    if (pci == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    memset(pci, 0, sizeof(*pci));
    format_bus_id(g, pci->busIdLegacy, sizeof(pci->busIdLegacy), 1);
    format_bus_id(g, pci->busId, sizeof(pci->busId), 0);
    pci->domain = (unsigned int)g->pci_domain;
    pci->bus = (unsigned int)g->pci_bus;
    pci->device = (unsigned int)g->pci_device;
    pci->pciDeviceId = (unsigned int)g->pci_device_id;
    pci->pciSubSystemId = (unsigned int)g->pci_subsystem_id;
    return leave(s, NVML_SUCCESS);
}

static nvmlReturn_t pci_info_v2(const char *fn, nvmlDevice_t device, nvmlPciInfo_v2_t *pci)
{
    int gi = device_index(device);
    log_call(fn, gi, NULL);
    state_t *s = enter(fn, gi, 0);
    nvmlReturn_t rc = device_checks(s, fn, gi);
    if (rc != NVML_SUCCESS)
        return leave(s, rc);
    if (pci == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    const gpu_t *g = &s->gpus[gi];
    memset(pci, 0, sizeof(*pci));
    format_bus_id(g, pci->busId, sizeof(pci->busId), 1);
    pci->domain = (unsigned int)g->pci_domain;
    pci->bus = (unsigned int)g->pci_bus;
    pci->device = (unsigned int)g->pci_device;
    pci->pciDeviceId = (unsigned int)g->pci_device_id;
    pci->pciSubSystemId = (unsigned int)g->pci_subsystem_id;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_v2_t *pci)
{
    return pci_info_v2(__func__, device, pci);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_v2_t *pci)
{
    return pci_info_v2(__func__, device, pci);
}

EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch)
{
    DEVICE_CALL(0, NULL);
    if (arch == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *arch = (unsigned int)g->architecture;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    DEVICE_CALL(0, NULL);
    if (major == NULL || minor == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *major = 9;
    *minor = 0;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetC2cModeInfoV(nvmlDevice_t device, nvmlC2cModeInfo_v1_t *info)
{
    DEVICE_CALL(0, NULL);
    if (info == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    info->isC2cEnabled = (unsigned int)g->c2c_enabled;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetBrand(nvmlDevice_t device, unsigned int *type)
{
    DEVICE_CALL(0, NULL);
    if (type == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *type = 2; /* NVML_BRAND_TESLA */
    return leave(s, NVML_SUCCESS);
}

/* ---- power and energy ---- */

static long long now_us_realtime(void)
{
    return now_ns(CLOCK_REALTIME) / 1000;
}

static void fill_power_field(nvmlFieldValue_t *v, long long mw, int value_type)
{
    v->valueType = value_type;
    switch (value_type) {
    case NVML_VALUE_TYPE_DOUBLE: v->value.dVal = (double)mw; break;
    case NVML_VALUE_TYPE_UNSIGNED_INT: v->value.uiVal = (unsigned int)mw; break;
    case NVML_VALUE_TYPE_UNSIGNED_LONG: v->value.ulVal = (unsigned long)mw; break;
    case NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: v->value.ullVal = (unsigned long long)mw; break;
    case NVML_VALUE_TYPE_SIGNED_LONG_LONG: v->value.sllVal = mw; break;
    case NVML_VALUE_TYPE_SIGNED_INT: v->value.siVal = (int)mw; break;
    case NVML_VALUE_TYPE_UNSIGNED_SHORT: v->value.usVal = (unsigned short)mw; break;
    default: v->value.ullVal = (unsigned long long)mw; break;
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount, nvmlFieldValue_t *values)
{
    char args[512];
    size_t used = 0;
    args[0] = '\0';
    for (int i = 0; values != NULL && i < valuesCount && used + 24 < sizeof(args); i++) {
        int n = snprintf(args + used, sizeof(args) - used, "%s%u:%u", i ? " " : "", values[i].fieldId,
                         values[i].scopeId);
        if (n > 0)
            used += (size_t)n;
    }
    DEVICE_CALL(0, "%s", args);
    if (values == NULL || valuesCount <= 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    long long ts = now_us_realtime();
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = ts;
        v->latencyUsec = 0;
        v->value.ullVal = 0;
        char id[16];
        snprintf(id, sizeof(id), "%u", v->fieldId);
        long long forced = lookup_inj(s, INJ_FIELD, gi, id, 0);
        if (forced != 0) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = (int)forced;
            continue;
        }
        v->nvmlReturn = NVML_SUCCESS;
        int memory_scope = v->scopeId == NVML_POWER_SCOPE_MEMORY;
        int known_scope = v->scopeId <= NVML_POWER_SCOPE_MEMORY;
        switch (v->fieldId) {
        case NVML_FI_DEV_POWER_INSTANT:
            if (!g->instant_power_supported || !known_scope)
                v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            else if (memory_scope)
                fill_power_field(v, g->mem_power_mw, NVML_VALUE_TYPE_UNSIGNED_INT);
            else
                fill_power_field(v, g->power_mw + (g_instant_reads[gi]++ % 2) * g->power_wobble_mw,
                                 (int)g->power_value_type);
            break;
        case NVML_FI_DEV_POWER_AVERAGE:
            if (!g->power_usage_supported || !known_scope)
                v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            else
                fill_power_field(v, memory_scope ? g->mem_power_mw : g->avg_power_mw,
                                 NVML_VALUE_TYPE_UNSIGNED_INT);
            break;
        case NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
            if (!g->energy_supported) {
                v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            } else {
                v->valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                v->value.ullVal = (unsigned long long)g->energy_mj;
            }
            break;
        default:
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            break;
        }
    }
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    DEVICE_CALL(0, NULL);
    if (power == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    if (!g->power_usage_supported)
        return leave(s, NVML_ERROR_NOT_SUPPORTED);
    *power = (unsigned int)g->avg_power_mw;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    DEVICE_CALL(1, NULL);
    if (energy == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    if (!g->energy_supported)
        return leave(s, NVML_ERROR_NOT_SUPPORTED);
    *energy = (unsigned long long)g->energy_mj;
    if (g->energy_step_mj != 0) {
        g->energy_mj += g->energy_step_mj;
        g_dirty = 1;
    }
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementMode(nvmlDevice_t device, int *mode)
{
    DEVICE_CALL(0, NULL);
    if (mode == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *mode = 1;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    DEVICE_CALL(0, NULL);
    if (limit == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *limit = (unsigned int)g->power_limit_mw;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    DEVICE_CALL(0, NULL);
    if (limit == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *limit = (unsigned int)g->power_limit_mw;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device, unsigned int *limit)
{
    DEVICE_CALL(0, NULL);
    if (limit == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *limit = (unsigned int)g->default_power_limit_mw;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device, unsigned int *minLimit,
                                                                 unsigned int *maxLimit)
{
    DEVICE_CALL(0, NULL);
    if (minLimit == NULL || maxLimit == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *minLimit = (unsigned int)g->min_power_limit_mw;
    *maxLimit = (unsigned int)g->max_power_limit_mw;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit)
{
    DEVICE_CALL(1, "%u", limit);
    if ((long long)limit < g->min_power_limit_mw || (long long)limit > g->max_power_limit_mw)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    g->power_limit_mw = limit;
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

/* ---- persistence mode ---- */

EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, int *mode)
{
    DEVICE_CALL(0, NULL);
    if (mode == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *mode = (int)g->persistence_mode;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceSetPersistenceMode(nvmlDevice_t device, int mode)
{
    DEVICE_CALL(1, "%d", mode);
    if (mode != 0 && mode != 1)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    g->persistence_mode = mode;
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

/* ---- clocks ---- */

EXPORT nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t device, unsigned int minGpuClockMHz,
                                                 unsigned int maxGpuClockMHz)
{
    DEVICE_CALL(1, "%u %u", minGpuClockMHz, maxGpuClockMHz);
    if (minGpuClockMHz > maxGpuClockMHz)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    lock_clocks(&g->gpu_lock, minGpuClockMHz, maxGpuClockMHz);
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t device)
{
    DEVICE_CALL(1, NULL);
    unlock_clocks(&g->gpu_lock);
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceSetMemoryLockedClocks(nvmlDevice_t device, unsigned int minMemClockMHz,
                                                    unsigned int maxMemClockMHz)
{
    DEVICE_CALL(1, "%u %u", minMemClockMHz, maxMemClockMHz);
    if (minMemClockMHz > maxMemClockMHz)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    lock_clocks(&g->mem_lock, minMemClockMHz, maxMemClockMHz);
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceResetMemoryLockedClocks(nvmlDevice_t device)
{
    DEVICE_CALL(1, NULL);
    unlock_clocks(&g->mem_lock);
    g_dirty = 1;
    return leave(s, NVML_SUCCESS);
}

static long long clamp_ll(long long v, long long lo, long long hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* Current clock of a domain, honouring locked clocks. */
static int current_clock(const gpu_t *g, unsigned int type, unsigned int *out)
{
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM:
        *out = (unsigned int)(g->gpu_lock.locked
                                  ? clamp_ll(g->gpu_lock.max, MIN_GRAPHICS_CLOCK_MHZ, MAX_GRAPHICS_CLOCK_MHZ)
                                  : MAX_GRAPHICS_CLOCK_MHZ);
        return 0;
    case NVML_CLOCK_MEM:
        *out = (unsigned int)(g->mem_lock.locked ? clamp_ll(g->mem_lock.max, 0, MEMORY_CLOCK_MHZ)
                                                 : MEMORY_CLOCK_MHZ);
        return 0;
    case NVML_CLOCK_VIDEO:
        *out = 1755;
        return 0;
    default:
        return -1;
    }
}

static int max_clock(unsigned int type, unsigned int *out)
{
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *out = (unsigned int)MAX_GRAPHICS_CLOCK_MHZ; return 0;
    case NVML_CLOCK_MEM: *out = (unsigned int)MEMORY_CLOCK_MHZ; return 0;
    case NVML_CLOCK_VIDEO: *out = 1965; return 0;
    default: return -1;
    }
}

static int application_clock(unsigned int type, unsigned int *out)
{
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *out = 1755; return 0;
    case NVML_CLOCK_MEM: *out = (unsigned int)MEMORY_CLOCK_MHZ; return 0;
    case NVML_CLOCK_VIDEO: *out = 1545; return 0;
    default: return -1;
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type, unsigned int *clock)
{
    DEVICE_CALL(0, "%u", type);
    if (clock == NULL || current_clock(g, type, clock) != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, unsigned int type, unsigned int *clock)
{
    DEVICE_CALL(0, "%u", type);
    if (clock == NULL || max_clock(type, clock) != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetApplicationsClock(nvmlDevice_t device, unsigned int type, unsigned int *clock)
{
    DEVICE_CALL(0, "%u", type);
    if (clock == NULL || application_clock(type, clock) != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDefaultApplicationsClock(nvmlDevice_t device, unsigned int type,
                                                          unsigned int *clock)
{
    DEVICE_CALL(0, "%u", type);
    if (clock == NULL || application_clock(type, clock) != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetClock(nvmlDevice_t device, unsigned int type, unsigned int id, unsigned int *clock)
{
    DEVICE_CALL(0, "%u %u", type, id);
    int bad;
    switch (id) {
    case 0: bad = clock == NULL || current_clock(g, type, clock) != 0; break; /* CURRENT */
    case 1:                                                                    /* APP_CLOCK_TARGET */
    case 2: bad = clock == NULL || application_clock(type, clock) != 0; break; /* APP_CLOCK_DEFAULT */
    case 3: bad = clock == NULL || max_clock(type, clock) != 0; break;         /* CUSTOMER_BOOST_MAX */
    default: bad = 1; break;
    }
    return leave(s, bad ? NVML_ERROR_INVALID_ARGUMENT : NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count,
                                                       unsigned int *clocksMHz)
{
    DEVICE_CALL(0, "%u", count != NULL ? *count : 0u);
    if (count == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    unsigned int have = *count;
    *count = 1;
    if (clocksMHz == NULL || have < 1)
        return leave(s, NVML_ERROR_INSUFFICIENT_SIZE);
    clocksMHz[0] = (unsigned int)MEMORY_CLOCK_MHZ;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t device, unsigned int memoryClockMHz,
                                                         unsigned int *count, unsigned int *clocksMHz)
{
    DEVICE_CALL(0, "%u %u", memoryClockMHz, count != NULL ? *count : 0u);
    if (count == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    if ((long long)memoryClockMHz != MEMORY_CLOCK_MHZ)
        return leave(s, NVML_ERROR_NOT_FOUND);
    unsigned int n =
        (unsigned int)((MAX_GRAPHICS_CLOCK_MHZ - MIN_GRAPHICS_CLOCK_MHZ) / GRAPHICS_CLOCK_STEP_MHZ + 1);
    unsigned int have = *count;
    *count = n;
    if (clocksMHz == NULL || have < n)
        return leave(s, NVML_ERROR_INSUFFICIENT_SIZE);
    for (unsigned int i = 0; i < n; i++)
        clocksMHz[i] = (unsigned int)(MAX_GRAPHICS_CLOCK_MHZ - (long long)i * GRAPHICS_CLOCK_STEP_MHZ);
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons)
{
    DEVICE_CALL(0, NULL);
    if (reasons == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *reasons = 0x1ULL; /* GPU idle */
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *reasons)
{
    DEVICE_CALL(0, NULL);
    if (reasons == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *reasons = 0x1ULL;
    return leave(s, NVML_SUCCESS);
}

/* ---- misc device queries ---- */

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensorType, unsigned int *temp)
{
    DEVICE_CALL(0, "%d", sensorType);
    if (temp == NULL || sensorType != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *temp = (unsigned int)g->temperature_c;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *temperature)
{
    DEVICE_CALL(0, NULL);
    if (temperature == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    if (temperature->version != NVML_TEMPERATURE_V1)
        return leave(s, NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (temperature->sensorType != 0)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    temperature->temperature = (int)g->temperature_c;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    DEVICE_CALL(0, NULL);
    if (memory == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    memory->total = MEMORY_TOTAL_BYTES;
    memory->used = MEMORY_USED_BYTES + MEMORY_RESERVED_BYTES;
    memory->free = MEMORY_TOTAL_BYTES - memory->used;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    DEVICE_CALL(0, NULL);
    if (memory == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    if (memory->version != NVML_MEMORY_V2)
        return leave(s, NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    memory->total = MEMORY_TOTAL_BYTES;
    memory->reserved = MEMORY_RESERVED_BYTES;
    memory->used = MEMORY_USED_BYTES;
    memory->free = MEMORY_TOTAL_BYTES - MEMORY_RESERVED_BYTES - MEMORY_USED_BYTES;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    DEVICE_CALL(0, NULL);
    if (utilization == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    utilization->gpu = 0;
    utilization->memory = 0;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t device, int *pState)
{
    DEVICE_CALL(0, NULL);
    if (pState == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *pState = 0;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerState(nvmlDevice_t device, int *pState)
{
    DEVICE_CALL(0, NULL);
    if (pState == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *pState = 0;
    return leave(s, NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                            void *infos)
{
    DEVICE_CALL(0, NULL);
    (void)infos;
    if (infoCount == NULL)
        return leave(s, NVML_ERROR_INVALID_ARGUMENT);
    *infoCount = 0;
    return leave(s, NVML_SUCCESS);
}
