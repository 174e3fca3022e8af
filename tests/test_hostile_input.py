"""Bad and hostile input: never a 5xx, never a crash, never a changed device state.

Property-based over every endpoint's query string (random names, values,
encodings, repeats, huge values, invalid UTF-8), plus hand-made request
shapes: wrong methods, bodies, oversized headers, slow headers.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.daemon import Daemon, Transport
from tests.fakenvml import FakeNvml, build_library

ENDPOINTS = [
    ("POST", "/gpu/set_persistence_mode"),
    ("POST", "/gpu/set_power_limit"),
    ("POST", "/gpu/set_gpu_locked_clocks"),
    ("POST", "/gpu/reset_gpu_locked_clocks"),
    ("POST", "/gpu/set_mem_locked_clocks"),
    ("POST", "/gpu/reset_mem_locked_clocks"),
    ("POST", "/gpu/reset_locked_clocks"),
    ("GET", "/gpu/get_power"),
    ("GET", "/gpu/get_cumulative_energy"),
    ("GET", "/gpu/get_power_limit"),
    ("GET", "/gpu/get_power_limit_constraints"),
    ("GET", "/gpu/get_persistence_mode"),
    ("GET", "/cpu/get_cumulative_energy"),
    ("GET", "/cpu/get_power"),
    ("GET", "/discover"),
    ("GET", "/time"),
]
NAMES = ["gpu_ids", "cpu_ids", "block", "enabled", "power_limit_mw", "min_clock_mhz", "max_clock_mhz", "cpu", "dram", "format"]


@pytest.fixture(scope="module")
def nvml_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, FakeNvml]]:
    directory = tmp_path_factory.mktemp("hostile")
    fake = FakeNvml(directory / "nvml.state", None, build_library())
    fake.create(4)
    from tests.rapl_tree import RaplTree

    tree = RaplTree(directory / "powercap").add_package(0, dram_energy_uj=10).add_package(1)
    daemon = Daemon(
        Transport("unix", str(directory / "zeusd.sock")),
        ["--rapl-root", str(tree.root)],
        fake.env(),
        directory / "zeusd.log",
    ).start()
    yield daemon, fake
    daemon.stop()


def _value() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from([b"0", b"1", b"3", b"true", b"false", b"True", b"-1", b"+5", b"0,1", b"0,,1", b"", b"999999999999"]),
        st.binary(max_size=40),
        st.integers(min_value=0, max_value=2**40).map(lambda n: str(n).encode()),
        st.just(b"9" * 20000),
    )


def _pair() -> st.SearchStrategy[bytes]:
    name = st.one_of(st.sampled_from([n.encode() for n in NAMES]), st.binary(max_size=12))
    return st.tuples(name, _value(), st.booleans()).map(
        lambda t: quote_from_bytes(t[0]).encode() + b"=" + (quote_from_bytes(t[1]).encode() if t[2] else t[1].replace(b"&", b"").replace(b"#", b"").replace(b" ", b"+"))
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), pairs=st.lists(_pair(), max_size=6))
def test_random_queries_never_5xx_and_failures_change_nothing(
    nvml_daemon: tuple[Daemon, FakeNvml], endpoint: tuple[str, str], pairs: list[bytes]
) -> None:
    daemon, fake = nvml_daemon
    method, path = endpoint
    query = b"&".join(pairs)
    target = path.encode() + (b"?" + query if query else b"")
    before = fake.gpus()
    status, body = _raw_request(daemon, method.encode(), _printable(target))
    assert status < 500, (target, status, body)
    if status >= 400:
        assert body.startswith(b"{") and b'"error' in body, (target, body)
        assert fake.gpus() == before, target
    if status == 200 and method == "POST":
        _restore(daemon)


def _printable(target: bytes) -> bytes:
    """Whatever bytes the values hold, except the few that would end the request line."""
    return bytes(b for b in target if b not in b" \t\r\n\x00")


def _restore(daemon: Daemon) -> None:
    c = daemon.client
    c.post("/gpu/set_power_limit?gpu_ids=0,1,2,3&power_limit_mw=700000&block=true")
    c.post("/gpu/set_persistence_mode?gpu_ids=0,1,2,3&enabled=false&block=true")
    c.post("/gpu/reset_locked_clocks?gpu_ids=0,1,2,3&block=true")


def _raw_request(daemon: Daemon, method: bytes, target: bytes, extra: bytes = b"", body: bytes = b"") -> tuple[int, bytes]:
    with daemon.transport.raw_socket(10) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


@pytest.mark.parametrize(
    "method, target, extra, body, expected",
    [
        (b"PATCH", b"/gpu/get_power", b"", b"", 404),
        (b"OPTIONS", b"*", b"", b"", 200),  # the server-wide OPTIONS (RFC 9110 9.3.7): Twisted's empty 200
        (b"GET", b"*", b"", b"", 405),  # only OPTIONS may ask about '*'
        (b"GET", b"http://node.example:4938/time", b"", b"", 200),  # absolute form (RFC 9112 3.2.2)
        (b"GET", b"HTTP://node.example/gpu/get_power?gpu_ids=1", b"", b"", 200),
        (b"GET", b"/gpu/get_power?" + b"gpu_ids=0&" * 1000, b"", b"", 400),
        (b"GET", b"/\xff\xfe", b"", b"", 400),
        (b"GET", b"/gpu/get_power%FF", b"", b"", 404),
        (b"POST", b"/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true", b"Content-Length: 5\r\n", b"hello", 200),
        (b"POST", b"/gpu/get_power", b"Content-Length: 100000000\r\n", b"x" * 70000, 413),
        (b"GET", b"/time", b"X-Big: " + b"a" * 20000 + b"\r\n", b"", 431),
    ],
)
def test_request_shapes(
    nvml_daemon: tuple[Daemon, FakeNvml], method: bytes, target: bytes, extra: bytes, body: bytes, expected: int
) -> None:
    daemon, _ = nvml_daemon
    status, _ = _raw_request(daemon, method, target, extra, body)
    assert status == expected
    assert daemon.client.get("/time").status == 200  # still serving
    _restore(daemon)


def test_chunked_body_over_the_bound_is_refused(nvml_daemon: tuple[Daemon, FakeNvml]) -> None:
    daemon, _ = nvml_daemon
    chunk = b"%x\r\n%b\r\n" % (32768, b"y" * 32768)
    status, body = _raw_request(daemon, b"POST", b"/time", b"Transfer-Encoding: chunked\r\n", chunk * 3)
    assert status == 413 and b"too large" in body


def test_slow_headers_are_cut_off(nvml_daemon: tuple[Daemon, FakeNvml], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never finishes its headers is disconnected after the deadline (10 s)."""
    daemon, _ = nvml_daemon
    with daemon.transport.raw_socket(30) as sock:
        sock.sendall(b"GET /time HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(20):  # trickle a header byte now and then, as slowloris does
            try:
                sock.sendall(b"X")
            except OSError:
                break
            data = _recv_nowait(sock)
            if data is not None:
                break
            time.sleep(0.7)
        else:
            data = sock.recv(1024)
        elapsed = time.monotonic() - started
    assert data is not None and data.startswith(b"HTTP/1.1 408"), data
    assert 9 <= elapsed <= 13
    assert daemon.client.get("/time").status == 200


def _recv_nowait(sock: socket.socket) -> bytes | None:
    sock.setblocking(False)
    try:
        return sock.recv(1024)
    except BlockingIOError:
        return None
    finally:
        sock.setblocking(True)


def test_bare_lf_line_endings_get_a_400_at_once(nvml_daemon: tuple[Daemon, FakeNvml]) -> None:
    daemon, _ = nvml_daemon
    with daemon.transport.raw_socket(5) as sock:  # well inside the 10 s header deadline
        sock.sendall(b"GET /time HTTP/1.1\nHost: x\n\n")
        data = sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body) == {"error": "Malformed HTTP request: lines must end with CRLF."}
    assert daemon.client.get("/time").status == 200


def test_the_header_deadline_starts_at_the_first_byte(nvml_daemon: tuple[Daemon, FakeNvml]) -> None:
    """A client that never completes even its request line is cut off too."""
    daemon, _ = nvml_daemon
    with daemon.transport.raw_socket(30) as sock:
        sock.sendall(b"GET /ti")
        started = time.monotonic()
        data = sock.recv(1024)
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408") and 9 <= elapsed <= 13
