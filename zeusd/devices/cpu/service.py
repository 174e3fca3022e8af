"""The CPU service: RAPL discovery, the per-package threads and the wraparound guard."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from zeusd.devices.cpu.base import CpuPackage
from zeusd.devices.cpu.manager import CpuManager, wrap_guard_interval
from zeusd.errors import StartupError
from zeusd.lifecycle import OpenedAtStart

log = Logger()


class CpuService(OpenedAtStart):
    """Discovers the packages and starts their threads at (privileged) start; the
    wraparound guard runs from ``startService`` to ``stopService``.

    ``missing`` is the startup error to raise when no package is found, for a
    configuration that asked for CPUs explicitly (None: warn and serve none).
    """

    name = "cpus"

    def __init__(
        self,
        reactor: Any,
        manager: CpuManager,
        discover: Callable[[], Sequence[CpuPackage]],
        missing: str | None,
    ) -> None:
        self._reactor = reactor
        self.manager = manager
        self._discover = discover
        self._missing = missing
        self._guard: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        zones = [z for p in self.manager.packages.values() for z in p.zones]
        if zones:
            interval = wrap_guard_interval(zones)
            guard = self._guard = LoopingCall(self.manager.read_stale, interval)
            guard.clock = self._reactor
            guard.start(interval, now=False).addErrback(lambda f: log.failure("RAPL wraparound guard stopped", f))

    def open(self) -> None:
        packages = self._discover()
        if not packages:
            if self._missing is not None:
                raise StartupError(self._missing)
            log.warn("No RAPL package found: the cpu-read API group answers with no devices.")
        self.manager.open(packages)

    def stopService(self) -> None:
        super().stopService()
        guard, self._guard = self._guard, None
        if guard is not None and guard.running:
            guard.stop()
        if self.closed():
            self.manager.close()
