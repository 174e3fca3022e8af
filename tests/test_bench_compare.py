"""Smoke test of the side-by-side harness, bench/compare.py.

Its pieces run for real without upstream zeusd: the launcher script (and its
mount namespace where this is root), the Klein floor, the module probe on our
daemon, the Makefile's message when cargo is missing. The bookkeeping
(schedule, import tree, figures) is checked in memory. The end-to-end
``--quick`` run needs upstream zeusd v0.4.0 built by ``make bench-compare``
and root; without them it skips and says which is missing. Nothing is timed
except behaviour that is structural (upstream's one-shot waits for a poll).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.compare import (
    DEFAULT_UPSTREAM,
    ENV_RAPL,
    KLEIN,
    OURS,
    SYS_POWERCAP,
    UPSTREAM,
    Contestants,
    ImportTree,
    Pinning,
    analyse_modules,
    figures,
    floor_figures,
    interleave,
    launcher_argv,
    probe_modules,
    sandbox_works,
)
from bench.run import http_get
from tests.fakenvml import FakeNvml, build_library
from tests.rapl_tree import RaplTree

REPO = Path(__file__).resolve().parent.parent
COMPARE = REPO / "bench" / "compare.py"


# --------------------------------------------------------------------------- in memory


def test_interleave_rotates_the_contestants_each_repetition() -> None:
    schedule = list(interleave({"a": ("unix", ("x", "y"), 1), "b": ("tcp", ("x", "y", "z"), 1), "c": ("unix", ("x", "y"), 2)}, 2))
    assert schedule == [
        ("a", 0, "x"), ("a", 0, "y"), ("a", 1, "y"), ("a", 1, "x"),
        ("b", 0, "x"), ("b", 0, "y"), ("b", 0, "z"), ("b", 1, "y"), ("b", 1, "z"), ("b", 1, "x"),
        ("c", 0, "x"), ("c", 0, "y"), ("c", 1, "y"), ("c", 1, "x"), ("c", 2, "x"), ("c", 2, "y"), ("c", 3, "y"), ("c", 3, "x"),
    ]  # fmt: skip


def test_pinning_daemons_on_the_last_cpu_load_on_the_rest() -> None:
    assert Pinning.choose({0, 1, 2, 3}) == Pinning(frozenset({3}), frozenset({0, 1, 2}))
    assert Pinning.choose({5}) == Pinning(frozenset(), frozenset())


# Children print before their parent (two spaces of indent per level); "failed" appears twice: an
# attempt inside zeusd.metrics that failed, then the import inside twisted.web.
IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _ssl
import time:       200 |        300 | ssl
import time:        50 |         50 |     failed
import time:        10 |         60 |   zeusd.metrics
import time:        30 |         30 |       http.server
import time:        40 |         70 |     prometheus_client.core
import time:         5 |         75 |   prometheus_client
import time:        60 |         60 |     failed
import time:       500 |        560 |   twisted.web
import time:       400 |       1095 | zeusd.service
"""
LOADED = ["__main__", "_ssl", "ssl", "failed", "zeusd.metrics", "http.server", "prometheus_client.core",
          "prometheus_client", "twisted.web", "zeusd.service", "zeusd.__main__"]  # fmt: skip


def test_import_tree_parents_and_unused_modules() -> None:
    tree = ImportTree.parse(IMPORTTIME)
    assert [a.name for a in tree.ancestors("http.server")] == ["prometheus_client.core", "prometheus_client", "zeusd.service"]
    assert [a.name for a in tree.ancestors("failed")] == ["twisted.web", "zeusd.service"]  # the last line wins
    a = analyse_modules(LOADED, tree)
    assert a["loaded"] == len(LOADED)
    assert a["unused"]["tls"]["modules"] == ["_ssl", "ssl"]
    assert a["unused"]["tls"]["import_ms"] == 0.3  # ssl's cumulative only: _ssl was imported inside it
    assert a["unused"]["tls"]["imported_by"] == ["ssl <- top level"]
    assert a["unused"]["metrics"]["modules"] == ["zeusd.metrics", "prometheus_client.core", "prometheus_client"]
    assert a["unused"]["metrics"]["import_ms"] == pytest.approx(0.135)  # zeusd.metrics + prometheus_client
    assert a["unused"]["metrics"]["imported_by"] == ["zeusd.metrics <- zeusd.service", "prometheus_client <- zeusd.service"]
    # http.server was first imported for prometheus_client: not needed; neither are __main__ modules.
    assert a["needed"] == ["failed", "twisted.web", "zeusd.service"]
    assert a["needed_stack"] == ["failed", "twisted.web"]
    assert a["importtime_total_ms"] == pytest.approx(1.395)


def run_of(**values: Any) -> dict[str, Any]:
    return {"latency_us": {"p50": values.get("p50", 1000.0)}, "daemon_cpu_per_s": values.get("cpu", 0.1),
            "events_per_s": 20.0, "device_power_reads": values.get("reads", 0), "rss_mb": values.get("rss", 50.0)}  # fmt: skip


def test_figures_are_medians_and_ratios_ours_over_upstream() -> None:
    scen = ("idle", "idle_tcp", "discover", "gpu_get_power", "gpu_set_power_limit", "stream", "idle_after_stream",
            "idle_after_stream_constant")  # fmt: skip
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        OURS: {s: [run_of(p50=1000, rss=60), run_of(p50=3000, rss=60), run_of(p50=2000, rss=60)] for s in scen},
        UPSTREAM: {s: [run_of(p50=50_000, reads=40, rss=10)] for s in scen},
        KLEIN: {"idle": [run_of(rss=50)], "idle_tcp": [run_of(rss=48)]},
    }
    starts = {OURS: {"unix": [0.7, 0.9, 0.8], "tcp": [0.6]}, UPSTREAM: {"unix": [0.01], "tcp": [0.01]},
              KLEIN: {"unix": [0.5], "tcp": [0.4]}}  # fmt: skip
    by_key = {f["key"]: f for f in figures(runs, starts)}
    assert by_key["get_power_p50"]["ours"] == 2.0 and by_key["get_power_p50"]["upstream"] == 50.0
    assert by_key["get_power_p50"]["ratio"] == pytest.approx(0.04)
    assert by_key["idle_reads_constant"]["upstream"] == 40 and by_key["idle_reads_constant"]["ratio"] is None
    assert by_key["startup"]["ours"] == 0.8 and by_key["startup"]["ratio"] == pytest.approx(80.0)
    imports = {k: {"median_s": v} for k, v in (("interpreter", 0.05), ("stack", 0.4), ("stack_without_tls", 0.3), ("needed", 0.5))}
    floors = {f["key"]: f for f in floor_figures(runs, starts, imports)}
    assert floors["rss_idle_uds"]["ratio"] == pytest.approx(1.2) and floors["rss_idle_tcp"]["floor"] == 48
    assert floors["startup_vs_imports"]["ratio"] == pytest.approx(2.0)
    assert floors["startup_vs_klein"]["ratio"] == pytest.approx(1.6)


# --------------------------------------------------------------------------- real pieces, no upstream


def test_launcher_reports_the_exec_and_joins_stderr_to_the_log() -> None:
    r = subprocess.run(launcher_argv(["sh", "-c", "echo out; echo err >&2"], sandbox=False), capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr == "started\n"  # the launcher's only word; the program's stderr went to stdout
    assert r.stdout.split() == ["out", "err"]


@pytest.fixture
def contestants(tmp_path: Path) -> Contestants:
    build_library()
    fake = FakeNvml(tmp_path / "nvml.state")
    fake.create(4)
    rapl = RaplTree(tmp_path / "powercap")
    rapl.add_package(0, dram_energy_uj=100_000, name="package-bench")
    return Contestants(tmp_path, fake.state_path, tmp_path / "no-upstream", Pinning(frozenset(), frozenset()), False, rapl.root)


def test_sandbox_puts_the_rapl_tree_where_upstream_reads_it(contestants: Contestants) -> None:
    works, why = sandbox_works(contestants.workdir, contestants.rapl_tree)
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        assert not works
        pytest.skip(f"the mount namespace needs root and unshare: {why}")
    assert works, why
    name = SYS_POWERCAP / "intel-rapl" / "intel-rapl:0" / "name"
    inside = subprocess.run(launcher_argv(["cat", str(name)], sandbox=True), capture_output=True, text=True,
                            env={**os.environ, ENV_RAPL: str(contestants.rapl_tree)})  # fmt: skip
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == "package-bench\n"
    assert not name.exists() or name.read_text() != "package-bench\n"  # the host's view is untouched


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_klein_floor_answers_its_one_route(contestants: Contestants, transport: str) -> None:
    with contestants.make(KLEIN, transport, f"klein-{transport}").start() as d:
        assert d.startup_s > 0
        assert http_get(d.address, "/discover") == 200
        assert http_get(d.address, "/gpu/get_power") == 404


def test_module_probe_lists_what_our_running_daemon_imported(contestants: Contestants) -> None:
    loaded, importtime, shared_objects = probe_modules(contestants)
    assert {"zeusd.service", "zeusd.devices.gpu.nvml", "pynvml", "klein"} <= set(loaded)
    tree = ImportTree.parse(importtime)
    assert tree.get("zeusd.service") is not None
    analysis = analyse_modules(loaded, tree)
    assert "zeusd.service" in analysis["needed"] and "zeusd.service" not in analysis["needed_stack"]
    assert not any(m.startswith("zeusd.devices.gpu.simulated") for m in analysis["needed"])
    assert any(name.startswith("libnvidia-ml.so") for name in shared_objects)  # the stand-in, mapped


def test_make_says_what_is_missing_without_cargo(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = tmp_path / "upstream"
    r = subprocess.run(["make", "-s", "-C", str(REPO), f"{root}/bin/zeusd", f"UPSTREAM_ROOT={root}", f"CARGO={tmp_path}/no-cargo"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    assert "cargo is missing" in r.stderr
    assert f"cargo install zeusd --version 0.4.0 --root {root}" in r.stderr
    assert not root.exists()


# --------------------------------------------------------------------------- end to end, with upstream


def test_quick_side_by_side_run(tmp_path: Path) -> None:
    if not os.access(DEFAULT_UPSTREAM, os.X_OK):
        pytest.skip(f"upstream zeusd v0.4.0 is not built at {DEFAULT_UPSTREAM}: `make bench-compare` builds it (needs cargo)")
    if os.geteuid() != 0:
        pytest.skip("the side-by-side run needs root (upstream's gpu-control, the RAPL mount namespace)")
    r = subprocess.run([sys.executable, str(COMPARE), "--quick", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "compare-latest.json").read_text())
    assert result["meta"]["quick"] is True
    by_key = {f["key"]: f for f in result["figures"]}
    for key in ("get_power_p50", "set_power_limit_p50", "discover_p50", "stream_cpu", "rss_idle", "rss_stream", "startup"):
        f = by_key[key]
        assert f["ours"] > 0 and f["upstream"] > 0 and f["ratio"] is not None, f
        assert f["label"] in r.stdout
    for who in (OURS, UPSTREAM):
        for scenario in ("discover", "gpu_get_power", "gpu_set_power_limit"):
            (run,) = result["runs"][who][scenario]
            assert run["requests"] > 0 and run["errors"] == 0 and run["non2xx"] == 0, (who, scenario, run)
        assert result["runs"][who]["stream"][0]["events"] > 0
    # Upstream's one-shot waits for the next changed poll (50 ms period); ours reads the devices.
    assert by_key["get_power_p50"]["upstream"] >= 10
    # With a constant reading upstream never notices the reader left and keeps polling; ours stops.
    assert by_key["idle_reads_constant"]["upstream"] > 0
    assert by_key["idle_reads_constant"]["ours"] == 0 and by_key["idle_reads"]["ours"] == 0
    floors = {f["key"]: f for f in result["floors"]}
    assert floors["rss_idle_uds"]["floor"] > 0 and floors["startup_vs_imports"]["floor"] > 0
    assert result["modules"]["loaded"] > 0 and "tls" in result["modules"]["unused"]
    md = subprocess.run([sys.executable, str(COMPARE), "--markdown", str(tmp_path / "compare-latest.json")],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert md.returncode == 0 and "| figure | ours | upstream v0.4.0 | ours/upstream | issue 18 target |" in md.stdout
