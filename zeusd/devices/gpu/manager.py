"""The GPUs as the service sees them: ordered control, shared reads, no blocking.

* Control commands and queued reads (energy, limits, persistence) of a GPU go
  through that GPU's command executor, strictly in arrival order.
* Instant-power reads skip the queue (a power reading is independent of a
  pending control command, and must stay fresh while one runs). They run on
  the GPU's own reader executor through :class:`SingleFlight`, so concurrent
  pollers and one-shot requests share one device call per GPU, and a GPU whose
  read hangs ties up only its own thread.

The manager is built empty; :meth:`GpuManager.open` gives it the GPUs and
starts their executors (from the GPU service's start, never earlier).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.executor import Executor, ExecutorFactory, SingleFlight, gather_within
from zeusd.devices.gpu.base import GPU
from zeusd.devices.gpu.control import OPERATIONS, CommandObserver, ControlOperation, OperationOverride
from zeusd.devices.readings import Reading, Results, wall_clock_ms

log = Logger()
T = TypeVar("T")
A = TypeVar("A")

#: How long a request waits on one GPU before it reports that GPU as hung.
DEVICE_TIMEOUT_S = 5.0

_POWER = "power"


def hung_error(gpu: int, what: str) -> DeviceError:
    return DeviceError(f"GPU {gpu} did not answer {what} within {DEVICE_TIMEOUT_S:g} s.", 500)


def _as_device_error(failure: Failure, gpu: int, what: str) -> DeviceError:
    if isinstance(failure.value, DeviceError):
        return failure.value
    if failure.check(TimeoutError, CancelledError):
        return hung_error(gpu, what)
    log.failure("Unexpected error from GPU {gpu} during {what}", failure, gpu=gpu, what=what)
    return DeviceError(f"Unexpected error from GPU {gpu}: {failure.getErrorMessage()}", 500)


class GpuManager:
    def __init__(
        self, reactor: Any, executors: ExecutorFactory, overrides: Mapping[str, OperationOverride] | None = None
    ) -> None:
        self._reactor = reactor
        self._make_executor = executors
        #: Operation name → what runs instead of its ``apply`` (GPU command overrides; filled at start).
        self.overrides: Mapping[str, OperationOverride] = overrides if overrides is not None else {}
        self.gpus: list[GPU] = []
        self._queues: list[Executor] = []
        self._readers: list[Executor] = []
        self._power_reads: list[SingleFlight] = []
        #: Told how every control command ended (metrics track locked clocks this way).
        self.observers: list[CommandObserver] = []
        #: Called on the reactor thread with (gpu, what) for every failed read (metrics).
        self.on_read_error: Callable[[int, str], None] | None = None

    def open(self, gpus: Sequence[GPU]) -> None:
        """Take the GPUs and start one command and one power-reader executor for each."""
        self.gpus = list(gpus)
        self._queues = [self._make_executor(f"zeusd-gpu-{gpu.index}") for gpu in self.gpus]
        self._readers = [self._make_executor(f"zeusd-gpu-{gpu.index}-power") for gpu in self.gpus]
        self._power_reads = [SingleFlight(reader.submit) for reader in self._readers]
        for executor in (*self._queues, *self._readers):
            executor.start()

    def close(self) -> None:
        """Let every executor finish what it was given and exit."""
        for executor in (*self._queues, *self._readers):
            executor.stop()

    @property
    def ids(self) -> range:
        return range(len(self.gpus))

    def pending(self, gpu: int) -> int:
        return self._queues[gpu].pending

    @property
    def overridden(self) -> list[str]:
        """The operations that run override commands, in the operation table's order."""
        return [op.name for op in OPERATIONS if op.name in self.overrides]

    @property
    def idle(self) -> bool:
        """No control command or queued read is waiting or running."""
        return all(q.pending == 0 for q in self._queues)

    # Control ---------------------------------------------------------------

    def check(self, operation: ControlOperation[A], ids: Iterable[int], arguments: A) -> None:
        """Raise InvalidArgument if any GPU would certainly refuse the command (nothing is queued)."""
        if operation.check is not None:
            for gpu in ids:
                operation.check(self.gpus[gpu], arguments)

    def submit(self, gpu: int, operation: ControlOperation[A], arguments: A) -> "Deferred[None | DeviceError]":
        """Queue a control command; fires (never fails) with None or the DeviceError.

        The returned Deferred is a branch: cancelling it (a caller giving up)
        never affects the command, which still runs, is still logged and still
        reaches the observers.
        """
        device = self.gpus[gpu]
        apply = self.overrides.get(operation.name, operation.apply)
        description = operation.describe(arguments)
        queued_at = time.monotonic()
        started: list[float] = []

        def run() -> None:
            started.append(time.monotonic())
            apply(device, arguments)

        def succeeded(_: None) -> None:
            now = time.monotonic()
            log.info(
                "GPU {gpu}: {description} (queued {queued_ms:.1f} ms, device {device_ms:.1f} ms)",
                gpu=gpu,
                description=description,
                queued_ms=(started[0] - queued_at) * 1000,
                device_ms=(now - started[0]) * 1000,
            )
            self._notify(gpu, operation, arguments, None)
            return None

        def failed(failure: Failure) -> DeviceError:
            error = _as_device_error(failure, gpu, description)
            log.warn("GPU {gpu}: {description} failed: {error}", gpu=gpu, description=description, error=error.message)
            self._notify(gpu, operation, arguments, error)
            return error

        d = self._queues[gpu].submit(run)
        d.addCallbacks(succeeded, failed)
        branch: Deferred[None | DeviceError] = Deferred()

        def fire(result: Any) -> Any:
            if not branch.called:
                branch.callback(result)
            return result

        d.addBoth(fire)
        return branch

    def _notify(self, gpu: int, operation: ControlOperation[Any], arguments: Any, error: DeviceError | None) -> None:
        for observer in self.observers:
            try:
                observer.command_finished(gpu, operation, arguments, error)
            except Exception:
                log.failure("A command observer failed")

    def wait(
        self, gpu: int, d: "Deferred[None | DeviceError]", operation: ControlOperation[Any] | None = None
    ) -> "Deferred[None | DeviceError]":
        """Bound a blocking request's wait for a queued command (longer for an override's commands)."""
        override = self.overrides.get(operation.name) if operation is not None else None
        bound = DEVICE_TIMEOUT_S + (override.longest_s if override is not None else 0)

        def timed_out(failure: Failure) -> DeviceError:
            failure.trap(TimeoutError)
            return DeviceError(
                f"GPU {gpu} did not finish the command within {bound:g} s; "
                "it stays queued and will still be applied.",
                500,
            )

        return d.addTimeout(bound, self._reactor).addErrback(timed_out)

    def when_idle(self) -> "Deferred[Any]":
        """Fires when every queued command has finished (used at shutdown)."""
        return DeferredList([q.when_idle() for q in self._queues])

    # Reads -----------------------------------------------------------------

    def read_queued(self, ids: Iterable[int], read: Callable[[GPU], T], what: str) -> "Deferred[Results[T]]":
        """A read that must see every command queued before it (energy, limits)."""
        return self._gather_bounded(
            {gpu: self._queues[gpu].submit(read, self.gpus[gpu]) for gpu in dict.fromkeys(ids)}, what
        )

    def read_power(self, ids: Iterable[int]) -> "Deferred[Results[Reading[int]]]":
        """Fresh instant power of each GPU, each stamped when its read returned;
        a GPU that takes longer than the device timeout is reported as hung."""
        return self._gather_bounded({gpu: self.power(gpu) for gpu in dict.fromkeys(ids)}, "power read")

    def power(self, gpu: int) -> "Deferred[Reading[int]]":
        """One GPU's instant power, shared with every concurrent reader; unbounded
        (streams use it to read without ever waiting for a slow GPU)."""
        return self._power_reads[gpu].call(_POWER, _read_power, self.gpus[gpu])

    def read_failed(self, failure: Failure, gpu: int, what: str) -> DeviceError:
        """Count a failed read and turn it into the DeviceError clients see.

        A 400 (the GPU does not have what was asked, e.g. persistence mode on AMD)
        is the GPU's answer, not a failed read, and is not counted.
        """
        error = _as_device_error(failure, gpu, what)
        if self.on_read_error is not None and error.status != 400:
            self.on_read_error(gpu, what)
        return error

    def _gather_bounded(self, reads: "dict[int, Deferred[T]]", what: str) -> "Deferred[Results[T]]":
        """Every GPU's result or its error, a GPU that outlasts the bound reported as hung."""
        return gather_within(
            self._reactor, reads, DEVICE_TIMEOUT_S, lambda failure, gpu: self.read_failed(failure, gpu, what)
        )


def _read_power(gpu: GPU) -> Reading[int]:
    value = gpu.get_instant_power_mw()
    return Reading(value, wall_clock_ms())
