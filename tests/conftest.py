"""Shared fixtures: real daemons on real sockets, RAPL trees, the stand-in NVML library."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import settings

from tests.daemon import Daemon, Transport, end_process, free_tcp_port, terminate
from tests.fakenvml import FakeNvml, build_library
from tests.rapl_tree import RaplTree

DaemonFactory = Callable[..., Daemon]

# CI runs the property tests derandomized (examples derived from each test, no example database), so a
# CI failure reproduces anywhere; a developer's run keeps exploring new examples. .ci/run selects "ci".
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("ZEUSD_HYPOTHESIS_PROFILE", "default"))

# A test run started in the background of a non-interactive shell (``make test &``)
# inherits SIGINT ignored, and so would every daemon and ``zeusd watch`` it starts;
# the tests send SIGINT on purpose, so give them the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(params=["unix", "tcp"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_transport(kind: str, directory: Path) -> Transport:
    if kind == "unix":
        return Transport("unix", str(directory / "zeusd.sock"))
    return Transport("tcp", free_tcp_port())


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start zeusd subprocesses; every one is killed at the end of the test."""
    started: list[Daemon] = []

    def start(*args: str, transport: str = "unix", env: dict[str, str] | None = None, wait: bool = True, user: int | None = None) -> Daemon:
        directory = tmp_path / f"d{len(started)}"
        directory.mkdir()
        daemon = Daemon(make_transport(transport, directory), list(args), dict(env or {}), directory / "zeusd.log", user)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        terminate(daemon)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """Subprocesses a test starts itself (runners, socket activation); any still running at the end are
    stopped like daemons (SIGTERM, then SIGKILL)."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for p in started:
        end_process(p)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("module")


@pytest.fixture(scope="module", params=["unix", "tcp"])
def sim_daemon(request: pytest.FixtureRequest, module_tmp: Path) -> Iterator[Daemon]:
    """One simulated node per module and transport (read-mostly tests share it)."""
    directory = module_tmp / f"sim-{request.param}"
    directory.mkdir()
    daemon = Daemon(make_transport(str(request.param), directory), ["--simulate"], {}, directory / "zeusd.log")
    daemon.start()
    yield daemon
    terminate(daemon)


@pytest.fixture
def rapl_tree(tmp_path: Path) -> RaplTree:
    return RaplTree(tmp_path / "powercap")


@pytest.fixture
def fake(tmp_path: Path) -> FakeNvml:
    """The stand-in NVML library with 4 default GPUs, for daemons started with ``env=fake.env()``."""
    nvml = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log", build_library())
    nvml.create(4)
    return nvml

