"""``zeusd watch`` in a real pseudo-terminal and into a pipe, and ``zeusd power`` as a script would run it,
against real daemons; the rendering and the redraw rate in memory, on a ``Clock``.

The simulated GPUs are held at their lowest power limit (200 W), where their
power sits exactly on the limit, so totals are known in advance.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Callable, Iterator

import pytest
from twisted.internet.task import Clock, LoopingCall

from tests.conftest import DaemonFactory
from tests.daemon import REPO, Daemon, run_zeusd
from zeusd.client import ClockOffset, DeviceKind, PowerReading, ServerStatus
from zeusd.watch import TICK_S, WatchScreen, print_plain, server_views, watch_lines, watch_view

LIMIT_MW = 200_000
HOME = "\x1b[H"  # rich's Live (screen mode) starts every frame at the top left
ROWS, COLUMNS = 40, 160
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def server_arg(daemon: Daemon) -> str:
    t = daemon.transport
    return f"unix:{t.address}" if t.kind == "unix" else f"127.0.0.1:{t.address}"


def pin_gpus(daemon: Daemon, count: int) -> None:
    ids = ",".join(str(i) for i in range(count))
    r = daemon.client.post(f"/gpu/set_power_limit?gpu_ids={ids}&power_limit_mw={LIMIT_MW}&block=true")
    assert r.status == 200, r.body


@pytest.fixture
def two_nodes(start_daemon: DaemonFactory) -> Iterator[tuple[Daemon, Daemon]]:
    """Node a: 2 GPUs + 1 CPU package on a UNIX socket; node b: 3 GPUs, no CPU, on TCP."""
    a = start_daemon("--simulate", "--simulate-gpus", "2", "--simulate-cpus", "1")
    b = start_daemon("--simulate", "--simulate-gpus", "3", "--simulate-cpus", "0", transport="tcp")
    pin_gpus(a, 2)
    pin_gpus(b, 3)
    yield a, b


class Terminal:
    """A child process on a pseudo-terminal of ROWS x COLUMNS: read its screen output, type into it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: size its terminal and exec, nothing else from the test process
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
                os.chdir(REPO)
                os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **(env or {}), "TERM": "xterm"})
            finally:
                os._exit(127)
        self.output = b""
        self.status: int | None = None

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.fd, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    return

    def read_until(self, done: "Callable[[list[str]], bool]", seconds: float = 30) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.read_for(0.2)
            if done(self.frames()):
                return self.frames()
        raise AssertionError(f"the screen never showed it; last: {self.frames()[-1:]!r}")

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_for(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.read_for(0.2)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise TimeoutError(f"still running; output tail: {self.text[-2000:]!r}")

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def frames(self) -> list[str]:
        """Every complete screen drawn so far, escape sequences removed."""
        parts = self.text.split(HOME)[1:-1]  # the last one may be half-written
        return [ESCAPE.sub("", p).replace("\r", "") for p in parts if p.strip()]

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def section(screen: str, label: str) -> str:
    """The part of a ``watch`` screen about one server: its title line up to the next blank line."""
    start = screen.index(f"{label}  ")
    end = screen.find("\n\n", start)
    return screen[start:] if end < 0 else screen[start:end]


def test_watch_shows_every_device_and_totals_and_exits_0_on_ctrl_c(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    term = Terminal(["-m", "zeusd", "watch", "--server", server_arg(a), "--server", server_arg(b)])
    try:
        # until both nodes stream and node a's CPU package has a reading
        frames = term.read_until(lambda f: bool(f) and f[-1].count("  streaming") == 2 and "CPU 0" in f[-1])
        first_count = len(frames)
        term.read_for(3)  # keep watching: it must keep redrawing
        frames = term.frames()
        assert len(frames) >= first_count + 5, f"only {len(frames) - first_count} redraws in 3 s"
        assert len(set(frames[first_count:])) > 1  # the CPU readings move, so the screens differ
        assert len(frames) - first_count <= 3 * 10 + 2  # at most MAX_REDRAW_HZ

        screen = frames[-1].replace("\r", "")
        assert all(len(line) <= COLUMNS for line in screen.splitlines())  # drawn to the terminal's width
        node_a, node_b = section(screen, server_arg(a)), section(screen, server_arg(b))
        for gpu in ("GPU 0", "GPU 1"):
            assert re.search(rf"{gpu}\s+200\.0 W", node_a), screen
        assert re.search(r"CPU 0\s+\d+\.\d W\s+DRAM \d+\.\d W", node_a), screen
        cpu_w = sum(float(x) + float(y) for x, y in re.findall(r"CPU 0\s+(\d+\.\d) W\s+DRAM (\d+\.\d) W", node_a))
        assert re.search(r"total\s+(\d+\.\d) W", node_a)
        for gpu in ("GPU 0", "GPU 1", "GPU 2"):
            assert re.search(rf"{gpu}\s+200\.0 W", node_b), screen
        assert "CPU 0" not in node_b and re.search(r"total\s+600\.0 W", node_b), screen
        assert re.search(r"GPU total\s+1000\.0 W", screen), screen
        assert float(re.findall(r"TOTAL\s+(\d+\.\d) W", screen)[0]) == pytest.approx(1000 + cpu_w, abs=0.11)
        assert "without readings" not in screen

        term.type(b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground process
        assert term.wait(20) == 0
        tail = term.text[term.text.rindex(HOME):]
        assert "\x1b[?25h" in tail and tail.rstrip().endswith("\x1b[?1049l")  # cursor shown, main screen back
        assert "Traceback" not in term.text
    finally:
        term.close()


def test_watch_shows_a_node_going_down_as_unreachable_not_as_zero(start_daemon: DaemonFactory) -> None:
    a = start_daemon("--simulate", "--simulate-gpus", "1", "--simulate-cpus", "0")
    label = f"unix:{a.transport.address}"
    term = Terminal(["-m", "zeusd", "watch"], env={"ZEUSD_SOCK_PATH": str(a.transport.address)})
    try:
        term.read_until(lambda f: bool(f) and f"{label}  streaming" in f[-1])  # found through ZEUSD_SOCK_PATH
        a.stop()
        screen = term.read_until(lambda f: re.search(r"unreachable, retry\s+in", f[-1]) is not None)[-1]
        assert "GPU 0" not in screen and "0.0 W" not in screen, screen
        assert re.search(r"total\s+unreachable", section(screen, label)), screen
        assert re.search(r"TOTAL\s+—\s+1 of 1 server\(s\) without readings", screen), screen
        os.kill(term.pid, signal.SIGINT)
        assert term.wait(20) == 0
    finally:
        term.close()


def test_watch_into_a_pipe_prints_plain_lines(two_nodes: tuple[Daemon, Daemon], tmp_path: os.PathLike[str]) -> None:
    a, b = two_nodes
    missing = f"unix:{tmp_path}/nobody.sock"
    watch = subprocess.Popen(
        [sys.executable, "-m", "zeusd", "watch", "-s", server_arg(a), "-s", server_arg(b), "-s", missing],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TERM": "xterm"},
    )
    assert watch.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("TOTAL" in line and "gpu=1000.0W" in line for line in lines) < 2:
            ready, _, _ = select.select([watch.stdout], [], [], 0.5)
            if ready:
                lines.append(watch.stdout.readline().decode())
        watch.send_signal(signal.SIGINT)
        assert watch.wait(20) == 0
        lines += [line.decode() for line in watch.stdout.readlines()]
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    text = "".join(lines)
    assert "\x1b" not in text  # no escape sequences into a file
    blocks = [i for i, line in enumerate(lines) if " TOTAL " in line]
    assert len(blocks) >= 2 and all(len(line.split(" ")) >= 3 for line in lines)
    last = lines[blocks[-2] + 1 : blocks[-1] + 1]  # one line per server, then the total line
    assert [line.split(" ")[1] for line in last] == [server_arg(a), server_arg(b), missing, "TOTAL"]
    assert re.search(r" streaming gpu0=200\.0W gpu1=200\.0W cpu0=\d+\.\dW dram=\d+\.\dW total=", last[0]), last
    assert " streaming gpu0=200.0W gpu1=200.0W gpu2=200.0W total=600.0W" in last[1]
    assert re.search(r" (unreachable|reconnecting) .*total=- error=\"no socket at ", last[2]), last
    assert "gpu=1000.0W" in last[3] and last[3].rstrip().endswith("unread=1/3")


# --------------------------------------------------------------------------- rendering and rate, in memory


def status_and_readings(now: float) -> tuple[dict[str, ServerStatus], dict[tuple[str, DeviceKind, int], PowerReading]]:
    status = {
        "a:1": ServerStatus("a:1", "streaming", offset=ClockOffset(0.0004, 0.001, ())),
        "b:2": ServerStatus("b:2", "backoff", error="b:2: connection refused: is zeusd running?", retry_in_s=4.0),
        "c:3": ServerStatus("c:3", "connecting"),
    }
    latest: dict[tuple[str, DeviceKind, int], PowerReading] = {
        ("a:1", "gpu", 0): PowerReading("a:1", "gpu", 0, 200.0, now),
        ("a:1", "cpu", 0): PowerReading("a:1", "cpu", 0, 95.0, now - 8, 10.5),
    }
    return status, latest


def test_watch_view_never_shows_a_server_without_readings_as_zero() -> None:
    now = time.time()
    views = server_views(*status_and_readings(now))
    assert [(v.state, v.total_w, v.retry_in_s) for v in views] == [
        ("streaming", 305.5, None), ("unreachable", None, 4.0), ("connecting", None, None)
    ]
    assert views[1].detail == "connection refused: is zeusd running?"  # the row already names the server
    out = io.StringIO()
    print_plain(out, watch_view(views, now))
    screen = out.getvalue()
    assert re.search(r"a:1  streaming  clock offset \+0\.4 ms", screen)
    assert re.search(r"CPU 0\s+95\.0 W\s+DRAM 10\.5 W\s+8 s old", screen)  # a stale reading says so
    assert re.search(r"b:2  unreachable, retry in 4 s  connection refused", screen)
    assert re.search(r"b:2 .*\n\s+total\s+unreachable\n", screen) and re.search(r"c:3 .*\n\s+total\s+—\n", screen)
    assert re.search(r"TOTAL\s+305\.5 W\s+2 of 3 server\(s\) without readings", screen)
    lines = watch_lines(views, now)
    assert lines[1].split(" ")[1:] == ["b:2", "unreachable", "retry_in=4s", "total=-",
                                       'error="connection', "refused:", "is", "zeusd", 'running?"']
    assert lines[-1].split(" ")[1:] == ["TOTAL", "gpu=200.0W", "cpu=105.5W", "total=305.5W", "unread=2/3"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_watch_draws_a_terminal_at_most_10_times_a_second_and_a_pipe_once_a_second(terminal: bool) -> None:
    clock = Clock()
    now = time.time()
    out = Tty() if terminal else io.StringIO()
    screen = WatchScreen(out, clock, lambda: server_views(*status_and_readings(now)))
    screen.open()
    ticker = LoopingCall(screen.tick)
    ticker.clock = clock
    ticker.start(TICK_S, now=False)
    for _ in range(640):  # 64 readings a second for 10 s (1/64 adds up exactly)
        screen.changed()
        clock.advance(1 / 64)
    ticker.stop()
    screen.close()
    if terminal:
        assert 80 <= screen.frames <= 101  # the first frame, then at most one per 0.1 s
        assert out.getvalue().startswith("\x1b[?1049h") and out.getvalue().endswith("\x1b[?1049l")
    else:
        assert screen.frames == 10
        assert out.getvalue().count(" TOTAL ") == 10 and "\x1b" not in out.getvalue()


def test_power_json_matches_the_daemons(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    result = run_zeusd(["power", "--server", server_arg(a), "-s", server_arg(b), "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    servers = {entry["server"]: entry for entry in report["servers"]}
    assert list(servers) == [server_arg(a), server_arg(b)]
    for daemon in (a, b):
        entry = servers[server_arg(daemon)]
        assert entry["error"] is None
        assert entry["gpu"]["power_mw"] == daemon.client.get("/gpu/get_power").json()["power_mw"]
        assert abs(entry["gpu"]["timestamp_ms"] / 1000 - time.time()) < 30
    assert servers[server_arg(a)]["gpu"]["power_mw"] == {"0": LIMIT_MW, "1": LIMIT_MW}
    cpu = servers[server_arg(a)]["cpu"]["power_mw"]
    assert list(cpu) == list(a.client.get("/cpu/get_power").json()["power_mw"]) == ["0"]
    assert cpu["0"]["cpu_mw"] > 0 and cpu["0"]["dram_mw"] > 0
    assert servers[server_arg(b)]["cpu"] is None  # no CPU package on b
    cpu_w = (cpu["0"]["cpu_mw"] + cpu["0"]["dram_mw"]) / 1000
    assert servers[server_arg(a)]["total_w"] == pytest.approx(400 + cpu_w)
    assert servers[server_arg(b)]["total_w"] == 600
    assert report["total_w"] == pytest.approx(1000 + cpu_w) and report["unreadable"] == []


def table_rows(text: str) -> list[list[str]]:
    """``zeusd power``'s table as whitespace-split rows (rule and blank lines left out)."""
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("─")]


def test_power_table_and_an_unreachable_node(two_nodes: tuple[Daemon, Daemon], tmp_path: os.PathLike[str]) -> None:
    a, b = two_nodes
    result = run_zeusd(["power", "-s", server_arg(a), "-s", server_arg(b)])
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and all(line == line.rstrip() for line in result.stdout.splitlines())
    rows = table_rows(result.stdout)
    assert rows[0] == ["SERVER", "DEVICE", "POWER_W", "DRAM_W", "NOTE"]
    assert [server_arg(a), "gpu0", "200.0"] in rows and [server_arg(a), "gpu1", "200.0"] in rows
    assert [len(r) for r in rows if r[1] == "cpu0"] == [4]  # package and DRAM power
    assert [[server_arg(b), f"gpu{i}", "200.0"] for i in range(3)] == [r for r in rows if r[0] == server_arg(b) and r[1].startswith("gpu")]
    assert [server_arg(b), "total", "600.0"] in rows
    assert rows[-1][0] == "TOTAL" and float(rows[-1][1]) > 1000 and len(rows[-1]) == 2

    missing = f"unix:{tmp_path}/nobody.sock"
    result = run_zeusd(["power", "-s", server_arg(b), "-s", missing])
    assert result.returncode == 1
    rows = table_rows(result.stdout)
    assert [r[:5] for r in rows if r[0] == missing] == [[missing, "total", "unreachable", "no", "socket"]]
    assert rows[-1] == ["TOTAL", "600.0", "1", "of", "2", "server(s)", "not", "read"]
    result = run_zeusd(["power", "-s", server_arg(b), "-s", missing, "--json"])
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["servers"][0]["total_w"] == 600 and report["servers"][0]["error"] is None
    unreachable = report["servers"][1]
    assert unreachable["server"] == missing and unreachable["total_w"] is None  # unknown, not 0 W
    assert unreachable["error"] == f"{missing}: no socket at {tmp_path}/nobody.sock: is zeusd running? " \
        "(pick another with --server or $ZEUSD_SOCK_PATH)"
    assert report["total_w"] == 600 and report["unreadable"] == [missing]


def test_power_usage_errors_and_env_defaults(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    bad = run_zeusd(["power", "--server", "nonsense"])
    assert bad.returncode == 2 and "--server" in bad.stderr
    twice = run_zeusd(["power", "-s", server_arg(a), "-s", server_arg(a)])
    assert twice.returncode == 2 and "twice" in twice.stderr
    by_env = run_zeusd(["power", "--json"], env={"ZEUSD_HOST_PORT": server_arg(b), "ZEUSD_SOCK_PATH": ""})
    assert by_env.returncode == 0, by_env.stderr
    assert [s["server"] for s in json.loads(by_env.stdout)["servers"]] == [server_arg(b)]
    assert "power" in run_zeusd(["--help"]).stdout and "watch" in run_zeusd(["--help"]).stdout
