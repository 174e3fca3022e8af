"""An asynchronous client for zeusd, on treq and Twisted.

Three layers, each usable on its own:

* :class:`ZeusdClient` (``client``) — one daemon (UNIX socket, HTTP or HTTPS):
  every endpoint of the API as a coroutine returning a typed result (``types``),
  errors raised as :class:`ZeusdError` (``errors``) carrying the daemon's own
  message and HTTP status. Its HTTP client can be injected (a treq
  ``HTTPClient``, or ``treq.testing.StubTreq`` in tests).
* :class:`PowerStream` (``streams``) — one open ``/gpu/stream_power`` or
  ``/cpu/stream_power`` response, parsed (``sse``) from either SSE event format
  (v0.4 snapshots or v0.5 per-device events) into :class:`DevicePower`
  samples; ``async for`` or a callback.
* :class:`MultiPowerStream` (``multi``) — many daemons at once: each daemon's
  clock offset measured with ``/time`` (as the official zeus client does),
  streams reconnected with capped exponential backoff when a daemon restarts,
  and the readings merged into one sequence of :class:`PowerReading` stamped on
  the client's clock.

Servers (``addresses``) are written ``unix:/path/to.sock`` (or just an absolute
path), ``host:port``, ``[v6]:port``, ``http://host:port`` or ``https://host:port``.
The modules import one way: errors → types → sse → streams → client → multi.
"""

from zeusd.client.addresses import ServerAddress, default_server
from zeusd.client.client import DEFAULT_TIMEOUT_S, HTTPRequester, ZeusdClient, gather
from zeusd.client.errors import (
    ZeusdAuthError,
    ZeusdConnectionError,
    ZeusdError,
    ZeusdHTTPError,
    ZeusdProtocolError,
)
from zeusd.client.multi import MultiPowerStream
from zeusd.client.sse import MAX_EVENT_BYTES, SSEParser, parse_power_event
from zeusd.client.streams import PowerStream
from zeusd.client.types import (
    KINDS,
    ClockOffset,
    CpuEnergy,
    CpuInfo,
    CpuPackagePower,
    CpuPower,
    DeviceKind,
    DevicePower,
    Discovery,
    GpuEnergy,
    GpuInfo,
    GpuPower,
    PersistenceMode,
    PowerLimit,
    PowerLimitConstraints,
    PowerReading,
    ServerStatus,
    WhoAmI,
)
from zeusd.constants import DEFAULT_SOCKET_PATH

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "DEFAULT_TIMEOUT_S",
    "KINDS",
    "MAX_EVENT_BYTES",
    "ClockOffset",
    "CpuEnergy",
    "CpuInfo",
    "CpuPackagePower",
    "CpuPower",
    "DeviceKind",
    "DevicePower",
    "Discovery",
    "GpuEnergy",
    "GpuInfo",
    "GpuPower",
    "HTTPRequester",
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
