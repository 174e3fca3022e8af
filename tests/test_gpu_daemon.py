"""Both GPU backends through real daemons: ``zeusd serve --gpu-backend nvml|amdsmi`` loads the
stand-in ``libnvidia-ml.so.1`` through the real pynvml, or the stand-in ``libamd_smi.so``
through the real ``amdsmi`` bindings, and the test drives it over HTTP while injecting faults
into the library's shared state.

Where the two backends behave alike, a test is written once and runs on both (the
``stand_in`` and ``node`` fixtures, parametrised by backend; :mod:`tests.stand_ins` says
what differs: codes, texts, units, calls). What only one vendor has is tested for that
vendor alone at the end. tests/test_nvml_backend.py and tests/test_amdsmi_backend.py cover
the backends in-process (message texts, fallbacks, startup probes); this file covers what
only a running daemon shows: HTTP statuses and bodies, queue order, timeouts, partial
failures, polling. Choosing the backend is tests/test_gpu_backend_choice.py.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, EventStream, Response, Transport, run_zeusd, terminate, wait_until
from tests.fakeamdsmi import AMDSMI_DEV_PERF_LEVEL_AUTO, AMDSMI_DEV_PERF_LEVEL_MANUAL, NA_POWER, installed_abi
from tests.stand_ins import (
    AMD_PERSISTENCE_UNSUPPORTED,
    AMD_SINGLE_DOMAIN_RESET,
    FAILURE_KINDS,
    STAND_INS,
    AmdSmiStandIn,
    Call,
    GpuStandIn,
    amdsmi_bindings_installed,
)

NO_BINDINGS = "the amdsmi Python bindings are not installed (pip install -e '.[test]')"


def on(backend: str, *values: Any, id: str | None = None) -> Any:
    """A parameter set for ``backend`` (skipped for AMD SMI without its bindings)."""
    marks = [pytest.mark.skipif(not amdsmi_bindings_installed(), reason=NO_BINDINGS)] if backend == "amdsmi" else []
    return pytest.param(backend, *values, marks=marks, id=id or "-".join([backend, *map(str, values)]))


NVML_ONLY = pytest.mark.parametrize("backend", [on("nvml")], indirect=True)
AMD_ONLY = pytest.mark.parametrize("backend", [on("amdsmi")], indirect=True)


@pytest.fixture(scope="module", params=[on(name) for name in STAND_INS])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stand_in(backend: str, tmp_path: Path) -> GpuStandIn:
    """The backend's stand-in library with 4 default GPUs, for daemons started by the test."""
    s = STAND_INS[backend](tmp_path)
    s.create(4)
    return s


def start(start_daemon: DaemonFactory, s: GpuStandIn, *args: str, **kw: Any) -> Daemon:
    return start_daemon(*s.args, *args, env=s.env(), **kw)


@pytest.fixture(scope="module")
def shared(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, GpuStandIn]]:
    """One daemon per backend for tests that only inject and clear faults."""
    directory = tmp_path_factory.mktemp(f"{backend}-daemon")
    s = STAND_INS[backend](directory)
    s.create(4)
    daemon = Daemon(
        Transport("unix", str(directory / "zeusd.sock")),
        [*s.args, "--enable", "gpu-control,gpu-read", "--gpu-power-poll-hz", "20"],
        s.env(),
        directory / "zeusd.log",
    ).start()
    yield daemon, s
    terminate(daemon)


@pytest.fixture
def node(shared: tuple[Daemon, GpuStandIn]) -> Iterator[tuple[Daemon, GpuStandIn]]:
    """The shared daemon with a fresh stand-in state (4 default GPUs, no faults) and an empty log."""
    daemon, s = shared
    s.create(4)
    # The AMD backend remembers each clock range it set; a reset makes it ask the driver again.
    assert daemon.client.post("/gpu/reset_locked_clocks?gpu_ids=0,1,2,3&block=true").status == 200
    s.fake.clear_log()
    yield daemon, s
    s.create(4)  # releases anything a failed test left hanging


def in_thread(fn: Callable[[], Response]) -> tuple[threading.Thread, list[Response]]:
    out: list[Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def control_path(endpoint: str, params: str, gpu_ids: str, block: bool) -> str:
    return f"/gpu/{endpoint}?gpu_ids={gpu_ids}{'&' + params if params else ''}&block={str(block).lower()}"


# --------------------------------------------------------------------------- discovery and reads


def test_discovery_names_each_gpu_its_address_and_backend(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    pci = {"pci_domain": 1, "pci_bus": 0xAB, "pci_device": 0x1F}
    if stand_in.backend == "amdsmi":
        pci["pci_function"] = 1  # NVML has no function number: zeusd reports .0 (upstream's rule)
    stand_in.fake.set_gpu(1, name="Second Model", **pci)
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read")
    gpus = daemon.client.get("/discover").json()["gpus"]
    assert [(g["id"], g["name"], g["backend"], g["cumulative_energy_available"]) for g in gpus] == [
        (i, state.name, stand_in.backend, True) for i, state in enumerate(stand_in.fake.gpus())
    ]
    assert [g["pci_address"] for g in gpus] == [state.pci_address for state in stand_in.fake.gpus()]
    assert gpus[1]["pci_address"] == ("0001:ab:1f.1" if stand_in.backend == "amdsmi" else "0001:ab:1f.0")


def test_reads_answer_in_the_protocols_units(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read")
    c = daemon.client
    stand_in.set_power_mw(0, 123_000)
    stand_in.set_power_mw(1, 321_000)
    stand_in.set_energy_mj(0, 987_654_321)
    stand_in.set_energy_mj(3, 5)
    stand_in.set_limits_mw(2, 250_000, 150_000, 650_000)
    assert c.get("/gpu/get_power?gpu_ids=0,1").json()["power_mw"] == {"0": 123_000, "1": 321_000}
    assert c.get("/gpu/get_cumulative_energy?gpu_ids=0,3").json() == {
        "0": {"energy_mj": 987_654_321}, "3": {"energy_mj": 5}
    }
    assert c.get("/gpu/get_power_limit?gpu_ids=1,2").json() == {
        "1": {"power_limit_mw": stand_in.default_limit_mw}, "2": {"power_limit_mw": 250_000}
    }
    low, high = stand_in.limit_range_mw
    assert c.get("/gpu/get_power_limit_constraints?gpu_ids=0,2").json() == {
        "0": {"min_power_limit_mw": low, "max_power_limit_mw": high},
        "2": {"min_power_limit_mw": 150_000, "max_power_limit_mw": 650_000},
    }


# --------------------------------------------------------------------------- control and its effect


def test_every_control_command_takes_effect(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    c = daemon.client
    default = s.default_limit_mw
    assert c.post("/gpu/set_power_limit?gpu_ids=1,2&power_limit_mw=250000&block=true").status == 200
    assert [s.power_limit_mw(g) for g in range(4)] == [default, 250_000, 250_000, default]
    (glo, ghi), (mlo, mhi) = s.clock_example["gpu"], s.clock_example["mem"]
    assert c.post(f"/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz={glo}&max_clock_mhz={ghi}&block=true").status == 200
    assert c.post(f"/gpu/set_mem_locked_clocks?gpu_ids=1&min_clock_mhz={mlo}&max_clock_mhz={mhi}&block=true").status == 200
    assert (s.clocks(1, "gpu"), s.clocks(1, "mem")) == ((glo, ghi), (mlo, mhi))
    assert (s.clocks(2, "gpu"), s.clocks(2, "mem")) == (s.unlocked_clocks["gpu"], s.unlocked_clocks["mem"])
    assert c.post("/gpu/reset_locked_clocks?gpu_ids=1&block=true").status == 200
    assert (s.clocks(1, "gpu"), s.clocks(1, "mem")) == (s.unlocked_clocks["gpu"], s.unlocked_clocks["mem"])
    assert s.control_calls(1) == (
        s.limit_calls(250_000) + s.clock_calls("gpu", glo, ghi) + s.clock_calls("mem", mlo, mhi) + s.reset_calls()
    )
    assert s.control_calls(2) == s.limit_calls(250_000)

    # Non-blocking: answered at once; a later read of that GPU is queued behind it.
    r = c.post("/gpu/set_power_limit?gpu_ids=3&power_limit_mw=654000&block=false")
    assert (r.status, r.body) == (200, b"")
    assert c.get("/gpu/get_power_limit?gpu_ids=3").json() == {"3": {"power_limit_mw": 654_000}}
    assert s.power_limit_mw(3) == 654_000


@pytest.mark.parametrize("kind", FAILURE_KINDS)
def test_control_error_status_and_message(node: tuple[Daemon, GpuStandIn], kind: str) -> None:
    daemon, s = node
    failure = s.failures[kind]
    s.inject("set_power_limit", kind, gpu=1)
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0,1,2&power_limit_mw=300000&block=true")
    assert r.status == failure.status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"errors": {"1": failure.text}}  # only the failed GPU is named
    # No rollback and no contagion: the other GPUs took the command.
    default = s.default_limit_mw
    assert [s.power_limit_mw(g) for g in range(4)] == [300_000, default, 300_000, default]
    s.fake.clear_error()
    assert daemon.client.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=300000&block=true").status == 200
    assert s.power_limit_mw(1) == 300_000


def control_case(s: GpuStandIn, endpoint: str) -> tuple[str, str, list[Call], list[Call]]:
    """(query parameters, operation, calls on a GPU that takes it, calls on one whose every write fails)."""
    if endpoint == "set_power_limit":
        return "power_limit_mw=300000", "set_power_limit", s.limit_calls(300_000), s.limit_calls(300_000)
    if endpoint == "reset_locked_clocks":
        return "", "reset_locked_clocks", s.reset_calls(), s.reset_calls()
    domain = "gpu" if endpoint == "set_gpu_locked_clocks" else "mem"
    low, high = s.clock_example[domain]
    return (
        f"min_clock_mhz={low}&max_clock_mhz={high}",
        f"set_{domain}_clocks",
        s.clock_calls(domain, low, high),
        s.failed_clock_calls(domain, low, high),
    )


@pytest.mark.parametrize("endpoint", ["set_power_limit", "set_gpu_locked_clocks", "set_mem_locked_clocks", "reset_locked_clocks"])
def test_every_control_endpoint_maps_no_permission_to_403(node: tuple[Daemon, GpuStandIn], endpoint: str) -> None:
    daemon, s = node
    params, operation, ok_calls, failed_calls = control_case(s, endpoint)
    s.inject(operation, "no_permission", gpu=0)
    r = daemon.client.post(control_path(endpoint, params, "0,3", block=True))
    assert (r.status, r.json()) == (403, {"errors": {"0": s.failures["no_permission"].text}})
    # Every call was made, on both GPUs (a reset tries both domains even after the first fails).
    assert s.control_calls(0) == failed_calls
    assert s.control_calls(3) == ok_calls
    s.fake.clear_error()
    r = daemon.client.post(control_path(endpoint, params, "0", block=True))
    assert (r.status, r.body) == (200, b"")


def test_impossible_arguments_are_refused_before_the_driver(node: tuple[Daemon, GpuStandIn]) -> None:
    """The range the driver reported at startup is checked first, and named; nothing reaches the driver."""
    daemon, s = node
    low, high = s.limit_range_mw
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=2&power_limit_mw=100000&block=true")
    assert (r.status, r.json()) == (400, {"error": f"power_limit_mw must be within {low}..{high} for GPU 2, got 100000"})
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=2&min_clock_mhz=1500&max_clock_mhz=1000&block=false")
    assert (r.status, r.json()) == (400, {"error": "min_clock_mhz (1500) must not be greater than max_clock_mhz (1000)"})
    assert s.fake.calls(s.control_functions) == []
    assert s.power_limit_mw(2) == s.default_limit_mw and s.clocks(2, "gpu") == s.unlocked_clocks["gpu"]


def test_what_only_the_driver_can_tell_is_its_400(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    s.inject("set_gpu_clocks", "invalid", gpu=2)  # e.g. a clock the board does not support
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=2&min_clock_mhz=900&max_clock_mhz=1500&block=true")
    assert (r.status, r.json()) == (400, {"errors": {"2": s.failures["invalid"].text}})
    # Passed to the driver unchanged, on that GPU only.
    assert s.control_calls(2) == s.failed_clock_calls("gpu", 900, 1500)
    assert {c.gpu for c in s.fake.calls(s.control_functions)} == {2}
    assert s.clocks(2, "gpu") == s.unlocked_clocks["gpu"]


@pytest.mark.parametrize(
    ("failures", "status"),
    [
        ({1: "invalid", 2: "not_supported"}, 400),
        ({1: "invalid", 2: "no_permission"}, 403),
        ({1: "invalid", 2: "no_permission", 3: "unknown"}, 500),
        ({3: "lost", 0: "no_permission"}, 500),
    ],
    ids=lambda v: "+".join(v.values()) if isinstance(v, dict) else str(v),
)
def test_multi_gpu_failures_answer_the_worst_status(
    node: tuple[Daemon, GpuStandIn], failures: dict[int, str], status: int
) -> None:
    daemon, s = node
    for gpu, kind in failures.items():
        s.inject("set_power_limit", kind, gpu=gpu)
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0,1,2,3&power_limit_mw=250000&block=true")
    assert r.status == status
    assert r.json() == {"errors": {str(g): s.failures[k].text for g, k in sorted(failures.items())}}
    ok = [g for g in range(4) if g not in failures]
    assert [s.power_limit_mw(g) for g in ok] == [250_000] * len(ok)


def test_non_blocking_answers_before_the_command_runs_and_logs_its_failure(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    mark = len(daemon.log())  # the log of the shared daemon, from here on

    def log() -> str:
        return daemon.log()[mark:]

    s.inject("set_power_limit", "no_permission", gpu=2)
    s.delay("set_power_limit", -1, gpu=2)  # the command hangs inside the driver
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=2&power_limit_mw=241000&block=false")
    assert (r.status, r.body) == (200, b"")
    s.wait_for("set_power_limit", gpu=2, at_least=1)
    line = f"GPU 2: Power limit set to 241 W failed: {s.failures['no_permission'].text}"
    assert line not in log()  # answered while the command was still running
    s.fake.clear_delay()
    wait_until(lambda: line in log(), what="the failure to be logged")
    assert "#warn] " + line in log()

    # Every parameter of the failed command is in the log line.
    s.inject("set_gpu_clocks", "invalid")
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=0,1&min_clock_mhz=1000&max_clock_mhz=1500&block=false")
    assert (r.status, r.body) == (200, b"")
    for gpu in (0, 1):
        expected = f"GPU {gpu}: GPU frequency set to [1000, 1500] MHz failed: {s.failures['invalid'].text}"
        wait_until(lambda: expected in log())
    assert s.clocks(0, "gpu") == s.unlocked_clocks["gpu"]


# --------------------------------------------------------------------------- order


def _read_response(f: Any) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body from a socket file."""
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, f.read(length)


def _command(s: GpuStandIn, i: int) -> tuple[str, list[Call], dict[str, object]]:
    """Request ``i`` of a mixed sequence: (path and query, the calls it makes, the state it leaves).

    NVIDIA's mix has persistence mode and a GPU-clock reset; AMD, which has
    neither, sets memory clocks and resets both domains instead.
    """
    kind = i % 4
    if kind == 0:
        mw = 200_000 + 1000 * i
        return f"set_power_limit?power_limit_mw={mw}", s.limit_calls(mw), {"power_limit": mw}
    if kind == 1:
        low, high = 900 + i, 1500 + i
        path = f"set_gpu_locked_clocks?min_clock_mhz={low}&max_clock_mhz={high}"
        return path, s.clock_calls("gpu", low, high), {"gpu": (low, high)}
    if kind == 2 and s.backend == "nvml":
        on = i % 3 == 0
        path = f"set_persistence_mode?enabled={str(on).lower()}"
        return path, [("nvmlDeviceSetPersistenceMode", ("1" if on else "0",))], {"persistence": on}
    if kind == 2:
        low, high = 1000, 1200 + i
        path = f"set_mem_locked_clocks?min_clock_mhz={low}&max_clock_mhz={high}"
        return path, s.clock_calls("mem", low, high), {"mem": (low, high)}
    if s.backend == "nvml":
        return "reset_gpu_locked_clocks?", [("nvmlDeviceResetGpuLockedClocks", ())], {"gpu": None}
    return "reset_locked_clocks?", s.reset_calls(), {"gpu": s.unlocked_clocks["gpu"], "mem": s.unlocked_clocks["mem"]}


def _state(s: GpuStandIn, gpu: int, key: str) -> object:
    if key == "power_limit":
        return s.power_limit_mw(gpu)
    if key == "persistence":
        return s.fake.gpu(gpu).persistence_mode
    return s.clocks(gpu, key)


def test_pipelined_commands_apply_in_arrival_order(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    s.delay("set_power_limit", 20, gpu=0)  # slow enough for the queue to build up
    paths: list[str] = []
    expected: dict[int, list[Call]] = {0: [], 1: []}
    final: dict[int, dict[str, object]] = {0: {}, 1: {}}
    for i in range(48):
        gpu_ids = "0,1" if i % 5 == 0 else "0"
        path, calls, effect = _command(s, i)
        joiner = "" if path.endswith("?") else "&"
        paths.append(f"/gpu/{path}{joiner}gpu_ids={gpu_ids}&block=false")
        for gpu in map(int, gpu_ids.split(",")):
            expected[gpu] += calls
            final[gpu].update(effect)
    paths.append("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=654000&block=true")
    for gpu in (0, 1):
        expected[gpu] += s.limit_calls(654_000)
        final[gpu]["power_limit"] = 654_000

    # All requests in one write on one connection: arrival order is list order.
    sock = daemon.transport.raw_socket(timeout=30)
    with sock, sock.makefile("rb") as f:
        sock.sendall(b"".join(f"POST {p} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode() for p in paths))
        answers = [_read_response(f) for _ in paths]
        # The last (blocking) answer came after every earlier command had run.
        done = {gpu: len(s.control_calls(gpu)) for gpu in (0, 1)}
    assert answers == [(200, b"")] * len(paths)
    assert done == {0: len(expected[0]), 1: len(expected[1])}
    for gpu in (0, 1):
        assert s.control_calls(gpu) == expected[gpu]
        assert {key: _state(s, gpu, key) for key in final[gpu]} == final[gpu]
    assert s.fake.calls(gpu=2) == s.fake.calls(gpu=3) == []


# --------------------------------------------------------------------------- lost GPU, partial reads


def test_lost_gpu_power_reads_report_it_beside_the_healthy_ones(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    lost = s.failures["lost"].text
    mark = len(daemon.log())
    s.set_power_mw(0, 100_000)
    s.set_power_mw(2, 120_000)
    s.set_lost(1)
    r = daemon.client.get("/gpu/get_power")
    assert r.status == 200
    body = r.json()
    assert body["power_mw"] == {"0": 100_000, "2": 120_000, "3": s.default_power_mw}
    assert body["errors"] == {"1": lost}
    r = daemon.client.get("/gpu/get_power?gpu_ids=1")
    assert (r.status, r.json()) == (500, {"errors": {"1": lost}})
    r = daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=0,1")
    assert (r.status, r.json()) == (500, {"errors": {"1": lost}})
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=300000&block=true")
    assert (r.status, r.json()) == (500, {"errors": {"1": lost}})

    with daemon.client.stream("/gpu/stream_power?gpu_ids=0,1&format=v0.5") as stream:
        lost_events = stream.events(6)
        assert {e["gpu_id"] for e in lost_events} == {0}
        s.set_lost(1, False)
        wait_until(lambda: "GPU 1 power reads recovered" in daemon.log()[mark:], what="recovery")
        assert 1 in {e["gpu_id"] for e in stream.events(6)}
    assert "GPU 1 power read failed: " + lost in daemon.log()[mark:]
    body = daemon.client.get("/gpu/get_power").json()
    assert body["power_mw"] == {"0": 100_000, "1": s.default_power_mw, "2": 120_000, "3": s.default_power_mw}
    assert "errors" not in body


def test_power_read_errors_are_per_gpu_over_tcp(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read", transport="tcp")
    stand_in.fail_power_read(2, "unknown")
    body = daemon.client.get("/gpu/get_power?gpu_ids=1,2").json()
    assert body == {
        "timestamp_ms": body["timestamp_ms"],
        "power_mw": {"1": stand_in.default_power_mw},
        "errors": {"2": stand_in.failures["unknown"].text},
    }
    stand_in.fail_power_read(2, None)
    assert daemon.client.get("/gpu/get_power?gpu_ids=2").json()["power_mw"] == {"2": stand_in.default_power_mw}


# --------------------------------------------------------------------------- energy counter unsupported


def test_gpu_without_energy_counter(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    stand_in.without_energy_counter(2)
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read")
    discover = daemon.client.get("/discover").json()
    assert discover["gpu_ids"] == [0, 1, 2, 3]
    assert [(g["id"], g["cumulative_energy_available"]) for g in discover["gpus"]] == [
        (0, True), (1, True), (2, False), (3, True)
    ]
    stand_in.set_energy_mj(0, 123_456_789)
    stand_in.set_energy_mj(3, 500_000)
    refused = stand_in.no_energy_counter
    r = daemon.client.get("/gpu/get_cumulative_energy")
    assert (r.status, r.json()) == (refused.status, {"errors": {"2": refused.text}})
    r = daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=2")
    assert (r.status, r.json()) == (refused.status, {"errors": {"2": refused.text}})
    assert daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=3,0").json() == {
        "0": {"energy_mj": 123_456_789},
        "3": {"energy_mj": 500_000},
    }
    # Power still works for that GPU.
    assert daemon.client.get("/gpu/get_power?gpu_ids=2").json()["power_mw"] == {"2": stand_in.default_power_mw}


# --------------------------------------------------------------------------- startup failures

STARTUP_FAILURES = [
    *(on("nvml", case) for case in ("driver not loaded", "version mismatch", "lost GPU", "count fails")),
    *(on("amdsmi", case) for case in ("no permission", "driver not loaded", "lost GPU", "handles fail")),
]


@pytest.mark.parametrize(("backend", "case"), STARTUP_FAILURES, indirect=["backend"])
def test_library_failure_at_startup_exits_1(stand_in: GpuStandIn, tmp_path: Path, case: str) -> None:
    setup, message = stand_in.startup_failures()[case]
    setup()
    sock = tmp_path / "zeusd.sock"
    result = run_zeusd(["serve", "--socket-path", str(sock), *stand_in.args, "--enable", "gpu-read"], env=stand_in.env())
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {message}"]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not sock.exists()
    assert stand_in.fake.count(stand_in.init_function) == 1  # the real bindings really reached the stand-in


def test_gpu_groups_asked_for_on_a_node_without_gpus_stop_startup(stand_in: GpuStandIn, tmp_path: Path) -> None:
    stand_in.create(0)
    args = ["serve", "--socket-path", str(tmp_path / "z.sock"), *stand_in.args, "--enable", "gpu-read"]
    r = run_zeusd(args, env=stand_in.env())
    assert (r.returncode, r.stderr.splitlines()) == (
        1, [f"Error: --enable names a GPU API group, but there is no GPU: {stand_in.no_gpu}"]
    )


# --------------------------------------------------------------------------- hanging calls


@pytest.mark.parametrize("delay_ms", [-1, 4000], ids=["hung", "4 s per read"])
def test_a_slow_gpu_never_slows_the_stream_of_the_others(
    start_daemon: DaemonFactory, stand_in: GpuStandIn, delay_ms: int
) -> None:
    """During the fault every healthy GPU keeps (at least 90 % of) the full 20 Hz, measured
    on the daemon's own timestamps; a slow GPU rejoins after each answer, a hung one stays out."""
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read", "--stream-format", "v0.5")
    stand_in.delay("power", delay_ms, gpu=1)
    stamps: dict[int, list[int]] = {i: [] for i in range(4)}
    with daemon.client.stream("/gpu/stream_power", timeout=15) as stream:
        for frame in stream.frames():
            if frame.startswith("data: "):
                event = json.loads(frame[len("data: "):])
                stamps[event["gpu_id"]].append(event["timestamp_ms"])
                if stamps[0][-1] - stamps[0][0] >= 9000:
                    break
    span_s = (stamps[0][-1] - stamps[0][0]) / 1000
    for healthy in (0, 2, 3):
        assert len(stamps[healthy]) >= 0.9 * 20 * span_s, (healthy, len(stamps[healthy]), span_s)
    if delay_ms < 0:
        assert stamps[1] == []
    else:
        assert 1 <= len(stamps[1]) <= 3  # one reading per 4 s answer
    stand_in.fake.clear_delay()


def test_hanging_gpu_times_out_alone_and_recovers(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    s = stand_in
    daemon = start(start_daemon, s, "--enable", "gpu-control,gpu-read")
    c = daemon.client
    for gpu in (0, 1):
        s.set_energy_mj(gpu, 500_000)
    s.delay("power", -1, gpu=0)
    s.delay("energy", -1, gpu=0)
    # The startup probes already read the energy counter: wait for the request's own read,
    # so that the command below is queued behind the hung read, not before it.
    energy_calls = s.count("energy", gpu=0)
    power_calls = s.count("power", gpu=0)
    started = time.monotonic()
    power0, power0_out = in_thread(lambda: c.get("/gpu/get_power?gpu_ids=0"))
    power_all, power_all_out = in_thread(lambda: c.get("/gpu/get_power"))
    energy0, energy0_out = in_thread(lambda: c.get("/gpu/get_cumulative_energy?gpu_ids=0"))
    s.wait_for("energy", gpu=0, at_least=energy_calls + 1)
    control0, control0_out = in_thread(
        lambda: c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=333000&block=true")
    )
    s.wait_for("power", gpu=0, at_least=power_calls + 1)

    # GPU 1 answers meanwhile: reads, queued reads and commands.
    power = s.default_power_mw
    assert c.get("/gpu/get_power?gpu_ids=1").json()["power_mw"] == {"1": power}
    assert c.get("/gpu/get_cumulative_energy?gpu_ids=1").json() == {"1": {"energy_mj": 500_000}}
    assert c.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=333000&block=true").status == 200
    assert s.power_limit_mw(1) == 333_000
    with c.stream("/gpu/stream_power?gpu_ids=1,2&format=v0.5") as stream:
        assert {e["gpu_id"] for e in stream.events(6)} == {1, 2}
    with c.stream("/gpu/stream_power?gpu_ids=0,1") as stream:  # the hung GPU is left out, not waited for
        assert all(set(e["power_mw"]) == {"1"} for e in stream.events(6))
    assert all(t.is_alive() for t in (power0, power_all, energy0, control0))  # GPU 0 still hung

    for t in (power0, power_all, energy0, control0):
        t.join(30)
    waited = time.monotonic() - started
    assert 4.5 <= waited < 30  # the daemon's 5 s bound, not the client's
    assert (power0_out[0].status, power0_out[0].json()) == (
        500, {"errors": {"0": "GPU 0 did not answer power read within 5 s."}}
    )
    body = power_all_out[0].json()
    assert power_all_out[0].status == 200
    assert body["power_mw"] == {"1": power, "2": power, "3": power}
    assert body["errors"] == {"0": "GPU 0 did not answer power read within 5 s."}
    assert (energy0_out[0].status, energy0_out[0].json()) == (
        500, {"errors": {"0": "GPU 0 did not answer energy read within 5 s."}}
    )
    assert control0_out[0].status == 500
    assert control0_out[0].json()["errors"]["0"] == (
        "GPU 0 did not finish the command within 5 s; it stays queued and will still be applied."
    )
    assert s.power_limit_mw(0) == s.default_limit_mw

    s.fake.clear_delay()
    assert c.get("/gpu/get_power?gpu_ids=0").json()["power_mw"] == {"0": power}
    assert c.get("/gpu/get_cumulative_energy?gpu_ids=0").json() == {"0": {"energy_mj": 500_000}}
    wait_until(lambda: s.power_limit_mw(0) == 333_000, what="the queued command to be applied")
    assert c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true").status == 200
    # The hung read was shared, never repeated: one call per waiting request at most.
    assert s.count("power", gpu=0) <= power_calls + 2


# --------------------------------------------------------------------------- demand-driven polling


def _power_reads(s: GpuStandIn) -> dict[int, int]:
    counts = {g: 0 for g in range(4)}
    for call in s.fake.calls(s.functions["power"]):
        counts[call.gpu] += 1
    return counts


def _reads_over(s: GpuStandIn, seconds: float) -> dict[int, int]:
    s.fake.clear_log()
    time.sleep(seconds)
    return _power_reads(s)


def test_power_is_read_once_per_gpu_per_tick_whatever_the_subscriber_count(
    start_daemon: DaemonFactory, stand_in: GpuStandIn
) -> None:
    hz, window = 10, 2.0
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read", "--gpu-power-poll-hz", str(hz))
    # Idle: nothing polls.
    assert _reads_over(stand_in, window) == {0: 0, 1: 0, 2: 0, 3: 0}

    filters = ["", "?gpu_ids=0", "?gpu_ids=0,1", "?format=v0.5", "?gpu_ids=3&format=v0.5", "?gpu_ids=1,2,3"]
    streams: list[EventStream] = [daemon.client.stream("/gpu/stream_power")]
    try:
        streams[0].events(2)
        one = _reads_over(stand_in, window)
        for i in range(49):
            streams.append(daemon.client.stream("/gpu/stream_power" + filters[i % len(filters)]))
        for st in streams:
            st.events(1)
        fifty = _reads_over(stand_in, window)
        # Every subscriber is really receiving.
        for st in streams:
            assert st.events(1)
    finally:
        for i, st in enumerate(streams):
            if i % 2:  # half vanish abruptly (RST, no FIN)
                st.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            st.close()
    expected = hz * window
    for counts in (one, fifty):
        assert all(0.5 * expected <= n <= 1.3 * expected + 2 for n in counts.values()), (one, fifty)
        assert max(counts.values()) - min(counts.values()) <= 1, counts  # one read per GPU per tick
    assert abs(sum(fifty.values()) - sum(one.values())) <= 0.3 * 4 * expected, (one, fifty)

    wait_until(lambda: daemon.log().count("GPU power poller stopped") >= 1, what="the poller to stop")
    assert _reads_over(stand_in, window) == {0: 0, 1: 0, 2: 0, 3: 0}


# --------------------------------------------------------------------------- NVIDIA only


@NVML_ONLY
@pytest.mark.parametrize(
    ("endpoint", "params", "function"),
    [
        ("set_persistence_mode", "enabled=true", "nvmlDeviceSetPersistenceMode"),
        ("reset_gpu_locked_clocks", "", "nvmlDeviceResetGpuLockedClocks"),
        ("reset_mem_locked_clocks", "", "nvmlDeviceResetMemoryLockedClocks"),
    ],
    ids=["set_persistence_mode", "reset_gpu_locked_clocks", "reset_mem_locked_clocks"],
)
def test_nvml_persistence_and_single_domain_resets_map_no_permission_to_403(
    node: tuple[Daemon, GpuStandIn], endpoint: str, params: str, function: str
) -> None:
    daemon, s = node
    no_permission = s.failures["no_permission"]
    s.fake.inject_error(function, no_permission.code, gpu=0)
    r = daemon.client.post(control_path(endpoint, params, "0,3", block=True))
    assert (r.status, r.json()) == (403, {"errors": {"0": no_permission.text}})
    assert s.fake.count(function, gpu=0) == 1 and s.fake.count(function, gpu=3) == 1
    s.fake.clear_error()
    r = daemon.client.post(control_path(endpoint, params, "0", block=True))
    assert (r.status, r.body) == (200, b"")


@NVML_ONLY
def test_nvml_persistence_mode_of_a_lost_gpu_is_a_500(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    s.set_lost(1)
    r = daemon.client.post("/gpu/set_persistence_mode?gpu_ids=1&enabled=true&block=true")
    assert (r.status, r.json()) == (500, {"errors": {"1": s.failures["lost"].text}})
    r = daemon.client.get("/gpu/get_persistence_mode?gpu_ids=0,1")
    assert (r.status, r.json()) == (500, {"errors": {"1": s.failures["lost"].text}})


@NVML_ONLY
def test_nvml_reads_power_usage_where_field_186_is_not_supported(
    start_daemon: DaemonFactory, stand_in: GpuStandIn
) -> None:
    stand_in.fake.set_gpu(1, instant_power_supported=False, avg_power_mw=141_000)
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read")
    stand_in.fake.clear_log()
    assert daemon.client.get("/gpu/get_power?gpu_ids=0,1").json()["power_mw"] == {"0": 150_000, "1": 141_000}
    assert [c.name for c in stand_in.fake.calls(gpu=1)] == ["nvmlDeviceGetPowerUsage"]
    assert [c.name for c in stand_in.fake.calls(gpu=0)] == ["nvmlDeviceGetFieldValues"]


# --------------------------------------------------------------------------- AMD only

PERSISTENCE_UNSUPPORTED, SINGLE_DOMAIN_RESET = AMD_PERSISTENCE_UNSUPPORTED, AMD_SINGLE_DOMAIN_RESET


@AMD_ONLY
@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("POST", "/gpu/set_persistence_mode?gpu_ids=0,3&enabled=true&block=true", PERSISTENCE_UNSUPPORTED),
        ("GET", "/gpu/get_persistence_mode?gpu_ids=0,3", PERSISTENCE_UNSUPPORTED),
        ("POST", "/gpu/reset_gpu_locked_clocks?gpu_ids=0,3&block=true", SINGLE_DOMAIN_RESET),
        ("POST", "/gpu/reset_mem_locked_clocks?gpu_ids=0,3&block=true", SINGLE_DOMAIN_RESET),
    ],
    ids=["set_persistence_mode", "get_persistence_mode", "reset_gpu_locked_clocks", "reset_mem_locked_clocks"],
)
def test_amd_operations_it_does_not_have_are_a_400_naming_them(
    node: tuple[Daemon, GpuStandIn], method: str, path: str, message: str
) -> None:
    daemon, s = node
    s.fake.set_gpu(0, gfx_min_mhz=1000, gfx_max_mhz=1500, perf_level=AMDSMI_DEV_PERF_LEVEL_MANUAL)
    r = daemon.client.request(method, path)
    assert (r.status, r.json()) == (400, {"errors": {"0": message, "3": message}})
    assert s.fake.calls() == []  # refused without asking the library
    assert s.clocks(0, "gpu") == (1000, 1500)


@AMD_ONLY
def test_amd_reset_locked_clocks_gives_both_domains_back_to_the_driver(node: tuple[Daemon, GpuStandIn]) -> None:
    daemon, s = node
    c = daemon.client
    assert c.post("/gpu/set_gpu_locked_clocks?gpu_ids=2&min_clock_mhz=1000&max_clock_mhz=1500&block=true").status == 200
    assert c.post("/gpu/set_mem_locked_clocks?gpu_ids=2&min_clock_mhz=1000&max_clock_mhz=1100&block=true").status == 200
    assert s.fake.gpu(2).perf_level == AMDSMI_DEV_PERF_LEVEL_MANUAL
    assert c.post("/gpu/reset_locked_clocks?gpu_ids=2&block=true").status == 200
    g = s.fake.gpu(2)
    assert (g.gfx_min_mhz, g.gfx_max_mhz, g.mem_min_mhz, g.mem_max_mhz) == (500, 2100, 900, 1300)
    assert g.perf_level == AMDSMI_DEV_PERF_LEVEL_AUTO
    assert s.control_calls(2)[-1] == ("amdsmi_set_gpu_perf_level", ("0",))


@AMD_ONLY
def test_amd_startup_probes_decide_what_each_gpu_serves(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    """Energy counters are checked against power for 0.5 s (ROCm/amdsmi#38); power is current
    socket power, else the average (MI250), else none; caps are uW floored to mW."""
    step = 11_468_641  # 0.5 s at 350 W in 15.259 uJ ticks
    stand_in.fake.create(
        4,
        gpus=[
            {"power_cap_uw": 312_345_678, "min_power_cap_uw": 123_456_789, "max_power_cap_uw": 765_432_100},
            {"energy_step": step * 20},  # counts 20x too fast: a wrong resolution
            {"current_power_w": NA_POWER, "average_power_w": 270},  # MI250: average only
            {"current_power_w": NA_POWER, "average_power_w": NA_POWER},  # no power: nothing to check against
        ],
    )
    daemon = start(start_daemon, stand_in, "--enable", "gpu-control,gpu-read")
    c = daemon.client
    gpus = c.get("/discover").json()["gpus"]
    assert [g["cumulative_energy_available"] for g in gpus] == [True, False, True, False]
    log = daemon.log()
    assert "GPU 1: energy counter failed validation (expected 175000.000 mJ, measured " in log
    assert "GPU 3: power is zero or unreadable, so the energy counter cannot be validated" in log
    assert "GPU 2: AMD Instinct MI300X at 0000:0e:00.0, power from average_socket_power" in log

    refused = stand_in.no_energy_counter
    r = c.get("/gpu/get_cumulative_energy?gpu_ids=0,1,3")
    assert (r.status, r.json()) == (400, {"errors": {"1": refused.text, "3": refused.text}})
    r = c.get("/gpu/get_power")
    assert (r.status, r.json()["power_mw"], r.json()["errors"]) == (
        200, {"0": 350_000, "1": 350_000, "2": 270_000}, {"3": stand_in.failures["not_supported"].text}
    )
    assert c.get("/gpu/get_power_limit?gpu_ids=0").json() == {"0": {"power_limit_mw": 312_345}}
    assert c.get("/gpu/get_power_limit_constraints?gpu_ids=0").json() == {
        "0": {"min_power_limit_mw": 123_456, "max_power_limit_mw": 765_432}
    }
    r = c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=765433&block=true")
    assert (r.status, r.error) == (400, "power_limit_mw must be within 123456..765432 for GPU 0, got 765433")
    assert c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=765432&block=true").status == 200
    assert stand_in.fake.gpu(0).power_cap_uw == 765_432_000


@AMD_ONLY
def test_amd_libraries_before_26_2_serialise_every_call(start_daemon: DaemonFactory, stand_in: GpuStandIn) -> None:
    """Older libraries are not thread-safe, so one hung call holds up every GPU (compare
    test_hanging_gpu_times_out_alone_and_recovers, where GPU 1 answers meanwhile)."""
    assert isinstance(stand_in, AmdSmiStandIn)
    if installed_abi() == 26:
        stand_in.fake.set_lib_version(26, 1, 2)  # ABI 24/25 stand-ins report a pre-26.2 library already
    daemon = start(start_daemon, stand_in, "--enable", "gpu-read")
    assert "its calls are serialised (libraries before 26.2 are not thread-safe)" in daemon.log()
    c = daemon.client
    stand_in.delay("power", -1, gpu=0)
    calls = stand_in.count("power", gpu=0)
    hung, hung_out = in_thread(lambda: c.get("/gpu/get_power?gpu_ids=0"))
    stand_in.wait_for("power", gpu=0, at_least=calls + 1)
    r = c.get("/gpu/get_power?gpu_ids=1")  # waits for the process-wide lock, never reaches the library
    assert (r.status, r.json()) == (500, {"errors": {"1": "GPU 1 did not answer power read within 5 s."}})
    hung.join(30)
    assert hung_out[0].status == 500
    stand_in.fake.clear_delay()
    assert c.get("/gpu/get_power?gpu_ids=0,1").json()["power_mw"] == {"0": 350_000, "1": 350_000}

