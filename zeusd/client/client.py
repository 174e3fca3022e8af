"""One daemon, every endpoint of its API as a coroutine (on treq and Twisted)."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Awaitable, Iterable, Mapping, Protocol, TypeVar

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from zeusd.client.addresses import ServerAddress, agent_for, as_address
from zeusd.client.errors import (
    ZeusdConnectionError,
    ZeusdError,
    ZeusdProtocolError,
    connection_error,
    error_from_response,
    was_cancelled,
)
from zeusd.client.streams import PowerStream
from zeusd.client.types import (
    KINDS,
    ClockOffset,
    CpuEnergy,
    CpuPower,
    DeviceKind,
    Discovery,
    GpuEnergy,
    GpuPower,
    PersistenceMode,
    PowerLimit,
    PowerLimitConstraints,
    WhoAmI,
    cpu_package_power,
    device_errors,
    id_map,
)

#: Every one-shot request is given up after this long (the official client's httpx default).
DEFAULT_TIMEOUT_S = 5.0
T = TypeVar("T")


class HTTPRequester(Protocol):
    """What the client needs from its HTTP client: a treq ``HTTPClient``, or
    ``treq.testing.StubTreq`` to drive it in memory against a resource tree."""

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Any = ...,
        headers: Any = ...,
        allow_redirects: bool = ...,
        unbuffered: bool = ...,
        reactor: Any = ...,
    ) -> Deferred[Any]: ...


def _ids_param(ids: int | Iterable[int]) -> str:
    return str(ids) if isinstance(ids, int) else ",".join(str(int(i)) for i in ids)


def _bool_param(value: bool) -> str:
    return "true" if value else "false"


class ZeusdClient:
    """Talks to one daemon; every endpoint of the API is one coroutine.

    ``token`` defaults to ``$ZEUSD_TOKEN``; ``server`` to ``$ZEUSD_SOCK_PATH`` /
    ``$ZEUSD_HOST_PORT`` / the default socket. ``ca_file`` verifies HTTPS
    against the given PEM certificates instead of the system's trust store.
    Use as ``async with ZeusdClient(...) as client:`` or call :meth:`close`.
    ``http`` replaces the HTTP client the address would get (see :class:`HTTPRequester`);
    the server's address then only names it and builds its URLs.
    """

    def __init__(
        self,
        server: ServerAddress | str | None = None,
        token: str | None = None,
        *,
        reactor: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
        http: HTTPRequester | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server = as_address(server)
        self.token = token if token is not None else (os.environ.get("ZEUSD_TOKEN") or None)
        self.timeout_s = timeout_s
        self.discovery: Discovery | None = None
        self._reactor = reactor
        self._streams: set[PowerStream] = set()
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.retryAutomatically = True
            http = HTTPClient(agent_for(self.server, reactor, self._pool, timeout_s, ca_file))
        self._http: HTTPRequester = http

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
        if self._pool is not None:
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
        except Exception as e:  # connection refused, reset, TLS failure... or our timeout
            if was_cancelled(e):
                raise CancelledError() from e
            raise connection_error(self.server, e) from e

    async def _exchange(self, method: str, path: str, params: Mapping[str, str] | None) -> tuple[int, bytes]:
        response = await self._send(method, path, params, unbuffered=False)
        try:
            body = await treq.content(response)
        except Exception as e:
            if was_cancelled(e):
                raise CancelledError() from e
            raise connection_error(self.server, e) from e
        return int(response.code), body

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """One request with the client's timeout; the body of a 200, else :class:`ZeusdHTTPError`."""
        d = ensureDeferred(self._exchange(method, path, params))
        d.addTimeout(self.timeout_s, self._reactor)
        try:
            status, body = await d
        except (CancelledError, DeferredTimeoutError):
            raise ZeusdConnectionError(f"{self.label}: {method} {path}: {self._no_answer()}") from None
        if status != 200:
            raise error_from_response(status, body)
        return body

    def _no_answer(self) -> str:
        text = f"no answer within {self.timeout_s:g} s"
        if self.server.scheme == "https":  # a plain-HTTP daemon waits for a request line that never comes
            text += f"; if the daemon serves plain HTTP, use {self.server.netloc} instead of https://"
        return text

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
        power = id_map(body.get("power_mw"), "/gpu/get_power")
        return GpuPower(int(body["timestamp_ms"]), {i: int(v) for i, v in power.items()}, device_errors(body))

    async def _gpu_map(self, path: str, gpu_ids: int | Iterable[int] | None) -> dict[int, Any]:
        return id_map(await self._get_json(path, self._optional_ids("gpu_ids", gpu_ids)), path)

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
        body = id_map(await self._get_json("/cpu/get_cumulative_energy", params), "/cpu/get_cumulative_energy")
        return {
            i: CpuEnergy(
                None if v.get("cpu_energy_uj") is None else int(v["cpu_energy_uj"]),
                None if v.get("dram_energy_uj") is None else int(v["dram_energy_uj"]),
            )
            for i, v in body.items()
        }

    async def get_cpu_power(self, cpu_ids: int | Iterable[int] | None = None) -> CpuPower:
        body = await self._get_json("/cpu/get_power", self._optional_ids("cpu_ids", cpu_ids))
        power = id_map(body.get("power_mw"), "/cpu/get_power")
        return CpuPower(int(body["timestamp_ms"]), {i: cpu_package_power(v) for i, v in power.items()}, device_errors(body))

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
        except (CancelledError, DeferredTimeoutError):
            raise ZeusdConnectionError(f"{self.label}: {path}: {self._no_answer()}") from None
        if response.code != 200:
            body = await treq.content(response)
            raise error_from_response(int(response.code), body)
        stream = PowerStream(kind, response, self._reactor, idle_timeout_s)
        self._streams.add(stream)
        stream.on_end = lambda: self._streams.discard(stream)
        if stream.ended:  # the body ended while being handed over
            self._streams.discard(stream)
        return stream

    async def stream_gpu_power(self, gpu_ids: int | Iterable[int] | None = None, **kw: Any) -> PowerStream:
        return await self.stream_power("gpu", gpu_ids, **kw)

    async def stream_cpu_power(self, cpu_ids: int | Iterable[int] | None = None, **kw: Any) -> PowerStream:
        return await self.stream_power("cpu", cpu_ids, **kw)


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


__all__ = ["DEFAULT_TIMEOUT_S", "HTTPRequester", "ZeusdClient", "gather"]
