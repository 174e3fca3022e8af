"""The ``cpu-read`` group: RAPL energy, one-shot power and power streams."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from zeusd.devices.cpu.manager import CpuManager, EnergySample, PackagePower, power_between
from zeusd.devices.readings import Results, split_results, wall_clock_ms
from zeusd.web.errors import DeviceErrors, all_or_errors
from zeusd.devices.readings import Sample
from zeusd.streaming import StreamHub
from zeusd.web.streams import stream_response
from zeusd.web.params import Kind, Param, id_map, parse_query, require_existing, select_known
from zeusd.web.responses import install_error_handlers, json_response

CPU_IDS = Param("cpu_ids", Kind.TEXT, required=False)
ENERGY_PARAMS = (CPU_IDS, Param("cpu", Kind.BOOL), Param("dram", Kind.BOOL))
STREAM_PARAMS = (CPU_IDS, Param("format", Kind.TEXT, required=False))


def _power_entry(power: PackagePower) -> dict[str, Any]:
    return {"cpu_mw": power.cpu_mw, "dram_mw": power.dram_mw}


def cpu_read_app(reactor: Any, cpus: CpuManager, streams: StreamHub, window_s: float) -> Klein:
    """``window_s``: how long a one-shot power reading measures when no stream is running."""
    app = Klein()
    install_error_handlers(app)

    @app.route("/cpu/get_cumulative_energy", methods=["GET"])
    def get_cumulative_energy(request: IRequest) -> Any:
        params = parse_query(request.uri, ENERGY_PARAMS)
        ids = require_existing(params["cpu_ids"], "CPU", cpus.ids)

        def respond(results: Results[tuple[int | None, int | None]]) -> bytes:
            energy = all_or_errors(results)
            return json_response(
                request, id_map({i: {"cpu_energy_uj": c, "dram_energy_uj": d} for i, (c, d) in energy.items()})
            )

        return cpus.read_energy(ids, params["cpu"], params["dram"]).addCallback(respond)

    @app.route("/cpu/get_power", methods=["GET"])
    def get_power(request: IRequest) -> Any:
        params = parse_query(request.uri, (CPU_IDS,))
        ids = select_known(params["cpu_ids"], "CPU", cpus.ids)
        # A running stream already measured every package it polls: reuse its
        # newest delta when it covers the request and is at most a period old.
        fresh = streams.fresh_sample(streams.period * 1.5)
        if fresh is not None and all(i in fresh.readings for i in ids):
            return json_response(request, _power_body(fresh, ids))
        if not ids:
            return json_response(request, {"timestamp_ms": wall_clock_ms(), "power_mw": {}})
        return _measure(ids).addCallback(lambda body: json_response(request, body))

    def _measure(ids: list[int]) -> "Deferred[dict[str, Any]]":
        def second(first: Results[EnergySample]) -> "Deferred[dict[str, Any]]":
            ok_first, failed_first = split_results(first)
            if not ok_first:
                raise DeviceErrors(failed_first)
            delay: Deferred[Any] = task.deferLater(reactor, window_s, lambda: None)
            delay.addCallback(lambda _: cpus.sample(list(ok_first)))
            return delay.addCallback(lambda after: _compute(ok_first, failed_first, after))

        return cpus.sample(ids).addCallback(second)

    def _compute(before: dict[int, EnergySample], failed: dict[int, Any], after: Results[EnergySample]) -> dict[str, Any]:
        ok_after, failed_after = split_results(after)
        failed = {**failed, **failed_after}
        if not ok_after:
            raise DeviceErrors(failed)
        powers = {i: power_between(before[i], s) for i, s in ok_after.items()}
        body: dict[str, Any] = {
            "timestamp_ms": max(s.timestamp_ms for s in ok_after.values()),
            "power_mw": id_map({i: _power_entry(p) for i, p in powers.items()}),
        }
        if failed:
            body["errors"] = id_map({i: e.message for i, e in failed.items()})
        return body

    @app.route("/cpu/stream_power", methods=["GET"])
    def stream_power(request: IRequest) -> Any:
        params = parse_query(request.uri, STREAM_PARAMS)
        ids = select_known(params["cpu_ids"], "CPU", cpus.ids)
        return stream_response(streams, request, ids, params["format"])

    return app


def _power_body(sample: Sample, ids: list[int]) -> dict[str, Any]:
    return {
        "timestamp_ms": sample.timestamp_ms,
        "power_mw": id_map({i: _power_entry(sample.readings[i].value) for i in ids}),
    }
