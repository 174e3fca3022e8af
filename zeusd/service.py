"""Options → the daemon's service tree.

This is the only module that knows every layer; it wires them and nothing
else. :func:`make_service` builds a tree of ``IService`` objects and does no
I/O: no device is opened, no thread started, no socket bound. Each part opens
what it needs in ``privilegedStartService`` (or ``startService`` under runners
that skip that step) and closes it in ``stopService``. The tree's order is
the start order; stopping runs in reverse, one child after the other:

    ZeusdService
      AuthService       the signing key (read as root)
      GpuService        NVML or the simulator, per-GPU command and reader threads
      CpuService        RAPL discovery, per-package threads, wraparound guard
      StreamService     the stream hubs (stop: every stream ends cleanly)
      MetricsService    process statistics for /metrics
      ListenerService…  one per listener (stop: first of all)

Every entry point (``zeusd serve``, ``twist zeusd``, ``twistd`` daemonizing
or not, the tac file, systemd) runs this same tree, so a fork between building
and starting (``twistd``) loses nothing.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any, Sequence

from klein import Klein
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from zeusd import __version__
from zeusd.devices.cpu.base import CpuPackage
from zeusd.devices.cpu.manager import CpuManager
from zeusd.devices.cpu.service import CpuService
from zeusd.devices.executor import ExecutorFactory, thread_executors
from zeusd.devices.gpu.base import GPUBackend
from zeusd.devices.gpu.manager import GpuManager
from zeusd.devices.gpu.service import GpuService
from zeusd.devices.sampling import CpuPowerSampler, GpuPowerSampler
from zeusd.errors import StartupError
from zeusd.groups import ApiGroup
from zeusd.lifecycle import OpenedAtStart
from zeusd.listeners import ListenerService
from zeusd.options import DEFAULT_RAPL_ROOTS, ServeConfig
from zeusd.sse import CPU_ENCODERS, GPU_ENCODERS
from zeusd.startup import fail_startup, preflight, print_error, raise_fd_limit
from zeusd.streaming import StreamHub
from zeusd.systemd import Notifier
from zeusd.web.app import ZeusdRoot, ZeusdSite, route_paths, server_app
from zeusd.web.cpu_read import cpu_read_app
from zeusd.web.gpu_control import gpu_control_app
from zeusd.web.gpu_read import gpu_read_app

if TYPE_CHECKING:
    from zeusd.devices.gpu.overrides import CommandOverride
    from zeusd.metrics import DaemonMetrics, LockedClocks

log = Logger()

#: Idle keep-alive connections are closed after this long.
IDLE_TIMEOUT_S = 60


# Devices ----------------------------------------------------------------------------


def open_gpu_backend(config: ServeConfig) -> GPUBackend:
    if config.simulate:
        from zeusd.devices.gpu.simulated import SimulatedGPUBackend

        return SimulatedGPUBackend(config.simulate_gpus, config.simulate_vendor)
    from zeusd.devices.gpu.backends import open_gpu_backend as open_backend

    return open_backend(config.gpu_backend)


def discover_cpu_packages(config: ServeConfig) -> list[CpuPackage]:
    if config.simulate:
        from zeusd.devices.cpu.simulated import simulated_packages

        return simulated_packages(config.simulate_cpus)
    import os

    from zeusd.devices.cpu.rapl import discover_packages

    root = config.rapl_root or next((r for r in DEFAULT_RAPL_ROOTS if os.path.isdir(r)), DEFAULT_RAPL_ROOTS[-1])
    return discover_packages(root)


def _missing_cpus(config: ServeConfig) -> str | None:
    """The startup error when no RAPL package is found, if CPUs were asked for explicitly."""
    if config.simulate:
        return "the simulated node was given no CPU packages (--simulate-cpus 0)" if config.groups_explicit else None
    if config.rapl_root is not None:
        return f"--rapl-root {config.rapl_root}: no usable RAPL package (intel-rapl:N with a readable energy_uj)"
    if config.groups_explicit:
        return "--enable names cpu-read, but no RAPL package was found (is the intel_rapl driver loaded?)"
    return None


def discovery_info(config: ServeConfig, gpus: GpuManager | None, cpus: CpuManager | None) -> dict[str, Any]:
    """``/discover``: the v0.4.0 keys and the v0.5.0 objects side by side (both clients read it)."""
    gpu_list = gpus.gpus if gpus is not None else []
    packages = list(cpus.packages.values()) if cpus is not None else []
    return {
        "gpu_ids": [g.index for g in gpu_list],
        "cpu_ids": [p.index for p in packages],
        "dram_available": [p.dram_available for p in packages],
        "enabled_api_groups": [g.value for g in config.enabled_groups],
        "auth_required": config.signing_key_path is not None,
        "gpus": [
            {
                "id": g.index,
                "name": g.name,
                "backend": g.backend,
                "pci_address": g.pci_address,
                "cumulative_energy_available": g.energy_counter_available,
            }
            for g in gpu_list
        ],
        "cpus": [{"id": p.index, "dram_available": p.dram_available} for p in packages],
        "gpu_command_overrides": gpus.overridden if gpus is not None else [],
    }


# The services that are not device services ------------------------------------------


class AuthService(OpenedAtStart):
    """The signing key, read at start (often a root-only file); verifies tokens for the root resource."""

    name = "auth"

    def __init__(self, key_path: str) -> None:
        self._key_path = key_path
        self._verifier: Any = None

    def open(self) -> None:
        from zeusd.auth import TokenVerifier, load_signing_key

        self._verifier = TokenVerifier(load_signing_key(self._key_path))

    def verify_authorization(self, header: bytes | None) -> Any:
        return self._verifier.verify_authorization(header)

    def check_scope(self, claims: Any, group: str) -> None:
        self._verifier.check_scope(claims, group)


#: How long stopping waits for the last chunks of ended streams to leave.
STREAM_LINGER_S = 0.05


class StreamService(Service):
    """The stream hubs: pollers start on demand; stopping ends every stream cleanly."""

    name = "streams"

    def __init__(self, reactor: Any, hubs: Sequence[StreamHub]) -> None:
        self._reactor = reactor
        self.hubs = list(hubs)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        ended = sum(hub.close_all() for hub in self.hubs)
        if not ended:
            return succeed(None)
        # The terminating chunks are queued in the transports; give them a moment to
        # leave before the reactor's shutdown drops every connection.
        return deferLater(self._reactor, STREAM_LINGER_S, lambda: None)


class MetricsService(Service):
    name = "metrics"

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()
        self.metrics.start()


# The tree ---------------------------------------------------------------------------


class ZeusdService(MultiService):
    """The daemon: starts its children in order, stops them in reverse, one at a time.

    A startup error in any child undoes what the others started, then stops the
    process with one ``Error:`` line (:func:`zeusd.startup.fail_startup`), or,
    with ``exit_on_startup_error=False`` (tests), raises it.
    """

    def __init__(
        self,
        reactor: Any,
        config: ServeConfig,
        site: ZeusdSite,
        discovery: Any,
        notifier: Notifier | None = None,
        exit_on_startup_error: bool = True,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.config = config
        #: The web site every listener serves.
        self.site = site
        self._discovery = discovery
        self._notifier = notifier or Notifier(None)
        self._exit_on_startup_error = exit_on_startup_error
        self._privileged_started: list[Any] = []

    def privilegedStartService(self) -> None:
        self._start_children("privilegedStartService", self._privileged_started)

    def startService(self) -> None:
        Service.startService(self)
        raise_fd_limit()
        self._reactor.suggestThreadPoolSize(self.config.num_workers)
        started: list[Any] = []
        self._start_children("startService", started)
        self._reactor.callWhenRunning(self._serving)

    def _start_children(self, method: str, started: list[Any]) -> None:
        for child in self:
            try:
                getattr(child, method)()
            except StartupError as error:
                self._undo([*self._privileged_started, *started])
                self._fail(error)
            if child not in started:
                started.append(child)

    def _undo(self, started: list[Any]) -> None:
        for child in reversed(list(dict.fromkeys(started))):
            try:
                child.stopService()
            except Exception:
                log.failure("Undoing {child} after a startup error failed", child=getattr(child, "name", child))
        self._privileged_started.clear()

    def _fail(self, error: StartupError) -> None:
        if self._exit_on_startup_error:
            fail_startup(error)
        raise error

    def _serving(self) -> None:
        discovery = self._discovery()
        log.info("Discovered devices: {discovery}", discovery=discovery)
        log.info(
            "zeusd {version} serving {gpus} GPU(s) and {cpus} CPU package(s); streams in {stream_format} format "
            "(zeus {clients} clients{other})",
            version=__version__,
            gpus=len(discovery["gpu_ids"]),
            cpus=len(discovery["cpu_ids"]),
            stream_format=self.config.stream_format,
            clients="0.15.x" if self.config.stream_format == "v0.4" else "0.16.x",
            other="; zeus 0.16.x clients need --stream-format v0.5"
            if self.config.stream_format == "v0.4"
            else "; zeus 0.15.x clients need --stream-format v0.4",
        )
        self._notifier.notify("READY=1", f"STATUS=Serving {len(discovery['gpu_ids'])} GPU(s), {len(discovery['cpu_ids'])} CPU package(s)")
        # What exists now (modules, routes, devices) lives as long as the
        # process: moving it out of the collector's reach keeps full GC passes
        # from rescanning it. Under load that cuts the p99 latency of short
        # requests from ~65 ms to ~13 ms (docs/performance.md). `zeusd` starts
        # with the collector off (zeusd/__main__.py): it collects from here on.
        gc.freeze()
        gc.enable()

    @inlineCallbacks
    def stopService(self) -> Any:
        self._notifier.notify("STOPPING=1")
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield maybeDeferred(child.stopService)
            except Exception:
                log.failure("Stopping {child} failed", child=getattr(child, "name", child))
        self._privileged_started.clear()
        log.info("zeusd stopped")


def make_daemon(config: ServeConfig, reactor: Any = None) -> ZeusdService:
    """What every entry point runs: log the configuration, check it, build the tree.

    A configuration that cannot start ends the process here, with one
    ``Error:`` line and exit status 1: under ``twistd`` this is still before
    the fork, so the line reaches the terminal.
    """
    for line in config.summary():
        log.info("Configuration: {line}", line=line)
    try:
        preflight(config)
    except StartupError as error:
        log.error("Error: {error}", error=str(error))
        print_error(error)
        raise SystemExit(1) from None
    return make_service(config, reactor, notifier=Notifier.from_environment())


def make_service(
    config: ServeConfig,
    reactor: Any = None,
    executors: ExecutorFactory | None = None,
    notifier: Notifier | None = None,
    exit_on_startup_error: bool = True,
) -> ZeusdService:
    """Build the daemon's service tree (see the module docstring); opens and starts nothing."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    executors = executors or thread_executors(reactor)
    groups: dict[ApiGroup, Klein] = {}
    children: list[Service] = []
    gpus: GpuManager | None = None
    cpus: CpuManager | None = None
    hubs: list[StreamHub] = []
    # prometheus_client is imported only by a daemon that serves /metrics.
    metrics: DaemonMetrics | None = None
    clocks: LockedClocks | None = None
    if config.enabled(ApiGroup.METRICS):
        from zeusd import metrics as prometheus

        metrics = prometheus.DaemonMetrics()
        clocks = prometheus.LockedClocks() if config.enabled(ApiGroup.GPU_CONTROL) else None

    auth: AuthService | None = None
    if config.signing_key_path is not None:
        auth = AuthService(config.signing_key_path)
        children.append(auth)

    if config.enabled(ApiGroup.GPU_CONTROL) or config.enabled(ApiGroup.GPU_READ):
        overrides: dict[str, CommandOverride] = {}
        if config.gpu_command_overrides is not None and config.enabled(ApiGroup.GPU_CONTROL):
            from zeusd.devices.gpu.overrides import OverridesService  # only when configured: TOML, trust, runner

            children.append(OverridesService(config.gpu_command_overrides, overrides))
        gpus = GpuManager(reactor, executors, overrides)
        gpus_required = config.groups_explicit and (
            config.enabled(ApiGroup.GPU_CONTROL) or config.enabled(ApiGroup.GPU_READ)
        )
        children.append(GpuService(reactor, gpus, lambda: open_gpu_backend(config), gpus_required))
        if clocks is not None:
            gpus.observers.append(clocks)
        if config.enabled(ApiGroup.GPU_CONTROL):
            groups[ApiGroup.GPU_CONTROL] = gpu_control_app(gpus)
        if config.enabled(ApiGroup.GPU_READ):
            gpu_hub = StreamHub(
                reactor, "GPU", GpuPowerSampler(reactor, gpus), config.gpu_power_poll_hz, GPU_ENCODERS,
                config.stream_format, config.sse_keepalive_s, config.sse_stall_timeout_s,
            )
            hubs.append(gpu_hub)
            groups[ApiGroup.GPU_READ] = gpu_read_app(gpus, gpu_hub)

    if config.enabled(ApiGroup.CPU_READ):
        cpus = CpuManager(reactor, executors)
        children.append(CpuService(reactor, cpus, lambda: discover_cpu_packages(config), _missing_cpus(config)))
        cpu_hub = StreamHub(
            reactor, "CPU", CpuPowerSampler(reactor, cpus), config.cpu_power_poll_hz, CPU_ENCODERS,
            config.stream_format, config.sse_keepalive_s, config.sse_stall_timeout_s,
        )
        hubs.append(cpu_hub)
        groups[ApiGroup.CPU_READ] = cpu_read_app(reactor, cpus, cpu_hub, 1.0 / config.cpu_power_poll_hz)

    children.append(StreamService(reactor, hubs))
    server = server_app(lambda: discovery_info(config, gpus, cpus), auth)
    if metrics is not None:
        from zeusd.metrics import Scraper
        from zeusd.web.metrics import metrics_app

        if gpus is not None:
            gpus.on_read_error = lambda gpu, what: metrics.device_read_failed("gpu", gpu, what)
        if cpus is not None:
            cpus.on_read_error = lambda cpu, what: metrics.device_read_failed("cpu", cpu, what)
        groups[ApiGroup.METRICS] = metrics_app(Scraper(reactor, metrics, __version__, gpus, cpus, hubs, clocks))
        routes = route_paths([server, *groups.values()])
        metrics.known_routes = frozenset(routes)
        metrics.streaming_routes = frozenset(r for r in routes if r.endswith("/stream_power"))
        children.append(MetricsService(metrics))

    root = ZeusdRoot(server.resource(), {group: app.resource() for group, app in groups.items()}, auth, metrics)
    site = ZeusdSite(root, timeout=IDLE_TIMEOUT_S)
    site.noisy = False
    site.displayTracebacks = False
    for spec in config.listeners:
        children.append(ListenerService(reactor, spec, site, config.socket_owner))

    service = ZeusdService(
        reactor, config, site, lambda: discovery_info(config, gpus, cpus), notifier, exit_on_startup_error
    )
    for child in children:
        child.setServiceParent(service)
    return service
