"""The NVML backend through a real daemon: ``zeusd serve`` loads the stand-in
``libnvidia-ml.so.1`` (LD_LIBRARY_PATH) through the real pynvml, and the test
drives it over HTTP while injecting faults into the library's shared state.

tests/test_nvml_backend.py covers the backend in-process (message texts,
fallbacks, startup probes); this file covers what only a running daemon shows:
HTTP statuses and bodies, queue order, timeouts, partial failures, polling.
"""

from __future__ import annotations

import ctypes.util
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
from tests.fakenvml import ENV_LOG, ENV_STATE, FakeNvml, build_library

INVALID = "NVML error: a supplied argument was invalid"
NOT_SUPPORTED = "NVML error: the requested operation is not available on the target device"
NO_PERMISSION = "NVML error: the current user does not have permission to perform this operation"
GPU_LOST = "NVML error: device fell off the bus or has otherwise become inacessible"
UNKNOWN = "NVML error: an internal driver error occurred"
TIMEOUT = "NVML error: the provided timeout was reached"

POWER_READS = ("nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")
SET_LIMIT = "nvmlDeviceSetPowerManagementLimit"
SET_GPU_CLOCKS = "nvmlDeviceSetGpuLockedClocks"

#: Control endpoint (with its parameters) → the NVML function(s) it calls.
CONTROL: dict[str, tuple[str, tuple[str, ...]]] = {
    "set_persistence_mode": ("enabled=true", ("nvmlDeviceSetPersistenceMode",)),
    "set_power_limit": ("power_limit_mw=300000", (SET_LIMIT,)),
    "set_gpu_locked_clocks": ("min_clock_mhz=1000&max_clock_mhz=1500", ("nvmlDeviceSetGpuLockedClocks",)),
    "reset_gpu_locked_clocks": ("", ("nvmlDeviceResetGpuLockedClocks",)),
    "set_mem_locked_clocks": ("min_clock_mhz=2619&max_clock_mhz=2619", ("nvmlDeviceSetMemoryLockedClocks",)),
    "reset_mem_locked_clocks": ("", ("nvmlDeviceResetMemoryLockedClocks",)),
    "reset_locked_clocks": ("", ("nvmlDeviceResetGpuLockedClocks", "nvmlDeviceResetMemoryLockedClocks")),
}


def control_path(endpoint: str, gpu_ids: str, block: bool) -> str:
    params = CONTROL[endpoint][0]
    return f"/gpu/{endpoint}?gpu_ids={gpu_ids}{'&' + params if params else ''}&block={str(block).lower()}"


def in_thread(fn: Callable[[], Response]) -> tuple[threading.Thread, list[Response]]:
    out: list[Response] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, FakeNvml]]:
    """One daemon on the stand-in for tests that only inject and clear faults."""
    directory = tmp_path_factory.mktemp("nvml-daemon")
    nvml = FakeNvml(directory / "nvml.state", directory / "nvml.log", build_library())
    nvml.create(4)
    daemon = Daemon(
        Transport("unix", str(directory / "zeusd.sock")),
        ["--enable", "gpu-control,gpu-read", "--gpu-power-poll-hz", "20"],
        nvml.env(),
        directory / "zeusd.log",
    ).start()
    yield daemon, nvml
    terminate(daemon)


@pytest.fixture
def nvml(shared: tuple[Daemon, FakeNvml]) -> Iterator[tuple[Daemon, FakeNvml]]:
    """The shared daemon with a fresh stand-in state (4 default GPUs, no faults) and an empty log."""
    daemon, nvml = shared
    nvml.create(4)
    nvml.clear_log()
    yield daemon, nvml
    nvml.create(4)  # releases anything a failed test left hanging


# --------------------------------------------------------------------------- error → HTTP status


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [
        (2, 400, INVALID),
        (3, 400, NOT_SUPPORTED),
        (4, 403, NO_PERMISSION),
        (10, 500, TIMEOUT),
        (15, 500, GPU_LOST),
        (999, 500, UNKNOWN),
        (42, 500, "NVML error: unexpected enum variant value: 42"),
    ],
)
def test_control_error_status_and_message(nvml: tuple[Daemon, FakeNvml], code: int, status: int, message: str) -> None:
    daemon, fake = nvml
    fake.inject_error(SET_LIMIT, code, gpu=1)
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0,1,2&power_limit_mw=300000&block=true")
    assert r.status == status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"errors": {"1": message}}  # only the failed GPU is named
    # No rollback and no contagion: the other GPUs took the command.
    assert [g.power_limit_mw for g in fake.gpus()] == [300_000, 700_000, 300_000, 700_000]
    fake.clear_error()
    assert daemon.client.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=300000&block=true").status == 200
    assert fake.gpu(1).power_limit_mw == 300_000


@pytest.mark.parametrize("endpoint", sorted(CONTROL))
def test_every_control_endpoint_maps_no_permission_to_403(nvml: tuple[Daemon, FakeNvml], endpoint: str) -> None:
    daemon, fake = nvml
    functions = CONTROL[endpoint][1]
    fake.inject_error(functions[-1], 4, gpu=0)
    r = daemon.client.post(control_path(endpoint, "0,3", block=True))
    assert (r.status, r.json()) == (403, {"errors": {"0": NO_PERMISSION}})
    for function in functions:  # every call was made, on both GPUs
        assert fake.count(function, gpu=0) == 1 and fake.count(function, gpu=3) == 1
    fake.clear_error()
    r = daemon.client.post(control_path(endpoint, "0", block=True))
    assert (r.status, r.body) == (200, b"")


def test_impossible_arguments_are_refused_before_the_driver(nvml: tuple[Daemon, FakeNvml]) -> None:
    """The range the driver reported at startup is checked first, and named; nothing reaches the driver."""
    daemon, fake = nvml
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=2&power_limit_mw=100000&block=true")
    assert (r.status, r.json()) == (400, {"error": "power_limit_mw must be within 200000..700000 for GPU 2, got 100000"})
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=2&min_clock_mhz=1500&max_clock_mhz=1000&block=false")
    assert (r.status, r.json()) == (400, {"error": "min_clock_mhz (1500) must not be greater than max_clock_mhz (1000)"})
    assert fake.calls([SET_LIMIT, SET_GPU_CLOCKS]) == []
    assert fake.gpu(2).power_limit_mw == 700_000 and fake.gpu(2).gpu_locked_clocks is None


def test_what_only_the_driver_can_tell_is_its_400(nvml: tuple[Daemon, FakeNvml]) -> None:
    daemon, fake = nvml
    fake.inject_error(SET_GPU_CLOCKS, 2, gpu=2)  # e.g. a clock the board does not support
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=2&min_clock_mhz=900&max_clock_mhz=1500&block=true")
    assert (r.status, r.json()) == (400, {"errors": {"2": INVALID}})
    assert fake.calls(SET_GPU_CLOCKS) == [(SET_GPU_CLOCKS, 2, ("900", "1500"))]  # passed to the driver unchanged


@pytest.mark.parametrize(
    ("errors", "status"),
    [
        ({1: 2, 2: 3}, 400),
        ({1: 2, 2: 4}, 403),
        ({1: 2, 2: 4, 3: 999}, 500),
        ({3: 15, 0: 4}, 500),
    ],
)
def test_multi_gpu_failures_answer_the_worst_status(
    nvml: tuple[Daemon, FakeNvml], errors: dict[int, int], status: int
) -> None:
    daemon, fake = nvml
    for gpu, code in errors.items():
        fake.inject_error(SET_LIMIT, code, gpu=gpu)
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0,1,2,3&power_limit_mw=250000&block=true")
    texts = {2: INVALID, 3: NOT_SUPPORTED, 4: NO_PERMISSION, 15: GPU_LOST, 999: UNKNOWN}
    assert r.status == status
    assert r.json() == {"errors": {str(g): texts[c] for g, c in sorted(errors.items())}}
    ok = [g for g in range(4) if g not in errors]
    assert [fake.gpu(g).power_limit_mw for g in ok] == [250_000] * len(ok)


def test_non_blocking_answers_before_the_command_runs_and_logs_its_failure(nvml: tuple[Daemon, FakeNvml]) -> None:
    daemon, fake = nvml
    mark = len(daemon.log())  # the log of the shared daemon, from here on

    def log() -> str:
        return daemon.log()[mark:]

    fake.inject_error(SET_LIMIT, 4, gpu=2)
    fake.set_delay(SET_LIMIT, -1, gpu=2)  # the command hangs inside the driver
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=2&power_limit_mw=241000&block=false")
    assert (r.status, r.body) == (200, b"")
    fake.wait_for_calls(SET_LIMIT, gpu=2)
    line = f"GPU 2: Power limit set to 241 W failed: {NO_PERMISSION}"
    assert line not in log()  # answered while the command was still running
    fake.clear_delay()
    wait_until(lambda: line in log(), what="the failure to be logged")
    assert "#warn] " + line in log()

    # Every parameter of the failed command is in the log line.
    fake.inject_error(SET_GPU_CLOCKS, 2)
    r = daemon.client.post("/gpu/set_gpu_locked_clocks?gpu_ids=0,1&min_clock_mhz=1000&max_clock_mhz=1500&block=false")
    assert (r.status, r.body) == (200, b"")
    for gpu in (0, 1):
        wait_until(lambda: f"GPU {gpu}: GPU frequency set to [1000, 1500] MHz failed: {INVALID}" in log())
    assert fake.gpu(0).gpu_locked_clocks is None


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


Command = tuple[str, tuple[str, tuple[str, ...]], tuple[str, object]]


def _command(i: int) -> Command:
    """Request ``i`` of a mixed sequence: (path and query, expected NVML call, resulting state)."""
    kind = i % 4
    if kind == 0:
        mw = 200_000 + 1000 * i
        return f"set_power_limit?power_limit_mw={mw}", (SET_LIMIT, (str(mw),)), ("power_limit_mw", mw)
    if kind == 1:
        low, high = 900 + i, 1500 + i
        return (
            f"set_gpu_locked_clocks?min_clock_mhz={low}&max_clock_mhz={high}",
            ("nvmlDeviceSetGpuLockedClocks", (str(low), str(high))),
            ("gpu_locked_clocks", (low, high)),
        )
    if kind == 2:
        on = i % 3 == 0
        return (
            f"set_persistence_mode?enabled={str(on).lower()}",
            ("nvmlDeviceSetPersistenceMode", ("1" if on else "0",)),
            ("persistence_mode", on),
        )
    return "reset_gpu_locked_clocks?", ("nvmlDeviceResetGpuLockedClocks", ()), ("gpu_locked_clocks", None)


def test_pipelined_commands_apply_in_arrival_order(nvml: tuple[Daemon, FakeNvml]) -> None:
    daemon, fake = nvml
    fake.set_delay(SET_LIMIT, 20, gpu=0)  # slow enough for the queue to build up
    paths: list[str] = []
    expected: dict[int, list[tuple[str, tuple[str, ...]]]] = {0: [], 1: []}
    final: dict[int, dict[str, object]] = {0: {}, 1: {}}
    for i in range(48):
        gpu_ids = "0,1" if i % 5 == 0 else "0"
        path, call, (key, value) = _command(i)
        joiner = "" if path.endswith("?") else "&"
        paths.append(f"/gpu/{path}{joiner}gpu_ids={gpu_ids}&block=false")
        for gpu in map(int, gpu_ids.split(",")):
            expected[gpu].append(call)
            final[gpu][key] = value
    paths.append("/gpu/set_power_limit?gpu_ids=0,1&power_limit_mw=654000&block=true")
    for gpu in (0, 1):
        expected[gpu].append((SET_LIMIT, ("654000",)))
        final[gpu]["power_limit_mw"] = 654_000

    # All requests in one write on one connection: arrival order is list order.
    sock = daemon.transport.raw_socket(timeout=30)
    with sock, sock.makefile("rb") as f:
        sock.sendall(b"".join(f"POST {p} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode() for p in paths))
        answers = [_read_response(f) for _ in paths]
        # The last (blocking) answer came after every earlier command had run.
        done = {gpu: len(fake.calls(gpu=gpu)) for gpu in (0, 1)}
    assert answers == [(200, b"")] * len(paths)
    assert done == {0: len(expected[0]), 1: len(expected[1])}
    for gpu in (0, 1):
        assert [(c.name, c.args) for c in fake.calls(gpu=gpu)] == expected[gpu]
        state = fake.gpu(gpu)
        assert {k: getattr(state, k) for k in final[gpu]} == final[gpu]
    assert fake.calls(gpu=2) == fake.calls(gpu=3) == []


# --------------------------------------------------------------------------- lost GPU, partial reads


def test_lost_gpu_power_reads_report_it_beside_the_healthy_ones(nvml: tuple[Daemon, FakeNvml]) -> None:
    daemon, fake = nvml
    mark = len(daemon.log())
    fake.set_gpu(0, power_mw=100_000)
    fake.set_gpu(2, power_mw=120_000)
    fake.set_lost(1)
    r = daemon.client.get("/gpu/get_power")
    assert r.status == 200
    body = r.json()
    assert body["power_mw"] == {"0": 100_000, "2": 120_000, "3": 150_000}
    assert body["errors"] == {"1": GPU_LOST}
    r = daemon.client.get("/gpu/get_power?gpu_ids=1")
    assert (r.status, r.json()) == (500, {"errors": {"1": GPU_LOST}})
    r = daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=0,1")
    assert (r.status, r.json()) == (500, {"errors": {"1": GPU_LOST}})
    r = daemon.client.post("/gpu/set_persistence_mode?gpu_ids=1&enabled=true&block=true")
    assert (r.status, r.json()) == (500, {"errors": {"1": GPU_LOST}})

    with daemon.client.stream("/gpu/stream_power?gpu_ids=0,1&format=v0.5") as stream:
        lost_events = stream.events(6)
        assert {e["gpu_id"] for e in lost_events} == {0}
        fake.set_lost(1, False)
        wait_until(lambda: "GPU 1 power reads recovered" in daemon.log()[mark:], what="recovery")
        assert 1 in {e["gpu_id"] for e in stream.events(6)}
    assert "GPU 1 power read failed: " + GPU_LOST in daemon.log()[mark:]
    body = daemon.client.get("/gpu/get_power").json()
    assert body["power_mw"] == {"0": 100_000, "1": 150_000, "2": 120_000, "3": 150_000}
    assert "errors" not in body


def test_power_read_errors_are_per_gpu_over_tcp(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    fake.set_field_return(2, 186, 999)  # the per-field return code, not the call's
    daemon = start_daemon("--enable", "gpu-read", transport="tcp", env=fake.env())
    body = daemon.client.get("/gpu/get_power?gpu_ids=1,2").json()
    assert body == {"timestamp_ms": body["timestamp_ms"], "power_mw": {"1": 150_000}, "errors": {"2": UNKNOWN}}
    fake.set_field_return(2, 186, 0)
    assert daemon.client.get("/gpu/get_power?gpu_ids=2").json()["power_mw"] == {"2": 150_000}


# --------------------------------------------------------------------------- energy counter unsupported


def test_gpu_without_energy_counter(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    fake.set_gpu(2, energy_supported=False)
    fake.set_gpu(0, energy_mj=123_456_789)
    daemon = start_daemon("--enable", "gpu-read", env=fake.env())
    discover = daemon.client.get("/discover").json()
    assert discover["gpu_ids"] == [0, 1, 2, 3]
    assert [(g["id"], g["cumulative_energy_available"]) for g in discover["gpus"]] == [
        (0, True), (1, True), (2, False), (3, True)
    ]
    r = daemon.client.get("/gpu/get_cumulative_energy")
    assert (r.status, r.json()) == (400, {"errors": {"2": NOT_SUPPORTED}})
    r = daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=2")
    assert (r.status, r.json()) == (400, {"errors": {"2": NOT_SUPPORTED}})
    assert daemon.client.get("/gpu/get_cumulative_energy?gpu_ids=3,0").json() == {
        "0": {"energy_mj": 123_456_789},
        "3": {"energy_mj": 500_000},
    }
    # Power still works for that GPU.
    assert daemon.client.get("/gpu/get_power?gpu_ids=2").json()["power_mw"] == {"2": 150_000}


# --------------------------------------------------------------------------- library loading


def _hide_nvml(tmp_path: Path) -> dict[str, str]:
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("a real libnvidia-ml is installed system-wide; it cannot be hidden from dlopen")
    empty = tmp_path / "empty-lib"
    empty.mkdir()
    return {"LD_LIBRARY_PATH": str(empty), ENV_STATE: "", ENV_LOG: ""}


def test_missing_library_means_zero_gpus_with_the_default_groups(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    daemon = start_daemon(env=_hide_nvml(tmp_path))
    d = daemon.client.get("/discover").json()
    assert (d["gpu_ids"], d["gpus"]) == ([], [])
    assert "NVML library (libnvidia-ml.so.1) could not be loaded" in daemon.log()
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true")
    assert (r.status, r.error) == (400, "GPU index 0 does not exist.")
    assert daemon.client.get("/gpu/get_cumulative_energy").json() == {}
    power = daemon.client.get("/gpu/get_power")  # answers at once instead of hanging (W3)
    assert power.status == 200 and power.json()["power_mw"] == {}
    r = daemon.client.get("/gpu/get_power?gpu_ids=0")
    assert r.status == 400


@pytest.mark.parametrize("enable", ["gpu-read", "gpu-control,gpu-read,metrics"])
def test_gpu_groups_asked_for_without_nvml_stop_startup(tmp_path: Path, enable: str) -> None:
    sock = tmp_path / "z.sock"
    r = run_zeusd(["serve", "--socket-path", str(sock), "--enable", enable], env=_hide_nvml(tmp_path))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "Error: --enable names a GPU API group, but there is no GPU: the NVML library (libnvidia-ml.so.1) "
        "could not be loaded; is the NVIDIA driver installed?"
    ]
    assert not sock.exists()


def test_gpu_groups_asked_for_on_a_node_without_gpus_stop_startup(tmp_path: Path, fake: FakeNvml) -> None:
    fake.create(0)
    r = run_zeusd(["serve", "--socket-path", str(tmp_path / "z.sock"), "--enable", "gpu-read"], env=fake.env())
    assert (r.returncode, r.stderr.splitlines()) == (
        1, ["Error: --enable names a GPU API group, but there is no GPU: NVML reports no GPU"]
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: f.set_init_error(9), "NVML error: NVIDIA driver is not loaded"),
        (lambda f: f.set_init_error(18), "NVML error: RM detects a driver/library version mismatch"),
        (lambda f: f.set_lost(1), "NVML error: device fell off the bus or has otherwise become inacessible"),
        (lambda f: f.inject_error("nvmlDeviceGetCount_v2", 999), UNKNOWN),
    ],
)
def test_nvml_failure_at_startup_exits_1(
    fake: FakeNvml, tmp_path: Path, setup: Callable[[FakeNvml], None], message: str
) -> None:
    setup(fake)
    sock = tmp_path / "zeusd.sock"
    result = run_zeusd(["serve", "--socket-path", str(sock), "--enable", "gpu-read"], env=fake.env())
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines()[-1] == f"Error: {message}"
    assert not sock.exists()
    assert fake.count("nvmlInitWithFlags") == 1  # the real pynvml really reached the stand-in


# --------------------------------------------------------------------------- hanging calls


@pytest.mark.parametrize("delay_ms", [-1, 4000], ids=["hung", "4 s per read"])
def test_a_slow_gpu_never_slows_the_stream_of_the_others(
    start_daemon: DaemonFactory, fake: FakeNvml, delay_ms: int
) -> None:
    """During the fault every healthy GPU keeps (at least 90 % of) the full 20 Hz, measured
    on the daemon's own timestamps; a slow GPU rejoins after each answer, a hung one stays out."""
    daemon = start_daemon("--enable", "gpu-read", "--stream-format", "v0.5", env=fake.env())
    fake.set_delay("nvmlDeviceGetFieldValues", delay_ms, gpu=1)
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
    fake.clear_delay()


def test_hanging_gpu_times_out_alone_and_recovers(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    daemon = start_daemon("--enable", "gpu-control,gpu-read", env=fake.env())
    c = daemon.client
    fake.set_delay("nvmlDeviceGetFieldValues", -1, gpu=0)
    fake.set_delay("nvmlDeviceGetTotalEnergyConsumption", -1, gpu=0)
    # The startup probe already read the energy counter: wait for the request's own read,
    # so that the command below is queued behind the hung read, not before it.
    energy_calls = fake.count("nvmlDeviceGetTotalEnergyConsumption", gpu=0)
    power_calls = fake.count("nvmlDeviceGetFieldValues", gpu=0)
    started = time.monotonic()
    power0, power0_out = in_thread(lambda: c.get("/gpu/get_power?gpu_ids=0"))
    power_all, power_all_out = in_thread(lambda: c.get("/gpu/get_power"))
    energy0, energy0_out = in_thread(lambda: c.get("/gpu/get_cumulative_energy?gpu_ids=0"))
    fake.wait_for_calls("nvmlDeviceGetTotalEnergyConsumption", gpu=0, at_least=energy_calls + 1)
    control0, control0_out = in_thread(
        lambda: c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=333000&block=true")
    )
    fake.wait_for_calls("nvmlDeviceGetFieldValues", gpu=0, at_least=power_calls + 1)

    # GPU 1 answers meanwhile: reads, queued reads and commands.
    assert c.get("/gpu/get_power?gpu_ids=1").json()["power_mw"] == {"1": 150_000}
    assert c.get("/gpu/get_cumulative_energy?gpu_ids=1").json() == {"1": {"energy_mj": 500_000}}
    assert c.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=333000&block=true").status == 200
    assert fake.gpu(1).power_limit_mw == 333_000
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
    assert body["power_mw"] == {"1": 150_000, "2": 150_000, "3": 150_000}
    assert body["errors"] == {"0": "GPU 0 did not answer power read within 5 s."}
    assert (energy0_out[0].status, energy0_out[0].json()) == (
        500, {"errors": {"0": "GPU 0 did not answer energy read within 5 s."}}
    )
    assert control0_out[0].status == 500
    assert control0_out[0].json()["errors"]["0"] == (
        "GPU 0 did not finish the command within 5 s; it stays queued and will still be applied."
    )
    assert fake.gpu(0).power_limit_mw == 700_000

    fake.clear_delay()
    assert c.get("/gpu/get_power?gpu_ids=0").json()["power_mw"] == {"0": 150_000}
    assert c.get("/gpu/get_cumulative_energy?gpu_ids=0").json() == {"0": {"energy_mj": 500_000}}
    wait_until(lambda: fake.gpu(0).power_limit_mw == 333_000, what="the queued command to be applied")
    assert c.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true").status == 200
    # The hung read was shared, never repeated: one call per waiting request at most.
    assert fake.count("nvmlDeviceGetFieldValues", gpu=0) <= 3


# --------------------------------------------------------------------------- demand-driven polling


def _power_reads(fake: FakeNvml) -> dict[int, int]:
    counts = {g: 0 for g in range(4)}
    for call in fake.calls(POWER_READS):
        counts[call.gpu] += 1
    return counts


def _reads_over(fake: FakeNvml, seconds: float) -> dict[int, int]:
    fake.clear_log()
    time.sleep(seconds)
    return _power_reads(fake)


def test_power_is_read_once_per_gpu_per_tick_whatever_the_subscriber_count(
    start_daemon: DaemonFactory, fake: FakeNvml
) -> None:
    hz, window = 10, 2.0
    daemon = start_daemon("--enable", "gpu-read", "--gpu-power-poll-hz", str(hz), env=fake.env())
    # Idle: nothing polls.
    assert _reads_over(fake, window) == {0: 0, 1: 0, 2: 0, 3: 0}

    filters = ["", "?gpu_ids=0", "?gpu_ids=0,1", "?format=v0.5", "?gpu_ids=3&format=v0.5", "?gpu_ids=1,2,3"]
    streams: list[EventStream] = [daemon.client.stream("/gpu/stream_power")]
    try:
        streams[0].events(2)
        one = _reads_over(fake, window)
        for i in range(49):
            streams.append(daemon.client.stream("/gpu/stream_power" + filters[i % len(filters)]))
        for s in streams:
            s.events(1)
        fifty = _reads_over(fake, window)
        # Every subscriber is really receiving.
        for s in streams:
            assert s.events(1)
    finally:
        for i, s in enumerate(streams):
            if i % 2:  # half vanish abruptly (RST, no FIN)
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    expected = hz * window
    for counts in (one, fifty):
        assert all(0.5 * expected <= n <= 1.3 * expected + 2 for n in counts.values()), (one, fifty)
        assert max(counts.values()) - min(counts.values()) <= 1, counts  # one read per GPU per tick
    assert abs(sum(fifty.values()) - sum(one.values())) <= 0.3 * 4 * expected, (one, fifty)

    wait_until(lambda: daemon.log().count("GPU power poller stopped") >= 1, what="the poller to stop")
    assert _reads_over(fake, window) == {0: 0, 1: 0, 2: 0, 3: 0}
