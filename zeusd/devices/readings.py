"""Timestamped readings and per-device result maps shared by all device kinds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, Mapping, TypeVar, Union

from zeusd.devices.base import DeviceError

T = TypeVar("T")


def wall_clock_ms() -> int:
    """The daemon's clock for every ``timestamp_ms`` (and for ``/time``)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Reading(Generic[T]):
    """A value and the wall-clock millisecond right after the device produced it."""

    value: T
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Sample:
    """The readings of one poll: device id → value stamped at its read."""

    timestamp_ms: int
    readings: Mapping[int, Reading[Any]]


#: What a multi-device operation yields: each device's result or its error.
Outcome = Union[T, DeviceError]
Results = Mapping[int, Union[T, DeviceError]]


def split_results(results: Results[T]) -> tuple[dict[int, T], dict[int, DeviceError]]:
    ok: dict[int, T] = {}
    failed: dict[int, DeviceError] = {}
    for index, result in results.items():
        if isinstance(result, DeviceError):
            failed[index] = result
        else:
            ok[index] = result
    return ok, failed
