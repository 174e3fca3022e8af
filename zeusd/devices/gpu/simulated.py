"""Simulated GPUs for demos and for running every endpoint without hardware.

An NVIDIA H100-like GPU by default, or an AMD MI300X-like one
(``--simulate-vendor amd``). Power follows a slowly varying synthetic
workload, is capped by the power limit and scales with the locked GPU clock;
energy integrates that power. Its errors mirror the real backend's (same
texts, same statuses), and so do the operations an AMD GPU does not have
(persistence mode, resetting one clock domain), so the web and client layers
meet each vendor's behaviour on a simulated node.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from zeusd.devices.base import DeviceError

MIN_LIMIT_MW = 200_000
MAX_LIMIT_MW = 700_000
IDLE_MW = 70_000
PEAK_DEMAND_MW = 650_000
MAX_GPU_CLOCK_MHZ = 1980
MAX_MEM_CLOCK_MHZ = 2619
MIN_CLOCK_MHZ = 210


@dataclass(frozen=True)
class Vendor:
    """What differs between the simulated NVIDIA and AMD GPUs."""

    name: str
    pci_function: int
    invalid_argument: str
    #: The 400 answers for operations the vendor's GPUs do not have (None: supported).
    no_persistence: str | None = None
    no_single_domain_reset: str | None = None


VENDORS = {
    "nvidia": Vendor("Simulated NVIDIA H100 80GB HBM3", 0, "NVML error: a supplied argument was invalid"),
    "amd": Vendor(
        "Simulated AMD Instinct MI300X",
        1,
        "AMDSMI error 1: AMDSMI_STATUS_INVAL - Invalid parameters",
        no_persistence="Invalid request: persistence mode is not supported on AMD GPUs",
        no_single_domain_reset=(
            "Invalid request: AMD GPUs cannot reset a single clock domain; use reset_locked_clocks to reset all domains"
        ),
    ),
}


@dataclass
class _Settings:
    power_limit_mw: int = MAX_LIMIT_MW
    persistence: bool = False
    gpu_clocks: tuple[int, int] | None = None
    mem_clocks: tuple[int, int] | None = None


class SimulatedGPU:
    def __init__(self, index: int, clock: Callable[[], float] = time.monotonic, vendor: str = "nvidia") -> None:
        self._index = index
        self._vendor = VENDORS[vendor]
        self._invalid = DeviceError(self._vendor.invalid_argument, 400)
        self._clock = clock
        self._lock = threading.Lock()
        self._settings = _Settings()
        self._phase = index * 1.7
        self._last_t = clock()
        self._energy_mj = 1_000_000.0 * (index + 1)

    @property
    def index(self) -> int:
        return self._index

    @property
    def name(self) -> str:
        return self._vendor.name

    @property
    def backend(self) -> str:
        return "simulated"

    @property
    def pci_address(self) -> str:
        return f"0000:{0x18 + 0x10 * self._index:02x}:00.{self._vendor.pci_function}"

    @property
    def energy_counter_available(self) -> bool:
        return True

    @property
    def power_limit_range_mw(self) -> tuple[int, int]:
        return MIN_LIMIT_MW, MAX_LIMIT_MW

    def _demand_mw(self, t: float) -> float:
        # A workload that breathes over tens of seconds, with some faster ripple.
        utilisation = 0.65 + 0.3 * math.sin(t / 9.0 + self._phase) + 0.05 * math.sin(t * 3.1 + self._phase)
        s = self._settings
        clock_factor = 1.0
        if s.gpu_clocks is not None:
            clock_factor *= (min(s.gpu_clocks[1], MAX_GPU_CLOCK_MHZ) / MAX_GPU_CLOCK_MHZ) ** 2
        if s.mem_clocks is not None:
            clock_factor *= 0.9 + 0.1 * min(s.mem_clocks[1], MAX_MEM_CLOCK_MHZ) / MAX_MEM_CLOCK_MHZ
        dynamic = utilisation * (PEAK_DEMAND_MW - IDLE_MW) * clock_factor
        return min(IDLE_MW + dynamic, float(s.power_limit_mw))

    def _advance(self) -> float:
        """Integrate energy up to now (trapezoid); call with the lock held."""
        now = self._clock()
        dt = now - self._last_t
        if dt > 0:
            self._energy_mj += (self._demand_mw(self._last_t) + self._demand_mw(now)) / 2 * dt  # mW × s = mJ
            self._last_t = now
        return now

    def get_instant_power_mw(self) -> int:
        with self._lock:
            return int(self._demand_mw(self._advance()))

    def get_total_energy_mj(self) -> int:
        with self._lock:
            self._advance()
            return int(self._energy_mj)

    def get_power_limit_mw(self) -> int:
        with self._lock:
            return self._settings.power_limit_mw

    def get_power_limit_constraints_mw(self) -> tuple[int, int]:
        return MIN_LIMIT_MW, MAX_LIMIT_MW

    def get_persistence_mode(self) -> bool:
        self._unless(self._vendor.no_persistence)
        with self._lock:
            return self._settings.persistence

    def set_persistence_mode(self, enabled: bool) -> None:
        self._unless(self._vendor.no_persistence)
        with self._lock:
            self._settings.persistence = enabled

    @staticmethod
    def _unless(unsupported: str | None) -> None:
        if unsupported is not None:
            raise DeviceError(unsupported, 400)

    def set_power_limit_mw(self, power_limit_mw: int) -> None:
        if not MIN_LIMIT_MW <= power_limit_mw <= MAX_LIMIT_MW:
            raise self._invalid
        with self._lock:
            self._advance()
            self._settings.power_limit_mw = power_limit_mw

    def set_gpu_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._set_clocks("gpu_clocks", min_clock_mhz, max_clock_mhz, MAX_GPU_CLOCK_MHZ)

    def reset_gpu_locked_clocks(self) -> None:
        self._unless(self._vendor.no_single_domain_reset)
        self._reset("gpu_clocks")

    def set_mem_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self._set_clocks("mem_clocks", min_clock_mhz, max_clock_mhz, MAX_MEM_CLOCK_MHZ)

    def reset_mem_locked_clocks(self) -> None:
        self._unless(self._vendor.no_single_domain_reset)
        self._reset("mem_clocks")

    def reset_locked_clocks(self) -> None:
        self._reset("gpu_clocks")
        self._reset("mem_clocks")

    def _reset(self, which: str) -> None:
        with self._lock:
            self._advance()
            setattr(self._settings, which, None)

    def _set_clocks(self, which: str, low: int, high: int, ceiling: int) -> None:
        # Like the driver: an inverted range is invalid; requests above the
        # hardware's range are clamped to it.
        if low > high or high < MIN_CLOCK_MHZ:
            raise self._invalid
        with self._lock:
            self._advance()
            setattr(self._settings, which, (max(low, MIN_CLOCK_MHZ), min(high, ceiling)))


class SimulatedGPUBackend:
    def __init__(self, count: int, vendor: str = "nvidia") -> None:
        self._gpus = [SimulatedGPU(i, vendor=vendor) for i in range(count)]

    @property
    def gpus(self) -> Sequence[SimulatedGPU]:
        return self._gpus

    @property
    def absence(self) -> str:
        return "the simulated node was given no GPUs (--simulate-gpus 0)"

    def close(self) -> None:
        pass
