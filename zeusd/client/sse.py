"""Server-Sent Events: the byte stream split into events, and zeusd's power events read."""

from __future__ import annotations

from typing import Any

from zeusd.client.errors import ZeusdProtocolError
from zeusd.client.types import DeviceKind, DevicePower, cpu_package_power

#: An SSE frame larger than this is not a zeusd event: the stream is abandoned.
MAX_EVENT_BYTES = 1 << 20


class SSEParser:
    """Splits an SSE byte stream into the payloads of its ``data:`` fields.

    Events end at a blank line; comment lines (``: keepalive``) and other
    fields are ignored; CRLF is accepted though zeusd only writes LF.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[str]:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        payloads: list[str] = []
        while True:
            frame, sep, rest = self._buffer.partition(b"\n\n")
            if not sep:
                break
            self._buffer = rest
            lines = [line[5:] for line in frame.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(l[1:] if l.startswith(b" ") else l for l in lines).decode("utf-8", "replace"))
        if len(self._buffer) > self._max:
            raise ZeusdProtocolError(f"an SSE event exceeded {self._max} bytes")
        return payloads


def parse_power_event(kind: DeviceKind, event: Any) -> list[DevicePower]:
    """One decoded event → its device samples; both wire formats.

    v0.4: ``{"timestamp_ms":T,"power_mw":{"0":151234}}`` (GPU) or
    ``{"power_mw":{"0":{"cpu_mw":..,"dram_mw":..}}}`` (CPU).
    v0.5: ``{"timestamp_ms":T,"gpu_id":0,"power_mw":151234}`` or
    ``{"timestamp_ms":T,"cpu_id":0,"cpu_mw":..,"dram_mw":..}`` (our CPU events also
    carry the v0.4 snapshot under ``power_mw``; the per-device fields win, so a
    package is never counted twice). Raises ValueError for anything else.
    """
    if not isinstance(event, dict):
        raise ValueError("event is not a JSON object")
    ts = event.get("timestamp_ms")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise ValueError("event has no integer timestamp_ms")
    id_key = "gpu_id" if kind == "gpu" else "cpu_id"
    if id_key in event:
        index = event[id_key]
        if kind == "gpu":
            mw = event.get("power_mw")
            if not isinstance(index, int) or not isinstance(mw, (int, float)) or isinstance(mw, bool):
                raise ValueError("malformed per-GPU event")
            return [DevicePower("gpu", index, ts, int(mw))]
        cpu_mw, dram_mw = event.get("cpu_mw"), event.get("dram_mw")
        if not isinstance(index, int) or not isinstance(cpu_mw, (int, float)) or isinstance(cpu_mw, bool):
            raise ValueError("malformed per-CPU event")
        if dram_mw is not None and not isinstance(dram_mw, (int, float)):
            raise ValueError("malformed per-CPU event: dram_mw")
        return [DevicePower("cpu", index, ts, int(cpu_mw), None if dram_mw is None else int(dram_mw))]
    snapshot = event.get("power_mw")
    if not isinstance(snapshot, dict):
        raise ValueError(f"event has neither {id_key} nor a power_mw map")
    samples = []
    for key, value in snapshot.items():
        if kind == "gpu":
            samples.append(DevicePower("gpu", int(key), ts, int(value)))
        else:
            entry = cpu_package_power(value)
            samples.append(DevicePower("cpu", int(key), ts, entry.cpu_mw, entry.dram_mw))
    return samples


__all__ = ["MAX_EVENT_BYTES", "SSEParser", "parse_power_event"]
