"""Every way to run the daemon, as a user runs it, on the simulated node and on the stand-in NVML.

``zeusd serve``, ``twist zeusd``, ``twistd zeusd`` daemonizing (pidfile and
logfile, stopped with ``kill $(cat pidfile)``), ``twistd -n zeusd`` and
``twistd -ny tac/zeusd.tac``: each reads power, runs a ``block=true`` command,
streams, and stops on SIGTERM with its socket removed and its documented exit
status. Startup errors give one ``Error:`` line on stderr through each of them.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.daemon import REPO, Client, Transport, free_tcp_port, wait_until, write_signing_key
from tests.fakenvml import FakeNvml

BIN = Path(sys.executable).parent

#: Twisted's runners re-raise the signal that stopped the reactor after an orderly
#: shutdown (twisted.application.app._exitWithSignal): "killed by SIGTERM" (shell: 143).
TWISTED_SIGTERM = -signal.SIGTERM


@dataclass(frozen=True)
class EntryPoint:
    name: str
    argv: Callable[[Path, list[str]], list[str]]
    daemonizes: bool = False
    exit_status: int = TWISTED_SIGTERM
    via_environment: bool = False  # the tac file reads its options from $ZEUSD_ARGS

    def command(self, tmp_path: Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
        if self.via_environment:
            return self.argv(tmp_path, []), {"ZEUSD_ARGS": shlex.join(args)}
        return self.argv(tmp_path, args), {}


ENTRY_POINTS = [
    EntryPoint("zeusd serve", lambda d, a: [str(BIN / "zeusd"), "serve", *a], exit_status=0),
    EntryPoint("twist zeusd", lambda d, a: [str(BIN / "twist"), "zeusd", *a]),
    EntryPoint(
        "twistd zeusd",
        lambda d, a: [str(BIN / "twistd"), "--pidfile", str(d / "twistd.pid"), "--logfile", str(d / "twistd.log"), "zeusd", *a],
        daemonizes=True,
    ),
    EntryPoint(
        "twistd -n zeusd",
        lambda d, a: [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(d / "twistd.log"), "zeusd", *a],
    ),
    EntryPoint(
        "twistd -ny zeusd.tac",
        lambda d, a: [str(BIN / "twistd"), "-ny", str(REPO / "tac" / "zeusd.tac"), "--pidfile=", "--logfile", str(d / "twistd.log")],
        via_environment=True,
    ),
]


@pytest.fixture(params=ENTRY_POINTS, ids=lambda e: e.name)
def entry(request: pytest.FixtureRequest) -> EntryPoint:
    entry: EntryPoint = request.param
    return entry


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids a test started (children or daemonized); any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_exit(pid: int, timeout: float = 30.0) -> None:
    """Wait for any process (not only a child) to end, on its pidfd: an event, not a poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} did not exit within {timeout} s"
    finally:
        os.close(fd)


def start(entry: EntryPoint, tmp_path: Path, args: list[str], env: dict[str, str], pids: list[int]) -> subprocess.Popen[bytes]:
    argv, extra = entry.command(tmp_path, args)
    with open(tmp_path / "stdout.log", "wb") as out:
        p = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env, **extra})
    pids.append(p.pid)
    return p


def daemon_pid(entry: EntryPoint, p: subprocess.Popen[bytes], tmp_path: Path, pids: list[int]) -> int:
    if not entry.daemonizes:
        return p.pid
    assert p.wait(60) == 0, (tmp_path / "stdout.log").read_text()  # the parent returns once the daemon started
    pid = int((tmp_path / "twistd.pid").read_text())
    pids.append(pid)
    return pid


def logs(tmp_path: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in (tmp_path / "stdout.log", tmp_path / "twistd.log") if f.exists())


def serving(client: Client) -> bool:
    try:
        return client.get("/discover").status == 200
    except OSError:
        return False


@pytest.mark.parametrize("backend", ["simulated", "stand-in NVML"])
def test_each_entry_point_serves_commands_streams_and_stops(
    entry: EntryPoint, backend: str, tmp_path: Path, fake: FakeNvml, pids: list[int]
) -> None:
    sock = tmp_path / "zeusd.sock"
    args = ["--socket-path", str(sock)]
    env: dict[str, str] = {}
    if backend == "simulated":
        args += ["--simulate", "--simulate-gpus", "4"]
    else:
        args += ["--enable", "gpu-control,gpu-read"]
        env = fake.env()
    p = start(entry, tmp_path, args, env, pids)
    pid = daemon_pid(entry, p, tmp_path, pids)
    client = Client(Transport("unix", str(sock)))
    wait_until(lambda: serving(client) or (not entry.daemonizes and p.poll() is not None), "the daemon to serve", 60)
    assert p.poll() is None or entry.daemonizes, logs(tmp_path)

    power = client.get("/gpu/get_power")
    assert power.status == 200, power.body  # the device threads exist in the serving process
    assert sorted(power.json()["power_mw"]) == ["0", "1", "2", "3"]
    if backend != "simulated":
        assert set(power.json()["power_mw"].values()) == {150_000}
    assert client.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=250000&block=true").status == 200
    assert client.get("/gpu/get_power_limit?gpu_ids=1").json() == {"1": {"power_limit_mw": 250_000}}
    if backend != "simulated":
        assert fake.gpu(1).power_limit_mw == 250_000
    with client.stream("/gpu/stream_power?format=v0.5") as stream:
        assert {e["gpu_id"] for e in stream.events(8)} == {0, 1, 2, 3}

    os.kill(pid, signal.SIGTERM)
    if entry.daemonizes:
        wait_for_exit(pid)
        assert not (tmp_path / "twistd.pid").exists()
    else:
        assert p.wait(30) == entry.exit_status
    assert not sock.exists(), "socket file left behind after SIGTERM"
    assert "zeusd stopped" in logs(tmp_path)


# Startup errors -------------------------------------------------------------------------


def _weak_key(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    key = tmp_path / "weak.key"
    write_signing_key(key, mode=0o644)
    return ["--simulate", "--socket-path", str(tmp_path / "z.sock"), "--signing-key-path", str(key)]


def _unreadable_key(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    return ["--simulate", "--socket-path", str(tmp_path / "z.sock"), "--signing-key-path", str(tmp_path / "missing.key")]


def _port_in_use(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    held.append(taken)
    return ["--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{taken.getsockname()[1]}"]


def _live_socket(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "z.sock"))
    live.listen()
    held.append(live)
    return ["--simulate", "--socket-path", str(tmp_path / "z.sock")]


def _bad_tls_pair(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    os.chmod(tmp_path / "key.pem", 0o600)
    return [
        "--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}",
        "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
    ]


def _missing_rapl_root(tmp_path: Path, held: list[socket.socket]) -> list[str]:
    return ["--socket-path", str(tmp_path / "z.sock"), "--enable", "cpu-read", "--rapl-root", str(tmp_path / "no-powercap")]


#: What goes wrong → (the arguments that make it go wrong, given sockets to hold open; words of its Error line).
STARTUP_ERRORS: dict[str, tuple[Callable[[Path, list[socket.socket]], list[str]], str]] = {
    "weak key": (_weak_key, "is accessible by other users"),
    "unreadable key": (_unreadable_key, "Failed to read signing key"),
    "port in use": (_port_in_use, "Cannot listen on 127.0.0.1:"),
    "live socket": (_live_socket, "Another process is already serving on"),
    "bad TLS pair": (_bad_tls_pair, "Cannot load TLS certificate"),
    "missing RAPL root": (_missing_rapl_root, "no such directory"),
}


@pytest.mark.parametrize("error", list(STARTUP_ERRORS))
def test_startup_errors_are_one_line_through_every_entry_point(
    entry: EntryPoint, error: str, tmp_path: Path, pids: list[int]
) -> None:
    make_args, needle = STARTUP_ERRORS[error]
    held: list[socket.socket] = []
    args = make_args(tmp_path, held)
    argv, extra = entry.command(tmp_path, args)
    try:
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, **extra})
    finally:
        for s in held:
            s.close()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "twistd.pid").exists()


def test_the_tac_file_has_exactly_the_defaults_of_zeusd_serve(tmp_path: Path) -> None:
    """Without $ZEUSD_ARGS the tac never serves a simulated node: it wants what `zeusd serve` wants."""
    env = {k: v for k, v in os.environ.items() if k != "ZEUSD_ARGS"}
    code = (
        "import runpy, sys; from twisted.application.service import IService; "
        "ns = runpy.run_path(sys.argv[1]); tree = IService(ns['application']); "
        "print(repr(next(iter(tree)).config))"
    )
    # Build the tac's tree without starting it; the preflight still runs, so give it a free default socket.
    r = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "tac" / "zeusd.tac")], capture_output=True, text=True, timeout=60, env=env
    )
    from zeusd.options import ServeOptions

    serve = ServeOptions()
    serve.parseOptions([])
    if r.returncode != 0:  # e.g. /var/run/zeusd.sock is live on this machine: then the errors must match too
        assert r.stderr.strip().splitlines()[-1].startswith("Error: "), r.stderr
        return
    assert r.stdout.strip() == repr(serve.config()) and "simulate=False" in r.stdout
