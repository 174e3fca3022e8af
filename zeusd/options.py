"""The one definition of the daemon's options.

``ServeOptions`` is used verbatim by ``zeusd serve``, by the ``twist zeusd``
plugin and by ``tac/zeusd.tac``; :meth:`ServeOptions.config` turns the parsed
strings into a validated, typed :class:`ServeConfig` that the service is built
from, so no other module ever parses a flag.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Literal

from twisted.python import usage

from zeusd.constants import DEFAULT_SOCKET_PATH
from zeusd.groups import DEFAULT_GROUPS, ApiGroup

MAX_POLL_HZ = 1000
MAX_SIMULATED_DEVICES = 64


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service needs, already validated."""

    mode: Literal["uds", "tcp"] = "uds"
    socket_path: str = DEFAULT_SOCKET_PATH
    socket_permissions: int = 0o666
    socket_uid: int | None = None
    socket_gid: int | None = None
    tcp_address: TcpAddress = TcpAddress("127.0.0.1", 4938)
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    gpu_power_poll_hz: int = 20
    cpu_power_poll_hz: int = 10
    enabled_groups: tuple[ApiGroup, ...] = DEFAULT_GROUPS
    signing_key_path: str | None = None
    rapl_root: str = "/sys/class/powercap"
    simulate: bool = False
    simulate_gpus: int = 4
    simulate_cpus: int = 2
    stream_format: str = "v0.4"
    sse_keepalive_s: float = 15.0
    sse_stall_timeout_s: float = 30.0
    tls_cert_path: str | None = None
    tls_key_path: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None

    def enabled(self, group: ApiGroup) -> bool:
        return group in self.enabled_groups


def _parse_u32(name: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise usage.UsageError(f"--{name}: expected a non-negative integer, got {value!r}")
    number = int(value)
    if number > 0xFFFFFFFF:
        raise usage.UsageError(f"--{name}: {value} does not fit in 32 bits")
    return number


def _parse_poll_hz(name: str, value: str) -> int:
    hz = _parse_u32(name, value)
    if not 1 <= hz <= MAX_POLL_HZ:
        raise usage.UsageError(f"--{name}: must be between 1 and {MAX_POLL_HZ} Hz, got {hz}")
    return hz


def _parse_permissions(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise usage.UsageError(
            f"--socket-permissions: {value!r} is not an octal mode such as 666 or 0660"
        ) from None
    if not 0 <= mode <= 0o777:
        raise usage.UsageError(f"--socket-permissions: {value!r} is outside 000..777")
    return mode


def parse_tcp_address(value: str) -> TcpAddress:
    """``host:port`` or ``[v6]:port``; hostnames are resolved once, at startup."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise usage.UsageError(f"--tcp-bind-address: {value!r} is not [IPv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise usage.UsageError(f"--tcp-bind-address: {value!r} is not host:port")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise usage.UsageError(f"--tcp-bind-address: bad port in {value!r}")
    try:
        ip_address(host)
    except ValueError:
        try:
            host = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as e:
            raise usage.UsageError(f"--tcp-bind-address: cannot resolve {host!r}: {e}") from None
    return TcpAddress(host, int(port_text))


def _parse_groups(values: list[str]) -> tuple[ApiGroup, ...]:
    groups: list[ApiGroup] = []
    valid = ", ".join(g.value for g in ApiGroup)
    for value in values:
        for name in value.split(","):
            name = name.strip()
            try:
                groups.append(ApiGroup(name))
            except ValueError:
                raise usage.UsageError(
                    f"--enable: unknown API group {name!r} (possible values: {valid})"
                ) from None
    return tuple(groups)


def _parse_count(name: str, value: str, low: int, high: int) -> int:
    number = _parse_u32(name, value)
    if not low <= number <= high:
        raise usage.UsageError(f"--{name}: must be between {low} and {high}, got {number}")
    return number


class _Once:
    """Dispatch for one single-valued parameter that refuses a second value."""

    def __init__(self, handler: Any, given: set[str]) -> None:
        self._handler = handler
        self._given = given

    def __call__(self, name: str, value: str) -> None:
        if name in self._given:
            raise usage.UsageError(f"--{name} cannot be used multiple times")
        self._given.add(name)
        self._handler.dispatch(name, value)


class SingleValuedParameters:
    """A single-valued flag given twice is a usage error (spec §12.1), not "last one wins".

    Silently taking the last of two ``--mode`` or ``--socket-path`` values
    hides a mistake in a unit file. Repeatable options (``--enable``,
    ``--scope``) are ``opt_*`` methods and are not affected.
    """

    def __init__(self) -> None:
        super().__init__()
        given: set[str] = set()
        dispatch: dict[str, Any] = self._dispatch  # type: ignore[attr-defined]
        for name, handler in list(dispatch.items()):
            if isinstance(handler, usage.CoerceParameter):
                dispatch[name] = _Once(handler, given)


class VersionOption:
    """``--version`` prints zeusd's version (usage.Options would print Twisted's)."""

    def opt_version(self) -> None:
        """Print the version and exit."""
        from zeusd import __version__

        print(f"zeusd {__version__}")
        raise SystemExit(0)


class ServeOptions(SingleValuedParameters, VersionOption, usage.Options):
    """zeusd serve: run the daemon."""

    synopsis = "[options]"
    longdesc = (
        "Serve the zeusd HTTP API on a UNIX domain socket (default) or TCP. "
        "Use --simulate for a simulated node that needs no GPU, no RAPL and no root."
    )

    optParameters: list[list[Any]] = [
        ["mode", None, "uds", "Listener: uds or tcp."],
        ["socket-path", None, DEFAULT_SOCKET_PATH, "UNIX domain socket path (uds mode)."],
        ["socket-permissions", None, "666", "Octal permissions of the socket file (uds mode)."],
        ["socket-uid", None, None, "Owner uid of the socket file (default: unchanged)."],
        ["socket-gid", None, None, "Owner gid of the socket file (default: unchanged)."],
        ["tcp-bind-address", None, "127.0.0.1:4938", "host:port to listen on (tcp mode)."],
        ["num-workers", None, None, "Threads for blocking device reads (default: logical CPUs)."],
        ["gpu-power-poll-hz", None, "20", "GPU power streaming rate, 1..1000 Hz."],
        ["cpu-power-poll-hz", None, "10", "CPU power streaming rate, 1..1000 Hz."],
        ["signing-key-path", None, None, "HS256 key file; enables bearer-token auth."],
        ["tls-cert", None, None, "PEM certificate (chain) for HTTPS in tcp mode."],
        ["tls-key", None, None, "PEM private key for --tls-cert (not readable by other users)."],
        ["rapl-root", None, "/sys/class/powercap", "Directory holding the intel-rapl zones."],
        ["simulate-gpus", None, "4", "GPUs of the simulated node (with --simulate)."],
        ["simulate-cpus", None, "2", "CPU packages of the simulated node (with --simulate)."],
        ["stream-format", None, "v0.4", "Default SSE event format: v0.4 (snapshot) or v0.5 (per device)."],
        ["sse-keepalive-s", None, "15", "Seconds of stream silence before a ': keepalive' comment, 1..300."],
        ["sse-stall-timeout-s", None, "30", "Disconnect a stream reader that has not read for this long, 1..3600."],
    ]
    optFlags: list[list[Any]] = [
        ["simulate", None, "Serve a simulated node (no hardware, no root needed)."],
    ]
    compData = usage.Completions(
        optActions={
            "mode": usage.CompleteList(["uds", "tcp"]),
            "socket-path": usage.CompleteFiles(),
            "signing-key-path": usage.CompleteFiles(),
            "rapl-root": usage.CompleteDirs(),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self._enable: list[str] = []

    def opt_enable(self, value: str) -> None:
        """API groups to enable, comma-separated or repeated:
        gpu-control, gpu-read, cpu-read (default: all)."""
        self._enable.append(value)

    def postOptions(self) -> None:
        self._config = self._build_config()

    def config(self) -> ServeConfig:
        return self._config

    def _build_config(self) -> ServeConfig:
        mode: str = self["mode"]
        if mode not in ("uds", "tcp"):
            raise usage.UsageError(f"--mode: {mode!r} is not one of: uds, tcp")
        uid = self["socket-uid"]
        gid = self["socket-gid"]
        workers = self["num-workers"]
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-cert"] is not None and mode != "tcp":
            raise usage.UsageError("--tls-cert/--tls-key need --mode tcp")
        stream_format = self["stream-format"]
        if stream_format not in ("v0.4", "v0.5"):
            raise usage.UsageError(f"--stream-format: {stream_format!r} is not one of: v0.4, v0.5")
        return ServeConfig(
            mode="uds" if mode == "uds" else "tcp",
            socket_path=self["socket-path"],
            socket_permissions=_parse_permissions(self["socket-permissions"]),
            socket_uid=None if uid is None else _parse_u32("socket-uid", uid),
            socket_gid=None if gid is None else _parse_u32("socket-gid", gid),
            tcp_address=parse_tcp_address(self["tcp-bind-address"]),
            num_workers=(
                os.cpu_count() or 1 if workers is None else _parse_count("num-workers", workers, 1, 1024)
            ),
            gpu_power_poll_hz=_parse_poll_hz("gpu-power-poll-hz", self["gpu-power-poll-hz"]),
            cpu_power_poll_hz=_parse_poll_hz("cpu-power-poll-hz", self["cpu-power-poll-hz"]),
            enabled_groups=_parse_groups(self._enable) if self._enable else DEFAULT_GROUPS,
            signing_key_path=self["signing-key-path"],
            rapl_root=self["rapl-root"],
            simulate=bool(self["simulate"]),
            simulate_gpus=_parse_count("simulate-gpus", self["simulate-gpus"], 0, MAX_SIMULATED_DEVICES),
            simulate_cpus=_parse_count("simulate-cpus", self["simulate-cpus"], 0, MAX_SIMULATED_DEVICES),
            stream_format=stream_format,
            sse_keepalive_s=_parse_count("sse-keepalive-s", self["sse-keepalive-s"], 1, 300),
            sse_stall_timeout_s=_parse_count("sse-stall-timeout-s", self["sse-stall-timeout-s"], 1, 3600),
            tls_cert_path=self["tls-cert"],
            tls_key_path=self["tls-key"],
        )
