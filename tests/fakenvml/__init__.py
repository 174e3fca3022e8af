"""A fake ``libnvidia-ml.so.1`` for tests, and the helper that drives it.

The C library (``fakenvml.c``) is loaded by the real pynvml, so the code under
test runs unchanged. Its state lives in a text file shared by every process
that uses it (daemon, Zeus client, the test itself); :class:`FakeNvml` creates,
reads and edits that file and reads the call log (the machinery every stand-in
shares is :mod:`tests.fakelib`).

Typical use::

    fake = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log")
    fake.create(4, power_mw=150_000)
    proc = subprocess.Popen(cmd, env={**os.environ, **fake.env()})
    ...
    assert fake.gpu(0).power_limit_mw == 250_000
    assert fake.count("nvmlDeviceGetFieldValues") == 0

In-process (pynvml imported by the test itself): call :func:`preload_library`
once, then point ``FAKENVML_STATE`` / ``FAKENVML_LOG`` at the files (e.g. with
``monkeypatch.setenv``); the library re-reads them at every call.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace
from pathlib import Path

from tests.fakelib import Call, FakeLibrary, State, StateModel, build_library as _build, preload

__all__ = [
    "ENV_LOG",
    "ENV_STATE",
    "LIBRARY_NAME",
    "Call",
    "FakeNvml",
    "GpuState",
    "build_library",
    "preload_library",
]

ENV_STATE = "FAKENVML_STATE"
ENV_LOG = "FAKENVML_LOG"
LIBRARY_NAME = "libnvidia-ml.so.1"
SOURCE = Path(__file__).with_name("fakenvml.c")
DEFAULT_BUILD_DIR = Path(__file__).with_name("build")

# NVML return codes, for injections and assertions.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

# nvmlValueType_t, for GpuState.power_value_type.
VALUE_TYPE_DOUBLE = 0
VALUE_TYPE_UNSIGNED_INT = 1
VALUE_TYPE_UNSIGNED_LONG_LONG = 3
VALUE_TYPE_SIGNED_LONG_LONG = 4

FIELD_POWER_AVERAGE = 185
FIELD_POWER_INSTANT = 186


# --------------------------------------------------------------------------- build


def build_library(dest_dir: Path | None = None) -> Path:
    """Compile ``fakenvml.c`` into ``<dest_dir>/libnvidia-ml.so.1`` (if changed); return ``dest_dir``.

    The returned directory is what goes on ``LD_LIBRARY_PATH``.
    """
    return _build(SOURCE, LIBRARY_NAME, Path(dest_dir) if dest_dir is not None else DEFAULT_BUILD_DIR)


def preload_library(lib_dir: Path | None = None) -> ctypes.CDLL:
    """Load the fake into this process (see :func:`tests.fakelib.preload`).

    pynvml later calls ``CDLL("libnvidia-ml.so.1")`` and gets this library.
    Must happen before the first ``nvmlInit`` in the process (pynvml caches
    the library).
    """
    return preload(build_library(lib_dir) / LIBRARY_NAME)


# --------------------------------------------------------------------------- state model


@dataclass(frozen=True)
class GpuState:
    """One simulated GPU; field names are the state-file keys (``gpu.<i>.<field>``)."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    serial: str = ""
    pci_domain: int = 0
    pci_bus: int = 0x18
    pci_device: int = 0
    pci_device_id: int = 0x233010DE
    pci_subsystem_id: int = 0x16C110DE
    power_mw: int = 150_000  # instant power, NVML field 186 (may exceed 32 bits)
    power_wobble_mw: int = 0  # added to every other field-186 read of a GPU in one process: a reading that changes
    power_value_type: int = VALUE_TYPE_UNSIGNED_INT  # nvmlValueType_t of field 186
    avg_power_mw: int = 140_000  # nvmlDeviceGetPowerUsage and field 185
    mem_power_mw: int = 30_000  # fields 185/186 with the memory scope
    energy_mj: int = 500_000
    energy_step_mj: int = 0  # added after every nvmlDeviceGetTotalEnergyConsumption
    power_limit_mw: int = 700_000
    min_power_limit_mw: int = 200_000
    max_power_limit_mw: int = 700_000
    default_power_limit_mw: int = 700_000
    persistence_mode: bool = False
    instant_power_supported: bool = True
    power_usage_supported: bool = True
    energy_supported: bool = True
    lost: bool = False  # every call on this GPU returns GPU_IS_LOST (15)
    temperature_c: int = 40
    architecture: int = 9  # NVML_DEVICE_ARCH_HOPPER
    c2c_enabled: bool = False
    gpu_locked_clocks: tuple[int, int] | None = None
    mem_locked_clocks: tuple[int, int] | None = None

    @classmethod
    def default(cls, index: int) -> GpuState:
        """The GPU the C library assumes for ``index`` when the file says nothing."""
        return cls(
            uuid=f"GPU-fa4e0c1d-5eed-4c0f-9e1a-{0x1000 + index:012x}",
            serial=f"1652322{1000 + index:06d}",
            pci_bus=0x18 + index,
        )

    @property
    def pci_address(self) -> str:
        """``dddd:bb:dd.0`` in lower-case hex, the form the daemon reports."""
        return f"{self.pci_domain:04x}:{self.pci_bus:02x}:{self.pci_device:02x}.0"


MODEL = StateModel(
    name="fakenvml",
    gpu_type=GpuState,
    default_gpu=GpuState.default,
    global_defaults={
        "count": "4",
        "init_error": "0",
        "driver_version": "550.54.15",
        "nvml_version": "12.550.54.15",
        "cuda_driver_version": "12040",
    },
    injection_kinds=("error", "delay", "field_return"),
)


# --------------------------------------------------------------------------- helper


class FakeNvml(FakeLibrary):
    """The fake NVML's state and call log (see :class:`tests.fakelib.FakeLibrary`)."""

    MODEL = MODEL
    ENV_STATE = ENV_STATE
    ENV_LOG = ENV_LOG

    def build(self, lib_dir: Path | None) -> Path:
        return build_library(lib_dir)

    def library_env(self, lib_dir: Path) -> dict[str, str]:
        ld_path = str(lib_dir)
        inherited = os.environ.get("LD_LIBRARY_PATH")
        if inherited:
            ld_path += os.pathsep + inherited
        return {"LD_LIBRARY_PATH": ld_path}

    def set_lost(self, gpu: int, lost: bool = True) -> None:
        """A lost GPU answers every call (handle lookup included) with GPU_IS_LOST (15)."""
        self.set_gpu(gpu, lost=lost)

    def set_field_return(self, gpu: int, field_id: int, code: int) -> None:
        """Force the per-field ``nvmlReturn`` of ``field_id`` in nvmlDeviceGetFieldValues (0 clears)."""
        self._set_injection(f"gpu.{int(gpu)}.field_return.{int(field_id)}", code)

    def _clear_all(self, state: State) -> None:
        """Also: no lost GPUs."""
        super()._clear_all(state)
        for index in range(state.count):
            state.gpus[index] = replace(state.gpus[index], lost=False)
