"""The ``gpu-control`` group: every control endpoint comes from the one operation table.

A new control operation is one row in :data:`zeusd.devices.gpu.control.OPERATIONS`;
this module turns each row into ``POST /gpu/<name>`` with the row's arguments
as its query (plus ``gpu_ids`` and ``block``).
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.iweb import IRequest

from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.control import OPERATIONS, ControlOperation, InvalidArgument
from zeusd.devices.gpu.manager import GpuManager
from zeusd.web.errors import BadRequest, DeviceErrors
from zeusd.web.params import Kind, Param, parse_query, require_existing
from zeusd.web.responses import empty_ok, install_error_handlers

GPU_IDS = Param("gpu_ids", Kind.TEXT)
BLOCK = Param("block", Kind.BOOL)
_KINDS = {int: Kind.U32, bool: Kind.BOOL}


def query_params(operation: ControlOperation[Any]) -> tuple[Param, ...]:
    """The endpoint's query: ``gpu_ids``, the operation's own arguments, ``block``."""
    own = tuple(Param(name, _KINDS[kind]) for name, kind in operation.argument_types().items())
    return (GPU_IDS, *own, BLOCK)


def gpu_control_app(gpus: GpuManager) -> Klein:
    app = Klein()
    install_error_handlers(app)

    def handle(request: IRequest, operation: ControlOperation[Any], params: tuple[Param, ...], names: tuple[str, ...]) -> Any:
        query = parse_query(request.uri, params)
        # Every id and argument is checked before anything is queued: a bad one changes nothing.
        ids = require_existing(query["gpu_ids"], "GPU", gpus.ids)
        arguments = operation.arguments(**{name: query[name] for name in names})
        try:
            gpus.check(operation, ids, arguments)
        except InvalidArgument as e:
            raise BadRequest(e.message) from None
        done = [(gpu, gpus.submit(gpu, operation, arguments)) for gpu in ids]
        if not query["block"]:
            return empty_ok(request)
        waits: list[Deferred[Any]] = [gpus.wait(gpu, d, operation) for gpu, d in done]

        def respond(outcomes: list[None | DeviceError]) -> bytes:
            failed = {gpu: outcome for (gpu, _), outcome in zip(done, outcomes) if isinstance(outcome, DeviceError)}
            if failed:
                raise DeviceErrors(failed)
            return empty_ok(request)

        if len(waits) == 1:
            return waits[0].addCallback(lambda outcome: respond([outcome]))
        return gatherResults(waits).addCallback(respond)

    for operation in OPERATIONS:
        route = app.route(f"/gpu/{operation.name}", methods=["POST"], endpoint=operation.name)
        names = tuple(operation.argument_types())
        route(
            lambda request, operation=operation, params=query_params(operation), names=names: handle(
                request, operation, params, names
            )
        )
    return app
