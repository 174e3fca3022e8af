"""The GPU protocol every backend implements.

All methods block (NVML calls, simulator locks) and are therefore only ever
called from worker threads, never from the reactor thread. Failures raise
:class:`zeusd.devices.base.DeviceError` with the HTTP status already decided.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from zeusd.devices.base import DeviceError


class GPU(Protocol):
    """One GPU, addressed by its NVML index."""

    @property
    def index(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def backend(self) -> str:
        """Which backend serves the GPU: ``nvml``, ``amdsmi`` or ``simulated`` (for /discover, /metrics)."""
        ...

    @property
    def pci_address(self) -> str:
        """Bus id as ``dddd:bb:dd.f`` in lower-case hex (empty when unknown)."""
        ...

    @property
    def energy_counter_available(self) -> bool:
        """Whether the cumulative-energy counter worked at startup (Volta and newer)."""
        ...

    @property
    def power_limit_range_mw(self) -> tuple[int, int] | None:
        """The power limits the device accepts, as it reported them at startup (None: unknown).

        Lets a request with an impossible limit be refused before anything is queued.
        """
        ...

    # Reads.
    def get_instant_power_mw(self) -> int: ...

    def get_total_energy_mj(self) -> int: ...

    def get_power_limit_mw(self) -> int: ...

    def get_power_limit_constraints_mw(self) -> tuple[int, int]: ...

    def get_persistence_mode(self) -> bool: ...

    # Control.
    def set_persistence_mode(self, enabled: bool) -> None: ...

    def set_power_limit_mw(self, power_limit_mw: int) -> None: ...

    def set_gpu_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None: ...

    def reset_gpu_locked_clocks(self) -> None: ...

    def set_mem_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None: ...

    def reset_mem_locked_clocks(self) -> None: ...

    def reset_locked_clocks(self) -> None:
        """Give both clock domains back to the driver."""
        ...


class GPUBackend(Protocol):
    """What a GPU backend hands to the service at startup."""

    @property
    def gpus(self) -> Sequence[GPU]: ...

    @property
    def absence(self) -> str:
        """Why there are no GPUs, for the startup error when GPUs were required."""
        ...

    def close(self) -> None:
        """Release the library (called once at shutdown)."""
        ...


def reset_each_domain(resets: Sequence[Callable[[], None]]) -> None:
    """Reset clock domains one after the other: all are attempted, the first error is reported."""
    errors: list[DeviceError] = []
    for reset in resets:
        try:
            reset()
        except DeviceError as e:
            errors.append(e)
    if errors:
        raise errors[0]


class DiscoveredGPU:
    """What a backend learned about a GPU at startup, served as the GPU protocol's static properties."""

    __slots__ = ("_index", "_name", "_pci_address", "_energy_available", "_limit_range")

    def __init__(
        self,
        index: int,
        name: str,
        pci_address: str,
        energy_counter_available: bool,
        power_limit_range_mw: tuple[int, int] | None,
    ) -> None:
        self._index = index
        self._name = name
        self._pci_address = pci_address
        self._energy_available = energy_counter_available
        self._limit_range = power_limit_range_mw

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self._index}, name={self._name!r}, pci_address={self._pci_address!r})"

    @property
    def index(self) -> int:
        return self._index

    @property
    def name(self) -> str:
        return self._name

    @property
    def pci_address(self) -> str:
        """``dddd:bb:dd.f`` in lower-case hex; empty if the backend could not tell."""
        return self._pci_address

    @property
    def energy_counter_available(self) -> bool:
        """Whether the cumulative-energy counter worked at startup."""
        return self._energy_available

    @property
    def power_limit_range_mw(self) -> tuple[int, int] | None:
        """The power limits the device reported at startup (None: unknown)."""
        return self._limit_range
