"""``--gpu-backend auto|nvml|amdsmi`` through real daemons: which library serves the node.

Each vendor's library is the stand-in (tests/fakenvml, tests/fakeamdsmi) where
the node "has" it, and an empty directory where it does not: NVML is looked
for through the loader path, AMD SMI through ROCM_HOME / ROCM_PATH (the
bindings' search order is in docs/deployment.md). A library installed on the
machine itself could not be hidden from the loader, so those tests skip there.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, run_zeusd
from tests.fakeamdsmi import AMDSMI_STATUS_DRIVER_NOT_LOADED, FakeAmdSmi
from tests.fakenvml import ENV_LOG as NVML_LOG, ENV_STATE as NVML_STATE, FakeNvml
from tests.stand_ins import amdsmi_bindings_installed
from tests.metrics_text import scrape

NO_NVML = "the NVML library (libnvidia-ml.so.1) could not be loaded; is the NVIDIA driver installed?"
NO_AMD_LIBRARY = (
    "The AMD SMI library (libamd_smi.so) cannot be loaded from $ROCM_HOME/lib, $ROCM_PATH/lib, "
    "the loader path or /opt/rocm/lib: "
)
NO_BINDINGS = (
    "The AMD SMI Python bindings (package amdsmi) are not installed: "
    "pip install zeusd[amd] (or the amdsmi package of your ROCm release, in /opt/rocm/share/amd_smi)"
)
NO_GPU_GROUPS = "--enable names a GPU API group, but there is no GPU: "


def needs_bindings() -> None:
    if not amdsmi_bindings_installed():
        pytest.skip("the amdsmi Python bindings are not installed (pip install -e '.[test]')")


@pytest.fixture
def nvml(tmp_path: Path) -> FakeNvml:
    fake = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log")
    fake.create(4)
    return fake


@pytest.fixture
def amd(tmp_path: Path) -> FakeAmdSmi:
    needs_bindings()
    fake = FakeAmdSmi(tmp_path / "amdsmi.state", tmp_path / "amdsmi.log")
    fake.create(2)
    return fake


def _empty(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    (path / "lib").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def no_nvml(tmp_path: Path) -> dict[str, str]:
    """A node without the NVIDIA library."""
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("a real libnvidia-ml is installed system-wide; it cannot be hidden from dlopen")
    return {"LD_LIBRARY_PATH": str(_empty(tmp_path, "no-nvml")), NVML_STATE: "", NVML_LOG: ""}


@pytest.fixture
def no_amd(tmp_path: Path) -> dict[str, str]:
    """A node without libamd_smi.so (the bindings are installed)."""
    needs_bindings()
    spec = importlib.util.find_spec("amdsmi")
    beside_bindings = spec is not None and any(
        Path(p, "libamd_smi.so").exists() for p in spec.submodule_search_locations or ()
    )
    if ctypes.util.find_library("amd_smi") is not None or Path("/opt/rocm/lib/libamd_smi.so").exists() or beside_bindings:
        pytest.skip("a real libamd_smi.so is installed on this machine; the bindings would find it")
    empty = str(_empty(tmp_path, "no-rocm"))
    return {"ROCM_HOME": empty, "ROCM_PATH": empty}


@pytest.fixture
def no_bindings(tmp_path: Path) -> dict[str, str]:
    """A Python without the amdsmi package: the import system answers it as not installed."""
    site = tmp_path / "no-bindings"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["amdsmi"] = None  # ModuleNotFoundError\n')
    return {"PYTHONPATH": str(site)}


def backends(daemon: Daemon) -> list[tuple[int, str]]:
    """(GPU, backend) from /discover, checked against /metrics' zeusd_gpu_info."""
    gpus = daemon.client.get("/discover").json()["gpus"]
    served = [(g["id"], g["backend"]) for g in gpus]
    info = scrape(daemon.client).all("zeusd_gpu_info")
    assert sorted((int(s.labels["gpu"]), s.labels["backend"]) for s in info) == served
    assert all(s.value == 1 for s in info)
    names = {g["id"]: (g["name"], g["pci_address"]) for g in gpus}
    assert all(names[int(s.labels["gpu"])] == (s.labels["name"], s.labels["pci_address"]) for s in info)
    return served


def start_failure(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    """A daemon that must not start: its stderr lines (exit status 1, no socket left)."""
    sock = tmp_path / "refused.sock"
    done = run_zeusd(["serve", "--socket-path", str(sock), *args], env=env)
    assert done.returncode == 1, done
    assert not sock.exists()
    return done.stderr.splitlines()


# --------------------------------------------------------------------------- auto


def test_auto_serves_nvidia_where_only_nvml_is_there(
    start_daemon: DaemonFactory, nvml: FakeNvml, no_amd: dict[str, str]
) -> None:
    daemon = start_daemon(env={**nvml.env(), **no_amd})
    assert backends(daemon) == [(0, "nvml"), (1, "nvml"), (2, "nvml"), (3, "nvml")]
    assert "No AMD SMI: " + NO_AMD_LIBRARY in daemon.log()  # a debug line: nothing is wrong


def test_auto_serves_amd_where_only_amd_smi_is_there(
    start_daemon: DaemonFactory, amd: FakeAmdSmi, no_nvml: dict[str, str]
) -> None:
    daemon = start_daemon(env={**amd.env(), **no_nvml, "AMDSMI_LIB_DIR": "/nowhere"})
    assert backends(daemon) == [(0, "amdsmi"), (1, "amdsmi")]
    assert daemon.client.get("/gpu/get_power?gpu_ids=1").json()["power_mw"] == {"1": 350_000}
    log = daemon.log()
    assert "AMDSMI_LIB_DIR is ignored: the amdsmi Python bindings load libamd_smi.so from" in log
    assert f" loaded from {amd.lib_dir.resolve()}/lib/libamd_smi.so" in log  # which library, in the log


def test_auto_refuses_a_node_where_both_find_gpus(tmp_path: Path, nvml: FakeNvml, amd: FakeAmdSmi) -> None:
    lines = start_failure(tmp_path, {**nvml.env(), **amd.env()})
    assert lines == [
        "Error: --gpu-backend auto found 4 NVIDIA and 2 AMD GPUs; one backend serves a node: "
        "choose --gpu-backend nvml or amdsmi"
    ]
    assert nvml.count("nvmlShutdown") == 1 and amd.count("amdsmi_shut_down") == 1  # both let go


@pytest.mark.parametrize("empty", ["nvml", "amd"])
def test_auto_serves_the_library_that_finds_gpus_when_both_are_there(
    start_daemon: DaemonFactory, nvml: FakeNvml, amd: FakeAmdSmi, empty: str
) -> None:
    (nvml if empty == "nvml" else amd).create(0)
    daemon = start_daemon(env={**nvml.env(), **amd.env()})
    if empty == "nvml":
        assert backends(daemon) == [(0, "amdsmi"), (1, "amdsmi")]
        assert nvml.count("nvmlShutdown") == 1  # the library without GPUs was let go at once
    else:
        assert backends(daemon) == [(0, "nvml"), (1, "nvml"), (2, "nvml"), (3, "nvml")]
        assert amd.count("amdsmi_shut_down") == 1


@pytest.mark.parametrize("amd_side", ["no library", "no driver"])
def test_auto_without_any_gpu_serves_none_and_warns_with_the_default_groups(
    start_daemon: DaemonFactory,
    amd: FakeAmdSmi,
    no_nvml: dict[str, str],
    no_amd: dict[str, str],
    amd_side: str,
) -> None:
    if amd_side == "no driver":  # the bindings and library are there, the amdgpu driver is not
        amd.set_init_error(AMDSMI_STATUS_DRIVER_NOT_LOADED)
        env = {**no_nvml, **amd.env()}
        amd_why = f"AMD SMI initialisation failed ({amd.lib_dir.resolve()}/lib/libamd_smi.so): AMDSMI error 34: "
    else:
        env = {**no_nvml, **no_amd}
        amd_why = NO_AMD_LIBRARY
    daemon = start_daemon(env=env)
    d = daemon.client.get("/discover").json()
    assert (d["gpu_ids"], d["gpus"]) == ([], [])
    warning = next(line for line in daemon.log().splitlines() if "No GPU: " in line)
    assert "#warn] No GPU: no NVIDIA GPU (" + NO_NVML + ") and no AMD GPU (" + amd_why in warning
    assert warning.endswith("); the GPU API groups answer with no devices.")
    r = daemon.client.post("/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true")
    assert (r.status, r.error) == (400, "GPU index 0 does not exist.")
    assert daemon.client.get("/gpu/get_cumulative_energy").json() == {}
    power = daemon.client.get("/gpu/get_power")  # answers at once instead of hanging (W3)
    assert power.status == 200 and power.json()["power_mw"] == {}
    assert daemon.client.get("/gpu/get_power?gpu_ids=0").status == 400
    assert scrape(daemon.client).all("zeusd_gpu_info") == []


@pytest.mark.parametrize(
    ("enable", "nvidia_side"),
    [("gpu-read", "no library"), ("gpu-control,gpu-read,metrics", "no library"), ("gpu-read", "no GPU")],
)
def test_auto_without_any_gpu_stops_startup_when_gpu_groups_are_asked_for(
    tmp_path: Path, nvml: FakeNvml, no_nvml: dict[str, str], no_amd: dict[str, str], enable: str, nvidia_side: str
) -> None:
    if nvidia_side == "no GPU":  # the NVIDIA library is there and reports no GPU
        nvml.create(0)
        env, nvidia_why = {**nvml.env(), **no_amd}, "NVML reports no GPU"
    else:
        env, nvidia_why = {**no_nvml, **no_amd}, NO_NVML
    lines = start_failure(tmp_path, env, "--enable", enable)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {NO_GPU_GROUPS}no NVIDIA GPU ({nvidia_why}) and no AMD GPU ({NO_AMD_LIBRARY}")
    assert lines[0].endswith(")")


def test_auto_without_the_amd_bindings_simply_finds_no_amd_gpu(
    start_daemon: DaemonFactory, nvml: FakeNvml, amd: FakeAmdSmi, no_bindings: dict[str, str]
) -> None:
    daemon = start_daemon(env={**nvml.env(), **amd.env(), **no_bindings})
    assert backends(daemon) == [(0, "nvml"), (1, "nvml"), (2, "nvml"), (3, "nvml")]
    assert "No AMD SMI: " + NO_BINDINGS in daemon.log()
    assert amd.count() == 0  # the stand-in was never loaded


# --------------------------------------------------------------------------- explicit backends


def test_explicit_nvml_serves_nvidia_without_probing_amd(
    start_daemon: DaemonFactory, nvml: FakeNvml, amd: FakeAmdSmi
) -> None:
    daemon = start_daemon("--gpu-backend", "nvml", env={**nvml.env(), **amd.env()})  # AMD GPUs there too
    assert backends(daemon) == [(0, "nvml"), (1, "nvml"), (2, "nvml"), (3, "nvml")]
    assert amd.count() == 0


def test_explicit_amdsmi_serves_amd_without_probing_nvml(
    start_daemon: DaemonFactory, nvml: FakeNvml, amd: FakeAmdSmi
) -> None:
    daemon = start_daemon("--gpu-backend", "amdsmi", env={**nvml.env(), **amd.env()})
    assert backends(daemon) == [(0, "amdsmi"), (1, "amdsmi")]
    assert nvml.count() == 0


def test_explicit_nvml_without_the_library_stops_startup(
    tmp_path: Path, amd: FakeAmdSmi, no_nvml: dict[str, str]
) -> None:
    lines = start_failure(tmp_path, {**no_nvml, **amd.env()}, "--gpu-backend", "nvml")
    assert lines == [f"Error: --gpu-backend nvml: {NO_NVML}"]
    assert amd.count() == 0


def test_explicit_amdsmi_without_the_library_stops_startup(
    tmp_path: Path, nvml: FakeNvml, no_amd: dict[str, str]
) -> None:
    lines = start_failure(tmp_path, {**nvml.env(), **no_amd}, "--gpu-backend", "amdsmi")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: --gpu-backend amdsmi: {NO_AMD_LIBRARY}")
    assert "libamd_smi.so" in lines[0][len(f"Error: --gpu-backend amdsmi: {NO_AMD_LIBRARY}"):]  # the loader's words
    assert nvml.count() == 0


def test_explicit_amdsmi_without_the_bindings_says_how_to_install_them(
    tmp_path: Path, amd: FakeAmdSmi, no_bindings: dict[str, str]
) -> None:
    lines = start_failure(tmp_path, {**amd.env(), **no_bindings}, "--gpu-backend", "amdsmi")
    assert lines == [f"Error: --gpu-backend amdsmi: {NO_BINDINGS}"]
    assert amd.count() == 0


# --------------------------------------------------------------------------- the simulated node


@pytest.mark.parametrize(("vendor", "name", "function"), [
    ("nvidia", "Simulated NVIDIA H100 80GB HBM3", "0"), ("amd", "Simulated AMD Instinct MI300X", "1"),
])
def test_the_simulated_node_is_its_own_backend(start_daemon: DaemonFactory, vendor: str, name: str, function: str) -> None:
    daemon = start_daemon("--simulate", "--simulate-gpus", "2", "--simulate-vendor", vendor)
    assert backends(daemon) == [(0, "simulated"), (1, "simulated")]
    gpus = daemon.client.get("/discover").json()["gpus"]
    assert [(g["name"], g["pci_address"]) for g in gpus] == [
        (name, f"0000:18:00.{function}"), (name, f"0000:28:00.{function}")
    ]


# --------------------------------------------------------------------------- auto, an NVML that cannot initialise


def test_auto_serves_amd_when_a_stray_nvml_cannot_initialise(
    start_daemon: DaemonFactory, nvml: FakeNvml, amd: FakeAmdSmi
) -> None:
    """CUDA's libnvidia-ml on an AMD node: NVML loads but finds no driver; the AMD GPUs are served."""
    nvml.set_init_error(9)  # NVIDIA driver not loaded
    daemon = start_daemon(env={**nvml.env(), **amd.env()})
    assert backends(daemon) == [(0, "amdsmi"), (1, "amdsmi")]
    assert "NVML failed (NVML error: NVIDIA driver is not loaded); serving the AMD GPUs" in daemon.log()


def test_auto_reports_a_failing_nvml_when_there_is_no_amd_gpu(tmp_path: Path, nvml: FakeNvml, no_amd: dict[str, str]) -> None:
    nvml.set_init_error(9)
    assert start_failure(tmp_path, {**nvml.env(), **no_amd}) == ["Error: NVML error: NVIDIA driver is not loaded"]


def test_a_missing_feature_is_an_answer_not_a_read_error(start_daemon: DaemonFactory, amd: FakeAmdSmi, no_nvml: dict[str, str]) -> None:
    """AMD has no persistence mode: the API's 400 is not counted as a failed device read."""
    daemon = start_daemon(env={**amd.env(), **no_nvml})
    r = daemon.client.get("/gpu/get_persistence_mode?gpu_ids=0")
    assert (r.status, r.json()) == (400, {"errors": {"0": "Invalid request: persistence mode is not supported on AMD GPUs"}})
    assert [s for s in scrape(daemon.client).all("zeusd_device_read_errors") if s.labels.get("device") == "gpu"] == []
