"""HTTPS in TCP mode: a real TLS handshake, the key file guarded like the signing key."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
from pathlib import Path

import pytest
from tests.daemon import Daemon, Transport, free_tcp_port, run_zeusd, self_signed_cert


def test_https_serves_and_plain_http_does_not(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_tcp_port()
    daemon = Daemon(
        Transport("tcp", port), ["--simulate", "--tls-cert", str(cert), "--tls-key", str(key)], {}, tmp_path / "log"
    )
    daemon.start(wait=False)
    try:
        conn = _connect_https(port, ssl.create_default_context(cafile=str(cert)))
        conn.request("GET", "/gpu/get_power?gpu_ids=0")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200 and b'"power_mw":{"0":' in body
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/discover")
            plain.getresponse().read()
    finally:
        assert daemon.stop() == 0


def test_sse_streams_stay_encrypted(tmp_path: Path) -> None:
    """Stream frames go through the TLS layer too (they once bypassed it as plaintext)."""
    cert, key = self_signed_cert(tmp_path)
    port = free_tcp_port()
    daemon = Daemon(
        Transport("tcp", port), ["--simulate", "--tls-cert", str(cert), "--tls-key", str(key),
                                 "--gpu-power-poll-hz", "20", "--cpu-power-poll-hz", "20"], {}, tmp_path / "log"
    )
    daemon.start(wait=False)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        for path in ("/gpu/stream_power?gpu_ids=1", "/cpu/stream_power"):
            conn = _connect_https(port, context)
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
            events = []
            while len(events) < 3:
                line = response.readline()  # raises ssl.SSLError if a frame arrives unencrypted
                assert line, "stream ended"
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
            assert all("timestamp_ms" in e and "power_mw" in e for e in events)
            conn.close()
    finally:
        assert daemon.stop() == 0


def _connect_https(port: int, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    for _ in range(200):
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        try:
            conn.connect()
            return conn
        except OSError:
            time.sleep(0.05)
    raise AssertionError("daemon never accepted a TLS connection")


def test_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    os.chmod(key, 0o644)
    result = run_zeusd(
        ["serve", "--simulate", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}",
         "--tls-cert", str(cert), "--tls-key", str(key)]
    )
    assert result.returncode == 1 and f"chmod 600 {key}" in result.stderr


@pytest.mark.parametrize(
    "extra",
    [["--tls-cert", "c.pem"], ["--mode", "uds", "--tls-cert", "c.pem", "--tls-key", "k.pem"]],
)
def test_tls_flags_must_pair_with_tcp(extra: list[str]) -> None:
    args = ["serve", "--simulate", *(["--mode", "tcp"] if "--mode" not in extra else []), *extra]
    result = run_zeusd(args)
    assert result.returncode == 2 and "--tls" in result.stderr
