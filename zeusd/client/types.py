"""What the daemon answers, as frozen dataclasses (and the parsing that builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from zeusd.client.errors import ZeusdProtocolError

DeviceKind = Literal["gpu", "cpu"]
KINDS: tuple[DeviceKind, ...] = ("gpu", "cpu")


@dataclass(frozen=True)
class GpuInfo:
    id: int
    name: str | None = None
    pci_address: str | None = None
    cumulative_energy_available: bool | None = None
    #: Which backend serves it (``nvml``, ``amdsmi``, ``simulated``); None from daemons that do not say.
    backend: str | None = None


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
                GpuInfo(
                    int(g["id"]), g.get("name"), g.get("pci_address"), g.get("cumulative_energy_available"), g.get("backend")
                )
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


# --------------------------------------------------------------------------- parsing helpers (for the package)


def id_map(body: Any, what: str) -> dict[int, Any]:
    if not isinstance(body, dict):
        raise ZeusdProtocolError(f"{what}: expected an object keyed by device id")
    try:
        return {int(k): v for k, v in body.items()}
    except ValueError:
        raise ZeusdProtocolError(f"{what}: a key is not a device id: {sorted(body)}") from None


def cpu_package_power(value: Any) -> CpuPackagePower:
    return CpuPackagePower(int(value["cpu_mw"]), None if value.get("dram_mw") is None else int(value["dram_mw"]))


def device_errors(body: Mapping[str, Any]) -> dict[int, str]:
    return {int(k): str(v) for k, v in (body.get("errors") or {}).items()}


__all__ = [
    "KINDS",
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
    "PersistenceMode",
    "PowerLimit",
    "PowerLimitConstraints",
    "PowerReading",
    "ServerStatus",
    "WhoAmI",
]
