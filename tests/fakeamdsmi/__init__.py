"""A stand-in ``libamd_smi.so`` for tests, and the helper that drives it.

The C library (``fakeamdsmi.c``) is loaded by the real, official ``amdsmi``
Python bindings (PyPI ``amdsmi``), so zeusd's AMD SMI backend runs unchanged.
Its state lives in a text file shared by every process that uses it;
:class:`FakeAmdSmi` creates, reads and edits that file, injects errors and
delays and reads the call log (the machinery every stand-in shares is
:mod:`tests.fakelib`).

How the bindings find the library (``amdsmi/amdsmi_wrapper.py``, 6.3 to 7.0),
at ``import amdsmi``, first that loads wins:

1. ``$ROCM_HOME/lib/libamd_smi.so``, else ``$ROCM_PATH/lib/libamd_smi.so``
   (ROCM_HOME wins when both are set);
2. ``libamd_smi.so`` through the dynamic loader (``LD_LIBRARY_PATH``,
   ``/etc/ld.so.conf.d``), or an already loaded object with that soname;
3. ``libamd_smi.so`` next to the bindings' own files;
4. ``$ROCM_PATH/lib/libamd_smi.so``, or ``/opt/rocm/lib/libamd_smi.so``.

``AMDSMI_LIB_DIR`` (honoured by upstream's Rust zeusd) means nothing to the
Python bindings. When nothing loads they print the loader's error and the
import fails with ``KeyError: 'libamd_smi.so'``. The library is bound once
per process, at import: a test process that imports ``amdsmi`` keeps the
library it found. So :meth:`FakeAmdSmi.env` sets both ROCM_HOME and ROCM_PATH
to the build directory (the library is built as ``<dir>/lib/libamd_smi.so``),
and in-process tests call :func:`preload_library` before anything imports
``amdsmi``.

The bindings resolve every function they wrap by name at import time, and
their struct layouts are the library's ABI, which changed between releases
(24: AMD SMI 6.3, 25: 6.4, 26: 7.0). The build reads the installed bindings'
``amdsmi_wrapper.py``: every symbol it binds that ``fakeamdsmi.c`` does not
implement gets a stub answering ``AMDSMI_STATUS_NOT_SUPPORTED``, and the ABI
is chosen from the layouts it declares. The library is rebuilt whenever the
source, the bindings or the shared headers change.

Typical use::

    fake = FakeAmdSmi(tmp_path / "amdsmi.state", tmp_path / "amdsmi.log")
    fake.create(2, current_power_w=420)
    fake.inject_error("amdsmi_set_power_cap", AMDSMI_STATUS_NO_PERM, gpu=1)
    proc = subprocess.Popen(cmd, env={**os.environ, **fake.env()})
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tests.fakelib import FakeLibrary, State, StateModel, build_library as _build, preload

__all__ = [
    "ENV_LOG",
    "ENV_STATE",
    "LIBRARY_NAME",
    "NA_POWER",
    "FakeAmdSmi",
    "GpuState",
    "bindings_abi",
    "installed_abi",
    "power_info_function",
    "build_library",
    "preload_library",
]

ENV_STATE = "FAKEAMDSMI_STATE"
ENV_LOG = "FAKEAMDSMI_LOG"
LIBRARY_NAME = "libamd_smi.so"
SOURCE = Path(__file__).with_name("fakeamdsmi.c")
DEFAULT_BUILD_DIR = Path(__file__).with_name("build")

# amdsmi_status_t values, for injections and assertions.
AMDSMI_STATUS_SUCCESS = 0
AMDSMI_STATUS_INVAL = 1
AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_API_FAILED = 7
AMDSMI_STATUS_TIMEOUT = 8
AMDSMI_STATUS_RETRY = 9
AMDSMI_STATUS_NO_PERM = 10
AMDSMI_STATUS_IO = 12
AMDSMI_STATUS_FILE_ERROR = 14
AMDSMI_STATUS_INIT_ERROR = 18
AMDSMI_STATUS_BUSY = 30
AMDSMI_STATUS_NOT_FOUND = 31
AMDSMI_STATUS_NOT_INIT = 32
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34

AMDSMI_DEV_PERF_LEVEL_AUTO = 0
AMDSMI_DEV_PERF_LEVEL_MANUAL = 3

#: What the driver writes into a power field it cannot read.
NA_POWER = 0xFFFF

#: amdsmi_get_lib_version of each ABI's stand-in (year, major, minor, release).
_LIB_VERSIONS = {24: (24, 7, 0, 0), 25: (25, 25, 4, 0), 26: (0, 26, 2, 0)}


# --------------------------------------------------------------------------- build


def _bindings_wrapper() -> Path | None:
    """The installed bindings' ``amdsmi_wrapper.py`` (found without importing them)."""
    spec = importlib.util.find_spec("amdsmi")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "amdsmi_wrapper.py")
    return path if path.is_file() else None


def _struct_fields(wrapper: str, struct: str) -> list[str]:
    match = re.search(rf"^{struct}\._fields_ = \[(.*?)^\]", wrapper, re.S | re.M)
    return re.findall(r"\('(\w+)'", match.group(1)) if match else []


def bindings_abi(wrapper: str) -> int:
    """The libamd_smi ABI whose structs the bindings declare (24, 25 or 26)."""
    has_year = "year" in _struct_fields(wrapper, "struct_amdsmi_version_t")
    has_socket_power = "socket_power" in _struct_fields(wrapper, "struct_amdsmi_power_info_t")
    if has_year:
        return 25 if has_socket_power else 24
    return 26


def _stubs(wrapper: str, source: str) -> str:
    """C stubs for every symbol the bindings bind that the stand-in does not implement."""
    wanted = sorted(set(re.findall(r"_libraries\['libamd_smi\.so'\]\.(\w+)", wrapper)))
    implemented = set(re.findall(r"^EXPORT [\w\s*]+?\b(\w+)\(", source, re.M))
    lines = [
        "/* Generated by tests/fakeamdsmi: symbols the bindings bind at import, answering NOT_SUPPORTED. */",
        "#define STUB(name) __attribute__((visibility(\"default\"))) unsigned int name(void) { return 2u; }",
    ]
    lines += [f"STUB({name})" for name in wanted if name not in implemented]
    return "\n".join(lines) + "\n"


def build_library(dest_dir: Path | None = None) -> Path:
    """Build ``<dest_dir>/lib/libamd_smi.so`` for the installed bindings; return ``dest_dir``.

    ``dest_dir`` is what ROCM_HOME / ROCM_PATH name (see the module doc).
    Without the bindings installed the library has no stubs (nothing could
    load it anyway) and the newest ABI.
    """
    root = Path(dest_dir) if dest_dir is not None else DEFAULT_BUILD_DIR
    wrapper_path = _bindings_wrapper()
    wrapper = wrapper_path.read_text() if wrapper_path is not None else ""
    abi = bindings_abi(wrapper) if wrapper else 26
    generated = {
        "fakeamdsmi_abi.h": f"#define FAKE_ABI {abi}\n",
        "fakeamdsmi_stubs.c": _stubs(wrapper, SOURCE.read_text()),
    }
    _build(SOURCE, LIBRARY_NAME, root / "lib", generated)
    return root


def preload_library(lib_dir: Path | None = None) -> ctypes.CDLL:
    """Load the stand-in into this process before anything imports ``amdsmi``.

    The bindings' ``CDLL("libamd_smi.so")`` (no ROCM_HOME / ROCM_PATH) then
    matches its soname; with them pointing at ``lib_dir`` the path names the
    same file, which the loader also answers with this object.
    """
    return preload(build_library(lib_dir) / "lib" / LIBRARY_NAME)


def installed_abi() -> int | None:
    """The ABI of the installed bindings, or None when they are not installed."""
    wrapper = _bindings_wrapper()
    return bindings_abi(wrapper.read_text()) if wrapper is not None else None


def power_info_function() -> str:
    """The library function behind the bindings' ``amdsmi_get_power_info`` (6.4 calls ``_v2``)."""
    wrapper = _bindings_wrapper()
    interface = wrapper.with_name("amdsmi_interface.py") if wrapper is not None else None
    if interface is not None and interface.is_file() and "amdsmi_get_power_info_v2(" in interface.read_text():
        return "amdsmi_get_power_info_v2"
    return "amdsmi_get_power_info"


# --------------------------------------------------------------------------- state model


@dataclass(frozen=True)
class GpuState:
    """One simulated GPU; field names are the state-file keys (``gpu.<i>.<field>``).

    Units are AMD SMI's: power in W (``NA_POWER`` when the driver cannot read
    it), power caps in uW, clocks in MHz, the energy counter in ticks of
    ``energy_resolution_nj`` nanojoules. ``gfx_min_mhz``/``gfx_max_mhz`` (and
    ``mem_*``) are the current clock limits, ``*_range_*`` what the hardware
    accepts.
    """

    name: str = "AMD Instinct MI300X"
    serial: str = ""
    pci_domain: int = 0
    pci_bus: int = 0x0C
    pci_device: int = 0
    pci_function: int = 0
    current_power_w: int = 350
    average_power_w: int = 340
    energy_counter: int = 1_000_000_000
    energy_step: int = 11_468_641  # added after each read: 0.5 s at 350 W in 15.259 uJ ticks
    energy_resolution_nj: int = 15_259
    energy_supported: bool = True
    power_cap_uw: int = 750_000_000
    min_power_cap_uw: int = 200_000_000
    max_power_cap_uw: int = 750_000_000
    default_power_cap_uw: int = 750_000_000
    gfx_clk_mhz: int = 2100
    gfx_min_mhz: int = 500
    gfx_max_mhz: int = 2100
    gfx_range_min_mhz: int = 500
    gfx_range_max_mhz: int = 2100
    mem_clk_mhz: int = 1300
    mem_min_mhz: int = 900
    mem_max_mhz: int = 1300
    mem_range_min_mhz: int = 900
    mem_range_max_mhz: int = 1300
    perf_level: int = AMDSMI_DEV_PERF_LEVEL_AUTO
    fail_status: int = 0  # not 0: every call on this GPU answers this status (see FakeAmdSmi.set_lost)

    @classmethod
    def default(cls, index: int) -> GpuState:
        """The GPU the C library assumes for ``index`` when the file says nothing."""
        return cls(serial=f"{0x5A1E0000 + index:016X}", pci_bus=0x0C + index)

    @property
    def pci_address(self) -> str:
        """``dddd:bb:dd.f`` in lower-case hex, the form the bindings and the daemon use."""
        return f"{self.pci_domain:04x}:{self.pci_bus:02x}:{self.pci_device:02x}.{self.pci_function:x}"


def _model(abi: int) -> StateModel:
    year, major, minor, release = _LIB_VERSIONS[abi]
    return StateModel(
        name="fakeamdsmi",
        gpu_type=GpuState,
        default_gpu=GpuState.default,
        global_defaults={
            "count": "4",
            "init_error": "0",
            "lib_year": str(year),
            "lib_major": str(major),
            "lib_minor": str(minor),
            "lib_release": str(release),
        },
    )


# --------------------------------------------------------------------------- helper


class FakeAmdSmi(FakeLibrary):
    """The stand-in AMD SMI's state and call log (see :class:`tests.fakelib.FakeLibrary`).

    Besides the shared helpers: :meth:`set_lib_version` (what
    ``amdsmi_get_lib_version`` reports; ``set_init_error`` makes ``amdsmi_init``
    fail) and :meth:`set_lost` (a GPU gone from the bus).
    """

    MODEL = _model(installed_abi() or 26)
    ENV_STATE = ENV_STATE
    ENV_LOG = ENV_LOG

    def build(self, lib_dir: Path | None) -> Path:
        return build_library(lib_dir)

    def library_env(self, lib_dir: Path) -> dict[str, str]:
        """ROCM_HOME wins over ROCM_PATH in the bindings, so both name the stand-in."""
        return {"ROCM_HOME": str(lib_dir), "ROCM_PATH": str(lib_dir)}

    def set_lib_version(self, major: int, minor: int, release: int = 0, year: int | None = None) -> None:
        """What ``amdsmi_get_lib_version`` reports (``year`` only exists in ABI 24/25)."""
        for key, value in (("lib_major", major), ("lib_minor", minor), ("lib_release", release)):
            self.set_global(key, value)
        if year is not None:
            self.set_global("lib_year", year)

    def set_lost(self, gpu: int, lost: bool = True, status: int = AMDSMI_STATUS_NOT_FOUND) -> None:
        """A GPU gone from the bus: every call on it (handle lookups too) answers ``status``.

        What the driver really answers depends on where the call fails
        (NOT_FOUND, FILE_ERROR, DRM_ERROR); all of them are 500s to zeusd.
        """
        self.set_gpu(gpu, fail_status=status if lost else 0)

    def _clear_all(self, state: State) -> None:
        """Also: no lost GPUs."""
        super()._clear_all(state)
        for index in range(state.count):
            state.gpus[index] = replace(state.gpus[index], fail_status=0)
