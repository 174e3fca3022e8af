"""What the stand-in driver libraries (fakenvml, fakeamdsmi) share.

Each stand-in is a C library, compiled here on demand, that the real vendor
bindings load in place of the driver's. Its simulated GPUs live in a text
state file shared by every process that uses it; :class:`FakeLibrary` creates,
reads and edits that file, injects errors and delays, and reads the call log.
A stand-in subclasses it with its :class:`StateModel` (the per-GPU dataclass,
the global keys) and how its bindings find the library.

File protocol (the C side is ``fakelib.h`` / ``fakelib_state.h``): one
``key value`` per line; writers take an exclusive ``flock`` on
``<state>.lock``, write a temp file whose mtime is strictly greater than the
current file's and ``os.replace`` it over the state file; readers take a
shared lock. The library re-parses the file whenever its identity (device,
inode, size, mtime_ns) changes. Injections are ``<kind>.<function> <value>``
(every GPU) or ``gpu.<i>.<kind>.<function> <value>`` (one GPU).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import subprocess
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple, Sequence

__all__ = ["Call", "FakeLibrary", "State", "StateModel", "build_library", "preload"]

HEADER_DIR = Path(__file__).resolve().parent
HEADERS = (HEADER_DIR / "fakelib.h", HEADER_DIR / "fakelib_state.h")
MAX_GPUS = 64


# --------------------------------------------------------------------------- build


def build_library(
    source: Path, library_name: str, dest_dir: Path, generated: Mapping[str, str] | None = None
) -> Path:
    """Compile ``source`` (plus ``generated``: file name -> C text) into ``dest_dir/library_name``.

    Rebuilt only when a source, a shared header or the flags changed, tracked
    by a hash stamp next to the library. Safe when several processes build at
    once: each compiles to a private temp name and ``os.replace``s it into
    place. Returns ``dest_dir``.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cflags = (
        "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-pthread",
        f"-I{HEADER_DIR}", f"-Wl,-soname,{library_name}",
    )  # fmt: skip
    texts = {source.name: source.read_bytes()}
    texts.update({h.name: h.read_bytes() for h in HEADERS})
    texts.update({name: text.encode() for name, text in (generated or {}).items()})
    digest = hashlib.sha256()
    for name in sorted(texts):
        digest.update(name.encode() + b"\0" + texts[name] + b"\0")
    digest.update("\0".join(cflags).encode())
    lib = dest / library_name
    stamp = dest / (library_name + ".sha256")
    try:
        if lib.is_file() and stamp.read_text().strip() == digest.hexdigest():
            return dest
    except OSError:
        pass

    # Compile a snapshot of exactly the bytes that were hashed (headers are
    # read through -I, so they are copied next to the sources).
    with tempfile.TemporaryDirectory(prefix=".build.", dir=dest) as scratch:
        for name, text in texts.items():
            Path(scratch, name).write_bytes(text)
        compiled = [str(Path(scratch, n)) for n in texts if n.endswith(".c")]
        lib_tmp = Path(scratch, library_name)
        cc = os.environ.get("CC", "gcc")
        result = subprocess.run(
            [cc, *cflags, f"-I{scratch}", "-o", str(lib_tmp), *compiled],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"building the stand-in {library_name} failed:\n{result.stderr}")
        os.chmod(lib_tmp, 0o755)
        os.replace(lib_tmp, lib)
        stamp_tmp = Path(scratch, "stamp")
        stamp_tmp.write_text(digest.hexdigest() + "\n")
        os.chmod(stamp_tmp, 0o644)
        os.replace(stamp_tmp, stamp)
    return dest


_preloaded: dict[Path, ctypes.CDLL] = {}


def preload(path: Path) -> ctypes.CDLL:
    """Load a built stand-in into this process once, with ``RTLD_GLOBAL``.

    A later ``CDLL("<soname>")`` by the bindings is matched by the dynamic
    loader against the soname of this already loaded object, so the bindings
    get the stand-in whatever ``LD_LIBRARY_PATH`` says.
    """
    path = path.resolve()
    lib = _preloaded.get(path)
    if lib is None:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        _preloaded[path] = lib
    return lib


# --------------------------------------------------------------------------- state model

@dataclass(frozen=True)
class StateModel:
    """What a stand-in's state file holds besides injections."""

    name: str  # first line of a written file
    gpu_type: type  # frozen dataclass; field names are the keys gpu.<i>.<field>
    default_gpu: Callable[[int], Any]  # the GPU the C side assumes for an index
    global_defaults: Mapping[str, str]  # top-level keys (must include "count")
    injection_kinds: tuple[str, ...] = ("error", "delay")

    def field_kinds(self) -> dict[str, str]:
        """Field name -> "str", "bool", "int" or "clocks" (``(min, max)`` or ``None``)."""
        hints = typing.get_type_hints(self.gpu_type)
        return {f.name: _field_kind(hints[f.name]) for f in fields(self.gpu_type)}


def _field_kind(hint: Any) -> str:
    plain = {str: "str", bool: "bool", int: "int"}
    if hint in plain:
        return plain[hint]
    if type(None) in typing.get_args(hint):  # tuple[int, int] | None
        return "clocks"
    raise TypeError(f"no state-file encoding for {hint!r}")


def _encode(kind: str, name: str, value: object) -> str:
    if kind == "clocks":
        if value is None:
            return "none"
        if not isinstance(value, tuple) or len(value) != 2:
            raise TypeError(f"{name} must be (min_mhz, max_mhz) or None")
        return f"{int(value[0])} {int(value[1])}"
    if kind == "bool":
        return "1" if value else "0"
    if kind == "str":
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{name} must be a single line")
        return text
    return str(int(value))  # type: ignore[call-overload]


def _decode(kind: str, text: str) -> object:
    if kind == "clocks":
        parts = text.split()
        return (int(parts[0], 0), int(parts[1], 0)) if len(parts) == 2 else None
    if kind == "bool":
        return int(text, 0) != 0
    if kind == "str":
        return text
    return int(text, 0)


class State:
    """The parsed state file."""

    def __init__(self, model: StateModel) -> None:
        self.model = model
        self.globals: dict[str, str] = {"generation": "0", **model.global_defaults}
        self.gpus: list[Any] = [model.default_gpu(i) for i in range(MAX_GPUS)]
        self.injections: dict[str, int] = {}  # raw keys, e.g. "gpu.0.error.nvmlShutdown"

    @property
    def count(self) -> int:
        return int(self.globals["count"], 0)

    @classmethod
    def parse(cls, model: StateModel, text: str) -> State:
        state = cls(model)
        kinds = model.field_kinds()
        overrides: dict[int, dict[str, object]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#") or " " not in line:
                continue
            key, value = line.split(" ", 1)
            parts = key.split(".")
            if parts[0] in model.injection_kinds and len(parts) >= 2:
                state.injections[key] = int(value, 0)
            elif parts[0] == "gpu" and len(parts) >= 3 and parts[1].isdigit():
                index = int(parts[1])
                if index >= MAX_GPUS:
                    continue
                if parts[2] in model.injection_kinds and len(parts) >= 4:
                    state.injections[key] = int(value, 0)
                elif len(parts) == 3 and parts[2] in kinds:
                    overrides.setdefault(index, {})[parts[2]] = _decode(kinds[parts[2]], value)
            else:
                state.globals[key] = value
        for index, changes in overrides.items():
            state.gpus[index] = replace(state.gpus[index], **changes)
        return state

    def render(self) -> str:
        kinds = self.model.field_kinds()
        lines = [f"# {self.model.name} state (written by tests.{self.model.name})"]
        lines += [f"{key} {value}" for key, value in self.globals.items()]
        for index in range(self.count):
            gpu = self.gpus[index]
            lines += [f"gpu.{index}.{name} {_encode(kind, name, getattr(gpu, name))}" for name, kind in kinds.items()]
        lines += [f"{key} {value}" for key, value in self.injections.items()]
        return "\n".join(lines) + "\n"


class Call(NamedTuple):
    """One line of the call log: ``<function> <gpu index or -1> [args...]``."""

    name: str
    gpu: int
    args: tuple[str, ...]


# --------------------------------------------------------------------------- helper


class FakeLibrary:
    """Create, inspect and manipulate a stand-in's shared state and call log."""

    #: Set by each stand-in.
    MODEL: ClassVar[StateModel]
    ENV_STATE: ClassVar[str]
    ENV_LOG: ClassVar[str]

    def __init__(self, state_path: Path, log_path: Path | None = None, lib_dir: Path | None = None) -> None:
        self.state_path = Path(state_path)
        self.log_path = Path(log_path) if log_path is not None else None
        self._lib_dir = lib_dir

    # ---- what each stand-in says

    def build(self, lib_dir: Path | None) -> Path:
        """Build the library (if needed) and return the directory that holds it."""
        raise NotImplementedError

    def library_env(self, lib_dir: Path) -> dict[str, str]:
        """Variables that make the bindings load the library from ``lib_dir``."""
        raise NotImplementedError

    # ---- environment

    @property
    def lib_dir(self) -> Path:
        """Directory holding the built library (built on first use)."""
        return self.build(self._lib_dir)

    def env(self) -> dict[str, str]:
        """Variables a subprocess needs: merge into ``os.environ`` for ``Popen``.

        The log variable is empty (logging off) when no log path was given.
        """
        return {
            **self.library_env(self.lib_dir.resolve()),
            self.ENV_STATE: str(self.state_path),
            self.ENV_LOG: str(self.log_path) if self.log_path is not None else "",
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

    def _read(self) -> State:
        try:
            return State.parse(self.MODEL, self.state_path.read_text())
        except FileNotFoundError:
            return State(self.MODEL)

    def _write(self, state: State) -> None:
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

    def _snapshot(self) -> State:
        with self._locked(False):
            return self._read()

    def _mutate(self, change: Callable[[State], None]) -> None:
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
        """Write a fresh state: ``num_gpus`` default GPUs, no injections.

        ``common`` properties apply to every GPU, ``gpus[i]`` to GPU ``i`` only.
        """
        _check_count(num_gpus)
        self._check_fields(common)
        state = State(self.MODEL)
        state.globals["count"] = str(num_gpus)
        for index in range(num_gpus):
            gpu = replace(state.gpus[index], **common)
            if gpus is not None and index < len(gpus):
                self._check_fields(gpus[index])
                gpu = replace(gpu, **gpus[index])
            state.gpus[index] = gpu
        with self._locked(True):
            self._write(state)

    @property
    def num_gpus(self) -> int:
        return self._snapshot().count

    def set_num_gpus(self, num_gpus: int) -> None:
        """Change how many GPUs the library reports (GPUs beyond it are forgotten)."""
        _check_count(num_gpus)
        self._mutate(lambda s: s.globals.__setitem__("count", str(num_gpus)))

    def gpu(self, index: int) -> Any:
        """Current state of GPU ``index`` as the library sees it."""
        state = self._snapshot()
        if not 0 <= index < state.count:
            raise IndexError(f"no GPU {index} (count {state.count})")
        return state.gpus[index]

    def gpus(self) -> list[Any]:
        state = self._snapshot()
        return state.gpus[: state.count]

    def set_gpu(self, index: int, **props: object) -> None:
        """Change properties of one GPU, e.g. ``set_gpu(0, power_mw=123_000)``."""
        self._check_fields(props)

        def change(state: State) -> None:
            if not 0 <= index < state.count:
                raise IndexError(f"no GPU {index} (count {state.count})")
            state.gpus[index] = replace(state.gpus[index], **props)

        self._mutate(change)

    def set_all_gpus(self, **props: object) -> None:
        self._check_fields(props)

        def change(state: State) -> None:
            for index in range(state.count):
                state.gpus[index] = replace(state.gpus[index], **props)

        self._mutate(change)

    def set_global(self, key: str, value: str | int) -> None:
        """Set a top-level key (a driver version, ...)."""
        if key in ("generation", "count") or key.split(".")[0] in ("gpu", *self.MODEL.injection_kinds):
            raise ValueError(f"use the dedicated method for {key!r}")
        self._mutate(lambda s: s.globals.__setitem__(key, str(value)))

    def _check_fields(self, props: Mapping[str, object]) -> None:
        unknown = set(props) - set(self.MODEL.field_kinds())
        if unknown:
            raise TypeError(f"unknown GPU properties: {sorted(unknown)}")

    # ---- failure injection

    def set_init_error(self, code: int) -> None:
        """Make the library's init call return ``code`` (0 restores success)."""
        self._mutate(lambda s: s.globals.__setitem__("init_error", str(int(code))))

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

    def clear_injections(self) -> None:
        """Back to normal: no errors, delays or other injections, and no init error."""
        self._mutate(self._clear_all)

    def _clear_all(self, state: State) -> None:
        state.injections.clear()
        state.globals["init_error"] = "0"

    def injections(self) -> dict[str, int]:
        """Raw injection entries, e.g. ``{"gpu.0.error.nvmlDeviceSetPowerManagementLimit": 4}``."""
        return dict(self._snapshot().injections)

    def _set_injection(self, key: str, value: int) -> None:
        """Set (or, for 0, remove) one raw injection entry."""

        def change(state: State) -> None:
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

        def change(state: State) -> None:
            for key in [k for k in state.injections if matches(k)]:
                del state.injections[key]

        self._mutate(change)

    # ---- call log

    def calls(self, name: str | Sequence[str] | None = None, gpu: int | None = None) -> list[Call]:
        """Logged calls in order, optionally only those of ``name`` and/or ``gpu``."""
        if self.log_path is None:
            raise RuntimeError(f"{type(self).__name__} was created without a log path")
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


def _check_count(num_gpus: int) -> None:
    if not 0 <= num_gpus <= MAX_GPUS:
        raise ValueError(f"num_gpus must be within 0..{MAX_GPUS}")


def _injection_key(kind: str, function: str, gpu: int | None) -> str:
    if not function or any(c in function for c in " .\n"):
        raise ValueError(f"bad function name {function!r}")
    return f"{kind}.{function}" if gpu is None else f"gpu.{int(gpu)}.{kind}.{function}"
