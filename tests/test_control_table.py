"""The GPU control table (zeusd/devices/gpu/control.py), in process: each row calls exactly its
device method with its arguments, logs its line, types its query, and refuses what a device would
refuse before anything is queued. Over HTTP the rows are tested in test_api_simulated.py."""

from __future__ import annotations

from typing import Any

import pytest

from zeusd.devices.gpu.control import (
    OPERATIONS,
    ClockRange,
    ControlOperation,
    InvalidArgument,
    NoArguments,
    Persistence,
    PowerLimit,
)
from zeusd.devices.gpu.simulated import SimulatedGPU


class RecordingGPU(SimulatedGPU):
    """A simulated GPU that also records every control call it receives."""

    def __init__(self, index: int, limits: tuple[int, int] | None = (200_000, 700_000)) -> None:
        super().__init__(index)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._limits = limits

    @property
    def power_limit_range_mw(self) -> tuple[int, int] | None:  # type: ignore[override]  # the protocol allows None; the simulator never reports it
        return self._limits

    def set_persistence_mode(self, enabled: bool) -> None:
        self.calls.append(("set_persistence_mode", (enabled,)))

    def set_power_limit_mw(self, power_limit_mw: int) -> None:
        self.calls.append(("set_power_limit_mw", (power_limit_mw,)))

    def set_gpu_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self.calls.append(("set_gpu_locked_clocks", (min_clock_mhz, max_clock_mhz)))

    def reset_gpu_locked_clocks(self) -> None:
        self.calls.append(("reset_gpu_locked_clocks", ()))

    def set_mem_locked_clocks(self, min_clock_mhz: int, max_clock_mhz: int) -> None:
        self.calls.append(("set_mem_locked_clocks", (min_clock_mhz, max_clock_mhz)))

    def reset_mem_locked_clocks(self) -> None:
        self.calls.append(("reset_mem_locked_clocks", ()))

    def reset_locked_clocks(self) -> None:
        self.calls.append(("reset_locked_clocks", ()))


OPERATION = {op.name: op for op in OPERATIONS}

#: name: (arguments, the device call it makes, its log line, its query's types)
ROWS: dict[str, tuple[Any, tuple[str, tuple[Any, ...]], str, dict[str, type]]] = {
    "set_persistence_mode": (Persistence(True), ("set_persistence_mode", (True,)), "Persistence mode enabled",
                             {"enabled": bool}),
    "set_power_limit": (PowerLimit(250_500), ("set_power_limit_mw", (250_500,)), "Power limit set to 250.5 W",
                        {"power_limit_mw": int}),
    "set_gpu_locked_clocks": (ClockRange(800, 1200), ("set_gpu_locked_clocks", (800, 1200)),
                              "GPU frequency set to [800, 1200] MHz", {"min_clock_mhz": int, "max_clock_mhz": int}),
    "reset_gpu_locked_clocks": (NoArguments(), ("reset_gpu_locked_clocks", ()), "GPU locked clocks reset", {}),
    "set_mem_locked_clocks": (ClockRange(405, 810), ("set_mem_locked_clocks", (405, 810)),
                              "Memory locked clocks set to [405, 810] MHz", {"min_clock_mhz": int, "max_clock_mhz": int}),
    "reset_mem_locked_clocks": (NoArguments(), ("reset_mem_locked_clocks", ()), "Memory locked clocks reset", {}),
    "reset_locked_clocks": (NoArguments(), ("reset_locked_clocks", ()), "GPU and memory locked clocks reset", {}),
}


def test_the_table_has_upstreams_operations_in_order() -> None:
    assert [op.name for op in OPERATIONS] == list(ROWS)


@pytest.mark.parametrize("name", list(ROWS))
def test_each_row_calls_its_device_method_and_describes_it(name: str) -> None:
    operation: ControlOperation[Any] = OPERATION[name]
    arguments, call, line, types = ROWS[name]
    assert operation.arguments is type(arguments)
    gpu = RecordingGPU(2)
    if operation.check is not None:
        operation.check(gpu, arguments)  # valid arguments pass the check
    operation.apply(gpu, arguments)
    assert gpu.calls == [call]
    assert operation.describe(arguments) == line
    assert operation.argument_types() == types


def test_persistence_mode_off_is_described_as_disabled() -> None:
    assert OPERATION["set_persistence_mode"].describe(Persistence(False)) == "Persistence mode disabled"
    gpu = RecordingGPU(0)
    OPERATION["set_persistence_mode"].apply(gpu, Persistence(False))
    assert gpu.calls == [("set_persistence_mode", (False,))]


def test_power_limit_check_is_inclusive_of_the_reported_range() -> None:
    check = OPERATION["set_power_limit"].check
    assert check is not None
    gpu = RecordingGPU(3, (200_000, 700_000))
    check(gpu, PowerLimit(200_000))
    check(gpu, PowerLimit(700_000))
    for outside in (199_999, 700_001, 0):
        with pytest.raises(InvalidArgument) as caught:
            check(gpu, PowerLimit(outside))
        assert caught.value.status == 400
        assert str(caught.value) == f"power_limit_mw must be within 200000..700000 for GPU 3, got {outside}"
    check(RecordingGPU(0, None), PowerLimit(1))  # a device that reported no range: the device decides
    assert gpu.calls == []  # a check never touches the device


@pytest.mark.parametrize("name", ["set_gpu_locked_clocks", "set_mem_locked_clocks"])
def test_clock_range_check_refuses_min_above_max(name: str) -> None:
    check = OPERATION[name].check
    assert check is not None
    gpu = RecordingGPU(1)
    check(gpu, ClockRange(900, 900))  # equal is a fixed clock: allowed
    with pytest.raises(InvalidArgument) as caught:
        check(gpu, ClockRange(901, 900))
    assert caught.value.status == 400
    assert str(caught.value) == "min_clock_mhz (901) must not be greater than max_clock_mhz (900)"
    assert gpu.calls == []


def test_only_power_limit_and_clock_rows_have_checks() -> None:
    assert {op.name for op in OPERATIONS if op.check is not None} == {
        "set_power_limit", "set_gpu_locked_clocks", "set_mem_locked_clocks"
    }
