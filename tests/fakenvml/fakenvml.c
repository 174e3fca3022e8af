/*
 * fakenvml: a stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * The real pynvml (nvidia-ml-py) loads this library exactly like the real one,
 * so the daemon, its NVML backend and the official Zeus client all run their
 * real code paths against simulated H100-like GPUs.
 *
 * State lives in a small text file (env FAKENVML_STATE) shared by every
 * process that loads the library, with the call log in FAKENVML_LOG; the file
 * protocol, the call log and the error/delay injections are the stand-ins'
 * shared machinery (tests/fakelib/fakelib.h).  NVML's keys, one `key value`
 * per line:
 *
 *   count 4                       number of GPUs (max 64)
 *   init_error 0                  return code of nvmlInit* (0 = works)
 *   driver_version 550.54.15
 *   nvml_version 12.550.54.15
 *   cuda_driver_version 12040
 *   gpu.<i>.<property> <value>    see gpu_t / GPU_INT_FIELDS / render_state()
 *   gpu.<i>.field_return.<fieldId> <code>   per-field nvmlReturn override
 *
 * Without FAKENVML_STATE the library simulates 4 default GPUs in memory.
 */
#define FAKE_STATE_ENV "FAKENVML_STATE"
#define FAKE_LOG_ENV "FAKENVML_LOG"
#define FAKE_NAME "fakenvml"
#define FAKE_EXTRA_INJ_KINDS "field_return"
#include "fakelib.h"

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

#define NAME_LEN 96

enum { INJ_FIELD = 2 }; /* gpu.<i>.field_return.<fieldId>: the name is the field id */

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
    inj_table_t inj;
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

static struct fake_device g_devices[MAX_GPUS];
static unsigned long long g_instant_reads[MAX_GPUS]; /* per process, for power_wobble_mw */
static int g_init_count;

/* ---- state file keys ---- */

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
    if (parse_injection(&s->inj, i, key, v))
        return;
    if (parse_ll(v, &x) != 0)
        return;
#define SET_INT(f) FAKE_SET_IF(g, key, x, f)
    GPU_INT_FIELDS(SET_INT)
#undef SET_INT
}

static void parse_line(state_t *s, const char *key, const char *v)
{
    long long x;
    const char *rest;
    int gi = parse_gpu_prefix(key, &rest);
    if (gi >= 0) {
        parse_gpu_key(s, gi, rest, v);
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
    else if (strcmp(key, "cuda_driver_version") == 0)
        s->cuda_driver_version = x;
}

static void render_state(const state_t *s, FILE *f)
{
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
}

#include "fakelib_state.h"

/* ---- per-call protocol ---- */

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
    return (nvmlReturn_t)lookup_inj(&s->inj, INJ_ERROR, gpu, fn, NVML_SUCCESS);
}

static nvmlReturn_t system_checks(state_t *s, const char *fn)
{
    if (g_init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return (nvmlReturn_t)lookup_inj(&s->inj, INJ_ERROR, -1, fn, NVML_SUCCESS);
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
        rc = (nvmlReturn_t)lookup_inj(&s->inj, INJ_ERROR, -1, fn, NVML_SUCCESS);
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
    nvmlReturn_t rc = (nvmlReturn_t)lookup_inj(&s->inj, INJ_ERROR, -1, __func__, NVML_SUCCESS);
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
        long long forced = lookup_inj(&s->inj, INJ_FIELD, gi, id, 0);
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
