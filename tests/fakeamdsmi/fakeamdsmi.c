/*
 * fakeamdsmi: a stand-in libamd_smi.so for tests on machines without an AMD GPU.
 *
 * The official `amdsmi` Python bindings load this library like the real one,
 * so zeusd's AMD SMI backend runs its real code path against simulated
 * Instinct GPUs.  The bindings bind ~180 functions by name at import time:
 * tests/fakeamdsmi/__init__.py generates a stub (answering
 * AMDSMI_STATUS_NOT_SUPPORTED) for every one this file does not implement,
 * and the ABI header that picks the struct layouts of the installed bindings
 * (FAKE_ABI 24: AMD SMI 6.3, 25: 6.4, 26: 7.0).
 *
 * State lives in a text file (env FAKEAMDSMI_STATE) shared by every process
 * that loads the library, with the call log in FAKEAMDSMI_LOG; the file
 * protocol, the call log and the error/delay injections are the stand-ins'
 * shared machinery (tests/fakelib/fakelib.h).  AMD SMI's keys:
 *
 *   count 4                       number of GPUs (max 64), one per socket
 *   init_error 0                  status of amdsmi_init (0 = works)
 *   lib_year / lib_major / lib_minor / lib_release   amdsmi_get_lib_version
 *   gpu.<i>.<property> <value>    see gpu_t / GPU_INT_FIELDS; fail_status, when not 0, is
 *                                 what every call on that GPU answers (handle lookups too)
 *
 * Units are AMD SMI's: power in W, power caps in uW, clocks in MHz, the
 * energy counter in ticks of energy_resolution_nj nanojoules.  Arguments are
 * validated like the driver does: a power cap outside [min, max], a clock
 * limit outside the hardware range or one that would put min above max, an
 * unknown sensor, clock or perf level -> AMDSMI_STATUS_INVAL.
 */
#define FAKE_STATE_ENV "FAKEAMDSMI_STATE"
#define FAKE_LOG_ENV "FAKEAMDSMI_LOG"
#define FAKE_NAME "fakeamdsmi"
#include "fakelib.h"
#include "fakeamdsmi_abi.h" /* generated: #define FAKE_ABI 24|25|26 */

/* ---- AMD SMI types and constants (ABI-compatible with amdsmi.h) ---- */

typedef uint32_t amdsmi_status_t;

enum {
    AMDSMI_STATUS_SUCCESS = 0,
    AMDSMI_STATUS_INVAL = 1,
    AMDSMI_STATUS_NOT_SUPPORTED = 2,
    AMDSMI_STATUS_NOT_YET_IMPLEMENTED = 3,
    AMDSMI_STATUS_FAIL_LOAD_MODULE = 4,
    AMDSMI_STATUS_FAIL_LOAD_SYMBOL = 5,
    AMDSMI_STATUS_DRM_ERROR = 6,
    AMDSMI_STATUS_API_FAILED = 7,
    AMDSMI_STATUS_TIMEOUT = 8,
    AMDSMI_STATUS_RETRY = 9,
    AMDSMI_STATUS_NO_PERM = 10,
    AMDSMI_STATUS_INTERRUPT = 11,
    AMDSMI_STATUS_IO = 12,
    AMDSMI_STATUS_ADDRESS_FAULT = 13,
    AMDSMI_STATUS_FILE_ERROR = 14,
    AMDSMI_STATUS_OUT_OF_RESOURCES = 15,
    AMDSMI_STATUS_INTERNAL_EXCEPTION = 16,
    AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS = 17,
    AMDSMI_STATUS_INIT_ERROR = 18,
    AMDSMI_STATUS_REFCOUNT_OVERFLOW = 19,
    AMDSMI_STATUS_BUSY = 30,
    AMDSMI_STATUS_NOT_FOUND = 31,
    AMDSMI_STATUS_NOT_INIT = 32,
    AMDSMI_STATUS_NO_SLOT = 33,
    AMDSMI_STATUS_DRIVER_NOT_LOADED = 34,
    AMDSMI_STATUS_NO_DATA = 40,
    AMDSMI_STATUS_INSUFFICIENT_SIZE = 41,
    AMDSMI_STATUS_UNEXPECTED_SIZE = 42,
    AMDSMI_STATUS_UNEXPECTED_DATA = 43,
    AMDSMI_STATUS_MAP_ERROR = 0xFFFFFFFEu,
    AMDSMI_STATUS_UNKNOWN_ERROR = 0xFFFFFFFFu,
};

#define AMDSMI_PROCESSOR_TYPE_AMD_GPU 1u
#define AMDSMI_CLK_TYPE_GFX 0u
#define AMDSMI_CLK_TYPE_MEM 4u
#define CLK_LIMIT_MIN 0u
#define CLK_LIMIT_MAX 1u
#define AMDSMI_DEV_PERF_LEVEL_AUTO 0u
#define AMDSMI_DEV_PERF_LEVEL_MANUAL 3u
#define AMDSMI_DEV_PERF_LEVEL_LAST 8u
#define STRING_LEN 256

typedef void *amdsmi_processor_handle;
typedef void *amdsmi_socket_handle;

#if FAKE_ABI <= 25
typedef struct {
    uint32_t year, major, minor, release;
    const char *build;
} amdsmi_version_t;
#else
typedef struct {
    uint32_t major, minor, release;
    const char *build;
} amdsmi_version_t;
#endif

#if FAKE_ABI == 24
typedef struct {
    uint32_t current_socket_power, average_socket_power;
    uint32_t gfx_voltage, soc_voltage, mem_voltage;
    uint32_t power_limit;
    uint32_t reserved[11];
} amdsmi_power_info_t;
#elif FAKE_ABI == 25
typedef struct {
    uint64_t socket_power;
    uint32_t current_socket_power, average_socket_power;
    uint32_t gfx_voltage, soc_voltage, mem_voltage;
    uint32_t power_limit;
    uint32_t reserved[2];
} amdsmi_power_info_t;
#else
typedef struct {
    uint64_t socket_power;
    uint32_t current_socket_power, average_socket_power;
    uint64_t gfx_voltage, soc_voltage, mem_voltage;
    uint32_t power_limit;
    uint64_t reserved[18];
} amdsmi_power_info_t;
#endif

#if FAKE_ABI == 24
#define VENDOR_NAME_LEN 64
#define SERIAL_LEN 32
#else
#define VENDOR_NAME_LEN STRING_LEN
#define SERIAL_LEN STRING_LEN
#endif
typedef struct {
    char market_name[STRING_LEN];
    uint32_t vendor_id;
    char vendor_name[VENDOR_NAME_LEN];
    uint32_t subvendor_id;
    uint64_t device_id;
    uint32_t rev_id;
    char asic_serial[SERIAL_LEN];
    uint32_t oam_id;
    uint32_t num_of_compute_units;
    uint64_t target_graphics_version;
#if FAKE_ABI == 24
    uint32_t reserved[15];
#elif FAKE_ABI == 25
    uint32_t reserved[22];
#else
    uint32_t subsystem_id;
    uint32_t reserved[21];
#endif
} amdsmi_asic_info_t;

typedef struct {
    uint64_t power_cap, default_power_cap, dpm_cap, min_power_cap, max_power_cap;
    uint64_t reserved[3];
} amdsmi_power_cap_info_t;

typedef struct {
    uint32_t clk, min_clk, max_clk;
    uint8_t clk_locked, clk_deep_sleep;
    uint32_t reserved[4];
} amdsmi_clk_info_t;

/* amdsmi_bdf_t: function:3, device:5, bus:8, domain:48 of one uint64. */
typedef uint64_t amdsmi_bdf_t;

/* ---- simulated state ---- */

#define NAME_LEN 96

typedef struct {
    char name[NAME_LEN];   /* market name */
    char serial[NAME_LEN]; /* hex digits, as the bindings expect */
    long long pci_domain, pci_bus, pci_device, pci_function;
    long long current_power_w, average_power_w; /* 65535: N/A, as the driver writes it */
    long long energy_counter, energy_step, energy_resolution_nj, energy_supported;
    long long power_cap_uw, min_power_cap_uw, max_power_cap_uw, default_power_cap_uw;
    long long gfx_clk_mhz, gfx_min_mhz, gfx_max_mhz, gfx_range_min_mhz, gfx_range_max_mhz;
    long long mem_clk_mhz, mem_min_mhz, mem_max_mhz, mem_range_min_mhz, mem_range_max_mhz;
    long long perf_level;
    long long fail_status; /* not 0: every call on this GPU answers it (a GPU gone from the bus) */
} gpu_t;

/* Integer properties of a GPU, by state-file key. */
#define GPU_INT_FIELDS(X)                                                                          \
    X(pci_domain)                                                                                  \
    X(pci_bus)                                                                                     \
    X(pci_device)                                                                                  \
    X(pci_function)                                                                                \
    X(current_power_w)                                                                             \
    X(average_power_w)                                                                             \
    X(energy_counter)                                                                              \
    X(energy_step)                                                                                 \
    X(energy_resolution_nj)                                                                        \
    X(energy_supported)                                                                            \
    X(power_cap_uw)                                                                                \
    X(min_power_cap_uw)                                                                            \
    X(max_power_cap_uw)                                                                            \
    X(default_power_cap_uw)                                                                        \
    X(gfx_clk_mhz)                                                                                 \
    X(gfx_min_mhz)                                                                                 \
    X(gfx_max_mhz)                                                                                 \
    X(gfx_range_min_mhz)                                                                           \
    X(gfx_range_max_mhz)                                                                           \
    X(mem_clk_mhz)                                                                                 \
    X(mem_min_mhz)                                                                                 \
    X(mem_max_mhz)                                                                                 \
    X(mem_range_min_mhz)                                                                           \
    X(mem_range_max_mhz)                                                                           \
    X(perf_level)                                                                                  \
    X(fail_status)

/* Top-level integer keys. */
#define GLOBAL_INT_FIELDS(X)                                                                       \
    X(count)                                                                                       \
    X(init_error)                                                                                  \
    X(lib_year)                                                                                    \
    X(lib_major)                                                                                   \
    X(lib_minor)                                                                                   \
    X(lib_release)

typedef struct {
    long long count, init_error, lib_year, lib_major, lib_minor, lib_release;
    long long generation;
    gpu_t gpus[MAX_GPUS];
    inj_table_t inj;
} state_t;

/* The GPU the library assumes for an index when the file says nothing
 * (mirrored by GpuState.default in __init__.py). */
static void default_gpu(gpu_t *g, int i)
{
    memset(g, 0, sizeof(*g));
    copy_str(g->name, sizeof(g->name), "AMD Instinct MI300X");
    snprintf(g->serial, sizeof(g->serial), "%016X", 0x5A1E0000u + (unsigned)i);
    g->pci_bus = 0x0c + i;
    g->current_power_w = 350;
    g->average_power_w = 340;
    g->energy_counter = 1000000000LL;
    g->energy_step = 11468641LL; /* 0.5 s at 350 W: passes zeusd's startup validation */
    g->energy_resolution_nj = 15259;
    g->energy_supported = 1;
    g->power_cap_uw = 750000000LL;
    g->min_power_cap_uw = 200000000LL;
    g->max_power_cap_uw = 750000000LL;
    g->default_power_cap_uw = 750000000LL;
    g->gfx_range_min_mhz = g->gfx_min_mhz = 500;
    g->gfx_range_max_mhz = g->gfx_max_mhz = g->gfx_clk_mhz = 2100;
    g->mem_range_min_mhz = g->mem_min_mhz = 900;
    g->mem_range_max_mhz = g->mem_max_mhz = g->mem_clk_mhz = 1300;
    g->perf_level = AMDSMI_DEV_PERF_LEVEL_AUTO;
}

static void default_state(state_t *s)
{
    memset(s, 0, sizeof(*s));
    s->count = 4;
#if FAKE_ABI == 24
    s->lib_year = 24, s->lib_major = 7, s->lib_minor = 0;
#elif FAKE_ABI == 25
    s->lib_year = 25, s->lib_major = 25, s->lib_minor = 4;
#else
    s->lib_major = 26, s->lib_minor = 2;
#endif
    for (int i = 0; i < MAX_GPUS; i++)
        default_gpu(&s->gpus[i], i);
}

static void parse_line(state_t *s, const char *key, const char *v)
{
    long long x;
    const char *rest;
    int gi = parse_gpu_prefix(key, &rest);
    if (gi >= 0) {
        gpu_t *g = &s->gpus[gi];
        if (parse_injection(&s->inj, gi, rest, v))
            return;
        if (strcmp(rest, "name") == 0) {
            copy_str(g->name, sizeof(g->name), v);
            return;
        }
        if (strcmp(rest, "serial") == 0) {
            copy_str(g->serial, sizeof(g->serial), v);
            return;
        }
        if (parse_ll(v, &x) != 0)
            return;
#define SET_INT(f) FAKE_SET_IF(g, rest, x, f)
        GPU_INT_FIELDS(SET_INT)
#undef SET_INT
        return;
    }
    if (parse_ll(v, &x) != 0)
        return;
#define SET_GLOBAL(f) FAKE_SET_IF(s, key, x, f)
    GLOBAL_INT_FIELDS(SET_GLOBAL)
#undef SET_GLOBAL
}

static void render_state(const state_t *s, FILE *f)
{
#define PUT_GLOBAL(fld) fprintf(f, #fld " %lld\n", s->fld);
    GLOBAL_INT_FIELDS(PUT_GLOBAL)
#undef PUT_GLOBAL
    for (int i = 0; i < s->count; i++) {
        const gpu_t *g = &s->gpus[i];
        fprintf(f, "gpu.%d.name %s\n", i, g->name);
        fprintf(f, "gpu.%d.serial %s\n", i, g->serial);
#define PUT_INT(fld) fprintf(f, "gpu.%d." #fld " %lld\n", i, g->fld);
        GPU_INT_FIELDS(PUT_INT)
#undef PUT_INT
    }
}

#include "fakelib_state.h"

/* ---- handles and per-call checks ---- */

static struct fake_handle {
    int index;
} g_sockets[MAX_GPUS], g_processors[MAX_GPUS];
static int g_init_count;

static int handle_index(const struct fake_handle *table, const void *handle)
{
    uintptr_t p = (uintptr_t)handle, base = (uintptr_t)&table[0];
    if (p < base || p >= base + MAX_GPUS * sizeof(table[0]) || (p - base) % sizeof(table[0]) != 0)
        return -1;
    return (int)((p - base) / sizeof(table[0]));
}

/* Checks shared by every call on a GPU; 0 when the operation may run. */
static amdsmi_status_t gpu_checks(state_t *s, const char *fn, int gpu)
{
    if (g_init_count <= 0)
        return AMDSMI_STATUS_NOT_INIT;
    if (gpu < 0 || gpu >= s->count)
        return AMDSMI_STATUS_INVAL;
    if (s->gpus[gpu].fail_status != 0)
        return (amdsmi_status_t)s->gpus[gpu].fail_status;
    return (amdsmi_status_t)lookup_inj(&s->inj, INJ_ERROR, gpu, fn, AMDSMI_STATUS_SUCCESS);
}

static amdsmi_status_t system_checks(state_t *s, const char *fn)
{
    if (g_init_count <= 0)
        return AMDSMI_STATUS_NOT_INIT;
    return (amdsmi_status_t)lookup_inj(&s->inj, INJ_ERROR, -1, fn, AMDSMI_STATUS_SUCCESS);
}

/* Boilerplate for a call on a processor handle: log, enter, checks; `g` is the gpu_t. */
#define GPU_CALL(exclusive, fmt, ...)                                                              \
    int gi = handle_index(g_processors, processor_handle);                                         \
    log_call(__func__, gi, fmt, ##__VA_ARGS__);                                                    \
    state_t *s = enter(__func__, gi, exclusive);                                                   \
    amdsmi_status_t rc = gpu_checks(s, __func__, gi);                                              \
    if (rc != AMDSMI_STATUS_SUCCESS)                                                               \
        return leave(s, (int)rc);                                                                  \
    gpu_t *g = &s->gpus[gi];                                                                       \
    (void)g

#define SYSTEM_CALL(fmt, ...)                                                                      \
    log_call(__func__, -1, fmt, ##__VA_ARGS__);                                                    \
    state_t *s = enter(__func__, -1, 0);                                                           \
    amdsmi_status_t rc = system_checks(s, __func__);                                               \
    if (rc != AMDSMI_STATUS_SUCCESS)                                                               \
        return leave(s, (int)rc)

/* ---- marker so tests can prove this library is the one loaded ---- */

EXPORT const char *fakeamdsmiIdentify(void)
{
    return "fakeamdsmi";
}

/* sizeof of this file's structs, so tests can hold them against the bindings' ctypes layouts. */
EXPORT size_t fakeamdsmiStructSize(const char *name)
{
#define SIZE_OF(t)                                                                                 \
    if (strcmp(name, #t) == 0)                                                                     \
        return sizeof(t);
    SIZE_OF(amdsmi_version_t)
    SIZE_OF(amdsmi_power_info_t)
    SIZE_OF(amdsmi_asic_info_t)
    SIZE_OF(amdsmi_power_cap_info_t)
    SIZE_OF(amdsmi_clk_info_t)
    SIZE_OF(amdsmi_bdf_t)
#undef SIZE_OF
    return 0;
}

/* ---- init, shutdown, versions, status strings ---- */

EXPORT amdsmi_status_t amdsmi_init(uint64_t flags)
{
    log_call(__func__, -1, "%llu", (unsigned long long)flags);
    state_t *s = enter(__func__, -1, 0);
    amdsmi_status_t rc = (amdsmi_status_t)s->init_error;
    if (rc == AMDSMI_STATUS_SUCCESS)
        rc = (amdsmi_status_t)lookup_inj(&s->inj, INJ_ERROR, -1, __func__, AMDSMI_STATUS_SUCCESS);
    if (rc == AMDSMI_STATUS_SUCCESS)
        g_init_count++;
    return leave(s, (int)rc);
}

EXPORT amdsmi_status_t amdsmi_shut_down(void)
{
    log_call(__func__, -1, NULL);
    state_t *s = enter(__func__, -1, 0);
    amdsmi_status_t rc = (amdsmi_status_t)lookup_inj(&s->inj, INJ_ERROR, -1, __func__, AMDSMI_STATUS_SUCCESS);
    if (rc == AMDSMI_STATUS_SUCCESS && g_init_count > 0)
        g_init_count--; /* like the driver: shutting down twice is not an error */
    return leave(s, (int)rc);
}

EXPORT amdsmi_status_t amdsmi_get_lib_version(amdsmi_version_t *version)
{
    static char build[64];
    log_call(__func__, -1, NULL);
    state_t *s = enter(__func__, -1, 0);
    amdsmi_status_t rc = (amdsmi_status_t)lookup_inj(&s->inj, INJ_ERROR, -1, __func__, AMDSMI_STATUS_SUCCESS);
    if (rc != AMDSMI_STATUS_SUCCESS)
        return leave(s, (int)rc);
    if (version == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    memset(version, 0, sizeof(*version));
#if FAKE_ABI <= 25
    version->year = (uint32_t)s->lib_year;
#endif
    version->major = (uint32_t)s->lib_major;
    version->minor = (uint32_t)s->lib_minor;
    version->release = (uint32_t)s->lib_release;
    snprintf(build, sizeof(build), "%lld.%lld.%lld-fakeamdsmi", s->lib_major, s->lib_minor, s->lib_release);
    version->build = build;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_status_code_to_string(amdsmi_status_t status, const char **status_string)
{
    log_call(__func__, -1, "%u", status);
    if (status_string == NULL)
        return AMDSMI_STATUS_INVAL;
    switch (status) {
    case AMDSMI_STATUS_SUCCESS: *status_string = "AMDSMI_STATUS_SUCCESS - Call succeeded"; break;
    case AMDSMI_STATUS_INVAL: *status_string = "AMDSMI_STATUS_INVAL - Invalid parameters"; break;
    case AMDSMI_STATUS_NOT_SUPPORTED: *status_string = "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported"; break;
    case AMDSMI_STATUS_NOT_YET_IMPLEMENTED: *status_string = "AMDSMI_STATUS_NOT_YET_IMPLEMENTED - Feature not yet implemented"; break;
    case AMDSMI_STATUS_DRM_ERROR: *status_string = "AMDSMI_STATUS_DRM_ERROR - Error when calling libdrm"; break;
    case AMDSMI_STATUS_API_FAILED: *status_string = "AMDSMI_STATUS_API_FAILED - API call failed"; break;
    case AMDSMI_STATUS_TIMEOUT: *status_string = "AMDSMI_STATUS_TIMEOUT - Timeout in API call"; break;
    case AMDSMI_STATUS_RETRY: *status_string = "AMDSMI_STATUS_RETRY - Retry operation"; break;
    case AMDSMI_STATUS_NO_PERM: *status_string = "AMDSMI_STATUS_NO_PERM - Permission Denied"; break;
    case AMDSMI_STATUS_INTERRUPT: *status_string = "AMDSMI_STATUS_INTERRUPT - Interrupt occurred during execution"; break;
    case AMDSMI_STATUS_IO: *status_string = "AMDSMI_STATUS_IO - I/O Error"; break;
    case AMDSMI_STATUS_FILE_ERROR: *status_string = "AMDSMI_STATUS_FILE_ERROR - Error opening file"; break;
    case AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS: *status_string = "AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS - Out of bounds"; break;
    case AMDSMI_STATUS_INIT_ERROR: *status_string = "AMDSMI_STATUS_INIT_ERROR - Initialization error"; break;
    case AMDSMI_STATUS_BUSY: *status_string = "AMDSMI_STATUS_BUSY - Device busy"; break;
    case AMDSMI_STATUS_NOT_FOUND: *status_string = "AMDSMI_STATUS_NOT_FOUND - Device Not found"; break;
    case AMDSMI_STATUS_NOT_INIT: *status_string = "AMDSMI_STATUS_NOT_INIT - Device not initialized"; break;
    case AMDSMI_STATUS_DRIVER_NOT_LOADED: *status_string = "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded"; break;
    case AMDSMI_STATUS_NO_DATA: *status_string = "AMDSMI_STATUS_NO_DATA - No data was found for given input"; break;
    default: *status_string = "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred"; break;
    }
    return AMDSMI_STATUS_SUCCESS;
}

/* ---- discovery: one socket per GPU, one GPU per socket ---- */

/* The two-call pattern of the driver: a NULL buffer asks for the count. */
static amdsmi_status_t put_handles(uint32_t *count, void **handles, struct fake_handle *table, int first, int n)
{
    if (count == NULL)
        return AMDSMI_STATUS_INVAL;
    if (handles == NULL) {
        *count = (uint32_t)n;
        return AMDSMI_STATUS_SUCCESS;
    }
    if (*count < (uint32_t)n) {
        *count = (uint32_t)n;
        return AMDSMI_STATUS_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        table[first + i].index = first + i;
        handles[i] = &table[first + i];
    }
    *count = (uint32_t)n;
    return AMDSMI_STATUS_SUCCESS;
}

EXPORT amdsmi_status_t amdsmi_get_socket_handles(uint32_t *socket_count, amdsmi_socket_handle *socket_handles)
{
    SYSTEM_CALL("%s", socket_handles == NULL ? "count" : "fill");
    return leave(s, (int)put_handles(socket_count, socket_handles, g_sockets, 0, (int)s->count));
}

EXPORT amdsmi_status_t amdsmi_get_processor_handles(amdsmi_socket_handle socket_handle, uint32_t *processor_count,
                                                    amdsmi_processor_handle *processor_handles)
{
    int si = handle_index(g_sockets, socket_handle);
    log_call(__func__, si, "%s", processor_handles == NULL ? "count" : "fill");
    state_t *s = enter(__func__, si, 0);
    amdsmi_status_t rc = gpu_checks(s, __func__, si);
    if (rc != AMDSMI_STATUS_SUCCESS)
        return leave(s, (int)rc);
    return leave(s, (int)put_handles(processor_count, processor_handles, g_processors, si, 1));
}

EXPORT amdsmi_status_t amdsmi_get_processor_type(amdsmi_processor_handle processor_handle, uint32_t *processor_type)
{
    GPU_CALL(0, NULL);
    if (processor_type == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    *processor_type = AMDSMI_PROCESSOR_TYPE_AMD_GPU;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_get_gpu_asic_info(amdsmi_processor_handle processor_handle, amdsmi_asic_info_t *info)
{
    GPU_CALL(0, NULL);
    if (info == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    memset(info, 0, sizeof(*info));
    copy_str(info->market_name, sizeof(info->market_name), g->name);
    info->vendor_id = 0x1002;
    copy_str(info->vendor_name, sizeof(info->vendor_name), "Advanced Micro Devices Inc. [AMD/ATI]");
    info->subvendor_id = 0x1002;
    info->device_id = 0x74a1;
    copy_str(info->asic_serial, sizeof(info->asic_serial), g->serial);
    info->oam_id = (uint32_t)gi;
    info->num_of_compute_units = 304;
    info->target_graphics_version = 0x942;
#if FAKE_ABI >= 26
    info->subsystem_id = 0x74a1;
#endif
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_get_gpu_device_bdf(amdsmi_processor_handle processor_handle, amdsmi_bdf_t *bdf)
{
    GPU_CALL(0, NULL);
    if (bdf == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    *bdf = ((uint64_t)g->pci_function & 0x7u) | (((uint64_t)g->pci_device & 0x1Fu) << 3) |
           (((uint64_t)g->pci_bus & 0xFFu) << 8) | (((uint64_t)g->pci_domain & 0xFFFFFFFFFFFFull) << 16);
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* ---- power and energy ---- */

static void fill_power_info(const gpu_t *g, amdsmi_power_info_t *info)
{
    memset(info, 0, sizeof(*info));
#if FAKE_ABI >= 25
    info->socket_power = (uint64_t)g->current_power_w;
#endif
    info->current_socket_power = (uint32_t)g->current_power_w;
    info->average_socket_power = (uint32_t)g->average_power_w;
    info->gfx_voltage = info->soc_voltage = info->mem_voltage = 0xFFFF;
    info->power_limit = (uint32_t)(g->power_cap_uw / 1000000);
}

EXPORT amdsmi_status_t amdsmi_get_power_info(amdsmi_processor_handle processor_handle, amdsmi_power_info_t *info)
{
    GPU_CALL(0, NULL);
    if (info == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    fill_power_info(g, info);
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* What the 6.4 bindings call (a sensor index; the GPUs here have sensor 0 only). */
EXPORT amdsmi_status_t amdsmi_get_power_info_v2(amdsmi_processor_handle processor_handle, uint32_t sensor_ind,
                                                amdsmi_power_info_t *info)
{
    GPU_CALL(0, "%u", sensor_ind);
    if (info == NULL || sensor_ind != 0)
        return leave(s, AMDSMI_STATUS_INVAL);
    fill_power_info(g, info);
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* Returns the counter, then advances it by energy_step (the energy of the next interval). */
EXPORT amdsmi_status_t amdsmi_get_energy_count(amdsmi_processor_handle processor_handle, uint64_t *energy_accumulator,
                                               float *counter_resolution, uint64_t *timestamp)
{
    GPU_CALL(1, NULL);
    if (energy_accumulator == NULL || counter_resolution == NULL || timestamp == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    if (!g->energy_supported)
        return leave(s, AMDSMI_STATUS_NOT_SUPPORTED);
    *energy_accumulator = (uint64_t)g->energy_counter;
    *counter_resolution = (float)((double)g->energy_resolution_nj / 1000.0);
    *timestamp = (uint64_t)(now_ns(CLOCK_REALTIME) / 1000);
    if (g->energy_step != 0) {
        g->energy_counter += g->energy_step;
        g_dirty = 1;
    }
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_get_power_cap_info(amdsmi_processor_handle processor_handle, uint32_t sensor_ind,
                                                 amdsmi_power_cap_info_t *info)
{
    GPU_CALL(0, "%u", sensor_ind);
    if (info == NULL || sensor_ind != 0)
        return leave(s, AMDSMI_STATUS_INVAL);
    memset(info, 0, sizeof(*info));
    info->power_cap = (uint64_t)g->power_cap_uw;
    info->default_power_cap = (uint64_t)g->default_power_cap_uw;
    info->dpm_cap = (uint64_t)g->gfx_range_max_mhz;
    info->min_power_cap = (uint64_t)g->min_power_cap_uw;
    info->max_power_cap = (uint64_t)g->max_power_cap_uw;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_set_power_cap(amdsmi_processor_handle processor_handle, uint32_t sensor_ind, uint64_t cap)
{
    GPU_CALL(1, "%u %llu", sensor_ind, (unsigned long long)cap);
    if (sensor_ind != 0 || cap < (uint64_t)g->min_power_cap_uw || cap > (uint64_t)g->max_power_cap_uw)
        return leave(s, AMDSMI_STATUS_INVAL);
    g->power_cap_uw = (long long)cap;
    g_dirty = 1;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* ---- clocks ---- */

/* The GPU's fields for a clock domain, or NULL for a domain the stand-in lacks. */
typedef struct {
    long long *clk, *min, *max, *range_min, *range_max;
} clock_domain_t;

static int clock_domain(gpu_t *g, uint32_t clk_type, clock_domain_t *d)
{
    if (clk_type == AMDSMI_CLK_TYPE_GFX)
        *d = (clock_domain_t){&g->gfx_clk_mhz, &g->gfx_min_mhz, &g->gfx_max_mhz, &g->gfx_range_min_mhz,
                              &g->gfx_range_max_mhz};
    else if (clk_type == AMDSMI_CLK_TYPE_MEM)
        *d = (clock_domain_t){&g->mem_clk_mhz, &g->mem_min_mhz, &g->mem_max_mhz, &g->mem_range_min_mhz,
                              &g->mem_range_max_mhz};
    else
        return 0;
    return 1;
}

static long long clamp_ll(long long v, long long lo, long long hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

EXPORT amdsmi_status_t amdsmi_get_clock_info(amdsmi_processor_handle processor_handle, uint32_t clk_type,
                                             amdsmi_clk_info_t *info)
{
    GPU_CALL(0, "%u", clk_type);
    clock_domain_t d;
    if (info == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    if (!clock_domain(g, clk_type, &d))
        return leave(s, AMDSMI_STATUS_NOT_SUPPORTED);
    memset(info, 0, sizeof(*info));
    info->clk = (uint32_t)clamp_ll(*d.clk, *d.min, *d.max);
    info->min_clk = (uint32_t)*d.min;
    info->max_clk = (uint32_t)*d.max;
    info->clk_locked = g->perf_level == AMDSMI_DEV_PERF_LEVEL_MANUAL;
    info->clk_deep_sleep = 0;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* One end of a domain's range; the other end stays, and min may never pass max. */
EXPORT amdsmi_status_t amdsmi_set_gpu_clk_limit(amdsmi_processor_handle processor_handle, uint32_t clk_type,
                                                uint32_t limit_type, uint64_t clk_value)
{
    GPU_CALL(1, "%u %u %llu", clk_type, limit_type, (unsigned long long)clk_value);
    clock_domain_t d;
    if (!clock_domain(g, clk_type, &d))
        return leave(s, AMDSMI_STATUS_NOT_SUPPORTED);
    long long v = clk_value > (uint64_t)LLONG_MAX ? LLONG_MAX : (long long)clk_value;
    if (v < *d.range_min || v > *d.range_max)
        return leave(s, AMDSMI_STATUS_INVAL);
    if (limit_type == CLK_LIMIT_MIN) {
        if (v > *d.max)
            return leave(s, AMDSMI_STATUS_INVAL);
        *d.min = v;
    } else if (limit_type == CLK_LIMIT_MAX) {
        if (v < *d.min)
            return leave(s, AMDSMI_STATUS_INVAL);
        *d.max = v;
    } else {
        return leave(s, AMDSMI_STATUS_INVAL);
    }
    g->perf_level = AMDSMI_DEV_PERF_LEVEL_MANUAL;
    g_dirty = 1;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

/* AUTO hands the clocks back to the driver: every domain's full hardware range. */
EXPORT amdsmi_status_t amdsmi_set_gpu_perf_level(amdsmi_processor_handle processor_handle, uint32_t perf_level)
{
    GPU_CALL(1, "%u", perf_level);
    if (perf_level > AMDSMI_DEV_PERF_LEVEL_LAST)
        return leave(s, AMDSMI_STATUS_INVAL);
    if (perf_level == AMDSMI_DEV_PERF_LEVEL_AUTO) {
        g->gfx_min_mhz = g->gfx_range_min_mhz;
        g->gfx_max_mhz = g->gfx_range_max_mhz;
        g->mem_min_mhz = g->mem_range_min_mhz;
        g->mem_max_mhz = g->mem_range_max_mhz;
    }
    g->perf_level = perf_level;
    g_dirty = 1;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}

EXPORT amdsmi_status_t amdsmi_get_gpu_perf_level(amdsmi_processor_handle processor_handle, uint32_t *perf_level)
{
    GPU_CALL(0, NULL);
    if (perf_level == NULL)
        return leave(s, AMDSMI_STATUS_INVAL);
    *perf_level = (uint32_t)g->perf_level;
    return leave(s, AMDSMI_STATUS_SUCCESS);
}
