"""The GPUs as the service sees them: ordered control, shared reads, no blocking.

* Control commands and queued reads (energy, limits, persistence) of a GPU go
  through that GPU's :class:`SerialExecutor`, strictly in arrival order.
* Instant-power reads skip the queue (a power reading is independent of a
  pending control command, and must stay fresh while one runs). They run on
  the GPU's own reader thread through :class:`SingleFlight`, so concurrent
  pollers and one-shot requests share one NVML call per GPU, and a GPU whose
  read hangs ties up only its own thread. (A dedicated thread with a
  ``SimpleQueue`` also costs a fraction of a shared pool's hand-off.)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.base import DeviceError
from zeusd.devices.executor import SerialExecutor, SingleFlight, gather_within
from zeusd.devices.gpu.base import GPU
from zeusd.devices.readings import Reading, Results, wall_clock_ms

log = Logger()
T = TypeVar("T")

#: How long a request waits on one GPU before it reports that GPU as hung.
DEVICE_TIMEOUT_S = 5.0


def _as_device_error(failure: Failure, gpu: int, what: str) -> DeviceError:
    if isinstance(failure.value, DeviceError):
        return failure.value
    if failure.check(TimeoutError, CancelledError):
        return DeviceError(f"GPU {gpu} did not answer {what} within {DEVICE_TIMEOUT_S:g} s.", 500)
    log.failure("Unexpected error from GPU {gpu} during {what}", failure, gpu=gpu, what=what)
    return DeviceError(f"Unexpected error from GPU {gpu}: {failure.getErrorMessage()}", 500)


class GpuManager:
    def __init__(self, reactor: Any, gpus: Sequence[GPU]) -> None:
        self._reactor = reactor
        self.gpus = list(gpus)
        self._queues = [SerialExecutor(reactor, f"zeusd-gpu-{gpu.index}") for gpu in self.gpus]
        self._readers = [SerialExecutor(reactor, f"zeusd-gpu-{gpu.index}-power") for gpu in self.gpus]
        self._power_reads = [SingleFlight(reader.submit) for reader in self._readers]
        #: Called on the reactor thread with (gpu, what) for every failed read (metrics).
        self.on_read_error: Callable[[int, str], None] | None = None

    @property
    def ids(self) -> range:
        return range(len(self.gpus))

    def pending(self, gpu: int) -> int:
        return self._queues[gpu].pending

    # Control ---------------------------------------------------------------

    def submit(
        self, gpu: int, description: str, method: Callable[..., None], *args: Any
    ) -> "Deferred[None | DeviceError]":
        """Queue a control command; fires (never fails) with None or the DeviceError.

        ``method`` is an unbound GPU protocol method, e.g. ``GPU.set_power_limit_mw``.
        The returned Deferred is a branch: cancelling it (a caller giving up)
        never affects the command, which still runs and is still logged.
        """
        device = self.gpus[gpu]
        queued_at = time.monotonic()
        started: list[float] = []

        def run() -> None:
            started.append(time.monotonic())
            method(device, *args)

        def succeeded(_: None) -> None:
            now = time.monotonic()
            log.info(
                "GPU {gpu}: {description} (queued {queued_ms:.1f} ms, device {device_ms:.1f} ms)",
                gpu=gpu,
                description=description,
                queued_ms=(started[0] - queued_at) * 1000,
                device_ms=(now - started[0]) * 1000,
            )
            return None

        def failed(failure: Failure) -> DeviceError:
            error = _as_device_error(failure, gpu, description)
            log.warn("GPU {gpu}: {description} failed: {error}", gpu=gpu, description=description, error=error.message)
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

    def wait(self, gpu: int, d: "Deferred[None | DeviceError]") -> "Deferred[None | DeviceError]":
        """Bound a blocking request's wait for a queued command."""

        def timed_out(failure: Failure) -> DeviceError:
            failure.trap(TimeoutError)
            return DeviceError(
                f"GPU {gpu} did not finish the command within {DEVICE_TIMEOUT_S:g} s; "
                "it stays queued and will still be applied.",
                500,
            )

        return d.addTimeout(DEVICE_TIMEOUT_S, self._reactor).addErrback(timed_out)

    def when_idle(self) -> "Deferred[Any]":
        """Fires when every queued command has finished (used at shutdown)."""
        return DeferredList([q.when_idle() for q in self._queues])

    # Reads -----------------------------------------------------------------

    def read_queued(self, ids: Iterable[int], read: Callable[[GPU], T], what: str) -> "Deferred[Results[T]]":
        """A read that must see every command queued before it (energy, limits)."""
        return self._gather_bounded(
            {gpu: self._queues[gpu].submit(read, self.gpus[gpu]) for gpu in dict.fromkeys(ids)}, what
        )

    def read_power(self, ids: Iterable[int], skip_busy: bool = False) -> "Deferred[Results[Reading[int]]]":
        """Fresh instant power of each GPU, each stamped when its read returned.

        With ``skip_busy`` a GPU whose previous read is still running (a hung
        device) is left out instead of waited for: pollers use it so that one
        sick GPU never holds up the stream of the others.
        """
        reads: dict[int, Deferred[Reading[int]]] = {}
        for gpu in dict.fromkeys(ids):
            flight = self._power_reads[gpu]
            if skip_busy and flight.in_flight(_POWER):
                continue
            reads[gpu] = flight.call(_POWER, _read_power, self.gpus[gpu])
        return self._gather_bounded(reads, "power read")

    def _gather_bounded(self, reads: "dict[int, Deferred[T]]", what: str) -> "Deferred[Results[T]]":
        """Every GPU's result or its error, a GPU that outlasts the bound reported as hung."""

        def failed(failure: Failure, gpu: int) -> DeviceError:
            if self.on_read_error is not None:
                self.on_read_error(gpu, what)
            return _as_device_error(failure, gpu, what)

        return gather_within(self._reactor, reads, DEVICE_TIMEOUT_S, failed)

    def close(self) -> None:
        for q in (*self._queues, *self._readers):
            q.stop()


_POWER = "power"


def _read_power(gpu: GPU) -> Reading[int]:
    value = gpu.get_instant_power_mw()
    return Reading(value, wall_clock_ms())
