"""CPU packages: energy zones, wraparound compensation and the package type.

A backend only has to provide :class:`EnergyZone` objects (a raw counter that
wraps at ``max_energy_range_uj``); everything above that, including the
wraparound logic, is shared by RAPL and the simulator.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, Sequence

from twisted.logger import Logger

from zeusd.devices.base import DeviceError

log = Logger()


class EnergyZone(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def max_energy_range_uj(self) -> int: ...

    def read_raw_uj(self) -> int:
        """The raw counter in µJ; raises DeviceError. Blocks (file I/O)."""
        ...


class MonotonicEnergy:
    """A zone's counter made monotonic across wraparound (and across glitches).

    ``raw < last`` by more than half the range is a wrap (the counter passed
    ``max_energy_range_uj``); a smaller step backwards is a faulty reading,
    which is absorbed so the reported value never decreases. One shared
    instance serves every reader of the zone, so each read also helps catch
    wraps for the others; every read is serialized with its bookkeeping, so a
    reader can never apply a raw value older than one already applied.
    """

    def __init__(self, zone: EnergyZone) -> None:
        self.zone = zone
        self._lock = threading.Lock()
        self._last_raw: int | None = None
        self._offset = 0
        #: time.monotonic() of the last successful read (for the wrap guard).
        self.last_read_at = float("-inf")

    def read_uj(self) -> int:
        # The raw read is inside the lock: two readers that read in one order and
        # booked in the other would make the newer value look like a step back.
        with self._lock:
            raw = self.zone.read_raw_uj()
            last = self._last_raw
            if last is not None and raw < last:
                if last - raw > self.zone.max_energy_range_uj // 2:
                    self._offset += self.zone.max_energy_range_uj
                else:
                    self._offset += last - raw
                    log.warn(
                        "RAPL zone {zone} went backwards from {last} to {raw} uJ; ignoring the step",
                        zone=self.zone.name,
                        last=last,
                        raw=raw,
                    )
            self._last_raw = raw
            self.last_read_at = time.monotonic()
            return raw + self._offset


class CpuPackage:
    """One CPU package (socket), with its DRAM sub-zone when the platform has one."""

    def __init__(self, index: int, package: EnergyZone, dram: EnergyZone | None) -> None:
        self.index = index
        self.package = MonotonicEnergy(package)
        self.dram = None if dram is None else MonotonicEnergy(dram)

    @property
    def dram_available(self) -> bool:
        return self.dram is not None

    @property
    def zones(self) -> tuple[MonotonicEnergy, ...]:
        return (self.package,) if self.dram is None else (self.package, self.dram)

    def read_energy_uj(self, cpu: bool = True, dram: bool = True) -> tuple[int | None, int | None]:
        cpu_uj = self.package.read_uj() if cpu else None
        dram_uj = self.dram.read_uj() if dram and self.dram is not None else None
        return cpu_uj, dram_uj


class CPUBackend(Protocol):
    @property
    def packages(self) -> Sequence[CpuPackage]: ...


def io_error(error: OSError | ValueError) -> DeviceError:
    """Upstream's ``IOError: <text>`` message for a failed sysfs read."""
    if isinstance(error, OSError) and error.strerror:
        return DeviceError(f"IOError: {error.strerror} (os error {error.errno})")
    return DeviceError(f"IOError: {error}")
