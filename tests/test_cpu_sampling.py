"""CPU power for streams (zeusd/devices/sampling.py: CpuPowerSampler) from scripted energy samples,
in process: the energy delta over the measured interval, per package, with DRAM where there is one;
priming, failures, recovery and resets. Over real RAPL trees this is tested in test_rapl.py."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from tests.manual import ManualExecutors
from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.base import io_error
from zeusd.devices.cpu.manager import CpuManager, EnergySample, PackagePower
from zeusd.devices.readings import Reading, Sample
from zeusd.devices.sampling import CpuPowerSampler


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
