"""The ``gpu-read`` group: power (one-shot and streamed), energy, limits, persistence."""

from __future__ import annotations

from typing import Any, Callable

from klein import Klein
from twisted.web.iweb import IRequest

from zeusd.devices.gpu.base import GPU
from zeusd.devices.gpu.manager import GpuManager
from zeusd.devices.readings import Reading, Results, split_results, wall_clock_ms
from zeusd.web.errors import DeviceErrors, all_or_errors
from zeusd.streaming import StreamHub
from zeusd.web.streams import stream_response
from zeusd.web.live_page import add_live_page
from zeusd.web.params import Kind, Param, id_map, parse_query, require_existing, select_known
from zeusd.web.responses import install_error_handlers, json_response

GPU_IDS = (Param("gpu_ids", Kind.TEXT, required=False),)
STREAM_PARAMS = (*GPU_IDS, Param("format", Kind.TEXT, required=False))

#: Queued per-GPU reads: path → (what, read, JSON value for one GPU).
QUEUED_READS: dict[str, tuple[str, Callable[[GPU], Any], Callable[[Any], Any]]] = {
    "get_cumulative_energy": ("energy read", lambda g: g.get_total_energy_mj(), lambda mj: {"energy_mj": mj}),
    "get_power_limit": ("power limit read", lambda g: g.get_power_limit_mw(), lambda mw: {"power_limit_mw": mw}),
    "get_power_limit_constraints": (
        "power limit constraints read",
        lambda g: g.get_power_limit_constraints_mw(),
        lambda c: {"min_power_limit_mw": c[0], "max_power_limit_mw": c[1]},
    ),
    "get_persistence_mode": (
        "persistence mode read",
        lambda g: g.get_persistence_mode(),
        lambda on: {"enabled": on},
    ),
}


def power_body(results: Results[Reading[int]]) -> dict[str, Any]:
    """A snapshot of the GPUs that answered; failures ride along under ``errors``.

    Only when every requested GPU failed is the whole request an error: one
    sick GPU must not hide the others' power from monitoring clients.
    """
    ok, failed = split_results(results)
    if failed and not ok:
        raise DeviceErrors(failed)
    body: dict[str, Any] = {
        "timestamp_ms": max((r.timestamp_ms for r in ok.values()), default=wall_clock_ms()),
        "power_mw": id_map({i: r.value for i, r in ok.items()}),
    }
    if failed:
        body["errors"] = id_map({i: e.message for i, e in failed.items()})
    return body


def gpu_read_app(gpus: GpuManager, streams: StreamHub | None) -> Klein:
    app = Klein()
    install_error_handlers(app)
    add_live_page(app)

    @app.route("/gpu/get_power", methods=["GET"])
    def get_power(request: IRequest) -> Any:
        params = parse_query(request.uri, GPU_IDS)
        ids = select_known(params["gpu_ids"], "GPU", gpus.ids)
        return gpus.read_power(ids).addCallback(lambda r: json_response(request, power_body(r)))

    def queued_read(request: IRequest, path: str) -> Any:
        what, read, shape = QUEUED_READS[path]
        params = parse_query(request.uri, GPU_IDS)
        ids = require_existing(params["gpu_ids"], "GPU", gpus.ids)

        def respond(results: Results[Any]) -> bytes:
            return json_response(request, id_map({i: shape(v) for i, v in all_or_errors(results).items()}))

        return gpus.read_queued(ids, read, what).addCallback(respond)

    for path in QUEUED_READS:
        app.route(f"/gpu/{path}", methods=["GET"], endpoint=path)(
            lambda request, path=path: queued_read(request, path)
        )

    if streams is not None:

        @app.route("/gpu/stream_power", methods=["GET"])
        def stream_power(request: IRequest) -> Any:
            params = parse_query(request.uri, STREAM_PARAMS)
            ids = select_known(params["gpu_ids"], "GPU", gpus.ids)
            return stream_response(streams, request, ids, params["format"])

    return app
