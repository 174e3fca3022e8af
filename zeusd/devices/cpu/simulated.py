"""Simulated RAPL zones: synthetic power integrated into counters that really wrap.

The counter range is the one Intel CPUs report (about 262 kJ), and package
counters start a minute short of it, so wraparound happens early in any demo
and the shared compensation logic in :mod:`zeusd.devices.cpu.base` is
exercised as on hardware.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from zeusd.devices.cpu.base import CpuPackage

SIMULATED_RANGE_UJ = 262_143_328_850


@dataclass
class SimulatedZone:
    """Energy of ``base_w + swing_w * sin(t / period_s + phase)`` since ``start``."""

    name: str
    base_w: float
    swing_w: float
    period_s: float
    phase: float
    max_energy_range_uj: int = SIMULATED_RANGE_UJ
    clock: Callable[[], float] = time.monotonic
    start: float = field(default_factory=time.monotonic)
    offset_uj: int = 0

    def read_raw_uj(self) -> int:
        t = self.clock() - self.start
        # Closed-form integral: no state, exact at any read rate.
        joules = self.base_w * t + self.swing_w * self.period_s * (
            math.cos(self.phase) - math.cos(t / self.period_s + self.phase)
        )
        return (self.offset_uj + int(joules * 1e6)) % self.max_energy_range_uj


def simulated_packages(count: int) -> list[CpuPackage]:
    """Package 0 has DRAM, the others do not (as on many two-socket boxes' views)."""
    packages = []
    for i in range(count):
        start_uj = SIMULATED_RANGE_UJ - (60 + 30 * i) * 100_000_000
        package = SimulatedZone(f"package-{i}", 95.0 + 10 * i, 35.0, 7.0, i * 1.3, offset_uj=start_uj)
        dram = SimulatedZone("dram", 9.0, 3.0, 5.0, i) if i == 0 else None
        packages.append(CpuPackage(i, package, dram))
    return packages
