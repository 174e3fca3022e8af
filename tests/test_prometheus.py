"""A real Prometheus scraping real daemons, and the Grafana dashboard's queries against it.

Prometheus runs with the example ``prometheus.yml`` of docs/monitoring.md
(interval, file paths and targets replaced) plus jobs for a daemon with
auth only, one with TLS only, and one scraped with a token that lacks the
``metrics`` scope. Daemons: a simulated node, a node on the stand-in NVML
library and a RAPL tree (exact values), and simulated nodes behind auth,
TLS, and both. Values in Prometheus are compared with what the daemons
report over their own API.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.daemon import (
    REPO,
    Daemon,
    Transport,
    free_tcp_port,
    issue_token,
    self_signed_cert,
    terminate,
    write_signing_key,
)
from tests.fakenvml import FakeNvml, build_library
from tests.prometheus import Prometheus, Vector, by_label, prometheus_or_skip
from tests.rapl_tree import RaplTree
from zeusd import __version__
from zeusd.devices.gpu.simulated import MAX_LIMIT_MW

DOC = REPO / "docs" / "monitoring.md"
DASHBOARD = REPO / "packaging" / "grafana" / "zeusd.json"
CONFIG_MARKER = "<!-- prometheus.yml: used by tests/test_prometheus.py -->"

#: The stand-in node's GPUs: instant power, and energy added per counter read (one read per scrape).
NVML_POWER_MW = {0: 150_123, 1: 90_500}
NVML_STEP_MJ = {0: 150_000, 1: 90_000}
RAPL_PACKAGE_UJ = 123_456_789
RAPL_DRAM_UJ = 9_876_543
#: Grafana's interval variables, as the test substitutes them (1 s scrapes).
GRAFANA_INTERVALS = {"__rate_interval": "10s", "__interval": "2s", "__range": "1m"}


def doc_prometheus_config() -> str:
    """The ``prometheus.yml`` block that follows the marker in docs/monitoring.md, verbatim."""
    text = DOC.read_text()
    assert text.count(CONFIG_MARKER) == 1, f"{DOC} must hold the marked prometheus.yml block once"
    after = text.split(CONFIG_MARKER, 1)[1]
    match = re.match(r"\s*```yaml\n(.*?)\n```", after, re.DOTALL)
    assert match is not None, "the marker must be followed by a ```yaml block"
    return match.group(1) + "\n"


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} once in the documented config"
    return text.replace(old, new)


def target(daemon: Daemon) -> str:
    return f"127.0.0.1:{daemon.transport.address}"


@dataclass
class Node:
    """Everything the module's tests share: the daemons, their devices, Prometheus."""

    directory: Path
    fake: FakeNvml
    tree: RaplTree
    key: Path
    daemons: dict[str, Daemon] = field(default_factory=dict)
    prometheus: Prometheus | None = None

    @property
    def prom(self) -> Prometheus:
        assert self.prometheus is not None
        return self.prometheus

    def instance(self, name: str) -> str:
        return target(self.daemons[name])


def start_daemons(node: Node) -> None:
    d = node.directory
    cert, cert_key = self_signed_cert(d)
    tls = ["--tls-cert", str(cert), "--tls-key", str(cert_key)]
    auth = ["--signing-key-path", str(node.key)]
    specs: dict[str, tuple[Transport, list[str], dict[str, str]]] = {
        "sim": (Transport("tcp", free_tcp_port()), ["--simulate"], {}),
        "nvml": (Transport("tcp", free_tcp_port()), ["--rapl-root", str(node.tree.root)], node.fake.env()),
        "auth": (Transport("tcp", free_tcp_port()), ["--simulate", *auth], {}),
        "tls": (Transport("tcp", free_tcp_port(), ca_file=str(cert)), ["--simulate", *tls], {}),
        "secure": (Transport("tcp", free_tcp_port(), ca_file=str(cert)), ["--simulate", *tls, *auth], {}),
    }
    for name, (transport, args, env) in specs.items():
        node.daemons[name] = Daemon(transport, args, env, d / f"{name}.log").start(wait=False)
    for daemon in node.daemons.values():
        daemon.wait_ready(timeout=30)


def prometheus_config(node: Node, cert: Path) -> str:
    """The documented config with this test's paths and targets, plus three jobs of the test's own."""
    d = node.directory
    metrics_token, reader_token = d / "metrics.token", d / "reader.token"
    metrics_token.write_text(issue_token(node.key, "metrics", user="prometheus"))
    reader_token.write_text(issue_token(node.key, "gpu-read", user="reader"))
    config = doc_prometheus_config()
    config = replace_once(config, "scrape_interval: 15s", "scrape_interval: 1s")
    config = replace_once(config, "/etc/prometheus/zeusd.token", str(metrics_token))
    config = replace_once(config, "/etc/prometheus/zeusd-ca.pem", str(cert))
    config = replace_once(config, '["node001:4938", "node002:4938"]', json.dumps([node.instance("secure")]))
    config = replace_once(config, '["lab001:4938"]', json.dumps([node.instance("sim"), node.instance("nvml")]))
    bearer = lambda path: {"type": "Bearer", "credentials_file": str(path)}  # noqa: E731
    extra = [
        {"job_name": "zeusd-auth", "authorization": bearer(metrics_token),
         "static_configs": [{"targets": [node.instance("auth")]}]},
        {"job_name": "zeusd-tls", "scheme": "https", "tls_config": {"ca_file": str(cert)},
         "static_configs": [{"targets": [node.instance("tls")]}]},
        {"job_name": "zeusd-wrong-scope", "authorization": bearer(reader_token),
         "static_configs": [{"targets": [node.instance("auth")]}]},
    ]
    return config + "".join(f"  - {json.dumps(job)}\n" for job in extra)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    executable = prometheus_or_skip()
    directory = tmp_path_factory.mktemp("prometheus")
    fake = FakeNvml(directory / "nvml.state", directory / "nvml.log", build_library())
    fake.create(2)
    for i in (0, 1):
        fake.set_gpu(i, power_mw=NVML_POWER_MW[i], energy_step_mj=NVML_STEP_MJ[i], power_limit_mw=250_000 + i * 1000)
    tree = RaplTree(directory / "powercap")
    tree.add_package(0, energy_uj=RAPL_PACKAGE_UJ, dram_energy_uj=RAPL_DRAM_UJ)
    key = directory / "signing.key"
    write_signing_key(key)
    node = Node(directory, fake, tree, key)
    try:
        start_daemons(node)
        # A locked clock range, so that the clock metrics (and the dashboard's panel) have data.
        locked = node.daemons["nvml"].client.post(
            "/gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=900&max_clock_mhz=1500&block=true")
        assert locked.status == 200, locked.body
        cert = Path(str(node.daemons["tls"].transport.ca_file))
        node.prometheus = Prometheus(executable, directory / "prom", prometheus_config(node, cert))
        yield node
    finally:
        if node.prometheus is not None:
            node.prometheus.stop()
        for daemon in node.daemons.values():
            terminate(daemon)


@dataclass
class Fault:
    up_during: dict[str, float]
    errors_during: float
    errors_in_daemon: float


@pytest.fixture(scope="module")
def fault(node: Node) -> Fault:
    """GPU 1 of the stand-in node falls off the bus for a while, then comes back."""
    prom, nvml = node.prom, node.instance("nvml")
    prom.wait_for(f'zeusd_gpu_up{{instance="{nvml}"}} == 1', lambda r: len(r) == 2)
    node.fake.set_lost(1)
    try:
        errors = f'zeusd_device_read_errors_total{{instance="{nvml}", device="gpu", index="1", operation="power"}}'
        during = prom.wait_for(errors, lambda r: r and r[0]["value"] >= 2)[0]["value"]
        up = by_label(prom.wait_for(f'zeusd_gpu_up{{instance="{nvml}"}}', lambda r: by_label(r, "gpu").get("1") == 0), "gpu")
        in_daemon = daemon_metric(node.daemons["nvml"], "zeusd_device_read_errors_total",
                                  device="gpu", index="1", operation="power")
    finally:
        node.fake.set_lost(1, False)
    prom.wait_for(f'zeusd_gpu_up{{instance="{nvml}"}} == 1', lambda r: len(r) == 2)
    return Fault(up, during, in_daemon)


def daemon_metric(daemon: Daemon, name: str, token: str | None = None, **labels: str) -> float:
    """One sample of the daemon's own ``/metrics``, as the daemon reports it."""
    from prometheus_client.parser import text_string_to_metric_families

    r = daemon.client.get("/metrics", token=token)
    assert r.status == 200
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in the daemon's /metrics")


def metric_type(prom: Prometheus, family: str) -> str:
    """The type Prometheus recorded for a metric family (it scrapes OpenMetrics: no ``_total`` in the name)."""
    metadata = prom.api("metadata", metric=family)
    types = {str(m["type"]) for m in metadata[family]}
    assert len(types) == 1, metadata
    return types.pop()


# --------------------------------------------------------------------------- targets


def test_every_target_is_scraped_and_a_token_without_the_scope_is_refused(node: Node) -> None:
    up = node.prom.wait_for("up", lambda r: len(r) == 6 and sum(x["value"] for x in r) == 5)
    by_job = {(r["metric"]["job"], r["metric"]["instance"]): r["value"] for r in up}
    assert by_job == {
        ("zeusd", node.instance("secure")): 1,
        ("zeusd-plain", node.instance("sim")): 1,
        ("zeusd-plain", node.instance("nvml")): 1,
        ("zeusd-auth", node.instance("auth")): 1,
        ("zeusd-tls", node.instance("tls")): 1,
        ("zeusd-wrong-scope", node.instance("auth")): 0,
    }
    refused = [t for t in node.prom.targets() if t["labels"]["job"] == "zeusd-wrong-scope"]
    assert refused and "403" in refused[0]["lastError"], refused


# --------------------------------------------------------------------------- values


def test_gpu_power_matches_the_device(node: Node) -> None:
    nvml = node.instance("nvml")
    result = node.prom.wait_for(f'zeusd_gpu_power_watts{{instance="{nvml}"}}', lambda r: len(r) == 2)
    assert by_label(result, "gpu") == {str(i): mw / 1000 for i, mw in NVML_POWER_MW.items()}
    gpus = node.fake.gpus()
    assert {(r["metric"]["gpu"], r["metric"]["name"], r["metric"]["pci_address"]) for r in result} == {
        (str(i), g.name, g.pci_address) for i, g in enumerate(gpus)
    }
    # The daemon's own API says the same.
    api = node.daemons["nvml"].client.get("/gpu/get_power").json()["power_mw"]
    assert {k: v / 1000 for k, v in api.items()} == by_label(result, "gpu")


def test_gpu_energy_is_a_counter_with_a_plausible_rate(node: Node) -> None:
    prom, nvml = node.prom, node.instance("nvml")
    assert metric_type(prom, "zeusd_gpu_energy_joules") == "counter"

    # The stand-in adds a fixed step per read, and each scrape reads once: rate = step per second.
    def close_to_steps(r: Vector) -> bool:
        rates = by_label(r, "gpu")
        return set(rates) == {"0", "1"} and all(
            abs(rates[str(i)] - step / 1000) < 0.25 * step / 1000 for i, step in NVML_STEP_MJ.items()
        )

    prom.wait_for(f'rate(zeusd_gpu_energy_joules_total{{instance="{nvml}"}}[5s])', close_to_steps)

    # The simulated node integrates its own power curve: energy rate ≈ average power.
    sim = node.instance("sim")

    def agrees(r: Vector) -> bool:
        ratios = by_label(r, "gpu")
        return len(ratios) == 4 and all(0.8 < v < 1.25 for v in ratios.values())

    prom.wait_for(
        f'rate(zeusd_gpu_energy_joules_total{{instance="{sim}"}}[10s])'
        f' / on (gpu) avg_over_time(zeusd_gpu_power_watts{{instance="{sim}"}}[10s])',
        agrees,
    )
    resets = prom.query('resets(zeusd_gpu_energy_joules_total[1m])')
    assert resets and all(r["value"] == 0 for r in resets)


def test_cpu_package_energy_matches_the_rapl_files(node: Node) -> None:
    prom, nvml = node.prom, node.instance("nvml")
    package = f'zeusd_cpu_package_energy_joules_total{{instance="{nvml}", package="0"}}'
    assert prom.wait_for(package)[0]["value"] == RAPL_PACKAGE_UJ / 1e6
    dram = prom.wait_for(f'zeusd_cpu_dram_energy_joules_total{{instance="{nvml}"}}')
    assert by_label(dram, "package") == {"0": RAPL_DRAM_UJ / 1e6}
    assert metric_type(prom, "zeusd_cpu_package_energy_joules") == "counter"

    # 50 J more in the file: Prometheus sees the new value, and an increase over the window.
    node.tree.set_energy(0, RAPL_PACKAGE_UJ + 50_000_000)
    prom.wait_for(package, lambda r: r and r[0]["value"] == (RAPL_PACKAGE_UJ + 50_000_000) / 1e6)
    increase = prom.query(f'increase({package}[30s])')
    assert increase and increase[0]["value"] >= 50

    # The simulated node's packages draw power all the time.
    sim = node.instance("sim")
    prom.wait_for(f'rate(zeusd_cpu_package_energy_joules_total{{instance="{sim}"}}[5s]) > 0', lambda r: len(r) == 2)


def test_read_errors_after_an_injected_fault(node: Node, fault: Fault) -> None:
    assert fault.up_during == {"0": 1, "1": 0}
    assert fault.errors_during >= 2
    assert fault.errors_in_daemon >= fault.errors_during  # Prometheus saw the daemon's counter
    nvml = node.instance("nvml")
    # Back up, and the counter stays (a counter never goes back).
    after = node.prom.query(f'zeusd_device_read_errors_total{{instance="{nvml}", index="1", operation="power"}}')
    assert after and after[0]["value"] >= fault.errors_during
    assert by_label(node.prom.query(f'zeusd_gpu_up{{instance="{nvml}"}}'), "gpu") == {"0": 1, "1": 1}


@pytest.mark.parametrize("name", ["auth", "tls", "secure"])
def test_auth_and_tls_daemons_are_scraped_like_the_others(node: Node, name: str) -> None:
    prom, instance = node.prom, node.instance(name)
    info = prom.wait_for(f'zeusd_build_info{{instance="{instance}"}}')
    assert [r["metric"]["version"] for r in info] == [__version__]
    power = prom.wait_for(f'zeusd_gpu_power_watts{{instance="{instance}"}}', lambda r: len(r) == 4)
    assert all(0 < v <= MAX_LIMIT_MW / 1000 for v in by_label(power, "gpu").values())

    # Prometheus's newest energy sample against the daemon's API a moment later:
    # never more, and at most what the GPU could have drawn in between.
    selector = f'zeusd_gpu_energy_joules_total{{instance="{instance}"}}'
    scraped = {r["metric"]["gpu"]: r["value"] for r in prom.query(selector)}
    stamps = {r["metric"]["gpu"]: r["value"] for r in prom.query(f"timestamp({selector})")}
    token = issue_token(node.key, "gpu-read") if name != "tls" else None
    reply = node.daemons[name].client.get("/gpu/get_cumulative_energy", token=token)
    assert reply.status == 200, reply.body
    now = time.time()
    for gpu, joules in scraped.items():
        api_joules = reply.json()[gpu]["energy_mj"] / 1000
        assert joules <= api_joules <= joules + (now - stamps[gpu] + 1) * MAX_LIMIT_MW / 1000, (gpu, joules, api_joules)
    prom.wait_for(f"rate({selector}[5s]) > 0", lambda r: len(r) == 4)


# --------------------------------------------------------------------------- dashboard


def dashboard() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return value


def panel_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query in the dashboard, rows included."""
    out = []
    for panel in dash["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for t in inner.get("targets", []):
                out.append((inner["title"], t["expr"]))
    return out


def test_dashboard_is_importable_json() -> None:
    """What Grafana's import needs: a datasource input, unique panel ids, queries on that datasource."""
    dash = dashboard()
    inputs = dash["__inputs"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert dash["id"] is None and dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    panel_types = {r["id"] for r in dash["__requires"] if r["type"] == "panel"}
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"} and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in panel_types, panel["type"]
        assert panel["datasource"] == datasource, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == datasource and t["expr"].strip() for t in panel["targets"]), panel["title"]
    for variable in dash["templating"]["list"]:
        assert variable["datasource"] == datasource and variable["query"]["query"].startswith("label_values(")
    # Everything the issue asks to see.
    exprs = " ".join(e for _, e in panel_targets(dash))
    for metric in ("zeusd_gpu_power_watts", "zeusd_gpu_energy_joules_total", "zeusd_cpu_package_energy_joules_total",
                   "zeusd_gpu_power_limit_watts", "zeusd_gpu_locked_clocks_max_hertz", "zeusd_device_read_errors_total",
                   "zeusd_stream_subscribers"):
        assert metric in exprs, metric


def label_values(prom: Prometheus, query: str) -> list[str]:
    """Grafana's ``label_values(selector, label)`` through the same API call it makes."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match is not None, query
    selector, label = match.groups()
    values: list[str] = prom.api(f"label/{label}/values", **{"match[]": selector})
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown dashboard variable ${name}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def test_every_dashboard_query_returns_data(node: Node, fault: Fault) -> None:
    """Each panel's PromQL, with the variables as Grafana fills them ("All" selected), is non-empty."""
    dash, prom = dashboard(), node.prom
    variables = dict(GRAFANA_INTERVALS)
    for variable in dash["templating"]["list"]:
        values = label_values(prom, substitute(variable["query"]["query"], variables))
        assert values, variable["name"]
        variables[variable["name"]] = "(" + "|".join(values) + ")"  # Grafana's multi-value regex
    assert set(variables["instance"].strip("()").split("|")) == {node.instance(n) for n in node.daemons}
    for title, expr in panel_targets(dash):
        query = substitute(expr, variables)
        result = prom.wait_for(query, timeout=20)
        assert result, (title, query)
