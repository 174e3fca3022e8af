"""``zeusd watch`` in a real pseudo-terminal and ``zeusd power`` as a script would run it, against real daemons.

The simulated GPUs are held at their lowest power limit (200 W), where their
power sits exactly on the limit, so totals are known in advance.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sys
import time
from typing import Iterator

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import REPO, Daemon, run_zeusd

LIMIT_MW = 200_000
CLEAR = "\x1b[H\x1b[2J"


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
    """A child process on a pseudo-terminal: read its screen output, type into it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once, nothing else from the test process
            try:
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
        parts = self.text.split(CLEAR)[1:-1]  # the last one may be half-written
        return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", p).replace("\r", "") for p in parts]

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def test_watch_shows_every_device_and_totals_and_exits_0_on_ctrl_c(two_nodes: tuple[Daemon, Daemon]) -> None:
    a, b = two_nodes
    term = Terminal(["-m", "zeusd", "watch", "--server", server_arg(a), "--server", server_arg(b)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until both nodes are on screen
            term.read_for(0.5)
            frames = term.frames()
            if frames and frames[-1].count("[streaming]") == 2 and "CPU 0" in frames[-1]:
                break
        first_count = len(term.frames())
        term.read_for(3)  # keep watching: it must keep redrawing
        frames = term.frames()
        assert len(frames) >= first_count + 5, f"only {len(frames) - first_count} redraws in 3 s"
        assert len(set(frames[first_count:])) > 1  # the CPU readings move, so the screens differ

        screen = frames[-1]
        node_a, node_b = screen.split(server_arg(b))
        assert server_arg(a) in node_a
        for gpu in ("GPU 0", "GPU 1"):
            assert re.search(rf"{gpu}\s+200\.0 W", node_a), screen
        assert re.search(r"CPU 0\s+\d+\.\d W\s+DRAM \d+\.\d W", node_a), screen
        assert re.search(r"GPU total\s+400\.0 W", node_a), screen
        for gpu in ("GPU 0", "GPU 1", "GPU 2"):
            assert re.search(rf"{gpu}\s+200\.0 W", node_b), screen
        assert "CPU 0" not in node_b
        assert re.search(r"GPU total\s+600\.0 W", node_b) and re.search(r"\n  total\s+600\.0 W", node_b), screen
        assert re.search(r"\nGPU total\s+1000\.0 W", screen), screen
        cpu_w = float(re.findall(r"\nCPU total\s+(\d+\.\d) W", screen)[0])
        total_w = float(re.findall(r"\nTOTAL\s+(\d+\.\d) W", screen)[0])
        assert cpu_w > 0 and total_w == pytest.approx(1000 + cpu_w, abs=0.11)

        term.type(b"\x03")  # Ctrl-C: the terminal sends SIGINT to the foreground process
        assert term.wait(20) == 0
        assert term.text.rstrip().endswith("\x1b[?25h\x1b[?1049l")  # cursor shown, main screen back
        assert "Traceback" not in term.text
    finally:
        term.close()


def test_watch_shows_a_node_going_down(start_daemon: DaemonFactory) -> None:
    a = start_daemon("--simulate", "--simulate-gpus", "1", "--simulate-cpus", "0")
    term = Terminal(["-m", "zeusd", "watch"], env={"ZEUSD_SOCK_PATH": str(a.transport.address)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("[streaming]" in f for f in term.frames()):
            term.read_for(0.5)
        assert f"unix:{a.transport.address}   [streaming]" in term.frames()[-1]  # found through ZEUSD_SOCK_PATH
        a.stop()
        term.read_for(3)
        screen = term.frames()[-1]
        assert "reconnecting in" in screen and "GPU 0" not in screen, screen
        assert re.search(r"TOTAL\s+0\.0 W", screen)
        os.kill(term.pid, signal.SIGINT)
        assert term.wait(20) == 0
    finally:
        term.close()


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
    assert report["total_w"] == pytest.approx(1000 + cpu_w)


def test_power_table_and_an_unreachable_node(two_nodes: tuple[Daemon, Daemon], tmp_path: os.PathLike[str]) -> None:
    a, b = two_nodes
    result = run_zeusd(["power", "-s", server_arg(a), "-s", server_arg(b)])
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["SERVER", "DEVICE", "POWER_W", "DRAM_W"]
    assert [server_arg(a), "gpu0", "200.0"] in rows and [server_arg(a), "gpu1", "200.0"] in rows
    assert [r[:2] for r in rows if r[1] == "cpu0"] == [[server_arg(a), "cpu0"]] and len(rows[3]) == 4
    assert [[server_arg(b), f"gpu{i}", "200.0"] for i in range(3)] == [r for r in rows if r[0] == server_arg(b) and r[1].startswith("gpu")]
    assert [server_arg(b), "total", "600.0"] in rows
    total = float(rows[-1][1])
    assert rows[-1][0] == "TOTAL" and total > 1000

    missing = f"unix:{tmp_path}/nobody.sock"
    result = run_zeusd(["power", "-s", server_arg(b), "-s", missing, "--json"])
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["servers"][0]["total_w"] == 600 and report["servers"][0]["error"] is None
    assert report["servers"][1]["server"] == missing and "nobody.sock" in report["servers"][1]["error"]
    assert report["total_w"] == 600


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
