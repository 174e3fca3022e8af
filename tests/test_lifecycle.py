"""The service tree in memory: what building, starting and stopping do, and in which order.

No socket is bound and no thread runs: a ``MemoryReactorClock`` records the
listeners, ``task.Clock`` time drives the shutdown grace, and every device
call runs when the test runs it (:class:`tests.manual.ManualExecutor`).
"""

from __future__ import annotations

import gc
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from tests.manual import ManualExecutors, TestReactor
from zeusd.devices.gpu.control import SET_POWER_LIMIT, PowerLimit
from zeusd.devices.gpu.service import SHUTDOWN_GRACE_S
from zeusd.errors import StartupError
from zeusd.groups import ApiGroup
from zeusd.listeners import ListenerSpec
from zeusd.options import ServeConfig
from zeusd.service import StreamService, ZeusdService, make_service
from zeusd.systemd import Notifier

GPU_EXECUTORS = [f"zeusd-gpu-{i}{kind}" for i in range(2) for kind in ("", "-power")]
CPU_EXECUTORS = ["zeusd-cpu-0"]


def simulated(tmp_path: Path, **overrides: Any) -> ServeConfig:
    settings: dict[str, Any] = dict(
        listeners=(ListenerSpec("unix", path=str(tmp_path / "zeusd.sock"), mode=0o660),),
        simulate=True,
        simulate_gpus=2,
        simulate_cpus=1,
    )
    settings.update(overrides)
    return ServeConfig(**settings)


def build(config: ServeConfig, notifier: Notifier | None = None) -> tuple[ZeusdService, TestReactor, ManualExecutors]:
    reactor, executors = TestReactor(), ManualExecutors()
    service = make_service(config, reactor, executors, notifier, exit_on_startup_error=False)
    return service, reactor, executors


def kinds(service: ZeusdService) -> list[str]:
    return [type(child).__name__ for child in service]


def test_building_opens_binds_and_starts_nothing(tmp_path: Path) -> None:
    threads = threading.active_count()
    reactor = TestReactor()
    service = make_service(simulated(tmp_path), reactor, exit_on_startup_error=False)  # real thread executors
    assert threading.active_count() == threads
    assert reactor.unixServers == [] and reactor.tcpServers == [] and reactor.getDelayedCalls() == []
    assert not (tmp_path / "zeusd.sock").exists()
    assert kinds(service) == ["GpuService", "CpuService", "StreamService", "MetricsService", "ListenerService"]


def test_start_opens_devices_before_listening(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path))
    service.privilegedStartService()
    assert sorted(executors.made) == sorted(GPU_EXECUTORS + CPU_EXECUTORS)
    assert all(e.started and not e.stopped for e in executors.made.values())
    assert [(path, mode) for path, _, _, mode, _ in reactor.unixServers] == [(str(tmp_path / "zeusd.sock"), 0o660)]
    service.startService()
    assert reactor.pool_size == service.config.num_workers
    assert len(reactor.getDelayedCalls()) == 1  # the RAPL wraparound guard, and nothing else


def test_twist_starts_everything_without_the_privileged_step(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path))
    service.startService()  # `twist` never calls privilegedStartService
    assert sorted(executors.made) == sorted(GPU_EXECUTORS + CPU_EXECUTORS)
    assert len(reactor.unixServers) == 1
    service.privilegedStartService()  # a runner that calls both opens nothing twice
    assert len(reactor.unixServers) == 1 and len(executors.made) == len(GPU_EXECUTORS + CPU_EXECUTORS)


def test_stop_runs_in_reverse_one_child_after_the_other(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path))
    service.privilegedStartService()
    service.startService()
    order: list[str] = []
    streams_closed: Deferred[None] = Deferred()
    for child in service:
        stop = child.stopService

        def recorded(child: Any = child, stop: Any = stop) -> Any:
            order.append(type(child).__name__)
            result = stop()
            return streams_closed if isinstance(child, StreamService) else result

        child.stopService = recorded
    stopped = service.stopService()
    assert order == ["ListenerService", "MetricsService", "StreamService"]  # waiting for the streams
    assert not any(e.stopped for e in executors.made.values())
    streams_closed.callback(None)
    assert order == ["ListenerService", "MetricsService", "StreamService", "CpuService", "GpuService"]
    assert stopped.called and all(e.stopped for e in executors.made.values())
    assert reactor.getDelayedCalls() == []  # the wraparound guard is gone too


def test_stop_lets_an_accepted_command_finish(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path))
    service.privilegedStartService()
    service.startService()
    gpus = service.getServiceNamed("gpus").manager
    outcome: list[Any] = []
    gpus.submit(0, SET_POWER_LIMIT, PowerLimit(300_000)).addCallback(outcome.append)
    stopped = service.stopService()
    assert service.getServiceNamed("streams").running == 0  # listeners and streams are already down
    assert not stopped.called and not executors["zeusd-gpu-0"].stopped
    executors["zeusd-gpu-0"].run_next()
    assert outcome == [None] and gpus.gpus[0].get_power_limit_mw() == 300_000
    assert not stopped.called  # the response still gets a moment to leave
    reactor.advance(0.05)
    assert stopped.called and executors["zeusd-gpu-0"].stopped


def test_stop_gives_up_on_a_hung_command_after_the_grace_period(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path))
    service.privilegedStartService()
    service.startService()
    gpus = service.getServiceNamed("gpus").manager
    gpus.submit(1, SET_POWER_LIMIT, PowerLimit(300_000))
    outcome: list[Any] = []
    with capturedLogs() as events:
        service.stopService().addBoth(outcome.append)
        reactor.advance(SHUTDOWN_GRACE_S - 0.01)
        assert not outcome
        reactor.advance(0.01)
        reactor.advance(0.05)
        gc.collect()  # a failure nobody handled would be logged now
    assert outcome == [None]
    assert executors["zeusd-gpu-1"].pending == 1 and executors["zeusd-gpu-1"].stopped
    logged = [formatEvent(e) for e in events]
    assert f"Shutting down with GPU commands still queued after {SHUTDOWN_GRACE_S:g} s" in logged
    assert not [e for e in events if "log_failure" in e or e.get("isError")], logged


def test_a_start_that_fails_halfway_undoes_what_it_started(tmp_path: Path) -> None:
    (tmp_path / "zeusd.sock").write_text("not a socket")
    service, reactor, executors = build(simulated(tmp_path))
    with pytest.raises(StartupError, match="exists and is not a socket"):
        service.privilegedStartService()
    assert sorted(executors.made) == sorted(GPU_EXECUTORS + CPU_EXECUTORS)
    assert all(e.started and e.stopped for e in executors.made.values())
    assert reactor.unixServers == []
    assert (tmp_path / "zeusd.sock").read_text() == "not a socket"


def test_gpus_asked_for_explicitly_must_exist(tmp_path: Path) -> None:
    config = simulated(tmp_path, simulate_gpus=0, enabled_groups=(ApiGroup.GPU_READ,), groups_explicit=True)
    service, reactor, executors = build(config)
    with pytest.raises(StartupError, match=r"--enable names a GPU API group, but there is no GPU: .*--simulate-gpus 0"):
        service.privilegedStartService()
    assert reactor.unixServers == []


def test_default_groups_start_on_what_exists(tmp_path: Path) -> None:
    service, reactor, executors = build(simulated(tmp_path, simulate_gpus=0, simulate_cpus=0))
    service.privilegedStartService()
    assert len(reactor.unixServers) == 1 and executors.made == {}


def test_ready_and_stopping_reach_systemd(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        service, reactor, _ = build(simulated(tmp_path), Notifier(str(tmp_path / "notify")))
        service.privilegedStartService()
        service.startService()
        systemd.setblocking(False)
        with pytest.raises(BlockingIOError):
            systemd.recv(1024)  # not ready before the reactor runs
        gc.disable()  # as `zeusd` starts: collection resumes once it serves
        try:
            reactor.run()
            assert gc.isenabled()
        finally:
            gc.enable()
        assert systemd.recv(1024).decode().splitlines() == ["READY=1", "STATUS=Serving 2 GPU(s), 1 CPU package(s)"]
        service.stopService()
        assert systemd.recv(1024) == b"STOPPING=1"
