"""zeusd benchmarks: one command, every scenario, one JSON file and a table.

    .venv/bin/python bench/run.py            # full run (about 4 minutes)
    .venv/bin/python bench/run.py --quick    # every scenario, tiny counts (smoke test)
    .venv/bin/python bench/run.py --out DIR  # results in DIR instead of bench/results

The daemon runs as a subprocess on the stand-in NVML library
(``tests/fakenvml``: the real pynvml and the daemon's real NVML backend, only
the shared library is fake) and a RAPL tree in a temporary directory
(``tests/rapl_tree.py``); it is not started with ``--simulate``. Load comes
from ``bench/loadgen.c`` (one-thread epoll C), on loopback TCP and UNIX
sockets only, always bounded in time. Daemon CPU comes from
``/proc/<pid>/stat``, memory from ``/proc/<pid>/status``, device reads from the
stand-in's call log. See docs/performance.md for the methodology.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.daemon import Client, Transport, UnixHTTPConnection  # noqa: E402
from tests.fakenvml import FakeNvml, build_library, preload_library  # noqa: E402
from tests.rapl_tree import RaplTree  # noqa: E402

LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "build" / "loadgen"
NUM_GPUS = 4
NUM_CPUS = 2
POLL_HZ = 20
LIMITS_MW = (300_000, 400_000)  # two valid limits of the stand-in (200..700 W), alternated
STALL_TIMEOUT_S = 30  # the daemon's --sse-stall-timeout-s default, left as it is
POWER_READS = ("nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")
CLK_TCK = os.sysconf("SC_CLK_TCK")

ENDPOINTS: dict[str, tuple[str, str, str | None]] = {
    # name: (method, path, alternate path)
    "discover": ("GET", "/discover", None),
    "gpu_get_power": ("GET", "/gpu/get_power", None),
    "cpu_get_power": ("GET", "/cpu/get_power", None),
    "gpu_set_power_limit": (
        "POST",
        f"/gpu/set_power_limit?gpu_ids=0&power_limit_mw={LIMITS_MW[0]}&block=true",
        f"/gpu/set_power_limit?gpu_ids=0&power_limit_mw={LIMITS_MW[1]}&block=true",
    ),
    # bench/floor_klein.py: an empty 200 once a no-op ran on a thread (the floor under a command)
    "floor_command": ("POST", "/command", None),
}
FLOOR_ENDPOINTS = frozenset({"floor_command"})  # served by the floor only (bench/compare.py), not by zeusd


@dataclass(frozen=True)
class Plan:
    """Counts and durations of one run (full or quick)."""

    quick: bool
    latency_s: float
    latency_warmup_s: float
    throughput_s: float
    throughput_conns: tuple[int, ...]
    ceiling_s: float
    stream_s: float
    stream_subs: tuple[int, ...]
    idle_s: float
    stall_s: float
    stall_conns: int
    stall_sample_s: float
    startups: int
    device_calls: int
    slow_gpu_s: float
    auth_verifies: int
    scrapes: int

    @classmethod
    def make(cls, quick: bool) -> "Plan":
        if quick:
            return cls(True, 0.3, 0.0, 0.3, (1, 16, 64), 0.3, 0.6, (1, 100, 1000), 0.5, 1.0, 100, 0.25, 1, 50, 1.0, 50, 5)
        return cls(False, 5.0, 1.0, 5.0, (1, 16, 64), 3.0, 10.0, (1, 100, 1000), 10.0, 90.0, 100, 3.0, 5, 2000, 12.0, 3000, 40)


# --------------------------------------------------------------------------- small helpers


def build_loadgen() -> Path:
    """Compile loadgen when its source is newer than the binary."""
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    if not LOADGEN.exists() or LOADGEN.stat().st_mtime < LOADGEN_SRC.stat().st_mtime:
        cc = os.environ.get("CC", "gcc")
        subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True)
    return LOADGEN


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_hires_s(pid: int) -> float:
    """Run time of the process's live threads from schedstat (ns resolution)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dist(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean (nearest rank), like loadgen's."""
    if not values:
        return {"n": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    v = sorted(values)

    def pct(q: float) -> float:
        rank = max(1, min(len(v), int(q * len(v) + 0.999999)))
        return float(v[rank - 1])

    return {"n": len(v), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": float(v[-1]), "mean": statistics.fmean(v)}


def http_get(address: str | tuple[str, int], path: str, timeout: float = 2.0) -> int:
    """Status of one GET over a fresh connection (raises OSError when nothing listens)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            data = s.recv(4096)
            if not data:
                raise OSError("connection closed before a status line")
            head += data
        return int(head.split(b" ", 2)[1])


class CallLog:
    """The stand-in's call log, counted between two byte offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def count(self, start: int, end: int, names: Sequence[str] | None = None) -> int:
        if end <= start:
            return 0
        with open(self.path, "rb") as f:
            f.seek(start)
            text = f.read(end - start).decode(errors="replace")
        lines = [line for line in text.split("\n") if line]
        if names is None:
            return len(lines)
        return sum(1 for line in lines if line.split(" ", 1)[0] in names)


@dataclass
class Window:
    """Daemon CPU, RSS and device calls over a measurement window."""

    daemon: "Daemon"
    t0: float = 0.0
    cpu0: float = 0.0
    hires0: float = 0.0
    log0: int = 0
    dlog0: int = 0
    rss0: float = 0.0

    def start(self) -> "Window":
        pid = self.daemon.pid
        self.t0 = time.monotonic()
        self.cpu0, self.hires0 = proc_cpu_s(pid), proc_cpu_hires_s(pid)
        self.log0 = self.daemon.calls.offset()
        self.dlog0 = self.daemon.log_offset()
        self.rss0 = rss_mb(pid)
        return self

    def stop(self) -> dict[str, Any]:
        pid = self.daemon.pid
        elapsed = time.monotonic() - self.t0
        cpu = proc_cpu_s(pid) - self.cpu0
        hires = proc_cpu_hires_s(pid) - self.hires0
        log1 = self.daemon.calls.offset()
        return {
            "window_s": elapsed,
            "daemon_cpu_s": cpu,
            "daemon_cpu_per_s": cpu / elapsed if elapsed > 0 else 0.0,
            "daemon_cpu_hires_s": hires,
            "daemon_cpu_hires_per_s": hires / elapsed if elapsed > 0 else 0.0,
            "device_calls": self.daemon.calls.count(self.log0, log1),
            "device_power_reads": self.daemon.calls.count(self.log0, log1, POWER_READS),
            "rss_start_mb": self.rss0,
            "rss_end_mb": rss_mb(pid),
        }


# --------------------------------------------------------------------------- the daemon


@dataclass
class Daemon:
    """One zeusd subprocess on the stand-in NVML library and the RAPL tree.

    ``command`` and ``spawn`` are the seams bench/compare.py uses to run
    upstream zeusd and the floors the same way (pinned, in a mount namespace).
    """

    workdir: Path
    fake: FakeNvml
    rapl_root: Path
    transport: str  # "unix" | "tcp"
    extra_args: Sequence[str] = ()
    name: str = "zeusd"
    process: subprocess.Popen[bytes] | None = None
    address: str | tuple[str, int] = ""
    startup_s: float = 0.0
    log_path: Path = field(default_factory=Path)
    enable: str = "gpu-control,gpu-read,cpu-read"
    main: Sequence[str] = ("-m", "zeusd")  # what the interpreter runs (compare.py: the module probe)
    ready_path: str = "/discover"  # the first answer start-up waits for
    ready_poll_s: float = 0.005
    stop_timeout_s: float = 15.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def calls(self) -> CallLog:
        assert self.fake.log_path is not None
        return CallLog(self.fake.log_path)

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def listen_args(self) -> list[str]:
        """Pick the address (a socket in workdir, or a free loopback port) and return the listener flags."""
        if self.transport == "unix":
            path = self.workdir / f"{self.name}.sock"
            self.address = str(path)
            return ["--mode", "uds", "--socket-path", str(path)]
        port = free_tcp_port()
        self.address = ("127.0.0.1", port)
        return ["--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{port}"]

    def command(self, listen: list[str]) -> list[str]:
        """The program's argv (bench/compare.py: upstream zeusd, the bare Klein floor)."""
        return [
            sys.executable, *self.main, "serve", *listen,
            "--enable", self.enable,
            "--rapl-root", str(self.rapl_root),
            "--gpu-power-poll-hz", str(POLL_HZ),
            *self.extra_args,
        ]  # fmt: skip

    def spawn(self, args: list[str], env: dict[str, str], log: IO[bytes]) -> float:
        """Start the process; return the monotonic time start-up is counted from (here: the spawn)."""
        t0 = time.monotonic()
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return t0

    def start(self, timeout: float = 30.0) -> "Daemon":
        args = self.command(self.listen_args())
        env = {**os.environ, **self.fake.env(), "ZEUSD_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}
        self.log_path = self.workdir / f"{self.name}.log"
        with open(self.log_path, "ab") as log:
            t0 = self.spawn(args, env, log)
        assert self.process is not None
        deadline = t0 + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if http_get(self.address, self.ready_path) == 200:
                    self.startup_s = time.monotonic() - t0
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not answer {self.ready_path} in {timeout} s:\n{self.log_text()[-4000:]}")
            time.sleep(self.ready_poll_s)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def target_args(self) -> list[str]:
        if isinstance(self.address, str):
            return ["--unix", self.address]
        return ["--tcp", f"{self.address[0]}:{self.address[1]}"]

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------- loadgen


def loadgen(*args: str, timeout: float = 700.0) -> dict[str, Any]:
    """Run loadgen to completion and return its JSON."""
    result = subprocess.run([str(LOADGEN), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


class SyncedLoadgen:
    """loadgen --sync: the driver samples the daemon at READY and END, then releases it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(LOADGEN), *args, "--sync"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, word: str, timeout: float, tick: float | None = None, on_tick: Callable[[], None] | None = None) -> str:
        """Block until a stderr line starting with ``word``; call ``on_tick`` every ``tick`` s meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise TimeoutError(f"loadgen did not say {word} in {timeout} s: {''.join(self.stderr)}")
            try:
                line = self.lines.get(timeout=min(left, tick) if tick else left)
            except queue.Empty:
                if on_tick is not None:
                    on_tick()
                continue
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"loadgen exited ({self.proc.returncode}) before {word}: {''.join(self.stderr)}")
            if line.startswith(word):
                return line

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(30)
        if self.proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({self.proc.returncode}): {''.join(self.stderr)}")
        parsed: dict[str, Any] = json.loads(out)
        return parsed


# --------------------------------------------------------------------------- scenarios


def scenario_device_calls(fake: FakeNvml, workdir: Path, n: int) -> dict[str, Any]:
    """What the stand-in itself costs per call, measured through pynvml in this process.

    The daemon's set_power_limit is exactly one nvmlDeviceSetPowerManagementLimit
    call, so its latency minus this is the daemon's own overhead. The call log
    is on (as for the daemon) but goes to a separate file.
    """
    preload_library(fake.lib_dir)
    os.environ["FAKENVML_STATE"] = str(fake.state_path)
    os.environ["FAKENVML_LOG"] = str(workdir / "inprocess-calls.log")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        set_us: list[float] = []
        read_us: list[float] = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            pynvml.nvmlDeviceSetPowerManagementLimit(handle, LIMITS_MW[i % 2])
            set_us.append((time.perf_counter_ns() - t0) / 1000)
            t0 = time.perf_counter_ns()
            pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
            read_us.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        pynvml.nvmlShutdown()
    return {"set_power_limit_us": dist(set_us), "get_field_values_us": dist(read_us)}


def scenario_auth_verify(n: int) -> dict[str, Any]:
    """What verifying a bearer header costs in-process: uncached, cached, and a wrong-key rejection."""
    from zeusd.auth import AuthenticationError, TokenVerifier, issue_token

    key, other, now = base64.b64encode(b"k" * 32), base64.b64encode(b"o" * 32), 1_700_000_000
    header = "Bearer " + issue_token(key, "alice", ["gpu-read", "cpu-read"], now + 3600)
    cached = TokenVerifier(key, clock=lambda: now)
    uncached = TokenVerifier(key, clock=lambda: now, cache_size=0)
    wrong = TokenVerifier(other, clock=lambda: now, cache_size=0)

    def reject() -> None:
        try:
            wrong.verify_authorization(header)
        except AuthenticationError:
            return
        raise AssertionError("a token signed with another key was accepted")

    def each(call: Callable[[], object]) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            call()
            times.append((time.perf_counter_ns() - t0) / 1000)
        return times

    return {
        "uncached_us": dist(each(lambda: uncached.verify_authorization(header))),
        "cached_us": dist(each(lambda: cached.verify_authorization(header))),
        "wrong_key_us": dist(each(reject)),
    }


def scenario_scrape(workdir: Path, fake: FakeNvml, rapl_root: Path, n: int) -> dict[str, Any]:
    """GET /metrics on a daemon with the metrics group: client round trip, body size, the daemon's own timing."""
    with Daemon(workdir, fake, rapl_root, "unix", extra_args=("--enable", "metrics"), name="metrics").start() as d:
        assert isinstance(d.address, str)
        conn = UnixHTTPConnection(d.address)
        try:
            wall_us: list[float] = []
            body = b""
            for i in range(n + 5):  # the first few warm up the registry and the device reads
                t0 = time.perf_counter_ns()
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"/metrics answered {response.status}")
                if i >= 5:
                    wall_us.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            conn.close()
    text = body.decode()

    def sample(name: str) -> float:
        match = re.search(rf'^{name}{{method="GET",route="/metrics"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else math.nan

    served = sample("zeusd_http_request_duration_seconds_sum") / sample("zeusd_http_request_duration_seconds_count")
    return {"round_trip_us": dist(wall_us), "server_mean_us": served * 1e6, "body_bytes": len(body)}


def scenario_ceiling(workdir: Path, plan: Plan) -> dict[str, Any]:
    """loadgen against its own trivial server: the most requests/s it can make here."""
    out: dict[str, Any] = {}
    for conns in plan.throughput_conns:
        path = str(workdir / "ceiling.sock")
        server = subprocess.Popen(
            [str(LOADGEN), "serve", "--unix", path, "--duration", str(plan.ceiling_s + 3)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for _ in range(200):
                if os.path.exists(path):
                    break
                time.sleep(0.01)
            client = loadgen("http", "--unix", path, "--conns", str(conns), "--path", "/gpu/get_power", "--duration", str(plan.ceiling_s))
        finally:
            server.send_signal(signal.SIGINT)
            server_out, _ = server.communicate(timeout=10)
        served = json.loads(server_out) if server_out.strip() else {}
        out[f"conns_{conns}"] = {
            "rps": client["rps"],
            "latency_us": client["latency_us"],
            "loadgen_cpu_per_s": client["loadgen_cpu_per_s"],
            "server_requests": served.get("requests", 0),
            "server_cpu_s": served.get("cpu_s", 0.0),
            "errors": client["errors"],
        }
    return out


def scenario_startup(workdir: Path, fake: FakeNvml, rapl_root: Path, n: int, extra: Sequence[float]) -> dict[str, Any]:
    """Spawn to first 200 from /discover over UDS, fresh process each time."""
    samples: list[float] = []
    for i in range(n):
        with Daemon(workdir, fake, rapl_root, "unix", name=f"startup{i}").start() as d:
            samples.append(d.startup_s)
    return {
        "samples_s": samples,
        "median_s": statistics.median(samples),
        "max_s": max(samples),
        "other_starts_s": list(extra),
    }


def scenario_idle(d: Daemon, seconds: float) -> dict[str, Any]:
    """No requests, no subscribers: the daemon should touch no device and burn no CPU."""
    time.sleep(min(1.0, seconds))  # let the start (or the previous scenario) settle
    w = Window(d).start()
    time.sleep(seconds)
    r = w.stop()
    r["device_power_reads"] = int(r["device_power_reads"])
    r["device_calls"] = int(r["device_calls"])
    r["rss_mb"] = r["rss_end_mb"]
    return r


def latency_one(d: Daemon, name: str, plan: Plan, count: int = 0) -> dict[str, Any]:
    """One keep-alive connection, closed loop, for plan.latency_s (and at most ``count`` requests when > 0)."""
    method, path, path2 = ENDPOINTS[name]
    args = [*d.target_args(), "--conns", "1", "--method", method, "--path", path]
    if path2:
        args += ["--path2", path2]
    if count > 0:
        args += ["--count", str(count)]
    args += ["--duration", str(plan.latency_s), "--warmup", str(plan.latency_warmup_s)]
    w = Window(d).start()
    r = loadgen("http", *args)
    win = w.stop()
    out = {
        "requests": r["count"],
        "errors": r["errors"],
        "non2xx": r["non2xx"],
        "rps": r["rps"],
        "latency_us": r["latency_us"],
        "loadgen_cpu_per_s": r["loadgen_cpu_per_s"],
        "daemon_cpu_per_s": win["daemon_cpu_per_s"],
        "device_calls": win["device_calls"],
    }
    if name == "gpu_set_power_limit":
        # The daemon logs the device time of every command it ran (info level).
        device_ms = [float(m) for m in re.findall(r"device ([0-9.]+) ms\)", d.log_text(w.dlog0)) if m]
        out["daemon_logged_device_us"] = dist([x * 1000 for x in device_ms])
    return out


def scenario_latency(d: Daemon, plan: Plan) -> dict[str, Any]:
    return {name: latency_one(d, name, plan) for name in ENDPOINTS if name not in FLOOR_ENDPOINTS}


def scenario_throughput(d: Daemon, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for conns in plan.throughput_conns:
        w = Window(d).start()
        r = loadgen(
            "http", *d.target_args(), "--conns", str(conns), "--path", "/gpu/get_power",
            "--duration", str(plan.throughput_s), "--warmup", str(plan.latency_warmup_s),
        )  # fmt: skip
        win = w.stop()
        out[f"conns_{conns}"] = {
            "rps": r["rps"],
            "requests": r["count"],
            "errors": r["errors"],
            "non2xx": r["non2xx"],
            "latency_us": r["latency_us"],
            "loadgen_cpu_per_s": r["loadgen_cpu_per_s"],
            "daemon_cpu_per_s": win["daemon_cpu_per_s"],
            "device_power_reads_per_request": win["device_power_reads"] / max(1, r["count"]) if r["count"] else 0.0,
        }
    return out


def scenario_stream(d: Daemon, subs: int, plan: Plan) -> dict[str, Any]:
    """``subs`` SSE subscribers of /gpu/stream_power at POLL_HZ, measured between READY and END."""
    lg = SyncedLoadgen(
        "sse", *d.target_args(), "--conns", str(subs), "--path", "/gpu/stream_power",
        "--duration", str(plan.stream_s), "--period-ms", str(1000 / POLL_HZ), "--batch", "64",
    )  # fmt: skip
    lg.wait_for("READY", timeout=120)
    w = Window(d).start()
    lg.wait_for("END", timeout=plan.stream_s + 60)
    win = w.stop()
    r = lg.finish()
    ticks_nominal = r["window_s"] * POLL_HZ
    ticks_seen = r["events_per_conn"]["max"]
    ticks = ticks_seen or ticks_nominal
    return {
        "subscribers": r["subscribed"],
        "requested": subs,
        "failed": r["failed"],
        "window_s": r["window_s"],
        "events": r["events"],
        "events_per_s": r["events_per_s"],
        "expected_events_per_s": r["expected_events_per_s"],
        "missed_ticks": r["missed_ticks"],
        "closed_by_server": r["closed_by_server"],
        "timestamp_jitter_us": r["timestamp_jitter_us"],
        "arrival_jitter_us": r["arrival_jitter_us"],
        "delivery_lag_us": r["delivery_lag_us"],
        "daemon_cpu_per_s": win["daemon_cpu_per_s"],
        "daemon_cpu_s": win["daemon_cpu_s"],
        "ticks_nominal": ticks_nominal,
        "ticks_seen": ticks_seen,
        "device_power_reads": win["device_power_reads"],
        "device_reads_per_tick_per_gpu": win["device_power_reads"] / (ticks * NUM_GPUS) if ticks else 0.0,
        "rss_mb": win["rss_end_mb"],
        "loadgen_cpu_per_s": r["loadgen_cpu_per_s"],
    }


#: How the slow GPU answers in the slow-GPU scenario: 4 s per power read, or never.
SLOW_GPU_DELAYS_MS = {"4 s per read": 4000, "hung": -1}


def scenario_slow_gpu(d: Daemon, plan: Plan) -> dict[str, Any]:
    """A stream of every GPU while GPU 1's power reads take 4 s, or hang: the others' event rate.

    Rates come from the daemon's own timestamps (v0.5 events, one per GPU), over
    ``plan.slow_gpu_s`` of GPU 0's stream.
    """
    assert isinstance(d.address, str), "the UDS daemon"
    out: dict[str, Any] = {}
    for label, delay_ms in SLOW_GPU_DELAYS_MS.items():
        d.fake.set_delay("nvmlDeviceGetFieldValues", delay_ms, gpu=1)
        stamps: dict[int, list[int]] = {i: [] for i in range(NUM_GPUS)}
        try:
            with Client(Transport("unix", d.address)).stream("/gpu/stream_power?format=v0.5", timeout=30) as stream:
                for frame in stream.frames():
                    if frame.startswith("data: "):
                        event = json.loads(frame[len("data: "):])
                        stamps[event["gpu_id"]].append(event["timestamp_ms"])
                        if stamps[0] and stamps[0][-1] - stamps[0][0] >= plan.slow_gpu_s * 1000:
                            break
        finally:
            d.fake.clear_delay()
        span_s = max((stamps[0][-1] - stamps[0][0]) / 1000, 1e-3)
        healthy = [len(stamps[i]) / span_s for i in range(NUM_GPUS) if i != 1]
        out[label] = {
            "span_s": span_s,
            "healthy_events_per_s_min": min(healthy),
            "healthy_rate_share": min(healthy) / POLL_HZ,
            "slow_gpu_events": len(stamps[1]),
        }
    return out


def scenario_stall(daemons: Sequence[Daemon], plan: Plan) -> list[dict[str, Any]]:
    """Subscribers that never read (small receive buffer): RSS over time and whether they are cut off.

    Runs against every daemon at once (UDS and TCP: their kernel buffers
    differ a lot), sampling each one's RSS every ``stall_sample_s``.
    """
    gens = [
        SyncedLoadgen(
            "stall", *d.target_args(), "--conns", str(plan.stall_conns), "--path", "/gpu/stream_power",
            "--duration", str(plan.stall_s), "--rcvbuf", "4096",
        )  # fmt: skip
        for d in daemons
    ]
    for lg in gens:
        lg.wait_for("READY", timeout=60)
    t0 = time.monotonic()
    samples: list[list[tuple[float, float]]] = [[(0.0, rss_mb(d.pid))] for d in daemons]
    cpu0 = [proc_cpu_s(d.pid) for d in daemons]

    def sample() -> None:
        for d, taken in zip(daemons, samples):
            taken.append((round(time.monotonic() - t0, 2), rss_mb(d.pid)))

    for lg in gens:
        lg.wait_for("END", timeout=plan.stall_s + 60, tick=plan.stall_sample_s, on_tick=sample)
    sample()
    elapsed = time.monotonic() - t0
    cpu = [proc_cpu_s(d.pid) - c for d, c in zip(daemons, cpu0)]
    out = []
    for lg, taken, used in zip(gens, samples, cpu):
        r = lg.finish()
        rss = [x[1] for x in taken]
        out.append({
            "subscribers": r["subscribed"],
            "duration_s": r["duration_s"],
            "stall_timeout_s": STALL_TIMEOUT_S,
            "transport": r["target"],
            "rss_samples": taken,
            "rss_start_mb": rss[0],
            "rss_max_mb": max(rss),
            "rss_end_mb": rss[-1],
            "rss_growth_mb": max(rss) - rss[0],
            "disconnected": r["dropped_in_window"],
            "open_at_end": r["open_at_end"],
            "disconnected_after_s": r["drop_after_s"],
            "daemon_cpu_per_s": used / elapsed,
            "loadgen_cpu_per_s": r["loadgen_cpu_per_s"],
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- targets and report


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    unit: str
    limit: float
    get: Callable[[dict[str, Any]], float]
    exact_zero: bool = False


def _get(path: str) -> Callable[[dict[str, Any]], float]:
    def get(s: dict[str, Any]) -> float:
        node: Any = s
        for part in path.split("."):
            node = node[part]
        return float(node)

    return get


TARGETS = [
    Target("uds_get_power_p50", "p50 GET /gpu/get_power over UDS", "ms", 1.0,
           lambda s: s["latency"]["unix"]["gpu_get_power"]["latency_us"]["p50"] / 1000),
    Target("set_power_limit_overhead_p50", "set_power_limit block=true overhead over the device call, p50 (UDS)", "ms", 1.0,
           lambda s: s["latency"]["unix"]["gpu_set_power_limit"]["overhead_us"]["p50"] / 1000),
    Target("stream_1000_cpu", "1000 subscribers at 20 Hz: daemon CPU", "% of a core", 30.0,
           lambda s: s["streaming"]["subs_1000"]["daemon_cpu_per_s"] * 100),
    Target("stream_1000_jitter_p99", "1000 subscribers at 20 Hz: timestamp jitter p99", "ms", 5.0,
           lambda s: s["streaming"]["subs_1000"]["timestamp_jitter_us"]["p99"] / 1000),
    Target("slow_gpu_missed", "one GPU at 4 s per read: events the healthy GPUs missed", "% of 20 Hz", 10.0,
           lambda s: (1 - s["slow_gpu"]["4 s per read"]["healthy_rate_share"]) * 100),
    Target("hung_gpu_missed", "one GPU hung: events the healthy GPUs missed", "% of 20 Hz", 10.0,
           lambda s: (1 - s["slow_gpu"]["hung"]["healthy_rate_share"]) * 100),
    Target("idle_reads", "idle: device reads in the window", "reads", 0, _get("idle.device_power_reads"), exact_zero=True),
    Target("idle_cpu", "idle: daemon CPU", "% of a core", 0.1, lambda s: s["idle"]["daemon_cpu_per_s"] * 100),
    Target("rss_idle", "RSS idle", "MB", 60.0, _get("memory.idle_rss_mb")),
    Target("rss_1000", "RSS with 1000 subscribers", "MB", 120.0, _get("memory.subs_1000_rss_mb")),
    Target("rss_stalled_growth", "RSS growth with 100 stalled subscribers, UDS (max - start; flat = < 10 MB)", "MB", 10.0,
           _get("memory.stalled.rss_growth_mb")),
    Target("rss_stalled_growth_tcp", "RSS growth with 100 stalled subscribers, TCP (max - start; flat = < 10 MB)", "MB", 10.0,
           _get("memory.stalled_tcp.rss_growth_mb")),
    Target("startup", "startup: spawn to first /discover, median", "s", 1.0, _get("startup.median_s")),
]  # fmt: skip


def evaluate(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        try:
            value: float | None = t.get(scenarios)
        except (KeyError, TypeError, ValueError):
            value = None
        ok = value is not None and (value == 0 if t.exact_zero else value < t.limit)
        out.append({"key": t.key, "label": t.label, "unit": t.unit, "limit": t.limit, "value": value,
                    "result": "PASS" if ok else "MISS", "rule": "== 0" if t.exact_zero else f"< {t.limit:g}"})  # fmt: skip
    return out


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def stall_rows(st: dict[str, Any]) -> list[list[str]]:
    drop = st["disconnected_after_s"]
    return [
        [f"RSS, {st['subscribers']} stalled subscribers over {_f(st['duration_s'], 0)} s ({st['transport']})",
         f"start {_f(st['rss_start_mb'], 1)} / max {_f(st['rss_max_mb'], 1)} / end {_f(st['rss_end_mb'], 1)} MB"],
        [f"stalled subscribers disconnected ({st['transport']}, stall timeout {st['stall_timeout_s']} s)",
         f"{st['disconnected']} of {st['subscribers']}, open at end {st['open_at_end']}"
         + (f", after {_f(drop['p50'], 1)} s (p50), {_f(drop['max'], 1)} s (max)" if drop["n"] else "")],
    ]  # fmt: skip


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every section; shared by the text and markdown renderers."""
    s = result["scenarios"]
    out: list[tuple[str, list[str], list[list[str]]]] = []
    out.append(("Targets", ["target", "measured", "goal", "result"],
                [[t["label"], f"{_f(t['value'], 3)} {t['unit']}", f"{t['rule']} {t['unit']}", t["result"]] for t in result["targets"]]))  # fmt: skip
    rows = []
    for transport in ("unix", "tcp"):
        for name, r in s["latency"][transport].items():
            lat = r["latency_us"]
            extra = ""
            if "overhead_us" in r:
                extra = f"overhead p50 {r['overhead_us']['p50'] / 1000:.3f} / p99 {r['overhead_us']['p99'] / 1000:.3f} ms"
            rows.append([transport, name, _f(lat["p50"] / 1000, 3), _f(lat["p99"] / 1000, 3), str(r["requests"]),
                         str(r["errors"] + r["non2xx"]), _f(r["daemon_cpu_per_s"] * 100, 0), _f(r["loadgen_cpu_per_s"] * 100, 0), extra])  # fmt: skip
    out.append(("Latency (1 keep-alive connection)",
                ["transport", "endpoint", "p50 ms", "p99 ms", "requests", "errors", "daemon cpu%", "loadgen cpu%", "notes"], rows))  # fmt: skip
    dc = s["device_calls"]
    out.append(("Stand-in device call cost (in-process pynvml)", ["call", "p50 us", "p99 us"],
                [["nvmlDeviceSetPowerManagementLimit", _f(dc["set_power_limit_us"]["p50"], 1), _f(dc["set_power_limit_us"]["p99"], 1)],
                 ["nvmlDeviceGetFieldValues", _f(dc["get_field_values_us"]["p50"], 1), _f(dc["get_field_values_us"]["p99"], 1)]]))  # fmt: skip
    av, sc = s["auth_verify"], s["scrape"]
    out.append(("Token verification (in-process) and /metrics scrapes (UDS)", ["measure", "p50 us", "p99 us"], [
        ["verify_authorization, uncached", _f(av["uncached_us"]["p50"], 1), _f(av["uncached_us"]["p99"], 1)],
        ["verify_authorization, cached", _f(av["cached_us"]["p50"], 1), _f(av["cached_us"]["p99"], 1)],
        ["verify_authorization, wrong key", _f(av["wrong_key_us"]["p50"], 1), _f(av["wrong_key_us"]["p99"], 1)],
        [f"GET /metrics round trip ({NUM_GPUS} GPUs, {NUM_CPUS} packages, {sc['body_bytes']} bytes; "
         f"server-side mean {_f(sc['server_mean_us'], 0)} us)", _f(sc["round_trip_us"]["p50"], 0), _f(sc["round_trip_us"]["p99"], 0)],
    ]))  # fmt: skip
    rows = []
    for key, r in s["throughput"].items():
        c = s["loadgen_ceiling"].get(key, {})
        rows.append([key.split("_")[1], _f(r["rps"], 0), _f(r["latency_us"]["p50"] / 1000, 3), _f(r["latency_us"]["p99"] / 1000, 3),
                     _f(r["daemon_cpu_per_s"] * 100, 0), _f(r["loadgen_cpu_per_s"] * 100, 0), _f(c.get("rps"), 0),
                     _f(c.get("loadgen_cpu_per_s", 0) * 100, 0)])  # fmt: skip
    out.append(("Throughput GET /gpu/get_power (UDS) vs loadgen ceiling (loadgen serve)",
                ["conns", "req/s", "p50 ms", "p99 ms", "daemon cpu%", "loadgen cpu%", "ceiling req/s", "ceiling loadgen cpu%"], rows))  # fmt: skip
    rows = []
    for key, r in s["streaming"].items():
        rows.append([str(r["subscribers"]), _f(r["events_per_s"], 0), _f(r["expected_events_per_s"], 0), _f(r["daemon_cpu_per_s"] * 100, 1),
                     _f(r["timestamp_jitter_us"]["p99"] / 1000, 1), _f(r["arrival_jitter_us"]["p99"] / 1000, 1),
                     _f(r["device_reads_per_tick_per_gpu"], 2), str(r["missed_ticks"]), _f(r["rss_mb"], 1), _f(r["loadgen_cpu_per_s"] * 100, 0)])  # fmt: skip
    out.append((f"Streaming /gpu/stream_power at {POLL_HZ} Hz (UDS)",
                ["subs", "events/s", "expected", "daemon cpu%", "ts jitter p99 ms", "arrival jitter p99 ms", "reads/tick/GPU",
                 "missed ticks", "RSS MB", "loadgen cpu%"], rows))  # fmt: skip
    out.append(("A slow GPU during a stream of all GPUs (GPU 1 slow; healthy = GPUs 0, 2, 3)",
                ["GPU 1", "window s", "healthy events/s (min)", f"share of {POLL_HZ} Hz", "GPU 1 events"],
                [[label, _f(r["span_s"], 1), _f(r["healthy_events_per_s_min"], 1), _f(r["healthy_rate_share"] * 100, 1) + " %",
                  str(r["slow_gpu_events"])] for label, r in s["slow_gpu"].items()]))  # fmt: skip
    idle = s["idle"]
    m = s["memory"]
    out.append(("Idle, memory, startup", ["measure", "value"], [
        ["idle window", f"{_f(idle['window_s'], 1)} s"],
        ["idle device reads / all device calls", f"{idle['device_power_reads']} / {idle['device_calls']}"],
        ["idle daemon CPU (stat / schedstat)", f"{_f(idle['daemon_cpu_per_s'] * 100, 3)} % / {_f(idle['daemon_cpu_hires_per_s'] * 100, 3)} %"],
        ["RSS idle (fresh / after all load)", f"{_f(m['idle_rss_mb'], 1)} / {_f(m.get('idle_after_load_rss_mb'), 1)} MB"],
        ["RSS with 1000 subscribers", f"{_f(m['subs_1000_rss_mb'], 1)} MB"],
        *stall_rows(m["stalled"]),
        *stall_rows(m["stalled_tcp"]),
        ["startup median (max) of " + str(len(s['startup']['samples_s'])), f"{_f(s['startup']['median_s'], 3)} s ({_f(s['startup']['max_s'], 3)} s)"],
    ]))  # fmt: skip
    return out


Section = tuple[str, list[str], list[list[str]]]  # (title, header, rows)


def text_lines(sections: Sequence[Section]) -> list[str]:
    """Aligned plain-text tables (bench/compare.py prints its sections with this too)."""
    lines = []
    for title, header, rows in sections:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines += ["", title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return lines


def markdown_lines(sections: Sequence[Section]) -> list[str]:
    lines = []
    for title, header, rows in sections:
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return lines


def render_text(result: dict[str, Any]) -> str:
    meta = result["meta"]
    head = (f"zeusd benchmarks {meta['timestamp']}  {'QUICK (numbers meaningless)' if meta['quick'] else 'full'}  "
            f"{meta['cpus']} CPUs, load {meta['loadavg_start']:.2f} -> {meta['loadavg_end']:.2f}, {meta['runtime_s']:.1f} s")  # fmt: skip
    return "\n".join([head, *text_lines(tables(result))])


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    head = (f"Run {meta['timestamp']} ({'quick' if meta['quick'] else 'full'}), {meta['cpus']} CPUs "
            f"({meta['cpu_model']}), load average {meta['loadavg_start']:.2f} at start, {meta['loadavg_end']:.2f} at end, "
            f"{meta['runtime_s']:.0f} s.")  # fmt: skip
    return "\n".join([head, *markdown_lines(tables(result))])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- main


def run(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    meta: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": plan.quick,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "gpus": NUM_GPUS,
        "cpu_packages": NUM_CPUS,
        "gpu_power_poll_hz": POLL_HZ,
        "plan": plan.__dict__,
    }
    build_loadgen()
    s: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="zeusd-bench-"))
    try:
        fake = FakeNvml(workdir / "nvml.state", workdir / "nvml.calls")
        build_library()
        fake.create(NUM_GPUS)
        rapl = RaplTree(workdir / "powercap")
        for i in range(NUM_CPUS):
            rapl.add_package(i, energy_uj=1_000_000 * (i + 1), dram_energy_uj=100_000)

        log("device call cost (in-process)")
        s["device_calls"] = scenario_device_calls(fake, workdir, plan.device_calls)
        log("token verification (in-process)")
        s["auth_verify"] = scenario_auth_verify(plan.auth_verifies)
        log("loadgen ceiling")
        s["loadgen_ceiling"] = scenario_ceiling(workdir, plan)
        log("/metrics scrapes")
        s["scrape"] = scenario_scrape(workdir, fake, rapl.root, plan.scrapes)

        with Daemon(workdir, fake, rapl.root, "unix", name="uds").start() as uds:
            other_starts = [uds.startup_s]
            log(f"idle {plan.idle_s} s")
            s["idle"] = scenario_idle(uds, plan.idle_s)
            memory: dict[str, Any] = {"idle_rss_mb": s["idle"]["rss_mb"]}
            log("latency over UDS")
            s["latency"] = {"unix": scenario_latency(uds, plan)}
            log("throughput")
            s["throughput"] = scenario_throughput(uds, plan)
            s["streaming"] = {}
            for subs in plan.stream_subs:
                log(f"streaming, {subs} subscribers")
                s["streaming"][f"subs_{subs}"] = scenario_stream(uds, subs, plan)
            memory["subs_1000_rss_mb"] = s["streaming"].get("subs_1000", {}).get("rss_mb")
            log("streaming with one slow GPU")
            s["slow_gpu"] = scenario_slow_gpu(uds, plan)
            time.sleep(0.5)
            memory["idle_after_load_rss_mb"] = rss_mb(uds.pid)

            with Daemon(workdir, fake, rapl.root, "tcp", name="tcp").start() as tcp:
                other_starts.append(tcp.startup_s)
                log("latency over TCP")
                s["latency"]["tcp"] = scenario_latency(tcp, plan)
                log(f"stalled subscribers over UDS and TCP at once, {plan.stall_s} s")
                memory["stalled"], memory["stalled_tcp"] = scenario_stall([uds, tcp], plan)
        s["memory"] = memory

        for transport in ("unix", "tcp"):
            r = s["latency"][transport]["gpu_set_power_limit"]
            device = s["device_calls"]["set_power_limit_us"]
            r["device_call_us"] = {"p50": device["p50"], "p99": device["p99"]}
            r["overhead_us"] = {q: r["latency_us"][q] - device[q] for q in ("p50", "p99")}

        log(f"startup x{plan.startups}")
        s["startup"] = scenario_startup(workdir, fake, rapl.root, plan.startups, other_starts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["runtime_s"] = time.monotonic() - started
    result: dict[str, Any] = {"meta": meta, "scenarios": s}
    result["targets"] = evaluate(s)
    return result


def output_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--out and --markdown, shared with bench/compare.py (whose files are named compare-*.json)."""
    parser.add_argument("--out", type=Path, default=BENCH / "results", help=f"directory for {prefix}<timestamp>.json and {prefix}latest.json")
    parser.add_argument("--markdown", type=Path, nargs="?", const=Path("-"), metavar="JSON",
                        help=f"print the tables of a result file (default: <out>/{prefix}latest.json) as markdown and exit")  # fmt: skip


def markdown_source(args: argparse.Namespace, prefix: str = "") -> Path | None:
    """The result file --markdown asked for (None: it was not given)."""
    if args.markdown is None:
        return None
    return Path(args.out / f"{prefix}latest.json" if str(args.markdown) == "-" else args.markdown)


def save_result(result: dict[str, Any], out: Path, prefix: str = "") -> Path:
    """<out>/<prefix><timestamp>.json, and <prefix>latest.json replaced atomically; returns the first."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if result["meta"]["quick"] else "")
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    path = out / f"{prefix}{stamp}.json"
    path.write_text(text)
    tmp = out / f"{prefix}latest.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / f"{prefix}latest.json")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every scenario with tiny counts (seconds; for the smoke test)")
    output_arguments(parser)
    parser.add_argument("--stall-seconds", type=float, default=None,
                        help="length of the stalled-subscriber window (default 90, quick 1)")  # fmt: skip
    args = parser.parse_args(argv)

    source = markdown_source(args)
    if source is not None:
        print(render_markdown(json.loads(source.read_text())))
        return 0

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    plan = Plan.make(args.quick)
    if args.stall_seconds is not None:
        plan = dataclasses.replace(plan, stall_s=args.stall_seconds)
    result = run(plan, log)
    path = save_result(result, args.out)
    print(render_text(result))
    print(f"\nwritten: {path} and {args.out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
