"""Drive the official Zeus client from a test, one JSON command per line.

Run with the python of ``.venv-zeus-0.15`` or ``.venv-zeus-0.16`` (this file
imports only the standard library and ``zeus``). Each line read from stdin is a
JSON object ``{"op": ..., ...}``; each answer is one JSON line on stdout:
``{"ok": <result>}`` or ``{"error": {"type", "types", "message"}}``. The
process stays alive between commands so that clients, GPU/CPU objects and
``PowerStreamingClient`` threads persist while the test changes the daemons
(e.g. restarts one) underneath them.

Nothing here reimplements a request: every HTTP call is made by zeus itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import zeus
from zeus.utils import zeusd as zeusd_mod
from zeus.utils.zeusd import ZeusdClient, ZeusdConfig

# --------------------------------------------------------------------------- capture

_records: list[dict[str, Any]] = []
_thread_errors: list[dict[str, Any]] = []
_lock = threading.Lock()


class _Capture(logging.Handler):
    """Keep zeus's log records: the tests assert on warnings such as 'Malformed ... SSE event'."""

    def emit(self, record: logging.LogRecord) -> None:
        with _lock:
            _records.append({"logger": record.name, "level": record.levelname, "message": record.getMessage()})


logging.getLogger("zeus").addHandler(_Capture())
logging.getLogger("zeus").setLevel(logging.INFO)


def _excepthook(args: threading.ExceptHookArgs) -> None:
    with _lock:
        _thread_errors.append(
            {
                "thread": args.thread.name if args.thread else None,
                "type": args.exc_type.__name__,
                "message": str(args.exc_value),
            }
        )


threading.excepthook = _excepthook

# --------------------------------------------------------------------------- conversion


def plain(value: Any) -> Any:
    """zeus results (dataclasses, int-keyed dicts, tuples, sets) as JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "types": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
    }


# --------------------------------------------------------------------------- state

clients: dict[str, ZeusdClient] = {}
streams: dict[str, Any] = {}


def config(spec: dict[str, Any]) -> ZeusdConfig | None:
    """``{"kind": "env"}``, ``{"kind": "uds", "path"}`` or ``{"kind": "tcp", "host", "port"}``."""
    kind = spec.get("kind", "env")
    extra = {k: spec[k] for k in ("token", "gpu_indices", "cpu_indices") if k in spec}
    if kind == "env":
        return ZeusdConfig.from_env()
    if kind == "uds":
        return ZeusdConfig.uds(spec["path"], **extra)
    return ZeusdConfig.tcp(spec["host"], int(spec["port"]), **extra)


def describe(client: ZeusdClient) -> dict[str, Any]:
    out: dict[str, Any] = {
        "endpoint": client.endpoint,
        "gpu_ids": client.gpu_ids,
        "cpu_ids": client.cpu_ids,
        "dram_available": client.dram_available,
        "enabled_api_groups": sorted(client._enabled_api_groups),
        "auth_required": client.auth_required,
        "auth_error": client.auth_error,
        "granted_scopes": sorted(client.granted_scopes),
        "can_read_gpu": client.can_read_gpu,
        "can_control_gpu": client.can_control_gpu,
        "can_read_cpu": client.can_read_cpu,
    }
    if hasattr(client, "gpus"):  # zeus 0.16
        out["gpus"] = plain(client.gpus)
        out["cpus"] = plain(client.cpus)
    return out


def op_version(cmd: dict[str, Any]) -> Any:
    return {"zeus": zeus.__version__, "python": sys.version.split()[0], "pid": os.getpid()}


def op_env(cmd: dict[str, Any]) -> Any:
    for key, value in cmd.get("set", {}).items():
        os.environ[key] = value
    for key in cmd.get("unset", []):
        os.environ.pop(key, None)
    return {k: v for k, v in os.environ.items() if k.startswith("ZEUSD_")}


def op_client(cmd: dict[str, Any]) -> Any:
    client = ZeusdClient(config(cmd.get("config", {})))
    clients[cmd.get("name", "default")] = client
    return describe(client)


def invoke(target: Any, cmd: dict[str, Any]) -> Any:
    """Call ``target.<method>(*args, **kwargs)``; a property is simply read."""
    attribute = getattr(target, cmd["method"])
    if not callable(attribute):
        return plain(attribute)
    return plain(attribute(*cmd.get("args", []), **cmd.get("kwargs", {})))


def op_call(cmd: dict[str, Any]) -> Any:
    return invoke(clients[cmd.get("client", "default")], cmd)


def op_require(cmd: dict[str, Any]) -> Any:
    zeusd_mod.require_capabilities(clients[cmd.get("client", "default")], **cmd.get("kwargs", {}))
    return True


def op_gpus(cmd: dict[str, Any]) -> Any:
    """``zeus.device.get_gpus()`` afresh: picks ZeusdNVIDIAGPU when ZEUSD_* is set."""
    import zeus.device.gpu as gpu_mod

    gpu_mod._gpus = None
    gpus = gpu_mod.get_gpus()
    return {"classes": [type(g).__name__ for g in gpus.gpus], "names": [g.get_name() for g in gpus.gpus]}


def op_gpu(cmd: dict[str, Any]) -> Any:
    import zeus.device.gpu as gpu_mod

    assert gpu_mod._gpus is not None, "run op gpus first"
    return invoke(gpu_mod._gpus.gpus[int(cmd["index"])], cmd)


def op_cpus(cmd: dict[str, Any]) -> Any:
    """``zeus.device.get_cpus()`` afresh, with the local RAPL directory pointed at the test tree
    (zeus looks for /sys/class/powercap/intel-rapl to number the packages)."""
    import zeus.device.cpu as cpu_mod
    import zeus.device.cpu.rapl as rapl

    rapl.RAPL_DIR = cmd["rapl_dir"]
    cpu_mod._cpus = None
    cpus = cpu_mod.get_cpus()
    return {
        "classes": [type(c).__name__ for c in cpus.cpus],
        "indices": [c.cpu_index for c in cpus.cpus],
        "dram": [c.supports_get_dram_energy_consumption() for c in cpus.cpus],
    }


def op_cpu(cmd: dict[str, Any]) -> Any:
    import zeus.device.cpu as cpu_mod

    assert cpu_mod._cpus is not None, "run op cpus first"
    return invoke(cpu_mod._cpus.cpus[int(cmd["index"])], cmd)


monitors: dict[str, Any] = {}


def op_monitor_begin(cmd: dict[str, Any]) -> Any:
    """A fresh ``ZeusMonitor`` (GPU and CPU objects rebuilt from ZEUSD_*), window opened.
    ``sync_execution=False``: no deep-learning framework is installed."""
    import zeus.device.cpu as cpu_mod
    import zeus.device.cpu.rapl as rapl
    import zeus.device.gpu as gpu_mod
    from zeus.monitor import ZeusMonitor

    rapl.RAPL_DIR = cmd["rapl_dir"]
    gpu_mod._gpus = None
    cpu_mod._cpus = None
    monitor = ZeusMonitor(gpu_indices=cmd.get("gpu_indices"), cpu_indices=cmd.get("cpu_indices"))
    monitor.begin_window("window", sync_execution=False)
    monitors[cmd.get("name", "default")] = monitor
    return {
        "gpus": [type(g).__name__ for g in monitor.gpus.gpus],
        "cpus": [type(c).__name__ for c in monitor.cpus.cpus],
    }


def op_monitor_end(cmd: dict[str, Any]) -> Any:
    measurement = monitors.pop(cmd.get("name", "default")).end_window("window", sync_execution=False)
    return plain(measurement)


def op_stream_start(cmd: dict[str, Any]) -> Any:
    from zeus.monitor.power_streaming import PowerStreamingClient

    servers = [config(s) for s in cmd["servers"]]
    client = PowerStreamingClient(servers=servers, reconnect_delay_s=float(cmd.get("reconnect_delay_s", 1.0)))
    streams[cmd.get("name", "default")] = client
    return {
        "endpoints": [s.endpoint for s in servers if s is not None],
        "threads": [t.name for t in client._threads],
        "clock_offsets": dict(client._clock_offsets),
    }


def op_stream_power(cmd: dict[str, Any]) -> Any:
    client = streams[cmd.get("name", "default")]
    return {
        "now": time.time(),
        "readings": plain(client.get_power()),
        "alive": sorted(t.name for t in client._threads if t.is_alive()),
        "clock_offsets": dict(client._clock_offsets),
    }


def op_stream_iter(cmd: dict[str, Any]) -> Any:
    """Take ``count`` snapshots from the blocking iterator (give up after ``timeout`` s)."""
    client = streams[cmd.get("name", "default")]
    count, deadline = int(cmd["count"]), time.monotonic() + float(cmd.get("timeout", 20))
    out: list[Any] = []
    for snapshot in client:
        out.append(plain(snapshot))
        if len(out) >= count or time.monotonic() > deadline:
            break
    return out


def op_stream_stop(cmd: dict[str, Any]) -> Any:
    client = streams.pop(cmd.get("name", "default"))
    client.stop()
    return True


def op_logs(cmd: dict[str, Any]) -> Any:
    with _lock:
        out = {"records": list(_records), "thread_errors": list(_thread_errors)}
        if cmd.get("clear", True):
            _records.clear()
            _thread_errors.clear()
    return out


OPS: dict[str, Callable[[dict[str, Any]], Any]] = {
    name[3:]: fn for name, fn in globals().items() if name.startswith("op_") and callable(fn)
}


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # anything zeus prints must not corrupt the answer stream
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            answer: dict[str, Any] = {"ok": OPS[cmd["op"]](cmd)}
        except Exception as exc:  # reported to the test, which decides
            answer = {"error": error(exc), "traceback": traceback.format_exc(limit=4)}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
