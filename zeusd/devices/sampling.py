"""Power samplers for the stream pollers: one sample per tick, never waiting for a slow device.

A tick asks every wanted device for a reading and publishes, within the
tick's deadline, what the devices that answered in time returned. A device
whose read is still running is left out of that tick and is not asked again
until it answers (at most one read per device in flight); its late answer is
kept and goes out with the next tick, so a slow device rejoins by itself and
a hung one never holds up the others.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Mapping, Protocol, Sequence, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.manager import DEVICE_TIMEOUT_S as CPU_TIMEOUT_S
from zeusd.devices.cpu.manager import CpuManager, EnergySample, power_between
from zeusd.devices.gpu.manager import DEVICE_TIMEOUT_S as GPU_TIMEOUT_S
from zeusd.devices.gpu.manager import GpuManager
from zeusd.devices.readings import Reading, Sample, split_results, wall_clock_ms

log = Logger()
T = TypeVar("T")

#: Share of the poll period a tick waits for device answers before it publishes without the late ones.
TICK_DEADLINE_SHARE = 0.8


class Sampler(Protocol):
    """Reads one sample of the given devices (None: nothing to publish yet)."""

    def reset(self) -> None:
        """A new polling session begins: forget state from the last one."""

    def sample(self, ids: Sequence[int], within_s: float) -> "Deferred[Sample | None]": ...


class Round(Generic[T]):
    """Per-device reads for a poller that never waits for a slow device.

    ``read(id)`` starts one device's read; ``failed(failure, id)`` turns its
    failure into a DeviceError. A read outstanding for longer than
    ``hung_after_s`` is reported once as ``hung(id)`` (so streams log it and
    metrics count it), then the device stays out until it answers.
    """

    def __init__(
        self,
        clock: IReactorTime,
        read: Callable[[int], "Deferred[T]"],
        failed: Callable[[Failure, int], DeviceError],
        hung: Callable[[int], DeviceError],
        hung_after_s: float,
    ) -> None:
        self._clock = clock
        self._read = read
        self._failed = failed
        self._hung = hung
        self._hung_after_s = hung_after_s
        #: Device → when its outstanding read started, and whether it was reported hung.
        self._running: dict[int, list[Any]] = {}
        self._late: dict[int, T | DeviceError] = {}

    def reset(self) -> None:
        self._late.clear()

    def in_flight(self, index: int) -> bool:
        return index in self._running

    def collect(self, ids: Sequence[int], within_s: float) -> "Deferred[dict[int, T | DeviceError]]":
        """Each device's outcome that arrives within ``within_s`` (or arrived late since the last round)."""
        now = self._clock.seconds()
        results: dict[int, T | DeviceError] = {i: self._late.pop(i) for i in ids if i in self._late}
        started: dict[int, Deferred[T]] = {}
        for i in ids:
            running = self._running.get(i)
            if running is None:
                self._running[i] = [now, False]
                started[i] = self._read(i)
            elif not running[1] and now - running[0] >= self._hung_after_s:
                running[1] = True
                results[i] = self._hung(i)
        done: Deferred[dict[int, T | DeviceError]] = Deferred()
        waiting = set(started)
        timer: list[Any] = []

        def finish() -> None:
            if not done.called:
                if timer and timer[0].active():
                    timer[0].cancel()
                done.callback(dict(results))

        def arrived(outcome: T | DeviceError, i: int) -> None:
            self._running.pop(i, None)
            if done.called:
                self._late[i] = outcome
                return
            results[i] = outcome
            waiting.discard(i)
            if not waiting:
                finish()

        for i, d in started.items():
            d.addErrback(self._failed, i).addCallback(arrived, i)
        if waiting:
            timer.append(self._clock.callLater(within_s, finish))
        else:
            finish()
        return done


class DeviceHealth:
    """Logs a device's read failure once when it starts and once when it ends."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._failing: dict[int, str] = {}

    def update(self, ok: Mapping[int, Any], failed: Mapping[int, DeviceError]) -> None:
        for i, error in failed.items():
            if self._failing.get(i) != error.message:
                self._failing[i] = error.message
                log.warn("{kind} {id} power read failed: {error}", kind=self._kind, id=i, error=error.message)
        for i in ok:
            if self._failing.pop(i, None) is not None:
                log.info("{kind} {id} power reads recovered", kind=self._kind, id=i)


class GpuPowerSampler:
    def __init__(self, clock: IReactorTime, gpus: GpuManager) -> None:
        self._round: Round[Reading[int]] = Round(
            clock,
            gpus.power,
            lambda failure, gpu: gpus.read_failed(failure, gpu, "power read"),
            lambda gpu: gpus.read_failed(Failure(CancelledError()), gpu, "power read"),
            GPU_TIMEOUT_S,
        )
        self._health = DeviceHealth("GPU")
        self.reads = 0  # device reads asked for, for tests and benchmarks

    def reset(self) -> None:
        self._round.reset()

    def sample(self, ids: Sequence[int], within_s: float) -> "Deferred[Sample | None]":
        self.reads += sum(1 for i in ids if not self._round.in_flight(i))
        return self._round.collect(ids, within_s).addCallback(self._to_sample)

    def _to_sample(self, results: Mapping[int, Reading[int] | DeviceError]) -> Sample:
        ok, failed = split_results(results)
        self._health.update(ok, failed)
        stamp = max((r.timestamp_ms for r in ok.values()), default=0) or wall_clock_ms()
        return Sample(stamp, ok)


class CpuPowerSampler:
    """Power from the energy delta between consecutive reads of each package (measured interval)."""

    def __init__(self, clock: IReactorTime, cpus: CpuManager) -> None:
        self._round: Round[EnergySample] = Round(
            clock,
            cpus.sample_one,
            cpus.read_failed,
            lambda index: cpus.read_failed(Failure(CancelledError()), index),
            CPU_TIMEOUT_S,
        )
        self._previous: dict[int, EnergySample] = {}
        self._health = DeviceHealth("CPU")
        self.reads = 0

    def reset(self) -> None:
        self._round.reset()
        self._previous.clear()

    def sample(self, ids: Sequence[int], within_s: float) -> "Deferred[Sample | None]":
        self.reads += sum(1 for i in ids if not self._round.in_flight(i))
        return self._round.collect(ids, within_s).addCallback(self._to_sample)

    def _to_sample(self, results: Mapping[int, EnergySample | DeviceError]) -> Sample | None:
        ok, failed = split_results(results)
        self._health.update(ok, failed)
        readings = {}
        for i, now in ok.items():
            before = self._previous.get(i)
            self._previous[i] = now
            if before is not None:
                readings[i] = Reading(power_between(before, now), now.timestamp_ms)
        if not readings:
            return None
        return Sample(max(r.timestamp_ms for r in readings.values()), readings)
