"""NVML backend: NVIDIA GPUs through pynvml (the ``nvidia-ml-py`` package).

Every method blocks inside NVML and is only called from worker threads. Any
NVML failure becomes a :class:`DeviceError` carrying upstream zeusd's message
(``NVML error: <nvml-wrapper text>``, chosen by return code so clients see the
same words as with the Rust daemon) and the v0.5.0 HTTP status.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Final, Sequence

from twisted.logger import Logger

from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.base import DiscoveredGPU, reset_each_domain
from zeusd.errors import StartupError

with warnings.catch_warnings():
    # The deprecated `pynvml` shim package, when installed next to nvidia-ml-py,
    # warns from an import hook; the module we get is nvidia-ml-py's either way.
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

__all__ = ["NVML_ERRORS", "NvmlBackend", "NvmlGPU", "nvml_device_error", "nvml_error_message", "open_nvml_backend"]

log = Logger()

_SUCCESS: Final = 0
_INVALID_ARGUMENT: Final = 2
_NOT_SUPPORTED: Final = 3
_FEATURE_DISABLED: Final = 0
_FEATURE_ENABLED: Final = 1

#: NVML return code -> (upstream message text, HTTP status). The texts are
#: nvml-wrapper's (spec §8.4), the statuses the v0.5.0 mapping (spec §8.5):
#: no permission 403, invalid argument / not supported 400, anything else 500.
NVML_ERRORS: Final[dict[int, tuple[str, int]]] = {
    1: ("NVML was not first initialized with `Nvml::init()`", 500),
    2: ("a supplied argument was invalid", 400),
    3: ("the requested operation is not available on the target device", 400),
    4: ("the current user does not have permission to perform this operation", 403),
    6: ("a query to find an object was unsuccessful", 500),
    7: ("an input argument is not large enough", 500),
    8: ("device's external power cables are not properly attached", 500),
    9: ("NVIDIA driver is not loaded", 500),
    10: ("the provided timeout was reached", 500),
    11: ("NVIDIA kernel detected an interrupt issue with a device", 500),
    12: ("a shared library couldn't be found or loaded", 500),
    13: ("a function couldn't be found in a shared library", 500),
    14: ("the infoROM is corrupted", 500),
    15: ("device fell off the bus or has otherwise become inacessible", 500),  # (sic), upstream spelling
    16: ("device requires a reset before it can be used again", 500),
    17: ("device control has been blocked by the operating system/cgroups", 500),
    18: ("RM detects a driver/library version mismatch", 500),
    19: ("operation cannot be performed because the GPU is currently in use", 500),
    20: ("insufficient memory", 500),
    21: ("no data", 500),
    999: ("an internal driver error occurred", 500),
}


def nvml_error_message(code: int) -> str:
    """``NVML error: <text>`` for a return code, exactly as upstream words it."""
    entry = NVML_ERRORS.get(code)
    text = entry[0] if entry is not None else f"unexpected enum variant value: {code}"
    return f"NVML error: {text}"


def nvml_device_error(code: int) -> DeviceError:
    """The DeviceError (message and HTTP status) for an NVML return code."""
    entry = NVML_ERRORS.get(code)
    status = entry[1] if entry is not None else 500
    return DeviceError(nvml_error_message(code), status)


def _code(error: BaseException) -> int:
    """The NVML return code carried by a pynvml.NVMLError."""
    value: int = getattr(error, "value", 999)
    return value


# One shared request list: pynvml only reads it, so no list is built per read.
_INSTANT_POWER_FIELDS: Final = [pynvml.NVML_FI_DEV_POWER_INSTANT]
_VALUE_TYPE_UINT: Final = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
_VALUE_TYPE_ULL: Final = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG


class NvmlGPU(DiscoveredGPU):
    """One NVIDIA GPU; the handle and static properties are fetched once at startup."""

    __slots__ = ("_handle", "_use_power_usage")

    def __init__(
        self,
        index: int,
        handle: object,
        name: str,
        pci_address: str,
        energy_counter_available: bool,
        instant_power_field: bool,
        power_limit_range_mw: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(index, name, pci_address, energy_counter_available, power_limit_range_mw)
        self._handle = handle
        # Chosen once, at startup: field 186 unless the device does not support it.
        # A later failure is an error for that read only, never a switch of method.
        self._use_power_usage = not instant_power_field

    @classmethod
    def open(cls, index: int) -> NvmlGPU:
        """Look up GPU ``index`` and probe what it supports.

        Handle and name failures propagate (pynvml.NVMLError: startup aborts);
        a failing PCI or probe call is logged and degrades gracefully.
        """
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name: str = pynvml.nvmlDeviceGetName(handle)
        return cls(
            index,
            handle,
            name,
            _probe_pci_address(index, handle),
            _probe_energy_counter(index, handle),
            _probe_instant_power_field(index, handle),
            _probe_power_limit_range(index, handle),
        )

    @property
    def backend(self) -> str:
        return "nvml"

    @property
    def uses_power_usage_fallback(self) -> bool:
        """True when instant power is read via nvmlDeviceGetPowerUsage (field 186 unsupported at startup)."""
        return self._use_power_usage

    # ---- reads

    def get_instant_power_mw(self) -> int:
        """Instant power from field 186 (nvmlDeviceGetPowerUsage is ~1 s averaged on
        recent GPUs), or nvmlDeviceGetPowerUsage where the field proved unsupported at startup."""
        if self._use_power_usage:
            return self._get_power_usage_mw()
        try:
            value = pynvml.nvmlDeviceGetFieldValues(self._handle, _INSTANT_POWER_FIELDS)[0]
        except pynvml.NVMLError as e:
            raise nvml_device_error(_code(e)) from e
        ret: int = value.nvmlReturn
        if ret != _SUCCESS:
            raise nvml_device_error(ret)
        value_type: int = value.valueType
        if value_type == _VALUE_TYPE_UINT:
            mw: int = value.value.uiVal
            return mw
        if value_type == _VALUE_TYPE_ULL:
            wide: int = value.value.ullVal
            return wide & 0xFFFFFFFF  # upstream truncates to u32
        raise nvml_device_error(_INVALID_ARGUMENT)

    def _get_power_usage_mw(self) -> int:
        return int(_nvml(pynvml.nvmlDeviceGetPowerUsage, self._handle))

    def get_total_energy_mj(self) -> int:
        return int(_nvml(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._handle))

    def get_power_limit_mw(self) -> int:
        return int(_nvml(pynvml.nvmlDeviceGetPowerManagementLimit, self._handle))

    def get_power_limit_constraints_mw(self) -> tuple[int, int]:
        low, high = _nvml(pynvml.nvmlDeviceGetPowerManagementLimitConstraints, self._handle)
        return int(low), int(high)

    def get_persistence_mode(self) -> bool:
        return bool(_nvml(pynvml.nvmlDeviceGetPersistenceMode, self._handle) == _FEATURE_ENABLED)

    # ---- control (values are passed through; the driver validates them)

    def set_persistence_mode(self, enabled: bool) -> None:
        _nvml(pynvml.nvmlDeviceSetPersistenceMode, self._handle, _FEATURE_ENABLED if enabled else _FEATURE_DISABLED)

    def set_power_limit_mw(self, power_limit_mw: int) -> None:
        _nvml(pynvml.nvmlDeviceSetPowerManagementLimit, self._handle, power_limit_mw)

    def set_gpu_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        _nvml(pynvml.nvmlDeviceSetGpuLockedClocks, self._handle, min_clock_mhz, max_clock_mhz)

    def reset_gpu_locked_clocks(self) -> None:
        _nvml(pynvml.nvmlDeviceResetGpuLockedClocks, self._handle)

    def set_mem_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        _nvml(pynvml.nvmlDeviceSetMemoryLockedClocks, self._handle, min_clock_mhz, max_clock_mhz)

    def reset_mem_locked_clocks(self) -> None:
        _nvml(pynvml.nvmlDeviceResetMemoryLockedClocks, self._handle)

    def reset_locked_clocks(self) -> None:
        reset_each_domain((self.reset_gpu_locked_clocks, self.reset_mem_locked_clocks))


def _nvml(function: Callable[..., Any], *args: Any) -> Any:
    """Call a pynvml function; an NVML failure becomes the DeviceError clients see."""
    try:
        return function(*args)
    except pynvml.NVMLError as e:
        raise nvml_device_error(_code(e)) from e


def _probe_pci_address(index: int, handle: object) -> str:
    """Bus id as ``dddd:bb:dd.0`` (function hard-coded, like upstream); "" on failure."""
    try:
        info = pynvml.nvmlDeviceGetPciInfo_v3(handle)
    except pynvml.NVMLError as e:
        log.warn("GPU {index}: cannot read PCI info: {error}", index=index, error=nvml_error_message(_code(e)))
        return ""
    domain: int = info.domain
    bus: int = info.bus
    device: int = info.device
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def _probe_energy_counter(index: int, handle: object) -> bool:
    """Whether the cumulative-energy counter works (Volta and newer)."""
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError as e:
        code = _code(e)
        if code == _NOT_SUPPORTED:
            log.info("GPU {index}: cumulative energy counter not supported", index=index)
        else:
            log.warn(
                "GPU {index}: cumulative energy counter failed at startup: {error}",
                index=index,
                error=nvml_error_message(code),
            )
        return False
    return True


def _probe_power_limit_range(index: int, handle: object) -> tuple[int, int] | None:
    """The accepted power limits, so impossible requests are refused with the range named."""
    try:
        low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
    except pynvml.NVMLError as e:
        log.info(
            "GPU {index}: power limit constraints unavailable ({error}); limits are checked by the driver only",
            index=index,
            error=nvml_error_message(_code(e)),
        )
        return None
    return int(low), int(high)


def _probe_instant_power_field(index: int, handle: object) -> bool:
    """Whether field 186 is supported; only NOT_SUPPORTED selects the fallback."""
    try:
        ret: int = pynvml.nvmlDeviceGetFieldValues(handle, _INSTANT_POWER_FIELDS)[0].nvmlReturn
    except pynvml.NVMLError as e:
        ret = _code(e)
    if ret == _NOT_SUPPORTED:
        log.warn(
            "GPU {index}: instant-power field not supported; reading nvmlDeviceGetPowerUsage instead",
            index=index,
        )
        return False
    if ret != _SUCCESS:
        log.warn(
            "GPU {index}: instant-power probe failed: {error}", index=index, error=nvml_error_message(ret)
        )
    return True


class NvmlBackend:
    """The GPUs NVML reported at startup, and the library's lifetime."""

    def __init__(self, gpus: Sequence[NvmlGPU], initialized: bool) -> None:
        self._gpus: tuple[NvmlGPU, ...] = tuple(gpus)
        self._initialized = initialized
        self._loaded = initialized

    @property
    def gpus(self) -> Sequence[NvmlGPU]:
        return self._gpus

    @property
    def library_loaded(self) -> bool:
        """False when libnvidia-ml.so.1 could not be loaded (no NVIDIA driver here)."""
        return self._loaded

    @property
    def absence(self) -> str:
        if not self._loaded:
            return "the NVML library (libnvidia-ml.so.1) could not be loaded; is the NVIDIA driver installed?"
        return "NVML reports no GPU"

    def close(self) -> None:
        """Shut NVML down once (it is refcounted per nvmlInit)."""
        if not self._initialized:
            return
        self._initialized = False
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            log.warn("nvmlShutdown failed: {error}", error=nvml_error_message(_code(e)))


def open_nvml_backend() -> NvmlBackend:
    """Initialise NVML and open every GPU it reports.

    A library that cannot be loaded means "no NVIDIA GPUs here" (zero GPUs;
    the GPU service decides whether that is an error); any other NVML failure during init or enumeration aborts startup
    with ``StartupError("NVML error: ...")``.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        log.debug("NVML library (libnvidia-ml.so.1) could not be loaded")
        return NvmlBackend((), initialized=False)
    except pynvml.NVMLError as e:
        raise StartupError(nvml_error_message(_code(e))) from e
    try:
        count: int = pynvml.nvmlDeviceGetCount()
        gpus = [NvmlGPU.open(index) for index in range(count)]
    except pynvml.NVMLError as e:
        NvmlBackend((), initialized=True).close()
        raise StartupError(nvml_error_message(_code(e))) from e
    if not gpus:
        log.info("NVML reports no GPUs")
    for gpu in gpus:
        log.info(
            "GPU {index}: {name} at {pci}{energy}{power}",
            index=gpu.index,
            name=gpu.name,
            pci=gpu.pci_address or "(unknown PCI address)",
            energy="" if gpu.energy_counter_available else ", no energy counter",
            power=", power via nvmlDeviceGetPowerUsage" if gpu.uses_power_usage_fallback else "",
        )
    return NvmlBackend(gpus, initialized=True)
