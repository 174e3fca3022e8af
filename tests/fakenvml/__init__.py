"""A fake ``libnvidia-ml.so.1`` for tests, and the helper that drives it.

The C library (``fakenvml.c``) is loaded by the real pynvml, so the code under
test runs unchanged. Its state lives in a text file shared by every process
that uses it (daemon, Zeus client, the test itself); :class:`FakeNvml` creates,
reads and edits that file and reads the call log.

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

File protocol (shared with the C side): writers take an exclusive ``flock`` on
``<state>.lock``, write a temp file whose mtime is strictly greater than the
current file's and ``os.replace`` it over the state file; readers take a
shared lock. The library re-parses the file whenever its identity
(device, inode, size, mtime_ns) changes.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

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
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-pthread", "-Wl,-soname," + LIBRARY_NAME)

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
    """Compile ``fakenvml.c`` into ``<dest_dir>/libnvidia-ml.so.1``; return ``dest_dir``.

    Rebuilt only when the source (or the flags) changed, tracked by a hash
    stamp next to the library. Safe when several processes build at once:
    each compiles to a private temp name and ``os.replace``s it into place.
    The returned directory is what goes on ``LD_LIBRARY_PATH``.
    """
    dest = Path(dest_dir) if dest_dir is not None else DEFAULT_BUILD_DIR
    dest.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + b"\0" + "\0".join(CFLAGS).encode()).hexdigest()
    lib = dest / LIBRARY_NAME
    stamp = dest / (LIBRARY_NAME + ".sha256")
    try:
        if lib.is_file() and stamp.read_text().strip() == digest:
            return dest
    except OSError:
        pass

    # Compile a snapshot of exactly the bytes that were hashed.
    fd, src_tmp = tempfile.mkstemp(prefix=".fakenvml.", suffix=".c", dir=dest)
    with os.fdopen(fd, "wb") as f:
        f.write(source)
    fd, lib_tmp = tempfile.mkstemp(prefix=".libnvidia-ml.", suffix=".tmp", dir=dest)
    os.close(fd)
    try:
        cc = os.environ.get("CC", "gcc")
        result = subprocess.run(
            [cc, *CFLAGS, "-o", lib_tmp, src_tmp], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"building the fake NVML library failed:\n{result.stderr}")
        os.chmod(lib_tmp, 0o755)
        os.replace(lib_tmp, lib)
        fd, stamp_tmp = tempfile.mkstemp(prefix=".stamp.", dir=dest)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.chmod(stamp_tmp, 0o644)
        os.replace(stamp_tmp, stamp)
    finally:
        for leftover in (src_tmp, lib_tmp):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    return dest


_preloaded: dict[Path, ctypes.CDLL] = {}


def preload_library(lib_dir: Path | None = None) -> ctypes.CDLL:
    """Load the fake into this process with ``RTLD_GLOBAL``.

    pynvml later calls ``CDLL("libnvidia-ml.so.1")``; the dynamic loader
    matches that name against the soname of an already loaded object, so
    pynvml gets this library whatever ``LD_LIBRARY_PATH`` says. Must happen
    before the first ``nvmlInit`` in the process (pynvml caches the library).
    """
    directory = build_library(lib_dir).resolve()
    lib = _preloaded.get(directory)
    if lib is None:
        lib = ctypes.CDLL(str(directory / LIBRARY_NAME), mode=ctypes.RTLD_GLOBAL)
        _preloaded[directory] = lib
    return lib


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


_GPU_FIELDS = {f.name: f for f in fields(GpuState)}
_STR_FIELDS = {"name", "uuid", "serial"}
_BOOL_FIELDS = {
    "persistence_mode",
    "instant_power_supported",
    "power_usage_supported",
    "energy_supported",
    "lost",
    "c2c_enabled",
}
_CLOCK_FIELDS = {"gpu_locked_clocks", "mem_locked_clocks"}
_INJECTION_KINDS = ("error", "delay", "field_return")
_GLOBAL_DEFAULTS: dict[str, str] = {
    "generation": "0",
    "count": "4",
    "init_error": "0",
    "driver_version": "550.54.15",
    "nvml_version": "12.550.54.15",
    "cuda_driver_version": "12040",
}


def _encode(name: str, value: object) -> str:
    if name in _CLOCK_FIELDS:
        if value is None:
            return "none"
        if not isinstance(value, tuple) or len(value) != 2:
            raise TypeError(f"{name} must be (min_mhz, max_mhz) or None")
        return f"{int(value[0])} {int(value[1])}"
    if name in _BOOL_FIELDS:
        return "1" if value else "0"
    if name in _STR_FIELDS:
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{name} must be a single line")
        return text
    return str(int(value))  # type: ignore[call-overload]


def _decode(name: str, text: str) -> object:
    if name in _CLOCK_FIELDS:
        parts = text.split()
        return (int(parts[0], 0), int(parts[1], 0)) if len(parts) == 2 else None
    if name in _BOOL_FIELDS:
        return int(text, 0) != 0
    if name in _STR_FIELDS:
        return text
    return int(text, 0)


class _State:
    """The parsed state file."""

    def __init__(self) -> None:
        self.globals: dict[str, str] = dict(_GLOBAL_DEFAULTS)
        self.gpus: list[GpuState] = [GpuState.default(i) for i in range(64)]
        self.injections: dict[str, int] = {}  # raw keys, e.g. "gpu.0.error.nvmlShutdown"

    @property
    def count(self) -> int:
        return int(self.globals["count"], 0)

    @classmethod
    def parse(cls, text: str) -> _State:
        state = cls()
        overrides: dict[int, dict[str, object]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#") or " " not in line:
                continue
            key, value = line.split(" ", 1)
            parts = key.split(".")
            if parts[0] in ("error", "delay") and len(parts) >= 2:
                state.injections[key] = int(value, 0)
            elif parts[0] == "gpu" and len(parts) >= 3 and parts[1].isdigit():
                index = int(parts[1])
                if index >= 64:
                    continue
                if parts[2] in _INJECTION_KINDS and len(parts) >= 4:
                    state.injections[key] = int(value, 0)
                elif len(parts) == 3 and parts[2] in _GPU_FIELDS:
                    overrides.setdefault(index, {})[parts[2]] = _decode(parts[2], value)
            else:
                state.globals[key] = value
        for index, changes in overrides.items():
            state.gpus[index] = replace(state.gpus[index], **changes)  # type: ignore[arg-type]
        return state

    def render(self) -> str:
        lines = ["# fakenvml state (written by tests.fakenvml)"]
        lines += [f"{key} {value}" for key, value in self.globals.items()]
        for index in range(self.count):
            gpu = self.gpus[index]
            lines += [f"gpu.{index}.{name} {_encode(name, getattr(gpu, name))}" for name in _GPU_FIELDS]
        lines += [f"{key} {value}" for key, value in self.injections.items()]
        return "\n".join(lines) + "\n"


class Call(NamedTuple):
    """One line of the call log: ``<function> <gpu index or -1> [args...]``."""

    name: str
    gpu: int
    args: tuple[str, ...]


# --------------------------------------------------------------------------- helper


class FakeNvml:
    """Create, inspect and manipulate the fake library's shared state and call log."""

    def __init__(self, state_path: Path, log_path: Path | None = None, lib_dir: Path | None = None) -> None:
        self.state_path = Path(state_path)
        self.log_path = Path(log_path) if log_path is not None else None
        self._lib_dir = lib_dir

    # ---- environment

    @property
    def lib_dir(self) -> Path:
        """Directory holding the built ``libnvidia-ml.so.1`` (built on first use)."""
        return build_library(self._lib_dir)

    def env(self) -> dict[str, str]:
        """Variables a subprocess needs: merge into ``os.environ`` for ``Popen``.

        ``FAKENVML_LOG`` is empty (logging off) when no log path was given.
        """
        ld_path = str(self.lib_dir.resolve())
        inherited = os.environ.get("LD_LIBRARY_PATH")
        if inherited:
            ld_path += os.pathsep + inherited
        return {
            "LD_LIBRARY_PATH": ld_path,
            ENV_STATE: str(self.state_path),
            ENV_LOG: str(self.log_path) if self.log_path is not None else "",
        }

    # ---- state file I/O

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        lock_path = str(self.state_path) + ".lock"
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _read(self) -> _State:
        try:
            return _State.parse(self.state_path.read_text())
        except FileNotFoundError:
            return _State()

    def _write(self, state: _State) -> None:
        """Replace the file; its mtime is forced past the old one (see module doc)."""
        state.globals["generation"] = str(int(state.globals.get("generation", "0"), 0) + 1)
        try:
            old_mtime = os.stat(self.state_path).st_mtime_ns
        except FileNotFoundError:
            old_mtime = 0
        mtime = max(time.time_ns(), old_mtime + 1000)
        fd, tmp = tempfile.mkstemp(prefix=self.state_path.name + ".", suffix=".tmp", dir=self.state_path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(state.render())
            os.chmod(tmp, 0o644)
            os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, self.state_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _snapshot(self) -> _State:
        with self._locked(False):
            return self._read()

    def _mutate(self, change: Callable[[_State], None]) -> None:
        with self._locked(True):
            state = self._read()
            change(state)
            self._write(state)

    # ---- creating and reading GPUs

    def create(
        self,
        num_gpus: int = 4,
        *,
        gpus: Sequence[Mapping[str, object]] | None = None,
        **common: object,
    ) -> None:
        """Write a fresh state: ``num_gpus`` default H100s, no injections.

        ``common`` properties apply to every GPU, ``gpus[i]`` to GPU ``i`` only.
        """
        if not 0 <= num_gpus <= 64:
            raise ValueError("num_gpus must be within 0..64")
        _check_fields(common)
        state = _State()
        state.globals["count"] = str(num_gpus)
        for index in range(num_gpus):
            gpu = replace(state.gpus[index], **common)  # type: ignore[arg-type]
            if gpus is not None and index < len(gpus):
                _check_fields(gpus[index])
                gpu = replace(gpu, **gpus[index])  # type: ignore[arg-type]
            state.gpus[index] = gpu
        with self._locked(True):
            self._write(state)

    @property
    def num_gpus(self) -> int:
        return self._snapshot().count

    def set_num_gpus(self, num_gpus: int) -> None:
        """Change what ``nvmlDeviceGetCount_v2`` reports (GPUs beyond it are forgotten)."""
        if not 0 <= num_gpus <= 64:
            raise ValueError("num_gpus must be within 0..64")
        self._mutate(lambda s: s.globals.__setitem__("count", str(num_gpus)))

    def gpu(self, index: int) -> GpuState:
        """Current state of GPU ``index`` as the library sees it."""
        state = self._snapshot()
        if not 0 <= index < state.count:
            raise IndexError(f"no GPU {index} (count {state.count})")
        return state.gpus[index]

    def gpus(self) -> list[GpuState]:
        state = self._snapshot()
        return state.gpus[: state.count]

    def set_gpu(self, index: int, **props: object) -> None:
        """Change properties of one GPU, e.g. ``set_gpu(0, power_mw=123_000)``."""
        _check_fields(props)

        def change(state: _State) -> None:
            if not 0 <= index < state.count:
                raise IndexError(f"no GPU {index} (count {state.count})")
            state.gpus[index] = replace(state.gpus[index], **props)  # type: ignore[arg-type]

        self._mutate(change)

    def set_all_gpus(self, **props: object) -> None:
        _check_fields(props)

        def change(state: _State) -> None:
            for index in range(state.count):
                state.gpus[index] = replace(state.gpus[index], **props)  # type: ignore[arg-type]

        self._mutate(change)

    def set_global(self, key: str, value: str | int) -> None:
        """Set a top-level key (``driver_version``, ``cuda_driver_version``, ...)."""
        if key in ("generation", "count") or key.split(".")[0] in ("gpu", "error", "delay"):
            raise ValueError(f"use the dedicated method for {key!r}")
        self._mutate(lambda s: s.globals.__setitem__(key, str(value)))

    # ---- failure injection

    def set_init_error(self, code: int) -> None:
        """Make ``nvmlInit*`` return ``code`` (0 restores success)."""
        self._mutate(lambda s: s.globals.__setitem__("init_error", str(int(code))))

    def set_lost(self, gpu: int, lost: bool = True) -> None:
        """A lost GPU answers every call (handle lookup included) with GPU_IS_LOST (15)."""
        self.set_gpu(gpu, lost=lost)

    def inject_error(self, function: str, code: int, gpu: int | None = None) -> None:
        """Make ``function`` return ``code`` on ``gpu`` (every GPU / system call if None)."""
        self._set_injection(_injection_key("error", function, gpu), code)

    def clear_error(self, function: str | None = None, gpu: int | None = None) -> None:
        """Remove error injections; ``None`` matches anything (``clear_error()`` clears all)."""
        self._clear_injections("error", function, gpu)

    def set_delay(self, function: str, ms: int, gpu: int | None = None) -> None:
        """Make ``function`` sleep ``ms`` before answering; ``ms < 0`` hangs until cleared.

        A sleeping call re-checks the state every 20 ms, so clearing or
        shortening the delay releases it promptly.
        """
        self._set_injection(_injection_key("delay", function, gpu), ms)

    def clear_delay(self, function: str | None = None, gpu: int | None = None) -> None:
        self._clear_injections("delay", function, gpu)

    def set_field_return(self, gpu: int, field_id: int, code: int) -> None:
        """Force the per-field ``nvmlReturn`` of ``field_id`` in nvmlDeviceGetFieldValues (0 clears)."""
        self._set_injection(f"gpu.{int(gpu)}.field_return.{int(field_id)}", code)

    def clear_injections(self) -> None:
        """Back to normal: no errors, delays, field overrides, lost GPUs or init error."""

        def change(state: _State) -> None:
            state.injections.clear()
            state.globals["init_error"] = "0"
            for index in range(state.count):
                state.gpus[index] = replace(state.gpus[index], lost=False)

        self._mutate(change)

    def injections(self) -> dict[str, int]:
        """Raw injection entries, e.g. ``{"gpu.0.error.nvmlDeviceSetPowerManagementLimit": 4}``."""
        return dict(self._snapshot().injections)

    def _set_injection(self, key: str, value: int) -> None:
        """Set (or, for 0, remove) one raw injection entry."""

        def change(state: _State) -> None:
            if value == 0:
                state.injections.pop(key, None)
            else:
                state.injections[key] = int(value)

        self._mutate(change)

    def _clear_injections(self, kind: str, function: str | None, gpu: int | None) -> None:
        def matches(key: str) -> bool:
            parts = key.split(".")
            if parts[0] == "gpu":
                key_gpu, key_kind, key_name = int(parts[1]), parts[2], ".".join(parts[3:])
            else:
                key_gpu, key_kind, key_name = None, parts[0], ".".join(parts[1:])
            return (
                key_kind == kind
                and (function is None or key_name == function)
                and (gpu is None or key_gpu == gpu)
            )

        def change(state: _State) -> None:
            for key in [k for k in state.injections if matches(k)]:
                del state.injections[key]

        self._mutate(change)

    # ---- call log

    def calls(self, name: str | Sequence[str] | None = None, gpu: int | None = None) -> list[Call]:
        """Logged calls in order, optionally only those of ``name`` and/or ``gpu``."""
        if self.log_path is None:
            raise RuntimeError("FakeNvml was created without a log path")
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        names = {name} if isinstance(name, str) else (set(name) if name is not None else None)
        result = []
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) < 2:
                continue
            call = Call(parts[0], int(parts[1]), tuple(parts[2:]))
            if (names is None or call.name in names) and (gpu is None or call.gpu == gpu):
                result.append(call)
        return result

    def count(self, name: str | Sequence[str] | None = None, gpu: int | None = None) -> int:
        return len(self.calls(name, gpu))

    def clear_log(self) -> None:
        if self.log_path is not None and self.log_path.exists():
            os.truncate(self.log_path, 0)

    def wait_for_calls(
        self, name: str | Sequence[str] | None = None, gpu: int | None = None, *, at_least: int = 1, timeout: float = 5.0
    ) -> list[Call]:
        """Poll the log until ``at_least`` matching calls appeared; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.calls(name, gpu)
            if len(found) >= at_least:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {at_least} call(s) of {name!r} on gpu {gpu}, saw {len(found)}")
            time.sleep(0.01)


def _injection_key(kind: str, function: str, gpu: int | None) -> str:
    if not function or any(c in function for c in " .\n"):
        raise ValueError(f"bad function name {function!r}")
    return f"{kind}.{function}" if gpu is None else f"gpu.{int(gpu)}.{kind}.{function}"


def _check_fields(props: Mapping[str, object]) -> None:
    unknown = set(props) - set(_GPU_FIELDS)
    if unknown:
        raise TypeError(f"unknown GPU properties: {sorted(unknown)}")

