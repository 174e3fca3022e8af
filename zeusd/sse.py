"""Server-Sent Event encodings of power samples: the one place that knows the wire shapes.

An encoder turns one sample (the readings of one poll) and a subscriber's
device filter into the bytes of zero or more SSE events. Adding a format is
adding an encoder to a table; the poller never changes.

* ``v0.4`` (zeus 0.15.x): one snapshot event per poll,
  ``{"timestamp_ms":T,"power_mw":{"0":151234,"1":98765}}``.
* ``v0.5`` (zeus 0.16.x): one event per device. GPU events are
  ``{"timestamp_ms":T,"gpu_id":0,"power_mw":151234}``; CPU events also carry
  the whole snapshot under ``power_mw``, which both client generations accept.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from zeusd.devices.readings import Sample

#: An SSE comment: ignored by every client, keeps proxies and readers sure the stream is alive.
KEEPALIVE = b": keepalive\n\n"


Encoder = Callable[[Sample, Sequence[int]], bytes]


def _event(json_text: str) -> str:
    return f"data: {json_text}\n\n"


def _null(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _snapshot(sample: Sample, ids: Sequence[int], entry: Callable[[Any], str]) -> bytes:
    readings = sample.readings
    power = ",".join(f'"{i}":{entry(readings[i].value)}' for i in ids if i in readings)
    return _event(f'{{"timestamp_ms":{sample.timestamp_ms},"power_mw":{{{power}}}}}').encode()


def gpu_snapshot(sample: Sample, ids: Sequence[int]) -> bytes:
    return _snapshot(sample, ids, lambda mw: str(int(mw)))


def gpu_per_device(sample: Sample, ids: Sequence[int]) -> bytes:
    readings = sample.readings
    return "".join(
        _event(f'{{"timestamp_ms":{readings[i].timestamp_ms},"gpu_id":{i},"power_mw":{int(readings[i].value)}}}')
        for i in ids
        if i in readings
    ).encode()


def _cpu_entry(power: Any) -> str:
    return f'{{"cpu_mw":{int(power.cpu_mw)},"dram_mw":{_null(power.dram_mw)}}}'


def cpu_snapshot(sample: Sample, ids: Sequence[int]) -> bytes:
    return _snapshot(sample, ids, _cpu_entry)


def cpu_per_device(sample: Sample, ids: Sequence[int]) -> bytes:
    readings = sample.readings
    present = [i for i in ids if i in readings]
    snapshot = ",".join(f'"{i}":{_cpu_entry(readings[i].value)}' for i in present)
    return "".join(
        _event(
            f'{{"timestamp_ms":{readings[i].timestamp_ms},"cpu_id":{i},'
            f'"cpu_mw":{int(readings[i].value.cpu_mw)},"dram_mw":{_null(readings[i].value.dram_mw)},'
            f'"power_mw":{{{snapshot}}}}}'
        )
        for i in present
    ).encode()


GPU_ENCODERS: Mapping[str, Encoder] = {"v0.4": gpu_snapshot, "v0.5": gpu_per_device}
CPU_ENCODERS: Mapping[str, Encoder] = {"v0.4": cpu_snapshot, "v0.5": cpu_per_device}
FORMATS: tuple[str, ...] = ("v0.4", "v0.5")
