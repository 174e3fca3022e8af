"""Smoke test of the benchmark driver: ``bench/run.py --quick`` end to end.

Only structure and sanity are checked (every scenario present, numbers
numeric, events flowing, the idle read count an integer): the numbers of a
quick run on a shared machine mean nothing, so nothing here is timed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"


def numbers(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf under ``node`` with its dotted path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numbers(value, f"{path}[{i}]")
    else:
        yield path, node


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "latest.json").read_text()), out, result.stdout


def test_writes_latest_and_a_timestamped_copy(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    data, out, _ = quick_run
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1
    assert json.loads(stamped[0].read_text()) == data
    assert data["meta"]["quick"] is True


def test_every_scenario_is_there_with_numbers(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    s = quick_run[0]["scenarios"]
    assert set(s) >= {
        "device_calls", "auth_verify", "scrape", "loadgen_ceiling", "idle", "latency", "throughput", "streaming", "memory",
        "startup",
    }  # fmt: skip
    for transport in ("unix", "tcp"):
        assert set(s["latency"][transport]) == {"discover", "gpu_get_power", "cpu_get_power", "gpu_set_power_limit"}
    assert set(s["throughput"]) == {"conns_1", "conns_16", "conns_64"}
    assert set(s["loadgen_ceiling"]) == {"conns_1", "conns_16", "conns_64"}
    assert set(s["streaming"]) == {"subs_1", "subs_100", "subs_1000"}
    assert {"idle_rss_mb", "subs_1000_rss_mb", "stalled", "stalled_tcp"} <= set(s["memory"])
    for path, value in numbers(s):
        if path.endswith(".transport"):
            assert value in ("unix", "tcp")
            continue
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path} = {value!r}"
        assert math.isfinite(value), f"{path} = {value!r}"


def test_values_are_sane(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    s = quick_run[0]["scenarios"]
    for transport in ("unix", "tcp"):
        for name, r in s["latency"][transport].items():
            assert r["requests"] > 0, (transport, name)
            assert r["errors"] == 0 and r["non2xx"] == 0, (transport, name, r)
            assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"], (transport, name)
        assert "overhead_us" in s["latency"][transport]["gpu_set_power_limit"]
    for key, r in s["throughput"].items():
        assert r["requests"] > 0 and r["rps"] > 0 and r["errors"] == 0, key
        assert s["loadgen_ceiling"][key]["rps"] > 0, key
    for key, r in s["streaming"].items():
        assert r["subscribers"] >= 1 and r["events"] > 0 and r["events_per_s"] > 0, key
        assert r["device_power_reads"] > 0 and r["device_reads_per_tick_per_gpu"] > 0, key
        assert r["closed_by_server"] == 0, key
    assert isinstance(s["idle"]["device_power_reads"], int)
    assert s["idle"]["device_power_reads"] >= 0
    assert s["memory"]["idle_rss_mb"] > 0 and s["memory"]["subs_1000_rss_mb"] > 0
    for key, transport in (("stalled", "unix"), ("stalled_tcp", "tcp")):
        stalled = s["memory"][key]
        assert stalled["transport"] == transport
        assert stalled["subscribers"] >= 1
        assert stalled["disconnected"] + stalled["open_at_end"] <= stalled["subscribers"]
        assert stalled["rss_start_mb"] <= stalled["rss_max_mb"]
    assert s["startup"]["median_s"] > 0
    assert s["device_calls"]["set_power_limit_us"]["n"] > 0
    assert {name: d["n"] for name, d in s["auth_verify"].items()} == {"uncached_us": 50, "cached_us": 50, "wrong_key_us": 50}
    assert s["scrape"]["round_trip_us"]["n"] == 5 and s["scrape"]["server_mean_us"] > 0
    assert s["scrape"]["body_bytes"] > 1000


def test_targets_and_table(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    data, out, stdout = quick_run
    targets = data["targets"]
    from bench.run import TARGETS

    assert [t["key"] for t in targets] == [t.key for t in TARGETS] and len(targets) == 13
    for t in targets:
        assert t["result"] in ("PASS", "MISS") and t["value"] is not None, t
        assert t["label"] in stdout
    result = subprocess.run(
        [sys.executable, str(RUN), "--markdown", str(out / "latest.json")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "| target | measured | goal | result |" in result.stdout
