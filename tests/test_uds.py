"""The UNIX socket's lifecycle: mode, owner, stale and live sockets, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, Transport, run_zeusd


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_socket_mode_defaults_to_666(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate")
    assert _mode(str(daemon.transport.address)) == 0o666


def test_socket_mode_and_owner_are_applied(start_daemon: DaemonFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    daemon = start_daemon("--simulate", "--socket-permissions", "0660", "--socket-uid", "65534", "--socket-gid", "65534")
    st = os.stat(str(daemon.transport.address))
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (65534, 65534)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_removes_the_socket(start_daemon: DaemonFactory, sig: int) -> None:
    daemon = start_daemon("--simulate")
    path = str(daemon.transport.address)
    assert daemon.stop(sig) == 0
    assert not os.path.exists(path)
    assert "zeusd stopped" in daemon.log()


def test_shutdown_ends_open_streams_cleanly(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate")
    stream = daemon.client.stream("/gpu/stream_power")
    stream.events(2)
    ended: list[BaseException] = []

    def drain() -> None:
        try:
            for _ in stream.frames():
                pass
        except EOFError as e:
            ended.append(e)

    reader = threading.Thread(target=drain)
    reader.start()
    assert daemon.stop(signal.SIGTERM) == 0
    reader.join(10)
    assert ended and str(ended[0]) == "stream ended"  # the terminating chunk, not a reset
    stream.close()


def test_stale_socket_is_replaced(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    first = start_daemon("--simulate")
    path = str(first.transport.address)
    first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.process.wait()  # type: ignore[union-attr]
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # a crash leaves the socket behind
    second = Daemon(Transport("unix", path), ["--simulate"], {}, tmp_path / "second.log").start()
    try:
        assert second.client.get("/discover").status == 200
        assert "Removing stale socket" in second.log()
    finally:
        second.stop()


def test_live_socket_is_not_stolen(start_daemon: DaemonFactory) -> None:
    first = start_daemon("--simulate")
    path = str(first.transport.address)
    result = run_zeusd(["serve", "--simulate", "--socket-path", path])
    assert result.returncode == 1
    assert "Another process is already serving on" in result.stderr
    assert first.client.get("/discover").status == 200


def test_a_path_that_is_not_a_socket_is_never_deleted(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    result = run_zeusd(["serve", "--simulate", "--socket-path", str(path)])
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert path.read_text() == "keep me"


def test_a_symlink_to_a_socket_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(target))
    s.close()
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    result = run_zeusd(["serve", "--simulate", "--socket-path", str(link)])
    assert result.returncode == 1
    assert link.is_symlink() and target.exists()


def test_missing_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "run" / "zeusd" / "zeusd.sock"
    daemon = Daemon(Transport("unix", str(path)), ["--simulate"], {}, tmp_path / "log").start()
    try:
        assert daemon.client.get("/time").status == 200
    finally:
        assert daemon.stop() == 0
