"""Running blocking device calls off the reactor thread.

Three tools, each for one job:

* :class:`SerialExecutor`: one thread with a FIFO queue, one per GPU (and per
  CPU package), so that commands for a device take effect strictly in arrival
  order while different devices proceed in parallel. (``deferToThread`` alone
  cannot give per-device ordering: the shared pool runs queued calls on
  whichever thread is free.) Its thread starts in :meth:`~SerialExecutor.start`,
  never in the constructor, so a daemon that forks after building its objects
  (``twistd``) still has its threads in the process that serves.
* :class:`SingleFlight`: shares one in-flight call between every caller that
  wants the same reading at the same time, so a hung device ties up at most
  one queued call per reading however many pollers and requests ask for it.
* :func:`gather_within`: waits for several devices under one deadline; a
  device that outlasts it is reported as hung without holding up the others.

Anything that runs calls and hands back Deferreds on the reactor thread can
stand in for :class:`SerialExecutor` (the :class:`Executor` protocol): the
tests use an executor that runs a call only when the test says so.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Hashable, Mapping, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError

T = TypeVar("T")

_STOP = object()


class Executor(Protocol):
    """Runs blocking calls of one device in submission order."""

    @property
    def pending(self) -> int:
        """Submitted calls that have not finished yet (queued or running)."""
        ...

    def submit(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Queue ``fn(*args)``; the Deferred fires on the reactor thread."""
        ...

    def when_idle(self) -> "Deferred[None]":
        """Fires once every call submitted so far has finished."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Finish the calls already queued, then run nothing more."""
        ...


#: Makes the executor of one device, given a name for its thread.
ExecutorFactory = Callable[[str], Executor]


class SerialExecutor:
    """Runs submitted calls one at a time, in submission order, on its own thread."""

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"executor {self._name} already started")
        # A daemon thread: a hung driver call must never keep the process alive.
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self._pending += 1
        self._queue.put((d, fn, args))
        return d

    def when_idle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._pending == 0:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d

    def stop(self) -> None:
        """Let the thread exit after the calls already queued (it is not joined:
        a call hung in a driver cannot be interrupted, and must not hang shutdown)."""
        self._queue.put(_STOP)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            d, fn, args = item
            try:
                result: Any = fn(*args)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            self._reactor.callFromThread(self._finish, d, ok, result)

    def _finish(self, d: Deferred[Any], ok: bool, result: Any) -> None:
        self._pending -= 1
        if ok:
            d.callback(result)
        else:
            d.errback(result)
        if self._pending == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)


def thread_executors(reactor: IReactorFromThreads) -> ExecutorFactory:
    """The production factory: one :class:`SerialExecutor` thread per device."""
    return lambda name: SerialExecutor(reactor, name)


class SingleFlight:
    """At most one running call per key; concurrent callers share its result.

    ``run(fn, *args)`` starts the call and returns its Deferred: on a device's
    own :meth:`Executor.submit`, or directly when ``fn`` is itself
    asynchronous (a metrics snapshot).
    """

    def __init__(self, run: Callable[..., "Deferred[Any]"]) -> None:
        self._run = run
        self._inflight: dict[Hashable, list[Deferred[Any]]] = {}

    def in_flight(self, key: Hashable) -> bool:
        return key in self._inflight

    def call(self, key: Hashable, fn: "Callable[..., T | Deferred[T]]", *args: Any) -> Deferred[T]:
        """A Deferred for ``fn(*args)``; cancelling it abandons only this caller's wait."""
        waiters = self._inflight.get(key)
        mine: Deferred[T] = Deferred(lambda d: self._abandon(key, d))
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._inflight[key] = [mine]
        work: Deferred[T] = self._run(fn, *args)
        work.addBoth(self._settle, key)
        return mine

    def _abandon(self, key: Hashable, d: Deferred[Any]) -> None:
        waiters = self._inflight.get(key)
        if waiters is not None and d in waiters:
            waiters.remove(d)

    def _settle(self, result: Any, key: Hashable) -> None:
        for waiter in self._inflight.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def gather(deferreds: Mapping[int, "Deferred[Any]"]) -> "Deferred[Any]":
    """Wait for every device's Deferred; failures become DeviceError values."""
    ids = list(deferreds)
    done: Deferred[Any] = DeferredList([deferreds[i] for i in ids], consumeErrors=True)

    def collect(results: list[tuple[bool, Any]]) -> dict[int, Any]:
        return {i: value if ok else _device_error(value) for i, (ok, value) in zip(ids, results)}

    return done.addCallback(collect)


def gather_within(
    reactor: IReactorTime,
    reads: Mapping[int, "Deferred[Any]"],
    timeout_s: float,
    failed: Callable[[Failure, int], DeviceError],
) -> "Deferred[Any]":
    """:func:`gather` under one deadline for the whole request.

    A device that has not answered by then is given up on: its Deferred is
    cancelled (the call itself goes on, and still settles any other waiter),
    and ``failed`` turns that ``CancelledError``, or the device's own failure,
    into its DeviceError.
    """
    for index, d in reads.items():
        d.addErrback(_raise_mapped, failed, index)
    timer = reactor.callLater(timeout_s, _give_up, list(reads.values())) if reads else None

    def done(results: Any) -> Any:
        if timer is not None and timer.active():
            timer.cancel()
        return results

    return gather(reads).addCallback(done)


def _raise_mapped(failure: Failure, failed: Callable[[Failure, int], DeviceError], index: int) -> Any:
    raise failed(failure, index)


def _give_up(reads: "list[Deferred[Any]]") -> None:
    for d in reads:
        if not d.called:
            d.cancel()


def _device_error(failure: Failure) -> DeviceError:
    if isinstance(failure.value, DeviceError):
        return failure.value
    return DeviceError(f"Unexpected error: {failure.getErrorMessage()}")
