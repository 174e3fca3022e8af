"""Options → a running daemon: devices, pollers, the web site and its listener.

This is the only module that knows every layer; it wires them and owns the
lifecycle (start listening, shut down cleanly).
"""

from __future__ import annotations

import gc
import os
import socket
import stat
from typing import Any, Sequence

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import IResource

from zeusd import __version__
from zeusd.devices.cpu.base import CpuPackage
from zeusd.devices.cpu.manager import CpuManager
from zeusd.devices.gpu.base import GPU, GPUBackend
from zeusd.devices.gpu.manager import GpuManager
from zeusd.errors import StartupError
from zeusd.groups import ApiGroup
from zeusd.metrics import ClockTrackingGPU, DaemonMetrics, Scraper
from zeusd.options import ServeConfig
from zeusd.sse import CPU_ENCODERS, GPU_ENCODERS
from zeusd.streaming import CpuPowerSampler, GpuPowerSampler, StreamHub
from zeusd.web.app import Authenticator, ZeusdRoot, ZeusdSite, route_paths, server_resource
from zeusd.web.cpu_read import cpu_read_resource
from zeusd.web.gpu_control import gpu_control_resource
from zeusd.web.gpu_read import gpu_read_resource
from zeusd.web.metrics import metrics_resource

log = Logger()

#: How long shutdown waits for queued GPU commands to finish.
SHUTDOWN_GRACE_S = 10.0
#: Idle keep-alive connections are closed after this long.
IDLE_TIMEOUT_S = 60


def check_privileges(config: ServeConfig) -> None:
    """Groups that touch root-only device files need euid 0 (not in simulation)."""
    if config.simulate or os.geteuid() == 0:
        return
    for group in config.enabled_groups:
        if group.needs_root:
            raise StartupError(
                f"API group '{group.value}' requires root but zeusd is not running as root "
                f"(run as root, drop the group with --enable, or use --simulate)"
            )


def open_gpu_backend(config: ServeConfig) -> GPUBackend:
    if config.simulate:
        from zeusd.devices.gpu.simulated import SimulatedGPUBackend

        return SimulatedGPUBackend(config.simulate_gpus)
    from zeusd.devices.gpu.nvml import open_nvml_backend

    return open_nvml_backend()


def open_cpu_packages(config: ServeConfig) -> list[CpuPackage]:
    if config.simulate:
        from zeusd.devices.cpu.simulated import simulated_packages

        return simulated_packages(config.simulate_cpus)
    from zeusd.devices.cpu.rapl import discover_packages

    return discover_packages(config.rapl_root)


def discovery_info(config: ServeConfig, gpus: Sequence[GPU], packages: Sequence[CpuPackage]) -> dict[str, Any]:
    """``/discover``: the v0.4.0 keys and the v0.5.0 objects side by side (both clients read it)."""
    return {
        "gpu_ids": [g.index for g in gpus],
        "cpu_ids": [p.index for p in packages],
        "dram_available": [p.dram_available for p in packages],
        "enabled_api_groups": [g.value for g in config.enabled_groups],
        "auth_required": config.signing_key_path is not None,
        "gpus": [
            {
                "id": g.index,
                "name": g.name,
                "pci_address": g.pci_address,
                "cumulative_energy_available": g.energy_counter_available,
            }
            for g in gpus
        ],
        "cpus": [{"id": p.index, "dram_available": p.dram_available} for p in packages],
    }


def _track_clocks(devices: Sequence[GPU]) -> list[GPU]:
    """Wrap GPUs so that metrics know the clock ranges this daemon locked."""
    return [ClockTrackingGPU(g) for g in devices]


def load_authenticator(config: ServeConfig) -> Authenticator | None:
    if config.signing_key_path is None:
        if config.mode == "tcp":
            log.warn("Running in TCP mode without authentication: anyone who can reach the port can use every enabled API group.")
        return None
    if config.mode == "tcp" and not config.tls:
        log.warn("Bearer tokens will cross the network in clear text: consider --tls-cert/--tls-key.")
    from zeusd.auth import TokenVerifier, load_signing_key

    return TokenVerifier(load_signing_key(config.signing_key_path))


def prepare_socket_path(path: str) -> None:
    """Make ``path`` free for a new socket without ever harming something else.

    A dead socket (a crashed daemon's) is removed; a live one, or anything
    that is not a socket, is refused.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o755, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it. Remove it or pick another --socket-path.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("Removing stale socket {path} left by a previous run", path=path)
        os.unlink(path)
        return
    except OSError as e:
        raise StartupError(f"Cannot tell whether {path} is in use ({e}); refusing to replace it.") from None
    finally:
        probe.close()
    raise StartupError(f"Another process is already serving on {path}; refusing to take over its socket.")


class ZeusdService(MultiService):
    """The daemon: listens in ``privilegedStartService`` so bind errors stop startup."""

    def __init__(self, reactor: Any, config: ServeConfig, site: ZeusdSite, endpoint: IStreamServerEndpoint) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.site = site
        self.endpoint = endpoint
        self.port: IListeningPort | None = None
        self.gpus: GpuManager | None = None
        self.cpus: CpuManager | None = None
        self.hubs: list[StreamHub] = []
        self.gpu_backend: GPUBackend | None = None
        self._listen_attempted = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        self._listen_attempted = True
        raise_fd_limit()
        # The shared pool runs RAPL reads and metrics rendering; one thread per
        # package on top keeps a hung sysfs read from starving the rest. (GPUs
        # have their own command and power-reader threads.)
        self.reactor.suggestThreadPoolSize(self.config.num_workers + self._cpu_package_count())
        if self.config.mode == "uds":
            prepare_socket_path(self.config.socket_path)
            old_umask = os.umask(0o177)  # no window with a wider mode before the chmod
            try:
                listening = self.endpoint.listen(self.site)
            finally:
                os.umask(old_umask)
        else:
            listening = self.endpoint.listen(self.site)
        failures: list[Any] = []
        listening.addCallbacks(lambda port: setattr(self, "port", port), failures.append)
        if failures:
            raise StartupError(f"Cannot listen on {self._where()}: {failures[0].getErrorMessage()}")
        if self.config.mode == "uds" and (self.config.socket_uid is not None or self.config.socket_gid is not None):
            uid = -1 if self.config.socket_uid is None else self.config.socket_uid
            gid = -1 if self.config.socket_gid is None else self.config.socket_gid
            os.chown(self.config.socket_path, uid, gid)
        log.info("zeusd {version} listening on {where}", version=__version__, where=self._where())

    def startService(self) -> None:
        super().startService()
        if not self._listen_attempted:
            self._listen()  # ``twist`` starts services without privilegedStartService
        if self.cpus is not None:
            self.cpus.start_wrap_guard()
        # What exists now (modules, routes, devices) lives as long as the
        # process: moving it out of the collector's reach keeps full GC passes
        # from rescanning it. Under load that cuts the p99 latency of short
        # requests from ~65 ms to ~13 ms (docs/performance.md).
        self.reactor.callWhenRunning(gc.freeze)

    def _cpu_package_count(self) -> int:
        return len(self.cpus.packages) if self.cpus else 0

    def _where(self) -> str:
        return self.config.socket_path if self.config.mode == "uds" else str(self.config.tcp_address)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        yield super().stopService()
        if self.port is not None:
            yield self.port.stopListening()  # removes the socket file in UDS mode
            self.port = None
        for hub in self.hubs:
            hub.close_all()
        if self.cpus is not None:
            self.cpus.stop()
        if self.gpus is not None:
            idle = self.gpus.when_idle()
            idle.addTimeout(SHUTDOWN_GRACE_S, self.reactor)
            try:
                yield idle
            except defer.TimeoutError:
                log.warn("Shutting down with GPU commands still queued after {s:g} s", s=SHUTDOWN_GRACE_S)
            # Let the responses of commands that just finished reach their clients.
            yield deferLater(self.reactor, 0.05, lambda: None)
            self.gpus.close()
        if self.gpu_backend is not None:
            self.gpu_backend.close()
        log.info("zeusd stopped")


def tls_options(cert_path: str, key_path: str) -> Any:
    """Server TLS settings from PEM files; TLS 1.2+ and Twisted's default ciphers."""
    from twisted.internet import ssl

    key_mode = _mode_of(key_path)
    if key_mode & 0o077:
        raise StartupError(
            f"TLS key file '{key_path}' is accessible by other users (mode {key_mode:o}); run: chmod 600 {key_path}"
        )
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(pem) for pem in _extra_certificates(cert_pem)]
    except Exception as e:  # OpenSSL reports bad PEM in many ways
        raise StartupError(f"Cannot load TLS certificate/key: {e}") from None
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=[c.original for c in chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _mode_of(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError as e:
        raise StartupError(f"Cannot read TLS key file '{path}': {e.strerror}") from None


def _extra_certificates(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    return blocks[1:]


def raise_fd_limit(wanted: int = 65536) -> None:
    """Every stream subscriber is a file descriptor: lift the soft limit toward the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("Raised the open-file limit from {soft} to {target}", soft=soft, target=target)


def make_endpoint(reactor: Any, config: ServeConfig) -> IStreamServerEndpoint:
    if config.mode == "uds":
        return UNIXServerEndpoint(reactor, config.socket_path, backlog=128, mode=config.socket_permissions)
    address = config.tcp_address
    if config.tls_cert_path is not None and config.tls_key_path is not None:
        from twisted.internet.endpoints import SSL4ServerEndpoint

        return SSL4ServerEndpoint(
            reactor, address.port, tls_options(config.tls_cert_path, config.tls_key_path), backlog=128, interface=address.host
        )
    endpoint_type = TCP6ServerEndpoint if address.is_ipv6 else TCP4ServerEndpoint
    return endpoint_type(reactor, address.port, backlog=128, interface=address.host)


def make_service(config: ServeConfig, reactor: Any = None) -> ZeusdService:
    """Build the whole daemon; raises StartupError for anything that stops startup."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    log.info("Starting zeusd {version} with {config}", version=__version__, config=config)
    check_privileges(config)
    log.info("Enabled API groups: {groups}", groups=", ".join(g.value for g in config.enabled_groups))
    authenticator = load_authenticator(config)

    groups: dict[ApiGroup, IResource] = {}
    gpu_backend: GPUBackend | None = None
    gpus: GpuManager | None = None
    cpus: CpuManager | None = None
    hubs: list[StreamHub] = []
    gpu_devices: Sequence[GPU] = []
    packages: list[CpuPackage] = []

    # ``metrics`` opens no device of its own: it covers what the other groups opened.
    metrics = DaemonMetrics() if config.enabled(ApiGroup.METRICS) else None

    if config.enabled(ApiGroup.GPU_CONTROL) or config.enabled(ApiGroup.GPU_READ):
        gpu_backend = open_gpu_backend(config)
        gpu_devices = gpu_backend.gpus
        if metrics is not None and config.enabled(ApiGroup.GPU_CONTROL):
            gpu_devices = _track_clocks(gpu_devices)
        gpus = GpuManager(reactor, gpu_devices)
        if not gpu_devices:
            log.warn("GPU API groups are enabled but no GPU was found.")
        if config.enabled(ApiGroup.GPU_CONTROL):
            groups[ApiGroup.GPU_CONTROL] = gpu_control_resource(gpus)
        if config.enabled(ApiGroup.GPU_READ):
            gpu_hub = StreamHub(
                reactor, "GPU", GpuPowerSampler(gpus), config.gpu_power_poll_hz, GPU_ENCODERS, config.stream_format,
                config.sse_keepalive_s, config.sse_stall_timeout_s,
            )
            hubs.append(gpu_hub)
            groups[ApiGroup.GPU_READ] = gpu_read_resource(gpus, gpu_hub)

    if config.enabled(ApiGroup.CPU_READ):
        packages = open_cpu_packages(config)
        if not packages:
            log.warn("The cpu-read API group is enabled but no RAPL package was found.")
        cpus = CpuManager(reactor, packages)
        cpu_hub = StreamHub(
            reactor, "CPU", CpuPowerSampler(cpus), config.cpu_power_poll_hz, CPU_ENCODERS, config.stream_format,
            config.sse_keepalive_s, config.sse_stall_timeout_s,
        )
        hubs.append(cpu_hub)
        groups[ApiGroup.CPU_READ] = cpu_read_resource(reactor, cpus, cpu_hub, 1.0 / config.cpu_power_poll_hz)

    discovery = discovery_info(config, gpu_devices, packages)
    log.info("Discovered devices: {discovery}", discovery=discovery)
    server = server_resource(discovery, authenticator)
    if metrics is not None:
        if gpus is not None:
            gpus.on_read_error = lambda gpu, what: metrics.device_read_failed("gpu", gpu, what)
        if cpus is not None:
            cpus.on_read_error = lambda cpu, what: metrics.device_read_failed("cpu", cpu, what)
        groups[ApiGroup.METRICS] = metrics_resource(Scraper(reactor, metrics, __version__, gpus, cpus, hubs))
        routes = route_paths([server, *groups.values()])
        metrics.known_routes = frozenset(routes)
        metrics.streaming_routes = frozenset(r for r in routes if r.endswith("/stream_power"))
    root = ZeusdRoot(server, groups, authenticator, metrics)
    site = ZeusdSite(root, timeout=IDLE_TIMEOUT_S)
    site.noisy = False
    site.displayTracebacks = False
    service = ZeusdService(reactor, config, site, make_endpoint(reactor, config))
    service.gpus, service.cpus, service.hubs, service.gpu_backend = gpus, cpus, hubs, gpu_backend
    return service
