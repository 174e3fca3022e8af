"""HTTPS in TCP mode: a real TLS handshake, the key file guarded like the signing key."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest
from tests.daemon import Daemon, Transport, free_tcp_port, run_zeusd, self_signed_cert


def tls_daemon(directory: Path, *args: str) -> Daemon:
    """A simulated daemon serving HTTPS on 127.0.0.1 with a fresh self-signed certificate, started and ready
    (its readiness probe is itself an HTTPS request that verifies the certificate)."""
    cert, key = self_signed_cert(directory)
    transport = Transport("tcp", free_tcp_port(), ca_file=str(cert))
    daemon = Daemon(transport, ["--simulate", "--tls-cert", str(cert), "--tls-key", str(key), *args], {}, directory / "log")
    return daemon.start()


def test_https_serves_and_plain_http_does_not(tmp_path: Path) -> None:
    daemon = tls_daemon(tmp_path)
    try:
        r = daemon.client.get("/gpu/get_power?gpu_ids=0")  # HTTPS, verifying the daemon's certificate
        assert r.status == 200 and b'"power_mw":{"0":' in r.body
        plain = http.client.HTTPConnection("127.0.0.1", int(daemon.transport.address), timeout=5)
        with pytest.raises(http.client.RemoteDisconnected):  # the TLS layer hangs up on plain HTTP
            plain.request("GET", "/discover")
            plain.getresponse().read()
    finally:
        assert daemon.stop() == 0


def test_sse_streams_stay_encrypted(tmp_path: Path) -> None:
    """Stream frames go through the TLS layer too (they once bypassed it as plaintext)."""
    daemon = tls_daemon(tmp_path, "--gpu-power-poll-hz", "20", "--cpu-power-poll-hz", "20")
    try:
        for path in ("/gpu/stream_power?gpu_ids=1", "/cpu/stream_power"):
            conn = daemon.transport.connection()
            assert isinstance(conn, http.client.HTTPSConnection)
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
            events: list[dict[str, object]] = []
            while len(events) < 3:
                line = response.readline()  # raises ssl.SSLError if a frame arrives unencrypted
                assert line, "stream ended"
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
            assert all("timestamp_ms" in e and "power_mw" in e for e in events)
            conn.close()
    finally:
        assert daemon.stop() == 0


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
