"""SSE power streams over real sockets: rate, filters, formats, keepalive, slow readers."""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, wait_until


def _collect(daemon: Daemon, path: str, seconds: float) -> list[dict[str, Any]]:
    events = []
    with daemon.client.stream(path) as stream:
        deadline = time.monotonic() + seconds
        for frame in stream.frames():
            if frame.startswith("data: "):
                import json

                events.append(json.loads(frame[6:]))
            if time.monotonic() >= deadline:
                break
    return events


def test_gpu_events_arrive_at_the_poll_rate(start_daemon: DaemonFactory, transport_kind: str) -> None:
    daemon = start_daemon("--simulate", "--gpu-power-poll-hz", "20", transport=transport_kind)
    events = _collect(daemon, "/gpu/stream_power", 2.0)
    assert 30 <= len(events) <= 44, len(events)  # 2 s at 20 Hz, with slack for a loaded CI box
    gaps = [b["timestamp_ms"] - a["timestamp_ms"] for a, b in zip(events, events[1:])]
    assert 40 <= statistics.median(gaps) <= 60
    assert all(set(e["power_mw"]) == {"0", "1", "2", "3"} for e in events)


def test_cpu_events_arrive_at_the_poll_rate(start_daemon: DaemonFactory, transport_kind: str) -> None:
    daemon = start_daemon("--simulate", "--cpu-power-poll-hz", "10", transport=transport_kind)
    events = _collect(daemon, "/cpu/stream_power", 2.0)
    assert 14 <= len(events) <= 23, len(events)
    assert all(e["power_mw"]["0"]["cpu_mw"] > 0 and e["power_mw"]["1"]["dram_mw"] is None for e in events)


def test_filters_and_formats(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate")
    with daemon.client.stream("/gpu/stream_power?gpu_ids=2") as s:
        assert all(set(e["power_mw"]) == {"2"} for e in s.events(3))
    with daemon.client.stream("/gpu/stream_power?gpu_ids=0,3&format=v0.5") as s:
        events = s.events(6)
    assert {e["gpu_id"] for e in events} == {0, 3}
    assert all(isinstance(e["power_mw"], int) and e["timestamp_ms"] > 0 for e in events)
    with daemon.client.stream("/cpu/stream_power?cpu_ids=1&format=v0.5") as s:
        event = s.events(1)[0]
    assert event["cpu_id"] == 1 and event["dram_mw"] is None
    assert set(event["power_mw"]) == {"1"}  # the snapshot 0.15.x clients read


def test_default_format_is_a_daemon_option(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate", "--stream-format", "v0.5")
    with daemon.client.stream("/gpu/stream_power?gpu_ids=1") as s:
        assert s.events(1)[0]["gpu_id"] == 1
    with daemon.client.stream("/gpu/stream_power?gpu_ids=1&format=v0.4") as s:
        assert set(s.events(1)[0]["power_mw"]) == {"1"}


def test_quiet_streams_get_keepalive_comments(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--simulate", "--sse-keepalive-s", "1")
    with daemon.client.stream("/gpu/stream_power?gpu_ids=") as s:  # subscribed to nothing
        started = time.monotonic()
        frame = next(s.frames())
        assert frame == ": keepalive"
        assert 0.8 <= time.monotonic() - started <= 3


def test_stalled_reader_is_dropped_while_others_keep_receiving(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon(
        "--simulate", "--gpu-power-poll-hz", "200", "--sse-stall-timeout-s", "2",
    )
    # A reader that never reads, with tiny buffers so the daemon's side fills up fast.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(str(daemon.transport.address))
    stalled.sendall(b"GET /gpu/stream_power?format=v0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    with daemon.client.stream("/gpu/stream_power?gpu_ids=0") as healthy:
        deadline = time.monotonic() + 30
        received = 0
        dropped = False
        for frame in healthy.frames():
            received += frame.startswith("data: ")
            if "Dropping a stream subscriber stalled" in daemon.log():
                dropped = True
                break
            assert time.monotonic() < deadline, "the stalled reader was never dropped"
        assert dropped and received > 100
        # The healthy stream still flows after the drop.
        assert len(healthy.events(5)) == 5
    # The stalled connection was closed by the daemon: draining it ends in EOF.
    stalled.settimeout(10)
    total = 0
    while chunk := stalled.recv(1 << 20):
        total += len(chunk)
    assert total > 0
    stalled.close()


def test_stalled_tcp_reader_at_a_normal_rate_is_noticed_within_seconds(start_daemon: DaemonFactory) -> None:
    """TCP autotuning would let the kernel queue megabytes (minutes at 20 Hz) before the stall clock starts."""
    daemon = start_daemon("--simulate", "--gpu-power-poll-hz", "20", "--sse-stall-timeout-s", "1", transport="tcp")
    # The client's own receive buffer is the client's business; keep it small to see the daemon's side.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", int(daemon.transport.address)))
    stalled.sendall(b"GET /gpu/stream_power HTTP/1.1\r\nHost: x\r\n\r\n")
    # Measured here: dropped after 12 s, the daemon's shrunk send buffer, twisted's bounded write buffer and
    # the client's 4 KiB receive buffer filling at 20 events/s (~11 s), then the 1 s stall timeout. With the
    # kernel's autotuned buffers the same reader goes unnoticed for minutes.
    try:
        wait_until(lambda: "Dropping a stream subscriber stalled" in daemon.log(), "the stalled reader's drop", 20)
    finally:
        stalled.close()


def test_one_shot_get_power_is_fresh(sim_daemon: Daemon) -> None:
    c = sim_daemon.client
    for _ in range(5):
        before = time.time() * 1000
        body = c.get("/gpu/get_power?gpu_ids=0").json()
        after = time.time() * 1000
        assert before - 2 <= body["timestamp_ms"] <= after + 2


@pytest.mark.parametrize("path", ["/gpu/stream_power", "/cpu/stream_power"])
def test_abrupt_disconnect_stops_the_poller(start_daemon: DaemonFactory, path: str) -> None:
    daemon = start_daemon("--simulate")
    for _ in range(3):
        s = daemon.client.stream(path)
        s.events(2)
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST, no goodbye
    deadline = time.monotonic() + 5
    kind = "GPU" if path.startswith("/gpu") else "CPU"
    while daemon.log().count(f"{kind} power poller stopped") < 3:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert daemon.log().count(f"{kind} power poller started") == 3


def test_a_stream_of_no_devices_sends_its_headers_at_once(sim_daemon: Daemon) -> None:
    """The client knows it is subscribed before anything is published (the first keepalive is 15 s away)."""
    started = time.monotonic()
    with sim_daemon.client.stream("/gpu/stream_power?gpu_ids=", timeout=5) as stream:
        assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
        assert time.monotonic() - started < 2
