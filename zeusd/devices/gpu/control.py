"""The GPU control operations, as one table of typed rows.

A row says what an operation is called, what arguments it takes (a frozen
dataclass, so mypy checks every ``apply`` and ``describe`` against it), what it
does to a GPU, how its log line reads, and what can be checked before anything
is queued. The web layer turns a row into an endpoint; the manager runs it on
the GPU's command queue; observers (metrics) hear what was applied.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Generic, Protocol, TypeVar

from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.base import GPU

A = TypeVar("A")


class InvalidArgument(DeviceError):
    """An argument the device is known to refuse, caught before anything is queued."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400)


@dataclass(frozen=True, slots=True)
class NoArguments:
    pass


@dataclass(frozen=True, slots=True)
class Persistence:
    enabled: bool


@dataclass(frozen=True, slots=True)
class PowerLimit:
    power_limit_mw: int


@dataclass(frozen=True, slots=True)
class ClockRange:
    min_clock_mhz: int
    max_clock_mhz: int


@dataclass(frozen=True)
class ControlOperation(Generic[A]):
    """One control operation: ``POST /gpu/<name>`` with ``arguments`` as its query."""

    name: str
    arguments: type[A]
    apply: Callable[[GPU, A], None]
    describe: Callable[[A], str]
    #: Raises InvalidArgument for what is wrong whatever the device's state (on the reactor thread).
    check: Callable[[GPU, A], None] | None = None

    def argument_types(self) -> dict[str, type]:
        """Field name → Python type (``int`` or ``bool``), for the query parser."""
        types = {"int": int, "bool": bool}
        return {f.name: types[str(f.type)] for f in fields(self.arguments)}  # type: ignore[arg-type]


def _check_power_limit(gpu: GPU, args: PowerLimit) -> None:
    limits = gpu.power_limit_range_mw
    if limits is not None and not limits[0] <= args.power_limit_mw <= limits[1]:
        raise InvalidArgument(
            f"power_limit_mw must be within {limits[0]}..{limits[1]} for GPU {gpu.index}, got {args.power_limit_mw}"
        )


def _check_clock_range(gpu: GPU, args: ClockRange) -> None:
    if args.min_clock_mhz > args.max_clock_mhz:
        raise InvalidArgument(
            f"min_clock_mhz ({args.min_clock_mhz}) must not be greater than max_clock_mhz ({args.max_clock_mhz})"
        )


SET_PERSISTENCE_MODE = ControlOperation(
    "set_persistence_mode",
    Persistence,
    lambda gpu, a: gpu.set_persistence_mode(a.enabled),
    lambda a: f"Persistence mode {'enabled' if a.enabled else 'disabled'}",
)
SET_POWER_LIMIT = ControlOperation(
    "set_power_limit",
    PowerLimit,
    lambda gpu, a: gpu.set_power_limit_mw(a.power_limit_mw),
    lambda a: f"Power limit set to {a.power_limit_mw / 1000:g} W",
    _check_power_limit,
)
SET_GPU_LOCKED_CLOCKS = ControlOperation(
    "set_gpu_locked_clocks",
    ClockRange,
    lambda gpu, a: gpu.set_gpu_locked_clocks(a.min_clock_mhz, a.max_clock_mhz),
    lambda a: f"GPU frequency set to [{a.min_clock_mhz}, {a.max_clock_mhz}] MHz",
    _check_clock_range,
)
RESET_GPU_LOCKED_CLOCKS = ControlOperation(
    "reset_gpu_locked_clocks",
    NoArguments,
    lambda gpu, a: gpu.reset_gpu_locked_clocks(),
    lambda a: "GPU locked clocks reset",
)
SET_MEM_LOCKED_CLOCKS = ControlOperation(
    "set_mem_locked_clocks",
    ClockRange,
    lambda gpu, a: gpu.set_mem_locked_clocks(a.min_clock_mhz, a.max_clock_mhz),
    lambda a: f"Memory locked clocks set to [{a.min_clock_mhz}, {a.max_clock_mhz}] MHz",
    _check_clock_range,
)
RESET_MEM_LOCKED_CLOCKS = ControlOperation(
    "reset_mem_locked_clocks",
    NoArguments,
    lambda gpu, a: gpu.reset_mem_locked_clocks(),
    lambda a: "Memory locked clocks reset",
)
RESET_LOCKED_CLOCKS = ControlOperation(
    "reset_locked_clocks",
    NoArguments,
    lambda gpu, a: gpu.reset_locked_clocks(),
    lambda a: "GPU and memory locked clocks reset",
)

OPERATIONS: tuple[ControlOperation[Any], ...] = (
    SET_PERSISTENCE_MODE,
    SET_POWER_LIMIT,
    SET_GPU_LOCKED_CLOCKS,
    RESET_GPU_LOCKED_CLOCKS,
    SET_MEM_LOCKED_CLOCKS,
    RESET_MEM_LOCKED_CLOCKS,
    RESET_LOCKED_CLOCKS,
)


class CommandObserver(Protocol):
    """Told, on the reactor thread and in each GPU's command order, how every command ended."""

    def command_finished(self, gpu: int, operation: ControlOperation[Any], arguments: Any, error: DeviceError | None) -> None: ...


class OperationOverride(Protocol):
    """Runs in place of an operation's ``apply``, on the GPU's command thread (GPU command overrides)."""

    def __call__(self, gpu: GPU, arguments: Any, /) -> None: ...

    @property
    def longest_s(self) -> float:
        """The longest one run can take (bounds a blocking request's wait)."""
        ...
