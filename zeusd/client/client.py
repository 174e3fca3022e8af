"""An asynchronous client for zeusd, on treq and Twisted.

Three layers, each usable on its own:

* :class:`ZeusdClient` — one daemon (UNIX socket, HTTP or HTTPS): every
  endpoint of the API as a coroutine returning a typed result, errors raised as
  :class:`ZeusdError` carrying the daemon's own message and HTTP status.
* :class:`PowerStream` — one open ``/gpu/stream_power`` or ``/cpu/stream_power``
  response, parsed from either SSE event format (v0.4 snapshots or v0.5
  per-device events) into :class:`DevicePower` samples; ``async for`` or a
  callback.
* :class:`MultiPowerStream` — many daemons at once: each daemon's clock offset
  measured with ``/time`` (as the official zeus client does), streams
  reconnected with capped exponential backoff when a daemon restarts, and the
  readings merged into one sequence of :class:`PowerReading` stamped on the
  client's clock.

Servers are written ``unix:/path/to.sock`` (or just an absolute path),
``host:port``, ``[v6]:port``, ``http://host:port`` or ``https://host:port``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Iterable, Literal, Mapping, Sequence, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, ensureDeferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from zeusd.options import DEFAULT_SOCKET_PATH

log = Logger()

#: Every one-shot request is given up after this long (the official client's httpx default).
DEFAULT_TIMEOUT_S = 5.0
#: An SSE frame larger than this is not a zeusd event: the stream is abandoned.
MAX_EVENT_BYTES = 1 << 20

DeviceKind = Literal["gpu", "cpu"]
KINDS: tuple[DeviceKind, ...] = ("gpu", "cpu")
T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class ZeusdError(Exception):
    """Anything that went wrong talking to a daemon.

    ``status`` is the HTTP status (``None`` when no response arrived) and
    ``message`` the daemon's JSON ``error`` text (or the joined ``errors`` map).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message = message
        self.status = status


class ZeusdConnectionError(ZeusdError):
    """No answer: the daemon is down, unreachable, too slow, or dropped the connection."""


class ZeusdHTTPError(ZeusdError):
    """The daemon answered with an error status.

    ``errors`` holds per-device failures (``{"errors": {"0": "..."}}``) keyed by
    device id; ``body`` is the raw response body.
    """

    def __init__(self, status: int, message: str, errors: Mapping[int, str] | None = None, body: bytes = b"") -> None:
        super().__init__(message, status)
        self.status: int = status
        self.errors: dict[int, str] = dict(errors or {})
        self.body = body


class ZeusdAuthError(ZeusdHTTPError):
    """401 (no or bad token) or 403 (token lacks the scope): retrying will not help."""


class ZeusdProtocolError(ZeusdError):
    """The daemon's answer is not what the API says it should be."""


def _error_from_response(status: int, body: bytes) -> ZeusdHTTPError:
    message = body.decode("utf-8", "replace").strip()
    errors: dict[int, str] = {}
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        if isinstance(payload.get("error"), str):
            message = payload["error"]
        elif isinstance(payload.get("errors"), dict):
            errors = {int(k): str(v) for k, v in payload["errors"].items() if str(k).isdigit()}
            message = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    if not message:
        message = f"HTTP {status} with an empty body"
    cls = ZeusdAuthError if status in (401, 403) else ZeusdHTTPError
    return cls(status, message, errors, body)


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class ServerAddress:
    """Where a daemon listens: a UNIX socket path, or a host and port over HTTP(S)."""

    scheme: Literal["unix", "http", "https"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "ServerAddress":
        """``unix:PATH``, an absolute path, ``HOST:PORT``, ``[V6]:PORT``, ``http(s)://HOST:PORT``."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if path.startswith("//"):  # unix:///run/zeusd.sock
                path = path[2:]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/var/run/zeusd.sock")
            return cls("unix", path=path)
        if text.startswith("/"):
            return cls("unix", path=text)
        scheme: Literal["http", "https"] = "http"
        for prefix in ("http://", "https://"):
            if text.startswith(prefix):
                scheme = "https" if prefix == "https://" else "http"
                text = text[len(prefix) :].rstrip("/")
                break
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"{text!r} is not [IPv6]:PORT")
            port_text = rest[1:]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host:
                raise ValueError(f"{text!r} is not unix:PATH, HOST:PORT or https://HOST:PORT")
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"bad port in {text!r}")
        return cls(scheme, host=host, port=int(port_text))

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """How the server is named in readings and output."""
        if self.scheme == "unix":
            return f"unix:{self.path}"
        return f"https://{self.netloc}" if self.scheme == "https" else self.netloc

    def url(self, path: str) -> str:
        if self.scheme == "unix":
            return f"http://localhost{path}"  # the Host header the official client sends
        return f"{self.scheme}://{self.netloc}{path}"

    def __str__(self) -> str:
        return self.label


def default_server(environ: Mapping[str, str] | None = None) -> ServerAddress:
    """Like ``ZeusdConfig.from_env()``: ``$ZEUSD_SOCK_PATH`` wins, then ``$ZEUSD_HOST_PORT``, else the default socket."""
    env = os.environ if environ is None else environ
    if env.get("ZEUSD_SOCK_PATH"):
        return ServerAddress("unix", path=env["ZEUSD_SOCK_PATH"])
    if env.get("ZEUSD_HOST_PORT"):
        return ServerAddress.parse(env["ZEUSD_HOST_PORT"])
    return ServerAddress("unix", path=DEFAULT_SOCKET_PATH)


def _address(server: ServerAddress | str | None) -> ServerAddress:
    if server is None:
        return default_server()
    return server if isinstance(server, ServerAddress) else ServerAddress.parse(server)


@implementer(IAgentEndpointFactory)
class _UnixEndpointFactory:
    """Every URI goes to the one UNIX socket (the URL's host is only the Host header)."""

    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=int(max(1, self._timeout)))


@implementer(IPolicyForHTTPS)
class _TrustRootPolicy:
    """HTTPS verified against the given CA certificates instead of the system store."""

    def __init__(self, ca_file: str) -> None:
        with open(ca_file, "rb") as f:
            pem = f.read()
        marker = b"-----END CERTIFICATE-----"
        blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
        if not blocks:
            raise ValueError(f"{ca_file}: no PEM certificate found")
        self._trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(hostname.decode("idna"), trustRoot=self._trust)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GpuInfo:
    id: int
    name: str | None = None
    pci_address: str | None = None
    cumulative_energy_available: bool | None = None


@dataclass(frozen=True)
class CpuInfo:
    id: int
    dram_available: bool


@dataclass(frozen=True)
class Discovery:
    """``GET /discover``, from either generation of keys (v0.5 objects preferred)."""

    gpus: tuple[GpuInfo, ...]
    cpus: tuple[CpuInfo, ...]
    enabled_api_groups: tuple[str, ...]
    auth_required: bool

    @property
    def gpu_ids(self) -> list[int]:
        return [g.id for g in self.gpus]

    @property
    def cpu_ids(self) -> list[int]:
        return [c.id for c in self.cpus]

    @property
    def dram_available(self) -> list[bool]:
        return [c.dram_available for c in self.cpus]

    def enabled(self, group: str) -> bool:
        return group in self.enabled_api_groups

    @classmethod
    def from_json(cls, body: Any) -> "Discovery":
        if not isinstance(body, dict):
            raise ZeusdProtocolError(f"/discover answered {type(body).__name__}, not an object")
        if isinstance(body.get("gpus"), list):
            gpus = tuple(
                GpuInfo(int(g["id"]), g.get("name"), g.get("pci_address"), g.get("cumulative_energy_available"))
                for g in body["gpus"]
            )
        else:
            gpus = tuple(GpuInfo(int(i)) for i in body.get("gpu_ids", []))
        if isinstance(body.get("cpus"), list):
            cpus = tuple(CpuInfo(int(c["id"]), bool(c.get("dram_available", False))) for c in body["cpus"])
        else:
            dram = list(body.get("dram_available", []))
            cpus = tuple(
                CpuInfo(int(i), bool(dram[n]) if n < len(dram) else False)
                for n, i in enumerate(body.get("cpu_ids", []))
            )
        return cls(gpus, cpus, tuple(body.get("enabled_api_groups", [])), bool(body.get("auth_required", False)))


@dataclass(frozen=True)
class WhoAmI:
    sub: str
    scopes: tuple[str, ...]
    exp: int | None = None


@dataclass(frozen=True)
class ClockOffset:
    """How far the daemon's clock is behind ours: add ``offset_s`` to its timestamps."""

    offset_s: float
    round_trip_s: float
    samples: tuple[float, ...]


@dataclass(frozen=True)
class GpuPower:
    """``GET /gpu/get_power``: mW per GPU; GPUs that could not be read are in ``errors``."""

    timestamp_ms: int
    power_mw: dict[int, int]
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def watts(self) -> dict[int, float]:
        return {i: mw / 1000 for i, mw in self.power_mw.items()}


@dataclass(frozen=True)
class CpuPackagePower:
    cpu_mw: int
    dram_mw: int | None


@dataclass(frozen=True)
class CpuPower:
    """``GET /cpu/get_power``: package and DRAM mW per CPU package."""

    timestamp_ms: int
    power_mw: dict[int, CpuPackagePower]
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuEnergy:
    energy_mj: int


@dataclass(frozen=True)
class CpuEnergy:
    cpu_energy_uj: int | None
    dram_energy_uj: int | None


@dataclass(frozen=True)
class PowerLimit:
    power_limit_mw: int


@dataclass(frozen=True)
class PowerLimitConstraints:
    min_power_limit_mw: int
    max_power_limit_mw: int


@dataclass(frozen=True)
class PersistenceMode:
    enabled: bool


@dataclass(frozen=True)
class DevicePower:
    """One device's power from a stream event, on the daemon's clock."""

    kind: DeviceKind
    index: int
    timestamp_ms: int
    power_mw: int
    dram_mw: int | None = None

    @property
    def watts(self) -> float:
        return self.power_mw / 1000


def _id_map(body: Any, what: str) -> dict[int, Any]:
    if not isinstance(body, dict):
        raise ZeusdProtocolError(f"{what}: expected an object keyed by device id")
    try:
        return {int(k): v for k, v in body.items()}
    except ValueError:
        raise ZeusdProtocolError(f"{what}: a key is not a device id: {sorted(body)}") from None


def _ids_param(ids: int | Iterable[int]) -> str:
    return str(ids) if isinstance(ids, int) else ",".join(str(int(i)) for i in ids)


def _bool_param(value: bool) -> str:
    return "true" if value else "false"


def _cpu_entry(value: Any) -> CpuPackagePower:
    return CpuPackagePower(int(value["cpu_mw"]), None if value.get("dram_mw") is None else int(value["dram_mw"]))


def _errors(body: Mapping[str, Any]) -> dict[int, str]:
    return {int(k): str(v) for k, v in (body.get("errors") or {}).items()}


# --------------------------------------------------------------------------- SSE


class SSEParser:
    """Splits an SSE byte stream into the payloads of its ``data:`` fields.

    Events end at a blank line; comment lines (``: keepalive``) and other
    fields are ignored; CRLF is accepted though zeusd only writes LF.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[str]:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        payloads: list[str] = []
        while True:
            frame, sep, rest = self._buffer.partition(b"\n\n")
            if not sep:
                break
            self._buffer = rest
            lines = [line[5:] for line in frame.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(l[1:] if l.startswith(b" ") else l for l in lines).decode("utf-8", "replace"))
        if len(self._buffer) > self._max:
            raise ZeusdProtocolError(f"an SSE event exceeded {self._max} bytes")
        return payloads


def parse_power_event(kind: DeviceKind, event: Any) -> list[DevicePower]:
    """One decoded event → its device samples; both wire formats.

    v0.4: ``{"timestamp_ms":T,"power_mw":{"0":151234}}`` (GPU) or
    ``{"power_mw":{"0":{"cpu_mw":..,"dram_mw":..}}}`` (CPU).
    v0.5: ``{"timestamp_ms":T,"gpu_id":0,"power_mw":151234}`` or
    ``{"timestamp_ms":T,"cpu_id":0,"cpu_mw":..,"dram_mw":..}`` (our CPU events also
    carry the v0.4 snapshot under ``power_mw``; the per-device fields win, so a
    package is never counted twice). Raises ValueError for anything else.
    """
    if not isinstance(event, dict):
        raise ValueError("event is not a JSON object")
    ts = event.get("timestamp_ms")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ValueError("event has no integer timestamp_ms")
    id_key = "gpu_id" if kind == "gpu" else "cpu_id"
    if id_key in event:
        index = event[id_key]
        if kind == "gpu":
            mw = event.get("power_mw")
            if not isinstance(index, int) or not isinstance(mw, (int, float)) or isinstance(mw, bool):
                raise ValueError("malformed per-GPU event")
            return [DevicePower("gpu", index, ts, int(mw))]
        cpu_mw, dram_mw = event.get("cpu_mw"), event.get("dram_mw")
        if not isinstance(index, int) or not isinstance(cpu_mw, (int, float)) or isinstance(cpu_mw, bool):
            raise ValueError("malformed per-CPU event")
        if dram_mw is not None and not isinstance(dram_mw, (int, float)):
            raise ValueError("malformed per-CPU event: dram_mw")
        return [DevicePower("cpu", index, ts, int(cpu_mw), None if dram_mw is None else int(dram_mw))]
    snapshot = event.get("power_mw")
    if not isinstance(snapshot, dict):
        raise ValueError(f"event has neither {id_key} nor a power_mw map")
    samples = []
    for key, value in snapshot.items():
        if kind == "gpu":
            samples.append(DevicePower("gpu", int(key), ts, int(value)))
        else:
            entry = _cpu_entry(value)
            samples.append(DevicePower("cpu", int(key), ts, entry.cpu_mw, entry.dram_mw))
    return samples


class _Channel(Generic[T]):
    """A queue with one asynchronous reader and an end (clean or failed).

    ``high``/``low`` watermarks call ``pause``/``resume`` so a slow reader
    throttles the socket instead of growing memory; with ``drop_oldest`` a
    full channel forgets its oldest items instead (for lossy monitoring).
    """

    def __init__(
        self,
        high: int = 10_000,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        drop_oldest: bool = False,
    ) -> None:
        self._items: deque[T] = deque()
        self._high = high
        self._pause, self._resume = pause, resume
        self._paused = False
        self._drop_oldest = drop_oldest
        self._waiter: Deferred[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self.dropped = 0

    @property
    def ended(self) -> bool:
        return self._ended

    def put(self, item: T) -> None:
        if self._ended:
            return
        if self._drop_oldest and len(self._items) >= self._high:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        if not self._drop_oldest and not self._paused and len(self._items) >= self._high and self._pause:
            self._paused = True
            self._pause()
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def get(self) -> T:
        """The next item; StopAsyncIteration after a clean end, the error after a failed one."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            waiter: Deferred[None] = Deferred(lambda d: setattr(self, "_waiter", None))
            self._waiter = waiter
            await waiter
        item = self._items.popleft()
        if self._paused and len(self._items) <= self._high // 2 and self._resume:
            self._paused = False
            self._resume()
        return item


class _SSEProtocol(Protocol):
    """Receives the response body of a stream and feeds the parser."""

    def __init__(self, stream: "PowerStream") -> None:
        self._stream = stream

    def dataReceived(self, data: bytes) -> None:
        self._stream._data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._stream._lost(reason)


class PowerStream:
    """An open power stream of one daemon: ``async for sample in stream`` or ``await stream.run(cb)``.

    Yields :class:`DevicePower` samples in arrival order (one per device per
    event). Ends cleanly after :meth:`close` or when the daemon ends the
    response; raises :class:`ZeusdConnectionError` when the connection is lost
    or nothing (not even a keepalive comment) arrives for ``idle_timeout_s``.
    """

    def __init__(self, kind: DeviceKind, response: Any, reactor: Any, idle_timeout_s: float | None = None) -> None:
        self.kind = kind
        self.events = 0
        self.malformed = 0
        self._reactor = reactor
        self._parser = SSEParser()
        self._protocol = _SSEProtocol(self)
        self._channel: _Channel[DevicePower] = _Channel(pause=self._pause, resume=self._resume)
        self._idle_timeout_s = idle_timeout_s
        self._idle_call: IDelayedCall | None = None
        self._closing = False
        #: Called once when the stream ends (the client forgets it then).
        self.on_end: Callable[[], Any] | None = None
        self._arm_idle_timer()
        response.deliverBody(self._protocol)

    def _transport(self) -> Any:
        return getattr(self._protocol, "transport", None)

    def _pause(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()

    def _resume(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resumeProducing()

    def _arm_idle_timer(self) -> None:
        if self._idle_timeout_s is None or self._channel.ended:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout_s)
        else:
            self._idle_call = self._reactor.callLater(self._idle_timeout_s, self._idle)

    def _idle(self) -> None:
        self._finish(ZeusdConnectionError(f"{self.kind} stream silent for {self._idle_timeout_s:g} s"))

    def _data(self, data: bytes) -> None:
        self._arm_idle_timer()
        try:
            payloads = self._parser.feed(data)
        except ZeusdProtocolError as e:
            self._finish(e)
            return
        for payload in payloads:
            try:
                samples = parse_power_event(self.kind, json.loads(payload))
            except (ValueError, TypeError, KeyError) as e:
                self.malformed += 1
                log.warn("Skipping a malformed {kind} SSE event ({error}): {payload!r}", kind=self.kind, error=e, payload=payload[:200])
                continue
            self.events += 1
            for sample in samples:
                self._channel.put(sample)

    def _lost(self, reason: Failure) -> None:
        if self._closing or reason.check(ResponseDone):
            self._finish(None)
        else:
            self._finish(ZeusdConnectionError(f"{self.kind} stream lost: {reason.getErrorMessage()}"))

    def _finish(self, error: BaseException | None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        if self._channel.ended:
            return
        self._channel.end(error)
        if error is not None:
            self._abort()
        if self.on_end is not None:
            self.on_end()

    def _abort(self) -> None:
        transport = self._transport()
        if transport is not None:
            try:
                transport.stopProducing()
            except Exception:  # already gone
                pass

    def close(self) -> None:
        """Stop reading and drop the connection; the iteration ends cleanly."""
        self._closing = True
        self._finish(None)
        self._abort()

    def __aiter__(self) -> "PowerStream":
        return self

    async def __anext__(self) -> DevicePower:
        return await self._channel.get()

    async def run(self, callback: Callable[[DevicePower], Any]) -> None:
        """Call ``callback`` for every sample until the stream ends (or raise its error)."""
        async for sample in self:
            callback(sample)


# --------------------------------------------------------------------------- one daemon


class ZeusdClient:
    """Talks to one daemon; every endpoint of the API is one coroutine.

    ``token`` defaults to ``$ZEUSD_TOKEN``; ``server`` to ``$ZEUSD_SOCK_PATH`` /
    ``$ZEUSD_HOST_PORT`` / the default socket. ``ca_file`` verifies HTTPS
    against the given PEM certificates instead of the system's trust store.
    Use as ``async with ZeusdClient(...) as client:`` or call :meth:`close`.
    """

    def __init__(
        self,
        server: ServerAddress | str | None = None,
        token: str | None = None,
        *,
        reactor: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server = _address(server)
        self.token = token if token is not None else (os.environ.get("ZEUSD_TOKEN") or None)
        self.timeout_s = timeout_s
        self.discovery: Discovery | None = None
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = True
        self._streams: set[PowerStream] = set()
        if self.server.scheme == "unix":
            agent = Agent.usingEndpointFactory(
                reactor, _UnixEndpointFactory(reactor, self.server.path, timeout_s), pool=self._pool
            )
        elif self.server.scheme == "https" and ca_file is not None:
            agent = Agent(reactor, contextFactory=_TrustRootPolicy(ca_file), connectTimeout=timeout_s, pool=self._pool)
        else:
            agent = Agent(reactor, connectTimeout=timeout_s, pool=self._pool)
        self._http = HTTPClient(agent)

    @property
    def label(self) -> str:
        return self.server.label

    async def __aenter__(self) -> "ZeusdClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close open streams and cached connections."""
        for stream in list(self._streams):
            stream.close()
        self._streams.clear()
        await self._pool.closeCachedConnections()

    # ------------------------------------------------------------------ HTTP

    def _headers(self) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {b"Accept": [b"application/json"]}
        if self.token:
            headers[b"Authorization"] = [f"Bearer {self.token}".encode()]
        return headers

    async def _send(self, method: str, path: str, params: Mapping[str, str] | None, unbuffered: bool) -> Any:
        headers = self._headers()  # a body-less POST gets Content-Length: 0 from the Agent itself
        try:
            return await self._http.request(
                method,
                self.server.url(path),
                params=dict(params or {}),
                headers=headers,
                allow_redirects=False,
                unbuffered=unbuffered,
                reactor=self._reactor,
            )
        except CancelledError:
            raise
        except ZeusdError:
            raise
        except Exception as e:  # connection refused, reset, TLS failure...
            raise ZeusdConnectionError(f"{self.label}: {_describe(e)}") from e

    async def _exchange(self, method: str, path: str, params: Mapping[str, str] | None) -> tuple[int, bytes]:
        response = await self._send(method, path, params, unbuffered=False)
        try:
            body = await treq.content(response)
        except Exception as e:
            raise ZeusdConnectionError(f"{self.label}: {path}: {_describe(e)}") from e
        return int(response.code), body

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """One request with the client's timeout; the body of a 200, else :class:`ZeusdHTTPError`."""
        d = ensureDeferred(self._exchange(method, path, params))
        d.addTimeout(self.timeout_s, self._reactor)
        try:
            status, body = await d
        except (CancelledError, TwistedTimeoutError):
            raise ZeusdConnectionError(f"{self.label}: {method} {path}: no answer within {self.timeout_s:g} s") from None
        if status != 200:
            raise _error_from_response(status, body)
        return body

    async def _get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        body = await self.request("GET", path, params)
        try:
            return json.loads(body)
        except ValueError:
            raise ZeusdProtocolError(f"{self.label}: {path} did not answer JSON: {body[:200]!r}") from None

    # ------------------------------------------------------------------ server

    async def discover(self) -> Discovery:
        """``GET /discover`` (cached on ``self.discovery``)."""
        self.discovery = Discovery.from_json(await self._get_json("/discover"))
        return self.discovery

    async def get_time_ms(self) -> int:
        """``GET /time``: the daemon's wall clock in ms."""
        return int((await self._get_json("/time"))["timestamp_ms"])

    async def clock_offset(self, samples: int = 5) -> ClockOffset:
        """The daemon's clock offset as zeus measures it (median of ``samples`` /time round trips).

        For each: ``offset = (t_send + t_receive) / 2 − daemon_time``; positive
        means the daemon's clock is behind ours.
        """
        offsets: list[float] = []
        trips: list[float] = []
        for _ in range(max(1, samples)):
            sent = time.time()
            daemon_ms = await self.get_time_ms()
            received = time.time()
            offsets.append((sent + received) / 2 - daemon_ms / 1000)
            trips.append(received - sent)
        return ClockOffset(statistics.median(offsets), statistics.median(trips), tuple(offsets))

    async def whoami(self) -> WhoAmI:
        """``GET /auth/whoami``: who the token belongs to (404 when the daemon has no auth)."""
        body = await self._get_json("/auth/whoami")
        exp = body.get("exp")
        return WhoAmI(str(body["sub"]), tuple(body.get("scopes", [])), None if exp is None else int(exp))

    # ------------------------------------------------------------------ gpu-control

    async def _control(self, name: str, gpu_ids: int | Iterable[int], block: bool, **extra: str) -> None:
        params = {"gpu_ids": _ids_param(gpu_ids), **extra, "block": _bool_param(block)}
        await self.request("POST", f"/gpu/{name}", params)

    async def set_persistence_mode(self, gpu_ids: int | Iterable[int], enabled: bool, block: bool = True) -> None:
        await self._control("set_persistence_mode", gpu_ids, block, enabled=_bool_param(enabled))

    async def set_power_limit(self, gpu_ids: int | Iterable[int], power_limit_mw: int, block: bool = True) -> None:
        await self._control("set_power_limit", gpu_ids, block, power_limit_mw=str(int(power_limit_mw)))

    async def set_gpu_locked_clocks(
        self, gpu_ids: int | Iterable[int], min_clock_mhz: int, max_clock_mhz: int, block: bool = True
    ) -> None:
        await self._control(
            "set_gpu_locked_clocks", gpu_ids, block, min_clock_mhz=str(int(min_clock_mhz)), max_clock_mhz=str(int(max_clock_mhz))
        )

    async def reset_gpu_locked_clocks(self, gpu_ids: int | Iterable[int], block: bool = True) -> None:
        await self._control("reset_gpu_locked_clocks", gpu_ids, block)

    async def set_mem_locked_clocks(
        self, gpu_ids: int | Iterable[int], min_clock_mhz: int, max_clock_mhz: int, block: bool = True
    ) -> None:
        await self._control(
            "set_mem_locked_clocks", gpu_ids, block, min_clock_mhz=str(int(min_clock_mhz)), max_clock_mhz=str(int(max_clock_mhz))
        )

    async def reset_mem_locked_clocks(self, gpu_ids: int | Iterable[int], block: bool = True) -> None:
        await self._control("reset_mem_locked_clocks", gpu_ids, block)

    async def reset_locked_clocks(self, gpu_ids: int | Iterable[int], block: bool = True) -> None:
        """Both GPU and memory locked clocks (``/gpu/reset_locked_clocks``, ours)."""
        await self._control("reset_locked_clocks", gpu_ids, block)

    # ------------------------------------------------------------------ gpu-read

    @staticmethod
    def _optional_ids(name: str, ids: int | Iterable[int] | None) -> dict[str, str]:
        return {} if ids is None else {name: _ids_param(ids)}

    async def get_gpu_power(self, gpu_ids: int | Iterable[int] | None = None) -> GpuPower:
        body = await self._get_json("/gpu/get_power", self._optional_ids("gpu_ids", gpu_ids))
        power = _id_map(body.get("power_mw"), "/gpu/get_power")
        return GpuPower(int(body["timestamp_ms"]), {i: int(v) for i, v in power.items()}, _errors(body))

    async def _gpu_map(self, path: str, gpu_ids: int | Iterable[int] | None) -> dict[int, Any]:
        return _id_map(await self._get_json(path, self._optional_ids("gpu_ids", gpu_ids)), path)

    async def get_gpu_energy(self, gpu_ids: int | Iterable[int] | None = None) -> dict[int, GpuEnergy]:
        """Cumulative energy per GPU in mJ since the driver loaded."""
        body = await self._gpu_map("/gpu/get_cumulative_energy", gpu_ids)
        return {i: GpuEnergy(int(v["energy_mj"])) for i, v in body.items()}

    async def get_power_limit(self, gpu_ids: int | Iterable[int] | None = None) -> dict[int, PowerLimit]:
        body = await self._gpu_map("/gpu/get_power_limit", gpu_ids)
        return {i: PowerLimit(int(v["power_limit_mw"])) for i, v in body.items()}

    async def get_power_limit_constraints(
        self, gpu_ids: int | Iterable[int] | None = None
    ) -> dict[int, PowerLimitConstraints]:
        body = await self._gpu_map("/gpu/get_power_limit_constraints", gpu_ids)
        return {
            i: PowerLimitConstraints(int(v["min_power_limit_mw"]), int(v["max_power_limit_mw"])) for i, v in body.items()
        }

    async def get_persistence_mode(self, gpu_ids: int | Iterable[int] | None = None) -> dict[int, PersistenceMode]:
        body = await self._gpu_map("/gpu/get_persistence_mode", gpu_ids)
        return {i: PersistenceMode(bool(v["enabled"])) for i, v in body.items()}

    # ------------------------------------------------------------------ cpu-read

    async def get_cpu_energy(
        self, cpu_ids: int | Iterable[int] | None = None, cpu: bool = True, dram: bool = True
    ) -> dict[int, CpuEnergy]:
        """Cumulative package/DRAM energy in µJ (``None`` where not asked for or absent)."""
        params = {**self._optional_ids("cpu_ids", cpu_ids), "cpu": _bool_param(cpu), "dram": _bool_param(dram)}
        body = _id_map(await self._get_json("/cpu/get_cumulative_energy", params), "/cpu/get_cumulative_energy")
        return {
            i: CpuEnergy(
                None if v.get("cpu_energy_uj") is None else int(v["cpu_energy_uj"]),
                None if v.get("dram_energy_uj") is None else int(v["dram_energy_uj"]),
            )
            for i, v in body.items()
        }

    async def get_cpu_power(self, cpu_ids: int | Iterable[int] | None = None) -> CpuPower:
        body = await self._get_json("/cpu/get_power", self._optional_ids("cpu_ids", cpu_ids))
        power = _id_map(body.get("power_mw"), "/cpu/get_power")
        return CpuPower(int(body["timestamp_ms"]), {i: _cpu_entry(v) for i, v in power.items()}, _errors(body))

    # ------------------------------------------------------------------ streams

    async def stream_power(
        self,
        kind: DeviceKind,
        ids: int | Iterable[int] | None = None,
        *,
        format: str | None = None,
        idle_timeout_s: float | None = None,
    ) -> PowerStream:
        """Open ``/<kind>/stream_power``; errors before the stream starts are raised here.

        ``format`` (``v0.4``/``v0.5``) asks for an event format; by default the
        daemon's ``--stream-format`` applies. Both are parsed.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        params = self._optional_ids(f"{kind}_ids", ids)
        if format is not None:
            params["format"] = format
        path = f"/{kind}/stream_power"
        d = ensureDeferred(self._send("GET", path, params, unbuffered=True))
        d.addTimeout(self.timeout_s, self._reactor)
        try:
            response = await d
        except (CancelledError, TwistedTimeoutError):
            raise ZeusdConnectionError(f"{self.label}: {path}: no answer within {self.timeout_s:g} s") from None
        if response.code != 200:
            body = await treq.content(response)
            raise _error_from_response(int(response.code), body)
        stream = PowerStream(kind, response, self._reactor, idle_timeout_s)
        self._streams.add(stream)
        stream.on_end = lambda: self._streams.discard(stream)
        if stream._channel.ended:  # the body ended while being handed over
            self._streams.discard(stream)
        return stream

    async def stream_gpu_power(self, gpu_ids: int | Iterable[int] | None = None, **kw: Any) -> PowerStream:
        return await self.stream_power("gpu", gpu_ids, **kw)

    async def stream_cpu_power(self, cpu_ids: int | Iterable[int] | None = None, **kw: Any) -> PowerStream:
        return await self.stream_power("cpu", cpu_ids, **kw)


def _describe(e: BaseException) -> str:
    """A readable one-liner for Twisted's nested connection errors."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    text = str(e) or type(e).__name__
    return text


# --------------------------------------------------------------------------- many daemons


@dataclass(frozen=True)
class PowerReading:
    """One device's power from one daemon, stamped on this machine's clock."""

    server: str
    kind: DeviceKind
    index: int
    watts: float
    timestamp: float  # seconds since the epoch, corrected by the daemon's clock offset
    dram_watts: float | None = None
    daemon_timestamp_ms: int = 0  # as the daemon stamped it, on its own clock

    @property
    def total_watts(self) -> float:
        """Package plus DRAM for CPUs; the GPU's power for GPUs."""
        return self.watts + (self.dram_watts or 0.0)


@dataclass
class ServerStatus:
    """What the multi-stream knows about one daemon (for display and tests)."""

    server: str
    state: Literal["connecting", "streaming", "backoff", "failed", "stopped"] = "connecting"
    error: str | None = None
    offset: ClockOffset | None = None
    discovery: Discovery | None = None
    kinds: tuple[DeviceKind, ...] = ()
    connects: int = 0
    retry_in_s: float | None = None


class MultiPowerStream:
    """Power of every GPU and CPU package of many daemons, as one stream.

    For each daemon: ``/discover``, the clock offset (median of five ``/time``
    round trips), then one stream per device kind that the daemon serves. When
    a stream ends or fails (daemon restarted, network gone, nothing heard for
    ``idle_timeout_s``), the daemon is retried after ``backoff_initial_s``,
    doubling up to ``backoff_max_s``, reset once readings flow again; the offset
    is measured anew on every connection. 401/403 stop that daemon for good.

    Readings are delivered in arrival order through ``async for``, the
    ``on_reading`` callback, and ``latest`` (newest per device; a daemon's
    entries are removed while it is disconnected). The iteration buffer keeps
    at most ``max_buffered`` readings (oldest dropped), so a consumer that only
    uses the callback or ``latest`` costs no memory.
    """

    def __init__(
        self,
        servers: Sequence[ServerAddress | str],
        token: str | None = None,
        *,
        reactor: Any = None,
        kinds: Sequence[DeviceKind] = KINDS,
        format: str | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        idle_timeout_s: float | None = 45.0,
        clock_samples: int = 5,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
        on_reading: Callable[[PowerReading], Any] | None = None,
        on_status: Callable[[ServerStatus], Any] | None = None,
        max_buffered: int = 100_000,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if not servers:
            raise ValueError("at least one server is needed")
        self._reactor = reactor
        self._clients = [
            ZeusdClient(s, token, reactor=reactor, timeout_s=timeout_s, ca_file=ca_file) for s in servers
        ]
        labels = [c.label for c in self._clients]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a server is listed twice: {labels}")
        self.kinds = tuple(kinds)
        self.format = format
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.idle_timeout_s = idle_timeout_s
        self.clock_samples = clock_samples
        self.on_reading = on_reading
        self.on_status = on_status
        self.status: dict[str, ServerStatus] = {label: ServerStatus(label) for label in labels}
        self.latest: dict[tuple[str, DeviceKind, int], PowerReading] = {}
        self._channel: _Channel[PowerReading] = _Channel(high=max_buffered, drop_oldest=True)
        self._workers: list[Deferred[None]] = []
        self._running = False

    @property
    def servers(self) -> list[str]:
        return list(self.status)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for client in self._clients:
            d = ensureDeferred(self._run_server(client))
            d.addErrback(self._worker_died, client.label)
            self._workers.append(d)

    @staticmethod
    def _worker_died(failure: Failure, label: str) -> None:
        if not failure.check(CancelledError):
            log.failure("Power stream worker for {server} died", failure, server=label)

    async def stop(self) -> None:
        """Stop every worker and close every connection; the iteration ends."""
        self._running = False
        for d in self._workers:
            d.cancel()
        self._workers.clear()
        for client in self._clients:
            await client.close()
        for status in self.status.values():
            status.state = "stopped"
        self._channel.end()

    async def __aenter__(self) -> "MultiPowerStream":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> "MultiPowerStream":
        return self

    async def __anext__(self) -> PowerReading:
        return await self._channel.get()

    @property
    def dropped(self) -> int:
        """Readings the iteration buffer discarded because nobody iterated."""
        return self._channel.dropped

    def _update(self, label: str, **changes: Any) -> None:
        status = self.status[label]
        for name, value in changes.items():
            setattr(status, name, value)
        if self.on_status is not None:
            self.on_status(status)

    def _forget(self, label: str) -> None:
        for key in [k for k in self.latest if k[0] == label]:
            del self.latest[key]

    def _emit(self, label: str, sample: DevicePower, offset_s: float) -> None:
        reading = PowerReading(
            label,
            sample.kind,
            sample.index,
            sample.power_mw / 1000,
            sample.timestamp_ms / 1000 + offset_s,
            None if sample.dram_mw is None else sample.dram_mw / 1000,
            sample.timestamp_ms,
        )
        self.latest[(label, reading.kind, reading.index)] = reading
        self._channel.put(reading)
        if self.on_reading is not None:
            self.on_reading(reading)

    async def _run_server(self, client: ZeusdClient) -> None:
        label = client.label
        delay = self.backoff_initial_s
        while self._running:
            streams: list[PowerStream] = []
            flowing = [False]
            try:
                self._update(label, state="connecting", retry_in_s=None)
                discovery = await client.discover()
                offset = await client.clock_offset(self.clock_samples)
                kinds = tuple(k for k in self.kinds if _serves(discovery, k))
                if discovery.auth_required:
                    if not client.token:
                        raise ZeusdAuthError(401, "the daemon requires a token (--token or $ZEUSD_TOKEN)")
                    scopes = (await client.whoami()).scopes
                    kinds = tuple(k for k in kinds if f"{k}-read" in scopes)
                self._update(label, discovery=discovery, offset=offset, kinds=kinds)
                if not kinds:
                    self._update(label, state="failed", error="nothing to stream: no devices, or groups/scopes missing")
                    return
                for kind in kinds:
                    streams.append(
                        await client.stream_power(kind, format=self.format, idle_timeout_s=self.idle_timeout_s)
                    )
                self._update(label, state="streaming", error=None, connects=self.status[label].connects + 1)
                log.info("Streaming {kinds} power from {server} (clock offset {offset:+.4f} s)",
                         kinds="+".join(kinds), server=label, offset=offset.offset_s)

                def on_sample(sample: DevicePower, offset_s: float = offset.offset_s) -> None:
                    flowing[0] = True
                    self._emit(label, sample, offset_s)

                runs = [ensureDeferred(s.run(on_sample)) for s in streams]
                try:
                    await DeferredList(runs, fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)
                except FirstError as e:
                    sub = e.subFailure.value
                    raise sub if isinstance(sub, BaseException) else ZeusdError(str(sub)) from None
                error = "stream ended"
            except CancelledError:
                raise
            except ZeusdAuthError as e:
                self._forget(label)
                self._update(label, state="failed", error=str(e))
                log.warn("{server}: {error}; not retrying", server=label, error=str(e))
                return
            except Exception as e:
                error = str(e) or type(e).__name__
            finally:
                for stream in streams:
                    stream.close()
            self._forget(label)
            if not self._running:
                return
            if flowing[0]:
                delay = self.backoff_initial_s
            self._update(label, state="backoff", error=error, retry_in_s=delay)
            log.info("{server}: {error}; reconnecting in {delay:g} s", server=label, error=error, delay=delay)
            await deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, self.backoff_max_s)


def _serves(discovery: Discovery, kind: DeviceKind) -> bool:
    if kind == "gpu":
        return discovery.enabled("gpu-read") and bool(discovery.gpus)
    return discovery.enabled("cpu-read") and bool(discovery.cpus)


async def gather(awaitables: Iterable[Awaitable[T]]) -> list[T | BaseException]:
    """Run coroutines concurrently; each result or its exception, in order."""

    async def wrap(a: Awaitable[T]) -> T:
        return await a

    deferreds = [ensureDeferred(wrap(a)) for a in awaitables]
    results = await DeferredList(deferreds, consumeErrors=True)
    out: list[T | BaseException] = []
    for ok, value in results:
        if ok:
            out.append(value)
        else:
            assert isinstance(value, Failure) and value.value is not None
            out.append(value.value)
    return out


__all__ = [
    "ClockOffset",
    "CpuEnergy",
    "CpuInfo",
    "CpuPackagePower",
    "CpuPower",
    "DEFAULT_SOCKET_PATH",
    "DevicePower",
    "Discovery",
    "GpuEnergy",
    "GpuInfo",
    "GpuPower",
    "MultiPowerStream",
    "PersistenceMode",
    "PowerLimit",
    "PowerLimitConstraints",
    "PowerReading",
    "PowerStream",
    "SSEParser",
    "ServerAddress",
    "ServerStatus",
    "WhoAmI",
    "ZeusdAuthError",
    "ZeusdClient",
    "ZeusdConnectionError",
    "ZeusdError",
    "ZeusdHTTPError",
    "ZeusdProtocolError",
    "default_server",
    "gather",
    "parse_power_event",
]
