"""The CPU packages as the service sees them: non-blocking reads and power math.

Every read of a package runs on that package's own executor (one thread per
package, like upstream's per-package worker), so a package whose sysfs read
hangs holds only its own thread, and reads of one package never race each
other. Concurrent requests for the same reading share one call
(:class:`SingleFlight`), which also bounds what can queue up behind a hung read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.base import CpuPackage, MonotonicEnergy
from zeusd.devices.executor import Executor, ExecutorFactory, SingleFlight, gather_within
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


def hung_error(index: int) -> DeviceError:
    return DeviceError(f"CPU {index} did not answer within {DEVICE_TIMEOUT_S:g} s.")


def wrap_guard_interval(zones: Sequence[MonotonicEnergy]) -> float:
    """Half the shortest time any zone can take to wrap at ``MAX_PLAUSIBLE_ZONE_W``.

    A counter is only corrected for wraparound if it is read at least once per
    wrap, and nothing else may read an idle package for hours (about two
    minutes between guard reads on Intel parts).
    """
    shortest = min(z.zone.max_energy_range_uj for z in zones) / (MAX_PLAUSIBLE_ZONE_W * 1e6)
    return min(max(shortest / 2, 1.0), 600.0)


class CpuManager:
    def __init__(self, reactor: Any, executors: ExecutorFactory) -> None:
        self._reactor = reactor
        self._make_executor = executors
        self.packages: dict[int, CpuPackage] = {}
        self._executors: dict[int, Executor] = {}
        self._reads: dict[int, SingleFlight] = {}
        #: Called on the reactor thread with (package, what) for every failed read (metrics).
        self.on_read_error: Callable[[int, str], None] | None = None

    def open(self, packages: Sequence[CpuPackage]) -> None:
        """Take the packages and start one executor for each."""
        self.packages = {p.index: p for p in packages}
        self._executors = {i: self._make_executor(f"zeusd-cpu-{i}") for i in self.packages}
        self._reads = {i: SingleFlight(e.submit) for i, e in self._executors.items()}
        for executor in self._executors.values():
            executor.start()

    def close(self) -> None:
        for executor in self._executors.values():
            executor.stop()

    @property
    def ids(self) -> list[int]:
        return list(self.packages)

    def read_energy(self, ids: Iterable[int], cpu: bool, dram: bool) -> "Deferred[Results[tuple[int | None, int | None]]]":
        return self._gather_bounded(
            {
                i: self._reads[i].call(("energy", cpu, dram), self.packages[i].read_energy_uj, cpu, dram)
                for i in dict.fromkeys(ids)
            }
        )

    def sample(self, ids: Iterable[int]) -> "Deferred[Results[EnergySample]]":
        """Both counters of each package, for power computed from deltas (bounded wait)."""
        return self._gather_bounded({i: self.sample_one(i) for i in dict.fromkeys(ids)})

    def sample_one(self, index: int) -> "Deferred[EnergySample]":
        """One package's counters, shared with concurrent readers; unbounded (for streams)."""
        return self._reads[index].call("sample", _sample, self.packages[index])

    def read_stale(self, older_than_s: float) -> None:
        """Read every zone no one has read for ``older_than_s`` (the wraparound guard).

        One guard read per package at a time: behind a hung read, nothing piles up.
        """
        now = time.monotonic()
        for index, package in self.packages.items():
            stale = [z for z in package.zones if now - z.last_read_at > older_than_s]
            if stale:
                d: Deferred[None] = self._reads[index].call("guard", _read_quietly, stale)
                d.addErrback(_guard_failed, index)

    def read_failed(self, failure: Failure, index: int, what: str = "energy read") -> DeviceError:
        """Count a failed read and turn it into the DeviceError clients see."""
        if self.on_read_error is not None:
            self.on_read_error(index, what)
        if isinstance(failure.value, DeviceError):
            return failure.value
        if failure.check(TimeoutError, CancelledError):
            return hung_error(index)
        log.failure("Unexpected error from CPU {index}", failure, index=index)
        return DeviceError(f"IOError: {failure.getErrorMessage()}")

    def _gather_bounded(self, reads: "dict[int, Deferred[Any]]") -> "Deferred[Results[Any]]":
        return gather_within(self._reactor, reads, DEVICE_TIMEOUT_S, self.read_failed)


def _guard_failed(failure: Failure, index: int) -> None:
    log.failure("Wraparound guard read of CPU {index} failed", failure, index=index)


def _read_quietly(zones: list[MonotonicEnergy]) -> None:
    for zone in zones:
        try:
            zone.read_uj()
        except DeviceError:
            pass
