"""AMD SMI backend: AMD GPUs (Instinct MI250, MI300X, ...) through the official ``amdsmi`` bindings.

The bindings (``pip install zeusd[amd]``, or the copy ROCm ships in
``/opt/rocm/share/amd_smi``) must match the host's ROCm release: their ctypes
structs are the ``libamd_smi.so`` ABI. They are imported by
:func:`open_amdsmi_backend` only, never at module import, so the NVML path
works without them. They load the library from ``$ROCM_HOME/lib``, else
``$ROCM_PATH/lib``, else through the dynamic loader (``LD_LIBRARY_PATH``), else
``/opt/rocm/lib``; ``AMDSMI_LIB_DIR`` (upstream's Rust daemon) means nothing
to them.

Every method blocks inside AMD SMI and is only called from worker threads
(each GPU's calls are serialised by its executor, which also makes the
per-GPU clock-range cache safe). Libraries older than 26.2 are not
thread-safe across GPUs (segfaults on ABI 24, values scrambled between GPUs
on 25 and 26.1), so for them every AMD SMI call in the process takes one
lock, as upstream zeusd does; there a hung call holds up every GPU's calls
until it returns.

Failures become :class:`DeviceError` with upstream's wording (``AMDSMI error
<status>: <the library's status string>``) and the spec's statuses: NO_PERM
403, INVAL and NOT_SUPPORTED 400, anything else 500. Units: AMD SMI reports
power in W, power caps in uW, energy in counter ticks of a reported
resolution (uJ); the GPU protocol speaks mW and mJ.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
import time
from typing import Any, Callable, Final, Iterator, Sequence

from twisted.logger import Logger

from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.base import DiscoveredGPU
from zeusd.errors import StartupError

__all__ = [
    "AMDSMI_HTTP_STATUS",
    "AmdSmiBackend",
    "AmdSmiError",
    "AmdSmiGPU",
    "AmdSmiUnavailable",
    "ENERGY_UNAVAILABLE",
    "PERSISTENCE_UNSUPPORTED",
    "SINGLE_DOMAIN_RESET",
    "energy_counter_verdict",
    "open_amdsmi_backend",
]

log = Logger()

STATUS_INVAL: Final = 1
STATUS_NOT_SUPPORTED: Final = 2
STATUS_NO_PERM: Final = 10

#: AMD SMI status -> HTTP status (spec §14.2); anything else is 500.
AMDSMI_HTTP_STATUS: Final[dict[int, int]] = {STATUS_INVAL: 400, STATUS_NOT_SUPPORTED: 400, STATUS_NO_PERM: 403}

#: Upstream's ``Invalid request: ...`` answers for what AMD GPUs do not have (400).
PERSISTENCE_UNSUPPORTED: Final = "Invalid request: persistence mode is not supported on AMD GPUs"
SINGLE_DOMAIN_RESET: Final = (
    "Invalid request: AMD GPUs cannot reset a single clock domain; "
    "use reset_locked_clocks to reset all domains"
)
ENERGY_UNAVAILABLE: Final = (
    "Invalid request: The cumulative energy counter of this GPU is not available. It is either "
    "unsupported or failed validation at zeusd startup (see https://github.com/ROCm/amdsmi/issues/38). "
    "Poll /gpu/get_power and integrate over time instead."
)

#: What the driver writes into a power field it cannot read (the bindings turn 0xFFFF into "N/A").
_POWER_NA: Final = (0xFFFF, 0xFFFFFFFF)
_POWER_FIELDS: Final = ("current_socket_power", "average_socket_power")
_POWER_NOTES: Final[dict[str | None, str]] = {
    "current_socket_power": "",
    "average_socket_power": ", power from average_socket_power",
    None: ", no power reading",
}
#: How long the startup check of the energy counters integrates power.
VALIDATION_WINDOW_S: Final = 0.5
#: The first library that may be called from several threads at once.
_THREAD_SAFE_SINCE: Final = (26, 2)

#: amdsmi_init answers that mean "no AMD GPU driver here" rather than "something is wrong".
_ABSENT_DRIVER: Final = frozenset({4, 18, 31, 34})  # FAIL_LOAD_MODULE, INIT_ERROR, NOT_FOUND, DRIVER_NOT_LOADED

_INSTALL_HINT: Final = (
    "pip install zeusd[amd] (or the amdsmi package of your ROCm release, in /opt/rocm/share/amd_smi)"
)


class AmdSmiUnavailable(StartupError):
    """AMD SMI is not on this node: no bindings, no library, or no AMD GPU driver.

    An explicit ``--gpu-backend amdsmi`` stops with the message; an ``auto``
    probe may take it as "no AMD GPUs here". Any other StartupError from
    :func:`open_amdsmi_backend` means AMD SMI is there but failing.
    """


class AmdSmiError(DeviceError):
    """A failed AMD SMI call; ``amdsmi_status`` is the library's status code."""

    def __init__(self, message: str, amdsmi_status: int) -> None:
        super().__init__(message, AMDSMI_HTTP_STATUS.get(amdsmi_status, 500))
        self.amdsmi_status = amdsmi_status


class _Bindings:
    """The imported bindings and the lock that serialises calls into older libraries."""

    def __init__(self, module: Any, lock: threading.Lock | None = None) -> None:
        self.amdsmi = module
        self.lock = lock

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        if self.lock is None:
            yield
        else:
            with self.lock:
                yield

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Call a bindings function; an AMD SMI failure becomes the DeviceError clients see."""
        try:
            with self._guard():
                return function(*args)
        except self.amdsmi.AmdSmiLibraryException as e:
            raise self.device_error(int(e.get_error_code())) from e
        except self.amdsmi.AmdSmiException as e:  # argument checks inside the bindings
            raise DeviceError(f"AMDSMI error: {e}", 500) from e

    def status_message(self, status: int) -> str:
        """``amdsmi_status_code_to_string`` (called at the C level: the 7.0 bindings' wrapper of it is broken)."""
        wrapper = self.amdsmi.amdsmi_wrapper
        text = ctypes.POINTER(ctypes.c_char)()
        try:
            with self._guard():
                ret = wrapper.amdsmi_status_code_to_string(wrapper.amdsmi_status_t(status), ctypes.byref(text))
        except Exception:  # a library without the symbol, a ctypes mismatch: the number still says it
            return str(status)
        value = ctypes.cast(text, ctypes.c_char_p).value if ret == 0 and text else None
        return value.decode("utf-8", "replace") if value else str(status)

    def device_error(self, status: int) -> AmdSmiError:
        """Upstream's wording: ``AMDSMI error <status>: <the library's status string>``."""
        return AmdSmiError(f"AMDSMI error {status}: {self.status_message(status)}", status)


def _not_supported(error: DeviceError) -> bool:
    return isinstance(error, AmdSmiError) and error.amdsmi_status == STATUS_NOT_SUPPORTED


class AmdSmiGPU(DiscoveredGPU):
    """One AMD GPU; the handle and static properties are fetched once at startup."""

    __slots__ = ("_api", "_handle", "_power_field", "_bounds")

    def __init__(
        self,
        api: _Bindings,
        index: int,
        handle: object,
        name: str,
        pci_address: str,
        power_field: str | None,
        clock_bounds: dict[str, tuple[int, int] | None],
        power_limit_range_mw: tuple[int, int] | None = None,
    ) -> None:
        # The energy counter is served once the startup validation passed it.
        super().__init__(index, name, pci_address, False, power_limit_range_mw)
        self._api = api
        self._handle = handle
        # "current_socket_power", else "average_socket_power" where the former is N/A, else None.
        self._power_field = power_field
        # Per clock domain, the (min, max) range last seen or set; None: ask the driver.
        self._bounds = clock_bounds

    @classmethod
    def open(cls, api: _Bindings, index: int, handle: object) -> AmdSmiGPU:
        """Read what GPU ``index`` is and probe what it supports (name or power failures abort)."""
        amdsmi = api.amdsmi
        name = str(api.call(amdsmi.amdsmi_get_gpu_asic_info, handle)["market_name"])
        bounds = {domain: _probe_clock_bounds(api, index, handle, domain) for domain in ("GFX", "MEM")}
        pci_address = _probe_pci_address(api, index, handle)
        gpu = cls(api, index, handle, name, pci_address, _probe_power_field(api, index, handle), bounds)
        gpu._limit_range = gpu._probe_power_limit_range()
        return gpu

    @property
    def backend(self) -> str:
        return "amdsmi"

    @property
    def power_field(self) -> str | None:
        """Which power reading serves get_instant_power_mw (None: neither is available)."""
        return self._power_field

    # ---- reads

    def get_instant_power_mw(self) -> int:
        """Current socket power (average socket power where current is N/A), W -> mW."""
        if self._power_field is None:
            raise self._api.device_error(STATUS_NOT_SUPPORTED)
        watts = self._api.call(self._api.amdsmi.amdsmi_get_power_info, self._handle)[self._power_field]
        if not isinstance(watts, int) or watts in _POWER_NA:
            raise self._api.device_error(STATUS_NOT_SUPPORTED)
        return watts * 1000

    def get_total_energy_mj(self) -> int:
        if not self._energy_available:
            raise DeviceError(ENERGY_UNAVAILABLE, 400)
        return self.read_energy_counter_mj()

    def read_energy_counter_mj(self) -> int:
        """The counter in mJ (ticks x resolution in uJ / 1000, truncated like upstream), unchecked."""
        reading = self._api.call(self._api.amdsmi.amdsmi_get_energy_count, self._handle)
        ticks = int(reading["energy_accumulator"])
        resolution_uj = float(reading["counter_resolution"])
        return int(ticks * resolution_uj / 1000.0)

    def _power_cap_info(self) -> dict[str, int]:
        info: dict[str, int] = self._api.call(self._api.amdsmi.amdsmi_get_power_cap_info, self._handle)
        return info

    def get_power_limit_mw(self) -> int:
        return int(self._power_cap_info()["power_cap"]) // 1000

    def get_power_limit_constraints_mw(self) -> tuple[int, int]:
        info = self._power_cap_info()
        return int(info["min_power_cap"]) // 1000, int(info["max_power_cap"]) // 1000

    def get_persistence_mode(self) -> bool:
        raise DeviceError(PERSISTENCE_UNSUPPORTED, 400)

    def _probe_power_limit_range(self) -> tuple[int, int] | None:
        try:
            return self.get_power_limit_constraints_mw()
        except DeviceError as e:
            log.info(
                "GPU {index}: power cap range unavailable ({error}); limits are checked by the driver only",
                index=self._index,
                error=e.message,
            )
            return None

    # ---- control (the driver validates values; a failed range change is undone)

    def set_persistence_mode(self, enabled: bool) -> None:
        raise DeviceError(PERSISTENCE_UNSUPPORTED, 400)

    def set_power_limit_mw(self, power_limit_mw: int) -> None:
        self._api.call(self._api.amdsmi.amdsmi_set_power_cap, self._handle, 0, power_limit_mw * 1000)

    def set_gpu_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._set_clock_range("GFX", min_clock_mhz, max_clock_mhz)

    def reset_gpu_locked_clocks(self) -> None:
        raise DeviceError(SINGLE_DOMAIN_RESET, 400)

    def set_mem_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._set_clock_range("MEM", min_clock_mhz, max_clock_mhz)

    def reset_mem_locked_clocks(self) -> None:
        raise DeviceError(SINGLE_DOMAIN_RESET, 400)

    def reset_locked_clocks(self) -> None:
        """Both domains at once: AMD SMI has no per-domain reset, so the driver takes the
        clocks back (performance level AUTO) and restores their default ranges."""
        amdsmi = self._api.amdsmi
        self._api.call(amdsmi.amdsmi_set_gpu_perf_level, self._handle, amdsmi.AmdSmiDevPerfLevel.AUTO)
        self._bounds = {domain: None for domain in self._bounds}

    # ---- clock ranges

    def _query_bounds(self, domain: str) -> tuple[int, int]:
        amdsmi = self._api.amdsmi
        info = self._api.call(amdsmi.amdsmi_get_clock_info, self._handle, amdsmi.AmdSmiClkType[domain])
        return int(info["min_clk"]), int(info["max_clk"])

    def _write_range(self, domain: str, low: int, high: int, current: tuple[int, int]) -> None:
        """Min then max, or max first when the new min lies above the current max (the
        driver refuses any moment with min > max)."""
        clk = "sclk" if domain == "GFX" else "mclk"
        order = (("max", high), ("min", low)) if low > current[1] else (("min", low), ("max", high))
        for limit, mhz in order:
            self._api.call(self._api.amdsmi.amdsmi_set_gpu_clk_limit, self._handle, clk, limit, mhz)

    def _set_clock_range(self, domain: str, low: int, high: int) -> None:
        """Write the range; on failure re-read the range (it may have been changed outside
        zeusd) and try once more; if that fails too, restore the range found at the start."""
        start = self._bounds[domain] or self._query_bounds(domain)
        try:
            self._write_range(domain, low, high, start)
        except DeviceError as first:
            log.warn(
                "GPU {index}: setting the {domain} clock range failed ({error}); re-reading it and retrying",
                index=self._index,
                domain=domain,
                error=first.message,
            )
            self._bounds[domain] = None
        else:
            self._bounds[domain] = (low, high)
            return
        now = self._query_bounds(domain)
        try:
            self._write_range(domain, low, high, now)
        except DeviceError:
            self._bounds[domain] = None
            self._restore_range(domain, start, now)
            raise
        self._bounds[domain] = (low, high)

    def _restore_range(self, domain: str, previous: tuple[int, int], now: tuple[int, int]) -> None:
        try:
            self._write_range(domain, previous[0], previous[1], now)
        except DeviceError as e:
            log.warn(
                "GPU {index}: restoring the {domain} clock range {range} failed: {error}",
                index=self._index,
                domain=domain,
                range=previous,
                error=e.message,
            )
        else:
            self._bounds[domain] = previous


def _probe_pci_address(api: _Bindings, index: int, handle: object) -> str:
    try:
        bdf = api.call(api.amdsmi.amdsmi_get_gpu_device_bdf, handle)
    except DeviceError as e:
        log.warn("GPU {index}: cannot read the PCI address: {error}", index=index, error=e.message)
        return ""
    return str(bdf).lower()


def _probe_power_field(api: _Bindings, index: int, handle: object) -> str | None:
    """Current socket power where the GPU reports it, else average socket power (MI250 and
    older report only the average), else None; NOT_SUPPORTED counts as neither."""
    try:
        info = api.call(api.amdsmi.amdsmi_get_power_info, handle)
    except DeviceError as e:
        if not _not_supported(e):
            raise
        info = {}
    for field in _POWER_FIELDS:
        value = info.get(field)
        if isinstance(value, int) and value not in _POWER_NA:
            return field
    log.warn("GPU {index}: AMD SMI reports no socket power; power reads will answer 400", index=index)
    return None


def _probe_clock_bounds(api: _Bindings, index: int, handle: object, domain: str) -> tuple[int, int] | None:
    """The current clock range, the starting point of range changes (None: read it when needed)."""
    try:
        info = api.call(api.amdsmi.amdsmi_get_clock_info, handle, api.amdsmi.AmdSmiClkType[domain])
    except DeviceError as e:
        log.debug("GPU {index}: no {domain} clock range at startup: {error}", index=index, domain=domain, error=e.message)
        return None
    low, high = info["min_clk"], info["max_clk"]
    return (low, high) if isinstance(low, int) and isinstance(high, int) else None


def energy_counter_verdict(expected_mj: float, measured_mj: float) -> bool | None:
    """Whether a counter that moved ``measured_mj`` while power said ``expected_mj`` is
    trustworthy: within a factor of 10 (some firmware reports a wrong resolution,
    ROCm/amdsmi#38). None: too little power to tell."""
    if expected_mj < 0.001:
        return None
    ratio = measured_mj / expected_mj
    return 0.1 < ratio < 10.0


def _validate_energy_counters(gpus: Sequence[AmdSmiGPU], sleep: Callable[[float], None], window_s: float) -> None:
    """Integrate power over ``window_s`` and keep the counters that agree (upstream's check).

    A counter that is unsupported, fails, or disagrees stays unavailable: that
    GPU's energy requests answer 400 and clients integrate power instead.
    """
    powers: list[int] = []
    for gpu in gpus:
        try:
            powers.append(gpu.get_instant_power_mw())
        except DeviceError:
            powers.append(0)
    first = [_energy_or_none(gpu) for gpu in gpus]
    if not any(reading is not None for reading in first):
        return
    sleep(window_s)
    for gpu, power_mw, before in zip(gpus, powers, first):
        after = _energy_or_none(gpu) if before is not None else None
        if before is None or after is None:
            continue
        expected_mj, measured_mj = power_mw * window_s, float(after - before)
        verdict = energy_counter_verdict(expected_mj, measured_mj)
        gpu._energy_available = verdict is True
        if verdict is None:
            log.info(
                "GPU {index}: power is zero or unreadable, so the energy counter cannot be validated; "
                "energy is disabled for this GPU (clients can integrate power instead)",
                index=gpu.index,
            )
        elif not verdict:
            log.warn(
                "GPU {index}: energy counter failed validation (expected {expected:.3f} mJ, measured "
                "{measured:.3f} mJ, see ROCm/amdsmi#38); energy is disabled for this GPU",
                index=gpu.index,
                expected=expected_mj,
                measured=measured_mj,
            )


def _energy_or_none(gpu: AmdSmiGPU) -> int | None:
    try:
        return gpu.read_energy_counter_mj()
    except DeviceError as e:
        if _not_supported(e):
            log.info("GPU {index}: cumulative energy counter not supported", index=gpu.index)
        else:
            log.warn("GPU {index}: energy counter failed at startup: {error}", index=gpu.index, error=e.message)
        return None


class AmdSmiBackend:
    """The GPUs AMD SMI reported at startup, and the library's lifetime."""

    def __init__(self, api: _Bindings, gpus: Sequence[AmdSmiGPU], library_version: str) -> None:
        self._api = api
        self._gpus: tuple[AmdSmiGPU, ...] = tuple(gpus)
        self._initialized = True
        self.library_version = library_version

    @property
    def gpus(self) -> Sequence[AmdSmiGPU]:
        return self._gpus

    @property
    def absence(self) -> str:
        """Why there are no GPUs (a missing library or driver stops open_amdsmi_backend instead)."""
        return "AMD SMI reports no GPU"

    @property
    def serialized(self) -> bool:
        """Whether every AMD SMI call takes one process-wide lock (libraries before 26.2)."""
        return self._api.lock is not None

    def close(self) -> None:
        """Shut AMD SMI down once."""
        if not self._initialized:
            return
        self._initialized = False
        try:
            self._api.call(self._api.amdsmi.amdsmi_shut_down)
        except DeviceError as e:
            log.warn("amdsmi_shut_down failed: {error}", error=e.message)


def _import_bindings() -> Any:
    """``import amdsmi``, which loads libamd_smi.so; StartupError says what is missing."""
    if os.environ.get("AMDSMI_LIB_DIR"):
        log.warn(
            "AMDSMI_LIB_DIR is ignored: the amdsmi Python bindings load libamd_smi.so from "
            "$ROCM_HOME/lib, $ROCM_PATH/lib or the loader path"
        )
    printed = io.StringIO()  # the bindings print the loader's error, then fail with KeyError
    try:
        with contextlib.redirect_stdout(printed):
            import amdsmi
    except ModuleNotFoundError as e:
        if e.name != "amdsmi":
            raise AmdSmiUnavailable(f"The AMD SMI Python bindings cannot be imported: {e}") from e
        raise AmdSmiUnavailable(f"The AMD SMI Python bindings (package amdsmi) are not installed: {_INSTALL_HINT}") from e
    except Exception as e:  # KeyError('libamd_smi.so'), OSError, a mismatched library's AttributeError
        detail = " ".join(printed.getvalue().split()) or f"{type(e).__name__}: {e}"
        raise AmdSmiUnavailable(
            "The AMD SMI library (libamd_smi.so) cannot be loaded from $ROCM_HOME/lib, $ROCM_PATH/lib, "
            f"the loader path or /opt/rocm/lib: {detail}"
        ) from e
    return amdsmi


def _library_version(api: _Bindings) -> tuple[str, tuple[int, int]]:
    """The library's version for the log, and (major, minor) for the thread-safety rule.

    ABI 24 and 25 libraries (ROCm 6.x) report a year and majors like 7 or 25:
    all sort below 26.2, as they should.
    """
    try:
        version = api.call(api.amdsmi.amdsmi_get_lib_version)
    except DeviceError as e:
        log.warn("amdsmi_get_lib_version failed ({error}); serialising AMD SMI calls", error=e.message)
        return "unknown", (0, 0)
    major, minor, release = (int(version.get(k, 0)) for k in ("major", "minor", "release"))
    year = version.get("year")
    text = f"{year}.{major}.{minor}.{release}" if year else f"{major}.{minor}.{release}"
    return text, (major, minor)


def open_amdsmi_backend(
    *, sleep: Callable[[float], None] = time.sleep, validation_window_s: float = VALIDATION_WINDOW_S
) -> AmdSmiBackend:
    """Load the bindings, initialise AMD SMI for AMD GPUs and open every GPU it reports.

    Blocks (library calls and the energy counters' validation window, spent in
    ``sleep``). Missing bindings, library or driver raise
    :class:`AmdSmiUnavailable`; any other failure while initialising or
    enumerating raises ``StartupError``; both say what is wrong.
    """
    amdsmi = _import_bindings()
    api = _Bindings(amdsmi)
    location = getattr(amdsmi.amdsmi_wrapper, "location", "libamd_smi.so")
    try:
        api.call(amdsmi.amdsmi_init, amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
    except AmdSmiError as e:
        kind = AmdSmiUnavailable if e.amdsmi_status in _ABSENT_DRIVER else StartupError
        raise kind(f"AMD SMI initialisation failed ({location}): {e.message}") from e
    except DeviceError as e:
        raise StartupError(f"AMD SMI initialisation failed ({location}): {e.message}") from e
    version, major_minor = _library_version(api)
    if major_minor < _THREAD_SAFE_SINCE:
        api.lock = threading.Lock()
    log.info(
        "AMD SMI {version} loaded from {location}{serial}",
        version=version,
        location=location,
        serial="; its calls are serialised (libraries before 26.2 are not thread-safe)" if api.lock else "",
    )
    try:
        handles = api.call(amdsmi.amdsmi_get_processor_handles)
        gpus = [AmdSmiGPU.open(api, index, handle) for index, handle in enumerate(handles)]
    except DeviceError as e:
        AmdSmiBackend(api, (), version).close()
        raise StartupError(f"AMD SMI cannot enumerate the GPUs: {e.message}") from e
    if gpus:
        _validate_energy_counters(gpus, sleep, validation_window_s)
    else:
        log.info("AMD SMI reports no GPUs")
    for gpu in gpus:
        log.info(
            "GPU {index}: {name} at {pci}{energy}{power}",
            index=gpu.index,
            name=gpu.name,
            pci=gpu.pci_address or "(unknown PCI address)",
            energy="" if gpu.energy_counter_available else ", no energy counter",
            power=_POWER_NOTES[gpu.power_field],
        )
    return AmdSmiBackend(api, gpus, version)
