"""The stand-in NVML and AMD SMI libraries behind one interface, for suites that run on both.

A suite that drives real daemons on either backend states each behaviour
once and asks the stand-in for what differs: the daemon's flags and
environment, which library functions an operation calls (to inject errors and
delays, and to read the call log), each backend's error codes and texts, its
units, and the calls a command should make. ``STAND_INS`` maps a backend name
to its class.

The expected calls are the library's view of a command, as its call log
records them (``(function, args)``); each AMD clock range is written min then
max (the backend's order when the new min is not above the current max, as in
every range used here).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from tests.fakeamdsmi import (
    AMDSMI_STATUS_DRIVER_NOT_LOADED,
    AMDSMI_STATUS_INVAL,
    AMDSMI_STATUS_IO,
    AMDSMI_STATUS_NO_PERM,
    AMDSMI_STATUS_NOT_FOUND,
    AMDSMI_STATUS_NOT_SUPPORTED,
    AMDSMI_STATUS_TIMEOUT,
    FakeAmdSmi,
    power_info_function,
)
from tests.fakelib import FakeLibrary
from tests.fakenvml import FIELD_POWER_INSTANT, FakeNvml

__all__ = [
    "AMD_PERSISTENCE_UNSUPPORTED",
    "AMD_SINGLE_DOMAIN_RESET",
    "FAILURE_KINDS",
    "STAND_INS",
    "AmdSmiStandIn",
    "Call",
    "Failure",
    "GpuStandIn",
    "NvmlStandIn",
    "amdsmi_bindings_installed",
]

#: One call as the stand-in's log records it: (function, args).
Call = tuple[str, tuple[str, ...]]


def amdsmi_bindings_installed() -> bool:
    return importlib.util.find_spec("amdsmi") is not None


@dataclass(frozen=True)
class Failure:
    """A library failure: the code to inject, and the HTTP status and message zeusd answers with."""

    code: int
    status: int
    text: str


#: The failure kinds every backend has (``GpuStandIn.failures`` keys).
FAILURE_KINDS = ("invalid", "not_supported", "no_permission", "timeout", "lost", "unknown", "unmapped")


class GpuStandIn(ABC):
    """One stand-in library with its state in ``directory`` (4 default GPUs once :meth:`create` ran)."""

    backend: ClassVar[str]
    #: Each kind of FAILURE_KINDS in this backend's codes and words.
    failures: ClassVar[dict[str, Failure]]
    #: Operation -> the library functions it calls; the first is where errors and delays are injected.
    functions: ClassVar[dict[str, tuple[str, ...]]]
    #: Every function that changes a GPU.
    control_functions: ClassVar[tuple[str, ...]]
    #: The library's first call, made once per process that opens it.
    init_function: ClassVar[str]
    #: What a default GPU reads, in the protocol's units.
    default_power_mw: ClassVar[int]
    default_limit_mw: ClassVar[int]
    limit_range_mw: ClassVar[tuple[int, int]]
    #: Per clock domain (``gpu``, ``mem``): a range the GPU accepts, and what :meth:`clocks` reads when unlocked.
    clock_example: ClassVar[dict[str, tuple[int, int]]]
    unlocked_clocks: ClassVar[dict[str, tuple[int, int] | None]]
    #: What a GPU without an energy counter answers to an energy read.
    no_energy_counter: ClassVar[Failure]

    fake: FakeLibrary

    @abstractmethod
    def __init__(self, directory: Path) -> None:
        """The stand-in's state file and call log live in ``directory``."""

    @property
    def args(self) -> list[str]:
        """The daemon flags that select this backend."""
        return ["--gpu-backend", self.backend]

    def env(self) -> dict[str, str]:
        return self.fake.env()

    def create(self, num_gpus: int = 4) -> None:
        """A fresh state of default GPUs: no faults, nothing locked."""
        self.fake.create(num_gpus)

    # ---- faults

    def inject(self, operation: str, failure: str, gpu: int | None = None) -> None:
        self.fake.inject_error(self.functions[operation][0], self.failures[failure].code, gpu=gpu)

    def delay(self, operation: str, ms: int, gpu: int | None = None) -> None:
        self.fake.set_delay(self.functions[operation][0], ms, gpu=gpu)

    def count(self, operation: str, gpu: int | None = None) -> int:
        return self.fake.count(self.functions[operation], gpu=gpu)

    def wait_for(self, operation: str, gpu: int, at_least: int) -> None:
        self.fake.wait_for_calls(self.functions[operation], gpu=gpu, at_least=at_least)

    def control_calls(self, gpu: int) -> list[Call]:
        return [(c.name, c.args) for c in self.fake.calls(self.control_functions, gpu=gpu)]

    @abstractmethod
    def set_lost(self, gpu: int, lost: bool = True) -> None:
        """A GPU gone from the bus: every call on it fails with ``failures["lost"]``."""

    @abstractmethod
    def fail_power_read(self, gpu: int, failure: str | None) -> None:
        """Make the power reading of ``gpu`` fail the backend's own way (None: read again)."""

    # ---- state, in the protocol's units

    @abstractmethod
    def power_limit_mw(self, gpu: int) -> int: ...

    @abstractmethod
    def clocks(self, gpu: int, domain: str) -> tuple[int, int] | None:
        """The clock range of ``domain`` as the library holds it (``unlocked_clocks`` when free)."""

    @abstractmethod
    def set_power_mw(self, gpu: int, mw: int) -> None: ...

    @abstractmethod
    def set_energy_mj(self, gpu: int, mj: int) -> None:
        """The counter reads ``mj`` from now on (it stops counting)."""

    @abstractmethod
    def set_limits_mw(self, gpu: int, limit: int, low: int, high: int) -> None: ...

    @abstractmethod
    def without_energy_counter(self, gpu: int) -> None: ...

    # ---- the calls a command makes

    @abstractmethod
    def limit_calls(self, mw: int) -> list[Call]: ...

    @abstractmethod
    def clock_calls(self, domain: str, low: int, high: int) -> list[Call]: ...

    @abstractmethod
    def failed_clock_calls(self, domain: str, low: int, high: int) -> list[Call]:
        """The calls of a clock command whose every write fails, on a GPU whose range is the default."""

    @abstractmethod
    def reset_calls(self) -> list[Call]: ...

    @abstractmethod
    def startup_failures(self) -> dict[str, tuple[Callable[[], None], str]]:
        """Each way startup fails: name -> (how to break the library, the daemon's ``Error:`` message)."""

    @property
    @abstractmethod
    def no_gpu(self) -> str:
        """Why the backend has no GPU when the library reports none."""


class NvmlStandIn(GpuStandIn):
    backend = "nvml"
    failures = {
        "invalid": Failure(2, 400, "NVML error: a supplied argument was invalid"),
        "not_supported": Failure(3, 400, "NVML error: the requested operation is not available on the target device"),
        "no_permission": Failure(
            4, 403, "NVML error: the current user does not have permission to perform this operation"
        ),
        "timeout": Failure(10, 500, "NVML error: the provided timeout was reached"),
        "lost": Failure(15, 500, "NVML error: device fell off the bus or has otherwise become inacessible"),
        "unknown": Failure(999, 500, "NVML error: an internal driver error occurred"),
        "unmapped": Failure(42, 500, "NVML error: unexpected enum variant value: 42"),
    }
    functions = {
        "power": ("nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage"),
        "energy": ("nvmlDeviceGetTotalEnergyConsumption",),
        "set_power_limit": ("nvmlDeviceSetPowerManagementLimit",),
        "set_gpu_clocks": ("nvmlDeviceSetGpuLockedClocks",),
        "set_mem_clocks": ("nvmlDeviceSetMemoryLockedClocks",),
        "reset_locked_clocks": ("nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks"),
        "set_persistence_mode": ("nvmlDeviceSetPersistenceMode",),
        "reset_gpu_clocks": ("nvmlDeviceResetGpuLockedClocks",),
        "reset_mem_clocks": ("nvmlDeviceResetMemoryLockedClocks",),
    }
    control_functions = (
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceSetGpuLockedClocks",
        "nvmlDeviceSetMemoryLockedClocks",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceResetMemoryLockedClocks",
        "nvmlDeviceSetPersistenceMode",
    )
    init_function = "nvmlInitWithFlags"
    default_power_mw = 150_000
    default_limit_mw = 700_000
    limit_range_mw = (200_000, 700_000)
    clock_example = {"gpu": (1000, 1500), "mem": (2619, 2619)}
    unlocked_clocks: ClassVar[dict[str, tuple[int, int] | None]] = {"gpu": None, "mem": None}
    no_energy_counter = failures["not_supported"]

    def __init__(self, directory: Path) -> None:
        self.fake: FakeNvml = FakeNvml(directory / "nvml.state", directory / "nvml.log")

    def set_lost(self, gpu: int, lost: bool = True) -> None:
        self.fake.set_lost(gpu, lost)

    def fail_power_read(self, gpu: int, failure: str | None) -> None:
        """The per-field return code of field 186, not the call's."""
        self.fake.set_field_return(gpu, FIELD_POWER_INSTANT, self.failures[failure].code if failure else 0)

    def power_limit_mw(self, gpu: int) -> int:
        return int(self.fake.gpu(gpu).power_limit_mw)

    def clocks(self, gpu: int, domain: str) -> tuple[int, int] | None:
        state = self.fake.gpu(gpu)
        value: tuple[int, int] | None = state.gpu_locked_clocks if domain == "gpu" else state.mem_locked_clocks
        return value

    def set_power_mw(self, gpu: int, mw: int) -> None:
        self.fake.set_gpu(gpu, power_mw=mw)

    def set_energy_mj(self, gpu: int, mj: int) -> None:
        self.fake.set_gpu(gpu, energy_mj=mj, energy_step_mj=0)

    def set_limits_mw(self, gpu: int, limit: int, low: int, high: int) -> None:
        self.fake.set_gpu(gpu, power_limit_mw=limit, min_power_limit_mw=low, max_power_limit_mw=high)

    def without_energy_counter(self, gpu: int) -> None:
        self.fake.set_gpu(gpu, energy_supported=False)

    def limit_calls(self, mw: int) -> list[Call]:
        return [("nvmlDeviceSetPowerManagementLimit", (str(mw),))]

    def clock_calls(self, domain: str, low: int, high: int) -> list[Call]:
        return [(self.functions[f"set_{domain}_clocks"][0], (str(low), str(high)))]

    def failed_clock_calls(self, domain: str, low: int, high: int) -> list[Call]:
        return self.clock_calls(domain, low, high)

    def reset_calls(self) -> list[Call]:
        return [("nvmlDeviceResetGpuLockedClocks", ()), ("nvmlDeviceResetMemoryLockedClocks", ())]

    def startup_failures(self) -> dict[str, tuple[Callable[[], None], str]]:
        fake = self.fake
        return {
            "driver not loaded": (lambda: fake.set_init_error(9), "NVML error: NVIDIA driver is not loaded"),
            "version mismatch": (lambda: fake.set_init_error(18), "NVML error: RM detects a driver/library version mismatch"),
            "lost GPU": (lambda: fake.set_lost(1), self.failures["lost"].text),
            "count fails": (lambda: fake.inject_error("nvmlDeviceGetCount_v2", 999), self.failures["unknown"].text),
        }

    @property
    def no_gpu(self) -> str:
        return "NVML reports no GPU"


#: What AMD GPUs answer (400) for the operations they do not have (the simulated ones too).
AMD_PERSISTENCE_UNSUPPORTED = "Invalid request: persistence mode is not supported on AMD GPUs"
AMD_SINGLE_DOMAIN_RESET = (
    "Invalid request: AMD GPUs cannot reset a single clock domain; use reset_locked_clocks to reset all domains"
)


def _amdsmi_text(status: int, words: str) -> str:
    return f"AMDSMI error {status}: {words}"


class AmdSmiStandIn(GpuStandIn):
    backend = "amdsmi"
    failures = {
        "invalid": Failure(AMDSMI_STATUS_INVAL, 400, _amdsmi_text(1, "AMDSMI_STATUS_INVAL - Invalid parameters")),
        "not_supported": Failure(
            AMDSMI_STATUS_NOT_SUPPORTED, 400, _amdsmi_text(2, "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported")
        ),
        "no_permission": Failure(
            AMDSMI_STATUS_NO_PERM, 403, _amdsmi_text(10, "AMDSMI_STATUS_NO_PERM - Permission Denied")
        ),
        "timeout": Failure(AMDSMI_STATUS_TIMEOUT, 500, _amdsmi_text(8, "AMDSMI_STATUS_TIMEOUT - Timeout in API call")),
        "lost": Failure(AMDSMI_STATUS_NOT_FOUND, 500, _amdsmi_text(31, "AMDSMI_STATUS_NOT_FOUND - Device Not found")),
        "unknown": Failure(AMDSMI_STATUS_IO, 500, _amdsmi_text(12, "AMDSMI_STATUS_IO - I/O Error")),
        "unmapped": Failure(77, 500, _amdsmi_text(77, "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred")),
    }
    functions = {
        "power": (power_info_function(),),
        "energy": ("amdsmi_get_energy_count",),
        "set_power_limit": ("amdsmi_set_power_cap",),
        "set_gpu_clocks": ("amdsmi_set_gpu_clk_limit",),
        "set_mem_clocks": ("amdsmi_set_gpu_clk_limit",),
        "reset_locked_clocks": ("amdsmi_set_gpu_perf_level",),
    }
    control_functions = ("amdsmi_set_power_cap", "amdsmi_set_gpu_clk_limit", "amdsmi_set_gpu_perf_level")
    init_function = "amdsmi_init"
    default_power_mw = 350_000
    default_limit_mw = 750_000
    limit_range_mw = (200_000, 750_000)
    clock_example = {"gpu": (1000, 1500), "mem": (1000, 1200)}
    #: The driver's full ranges (performance level AUTO).
    unlocked_clocks: ClassVar[dict[str, tuple[int, int] | None]] = {"gpu": (500, 2100), "mem": (900, 1300)}
    no_energy_counter = Failure(
        AMDSMI_STATUS_NOT_SUPPORTED,
        400,
        "Invalid request: The cumulative energy counter of this GPU is not available. It is either "
        "unsupported or failed validation at zeusd startup (see https://github.com/ROCm/amdsmi/issues/38). "
        "Poll /gpu/get_power and integrate over time instead.",
    )
    #: amdsmi_set_gpu_clk_limit's clock type per domain (AMDSMI_CLK_TYPE_GFX, _MEM).
    _CLK_TYPE = {"gpu": "0", "mem": "4"}

    def __init__(self, directory: Path) -> None:
        self.fake: FakeAmdSmi = FakeAmdSmi(directory / "amdsmi.state", directory / "amdsmi.log")

    @property
    def library_path(self) -> str:
        """Where the bindings load the stand-in from (ROCM_HOME), as AMD SMI's messages name it."""
        return str(self.fake.lib_dir.resolve() / "lib" / "libamd_smi.so")

    def set_lost(self, gpu: int, lost: bool = True) -> None:
        self.fake.set_lost(gpu, lost, self.failures["lost"].code)

    def fail_power_read(self, gpu: int, failure: str | None) -> None:
        function = self.functions["power"][0]
        if failure is None:
            self.fake.clear_error(function, gpu)
        else:
            self.fake.inject_error(function, self.failures[failure].code, gpu=gpu)

    def power_limit_mw(self, gpu: int) -> int:
        return int(self.fake.gpu(gpu).power_cap_uw) // 1000

    def clocks(self, gpu: int, domain: str) -> tuple[int, int] | None:
        state = self.fake.gpu(gpu)
        if domain == "gpu":
            return int(state.gfx_min_mhz), int(state.gfx_max_mhz)
        return int(state.mem_min_mhz), int(state.mem_max_mhz)

    def set_power_mw(self, gpu: int, mw: int) -> None:
        if mw % 1000:
            raise ValueError("AMD SMI reports whole watts")
        self.fake.set_gpu(gpu, current_power_w=mw // 1000)

    def set_energy_mj(self, gpu: int, mj: int) -> None:
        # 1 mJ ticks (1000.0 uJ, exact in the library's float), so ticks x resolution is exact.
        self.fake.set_gpu(gpu, energy_counter=mj, energy_resolution_nj=1_000_000, energy_step=0)

    def set_limits_mw(self, gpu: int, limit: int, low: int, high: int) -> None:
        self.fake.set_gpu(gpu, power_cap_uw=limit * 1000, min_power_cap_uw=low * 1000, max_power_cap_uw=high * 1000)

    def without_energy_counter(self, gpu: int) -> None:
        self.fake.set_gpu(gpu, energy_supported=False)

    def limit_calls(self, mw: int) -> list[Call]:
        return [("amdsmi_set_power_cap", ("0", str(mw * 1000)))]

    def clock_calls(self, domain: str, low: int, high: int) -> list[Call]:
        clk = self._CLK_TYPE[domain]
        return [("amdsmi_set_gpu_clk_limit", (clk, "0", str(low))), ("amdsmi_set_gpu_clk_limit", (clk, "1", str(high)))]

    def failed_clock_calls(self, domain: str, low: int, high: int) -> list[Call]:
        """The min write fails, is retried once after re-reading the range, then the old min is restored (fails too)."""
        clk = self._CLK_TYPE[domain]
        unlocked = self.unlocked_clocks[domain]
        assert unlocked is not None
        return [("amdsmi_set_gpu_clk_limit", (clk, "0", str(mhz))) for mhz in (low, low, unlocked[0])]

    def reset_calls(self) -> list[Call]:
        return [("amdsmi_set_gpu_perf_level", ("0",))]  # AMDSMI_DEV_PERF_LEVEL_AUTO

    def startup_failures(self) -> dict[str, tuple[Callable[[], None], str]]:
        fake, where = self.fake, self.library_path
        return {
            "no permission": (
                lambda: fake.set_init_error(AMDSMI_STATUS_NO_PERM),
                f"AMD SMI initialisation failed ({where}): {self.failures['no_permission'].text}",
            ),
            # No driver is "AMD SMI unavailable": fatal only because the backend was asked for.
            "driver not loaded": (
                lambda: fake.set_init_error(AMDSMI_STATUS_DRIVER_NOT_LOADED),
                f"--gpu-backend amdsmi: AMD SMI initialisation failed ({where}): "
                + _amdsmi_text(34, "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded"),
            ),
            "lost GPU": (lambda: self.set_lost(1), f"AMD SMI cannot enumerate the GPUs: {self.failures['lost'].text}"),
            "handles fail": (
                lambda: fake.inject_error("amdsmi_get_socket_handles", AMDSMI_STATUS_IO),
                f"AMD SMI cannot enumerate the GPUs: {self.failures['unknown'].text}",
            ),
        }

    @property
    def no_gpu(self) -> str:
        return "AMD SMI reports no GPU"


STAND_INS: dict[str, type[GpuStandIn]] = {"nvml": NvmlStandIn, "amdsmi": AmdSmiStandIn}
