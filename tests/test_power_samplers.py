"""The stream samplers (zeusd/devices/sampling.py) over scripted devices, in process: GPU power as read,
CPU power as the energy delta over the measured interval (DRAM where there is one); what a round
reports for failing, hung and late devices, and what it counts and logs. Over real sockets these are
tested in test_streaming.py and test_rapl.py."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from tests.manual import ManualExecutors
from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.base import io_error
from zeusd.devices.cpu.manager import CpuManager, EnergySample, PackagePower
from zeusd.devices.readings import Reading, Sample
from zeusd.devices.gpu.manager import DEVICE_TIMEOUT_S as GPU_TIMEOUT_S
from zeusd.devices.gpu.manager import GpuManager
from zeusd.devices.sampling import CpuPowerSampler, GpuPowerSampler


class ScriptedCpus(CpuManager):
    """CPU packages whose next energy samples (or errors) the test lists."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, ManualExecutors())
        self.script: dict[int, list[EnergySample | DeviceError]] = {0: [], 1: []}

    def sample_one(self, index: int) -> "Deferred[EnergySample]":
        step = self.script[index].pop(0)
        return fail(step) if isinstance(step, DeviceError) else succeed(step)


def sampled(sampler: CpuPowerSampler, ids: list[int] | None = None) -> Any:
    box: list[Any] = []
    sampler.sample(ids if ids is not None else [0, 1], 0.1).addBoth(box.append)
    assert box, "the sample has not fired"
    return box[0]


def test_power_is_the_energy_delta_over_the_measured_interval() -> None:
    clock = Clock()
    cpus = ScriptedCpus(clock)
    sampler = CpuPowerSampler(clock, cpus)
    cpus.script[0] = [EnergySample(5_000_000, 100_000, 10.0, 1_000), EnergySample(6_000_000, 150_000, 10.5, 1_500)]
    cpus.script[1] = [EnergySample(0, None, 10.0, 1_001), EnergySample(250_000, None, 10.25, 1_251)]
    assert sampled(sampler) is None  # the first read only primes each package
    sample = sampled(sampler)
    assert isinstance(sample, Sample)
    # 1 J over 0.5 s = 2 W; DRAM 50 mJ over 0.5 s = 100 mW; package 1: 250 mJ over 0.25 s = 1 W, no DRAM.
    assert sample.readings[0] == Reading(PackagePower(2_000, 100), 1_500)
    assert sample.readings[1] == Reading(PackagePower(1_000, None), 1_251)
    assert sample.timestamp_ms == 1_500  # the newest reading's
    assert sampler.reads == 4


def test_a_failing_package_is_left_out_and_resumes_from_its_last_good_sample() -> None:
    clock = Clock()
    cpus = ScriptedCpus(clock)
    sampler = CpuPowerSampler(clock, cpus)
    failures: list[tuple[int, str]] = []
    cpus.on_read_error = lambda index, what: failures.append((index, what))
    cpus.script[0] = [EnergySample(0, None, 1.0, 1), EnergySample(1_000, None, 2.0, 2), EnergySample(3_000, None, 3.0, 3)]
    cpus.script[1] = [EnergySample(0, None, 1.0, 1), DeviceError("IOError: gone"), EnergySample(4_000, None, 3.0, 3)]
    assert sampled(sampler) is None
    with capturedLogs() as events:
        second = sampled(sampler)
    assert set(second.readings) == {0} and second.readings[0].value == PackagePower(1, None)
    assert [formatEvent(e) for e in events] == ["CPU 1 power read failed: IOError: gone"]
    assert failures == [(1, "energy read")]
    with capturedLogs() as events:
        third = sampled(sampler)
    assert [formatEvent(e) for e in events] == ["CPU 1 power reads recovered"]
    assert third.readings[0].value == PackagePower(2, None)
    assert third.readings[1].value == PackagePower(2, None)  # 4 mJ over the 2 s since its last good sample


def test_a_counter_that_went_backwards_reads_zero_and_huge_steps_are_capped() -> None:
    clock = Clock()
    cpus = ScriptedCpus(clock)
    sampler = CpuPowerSampler(clock, cpus)
    cpus.script[0] = [EnergySample(5_000, 10, 1.0, 1), EnergySample(4_000, 5, 2.0, 2)]
    cpus.script[1] = [EnergySample(0, None, 1.0, 1), EnergySample(1 << 62, None, 1.000001, 2)]
    assert sampled(sampler) is None
    sample = sampled(sampler)
    assert sample.readings[0].value == PackagePower(0, 0)
    assert sample.readings[1].value == PackagePower(0xFFFFFFFF, None)


def test_same_instant_samples_count_one_microsecond_and_reset_primes_again() -> None:
    clock = Clock()
    cpus = ScriptedCpus(clock)
    sampler = CpuPowerSampler(clock, cpus)
    cpus.script[0] = [EnergySample(0, None, 5.0, 1), EnergySample(3, None, 5.0, 1),
                      EnergySample(10, None, 6.0, 2), EnergySample(20, None, 7.0, 3)]
    assert sampled(sampler, [0]) is None
    assert sampled(sampler, [0]).readings[0].value == PackagePower(3_000, None)  # 3 uJ over 1 us (never / 0)
    sampler.reset()
    assert sampled(sampler, [0]) is None  # a new streaming session primes again
    assert sampled(sampler, [0]).readings[0].value == PackagePower(0, None)  # 10 uJ over 1 s rounds down to 0 mW


def test_io_error_words_a_failed_sysfs_read_like_upstream() -> None:
    assert io_error(PermissionError(13, "Permission denied")).message == "IOError: Permission denied (os error 13)"
    assert io_error(ValueError("invalid literal for int() with base 10: 'x'")).message == (
        "IOError: invalid literal for int() with base 10: 'x'"
    )
    assert io_error(OSError("no errno")).message == "IOError: no errno"
    assert io_error(PermissionError(13, "Permission denied")).status == 500


# --------------------------------------------------------------------------- GPUs


class ScriptedGpus(GpuManager):
    """Two GPUs whose power reads the test answers (or fails) when it wants."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, ManualExecutors())
        self.reads: dict[int, list[Deferred[Reading[int]]]] = {0: [], 1: []}
        self.failures: list[tuple[int, str]] = []
        self.on_read_error = lambda gpu, what: self.failures.append((gpu, what))

    def power(self, gpu: int) -> "Deferred[Reading[int]]":
        d: Deferred[Reading[int]] = Deferred()
        self.reads[gpu].append(d)
        return d

    def answer(self, gpu: int, mw: int, timestamp_ms: int) -> None:
        self.reads[gpu][-1].callback(Reading(mw, timestamp_ms))


def gpu_sampler(start_s: float = 0.0) -> tuple[Clock, ScriptedGpus, GpuPowerSampler]:
    """A GPU sampler over two scripted GPUs; the clock starts at ``start_s`` (a read's age counts from its start)."""
    clock = Clock()
    clock.advance(start_s)
    gpus = ScriptedGpus(clock)
    return clock, gpus, GpuPowerSampler(clock, gpus)


def gpu_sample(sampler: GpuPowerSampler, clock: Clock, within_s: float = 0.04) -> Any:
    """Start a round, let ``within_s`` pass, and return what it published."""
    box: list[Any] = []
    sampler.sample([0, 1], within_s).addBoth(box.append)
    if not box:
        clock.advance(within_s)
    assert box, "the sample has not fired"
    return box[0]


def test_gpu_power_as_read_stamped_with_the_newest_reading() -> None:
    clock, gpus, sampler = gpu_sampler(start_s=100)
    box: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(box.append)
    gpus.answer(0, 150_000, 5_000)
    assert not box  # still waiting for GPU 1, within the tick's share
    gpus.answer(1, 90_000, 5_002)
    [sample] = box
    assert sample == Sample(5_002, {0: Reading(150_000, 5_000), 1: Reading(90_000, 5_002)})
    assert sampler.reads == 2 and gpus.failures == []


def test_a_late_gpu_is_left_out_not_read_twice_and_joins_the_next_round() -> None:
    clock, gpus, sampler = gpu_sampler(start_s=100)
    first: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(first.append)
    gpus.answer(0, 1, 1)
    clock.advance(0.04)  # the deadline: GPU 1 is left out of this tick
    assert first == [Sample(1, {0: Reading(1, 1)})]
    gpus.answer(1, 2, 2)  # answers late: kept for the next round
    second: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(second.append)
    assert len(gpus.reads[1]) == 2 and sampler.reads == 4  # GPU 1 is read again
    gpus.answer(0, 3, 3)
    clock.advance(0.04)  # GPU 1 is slow again: its late answer from the last round stands in
    assert second == [Sample(3, {0: Reading(3, 3), 1: Reading(2, 2)})]
    third: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(third.append)
    assert sampler.reads == 5  # GPU 1's read is still running: not asked again
    gpus.answer(0, 5, 5)  # this round asked GPU 0 alone: published at once
    assert third == [Sample(5, {0: Reading(5, 5)})]
    gpus.answer(1, 4, 4)  # the read a round before started answers: the next round has it
    fourth: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(fourth.append)
    gpus.answer(0, 6, 6)
    clock.advance(0.04)
    assert fourth == [Sample(6, {0: Reading(6, 6), 1: Reading(4, 4)})]


def test_a_gpu_whose_read_fails_is_counted_logged_once_and_recovers() -> None:
    clock, gpus, sampler = gpu_sampler()
    for _ in range(2):  # the same failure twice: one log line
        box: list[Any] = []
        sampler.sample([0, 1], 0.04).addBoth(box.append)
        gpus.answer(0, 100, 7)
        with capturedLogs() as events:
            gpus.reads[1][-1].errback(RuntimeError("driver exploded"))
        assert box == [Sample(7, {0: Reading(100, 7)})]
        logged = [formatEvent(e) for e in events]
        if _ == 0:
            assert logged == ["Unexpected error from GPU 1 during power read",
                              "GPU 1 power read failed: Unexpected error from GPU 1: driver exploded"]
        else:
            assert logged == ["Unexpected error from GPU 1 during power read"]
    assert gpus.failures == [(1, "power read"), (1, "power read")]
    sampler.sample([0, 1], 0.04)
    gpus.answer(0, 100, 8)
    with capturedLogs() as events:
        gpus.answer(1, 100, 8)
    assert [formatEvent(e) for e in events] == ["GPU 1 power reads recovered"]


def test_a_hung_gpu_is_reported_once_when_its_read_is_timeout_old() -> None:
    clock, gpus, sampler = gpu_sampler(start_s=1000)
    published: list[Any] = []
    sampler.sample([0, 1], 0.04).addBoth(published.append)
    gpus.answer(0, 1, 1)
    clock.advance(0.04)
    ticks = 0
    while clock.seconds() - 1000 < GPU_TIMEOUT_S - 0.05:
        sampler.sample([0, 1], 0.04).addBoth(published.append)
        gpus.answer(0, 1, 1)
        clock.advance(0.05)
        ticks += 1
    assert gpus.failures == []  # just under the timeout: not reported
    clock.advance(1000 + GPU_TIMEOUT_S - clock.seconds())  # exactly the timeout
    with capturedLogs() as events:
        sampler.sample([0, 1], 0.04).addBoth(published.append)
        gpus.answer(0, 1, 1)
    assert gpus.failures == [(1, "power read")]
    assert [formatEvent(e) for e in events] == [f"GPU 1 power read failed: GPU 1 did not answer power read within {GPU_TIMEOUT_S:g} s."]
    sampler.sample([0, 1], 0.04).addBoth(published.append)
    gpus.answer(0, 1, 1)
    assert gpus.failures == [(1, "power read")]  # once
    assert all(set(s.readings) == {0} for s in published) and len(published) == ticks + 3


def test_a_round_where_no_gpu_answered_is_stamped_with_the_wall_clock() -> None:
    clock, gpus, sampler = gpu_sampler()
    before = int(time.time() * 1000)
    sample = gpu_sample(sampler, clock)
    assert sample.readings == {} and before <= sample.timestamp_ms <= int(time.time() * 1000)


def test_a_hung_cpu_package_is_reported_as_hung_once() -> None:
    clock = Clock()
    clock.advance(1000)
    cpus = ScriptedCpus(clock)
    failed: list[tuple[int, str]] = []
    cpus.on_read_error = lambda index, what: failed.append((index, what))
    never: Deferred[EnergySample] = Deferred()
    cpus.sample_one = lambda index: never  # type: ignore[method-assign]
    sampler = CpuPowerSampler(clock, cpus)
    box: list[Any] = []
    sampler.sample([0], 0.1).addBoth(box.append)
    clock.advance(0.1)
    assert box == [None] and sampler.reads == 1
    clock.advance(5.0 - 0.1)
    with capturedLogs() as events:
        sampler.sample([0], 0.1)
    assert failed == [(0, "energy read")]
    assert [formatEvent(e) for e in events] == ["CPU 0 power read failed: CPU 0 did not answer within 5 s."]
    assert sampler.reads == 1  # still in flight: never asked twice
