"""The concurrency core, deterministically: executors, shared reads, bounded gathers,
stream ticks that never wait for a slow device, and the RAPL wraparound guard.

Time is ``task.Clock`` time; device reads are Deferreds the test fires (or
never fires), or calls that block on an Event until the test releases them.
No test sleeps, and none asserts on wall-clock time.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Callable

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from tests.manual import ManualExecutor, ManualExecutors, RecordingSink, ScriptedSampler, outcome
from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.base import CpuPackage
from zeusd.devices.cpu.manager import CpuManager, wrap_guard_interval
from zeusd.devices.cpu.service import CpuService
from zeusd.devices.executor import SerialExecutor, SingleFlight, gather, gather_within, thread_executors
from zeusd.devices.sampling import TICK_DEADLINE_SHARE, Round
from zeusd.sse import GPU_ENCODERS
from zeusd.streaming import StreamHub



# SerialExecutor: a real thread, driven by events --------------------------------------


class QueuedReactor:
    """callFromThread collects the callbacks; the test delivers them on its own thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.arrived = threading.Condition()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        with self.arrived:
            self.calls.append((f, args))
            self.arrived.notify_all()

    def deliver(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.calls) >= count, timeout=10)
            calls, self.calls = self.calls[:count], self.calls[count:]
        for f, args in calls:
            f(*args)


def test_serial_executor_starts_no_thread_until_started() -> None:
    reactor = QueuedReactor()
    threads = threading.active_count()
    executor = SerialExecutor(reactor, "test-executor")  # type: ignore[arg-type]
    ran: list[int] = []
    d = executor.submit(ran.append, 1)
    idle = executor.when_idle()
    assert threading.active_count() == threads and ran == [] and executor.pending == 1 and not idle.called
    executor.start()
    reactor.deliver(1)
    assert ran == [1] and outcome(d) is None and executor.pending == 0 and idle.called
    executor.stop()


def test_serial_executor_thread_is_named_for_its_device_and_never_keeps_the_process_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crashed: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    reactor = QueuedReactor()
    executor = thread_executors(reactor)("zeusd-gpu-7")  # type: ignore[arg-type]
    executor.start()
    [thread] = [t for t in threading.enumerate() if t.name == "zeusd-gpu-7"]
    assert thread.daemon  # a call hung in a driver must not hang the daemon's exit
    with pytest.raises(RuntimeError, match="^executor zeusd-gpu-7 already started$"):
        executor.start()
    done = executor.submit(lambda: "queued before stop")
    executor.stop()
    reactor.deliver(1)
    thread.join(10)
    assert outcome(done) == "queued before stop" and not thread.is_alive()
    assert crashed == []  # it ended because it was told to, not by an exception


def test_serial_executor_is_idle_only_once_every_call_has_finished() -> None:
    reactor = QueuedReactor()
    executor = SerialExecutor(reactor, "test-executor")  # type: ignore[arg-type]
    executor.start()
    gate = threading.Event()
    first, second = executor.submit(gate.wait, 10), executor.submit(lambda: 2)
    idle = executor.when_idle()
    gate.set()
    reactor.deliver(1)
    assert outcome(first) is True and executor.pending == 1 and not idle.called
    reactor.deliver(1)
    assert outcome(second) == 2 and idle.called
    executor.stop()


def test_serial_executor_runs_in_order_one_at_a_time_and_reports_idle() -> None:
    reactor = QueuedReactor()
    executor = SerialExecutor(reactor, "test-executor")  # type: ignore[arg-type]
    executor.start()
    release = threading.Event()
    order: list[str] = []

    def blocking() -> str:
        order.append("first started")
        release.wait(10)
        order.append("first done")
        return "first"

    first = executor.submit(blocking)
    def second_call() -> str:
        order.append("second")
        return "second"

    second = executor.submit(second_call)
    failing = executor.submit(lambda: 1 // 0)
    idle = executor.when_idle()
    assert executor.pending == 3 and not idle.called
    release.set()
    reactor.deliver(3)
    assert order == ["first started", "first done", "second"]
    assert outcome(first) == "first" and outcome(second) == "second"
    failure = outcome(failing)
    assert isinstance(failure, Failure) and failure.check(ZeroDivisionError)
    assert idle.called and executor.pending == 0
    executor.stop()


# SingleFlight and gather_within ------------------------------------------------------------


def pending_calls(started: list[Deferred[int]]) -> Callable[..., Deferred[int]]:
    """A SingleFlight runner whose calls are Deferreds, kept in ``started`` for the test to fire."""

    def run(fn: Callable[..., Any], *args: Any) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        started.append(d)
        return d

    return run


def test_single_flight_shares_one_call_and_lets_a_caller_leave() -> None:
    started: list[Deferred[int]] = []
    flight = SingleFlight(pending_calls(started))
    a, b = flight.call("k", int), flight.call("k", int)
    other = flight.call("other", int)
    assert len(started) == 2 and flight.in_flight("k")
    b.cancel()
    left = outcome(b)
    assert isinstance(left, Failure) and left.check(CancelledError)
    started[0].callback(7)
    assert outcome(a) == 7 and not flight.in_flight("k")
    started[1].errback(Failure(DeviceError("broken")))
    assert outcome(other).value.message == "broken"
    flight.call("k", int)
    assert len(started) == 3  # a settled key starts a new call


def test_single_flight_the_first_caller_leaving_does_not_rob_the_others() -> None:
    started: list[Deferred[int]] = []
    flight = SingleFlight(pending_calls(started))
    a, b, c = flight.call("k", int), flight.call("k", int), flight.call("k", int)
    a.cancel()
    c.cancel()
    started[0].callback(5)
    assert outcome(b) == 5 and len(started) == 1
    assert outcome(a).check(CancelledError) and outcome(c).check(CancelledError)


def test_gather_turns_other_failures_into_device_errors_and_leaves_none_unhandled() -> None:
    with capturedLogs() as events:
        results = outcome(gather({0: fail(ValueError("odd reply")), 1: succeed(3), 2: fail(DeviceError("gone", 403))}))
        gc.collect()  # an unconsumed failure would be logged as "Unhandled error in Deferred" here
    assert results[1] == 3
    assert (results[0].message, results[0].status) == ("Unexpected error: odd reply", 500)
    assert (results[2].message, results[2].status) == ("gone", 403)
    assert [formatEvent(e) for e in events] == []


def test_gather_within_reports_the_late_device_alone_and_cancels_its_timer() -> None:
    clock = Clock()
    fast, slow, broken = Deferred[int](), Deferred[int](), Deferred[int]()

    def failed(failure: Failure, index: int) -> DeviceError:
        if failure.check(CancelledError):
            return DeviceError(f"{index} hung")
        return DeviceError(f"{index}: {failure.getErrorMessage()}")

    done = gather_within(clock, {0: fast, 1: slow, 2: broken}, 5.0, failed)
    fast.callback(10)
    broken.errback(Failure(ValueError("bad")))
    clock.advance(4.9)
    assert not done.called
    clock.advance(0.1)
    results = outcome(done)
    assert results[0] == 10 and results[1].message == "1 hung" and results[2].message == "2: bad"
    quick = gather_within(clock, {0: succeed(1)}, 5.0, failed)
    assert outcome(quick) == {0: 1} and clock.getDelayedCalls() == []


# Stream rounds: a slow device never holds up the others --------------------------------------


class Devices:
    """Per-device reads the test answers; a device in ``hung`` never answers."""

    def __init__(self) -> None:
        self.reads: dict[int, list[Deferred[int]]] = {}

    def read(self, index: int) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.reads.setdefault(index, []).append(d)
        return d

    def answer(self, index: int, value: int) -> None:
        pending = [d for d in self.reads.get(index, []) if not d.called]
        pending[0].callback(value)


def make_round(clock: Clock, devices: Devices) -> Round[int]:
    return Round(clock, devices.read, lambda f, i: DeviceError(f"{i} failed"), lambda i: DeviceError(f"{i} hung"), 5.0)


def test_round_publishes_at_its_deadline_without_the_slow_device() -> None:
    clock, devices = Clock(), Devices()
    round_ = make_round(clock, devices)
    first = round_.collect([0, 1], 0.04)
    devices.answer(0, 100)
    assert not first.called
    clock.advance(0.04)
    assert outcome(first) == {0: 100}
    second = round_.collect([0, 1], 0.04)
    assert len(devices.reads[1]) == 1  # still in flight: not asked again
    devices.answer(0, 101)
    assert outcome(second) == {0: 101}  # all that was asked answered: no need to wait
    devices.answer(1, 500)  # late: kept for the next round
    third = round_.collect([0, 1], 0.04)
    devices.answer(0, 102)
    devices.answer(1, 501)
    assert outcome(third) == {0: 102, 1: 501}


def test_round_reports_a_hung_device_once_and_takes_it_back() -> None:
    clock, devices = Clock(), Devices()
    round_ = make_round(clock, devices)
    reports = []
    for _ in range(200):  # 10 s at 20 Hz
        d = round_.collect([0, 1], 0.04)
        devices.answer(0, 1)
        clock.advance(0.05)
        reports.append(outcome(d))
    hung = [r[1] for r in reports if 1 in r]
    assert [e.message for e in hung] == ["1 hung"] and all(r[0] == 1 for r in reports)
    devices.answer(1, 42)
    d = round_.collect([0, 1], 0.04)
    devices.answer(0, 1)
    clock.advance(0.04)  # device 1's next read is running again; its late answer goes out now
    assert outcome(d) == {0: 1, 1: 42}



@pytest.mark.parametrize("slow_s", [None, 4.0], ids=["hung", "4 s per read"])
def test_healthy_devices_keep_their_full_rate_while_one_is_slow(slow_s: float | None) -> None:
    clock = Clock()
    hub = StreamHub(clock, "GPU", ScriptedSampler(clock, slow_s), 20, GPU_ENCODERS, "v0.5", 15.0, 30.0)
    request = subscribe(hub, [0, 1, 2])
    for _ in range(30 * 20):  # 30 s of ticks
        clock.advance(0.05)
    events = [e.decode() for e in request.events()]
    per_device = {i: sum(f'"gpu_id":{i},' in e for e in events) for i in range(3)}
    assert per_device[0] >= 0.9 * 30 * 20 and per_device[2] == per_device[0]
    if slow_s is None:
        assert per_device[1] == 0
    else:
        assert 30 / slow_s - 1 <= per_device[1] <= 30 / slow_s + 1  # it rejoins after every answer
    assert TICK_DEADLINE_SHARE < 1


def subscribe(hub: StreamHub, ids: list[int]) -> RecordingSink:
    sink = RecordingSink()
    hub.subscribe(sink, ids, None)
    return sink


# The RAPL wraparound guard ---------------------------------------------------------------


class CountingZone:
    def __init__(self, name: str, max_range: int) -> None:
        self.name = name
        self.max_energy_range_uj = max_range
        self.reads = 0

    def read_raw_uj(self) -> int:
        self.reads += 1
        return self.reads


def guarded(zone: CountingZone) -> tuple[Clock, CpuService, ManualExecutor, float]:
    """A started CPU service over one package with ``zone``: its clock, its executor and the guard interval."""
    clock, executors = Clock(), ManualExecutors()
    cpus = CpuManager(clock, executors)
    service = CpuService(clock, cpus, lambda: [CpuPackage(0, zone, None)], None)
    service.startService()
    return clock, service, executors["zeusd-cpu-0"], wrap_guard_interval([cpus.packages[0].package])


def test_wrap_guard_reads_idle_zones_at_half_the_shortest_wrap_time() -> None:
    zone = CountingZone("package-0", 262_143_328_850)
    clock, service, executor, interval = guarded(zone)
    assert interval == pytest.approx(131.07, abs=0.01)
    clock.advance(interval)
    assert executor.pending == 1  # one guard read queued
    clock.advance(interval)
    assert executor.pending == 1  # behind a read that has not run, nothing piles up
    executor.run_next()
    assert zone.reads == 1
    clock.advance(interval)
    assert executor.pending == 0  # read moments ago (on the device's clock): not stale
    service.stopService()
    assert clock.getDelayedCalls() == [] and executor.stopped


class BrokenZone(CountingZone):
    """A zone whose read fails with something that is not a DeviceError (a bug, or sysfs gone strange)."""

    def read_raw_uj(self) -> int:
        super().read_raw_uj()
        raise RuntimeError("sysfs returned nonsense")


def test_a_non_device_exception_from_a_rapl_read_is_a_counted_500_for_that_package_only() -> None:
    clock, executors = Clock(), ManualExecutors()
    cpus = CpuManager(clock, executors)
    failed: list[tuple[int, str]] = []
    cpus.on_read_error = lambda index, what: failed.append((index, what))
    cpus.open([CpuPackage(0, BrokenZone("package-0", 1 << 32), None), CpuPackage(1, CountingZone("package-1", 1 << 32), None)])
    d = cpus.read_energy([0, 1], cpu=True, dram=False)
    with capturedLogs() as events:
        executors["zeusd-cpu-0"].run_all()
    executors["zeusd-cpu-1"].run_all()
    assert [formatEvent(e) for e in events] == ["Unexpected error from CPU 0"]  # with its traceback
    results = outcome(d)
    assert results[1] == (1, None)
    error = results[0]
    assert isinstance(error, DeviceError) and error.status == 500
    assert error.message == "IOError: sysfs returned nonsense"
    assert failed == [(0, "energy read")]


def test_a_failing_wraparound_guard_read_is_logged_and_tried_again_later() -> None:
    zone = BrokenZone("package-0", 262_143_328_850)
    clock, service, executor, interval = guarded(zone)
    for reads in (1, 2):
        clock.advance(interval)
        assert executor.pending == 1
        with capturedLogs() as events:
            executor.run_next()  # raises inside the guard: logged, not propagated
        assert zone.reads == reads
        assert [formatEvent(e) for e in events] == ["Wraparound guard read of CPU 0 failed"]
        assert events[0]["log_failure"].check(RuntimeError)
    service.stopService()
