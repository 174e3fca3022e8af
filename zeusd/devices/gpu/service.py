"""The GPU service: the GPU backend and the per-GPU threads live from start to stop."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from zeusd.devices.gpu.base import GPUBackend
from zeusd.devices.gpu.manager import GpuManager
from zeusd.errors import StartupError
from zeusd.lifecycle import OpenedAtStart

log = Logger()

#: How long shutdown waits for accepted GPU commands to finish.
SHUTDOWN_GRACE_S = 10.0


class GpuService(OpenedAtStart):
    """Opens the backend (NVML init, or the simulator) and starts the GPU threads.

    Both happen when the service starts (see :class:`OpenedAtStart`). Stopping lets every accepted command finish, within
    :data:`SHUTDOWN_GRACE_S`, before the threads end and the library is shut down.
    """

    name = "gpus"

    def __init__(
        self,
        reactor: Any,
        manager: GpuManager,
        open_backend: Callable[[], GPUBackend],
        required: bool,
        grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        self._reactor = reactor
        self.manager = manager
        self._open_backend = open_backend
        self._required = required
        self._grace_s = grace_s
        self._backend: GPUBackend | None = None

    def open(self) -> None:
        backend = self._open_backend()
        if not backend.gpus:
            if self._required:
                why = backend.absence
                backend.close()
                raise StartupError(f"--enable names a GPU API group, but there is no GPU: {why}")
            log.warn("No GPU: {why}; the GPU API groups answer with no devices.", why=backend.absence)
        self._backend = backend
        self.manager.open(backend.gpus)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        backend, self._backend = self._backend, None
        if not self.closed() or backend is None:
            return succeed(None)
        if self.manager.idle:
            self._close(backend)
            return succeed(None)
        return self._drain_then_close(backend)

    @inlineCallbacks
    def _drain_then_close(self, backend: GPUBackend) -> Any:
        # A Deferred of our own to time out: cancelling the manager's DeferredList would only cancel each
        # queue's wait (failures nobody handles) and still fire it as a success, never as a timeout.
        idle: Deferred[Any] = Deferred()
        self.manager.when_idle().chainDeferred(idle)
        idle.addTimeout(self._grace_s, self._reactor)
        try:
            yield idle
        except TimeoutError:
            log.warn("Shutting down with GPU commands still queued after {s:g} s", s=self._grace_s)
        # Let the responses of commands that just finished reach their clients.
        yield deferLater(self._reactor, 0.05, lambda: None)
        self._close(backend)

    def _close(self, backend: GPUBackend) -> None:
        self.manager.close()
        backend.close()
