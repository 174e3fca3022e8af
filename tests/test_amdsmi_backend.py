"""The AMD SMI backend through the real ``amdsmi`` bindings, against the stand-in libamd_smi.so.

In-process tests preload the stand-in before anything imports ``amdsmi`` (the
bindings bind their library once per process, at import); what depends on
how the library is *found* runs in a subprocess.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.fakeamdsmi import (
    AMDSMI_DEV_PERF_LEVEL_AUTO,
    AMDSMI_DEV_PERF_LEVEL_MANUAL,
    AMDSMI_STATUS_BUSY,
    AMDSMI_STATUS_DRIVER_NOT_LOADED,
    AMDSMI_STATUS_INVAL,
    AMDSMI_STATUS_IO,
    AMDSMI_STATUS_NO_PERM,
    AMDSMI_STATUS_NOT_SUPPORTED,
    AMDSMI_STATUS_RETRY,
    AMDSMI_STATUS_TIMEOUT,
    ENV_LOG,
    ENV_STATE,
    LIBRARY_NAME,
    NA_POWER,
    FakeAmdSmi,
    build_library,
    installed_abi,
    power_info_function,
    preload_library,
)
from tests.protocols import assert_conforms
from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.amdsmi import (
    ENERGY_UNAVAILABLE,
    PERSISTENCE_UNSUPPORTED,
    SINGLE_DOMAIN_RESET,
    AmdSmiBackend,
    AmdSmiError,
    AmdSmiUnavailable,
    energy_counter_verdict,
    open_amdsmi_backend,
)
from zeusd.devices.gpu.base import GPU, GPUBackend
from zeusd.errors import StartupError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("amdsmi") is None,
    reason="the amdsmi Python bindings are not installed (pip install -e '.[test]')",
)

REPO_ROOT = Path(__file__).resolve().parent.parent

INVALID = "AMDSMI error 1: AMDSMI_STATUS_INVAL - Invalid parameters"
NOT_SUPPORTED = "AMDSMI error 2: AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported"
NO_PERMISSION = "AMDSMI error 10: AMDSMI_STATUS_NO_PERM - Permission Denied"
#: The library function behind the bindings' power read (the 6.4 bindings call a _v2).
POWER_INFO = power_info_function()


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    preload_library()
    return build_library()


@pytest.fixture
def fake(tmp_path: Path, lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAmdSmi:
    fake = FakeAmdSmi(tmp_path / "amdsmi.state", tmp_path / "amdsmi.log")
    fake.create(4)
    for key, value in fake.env().items():
        monkeypatch.setenv(key, value)
    return fake


class Sleeps:
    """Stands in for time.sleep in the startup validation; records each request."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)


@pytest.fixture
def open_backend(fake: FakeAmdSmi) -> Iterator[Callable[..., AmdSmiBackend]]:
    opened: list[AmdSmiBackend] = []

    def open_(sleeps: Sleeps | None = None) -> AmdSmiBackend:
        backend = open_amdsmi_backend(sleep=sleeps if sleeps is not None else Sleeps())
        opened.append(backend)
        import amdsmi  # bound to whatever the first import in this process found

        if not hasattr(amdsmi.amdsmi_wrapper._libraries[LIBRARY_NAME], "fakeamdsmiIdentify"):
            pytest.fail("the amdsmi bindings are bound to a real libamd_smi.so, not the stand-in")
        return backend

    yield open_
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(open_backend: Callable[..., AmdSmiBackend]) -> AmdSmiBackend:
    return open_backend()


# --------------------------------------------------------------------------- the stand-in


def test_bindings_really_use_the_stand_in(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.gpus[2].set_power_limit_mw(345_000)
    assert "gpu.2.power_cap_uw 345000000\n" in fake.state_path.read_text()
    assert fake.gpu(2).power_cap_uw == 345_000_000
    # And a change made to the file is what AMD SMI reports next.
    fake.set_gpu(2, current_power_w=98)
    assert backend.gpus[2].get_instant_power_mw() == 98_000


def test_stand_in_structs_have_the_bindings_layouts(lib_dir: Path) -> None:
    """The stand-in is compiled for the installed bindings' ABI: every struct it fills
    has the size the bindings allocate for it."""
    import amdsmi

    wrapper = amdsmi.amdsmi_wrapper
    size_of = ctypes.CDLL(str(lib_dir / "lib" / LIBRARY_NAME)).fakeamdsmiStructSize
    size_of.restype = ctypes.c_size_t
    size_of.argtypes = [ctypes.c_char_p]
    for name in (
        "amdsmi_version_t",
        "amdsmi_power_info_t",
        "amdsmi_asic_info_t",
        "amdsmi_power_cap_info_t",
        "amdsmi_clk_info_t",
        "amdsmi_bdf_t",
    ):
        assert size_of(name.encode()) == ctypes.sizeof(getattr(wrapper, name)), name
    assert installed_abi() in (24, 25, 26)


def test_every_symbol_the_bindings_bind_exists_and_unimplemented_ones_say_not_supported(backend: AmdSmiBackend) -> None:
    import amdsmi

    handle = backend.gpus[0]._handle
    with pytest.raises(amdsmi.AmdSmiLibraryException) as caught:
        amdsmi.amdsmi_get_gpu_vram_usage(handle)  # a stub: zeusd never needs it
    assert caught.value.get_error_code() == AMDSMI_STATUS_NOT_SUPPORTED


def test_backend_satisfies_the_protocols(backend: AmdSmiBackend) -> None:
    as_backend: GPUBackend = backend  # checked by mypy (tests/ is type-checked)
    as_gpu: GPU = backend.gpus[0]
    assert_conforms(as_backend, GPUBackend)
    for gpu in backend.gpus:
        assert_conforms(gpu, GPU)
    assert as_gpu.index == 0 and as_backend.absence.endswith("reports no GPU")


def test_the_bindings_are_imported_only_when_the_backend_opens() -> None:
    code = "import sys, zeusd.devices.gpu.amdsmi, zeusd.devices.gpu.nvml; print('amdsmi' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# --------------------------------------------------------------------------- discovery


def test_discovery(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    fake.create(
        3,
        gpus=[
            {},
            {"name": "AMD Instinct MI250X", "pci_domain": 1, "pci_bus": 0xAB, "pci_device": 0x1F, "pci_function": 1},
            {},
        ],
    )
    backend = open_backend()
    assert [g.index for g in backend.gpus] == [0, 1, 2]
    assert [g.name for g in backend.gpus] == ["AMD Instinct MI300X", "AMD Instinct MI250X", "AMD Instinct MI300X"]
    # As AMD SMI reports it: lower-case hex and the real function number.
    assert [g.pci_address for g in backend.gpus] == ["0000:0c:00.0", "0001:ab:1f.1", "0000:0e:00.0"]
    assert all(g.energy_counter_available for g in backend.gpus)
    assert fake.calls("amdsmi_init")[0].args == ("2",)  # AMDSMI_INIT_AMD_GPUS only
    # The ABI 26 stand-in reports 26.2, the first thread-safe library; ABI 24/25 ones never are.
    assert backend.serialized == (installed_abi() != 26)


def test_zero_gpus(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    fake.set_num_gpus(0)
    sleeps = Sleeps()
    backend = open_backend(sleeps)
    assert backend.gpus == ()
    assert backend.absence == "AMD SMI reports no GPU"
    assert sleeps.requested == []  # nothing to validate, no half-second wait


def test_a_pci_failure_degrades_to_an_unknown_address(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    fake.inject_error("amdsmi_get_gpu_device_bdf", AMDSMI_STATUS_IO, gpu=1)
    backend = open_backend()
    assert [g.pci_address for g in backend.gpus] == ["0000:0c:00.0", "", "0000:0e:00.0", "0000:0f:00.0"]


def test_the_power_cap_range_is_known_from_startup(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    fake.set_gpu(1, min_power_cap_uw=123_456_789, max_power_cap_uw=765_432_100)
    fake.inject_error("amdsmi_get_power_cap_info", AMDSMI_STATUS_IO, gpu=2)
    backend = open_backend()
    assert [g.power_limit_range_mw for g in backend.gpus] == [
        (200_000, 750_000),
        (123_456, 765_432),
        None,  # unknown: left to the driver
        (200_000, 750_000),
    ]


def test_power_reading_falls_back_to_the_average_where_current_is_not_available(
    fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]
) -> None:
    fake.create(
        3,
        gpus=[
            {"current_power_w": NA_POWER, "average_power_w": 270},  # MI250: average only
            {"current_power_w": NA_POWER, "average_power_w": NA_POWER},
            {"current_power_w": 0xFFFFFFFF, "average_power_w": 0xFFFFFFFF},  # the 7.x header's sentinel
        ],
    )
    backend = open_backend()
    assert backend.gpus[0].power_field == "average_socket_power"
    assert backend.gpus[0].get_instant_power_mw() == 270_000
    for gpu in backend.gpus[1:]:
        assert gpu.power_field is None
        with pytest.raises(DeviceError) as caught:
            gpu.get_instant_power_mw()
        error = caught.value
        assert (error.status, error.message) == (400, NOT_SUPPORTED)


# --------------------------------------------------------------------------- energy counter validation


def test_validation_waits_half_a_second_once_for_all_gpus(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    sleeps = Sleeps()
    open_backend(sleeps)
    assert sleeps.requested == [0.5]
    # Each GPU: one power read, and the counter read before and after the wait.
    for index in range(4):
        assert fake.count(POWER_INFO, gpu=index) == 2  # the probe, the validation
        assert fake.count("amdsmi_get_energy_count", gpu=index) == 2


def test_only_counters_that_agree_with_power_are_served(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    step = 11_468_641  # 0.5 s at 350 W in 15.259 uJ ticks
    fake.create(
        5,
        gpus=[
            {},  # agrees
            {"energy_step": step * 20},  # counts 20x too fast (wrong resolution, ROCm/amdsmi#38)
            {"energy_supported": False},  # no counter at all
            {"current_power_w": 0, "average_power_w": 0},  # idle: nothing to compare with
            {"energy_step": step * 9},  # 9x is still within the factor of 10
        ],
    )
    backend = open_backend()
    assert [g.energy_counter_available for g in backend.gpus] == [True, False, False, False, True]
    fake.clear_log()
    for gpu in (backend.gpus[1], backend.gpus[2], backend.gpus[3]):
        with pytest.raises(DeviceError) as caught:
            gpu.get_total_energy_mj()
        error = caught.value
        assert (error.status, error.message) == (400, ENERGY_UNAVAILABLE)
    assert fake.count("amdsmi_get_energy_count") == 0  # refused without asking the library


def test_a_failing_counter_at_startup_is_left_out(fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]) -> None:
    fake.inject_error("amdsmi_get_energy_count", AMDSMI_STATUS_IO, gpu=0)
    backend = open_backend()
    assert [g.energy_counter_available for g in backend.gpus] == [False, True, True, True]


@pytest.mark.parametrize(
    ("expected", "measured", "verdict"),
    [
        (100.0, 100.0, True),
        (100.0, 10.01, True),
        (100.0, 999.0, True),
        (100.0, 10.0, False),  # the bounds are exclusive
        (100.0, 1000.0, False),
        (100.0, 0.0, False),
        (0.0009, 0.0009, None),  # too little power to judge
    ],
)
def test_energy_counter_verdict(expected: float, measured: float, verdict: bool | None) -> None:
    assert energy_counter_verdict(expected, measured) is verdict


# --------------------------------------------------------------------------- reads, with AMD SMI's units


def test_power_is_current_socket_power_in_milliwatts(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    fake.set_gpu(1, current_power_w=421, average_power_w=380)
    assert backend.gpus[1].get_instant_power_mw() == 421_000
    assert backend.gpus[0].get_instant_power_mw() == 350_000


def test_energy_is_ticks_times_resolution(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    # 15.625 uJ and 1 mJ are exact in the library's float: the arithmetic is checkable by hand.
    fake.set_gpu(0, energy_counter=8_000_000, energy_resolution_nj=15_625, energy_step=0)
    fake.set_gpu(1, energy_counter=123_456_789, energy_resolution_nj=1_000_000, energy_step=0)
    fake.set_gpu(2, energy_counter=1_999, energy_resolution_nj=500, energy_step=0)  # 999.5 uJ
    assert backend.gpus[0].get_total_energy_mj() == 125_000
    assert backend.gpus[1].get_total_energy_mj() == 123_456_789
    assert backend.gpus[2].get_total_energy_mj() == 0  # truncated like upstream, not rounded


def test_power_limits_are_microwatts_floored_to_milliwatts(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    fake.set_gpu(3, power_cap_uw=312_345_678, min_power_cap_uw=123_456_789, max_power_cap_uw=765_432_100)
    assert backend.gpus[3].get_power_limit_mw() == 312_345
    assert backend.gpus[3].get_power_limit_constraints_mw() == (123_456, 765_432)
    assert backend.gpus[0].get_power_limit_constraints_mw() == (200_000, 750_000)


def test_persistence_mode_does_not_exist_on_amd(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    fake.clear_log()
    for call in (backend.gpus[0].get_persistence_mode, lambda: backend.gpus[0].set_persistence_mode(True)):
        with pytest.raises(DeviceError) as caught:
            call()
        error = caught.value
        assert (error.status, error.message) == (400, PERSISTENCE_UNSUPPORTED)
    assert fake.calls() == []


# --------------------------------------------------------------------------- control, validated like the driver


def test_set_power_limit_converts_exactly(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.gpus[1].set_power_limit_mw(456_789)
    assert fake.gpu(1).power_cap_uw == 456_789_000
    assert fake.calls("amdsmi_set_power_cap", gpu=1)[-1].args == ("0", "456789000")
    assert fake.gpu(0).power_cap_uw == 750_000_000


@pytest.mark.parametrize("limit_mw", [199_999, 750_001, 0])
def test_power_limit_outside_the_range_is_refused_and_changes_nothing(
    backend: AmdSmiBackend, fake: FakeAmdSmi, limit_mw: int
) -> None:
    with pytest.raises(DeviceError) as caught:
        backend.gpus[0].set_power_limit_mw(limit_mw)
    error = caught.value
    assert (error.status, error.message) == (400, INVALID)
    assert fake.gpu(0).power_cap_uw == 750_000_000


def clock_writes(fake: FakeAmdSmi, gpu: int) -> list[tuple[str, ...]]:
    return [c.args for c in fake.calls("amdsmi_set_gpu_clk_limit", gpu=gpu)]


def test_gpu_clock_range_min_first_when_lowering(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.gpus[0].set_gpu_locked_clocks(800, 1500)
    g = fake.gpu(0)
    assert (g.gfx_min_mhz, g.gfx_max_mhz, g.perf_level) == (800, 1500, AMDSMI_DEV_PERF_LEVEL_MANUAL)
    assert clock_writes(fake, 0) == [("0", "0", "800"), ("0", "1", "1500")]  # GFX: min, then max
    assert (fake.gpu(1).gfx_min_mhz, fake.gpu(1).gfx_max_mhz) == (500, 2100)


def test_gpu_clock_range_max_first_when_the_new_min_is_above_the_current_max(
    backend: AmdSmiBackend, fake: FakeAmdSmi
) -> None:
    backend.gpus[0].set_gpu_locked_clocks(800, 1000)
    fake.clear_log()
    backend.gpus[0].set_gpu_locked_clocks(1500, 1900)
    assert (fake.gpu(0).gfx_min_mhz, fake.gpu(0).gfx_max_mhz) == (1500, 1900)
    assert clock_writes(fake, 0) == [("0", "1", "1900"), ("0", "0", "1500")]


def test_memory_clock_range(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.gpus[2].set_mem_locked_clocks(1000, 1200)
    g = fake.gpu(2)
    assert (g.mem_min_mhz, g.mem_max_mhz) == (1000, 1200)
    assert (g.gfx_min_mhz, g.gfx_max_mhz) == (500, 2100)
    assert clock_writes(fake, 2) == [("4", "0", "1000"), ("4", "1", "1200")]  # MEM


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (1900, 1000),  # min above max
        (400, 1500),  # below the hardware range
        (1000, 2200),  # above it
    ],
)
def test_a_refused_clock_range_changes_nothing(backend: AmdSmiBackend, fake: FakeAmdSmi, low: int, high: int) -> None:
    backend.gpus[0].set_gpu_locked_clocks(1000, 1500)
    with pytest.raises(DeviceError) as caught:
        backend.gpus[0].set_gpu_locked_clocks(low, high)
    error = caught.value
    assert (error.status, error.message) == (400, INVALID)
    assert (fake.gpu(0).gfx_min_mhz, fake.gpu(0).gfx_max_mhz) == (1000, 1500)


def test_a_range_changed_outside_zeusd_is_re_read_and_the_change_retried(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.gpus[0].set_gpu_locked_clocks(1000, 1500)
    fake.set_gpu(0, gfx_min_mhz=1900, gfx_max_mhz=2000)  # e.g. by amd-smi on the command line
    fake.clear_log()
    backend.gpus[0].set_gpu_locked_clocks(1600, 1700)
    assert (fake.gpu(0).gfx_min_mhz, fake.gpu(0).gfx_max_mhz) == (1600, 1700)
    # The cached range said "raise": max first, refused (1700 < 1900); then re-read, min first.
    names = [c.name for c in fake.calls(gpu=0)]
    assert names == ["amdsmi_set_gpu_clk_limit", "amdsmi_get_clock_info", "amdsmi_set_gpu_clk_limit", "amdsmi_set_gpu_clk_limit"]
    assert clock_writes(fake, 0) == [("0", "1", "1700"), ("0", "0", "1600"), ("0", "1", "1700")]


def test_reset_locked_clocks_gives_both_domains_back_to_the_driver(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    gpu = backend.gpus[1]
    gpu.set_gpu_locked_clocks(1000, 1500)
    gpu.set_mem_locked_clocks(1000, 1100)
    gpu.reset_locked_clocks()
    g = fake.gpu(1)
    assert (g.gfx_min_mhz, g.gfx_max_mhz, g.mem_min_mhz, g.mem_max_mhz) == (500, 2100, 900, 1300)
    assert g.perf_level == AMDSMI_DEV_PERF_LEVEL_AUTO
    assert fake.calls("amdsmi_set_gpu_perf_level", gpu=1)[-1].args == ("0",)
    # The cache was dropped: the next change starts from what the driver says.
    fake.clear_log()
    gpu.set_gpu_locked_clocks(1800, 1900)
    assert [c.name for c in fake.calls(gpu=1)][0] == "amdsmi_get_clock_info"


def test_a_single_clock_domain_cannot_be_reset(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    fake.clear_log()
    for call in (backend.gpus[0].reset_gpu_locked_clocks, backend.gpus[0].reset_mem_locked_clocks):
        with pytest.raises(DeviceError) as caught:
            call()
        error = caught.value
        assert (error.status, error.message) == (400, SINGLE_DOMAIN_RESET)
    assert fake.calls() == []


# --------------------------------------------------------------------------- injected errors


OPERATIONS: dict[str, Callable[[Any], object]] = {
    POWER_INFO: lambda g: g.get_instant_power_mw(),
    "amdsmi_get_energy_count": lambda g: g.get_total_energy_mj(),
    "amdsmi_get_power_cap_info": lambda g: g.get_power_limit_constraints_mw(),
    "amdsmi_set_power_cap": lambda g: g.set_power_limit_mw(300_000),
    "amdsmi_set_gpu_clk_limit": lambda g: g.set_gpu_locked_clocks(1000, 1500),
    "amdsmi_set_gpu_perf_level": lambda g: g.reset_locked_clocks(),
}


@pytest.mark.parametrize(
    ("status", "http", "message"),
    [
        (AMDSMI_STATUS_NO_PERM, 403, NO_PERMISSION),
        (AMDSMI_STATUS_NOT_SUPPORTED, 400, NOT_SUPPORTED),
        (AMDSMI_STATUS_INVAL, 400, INVALID),
        (AMDSMI_STATUS_IO, 500, "AMDSMI error 12: AMDSMI_STATUS_IO - I/O Error"),
        (AMDSMI_STATUS_TIMEOUT, 500, "AMDSMI error 8: AMDSMI_STATUS_TIMEOUT - Timeout in API call"),
        (AMDSMI_STATUS_RETRY, 500, "AMDSMI error 9: AMDSMI_STATUS_RETRY - Retry operation"),
        (AMDSMI_STATUS_BUSY, 500, "AMDSMI error 30: AMDSMI_STATUS_BUSY - Device busy"),
        (77, 500, "AMDSMI error 77: AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred"),
    ],
)
@pytest.mark.parametrize("function", sorted(OPERATIONS))
def test_injected_errors_map_to_status_and_message(
    backend: AmdSmiBackend, fake: FakeAmdSmi, function: str, status: int, http: int, message: str
) -> None:
    before = fake.gpu(2)
    fake.inject_error(function, status, gpu=2)
    with pytest.raises(DeviceError) as caught:
        OPERATIONS[function](backend.gpus[2])
    error = caught.value
    assert isinstance(error, AmdSmiError)
    assert (error.status, error.message, error.amdsmi_status) == (http, message, status)
    assert fake.gpu(2).power_cap_uw == before.power_cap_uw  # a failed call changed nothing
    OPERATIONS[function](backend.gpus[3])  # only GPU 2 was made to fail


# --------------------------------------------------------------------------- a hung call


def call_in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.skipif(installed_abi() != 26, reason="AMD SMI libraries of ABI 24/25 are never thread-safe: zeusd serialises their calls")
def test_a_hung_call_blocks_only_its_caller(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    fake.set_delay(POWER_INFO, -1, gpu=0)  # hangs until cleared
    hung, hung_result = call_in_thread(backend.gpus[0].get_instant_power_mw)
    try:
        fake.wait_for_calls(POWER_INFO, gpu=0, at_least=3)  # probe, validation, this one
        # Meanwhile the other GPUs answer, and so does GPU 0 for another function.
        other, other_result = call_in_thread(
            lambda: (backend.gpus[1].get_instant_power_mw(), backend.gpus[0].get_power_limit_mw())
        )
        other.join(timeout=10)
        assert other_result == [(350_000, 750_000)]
        assert hung.is_alive() and hung_result == []
    finally:
        fake.clear_delay()
    hung.join(timeout=10)
    assert hung_result == [350_000]


def test_before_26_2_calls_are_serialised_so_a_hung_call_holds_up_every_gpu(
    fake: FakeAmdSmi, open_backend: Callable[..., AmdSmiBackend]
) -> None:
    if installed_abi() == 26:
        fake.set_lib_version(26, 1, 2)  # older ABIs' stand-ins report a pre-26.2 library already
    backend = open_backend()
    assert backend.serialized
    fake.set_delay(POWER_INFO, -1, gpu=0)
    hung, hung_result = call_in_thread(backend.gpus[0].get_instant_power_mw)
    try:
        fake.wait_for_calls(POWER_INFO, gpu=0, at_least=3)
        other, other_result = call_in_thread(backend.gpus[1].get_instant_power_mw)
        # GPU 1's call waits for the process-wide lock: it never reaches the library.
        with pytest.raises(TimeoutError):
            fake.wait_for_calls(POWER_INFO, gpu=1, at_least=3, timeout=0.3)
        assert other_result == []
    finally:
        fake.clear_delay()
    hung.join(timeout=10)
    other.join(timeout=10)
    assert hung_result == [350_000] and other_result == [350_000]


# --------------------------------------------------------------------------- startup and shutdown


@pytest.mark.parametrize(
    ("status", "absent", "text"),
    [
        (AMDSMI_STATUS_DRIVER_NOT_LOADED, True, "AMDSMI error 34: AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded"),
        (AMDSMI_STATUS_NO_PERM, False, NO_PERMISSION),
    ],
)
def test_init_failure_is_a_startup_error(fake: FakeAmdSmi, status: int, absent: bool, text: str) -> None:
    """No AMD driver is "AMD SMI unavailable" (an auto probe's "no AMD GPUs"); anything else is a failure."""
    fake.set_init_error(status)
    with pytest.raises(StartupError) as caught:
        open_amdsmi_backend(sleep=Sleeps())
    assert isinstance(caught.value, AmdSmiUnavailable) is absent
    assert str(caught.value).startswith("AMD SMI initialisation failed (")
    assert str(caught.value).endswith(text)


@pytest.mark.parametrize(
    ("function", "gpu"),
    [("amdsmi_get_socket_handles", None), ("amdsmi_get_processor_handles", 1), ("amdsmi_get_gpu_asic_info", 2)],
)
def test_enumeration_failure_is_a_startup_error_and_shuts_amd_smi_down(
    fake: FakeAmdSmi, function: str, gpu: int | None
) -> None:
    fake.inject_error(function, AMDSMI_STATUS_NO_PERM, gpu=gpu)
    with pytest.raises(StartupError) as caught:
        open_amdsmi_backend(sleep=Sleeps())
    assert str(caught.value) == f"AMD SMI cannot enumerate the GPUs: {NO_PERMISSION}"
    assert not isinstance(caught.value, AmdSmiUnavailable)  # AMD SMI is there, and failing
    assert fake.count("amdsmi_shut_down") == 1


def test_close_shuts_down_once(backend: AmdSmiBackend, fake: FakeAmdSmi) -> None:
    backend.close()
    backend.close()
    assert fake.count("amdsmi_shut_down") == 1


def test_missing_bindings_say_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "amdsmi" or m.startswith("amdsmi.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # what the import system does for an absent package
    with pytest.raises(AmdSmiUnavailable) as caught:
        open_amdsmi_backend(sleep=Sleeps())
    assert "not installed" in str(caught.value) and "pip install zeusd[amd]" in str(caught.value)


def test_missing_library_is_a_startup_error_naming_the_search(tmp_path: Path) -> None:
    if ctypes.util.find_library("amd_smi") is not None:
        pytest.skip("a real libamd_smi is installed on this machine: the loader would find it")
    empty = tmp_path / "rocm"
    (empty / "lib").mkdir(parents=True)
    script = textwrap.dedent(
        """
        import json
        from zeusd.devices.gpu.amdsmi import AmdSmiUnavailable, open_amdsmi_backend
        try:
            open_amdsmi_backend()
        except AmdSmiUnavailable as e:
            print(json.dumps(str(e)))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV_STATE, ENV_LOG, "LD_LIBRARY_PATH")}
    env.update(ROCM_HOME=str(empty), ROCM_PATH=str(empty))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # the bindings' own print was captured into the message
    message = json.loads(lines[0])
    assert message.startswith("The AMD SMI library (libamd_smi.so) cannot be loaded")
    assert "libamd_smi.so" in message.split(": ", 1)[1]  # the loader's own words follow
