"""Listeners by Twisted endpoint description (``--listen``), and systemd: units, socket activation, readiness.

Real daemons on real sockets; systemd's own tools (``systemd-analyze verify``,
``systemd-socket-activate``) where the machine has them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.protocol import Factory

from tests.conftest import DaemonFactory
from tests.daemon import (
    REPO, Client, Daemon, Transport, free_tcp_port, run_zeusd, self_signed_cert, terminate, wait_until,
    write_signing_key,
)
from zeusd.listeners import ListenerSpec, ListenSyntaxError, parse_listen, split_description

ZEUSD = Path(sys.executable).parent / "zeusd"
UNITS = REPO / "packaging" / "systemd"


# Parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "spec"),
    [
        ("unix:/run/zeusd/zeusd.sock:mode=660", ListenerSpec("unix", path="/run/zeusd/zeusd.sock", mode=0o660)),
        ("unix:/tmp/a\\:b.sock", ListenerSpec("unix", path="/tmp/a:b.sock")),
        ("tcp:4938:interface=127.0.0.1", ListenerSpec("tcp", host="127.0.0.1", port=4938)),
        ("tcp:4938:interface=\\:\\:1:backlog=16", ListenerSpec("tcp", host="::1", port=4938, backlog=16)),
        ("ssl:4939:privateKey=k.pem:certKey=c.pem", ListenerSpec("ssl", port=4939, tls_key="k.pem", tls_cert="c.pem")),
        ("ssl:4939:privateKey=both.pem", ListenerSpec("ssl", port=4939, tls_key="both.pem", tls_cert="both.pem")),
        ("systemd:domain=UNIX:index=0", ListenerSpec("systemd", domain="UNIX", index=0)),
        ("systemd:domain=INET6:name=api", ListenerSpec("systemd", domain="INET6", name="api")),
    ],
)
def test_listen_descriptions(description: str, spec: ListenerSpec) -> None:
    assert parse_listen(description) == spec


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("udp:4938", "unknown listener kind 'udp'"),
        ("unix:", "unix: needs a socket path"),
        ("unix:/a:mode=999", "not an octal mode"),
        ("unix:/a:mode=1777", "outside 000..777"),
        ("unix:/a:lockfile=1", "unknown key(s) lockfile"),
        ("tcp:99999", "bad port '99999'"),
        ("tcp:4938:interface=localhost", "interface must be an IP address"),
        ("ssl:4938", "ssl: needs privateKey="),
        ("systemd:domain=UNIX", "give exactly one of index=N or name=NAME"),
        ("systemd:domain=IPX:index=0", "domain must be one of UNIX, INET, INET6"),
        ("tcp:1:interface=::1", "expected 1 positional value(s), got 3"),
        ("tcp:1:backlog=1:backlog=2", "'backlog' is given twice"),
    ],
)
def test_bad_listen_descriptions_are_usage_errors(description: str, message: str) -> None:
    with pytest.raises(ListenSyntaxError, match=re.escape(message)):
        parse_listen(description)
    r = run_zeusd(["serve", "--simulate", "--listen", description])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_description_grammar_is_twisteds() -> None:
    assert split_description("a:b\\:c:k=v\\=w:x") == (["a", "b:c", "x"], {"k": "v=w"})


# One daemon, several listeners ------------------------------------------------------------


def test_one_daemon_serves_unix_and_tcp_with_auth_on_both(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    key = tmp_path / "key"
    write_signing_key(key)
    unix_path, port = tmp_path / "local.sock", free_tcp_port()
    daemon = start_daemon(
        "--simulate", "--signing-key-path", str(key),
        "--listen", f"unix:{unix_path}:mode=660", "--listen", f"tcp:{port}:interface=127.0.0.1",
        wait=False,
    )
    token = run_zeusd(["token", "issue", "--signing-key-path", str(key), "--user", "u", "--scope", "gpu-read", "--expires", "1h"])
    clients = [Client(Transport("unix", str(unix_path))), Client(Transport("tcp", port))]
    wait_until(lambda: all(_answers(c) for c in clients), "both listeners", 20)
    assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o660
    for client in clients:
        assert client.get("/gpu/get_power").status == 401
        authorized = client.get("/gpu/get_power", token=token.stdout.strip())
        assert authorized.status == 200 and len(authorized.json()["power_mw"]) == 4
        assert client.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true", token=token.stdout.strip()).status == 403
    log = daemon.log()
    assert f"Listening on unix:{unix_path} (mode 0660)" in log and f"Listening on http://127.0.0.1:{port}" in log
    assert daemon.stop() == 0 and not unix_path.exists()


def _answers(client: Client) -> bool:
    try:
        return client.get("/discover").status == 200
    except OSError:
        return False


def test_shorthand_flags_add_their_listener_to_listen(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    port = free_tcp_port()
    daemon = start_daemon("--simulate", "--listen", f"tcp:{port}", wait=True)  # plus the UDS from the test harness
    assert Client(Transport("tcp", port)).get("/discover").status == 200
    assert daemon.client.get("/discover").status == 200


# systemd --------------------------------------------------------------------------------------


def _needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed on this machine (Debian: systemd package)")
    return path


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _needs("systemd-analyze")
    # verify wants ExecStart= to exist: point it at this checkout's console script.
    for unit in ("zeusd.service", "zeusd.socket"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/zeusd", str(ZEUSD))
        (tmp_path / unit).write_text(text)
    r = subprocess.run([analyze, "verify", str(tmp_path / "zeusd.service"), str(tmp_path / "zeusd.socket")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    service = (UNITS / "zeusd.service").read_text()
    for line in (
        "Type=notify", "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_READ_SEARCH CAP_CHOWN", "NoNewPrivileges=yes",
        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service", "EnvironmentFile=-/etc/default/zeusd",
    ):
        assert line in service.splitlines(), line


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_socket_activation_serves_reads_and_streams(kind: str, tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    activate = _needs("systemd-socket-activate")
    if kind == "unix":
        address = str(tmp_path / "activated.sock")
        transport = Transport("unix", address)
    else:
        port = free_tcp_port()
        address = f"127.0.0.1:{port}"
        transport = Transport("tcp", port)
    with open(tmp_path / "daemon.log", "wb") as log:
        p = subprocess.Popen(
            [activate, "-l", address, *_coverage_env(), "--", str(ZEUSD), "serve", "--simulate"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    processes.append(p)
    if kind == "unix":
        wait_until(lambda: os.path.exists(address) or p.poll() is not None, "systemd-socket-activate to listen")
        mode = stat.S_IMODE(os.stat(address).st_mode)
        assert mode != 0o666
    client = Client(transport)
    first = wait_until(lambda: _first_answer(client), "the activated daemon to answer", 30)  # the connection starts it
    assert first.status == 200 and len(first.json()["power_mw"]) == 4
    with client.stream("/cpu/stream_power") as stream:
        assert len(stream.events(2)) == 2
    logged = (tmp_path / "daemon.log").read_text()
    assert "Listening on systemd socket index 0" in logged
    if kind == "unix":
        assert stat.S_IMODE(os.stat(address).st_mode) == mode  # the mode it was given, not Twisted's default 0666
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    if kind == "unix":
        assert os.path.exists(address)  # the socket file belongs to whoever passed it


def _coverage_env() -> list[str]:
    """systemd-socket-activate passes no environment on: name coverage's, so a measured run measures the daemon."""
    return [arg for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_FILE") if name in os.environ for arg in ("-E", name)]


def _first_answer(client: Client) -> Any:
    try:
        r = client.get("/gpu/get_power")
    except OSError:
        return None
    return r


def test_readiness_reaches_a_notify_socket(tmp_path: Path, start_daemon: DaemonFactory) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(30)
        daemon = start_daemon("--simulate", env={"NOTIFY_SOCKET": str(tmp_path / "notify")}, wait=False)
        ready = notify.recv(4096).decode().splitlines()
        assert ready[0] == "READY=1" and ready[1].startswith("STATUS=Serving 4 GPU(s)")
        assert daemon.client.get("/discover").status == 200  # READY=1 comes once it serves
        daemon.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert notify.recv(4096) == b"STOPPING=1"
        assert daemon.process.wait(30) == 0  # type: ignore[union-attr]


# Addresses and refusals at startup ------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("bind", "listening"), [("::1", "http://[::1]"), ("localhost", "http://127.0.0.1")],
                         ids=["ipv6", "hostname"])
def test_tcp_bind_address_by_ipv6_literal_or_hostname(tmp_path: Path, bind: str, listening: str) -> None:
    """``[v6]:port`` listens on IPv6; a hostname is resolved once, at startup, to the address it names."""
    if bind == "::1" and not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    if bind == "localhost" and socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    port = free_tcp_port()
    daemon = Daemon(Transport("tcp", port, host=bind), ["--simulate"], {}, tmp_path / "zeusd.log")
    try:
        daemon.start()  # ready: it answered /discover on bind:port
        assert daemon.client.get("/discover").json()["gpu_ids"] == [0, 1, 2, 3]
        assert f"Listening on {listening}:{port}" in daemon.log()
    finally:
        terminate(daemon)


def test_a_port_in_use_stops_startup_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_zeusd(["serve", "--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{port}"])
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: Cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_a_port_taken_between_the_check_and_the_listen_is_a_startup_error() -> None:
    """The listener's own bind failing (after preflight found the port free) is the same clear error."""
    from twisted.internet import reactor

    from zeusd.errors import StartupError
    from zeusd.listeners import ListenerService

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = ListenerService(reactor, ListenerSpec("tcp", host="127.0.0.1", port=port), Factory())
        with pytest.raises(StartupError, match=re.escape(f"Cannot listen on http://127.0.0.1:{port}: ")):
            service.privilegedStartService()
    assert service.port is None


@pytest.mark.parametrize("broken", ["certificate", "key"])
def test_unusable_tls_pem_stops_startup_naming_the_files(tmp_path: Path, broken: str) -> None:
    cert, key = self_signed_cert(tmp_path)
    (cert if broken == "certificate" else key).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    r = run_zeusd(["serve", "--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}",
                   "--tls-cert", str(cert), "--tls-key", str(key)])  # fmt: skip
    assert r.returncode == 1, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"Error: Cannot load TLS certificate '{cert}' with key '{key}': "), line


def test_missing_tls_key_stops_startup_naming_it(tmp_path: Path) -> None:
    cert, _ = self_signed_cert(tmp_path)
    missing = tmp_path / "absent.pem"
    r = run_zeusd(["serve", "--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}",
                   "--tls-cert", str(cert), "--tls-key", str(missing)])  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"Error: Cannot read TLS key file '{missing}': No such file or directory"]
