"""``GET /metrics`` over real sockets: values against the stand-in NVML library and a
RAPL tree, label sets, failing devices, daemon health, auth, and group semantics."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

import zeusd
from tests.conftest import DaemonFactory
from tests.daemon import Daemon, issue_token, unprivileged_user, wait_until, write_signing_key
from tests.fakenvml import FakeNvml, build_library
from tests.manual import ManualExecutors, TestReactor
from tests.metrics_text import Scrape, scrape
from tests.rapl_tree import RaplTree
from zeusd.groups import ApiGroup
from zeusd.options import ServeConfig
from zeusd.service import make_service

GPU_LABELS = {"gpu", "name", "pci_address"}
NVML_LOST = 15  # NVML_ERROR_GPU_IS_LOST
NVML_NOT_SUPPORTED = 3



@pytest.fixture
def fake(tmp_path: Path) -> FakeNvml:
    nvml = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log", build_library())
    nvml.create(4)
    for i in range(4):
        nvml.set_gpu(
            i,
            power_mw=100_123 + 10_000 * i,
            energy_mj=1_000_000_500 + i,
            power_limit_mw=300_000 + 1000 * i,
            min_power_limit_mw=150_000 + i,
            max_power_limit_mw=650_000 + i,
            persistence_mode=i % 2 == 1,
        )
    return nvml


@pytest.fixture
def tree(rapl_tree: RaplTree) -> RaplTree:
    rapl_tree.add_package(0, energy_uj=900_000_000, max_range_uj=1_000_000_000, dram_energy_uj=40_000_000)
    rapl_tree.add_package(1, energy_uj=7_000_001, max_range_uj=1_000_000_000)
    return rapl_tree


@pytest.fixture
def node(start_daemon: DaemonFactory, fake: FakeNvml, tree: RaplTree) -> Daemon:
    """Every group (the default), real NVML calls into the stand-in, real RAPL files."""
    return start_daemon("--rapl-root", str(tree.root), env=fake.env())


# --------------------------------------------------------------------------- values


def test_gpu_values_match_the_device_state(node: Daemon, fake: FakeNvml) -> None:
    m = scrape(node.client)
    gpus = fake.gpus()
    assert m.by_gpu("zeusd_gpu_power_watts") == {i: g.power_mw / 1000 for i, g in enumerate(gpus)}
    assert m.by_gpu("zeusd_gpu_energy_joules_total") == {i: g.energy_mj / 1000 for i, g in enumerate(gpus)}
    assert m.by_gpu("zeusd_gpu_power_limit_watts") == {i: g.power_limit_mw / 1000 for i, g in enumerate(gpus)}
    assert m.by_gpu("zeusd_gpu_power_limit_min_watts") == {i: g.min_power_limit_mw / 1000 for i, g in enumerate(gpus)}
    assert m.by_gpu("zeusd_gpu_power_limit_max_watts") == {i: g.max_power_limit_mw / 1000 for i, g in enumerate(gpus)}
    assert m.by_gpu("zeusd_gpu_persistence_mode_enabled") == {0: 0, 1: 1, 2: 0, 3: 1}
    assert m.by_gpu("zeusd_gpu_up") == {0: 1, 1: 1, 2: 1, 3: 1}
    assert m.families["zeusd_gpu_energy_joules"].type == "counter"
    assert m.families["zeusd_gpu_power_watts"].type == "gauge"

    # A change on the device is what the next scrape reports: read at scrape time.
    fake.set_gpu(2, power_mw=123_456, energy_mj=2_000_000_000)
    m = scrape(node.client)
    assert m.value("zeusd_gpu_power_watts", gpu="2") == 123.456
    assert m.value("zeusd_gpu_energy_joules_total", gpu="2") == 2_000_000.0


def test_gpu_label_sets(node: Daemon, fake: FakeNvml) -> None:
    m = scrape(node.client)
    expected = {(str(i), g.name, g.pci_address) for i, g in enumerate(fake.gpus())}
    for name in ("zeusd_gpu_power_watts", "zeusd_gpu_energy_joules_total", "zeusd_gpu_power_limit_watts", "zeusd_gpu_up"):
        samples = m.all(name)
        assert all(set(s.labels) == GPU_LABELS for s in samples), samples
        assert {(s.labels["gpu"], s.labels["name"], s.labels["pci_address"]) for s in samples} == expected
    for name in ("zeusd_cpu_package_energy_joules_total", "zeusd_cpu_package_up"):
        assert {tuple(sorted(s.labels.items())) for s in m.all(name)} == {(("package", "0"),), (("package", "1"),)}


def test_rapl_energy_in_joules_across_a_wraparound(node: Daemon, tree: RaplTree) -> None:
    m = scrape(node.client)
    assert m.value("zeusd_cpu_package_energy_joules_total", package="0") == 900.0
    assert m.value("zeusd_cpu_package_energy_joules_total", package="1") == 7.000001
    assert m.value("zeusd_cpu_dram_energy_joules_total", package="0") == 40.0
    assert m.all("zeusd_cpu_dram_energy_joules_total", package="1") == []  # no DRAM zone
    assert m.families["zeusd_cpu_package_energy_joules"].type == "counter"

    # Package 0 passes its 1000 J range and restarts near zero: the counter keeps counting.
    tree.set_energy(0, 100_000_000)
    tree.set_energy(0, 45_000_000, dram=True)
    m = scrape(node.client)
    assert m.value("zeusd_cpu_package_energy_joules_total", package="0") == pytest.approx(1100.0)
    assert m.value("zeusd_cpu_dram_energy_joules_total", package="0") == 45.0
    assert m.value("zeusd_cpu_package_up", package="0") == 1


def test_locked_clocks_where_known(node: Daemon, fake: FakeNvml) -> None:
    c = node.client
    m = scrape(c)
    assert m.all("zeusd_gpu_clocks_locked") == []  # nothing set by this daemon yet: unknown
    assert c.post("/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=600&max_clock_mhz=1400&block=true").status == 200
    assert c.post("/gpu/reset_mem_locked_clocks?gpu_ids=1&block=true").status == 200
    m = scrape(c)
    assert m.value("zeusd_gpu_clocks_locked", gpu="1", clock="graphics") == 1
    assert m.value("zeusd_gpu_locked_clocks_min_hertz", gpu="1", clock="graphics") == 600e6
    assert m.value("zeusd_gpu_locked_clocks_max_hertz", gpu="1", clock="graphics") == 1400e6
    assert m.value("zeusd_gpu_clocks_locked", gpu="1", clock="memory") == 0
    assert m.all("zeusd_gpu_locked_clocks_min_hertz", clock="memory") == []
    assert m.all("zeusd_gpu_clocks_locked", gpu="0") == []
    assert fake.gpu(1).gpu_locked_clocks == (600, 1400)

    assert c.post("/gpu/reset_gpu_locked_clocks?gpu_ids=1&block=true").status == 200
    m = scrape(c)
    assert m.value("zeusd_gpu_clocks_locked", gpu="1", clock="graphics") == 0
    assert m.all("zeusd_gpu_locked_clocks_min_hertz") == []

    # A command that failed may have left either state: unknown again.
    fake.inject_error("nvmlDeviceSetGpuLockedClocks", NVML_NOT_SUPPORTED, gpu=1)
    assert c.post("/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=600&max_clock_mhz=1400&block=true").status != 200
    m = scrape(c)
    assert m.all("zeusd_gpu_clocks_locked", gpu="1", clock="graphics") == []


def test_scrape_reads_see_queued_commands(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    """Limits are read through the GPU's command queue: a scrape after a
    non-blocking command reports the new limit, never the one before it."""
    fake.set_delay("nvmlDeviceSetPowerManagementLimit", 800, gpu=0)
    daemon = start_daemon("--enable", "gpu-control,gpu-read,metrics", env=fake.env())
    assert daemon.client.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=222000&block=false").status == 200
    m = scrape(daemon.client)
    assert m.value("zeusd_gpu_power_limit_watts", gpu="0") == 222.0
    assert m.all("zeusd_cpu_package_energy_joules_total") == []  # cpu-read not enabled: not covered


# --------------------------------------------------------------------------- failures


def test_lost_gpu_is_left_out_and_counted(node: Daemon, fake: FakeNvml) -> None:
    before = scrape(node.client)
    assert before.all("zeusd_device_read_errors_total") == []
    fake.set_lost(2)
    first = scrape(node.client)  # 200, not a 5xx for the whole scrape
    for name in ("zeusd_gpu_power_watts", "zeusd_gpu_energy_joules_total", "zeusd_gpu_power_limit_watts"):
        assert set(first.by_gpu(name)) == {0, 1, 3}, name
    assert first.by_gpu("zeusd_gpu_up") == {0: 1, 1: 1, 2: 0, 3: 1}
    power_errors = first.value("zeusd_device_read_errors_total", device="gpu", index="2", operation="power")
    assert power_errors >= 1
    assert first.value("zeusd_device_read_errors_total", device="gpu", index="2", operation="power_limit") >= 1
    assert all(s.labels["index"] == "2" for s in first.all("zeusd_device_read_errors_total"))

    second = scrape(node.client)
    assert second.value("zeusd_device_read_errors_total", device="gpu", index="2", operation="power") == power_errors + 1
    # API reads of the lost GPU count too.
    assert node.client.get("/gpu/get_power?gpu_ids=2").status == 500
    third = scrape(node.client)
    assert third.value("zeusd_device_read_errors_total", device="gpu", index="2", operation="power") == power_errors + 3

    fake.set_lost(2, False)
    assert scrape(node.client).by_gpu("zeusd_gpu_up") == {0: 1, 1: 1, 2: 1, 3: 1}


def test_failing_rapl_package_is_left_out_and_counted(node: Daemon, tree: RaplTree) -> None:
    scrape(node.client)
    (tree.package_dir(1) / "energy_uj").write_text("garbage\n")
    m = scrape(node.client)
    assert m.all("zeusd_cpu_package_energy_joules_total", package="1") == []
    assert m.value("zeusd_cpu_package_energy_joules_total", package="0") == 900.0
    assert m.value("zeusd_cpu_package_up", package="1") == 0
    assert m.value("zeusd_device_read_errors_total", device="cpu", index="1", operation="energy") == 1


def test_hung_gpu_does_not_pile_up_scrape_reads(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    daemon = start_daemon("--enable", "gpu-read,metrics", env=fake.env())
    fake.set_delay("nvmlDeviceGetPowerManagementLimit", -1, gpu=3)  # hangs forever
    first = scrape(daemon.client)  # waits out the device timeout for GPU 3's queued read
    assert set(first.by_gpu("zeusd_gpu_power_limit_watts")) == {0, 1, 2}
    assert first.value("zeusd_device_read_errors_total", device="gpu", index="3", operation="state") == 1
    second = scrape(daemon.client)
    assert set(second.by_gpu("zeusd_gpu_power_watts")) == {0, 1, 2, 3}  # the power path is not queued
    assert second.value("zeusd_gpu_pending_commands", gpu="3") == 1  # still one read, not two
    assert second.value("zeusd_device_read_errors_total", device="gpu", index="3", operation="state") == 2


# --------------------------------------------------------------------------- daemon health


def test_stream_subscribers_gauge(sim_daemon: Daemon) -> None:
    def subscribers(kind: str) -> float:
        return scrape(sim_daemon.client).value("zeusd_stream_subscribers", kind=kind)

    assert subscribers("gpu") == 0 and subscribers("cpu") == 0
    with sim_daemon.client.stream("/gpu/stream_power") as a, sim_daemon.client.stream("/gpu/stream_power?gpu_ids=1") as b:
        a.events(1)
        b.events(1)
        assert subscribers("gpu") == 2 and subscribers("cpu") == 0
    wait_until(lambda: subscribers("gpu") == 0)


def test_request_counts_and_latency_by_route(sim_daemon: Daemon) -> None:
    c = sim_daemon.client
    before = scrape(c)
    count = before.value_or("zeusd_http_requests_total", 0, route="/discover", method="GET", code="200")
    for _ in range(3):
        assert c.get("/discover").status == 200
    assert c.get("/gpu/no_such_thing_12345").status == 404
    after = scrape(c)
    assert after.value("zeusd_http_requests_total", route="/discover", method="GET", code="200") == count + 3
    assert after.value("zeusd_http_request_duration_seconds_count", route="/discover", method="GET") >= count + 3
    assert after.value("zeusd_http_requests_total", route="/metrics", method="GET", code="200") >= 1
    # Unknown paths share one label value; raw user paths never become labels.
    assert after.value("zeusd_http_requests_total", route="other", method="GET", code="404") >= 1
    assert "no_such_thing_12345" not in after.text
    routes = {s.labels["route"] for s in after.all("zeusd_http_requests_total")}
    assert routes <= routing_table() | {"other"}
    assert after.value("zeusd_uptime_seconds") > 0
    assert [(s.labels, s.value) for s in after.all("zeusd_build_info")] == [({"version": zeusd.__version__}, 1)]


def routing_table() -> frozenset[str]:
    """The paths the daemon's Klein apps route, for a simulated node with every group (built, not started)."""
    config = ServeConfig(simulate=True, enabled_groups=tuple(ApiGroup))
    service = make_service(config, TestReactor(), ManualExecutors(), exit_on_startup_error=False)
    table: frozenset[str] = service.getServiceNamed("metrics").metrics.known_routes
    assert {"/discover", "/time", "/metrics", "/gpu/get_power", "/gpu/set_power_limit", "/cpu/stream_power"} <= table
    return table


def test_streams_are_counted_but_kept_out_of_latency(sim_daemon: Daemon) -> None:
    c = sim_daemon.client
    with c.stream("/cpu/stream_power") as s:
        s.events(1)

    def counted() -> bool:
        m = scrape(c)
        return m.value_or("zeusd_http_requests_total", 0, route="/cpu/stream_power", method="GET", code="200") >= 1

    wait_until(counted)
    assert scrape(c).all("zeusd_http_request_duration_seconds_count", route="/cpu/stream_power") == []


def test_simulate_scrape_with_gzip_and_openmetrics(sim_daemon: Daemon) -> None:
    c = sim_daemon.client
    m = scrape(c)
    assert set(m.by_gpu("zeusd_gpu_power_watts")) == {0, 1, 2, 3}
    assert all(70 <= v <= 700 for v in m.by_gpu("zeusd_gpu_power_watts").values())
    assert set(m.by_gpu("zeusd_gpu_energy_joules_total")) == {0, 1, 2, 3}
    assert len(m.all("zeusd_cpu_package_energy_joules_total")) == 2
    assert m.value("process_open_fds") > 0

    r = c.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.status == 200 and r.headers["content-encoding"] == "gzip"
    assert set(Scrape(gzip.decompress(r.body).decode()).by_gpu("zeusd_gpu_up")) == {0, 1, 2, 3}

    r = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200 and r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.body.endswith(b"# EOF\n")


# --------------------------------------------------------------------------- auth


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    key = tmp_path / "signing.key"
    write_signing_key(key)
    return key


def test_auth_requires_the_metrics_scope(start_daemon: DaemonFactory, key_file: Path) -> None:
    daemon = start_daemon("--simulate", "--signing-key-path", str(key_file))
    c = daemon.client
    no_token = c.get("/metrics")
    assert no_token.status == 401
    reader = c.get("/metrics", token=issue_token(key_file, "gpu-read,cpu-read"))
    assert reader.status == 403 and "'metrics'" in reader.error
    m = scrape(c, token=issue_token(key_file, "metrics"))
    assert set(m.by_gpu("zeusd_gpu_power_watts")) == {0, 1, 2, 3}
    # The metrics scope opens nothing else.
    assert c.get("/gpu/get_power", token=issue_token(key_file, "metrics")).status == 403


# --------------------------------------------------------------------------- group semantics


def test_metrics_alone_opens_no_device(start_daemon: DaemonFactory, fake: FakeNvml, tree: RaplTree) -> None:
    """``--enable metrics``: daemon health only; no NVML call at all (not even nvmlInit)."""
    daemon = start_daemon("--enable", "metrics", "--rapl-root", str(tree.root), env=fake.env())
    assert daemon.client.get("/discover").json()["enabled_api_groups"] == ["metrics"]
    m = scrape(daemon.client)
    assert not [name for name in m.samples if name.startswith(("zeusd_gpu_", "zeusd_cpu_"))]
    assert m.value("zeusd_uptime_seconds") > 0
    assert m.all("zeusd_stream_subscribers") == []
    assert daemon.client.get("/gpu/get_power").status == 404
    assert daemon.client.get("/cpu/get_power").status == 404
    assert fake.calls() == []


def test_metrics_group_needs_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from zeusd.errors import StartupError
    from zeusd.startup import check_privileges

    assert ApiGroup.METRICS.needs_root is False
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    check_privileges(ServeConfig(enabled_groups=(ApiGroup.METRICS,)))
    check_privileges(ServeConfig(enabled_groups=(ApiGroup.GPU_READ, ApiGroup.METRICS)))
    with pytest.raises(StartupError, match="cpu-read"):
        check_privileges(ServeConfig(enabled_groups=(ApiGroup.CPU_READ, ApiGroup.METRICS)))


def test_metrics_alone_starts_as_an_unprivileged_user(start_daemon: DaemonFactory) -> None:
    daemon = start_daemon("--enable", "metrics", transport="tcp", user=unprivileged_user())
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    euid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
    assert euid == (unprivileged_user() or os.geteuid())
    assert scrape(daemon.client).value("zeusd_uptime_seconds") > 0


def test_explicit_enable_without_metrics_disables_it(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    daemon = start_daemon("--enable", "gpu-read", env=fake.env())
    r = daemon.client.get("/metrics")
    assert r.status == 404 and "'metrics' is not enabled" in r.error


def test_enable_gpu_read_and_metrics_covers_gpus_only(start_daemon: DaemonFactory, fake: FakeNvml) -> None:
    daemon = start_daemon("--enable", "gpu-read,metrics", env=fake.env())
    m = scrape(daemon.client)
    assert set(m.by_gpu("zeusd_gpu_power_watts")) == {0, 1, 2, 3}
    assert m.all("zeusd_cpu_package_up") == []
    assert {s.labels["kind"] for s in m.all("zeusd_stream_subscribers")} == {"gpu"}
    assert m.all("zeusd_gpu_clocks_locked") == []  # gpu-control is off: nothing can lock clocks
