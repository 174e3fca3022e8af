"""The NVML backend through the real pynvml, against the fake libnvidia-ml.so.1.

In-process tests preload the fake (pynvml then binds to it); scenarios that
depend on how the library is *loaded* run in a subprocess, because pynvml
caches the loaded library for the life of a process.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.fakenvml import (
    ENV_LOG,
    ENV_STATE,
    FIELD_POWER_INSTANT,
    VALUE_TYPE_DOUBLE,
    VALUE_TYPE_UNSIGNED_LONG_LONG,
    FakeNvml,
    build_library,
    preload_library,
)
from tests.protocols import assert_conforms
from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.base import GPU, GPUBackend
from zeusd.devices.gpu.nvml import (
    NVML_ERRORS,
    NvmlBackend,
    nvml_device_error,
    nvml_error_message,
    open_nvml_backend,
)
from zeusd.errors import StartupError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

REPO_ROOT = Path(__file__).resolve().parent.parent

INVALID = "NVML error: a supplied argument was invalid"
NOT_SUPPORTED = "NVML error: the requested operation is not available on the target device"
NO_PERMISSION = "NVML error: the current user does not have permission to perform this operation"
GPU_LOST = "NVML error: device fell off the bus or has otherwise become inacessible"
UNKNOWN = "NVML error: an internal driver error occurred"


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    preload_library()
    return build_library()


@pytest.fixture
def fake(tmp_path: Path, lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log")
    fake.create(4)
    monkeypatch.setenv(ENV_STATE, str(fake.state_path))
    monkeypatch.setenv(ENV_LOG, str(fake.log_path))
    return fake


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    backend = open_nvml_backend()
    if not hasattr(pynvml.nvmlLib, "fakenvmlIdentify"):
        backend.close()
        pytest.fail("pynvml is bound to a real libnvidia-ml, not the fake (loaded before preload?)")
    yield backend
    backend.close()


def raised(call: object) -> DeviceError:
    assert callable(call)
    try:
        call()
    except DeviceError as e:
        return e
    raise AssertionError("no DeviceError raised")


# --------------------------------------------------------------------------- the stand-in


def test_pynvml_really_uses_the_stand_in(backend: NvmlBackend, fake: FakeNvml) -> None:
    assert pynvml.nvmlLib.fakenvmlIdentify  # symbol only the fake exports
    backend.gpus[2].set_power_limit_mw(345_000)
    assert "gpu.2.power_limit_mw 345000\n" in fake.state_path.read_text()
    assert fake.gpu(2).power_limit_mw == 345_000
    # And a change made to the file is what NVML reports next.
    fake.set_gpu(2, power_mw=98_765)
    assert backend.gpus[2].get_instant_power_mw() == 98_765


def test_backend_satisfies_the_protocols(backend: NvmlBackend) -> None:
    as_backend: GPUBackend = backend  # checked by mypy (tests/ is type-checked)
    as_gpu: GPU = backend.gpus[0]
    assert_conforms(as_backend, GPUBackend)
    for gpu in backend.gpus:
        assert_conforms(gpu, GPU)
    assert as_gpu.index == 0 and as_backend.absence.endswith("reports no GPU")


# --------------------------------------------------------------------------- discovery


def test_discovery(backend: NvmlBackend) -> None:
    assert [g.index for g in backend.gpus] == [0, 1, 2, 3]
    assert {g.name for g in backend.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert [g.pci_address for g in backend.gpus] == [
        "0000:18:00.0",
        "0000:19:00.0",
        "0000:1a:00.0",  # lower-case hex
        "0000:1b:00.0",
    ]
    assert all(g.energy_counter_available for g in backend.gpus)
    assert not any(g.uses_power_usage_fallback for g in backend.gpus)


def test_discovery_custom_names_and_pci(fake: FakeNvml) -> None:
    fake.create(
        2,
        gpus=[
            {"name": "NVIDIA A100-SXM4-40GB", "pci_domain": 0x1, "pci_bus": 0xAB, "pci_device": 0x1F},
            {"name": "Tesla V100", "pci_domain": 0xBEEF, "pci_bus": 0x3, "pci_device": 0x0},
        ],
    )
    backend = open_nvml_backend()
    try:
        assert [(g.name, g.pci_address) for g in backend.gpus] == [
            ("NVIDIA A100-SXM4-40GB", "0001:ab:1f.0"),
            ("Tesla V100", "beef:03:00.0"),
        ]
    finally:
        backend.close()


def test_zero_devices(fake: FakeNvml) -> None:
    fake.create(0)
    backend = open_nvml_backend()
    assert list(backend.gpus) == []
    backend.close()


def test_pci_failure_is_not_fatal(fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetPciInfo_v3", 999, gpu=1)
    backend = open_nvml_backend()
    try:
        assert [g.pci_address for g in backend.gpus] == ["0000:18:00.0", "", "0000:1a:00.0", "0000:1b:00.0"]
    finally:
        backend.close()


def test_close_shuts_down_once(fake: FakeNvml) -> None:
    backend = open_nvml_backend()
    assert fake.count("nvmlInitWithFlags") == 1
    backend.close()
    backend.close()
    assert fake.count("nvmlShutdown") == 1


# --------------------------------------------------------------------------- reads


def test_reads(backend: NvmlBackend, fake: FakeNvml) -> None:
    gpu = backend.gpus[1]
    assert gpu.get_instant_power_mw() == 150_000
    assert gpu.get_total_energy_mj() == 500_000
    assert gpu.get_power_limit_mw() == 700_000
    assert gpu.get_power_limit_constraints_mw() == (200_000, 700_000)
    assert gpu.get_persistence_mode() is False

    fake.set_gpu(
        1,
        power_mw=123_456,
        energy_mj=10**12,
        power_limit_mw=300_000,
        min_power_limit_mw=100_000,
        max_power_limit_mw=350_000,
        persistence_mode=True,
    )
    assert gpu.get_instant_power_mw() == 123_456
    assert gpu.get_total_energy_mj() == 10**12  # 64-bit counter
    assert gpu.get_power_limit_mw() == 300_000
    assert gpu.get_power_limit_constraints_mw() == (100_000, 350_000)
    assert gpu.get_persistence_mode() is True
    assert backend.gpus[0].get_instant_power_mw() == 150_000  # other GPUs untouched


def test_energy_counter_advances(fake: FakeNvml) -> None:
    fake.set_all_gpus(energy_step_mj=250)
    backend = open_nvml_backend()  # the startup probe reads once
    try:
        gpu = backend.gpus[0]
        first = gpu.get_total_energy_mj()
        assert first == 500_250
        assert gpu.get_total_energy_mj() == first + 250
        assert fake.gpu(0).energy_mj == first + 500
    finally:
        backend.close()


def test_instant_power_64_bit_value_is_truncated_to_32_bits(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_gpu(0, power_value_type=VALUE_TYPE_UNSIGNED_LONG_LONG, power_mw=(7 << 32) + 222_000)
    assert backend.gpus[0].get_instant_power_mw() == 222_000


def test_instant_power_wobble_alternates_per_gpu(backend: NvmlBackend, fake: FakeNvml) -> None:
    """The benchmark's changing reading (upstream publishes only on change): +wobble on every other read."""
    fake.set_gpu(0, power_mw=100_000, power_wobble_mw=7)
    first = [backend.gpus[0].get_instant_power_mw() for _ in range(4)]
    assert sorted(first[:2]) == [100_000, 100_007] and first[2:] == first[:2]
    assert [backend.gpus[1].get_instant_power_mw() for _ in range(3)] == [150_000] * 3  # wobble 0: constant
    assert fake.gpu(0).power_mw == 100_000  # reads do not write the state


def test_instant_power_other_value_type_is_invalid_argument(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_gpu(0, power_value_type=VALUE_TYPE_DOUBLE)
    error = raised(backend.gpus[0].get_instant_power_mw)
    assert (error.message, error.status) == (INVALID, 400)


def test_instant_power_per_field_error(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_field_return(3, FIELD_POWER_INSTANT, 15)
    error = raised(backend.gpus[3].get_instant_power_mw)
    assert (error.message, error.status) == (GPU_LOST, 500)
    assert not backend.gpus[3].uses_power_usage_fallback
    fake.set_field_return(3, FIELD_POWER_INSTANT, 0)
    assert backend.gpus[3].get_instant_power_mw() == 150_000


def test_instant_power_reads_only_field_186(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.clear_log()
    backend.gpus[2].get_instant_power_mw()
    assert fake.calls() == [("nvmlDeviceGetFieldValues", 2, ("186:0",))]


# --------------------------------------------------------------------------- instant-power fallback


def test_fallback_when_field_unsupported_at_startup(fake: FakeNvml) -> None:
    fake.set_gpu(1, instant_power_supported=False, avg_power_mw=111_000)
    backend = open_nvml_backend()
    try:
        assert [g.uses_power_usage_fallback for g in backend.gpus] == [False, True, False, False]
        fake.clear_log()
        assert backend.gpus[1].get_instant_power_mw() == 111_000
        assert backend.gpus[0].get_instant_power_mw() == 150_000
        assert fake.count("nvmlDeviceGetFieldValues", gpu=1) == 0
        assert fake.count("nvmlDeviceGetPowerUsage", gpu=1) == 1
        assert fake.count("nvmlDeviceGetPowerUsage", gpu=0) == 0
    finally:
        backend.close()


def test_fallback_when_the_call_says_not_supported(fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetFieldValues", 3, gpu=2)
    backend = open_nvml_backend()
    try:
        assert backend.gpus[2].uses_power_usage_fallback
        assert backend.gpus[2].get_instant_power_mw() == 140_000
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("fault", "message", "status"),
    [
        (lambda f: f.set_gpu(0, instant_power_supported=False), NOT_SUPPORTED, 400),  # the field's own NOT_SUPPORTED
        (lambda f: f.inject_error("nvmlDeviceGetFieldValues", 999, gpu=0), UNKNOWN, 500),
    ],
    ids=["field-not-supported", "call-fails"],
)
def test_a_failed_read_never_changes_the_read_method(
    backend: NvmlBackend, fake: FakeNvml, fault: Callable[[FakeNvml], None], message: str, status: int
) -> None:
    """The method is chosen once at startup: a later failure is that read's error, and the next
    read asks field 186 again (never the 1 s averaged nvmlDeviceGetPowerUsage)."""
    gpu = backend.gpus[0]
    assert gpu.get_instant_power_mw() == 150_000
    fault(fake)
    error = raised(gpu.get_instant_power_mw)
    assert (error.message, error.status) == (message, status)
    fake.set_gpu(0, instant_power_supported=True)
    fake.clear_error()
    fake.clear_log()
    assert gpu.get_instant_power_mw() == 150_000
    assert not gpu.uses_power_usage_fallback
    assert [c.name for c in fake.calls()] == ["nvmlDeviceGetFieldValues"]


def test_no_power_reading_at_all_is_not_supported(fake: FakeNvml) -> None:
    fake.set_gpu(0, instant_power_supported=False, power_usage_supported=False)
    backend = open_nvml_backend()
    try:
        error = raised(backend.gpus[0].get_instant_power_mw)
        assert (error.message, error.status) == (NOT_SUPPORTED, 400)
    finally:
        backend.close()


# --------------------------------------------------------------------------- energy probe


def test_energy_unsupported(fake: FakeNvml) -> None:
    fake.set_gpu(3, energy_supported=False)
    backend = open_nvml_backend()
    try:
        assert [g.energy_counter_available for g in backend.gpus] == [True, True, True, False]
        error = raised(backend.gpus[3].get_total_energy_mj)
        assert (error.message, error.status) == (NOT_SUPPORTED, 400)
    finally:
        backend.close()


def test_probe_errors_do_not_fail_startup(fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetTotalEnergyConsumption", 999, gpu=0)
    fake.inject_error("nvmlDeviceGetFieldValues", 10, gpu=0)
    backend = open_nvml_backend()
    try:
        gpu = backend.gpus[0]
        assert gpu.energy_counter_available is False
        assert gpu.uses_power_usage_fallback is False  # only NOT_SUPPORTED selects the fallback
        fake.clear_error()
        assert gpu.get_instant_power_mw() == 150_000
    finally:
        backend.close()


# --------------------------------------------------------------------------- writes


def test_writes(backend: NvmlBackend, fake: FakeNvml) -> None:
    gpu = backend.gpus[3]
    fake.clear_log()
    gpu.set_persistence_mode(True)
    gpu.set_power_limit_mw(250_000)
    gpu.set_gpu_locked_clocks(1000, 1500)
    gpu.set_mem_locked_clocks(2619, 2619)
    state = fake.gpu(3)
    assert state.persistence_mode is True
    assert state.power_limit_mw == 250_000
    assert state.gpu_locked_clocks == (1000, 1500)
    assert state.mem_locked_clocks == (2619, 2619)
    assert gpu.get_persistence_mode() is True
    assert gpu.get_power_limit_mw() == 250_000

    gpu.reset_gpu_locked_clocks()
    gpu.reset_mem_locked_clocks()
    gpu.set_persistence_mode(False)
    state = fake.gpu(3)
    assert (state.gpu_locked_clocks, state.mem_locked_clocks, state.persistence_mode) == (None, None, False)
    assert fake.gpu(0) == fake.gpus()[0]  # other GPUs untouched
    assert fake.gpu(0).power_limit_mw == 700_000

    assert [(c.name, c.args) for c in fake.calls(gpu=3)] == [
        ("nvmlDeviceSetPersistenceMode", ("1",)),
        ("nvmlDeviceSetPowerManagementLimit", ("250000",)),
        ("nvmlDeviceSetGpuLockedClocks", ("1000", "1500")),
        ("nvmlDeviceSetMemoryLockedClocks", ("2619", "2619")),
        ("nvmlDeviceGetPersistenceMode", ()),
        ("nvmlDeviceGetPowerManagementLimit", ()),
        ("nvmlDeviceResetGpuLockedClocks", ()),
        ("nvmlDeviceResetMemoryLockedClocks", ()),
        ("nvmlDeviceSetPersistenceMode", ("0",)),
    ]
    assert fake.calls(gpu=0) == []


@pytest.mark.parametrize("limit", [199_999, 700_001, 10_000, 0])
def test_out_of_range_power_limit(backend: NvmlBackend, fake: FakeNvml, limit: int) -> None:
    error = raised(lambda: backend.gpus[0].set_power_limit_mw(limit))
    assert (error.message, error.status) == (INVALID, 400)
    assert "invalid" in str(error)
    assert fake.gpu(0).power_limit_mw == 700_000
    backend.gpus[0].set_power_limit_mw(200_000)  # the bounds themselves are valid
    backend.gpus[0].set_power_limit_mw(700_000)


def test_locked_clocks_min_above_max(backend: NvmlBackend, fake: FakeNvml) -> None:
    for call in (backend.gpus[0].set_gpu_locked_clocks, backend.gpus[0].set_mem_locked_clocks):
        error = raised(lambda: call(1500, 1000))
        assert (error.message, error.status) == (INVALID, 400)
    assert fake.gpu(0).gpu_locked_clocks is None
    assert fake.gpu(0).mem_locked_clocks is None


# --------------------------------------------------------------------------- errors


def test_no_permission_then_cleared(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceSetPowerManagementLimit", 4, gpu=1)
    error = raised(lambda: backend.gpus[1].set_power_limit_mw(300_000))
    assert (error.message, error.status) == (NO_PERMISSION, 403)
    assert fake.gpu(1).power_limit_mw == 700_000
    backend.gpus[2].set_power_limit_mw(300_000)  # other GPUs unaffected
    fake.clear_error("nvmlDeviceSetPowerManagementLimit", gpu=1)
    backend.gpus[1].set_power_limit_mw(300_000)
    assert fake.gpu(1).power_limit_mw == 300_000


def test_error_for_every_gpu(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetPersistenceMode", 999)
    for gpu in backend.gpus:
        error = raised(gpu.get_persistence_mode)
        assert (error.message, error.status) == ("NVML error: an internal driver error occurred", 500)
    fake.clear_injections()
    assert [g.get_persistence_mode() for g in backend.gpus] == [False] * 4


def test_gpu_lost_then_back(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_lost(2)
    gpu = backend.gpus[2]
    for call in (
        gpu.get_instant_power_mw,
        gpu.get_total_energy_mj,
        gpu.get_power_limit_mw,
        gpu.get_power_limit_constraints_mw,
        gpu.get_persistence_mode,
        lambda: gpu.set_persistence_mode(True),
        lambda: gpu.set_power_limit_mw(300_000),
        lambda: gpu.set_gpu_locked_clocks(1000, 1500),
        gpu.reset_gpu_locked_clocks,
        lambda: gpu.set_mem_locked_clocks(1000, 1500),
        gpu.reset_mem_locked_clocks,
    ):
        error = raised(call)
        assert (error.message, error.status) == (GPU_LOST, 500)
    assert backend.gpus[1].get_power_limit_mw() == 700_000
    fake.set_lost(2, False)
    assert gpu.get_power_limit_mw() == 700_000


@pytest.mark.parametrize(
    ("code", "message", "status"),
    [
        (1, "NVML error: NVML was not first initialized with `Nvml::init()`", 500),
        (2, INVALID, 400),
        (3, NOT_SUPPORTED, 400),
        (4, NO_PERMISSION, 403),
        (10, "NVML error: the provided timeout was reached", 500),
        (15, GPU_LOST, 500),
        (999, "NVML error: an internal driver error occurred", 500),
        (5, "NVML error: unexpected enum variant value: 5", 500),
        (42, "NVML error: unexpected enum variant value: 42", 500),
    ],
)
def test_return_code_mapping_through_pynvml(
    backend: NvmlBackend, fake: FakeNvml, code: int, message: str, status: int
) -> None:
    fake.inject_error("nvmlDeviceGetPowerManagementLimit", code, gpu=0)
    error = raised(backend.gpus[0].get_power_limit_mw)
    assert (error.message, error.status, str(error)) == (message, status, message)


def test_error_table_matches_spec() -> None:
    assert sorted(NVML_ERRORS) == [1, 2, 3, 4, *range(6, 22), 999]
    assert nvml_error_message(17) == "NVML error: device control has been blocked by the operating system/cgroups"
    assert nvml_error_message(0) == "NVML error: unexpected enum variant value: 0"
    assert {code for code, (_, status) in NVML_ERRORS.items() if status != 500} == {2, 3, 4}
    error = nvml_device_error(123456)
    assert (error.message, error.status) == ("NVML error: unexpected enum variant value: 123456", 500)


# --------------------------------------------------------------------------- startup failures (in process)


def test_init_error_is_a_startup_error(fake: FakeNvml) -> None:
    fake.set_init_error(9)
    with pytest.raises(StartupError, match="^NVML error: NVIDIA driver is not loaded$"):
        open_nvml_backend()
    fake.set_init_error(0)
    open_nvml_backend().close()


def test_lost_gpu_at_startup_is_a_startup_error(fake: FakeNvml) -> None:
    fake.set_lost(1)
    with pytest.raises(StartupError, match="^" + GPU_LOST + "$"):
        open_nvml_backend()
    # The failed startup released its NVML reference.
    assert fake.count("nvmlInitWithFlags") == fake.count("nvmlShutdown") == 1


def test_count_error_is_a_startup_error(fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetCount_v2", 999)
    with pytest.raises(StartupError, match="^NVML error: an internal driver error occurred$"):
        open_nvml_backend()


def test_name_error_is_a_startup_error(fake: FakeNvml) -> None:
    fake.inject_error("nvmlDeviceGetName", 4, gpu=3)
    with pytest.raises(StartupError, match="^" + NO_PERMISSION + "$"):
        open_nvml_backend()


# --------------------------------------------------------------------------- library loading (subprocess)

_SCRIPT = textwrap.dedent(
    """
    import json
    from zeusd.devices.gpu.nvml import open_nvml_backend
    from zeusd.errors import StartupError
    try:
        backend = open_nvml_backend()
    except StartupError as e:
        print(json.dumps({"startup_error": str(e)}))
    else:
        gpus = backend.gpus
        if gpus:
            gpus[0].set_power_limit_mw(456000)
        print(json.dumps({"gpus": [[g.index, g.name, g.pci_address] for g in gpus]}))
        backend.close()
    """
)


def run_backend_subprocess(env: dict[str, str]) -> dict[str, object]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=full_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    payload: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return payload


def test_subprocess_loads_the_stand_in_via_ld_library_path(fake: FakeNvml) -> None:
    fake.create(3)
    out = run_backend_subprocess(fake.env())
    assert out == {
        "gpus": [
            [0, "NVIDIA H100 80GB HBM3", "0000:18:00.0"],
            [1, "NVIDIA H100 80GB HBM3", "0000:19:00.0"],
            [2, "NVIDIA H100 80GB HBM3", "0000:1a:00.0"],
        ]
    }
    assert fake.gpu(0).power_limit_mw == 456_000
    assert fake.calls("nvmlDeviceSetPowerManagementLimit") == [("nvmlDeviceSetPowerManagementLimit", 0, ("456000",))]


def test_subprocess_missing_library_means_zero_gpus(tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("a real libnvidia-ml is installed system-wide; it cannot be hidden from dlopen")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_backend_subprocess({"LD_LIBRARY_PATH": str(empty), ENV_STATE: "", ENV_LOG: ""})
    assert out == {"gpus": []}


def test_subprocess_init_error(fake: FakeNvml) -> None:
    fake.set_init_error(9)
    out = run_backend_subprocess(fake.env())
    assert out == {"startup_error": "NVML error: NVIDIA driver is not loaded"}
    fake.set_init_error(18)
    out = run_backend_subprocess(fake.env())
    assert out == {"startup_error": "NVML error: RM detects a driver/library version mismatch"}


# --------------------------------------------------------------------------- concurrency, delays, call log


def test_a_hanging_call_blocks_only_its_gpu(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_delay("nvmlDeviceGetPowerManagementLimit", -1, gpu=0)  # hang until cleared
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(backend.gpus[0].get_power_limit_mw()))
    worker.start()
    fake.wait_for_calls("nvmlDeviceGetPowerManagementLimit", gpu=0)
    start = time.monotonic()
    assert backend.gpus[1].get_power_limit_mw() == 700_000
    backend.gpus[0].set_power_limit_mw(300_000)  # other functions on the same GPU are not delayed
    assert time.monotonic() - start < 0.5
    assert worker.is_alive() and results == []
    fake.clear_delay()
    worker.join(timeout=2)
    assert results == [300_000]


def test_fixed_delay(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.set_delay("nvmlDeviceGetFieldValues", 150)  # every GPU
    start = time.monotonic()
    backend.gpus[3].get_instant_power_mw()
    assert 0.14 <= time.monotonic() - start < 1.0
    fake.set_delay("nvmlDeviceGetFieldValues", 0)
    start = time.monotonic()
    backend.gpus[3].get_instant_power_mw()
    assert time.monotonic() - start < 0.1


_HAMMER = textwrap.dedent(
    """
    import sys, threading, warnings
    warnings.simplefilter("ignore")
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    def work():
        for _ in range(int(sys.argv[1])):
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    """
)


def test_concurrent_threads_and_processes_share_state_consistently(backend: NvmlBackend, fake: FakeNvml) -> None:
    """Read-modify-write of the shared file never loses an update (energy steps by 1 per read)."""
    fake.set_gpu(0, energy_mj=0, energy_step_mj=1)
    fake.clear_log()
    per_thread = 100
    env = {**os.environ, **fake.env()}
    procs = [
        subprocess.Popen([sys.executable, "-c", _HAMMER, str(per_thread)], env=env, cwd=REPO_ROOT) for _ in range(2)
    ]

    def local() -> None:
        for _ in range(per_thread):
            backend.gpus[0].get_total_energy_mj()
            backend.gpus[1].get_instant_power_mw()

    threads = [threading.Thread(target=local) for _ in range(4)]
    for t in threads:
        t.start()
    for power in range(50):  # the helper writes other fields meanwhile
        fake.set_gpu(0, power_mw=100_000 + power)
    for t in threads:
        t.join()
    assert all(p.wait(timeout=30) == 0 for p in procs)

    reads = per_thread * 4 * 3
    assert fake.gpu(0).energy_mj == reads
    assert fake.gpu(0).power_mw == 100_049
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption", gpu=0) == reads
    assert fake.count("nvmlDeviceGetFieldValues", gpu=1) == per_thread * 4
    # Every line is intact (one write() per line, O_APPEND): a torn or interleaved line fails the pattern.
    assert fake.log_path is not None
    lines = fake.log_path.read_text().splitlines()
    assert len(lines) >= reads + per_thread * 4
    torn = [line for line in lines if not re.fullmatch(r"nvml[A-Za-z_0-9]+ -?\d+( [^ ].*)?", line)]
    assert torn == []


def test_no_reads_while_idle(backend: NvmlBackend, fake: FakeNvml) -> None:
    fake.clear_log()
    time.sleep(0.05)
    assert fake.count() == 0


def test_without_a_state_file_the_library_simulates_four_gpus(lib_dir: Path) -> None:
    out = run_backend_subprocess({"LD_LIBRARY_PATH": str(lib_dir), ENV_STATE: "", ENV_LOG: ""})
    assert out == {
        "gpus": [[i, "NVIDIA H100 80GB HBM3", f"0000:{0x18 + i:02x}:00.0"] for i in range(4)]
    }


def test_build_library_is_cached_and_concurrency_safe(tmp_path: Path) -> None:
    dest = tmp_path / "build"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_library(dest)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lib = dest / "libnvidia-ml.so.1"
    first = lib.stat()
    assert build_library(dest) == dest
    assert lib.stat().st_ino == first.st_ino  # not rebuilt: the source hash is unchanged
    assert sorted(p.name for p in dest.iterdir()) == ["libnvidia-ml.so.1", "libnvidia-ml.so.1.sha256"]
    assert b"libnvidia-ml.so.1" in lib.read_bytes()  # the soname pynvml's dlopen matches
