"""Test doubles for the deterministic tests: executors that run a call when the test says so,
a reactor with a clock and fake sockets, a stream sink and a stream request that record what they are sent.

Nothing here sleeps or starts a thread: time is ``task.Clock`` time, and a
device call runs exactly when the test calls :meth:`ManualExecutor.run_next`.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.readings import Reading, Sample
from zeusd.devices.sampling import Round


class ManualExecutor:
    """An :class:`zeusd.devices.executor.Executor` whose calls run when the test runs them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.started = False
        self.stopped = False
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def pending(self) -> int:
        return len(self.queue)

    def start(self) -> None:
        assert not self.started, f"{self.name} started twice"
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def submit(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((d, fn, args))
        return d

    def when_idle(self) -> Deferred[None]:
        if not self.queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def run_next(self) -> Any:
        """Run the oldest queued call now, on the test's thread, and fire its Deferred."""
        assert self.started and self.queue, f"{self.name}: nothing to run (started={self.started})"
        d, fn, args = self.queue.pop(0)
        try:
            result = fn(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)
        if not self.queue:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def run_all(self) -> None:
        while self.queue:
            self.run_next()


class ManualExecutors:
    """An ExecutorFactory that keeps every executor it made, by thread name."""

    def __init__(self) -> None:
        self.made: dict[str, ManualExecutor] = {}

    def __call__(self, name: str) -> ManualExecutor:
        executor = self.made[name] = ManualExecutor(name)
        return executor

    def __getitem__(self, name: str) -> ManualExecutor:
        return self.made[name]


class TestReactor(MemoryReactorClock):
    """MemoryReactorClock with the thread-related calls the daemon makes at start."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.pool_size: int | None = None

    def suggestThreadPoolSize(self, size: int) -> None:
        self.pool_size = size

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class RecordingSink:
    """A stream subscriber's sink that records the frames it is given."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.aborted = False

    def write(self, frame: Any) -> None:
        self.frames.append(frame.payload)

    def abort(self) -> None:
        self.aborted = True

    def events(self) -> list[bytes]:
        return [event for data in self.frames for event in data.split(b"\n\n") if event.startswith(b"data: ")]


class StreamRequest:
    """Just enough of a twisted.web request for a stream response: records what it is sent."""

    chunked = False

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished: Deferred[None] = Deferred()
        self.channel = self
        self.transport = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def write(self, data: bytes) -> None:
        if data:
            self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return self.finished

    def events(self) -> list[bytes]:
        return [event for data in self.written for event in data.split(b"\n\n") if event.startswith(b"data: ")]

def outcome(d: Deferred[Any]) -> Any:
    """The result a fired Deferred holds (asserting it fired); takes it (call once per Deferred)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


class ScriptedSampler:
    """A sampler over Rounds whose device 1 takes ``slow_s`` per read (None: never answers)."""

    def __init__(self, clock: Clock, slow_s: float | None) -> None:
        self.clock = clock
        self.slow_s = slow_s
        self.round: Round[Reading[int]] = Round(clock, self._read, lambda f, i: DeviceError("x"), lambda i: DeviceError("hung"), 5.0)

    def reset(self) -> None:
        self.round.reset()

    def _read(self, index: int) -> Deferred[Reading[int]]:
        reading = Reading(100 + index, int(self.clock.seconds() * 1000))
        if index != 1:
            return succeed(reading)
        d: Deferred[Reading[int]] = Deferred()
        if self.slow_s is not None:
            self.clock.callLater(self.slow_s, d.callback, reading)
        return d

    def sample(self, ids: Any, within_s: float) -> Deferred[Sample | None]:
        def to_sample(results: dict[int, Any]) -> Sample:
            ok = {i: r for i, r in results.items() if isinstance(r, Reading)}
            return Sample(int(self.clock.seconds() * 1000), ok)

        return self.round.collect(ids, within_s).addCallback(to_sample)
