"""Run a real zeusd process and talk HTTP to it over its real UNIX socket or TCP port.

Every integration test goes through this module: one way to start the daemon,
one small HTTP client (``http.client`` over either transport), one SSE reader.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from tests.interpreter import python_for

REPO = Path(__file__).resolve().parent.parent


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return str(self.json()["error"])


@dataclass
class Transport:
    """Where a daemon listens: ``unix`` with a path, or ``tcp`` with a port.

    A ``tcp`` transport with ``ca_file`` speaks HTTPS to 127.0.0.1, trusting
    that certificate (the daemon gets its ``--tls-cert``/``--tls-key`` in its args).
    ``host`` is what the daemon is told to bind (an IP address or a hostname) and
    what the client connects to.
    """

    kind: str
    address: str | int
    ca_file: str | None = None
    host: str = "127.0.0.1"

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        if self.kind == "unix":
            return UnixHTTPConnection(str(self.address), timeout)
        if self.ca_file is not None:
            return http.client.HTTPSConnection(self.host, int(self.address), timeout=timeout, context=self._tls())
        return http.client.HTTPConnection(self.host, int(self.address), timeout=timeout)

    def raw_socket(self, timeout: float = 10.0) -> socket.socket:
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(self.address))
            return sock
        sock = socket.create_connection((self.host, int(self.address)), timeout=timeout)
        return self._tls().wrap_socket(sock, server_hostname=self.host) if self.ca_file is not None else sock

    @property
    def serve_args(self) -> list[str]:
        if self.kind == "unix":
            return ["--mode", "uds", "--socket-path", str(self.address)]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ["--mode", "tcp", "--tcp-bind-address", f"{host}:{self.address}"]


class Client:
    def __init__(self, transport: Transport, token: str | None = None) -> None:
        self.transport = transport
        self.token = token

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, token: str | None = None
    ) -> Response:
        conn = self.transport.connection()
        try:
            all_headers = dict(headers or {})
            bearer = token if token is not None else self.token
            if bearer is not None:
                all_headers.setdefault("Authorization", f"Bearer {bearer}")
            if method == "POST":
                all_headers.setdefault("Content-Length", "0")
            conn.request(method, path, headers=all_headers)
            r = conn.getresponse()
            body = r.read()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    def stream(self, path: str, token: str | None = None, timeout: float = 10.0) -> "EventStream":
        return EventStream(self.transport, path, token if token is not None else self.token, timeout)


class EventStream:
    """A raw SSE reader: parses the chunked body into ``data:`` events and comments."""

    def __init__(self, transport: Transport, path: str, token: str | None, timeout: float) -> None:
        self.sock = transport.raw_socket(timeout)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n".encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        self._body = b""

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("stream closed")
            self._buffer += data
        head, _, self._buffer = self._buffer.partition(marker)
        return head

    def _next_chunk(self) -> bytes:
        size_line = self._read_until(b"\r\n")
        size = int(size_line, 16)
        while len(self._buffer) < size + 2:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("stream closed")
            self._buffer += data
        chunk, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        if size == 0:
            raise EOFError("stream ended")
        return chunk

    def frames(self) -> Iterator[str]:
        """Every SSE frame (event or comment) as text, without the blank line."""
        while True:
            while b"\n\n" not in self._body:
                self._body += self._next_chunk()
            frame, _, self._body = self._body.partition(b"\n\n")
            yield frame.decode()

    def events(self, count: int) -> list[Any]:
        """The next ``count`` data events, parsed (comments skipped)."""
        out: list[Any] = []
        for frame in self.frames():
            if frame.startswith("data: "):
                out.append(json.loads(frame[len("data: ") :]))
                if len(out) == count:
                    return out
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Daemon:
    """A zeusd subprocess; ``client`` talks to it."""

    transport: Transport
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    user: int | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "Daemon":
        env = {**os.environ, "ZEUSD_LOG_LEVEL": "debug", "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [python_for(self.user), "-m", "zeusd", "serve", *self.transport.serve_args, *self.args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self.user,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"zeusd exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.client.get("/discover").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"zeusd did not come up:\n{self.log()}")

    @property
    def client(self) -> Client:
        return Client(self.transport)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def run_zeusd(args: Sequence[str], env: Mapping[str, str] | None = None, user: int | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a zeusd command to completion (for CLI and startup-failure tests)."""
    return subprocess.run(
        [python_for(user), "-m", "zeusd", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        user=user,
    )


def unprivileged_user() -> int | None:
    """Who to run as to test non-root behaviour: nobody when we are root, else ourselves."""
    return 65534 if os.geteuid() == 0 else None


def unprivileged_command(args: Sequence[str]) -> tuple[list[str], int | None]:
    """argv and ``user=`` for running ``zeusd ARGS`` really as nobody (we are root) or as ourselves (we are not),
    with an interpreter that user can execute (tests/interpreter.py)."""
    user = unprivileged_user()
    return [python_for(user), "-m", "zeusd", *args], user


def euid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise AssertionError("no Uid line")


def wait_for_discover(client: Client, process: subprocess.Popen[Any], timeout: float = 30.0) -> dict[str, Any]:
    """/discover's answer once the daemon serves (plugin scanning can make the Twisted runners slow)."""

    def answer() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited early with {process.returncode}")
        try:
            r = client.get("/discover")
        except OSError:
            return None
        return dict(r.json()) if r.status == 200 else None

    return wait_until(answer, "the daemon to answer /discover", timeout)


#: How long a test's daemon gets to exit on SIGTERM: more than its own grace for queued commands (10 s).
TERMINATE_GRACE_S = 20.0


def terminate(daemon: Daemon) -> None:
    """End a test's daemon as production does, with SIGTERM, so it shuts down cleanly (and coverage saves
    its data); SIGKILL only once it has outlived TERMINATE_GRACE_S (then the TimeoutExpired is raised)."""
    if daemon.process is not None:
        end_process(daemon.process)


def end_process(process: subprocess.Popen[Any]) -> None:
    """:func:`terminate` for a process a test started itself (a runner, a socket-activated daemon)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise


T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], what: str = "condition", timeout: float = 10.0) -> T:
    """Poll ``condition`` until it returns something truthy (not None), and return that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def write_signing_key(path: Path, data: bytes | None = None, mode: int = 0o600) -> bytes:
    """A key file like the seed's recipe (base64 of 32 random bytes + LF) unless ``data`` is given."""
    data = base64.b64encode(os.urandom(32)) + b"\n" if data is None else data
    path.write_bytes(data)
    os.chmod(path, mode)
    return data


def issue_token(key: Path, *scopes: str, user: str = "tester", expires: str = "1h") -> str:
    """A token from the real ``zeusd token issue`` command."""
    args = ["token", "issue", "--signing-key-path", str(key), "--user", user, "--expires", expires]
    for scope in scopes:
        args += ["--scope", scope]
    done = run_zeusd(args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` and 127.0.0.1 and its key (mode 600): ``(cert, key)``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path
