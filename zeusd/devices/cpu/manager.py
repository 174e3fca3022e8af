"""The CPU packages as the service sees them: non-blocking reads and power math."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.base import CpuPackage, MonotonicEnergy
from zeusd.devices.executor import SingleFlight, gather_within, on_pool
from zeusd.devices.readings import Results, wall_clock_ms

log = Logger()

DEVICE_TIMEOUT_S = 5.0
#: The most power one zone is assumed to draw, to size the wraparound guard.
MAX_PLAUSIBLE_ZONE_W = 1000.0


@dataclass(frozen=True, slots=True)
class EnergySample:
    """Both counters of one package read together, with both clocks."""

    cpu_uj: int
    dram_uj: int | None
    monotonic_s: float
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class PackagePower:
    cpu_mw: int
    dram_mw: int | None


def power_between(before: EnergySample, after: EnergySample) -> PackagePower:
    """Average power over the measured time between two samples."""
    elapsed_us = max(1, round((after.monotonic_s - before.monotonic_s) * 1e6))

    def mw(a: int, b: int) -> int:
        return min(max(0, b - a) * 1000 // elapsed_us, 0xFFFFFFFF)

    dram = None
    if before.dram_uj is not None and after.dram_uj is not None:
        dram = mw(before.dram_uj, after.dram_uj)
    return PackagePower(mw(before.cpu_uj, after.cpu_uj), dram)


def _sample(package: CpuPackage) -> EnergySample:
    cpu, dram = package.read_energy_uj(True, True)
    assert cpu is not None
    return EnergySample(cpu, dram, time.monotonic(), wall_clock_ms())


class CpuManager:
    def __init__(self, reactor: Any, packages: Sequence[CpuPackage]) -> None:
        self._reactor = reactor
        self.packages = {p.index: p for p in packages}
        self._reads = SingleFlight(on_pool(reactor, reactor.getThreadPool()))
        self._guard: LoopingCall | None = None
        #: Called on the reactor thread with (package, what) for every failed read (metrics).
        self.on_read_error: Callable[[int, str], None] | None = None

    @property
    def ids(self) -> list[int]:
        return list(self.packages)

    def read_energy(self, ids: Iterable[int], cpu: bool, dram: bool) -> "Deferred[Results[tuple[int | None, int | None]]]":
        return self._gather_bounded(
            {
                i: self._reads.call(("energy", i, cpu, dram), self.packages[i].read_energy_uj, cpu, dram)
                for i in dict.fromkeys(ids)
            }
        )

    def sample(self, ids: Iterable[int], skip_busy: bool = False) -> "Deferred[Results[EnergySample]]":
        """Both counters of each package, for power computed from deltas."""
        reads = {}
        for i in dict.fromkeys(ids):
            key = ("sample", i)
            if skip_busy and self._reads.in_flight(key):
                continue
            reads[i] = self._reads.call(key, _sample, self.packages[i])
        return self._gather_bounded(reads)

    def _gather_bounded(self, reads: "dict[int, Deferred[Any]]") -> "Deferred[Results[Any]]":
        return gather_within(self._reactor, reads, DEVICE_TIMEOUT_S, self._read_failed)

    def _read_failed(self, failure: Failure, index: int) -> DeviceError:
        if self.on_read_error is not None:
            self.on_read_error(index, "energy read")
        if isinstance(failure.value, DeviceError):
            return failure.value
        if failure.check(TimeoutError, CancelledError):
            return DeviceError(f"CPU {index} did not answer within {DEVICE_TIMEOUT_S:g} s.")
        log.failure("Unexpected error from CPU {index}", failure, index=index)
        return DeviceError(f"IOError: {failure.getErrorMessage()}")

    # Wraparound guard -------------------------------------------------------

    def start_wrap_guard(self) -> None:
        """Read idle counters often enough that no wrap can go unseen.

        A counter is only corrected for wraparound if it is read at least once
        per wrap; nothing else may read an idle package for hours. The guard
        runs at half the shortest time any zone can take to wrap at
        ``MAX_PLAUSIBLE_ZONE_W`` (about two minutes on Intel parts) and skips
        zones that something else read recently.
        """
        zones = self._zones()
        if not zones:
            return
        shortest = min(z.zone.max_energy_range_uj for z in zones) / (MAX_PLAUSIBLE_ZONE_W * 1e6)
        interval = min(max(shortest / 2, 1.0), 600.0)
        self._guard = LoopingCall(self._guard_tick, interval)
        self._guard.clock = self._reactor
        self._guard.start(interval, now=False).addErrback(
            lambda f: log.failure("RAPL wraparound guard stopped", f)
        )

    def _zones(self) -> list[MonotonicEnergy]:
        return [z for p in self.packages.values() for z in (p.package, p.dram) if z is not None]

    def _guard_tick(self, interval: float) -> "Deferred[Any] | None":
        now = time.monotonic()
        stale = [z for z in self._zones() if now - z.last_read_at > interval]
        if not stale:
            return None
        return self._reads.call(("guard",), _read_quietly, stale)

    def stop(self) -> None:
        if self._guard is not None and self._guard.running:
            self._guard.stop()


def _read_quietly(zones: list[MonotonicEnergy]) -> None:
    for zone in zones:
        try:
            zone.read_uj()
        except DeviceError:
            pass
