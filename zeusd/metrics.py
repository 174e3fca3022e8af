"""Prometheus metrics: the daemon's own counters and the device snapshot of a scrape.

Two kinds of data end up in ``GET /metrics``:

* daemon health, kept as ``prometheus_client`` metrics in a private registry
  and updated on the reactor thread as things happen (requests, device read
  errors), plus process statistics;
* device readings, taken at scrape time through the device managers, so they
  run off the reactor thread and respect the per-GPU command queues (queued
  reads see every command submitted before them) and the shared power-read
  path. They become custom metric families for that one scrape only.

Rendering (and the process collector's ``/proc`` reads) runs on the reactor's
thread pool; only the reactor-owned values (subscriber counts, queue depths)
are read on the reactor thread, while the snapshot is built.

Label values are bounded: device indices and names come from startup
discovery, routes from the routing table (anything else is ``other``), and
operations from the fixed set of read kinds in this code.
"""

from __future__ import annotations

import gzip
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zeusd.devices.base import DeviceError
from zeusd.devices.cpu.manager import CpuManager
from zeusd.devices.executor import SingleFlight, gather
from zeusd.devices.gpu.base import GPU
from zeusd.devices.gpu.control import ControlOperation
from zeusd.devices.gpu.manager import GpuManager
from zeusd.devices.readings import Reading, Results

log = Logger()

#: Label names of every per-GPU sample.
GPU_LABELS = ("gpu", "name", "pci_address")
#: Label names of every per-package sample.
CPU_LABELS = ("package",)
_METHOD_LABELS = {b"GET": "GET", b"POST": "POST"}
#: Route label for any path that is not a known endpoint (bounded cardinality).
OTHER_ROUTE = "other"
#: Request latency buckets (seconds): sub-millisecond reads up to the 5 s device timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Clock domains whose locked range the daemon tracks (``clock`` label values).
CLOCK_DOMAINS = ("graphics", "memory")


def operation_label(what: str) -> str:
    """``"power limit read"`` → ``"power_limit"``: the managers' read names as label values."""
    name = what[: -len(" read")] if what.endswith(" read") else what
    return name.strip().replace(" ", "_") or "unknown"


# Locked clocks ---------------------------------------------------------------------


#: Control operation → (clock domains it touches, the range it leaves locked or None when it resets).
_CLOCK_EFFECTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "set_gpu_locked_clocks": (("graphics",), True),
    "reset_gpu_locked_clocks": (("graphics",), False),
    "set_mem_locked_clocks": (("memory",), True),
    "reset_mem_locked_clocks": (("memory",), False),
    "reset_locked_clocks": (("graphics", "memory"), False),
}


class LockedClocks:
    """The locked clock ranges this daemon set, learned from its own commands ("where known").

    NVML has no portable getter for a locked range, but every lock and reset
    goes through this daemon's command queue, so a finished command tells the
    state: ``state(gpu)[domain]`` is ``(min_mhz, max_mhz)`` when locked,
    ``None`` when reset, and absent when unknown (before the first command, or
    after one that failed, which may have left either state). A
    :class:`~zeusd.devices.gpu.control.CommandObserver` of the GPU manager.
    """

    def __init__(self) -> None:
        self._state: dict[int, dict[str, tuple[int, int] | None]] = {}

    def state(self, gpu: int) -> dict[str, tuple[int, int] | None]:
        return dict(self._state.get(gpu, {}))

    def command_finished(self, gpu: int, operation: ControlOperation[Any], arguments: Any, error: DeviceError | None) -> None:
        effect = _CLOCK_EFFECTS.get(operation.name)
        if effect is None:
            return
        domains, locks = effect
        state = self._state.setdefault(gpu, {})
        for domain in domains:
            if error is not None:
                state.pop(domain, None)
            else:
                state[domain] = (arguments.min_clock_mhz, arguments.max_clock_mhz) if locks else None


# Device reads -------------------------------------------------------------------------

#: The queued per-GPU reads of a scrape: operation label → read.
GPU_STATE_READS: tuple[tuple[str, Callable[[GPU], Any]], ...] = (
    ("energy", lambda g: g.get_total_energy_mj()),
    ("power_limit", lambda g: g.get_power_limit_mw()),
    ("power_limit_constraints", lambda g: g.get_power_limit_constraints_mw()),
    ("persistence_mode", lambda g: g.get_persistence_mode()),
)


def read_gpu_state(gpu: GPU) -> dict[str, Any]:
    """Every queued reading of one GPU in one trip through its command queue.

    Runs on the GPU's command thread. Each field fails on its own (a GPU
    without an energy counter still reports its limits); a failed field's
    value is its DeviceError.
    """
    state: dict[str, Any] = {}
    for operation, read in GPU_STATE_READS:
        if operation == "energy" and not gpu.energy_counter_available:
            continue
        try:
            state[operation] = read(gpu)
        except DeviceError as error:
            if error.status != 400:  # 400: the GPU does not have it (AMD persistence mode), not a failure
                state[operation] = error
    return state


# Daemon metrics --------------------------------------------------------------------


class DaemonMetrics:
    """The daemon's own metrics: requests, latency, device read errors, process stats.

    Updated on the reactor thread; ``prometheus_client`` metrics are locked
    internally, so rendering on a pool thread reads them safely.
    """

    def __init__(self, known_routes: Iterable[str] = (), streaming_routes: Iterable[str] = ()) -> None:
        # No ``*_created`` series: they double the series count and tell a scraper nothing here.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.started_at = time.monotonic()
        self.known_routes = frozenset(known_routes)
        self.streaming_routes = frozenset(streaming_routes)
        self.requests = Counter(
            "zeusd_http_requests",
            "HTTP requests answered, by endpoint (route template), method and status code.",
            ("route", "method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "zeusd_http_request_duration_seconds",
            "Time from request line to the end of the response, by endpoint (streams excluded).",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.read_errors = Counter(
            "zeusd_device_read_errors",
            "Failed device reads (API requests, streams and scrapes), by device kind, index and operation.",
            ("device", "index", "operation"),
            registry=self.registry,
        )

    def start(self) -> None:
        """Begin the uptime clock and the process statistics (they read /proc)."""
        self.started_at = time.monotonic()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def route_label(self, path: str | None) -> str:
        """A known endpoint's path, or ``other``: never a raw user path."""
        return path if path is not None and path in self.known_routes else OTHER_ROUTE

    def observe_request(self, route: str, method: bytes, code: int, seconds: float) -> None:
        key = (route, _METHOD_LABELS.get(method, "other"), code)  # bounded: known routes, two methods
        series = self._request_series.get(key)
        if series is None:
            # Label lookups are the dearest part of counting a request: once per (route, method, code).
            route, method_label, _ = key
            latency = None if route in self.streaming_routes else self.latency.labels(route, method_label)
            series = self._request_series[key] = (self.requests.labels(route, method_label, str(code)), latency)
        count, latency = series
        count.inc()
        if latency is not None:
            latency.observe(seconds)

    def device_read_failed(self, device: str, index: int, what: str) -> None:
        self.read_errors.labels(device, str(index), operation_label(what)).inc()


# Scrapes ---------------------------------------------------------------------------


class _ScrapeView(Collector):
    """One scrape's families: the long-lived registry plus this snapshot."""

    def __init__(self, registry: CollectorRegistry, families: Sequence[Metric]) -> None:
        self._registry = registry
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        yield from self._families


class Scraper:
    """Takes device snapshots and renders them with the daemon metrics.

    Concurrent scrapes share one snapshot: a burst of scrapers (several
    Prometheus replicas) costs one round of device reads.
    """

    def __init__(
        self,
        reactor: Any,
        metrics: DaemonMetrics,
        version: str,
        gpus: GpuManager | None = None,
        cpus: CpuManager | None = None,
        hubs: Sequence[Any] = (),
        clocks: LockedClocks | None = None,
    ) -> None:
        self._reactor = reactor
        self.metrics = metrics
        self._version = version
        self._gpus = gpus
        self._cpus = cpus
        self._hubs = list(hubs)
        self._clocks = clocks
        # Any runner will do: the snapshot's reads are already off the reactor thread.
        self._snapshots = SingleFlight(lambda take: take())
        #: GPUs whose queued scrape read is submitted but has not run yet.
        self._state_pending: set[int] = set()

    # Public ------------------------------------------------------------------------

    def render(self, accept: str | None, gzip_ok: bool) -> "Deferred[tuple[bytes, str, bool]]":
        """A scrape: ``(body, content type, gzipped)``; never fails for a device's sake."""

        def encode(families: list[Metric]) -> "Deferred[tuple[bytes, str, bool]]":
            pool = self._reactor.getThreadPool()
            return deferToThreadPool(self._reactor, pool, _encode, self.metrics.registry, families, accept or "", gzip_ok)

        return self.snapshot().addCallback(encode)

    def snapshot(self) -> "Deferred[list[Metric]]":
        """This moment's device and health families (shared by concurrent callers)."""
        return self._snapshots.call("snapshot", self._take)

    # Snapshot ------------------------------------------------------------------------

    def _take(self) -> "Deferred[list[Metric]]":
        started = time.monotonic()
        gpus, cpus = self._gpus, self._cpus
        power: Deferred[Any] = gpus.read_power(gpus.ids) if gpus is not None else succeed({})
        state = self._read_gpu_states(gpus) if gpus is not None else succeed({})
        energy: Deferred[Any] = cpus.read_energy(cpus.ids, True, True) if cpus is not None else succeed({})

        def build(results: list[Any]) -> list[Metric]:
            gpu_power, gpu_state, cpu_energy = results
            families = self._gpu_families(gpu_power, gpu_state) + self._cpu_families(cpu_energy)
            return families + self._health_families(time.monotonic() - started)

        return gatherResults([power, state, energy], consumeErrors=True).addCallback(build)

    def _read_gpu_states(self, gpus: GpuManager) -> "Deferred[Results[dict[str, Any]]]":
        """One queued read per GPU, but never a second one behind a read that has not run yet.

        A hung GPU's queued read outlives the request's timeout; without this,
        every scrape would leave one more read queued behind it.
        """
        reads: dict[int, Deferred[Any]] = {}
        for i in gpus.ids:
            if i in self._state_pending:
                reads[i] = succeed(DeviceError(f"GPU {i} has not finished the previous scrape's reads."))
                self.metrics.device_read_failed("gpu", i, "state")
                continue
            self._state_pending.add(i)
            reads[i] = gpus.read_queued([i], self._state_reader(i), "state read").addCallback(_pick, i)
        return gather(reads)

    def _state_reader(self, index: int) -> Callable[[GPU], dict[str, Any]]:
        def read(gpu: GPU) -> dict[str, Any]:
            try:
                return read_gpu_state(gpu)
            finally:
                self._state_pending.discard(index)  # on the GPU's thread: set ops are atomic

        return read

    def _gpu_families(self, power: Results[Reading[int]], state: Results[dict[str, Any]]) -> list[Metric]:
        if self._gpus is None:
            return []
        f_power = GaugeMetricFamily("zeusd_gpu_power_watts", "Instant power draw of the GPU.", labels=GPU_LABELS, unit="watts")
        f_energy = CounterMetricFamily(
            "zeusd_gpu_energy_joules", "Energy the GPU consumed since the driver was loaded.", labels=GPU_LABELS, unit="joules"
        )
        f_limit = GaugeMetricFamily("zeusd_gpu_power_limit_watts", "Current power management limit.", labels=GPU_LABELS, unit="watts")
        f_min = GaugeMetricFamily(
            "zeusd_gpu_power_limit_min_watts", "Lowest power limit the GPU accepts.", labels=GPU_LABELS, unit="watts"
        )
        f_max = GaugeMetricFamily(
            "zeusd_gpu_power_limit_max_watts", "Highest power limit the GPU accepts.", labels=GPU_LABELS, unit="watts"
        )
        f_persist = GaugeMetricFamily(
            "zeusd_gpu_persistence_mode_enabled", "1 if persistence mode is on, 0 if off.", labels=GPU_LABELS
        )
        clock_labels = (*GPU_LABELS, "clock")
        f_locked = GaugeMetricFamily(
            "zeusd_gpu_clocks_locked",
            "1 if this daemon locked the clock domain, 0 if it reset it; absent when unknown.",
            labels=clock_labels,
        )
        f_lock_min = GaugeMetricFamily(
            "zeusd_gpu_locked_clocks_min_hertz", "Lower bound of the clock range this daemon locked.", labels=clock_labels, unit="hertz"
        )
        f_lock_max = GaugeMetricFamily(
            "zeusd_gpu_locked_clocks_max_hertz", "Upper bound of the clock range this daemon locked.", labels=clock_labels, unit="hertz"
        )
        f_pending = GaugeMetricFamily(
            "zeusd_gpu_pending_commands", "Control commands and queued reads not finished yet.", labels=GPU_LABELS
        )
        f_up = GaugeMetricFamily("zeusd_gpu_up", "1 if every read of the GPU in this scrape succeeded, else 0.", labels=GPU_LABELS)
        f_info = GaugeMetricFamily(
            "zeusd_gpu_info", "Always 1; which backend (nvml, amdsmi, simulated) serves the GPU.", labels=(*GPU_LABELS, "backend")
        )
        f_override = GaugeMetricFamily(
            "zeusd_gpu_command_override",
            "Always 1; a GPU control operation that runs the operator's commands (--gpu-command-overrides).",
            labels=("operation",),
        )
        for name in self._gpus.overridden:
            f_override.add_metric([name], 1)

        for i, gpu in enumerate(self._gpus.gpus):
            labels = [str(gpu.index), gpu.name, gpu.pci_address]
            f_info.add_metric([*labels, gpu.backend], 1)
            up = True
            f_pending.add_metric(labels, self._gpus.pending(i))
            reading = power.get(i)
            if isinstance(reading, Reading):
                f_power.add_metric(labels, reading.value / 1000)
            else:
                up = False  # counted by the manager's read-error hook
            fields = state.get(i)
            if not isinstance(fields, dict):
                f_up.add_metric(labels, 0)
                continue  # the whole queued read failed or timed out (counted by the hook)
            for operation, value in fields.items():
                if isinstance(value, DeviceError):
                    up = False
                    self.metrics.device_read_failed("gpu", i, operation)
            energy, limit, limits, persist = (fields.get(k) for k in ("energy", "power_limit", "power_limit_constraints", "persistence_mode"))
            if isinstance(energy, int):
                f_energy.add_metric(labels, energy / 1000)
            if isinstance(limit, int):
                f_limit.add_metric(labels, limit / 1000)
            if isinstance(limits, tuple):
                f_min.add_metric(labels, limits[0] / 1000)
                f_max.add_metric(labels, limits[1] / 1000)
            if isinstance(persist, bool):
                f_persist.add_metric(labels, 1 if persist else 0)
            clocks: Mapping[str, tuple[int, int] | None] = self._clocks.state(i) if self._clocks is not None else {}
            for domain in CLOCK_DOMAINS:
                if domain not in clocks:
                    continue
                locked = clocks[domain]
                f_locked.add_metric([*labels, domain], 0 if locked is None else 1)
                if locked is not None:
                    f_lock_min.add_metric([*labels, domain], locked[0] * 1e6)
                    f_lock_max.add_metric([*labels, domain], locked[1] * 1e6)
            f_up.add_metric(labels, 1 if up else 0)
        return [
            f_info, f_override, f_power, f_energy, f_limit, f_min, f_max, f_persist, f_locked, f_lock_min, f_lock_max,
            f_pending, f_up,
        ]  # fmt: skip

    def _cpu_families(self, energy: Results[tuple[int | None, int | None]]) -> list[Metric]:
        if self._cpus is None:
            return []
        f_pkg = CounterMetricFamily(
            "zeusd_cpu_package_energy_joules",
            "RAPL package energy, corrected for counter wraparound since the daemon started.",
            labels=CPU_LABELS,
            unit="joules",
        )
        f_dram = CounterMetricFamily(
            "zeusd_cpu_dram_energy_joules",
            "RAPL DRAM energy, corrected for counter wraparound since the daemon started.",
            labels=CPU_LABELS,
            unit="joules",
        )
        f_up = GaugeMetricFamily("zeusd_cpu_package_up", "1 if the package's energy read succeeded, else 0.", labels=CPU_LABELS)
        for index in self._cpus.ids:
            labels = [str(index)]
            value = energy.get(index)
            if not isinstance(value, tuple):
                f_up.add_metric(labels, 0)  # counted by the manager's read-error hook
                continue
            cpu_uj, dram_uj = value
            if cpu_uj is not None:
                f_pkg.add_metric(labels, cpu_uj / 1e6)
            if dram_uj is not None:
                f_dram.add_metric(labels, dram_uj / 1e6)
            f_up.add_metric(labels, 1)
        return [f_pkg, f_dram, f_up]

    def _health_families(self, read_seconds: float) -> list[Metric]:
        info = GaugeMetricFamily("zeusd_build_info", "Always 1; the daemon's version.", labels=("version",))
        info.add_metric([self._version], 1)
        uptime = GaugeMetricFamily("zeusd_uptime_seconds", "Seconds since the daemon started.", unit="seconds")
        uptime.add_metric([], time.monotonic() - self.metrics.started_at)
        subscribers = GaugeMetricFamily(
            "zeusd_stream_subscribers", "Open power-stream (SSE) connections, by device kind.", labels=("kind",)
        )
        for hub in self._hubs:
            subscribers.add_metric([str(hub.kind).lower()], hub.subscriber_count)
        read = GaugeMetricFamily(
            "zeusd_scrape_device_read_seconds", "How long this scrape's device reads took.", unit="seconds"
        )
        read.add_metric([], read_seconds)
        return [info, uptime, subscribers, read]


def _pick(results: Results[Any], index: int) -> Any:
    return results[index]


def _encode(registry: CollectorRegistry, families: Sequence[Metric], accept: str, gzip_ok: bool) -> tuple[bytes, str, bool]:
    """Render on a pool thread (text or OpenMetrics, as the scraper asked)."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(_ScrapeView(registry, families))
    if gzip_ok:
        return gzip.compress(body, compresslevel=1), content_type, True
    return body, content_type, False
