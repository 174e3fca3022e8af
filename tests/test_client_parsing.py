"""zeusd.client's pure parts: server addresses and the SSE stream of power events."""

from __future__ import annotations

import pytest

from zeusd.client import (
    DEFAULT_SOCKET_PATH, DevicePower, ServerAddress, SSEParser, ZeusdProtocolError, default_server, parse_power_event,
)


# --------------------------------------------------------------------------- addresses


def test_server_addresses_parse() -> None:
    assert ServerAddress.parse("unix:/run/z.sock") == ServerAddress("unix", path="/run/z.sock")
    assert ServerAddress.parse("unix:///run/z.sock").path == "/run/z.sock"
    assert ServerAddress.parse("/tmp/a.sock").label == "unix:/tmp/a.sock"
    tcp = ServerAddress.parse("node7:4938")
    assert (tcp.scheme, tcp.host, tcp.port, tcp.label) == ("http", "node7", 4938, "node7:4938")
    assert tcp.url("/time") == "http://node7:4938/time"
    v6 = ServerAddress.parse("[::1]:80")
    assert v6.host == "::1" and v6.url("/x") == "http://[::1]:80/x"
    tls = ServerAddress.parse("https://node7:443/")
    assert tls.scheme == "https" and tls.label == "https://node7:443"
    assert ServerAddress.parse("http://10.0.0.1:8").label == "10.0.0.1:8"
    assert ServerAddress("unix", path="/s").url("/time") == "http://localhost/time"
    refusals = {
        "unix:": "unix: needs a socket path",
        "node7": "'node7' is not unix:PATH, HOST:PORT or https://HOST:PORT",
        "node7:0": "bad port in 'node7:0'",
        "node7:99999": "bad port in 'node7:99999'",
        "::1:80": r"'::1:80' is not unix:PATH, HOST:PORT",
        "[::1]80": r"'\[::1\]80' is not \[IPv6\]:PORT",
        "host:port": "bad port in 'host:port'",
    }
    for bad, why in refusals.items():
        with pytest.raises(ValueError, match=why):
            ServerAddress.parse(bad)


def test_default_server_follows_the_official_client_env() -> None:
    assert default_server({}) == ServerAddress("unix", path=DEFAULT_SOCKET_PATH)
    assert default_server({"ZEUSD_HOST_PORT": "h:1"}) == ServerAddress("http", host="h", port=1)
    both = {"ZEUSD_SOCK_PATH": "/s.sock", "ZEUSD_HOST_PORT": "h:1"}
    assert default_server(both) == ServerAddress("unix", path="/s.sock")


# --------------------------------------------------------------------------- SSE parsing


def test_sse_parser_handles_any_chunking_comments_and_crlf() -> None:
    wire = (
        b'data: {"timestamp_ms":1,"power_mw":{"0":5}}\n\n'
        b": keepalive\n\n"
        b'data:{"timestamp_ms":2,"power_mw":{}}\r\n\r\n'
        b"id: 7\ndata: [1,\ndata: 2]\n\n"
    )
    expected = ['{"timestamp_ms":1,"power_mw":{"0":5}}', '{"timestamp_ms":2,"power_mw":{}}', "[1,\n2]"]
    for size in (1, 2, 3, 7, len(wire)):
        parser = SSEParser()
        out: list[str] = []
        for i in range(0, len(wire), size):
            out += parser.feed(wire[i : i + size])
        assert out == expected, size
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(ZeusdProtocolError, match="an SSE event exceeded 64 bytes"):
        parser.feed(b"data: " + b"x" * 100)


def test_power_events_of_both_formats() -> None:
    assert parse_power_event("gpu", {"timestamp_ms": 5, "power_mw": {"0": 1000, "2": 3000}}) == [
        DevicePower("gpu", 0, 5, 1000),
        DevicePower("gpu", 2, 5, 3000),
    ]
    assert parse_power_event("gpu", {"timestamp_ms": 5, "gpu_id": 3, "power_mw": 7}) == [DevicePower("gpu", 3, 5, 7)]
    snapshot = {"timestamp_ms": 9, "power_mw": {"0": {"cpu_mw": 4, "dram_mw": 1}, "1": {"cpu_mw": 6, "dram_mw": None}}}
    assert parse_power_event("cpu", snapshot) == [DevicePower("cpu", 0, 9, 4, 1), DevicePower("cpu", 1, 9, 6, None)]
    # Our v0.5 CPU events carry the snapshot too: the per-device fields win, no double count.
    hybrid = {"timestamp_ms": 9, "cpu_id": 1, "cpu_mw": 6, "dram_mw": None, **{"power_mw": snapshot["power_mw"]}}
    assert parse_power_event("cpu", hybrid) == [DevicePower("cpu", 1, 9, 6, None)]
    refusals: list[tuple[object, str]] = [
        ({}, "event has no integer timestamp_ms"),
        ({"timestamp_ms": 1}, "event has neither gpu_id nor a power_mw map"),
        ({"timestamp_ms": 1, "gpu_id": 0, "power_mw": "x"}, "malformed per-GPU event"),
        ([1], "event is not a JSON object"),
        ({"timestamp_ms": "1", "power_mw": {}}, "event has no integer timestamp_ms"),
    ]
    for bad, why in refusals:
        with pytest.raises(ValueError, match=why):
            parse_power_event("gpu", bad)
