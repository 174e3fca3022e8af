"""The ``gpu-control`` group: every control endpoint comes from one table.

A new control operation is one :class:`ControlOperation` row: its path, its
parameters, the GPU method it calls and the log line it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.base import GPU
from zeusd.devices.gpu.manager import GpuManager
from zeusd.errors import DeviceErrors
from zeusd.web.params import Kind, Param, parse_query, require_existing
from zeusd.web.responses import empty_ok, install_error_handlers

GPU_IDS = Param("gpu_ids", Kind.TEXT)
BLOCK = Param("block", Kind.BOOL)
CLOCK_RANGE = (Param("min_clock_mhz", Kind.U32), Param("max_clock_mhz", Kind.U32))


@dataclass(frozen=True)
class ControlOperation:
    name: str
    params: tuple[Param, ...]
    apply: Callable[[GPU, Mapping[str, Any]], None]
    describe: Callable[[Mapping[str, Any]], str]

    @property
    def all_params(self) -> tuple[Param, ...]:
        return (GPU_IDS, *self.params, BLOCK)


def _reset_all_locked_clocks(gpu: GPU) -> None:
    """Both resets are attempted; the first error is the one reported."""
    errors = []
    for reset in (gpu.reset_gpu_locked_clocks, gpu.reset_mem_locked_clocks):
        try:
            reset()
        except DeviceError as e:
            errors.append(e)
    if errors:
        raise errors[0]


OPERATIONS: tuple[ControlOperation, ...] = (
    ControlOperation(
        "set_persistence_mode",
        (Param("enabled", Kind.BOOL),),
        lambda gpu, p: gpu.set_persistence_mode(p["enabled"]),
        lambda p: f"Persistence mode {'enabled' if p['enabled'] else 'disabled'}",
    ),
    ControlOperation(
        "set_power_limit",
        (Param("power_limit_mw", Kind.U32),),
        lambda gpu, p: gpu.set_power_limit_mw(p["power_limit_mw"]),
        lambda p: f"Power limit set to {p['power_limit_mw'] / 1000:g} W",
    ),
    ControlOperation(
        "set_gpu_locked_clocks",
        CLOCK_RANGE,
        lambda gpu, p: gpu.set_gpu_locked_clocks(p["min_clock_mhz"], p["max_clock_mhz"]),
        lambda p: f"GPU frequency set to [{p['min_clock_mhz']}, {p['max_clock_mhz']}] MHz",
    ),
    ControlOperation(
        "reset_gpu_locked_clocks",
        (),
        lambda gpu, p: gpu.reset_gpu_locked_clocks(),
        lambda p: "GPU locked clocks reset",
    ),
    ControlOperation(
        "set_mem_locked_clocks",
        CLOCK_RANGE,
        lambda gpu, p: gpu.set_mem_locked_clocks(p["min_clock_mhz"], p["max_clock_mhz"]),
        lambda p: f"Memory locked clocks set to [{p['min_clock_mhz']}, {p['max_clock_mhz']}] MHz",
    ),
    ControlOperation(
        "reset_mem_locked_clocks",
        (),
        lambda gpu, p: gpu.reset_mem_locked_clocks(),
        lambda p: "Memory locked clocks reset",
    ),
    ControlOperation(
        "reset_locked_clocks",
        (),
        lambda gpu, p: _reset_all_locked_clocks(gpu),
        lambda p: "GPU and memory locked clocks reset",
    ),
)


def gpu_control_resource(gpus: GpuManager) -> IResource:
    app = Klein()
    install_error_handlers(app)

    def handle(request: IRequest, operation: ControlOperation) -> Any:
        params = parse_query(request.uri, operation.all_params)
        # Every id is checked before anything is queued: a bad id changes nothing.
        ids = require_existing(params["gpu_ids"], "GPU", gpus.ids)
        description = operation.describe(params)
        done = [
            (gpu, gpus.submit(gpu, description, operation.apply, params)) for gpu in ids
        ]
        if not params["block"]:
            return empty_ok(request)
        waits: list[Deferred[Any]] = [gpus.wait(gpu, d) for gpu, d in done]

        def respond(outcomes: list[None | DeviceError]) -> bytes:
            failed = {gpu: outcome for (gpu, _), outcome in zip(done, outcomes) if isinstance(outcome, DeviceError)}
            if failed:
                raise DeviceErrors(failed)
            return empty_ok(request)

        return gatherResults(waits).addCallback(respond)

    for operation in OPERATIONS:
        route = app.route(f"/gpu/{operation.name}", methods=["POST"], endpoint=operation.name)
        route(lambda request, operation=operation: handle(request, operation))
    return app.resource()
