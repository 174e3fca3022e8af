"""The one definition of the daemon's options.

``ServeOptions`` is used verbatim by ``zeusd serve``, by the ``twist zeusd``
plugin and by ``tac/zeusd.tac``; :meth:`ServeOptions.config` turns the given
strings into a validated, typed :class:`ServeConfig` that the service is built
from, so no other module ever parses a flag.

Flags are declared once, in :data:`SERVE_FLAGS`, as :class:`Flag` rows; each
row becomes a ``usage.Options`` handler that records what was given, so a
single-valued flag given twice is a usage error (as with clap) and the config
knows which flags were given explicitly (an explicit request for devices that
are missing stops startup; defaults only warn).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Callable, ClassVar, Sequence

from twisted.python import usage

from zeusd.constants import DEFAULT_SOCKET_PATH
from zeusd.devices.gpu.backends import GPU_BACKENDS
from zeusd.groups import DEFAULT_GROUPS, ApiGroup
from zeusd.listeners import ListenerSpec, ListenSyntaxError, inherited_listeners, parse_listen, parse_mode

MAX_POLL_HZ = 1000
MAX_SIMULATED_DEVICES = 64
DEFAULT_TCP_ADDRESS = "127.0.0.1:4938"
#: Where RAPL zones are looked for when ``--rapl-root`` is not given, in order:
#: a container's bind mount of the host's tree first (as upstream does), then the host's.
DEFAULT_RAPL_ROOTS = ("/zeus_sys/class/powercap", "/sys/class/powercap")
STREAM_FORMATS = ("v0.4", "v0.5")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service needs, already validated."""

    listeners: tuple[ListenerSpec, ...] = (ListenerSpec("unix", path=DEFAULT_SOCKET_PATH),)
    socket_uid: int | None = None
    socket_gid: int | None = None
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    gpu_power_poll_hz: int = 20
    cpu_power_poll_hz: int = 10
    enabled_groups: tuple[ApiGroup, ...] = DEFAULT_GROUPS
    #: Whether ``--enable`` was given: then every enabled device group must find its devices.
    groups_explicit: bool = False
    signing_key_path: str | None = None
    #: ``--rapl-root``; None: the first of DEFAULT_RAPL_ROOTS that exists.
    rapl_root: str | None = None
    #: ``--gpu-backend``: auto, nvml or amdsmi.
    gpu_backend: str = "auto"
    #: ``--gpu-command-overrides``: TOML file of commands run instead of GPU control operations.
    gpu_command_overrides: str | None = None
    simulate: bool = False
    simulate_vendor: str = "nvidia"
    simulate_gpus: int = 4
    simulate_cpus: int = 2
    stream_format: str = "v0.4"
    sse_keepalive_s: float = 15.0
    sse_stall_timeout_s: float = 30.0

    def enabled(self, group: ApiGroup) -> bool:
        return group in self.enabled_groups

    @property
    def socket_owner(self) -> tuple[int, int]:
        """(uid, gid) for UNIX socket files, -1 meaning unchanged (as ``os.chown`` takes it)."""
        return (
            -1 if self.socket_uid is None else self.socket_uid,
            -1 if self.socket_gid is None else self.socket_gid,
        )

    def summary(self) -> list[str]:
        """The configuration as a reader wants it in the startup log, one line per item."""
        lines = [f"listener: {spec}" for spec in self.listeners]
        if self.socket_uid is not None or self.socket_gid is not None:
            lines.append(f"socket owner: uid {self.socket_uid}, gid {self.socket_gid} (unchanged where None)")
        lines += [
            f"API groups: {', '.join(g.value for g in self.enabled_groups)}{' (given)' if self.groups_explicit else ''}",
            f"authentication: {'bearer tokens, key ' + self.signing_key_path if self.signing_key_path else 'off'}",
            f"devices: simulated node ({self.simulate_gpus} {self.simulate_vendor.upper()} GPUs, {self.simulate_cpus} CPU packages)"
            if self.simulate
            else f"devices: GPU backend {self.gpu_backend}, RAPL",
            f"power polling: GPU {self.gpu_power_poll_hz} Hz, CPU {self.cpu_power_poll_hz} Hz",
            f"stream format: {self.stream_format}; keepalive {self.sse_keepalive_s:g} s, "
            f"stalled readers dropped after {self.sse_stall_timeout_s:g} s",
        ]
        if self.gpu_command_overrides is not None:
            lines.append(f"GPU command overrides: {self.gpu_command_overrides}")
        if not self.simulate:
            lines.append(f"RAPL root: {self.rapl_root or 'first of ' + ', '.join(DEFAULT_RAPL_ROOTS)}")
        return lines


# Flag declarations ---------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``--name VALUE`` (``takes_value``) or a bare switch."""

    name: str
    help: str
    default: str | None = None
    takes_value: bool = True
    repeatable: bool = False

    def doc(self) -> str:
        shown = f" (default: {self.default})" if self.default is not None else ""
        return self.help + shown


class FlagOptions(usage.Options):
    """``usage.Options`` whose flags come from a :class:`Flag` table (``flags``).

    What was given is in ``self.given``: the raw string, a list for repeatable
    flags, True for switches.
    """

    flags: ClassVar[tuple[Flag, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for flag in cls.flags:
            setattr(cls, "opt_" + flag.name.replace("-", "_"), _handler(flag))

    def __init__(self) -> None:
        self.given: dict[str, Any] = {}
        super().__init__()

    def opt_help(self) -> None:
        """Display this help and exit."""
        super().opt_help()

    opt_h = opt_help

    def value_of(self, name: str) -> str | None:
        """The flag's given value, else its default."""
        given = self.given.get(name)
        if given is not None:
            return str(given)
        return next(f.default for f in self.flags if f.name == name)

    def values_of(self, name: str) -> list[str]:
        """Every value of a repeatable flag, in the order given."""
        return list(self.given.get(name, []))

    def _take(self, flag: Flag, value: str | None) -> None:
        if flag.repeatable:
            self.given.setdefault(flag.name, []).append(value)
            return
        if flag.name in self.given:
            raise usage.UsageError(f"--{flag.name} cannot be used multiple times")
        self.given[flag.name] = True if value is None else value


def _handler(flag: Flag) -> Callable[..., None]:
    if flag.takes_value:

        def take_value(self: FlagOptions, value: str) -> None:
            self._take(flag, value)

        handler: Callable[..., None] = take_value
    else:

        def take_switch(self: FlagOptions) -> None:
            self._take(flag, None)

        handler = take_switch
    handler.__doc__ = flag.doc()
    return handler


class VersionOption:
    """``--version`` prints zeusd's version (usage.Options would print Twisted's)."""

    def opt_version(self) -> None:
        """Print the version and exit."""
        from zeusd import __version__

        print(f"zeusd {__version__}")
        raise SystemExit(0)


# Value parsers ------------------------------------------------------------------------


def _parse_u32(name: str, value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise usage.UsageError(f"--{name}: expected a non-negative integer, got {value!r}")
    number = int(value)
    if number > 0xFFFFFFFF:
        raise usage.UsageError(f"--{name}: {value} does not fit in 32 bits")
    return number


def _parse_count(name: str, value: str, low: int, high: int) -> int:
    number = _parse_u32(name, value)
    if not low <= number <= high:
        raise usage.UsageError(f"--{name}: must be between {low} and {high}, got {number}")
    return number


def parse_tcp_address(value: str) -> tuple[str, int]:
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
    return host, int(port_text)


def _parse_groups(values: list[str]) -> tuple[ApiGroup, ...]:
    groups: list[ApiGroup] = []
    valid = ", ".join(g.value for g in ApiGroup)
    for value in values:
        for name in value.split(","):
            name = name.strip()
            try:
                groups.append(ApiGroup(name))
            except ValueError:
                raise usage.UsageError(f"--enable: unknown API group {name!r} (possible values: {valid})") from None
    return tuple(groups)


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise usage.UsageError(f"--{name}: {value!r} is not one of: {', '.join(choices)}")
    return value


#: Flags that describe the one shorthand listener (``--listen`` is the general form).
SHORTHAND_LISTENER_FLAGS = ("mode", "socket-path", "socket-permissions", "tcp-bind-address", "tls-cert", "tls-key")

SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "listen",
        "Where to listen, as a Twisted endpoint description; repeatable: unix:PATH[:mode=660], "
        "tcp:PORT[:interface=ADDR], ssl:PORT:privateKey=KEY[:certKey=CERT][:interface=ADDR], "
        "systemd:domain=UNIX|INET|INET6:index=N. Default: the --mode listener, or every socket "
        "systemd passed (socket activation).",
        repeatable=True,
    ),
    Flag("mode", "Shorthand listener: uds or tcp.", "uds"),
    Flag("socket-path", "UNIX domain socket path (uds mode).", DEFAULT_SOCKET_PATH),
    Flag("socket-permissions", "Octal permissions of the socket file (uds mode).", "666"),
    Flag("socket-uid", "Owner uid of UNIX socket files (default: unchanged)."),
    Flag("socket-gid", "Owner gid of UNIX socket files (default: unchanged)."),
    Flag("tcp-bind-address", "host:port to listen on (tcp mode).", DEFAULT_TCP_ADDRESS),
    Flag("tls-cert", "PEM certificate (chain) for HTTPS in tcp mode."),
    Flag("tls-key", "PEM private key for --tls-cert (not readable by other users)."),
    Flag("num-workers", "Threads of the shared pool (metrics rendering); each GPU and CPU package has its own (default: logical CPUs)."),
    Flag("gpu-power-poll-hz", "GPU power streaming rate, 1..1000 Hz.", "20"),
    Flag("cpu-power-poll-hz", "CPU power streaming rate, 1..1000 Hz.", "10"),
    Flag(
        "enable",
        "API groups to enable, comma-separated or repeated: gpu-control, gpu-read, cpu-read, metrics "
        "(default: all). Naming a device group makes its devices required: startup fails without them.",
        repeatable=True,
    ),
    Flag("signing-key-path", "HS256 key file; enables bearer-token auth."),
    Flag("rapl-root", "Directory holding the intel-rapl zones (default: /zeus_sys/class/powercap if present, else /sys/class/powercap)."),
    Flag("gpu-backend", "GPU library: auto (whichever finds GPUs), nvml (NVIDIA) or amdsmi (AMD).", "auto"),
    Flag(
        "gpu-command-overrides",
        "TOML file mapping GPU control operations to commands run instead of the GPU library (no shell); "
        "with at least one, gpu-control needs no root.",
    ),
    Flag("simulate", "Serve a simulated node (no hardware, no root needed).", takes_value=False),
    Flag("simulate-vendor", "GPUs of the simulated node behave like: nvidia or amd.", "nvidia"),
    Flag("simulate-gpus", "GPUs of the simulated node (with --simulate).", "4"),
    Flag("simulate-cpus", "CPU packages of the simulated node (with --simulate).", "2"),
    Flag(
        "stream-format",
        "SSE event format: v0.4 (snapshots, zeus 0.15.x clients) or v0.5 (per device, zeus 0.16.x clients).",
        "v0.4",
    ),
    Flag("sse-keepalive-s", "Seconds of stream silence before a ': keepalive' comment, 1..300.", "15"),
    Flag("sse-stall-timeout-s", "Disconnect a stream reader that has not read for this long, 1..3600.", "30"),
)


class ServeOptions(VersionOption, FlagOptions):
    """zeusd serve: run the daemon."""

    synopsis = "[options]"
    longdesc = (
        "Serve the zeusd HTTP API on a UNIX domain socket (default), TCP, HTTPS or sockets passed by systemd. "
        "Use --simulate for a simulated node that needs no GPU, no RAPL and no root."
    )
    flags = SERVE_FLAGS
    compData = usage.Completions(
        optActions={
            "mode": usage.CompleteList(["uds", "tcp"]),
            "socket-path": usage.CompleteFiles(),
            "signing-key-path": usage.CompleteFiles(),
            "rapl-root": usage.CompleteDirs(),
            "gpu-command-overrides": usage.CompleteFiles(),
        }
    )

    def postOptions(self) -> None:
        self._config = self._build_config()

    def config(self) -> ServeConfig:
        return self._config

    def _build_config(self) -> ServeConfig:
        value = self.value_of
        uid, gid, workers = value("socket-uid"), value("socket-gid"), value("num-workers")
        enable = self.values_of("enable")
        return ServeConfig(
            listeners=self._listeners(),
            socket_uid=None if uid is None else _parse_u32("socket-uid", uid),
            socket_gid=None if gid is None else _parse_u32("socket-gid", gid),
            num_workers=os.cpu_count() or 1 if workers is None else _parse_count("num-workers", workers, 1, 1024),
            gpu_power_poll_hz=_parse_count("gpu-power-poll-hz", str(value("gpu-power-poll-hz")), 1, MAX_POLL_HZ),
            cpu_power_poll_hz=_parse_count("cpu-power-poll-hz", str(value("cpu-power-poll-hz")), 1, MAX_POLL_HZ),
            enabled_groups=_parse_groups(enable) if enable else DEFAULT_GROUPS,
            groups_explicit=bool(enable),
            signing_key_path=value("signing-key-path"),
            rapl_root=value("rapl-root"),
            gpu_backend=_choice("gpu-backend", str(value("gpu-backend")), GPU_BACKENDS),
            gpu_command_overrides=value("gpu-command-overrides"),
            simulate=bool(self.given.get("simulate")),
            simulate_vendor=_choice("simulate-vendor", str(value("simulate-vendor")), ("nvidia", "amd")),
            simulate_gpus=_parse_count("simulate-gpus", str(value("simulate-gpus")), 0, MAX_SIMULATED_DEVICES),
            simulate_cpus=_parse_count("simulate-cpus", str(value("simulate-cpus")), 0, MAX_SIMULATED_DEVICES),
            stream_format=_choice("stream-format", str(value("stream-format")), STREAM_FORMATS),
            sse_keepalive_s=_parse_count("sse-keepalive-s", str(value("sse-keepalive-s")), 1, 300),
            sse_stall_timeout_s=_parse_count("sse-stall-timeout-s", str(value("sse-stall-timeout-s")), 1, 3600),
        )

    def _listeners(self) -> tuple[ListenerSpec, ...]:
        """``--listen`` values, plus the shorthand listener when its flags were given or nothing else was."""
        specs = []
        for description in self.values_of("listen"):
            try:
                specs.append(parse_listen(description))
            except ListenSyntaxError as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from None
        shorthand_given = any(name in self.given for name in SHORTHAND_LISTENER_FLAGS)
        if not specs and not shorthand_given:
            specs = inherited_listeners()
        if shorthand_given or not specs:
            specs.append(self._shorthand_listener())
        return tuple(specs)

    def _shorthand_listener(self) -> ListenerSpec:
        mode = _choice("mode", str(self.value_of("mode")), ("uds", "tcp"))
        host, port = parse_tcp_address(str(self.value_of("tcp-bind-address")))  # checked in uds mode too
        cert, key = self.value_of("tls-cert"), self.value_of("tls-key")
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if mode == "uds":
            if cert is not None:
                raise usage.UsageError("--tls-cert/--tls-key need --mode tcp")
            try:
                permissions = parse_mode(str(self.value_of("socket-permissions")))
            except ListenSyntaxError as e:
                raise usage.UsageError(f"--socket-permissions: {e}") from None
            return ListenerSpec("unix", path=self.value_of("socket-path"), mode=permissions)
        if cert is not None:
            return ListenerSpec("ssl", host=host, port=port, tls_cert=cert, tls_key=key)
        return ListenerSpec("tcp", host=host, port=port)
