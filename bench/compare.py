"""Side by side: our zeusd against upstream zeusd v0.4.0, and against the floors the stack sets.

    make bench-compare                     # builds upstream with cargo when missing, then a full run (~6 min)
    .venv/bin/python bench/compare.py --upstream-binary bench/build/upstream/bin/zeusd [--quick] [--out DIR]
    .venv/bin/python bench/compare.py --markdown [JSON]   # tables of a result (default <out>/compare-latest.json)

Both daemons run on the same stand-in libnvidia-ml (tests/fakenvml, through
LD_LIBRARY_PATH) and the same RAPL tree (tests/rapl_tree.py). Upstream reads
RAPL only from the fixed path /sys/class/powercap, so every process starts in
its own mount namespace (``unshare --mount``) where the test tree is
bind-mounted there; ours reads the same path. Without that (not root, no
``unshare``) both run with ``--enable gpu-control,gpu-read`` and the result
says so. Upstream needs root for gpu-control in any case.

Each scenario runs on fresh processes, alternating the contestants from one
repetition to the next (AB, BA, AB...), so that drift hits both; figures are
medians over the repetitions. Daemons are pinned to the last CPU, the driver
and loadgen to the others; stand-in state, logs and sockets live on /dev/shm.
The stand-in's instant power changes on every other read (``power_wobble_mw``):
upstream publishes, and answers a one-shot ``get_power``, only when a reading
changed, as a real GPU's does between polls.

Floors: a bare Twisted + Klein process serving one route on the same listener
(bench/floor_klein.py): RSS idle and start-up; and the time to import the
modules the daemon needs (found by running the daemon under
bench/module_probe.py with ``-X importtime``), which also reports the modules a
running daemon holds that its configuration does not use. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    NUM_CPUS,
    NUM_GPUS,
    POLL_HZ,
    Daemon,
    Plan,
    Section,
    Window,
    build_loadgen,
    cpu_model,
    http_get,
    latency_one,
    loadgen,
    markdown_lines,
    markdown_source,
    output_arguments,
    save_result,
    scenario_idle,
    scenario_stream,
    text_lines,
)
from tests.fakenvml import FakeNvml, build_library  # noqa: E402
from tests.rapl_tree import RaplTree  # noqa: E402

DEFAULT_UPSTREAM = BENCH / "build" / "upstream" / "bin" / "zeusd"
UPSTREAM_VERSION = "0.4.0"
FLOOR_KLEIN = BENCH / "floor_klein.py"
MODULE_PROBE = BENCH / "module_probe.py"
WOBBLE_MW = 1000
SYS_POWERCAP = Path("/sys/class/powercap")  # upstream's fixed RAPL path (src/devices/cpu/rapl.rs)
ENV_RAPL = "ZEUSD_BENCH_RAPL"
PREFIX = "compare-"  # result files: bench/results/compare-<timestamp>.json, compare-latest.json
ALL_GROUPS = "gpu-control,gpu-read,cpu-read"
GPU_GROUPS = "gpu-control,gpu-read"

# Every process starts through this script: in the mount namespace it puts the
# RAPL test tree at /sys/class/powercap (tmpfs over /sys/class where powercap
# does not exist), says "started" on stderr (a pipe to the driver: start-up is
# counted from here, so the wrapper's cost is not), and execs the program with
# stderr joined to stdout (the log). No caller input reaches the script: the
# tree path comes from the environment, the argv as "$@".
LAUNCH_SH = r"""set -e
if [ -n "${ZEUSD_BENCH_RAPL:-}" ]; then
    if [ ! -d /sys/class/powercap ]; then
        mount -t tmpfs -o size=64k,mode=0755 zeusd-bench /sys/class
        mkdir /sys/class/powercap
    fi
    mount --bind "$ZEUSD_BENCH_RAPL" /sys/class/powercap
fi
echo started >&2
exec "$@" 2>&1
"""


def launcher_argv(argv: Sequence[str], sandbox: bool) -> list[str]:
    """The command line that starts ``argv`` through LAUNCH_SH (in a private mount namespace when ``sandbox``)."""
    prefix = ["unshare", "--mount", "--propagation", "private"] if sandbox else []
    return [*prefix, "sh", "-c", LAUNCH_SH, "zeusd-bench-launch", *argv]


def pin_to(cpus: frozenset[int]) -> Callable[[], None] | None:
    """preexec_fn that pins the child (what ``taskset`` does); None when there is nothing to pin."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@dataclass(frozen=True)
class Pinning:
    """Daemons on one CPU, the driver and loadgen on the others (nothing pinned on a 1-CPU machine)."""

    daemon: frozenset[int]
    load: frozenset[int]

    @classmethod
    def choose(cls, available: set[int]) -> "Pinning":
        if len(available) < 2:
            return cls(frozenset(), frozenset())
        last = max(available)
        return cls(frozenset({last}), frozenset(available - {last}))


@dataclass
class Pinned(Daemon):
    """A contestant started through LAUNCH_SH: pinned, optionally in the RAPL mount namespace.

    ``program`` None means our daemon (Daemon.command); otherwise the argv
    before the listener flags (upstream's binary, the Klein floor).
    """

    program: Sequence[str] | None = None
    cpus: frozenset[int] = frozenset()
    sandbox_rapl: Path | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    ready_poll_s: float = 0.001
    stop_timeout_s: float = 5.0

    def command(self, listen: list[str]) -> list[str]:
        if self.program is None:
            return super().command(listen)
        return [*self.program, *listen, *self.extra_args]

    def spawn(self, args: list[str], env: dict[str, str], log: IO[bytes]) -> float:
        env = {**env, **self.env_extra}
        if self.sandbox_rapl is not None:
            env[ENV_RAPL] = str(self.sandbox_rapl)
        self.process = subprocess.Popen(
            launcher_argv(args, self.sandbox_rapl is not None), cwd=REPO, env=env, stdout=log,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=pin_to(self.cpus),
        )  # fmt: skip
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        t0 = time.monotonic()
        rest = self.process.stderr.read()  # EOF at the exec: stderr then goes to the log
        self.process.stderr.close()
        if line.strip() != b"started":
            self.process.wait()
            raise RuntimeError(f"launching {self.name} failed: {(line + rest).decode(errors='replace').strip()}")
        return t0


def sandbox_works(workdir: Path, rapl_root: Path) -> tuple[bool, str]:
    """Can this machine put the RAPL tree at /sys/class/powercap in a private mount namespace?"""
    if os.geteuid() != 0:
        return False, "not root"
    if shutil.which("unshare") is None:
        return False, "no unshare (util-linux)"
    probe = f'test -f "{SYS_POWERCAP}/intel-rapl/intel-rapl:0/energy_uj"'
    r = subprocess.run(
        launcher_argv(["sh", "-c", probe], sandbox=True), env={**os.environ, ENV_RAPL: str(rapl_root)},
        capture_output=True, text=True, timeout=30, cwd=workdir,
    )  # fmt: skip
    if r.returncode != 0:
        return False, f"mount namespace failed: {r.stderr.strip() or r.stdout.strip()}"
    return True, f"RAPL test tree bind-mounted at {SYS_POWERCAP} in a private mount namespace"


# --------------------------------------------------------------------------- plan and schedule


@dataclass(frozen=True)
class ComparePlan:
    quick: bool
    reps: int
    idle_s: float  # fresh daemon, after scenario_idle's own settle
    latency_s: float
    latency_warmup_s: float
    get_power_count: int  # upstream waits a poll period per request: bounded by count (and latency_s)
    stream_s: float
    stream_subs: int
    after_stream_s: float  # the stream before the idle window
    settle_s: float  # between the end of that stream and the idle window
    after_idle_s: float
    import_runs: int

    @classmethod
    def make(cls, quick: bool) -> "ComparePlan":
        if quick:
            return cls(True, 1, 0.3, 0.3, 0.0, 10, 0.6, 1000, 0.3, 0.3, 0.5, 1)
        return cls(False, 3, 3.0, 3.0, 0.5, 100, 10.0, 1000, 1.0, 1.0, 5.0, 12)

    def run_plan(self) -> Plan:
        """bench/run.py's plan with these windows (its scenario functions read them)."""
        return dataclasses.replace(Plan.make(self.quick), latency_s=self.latency_s, latency_warmup_s=self.latency_warmup_s,
                                   stream_s=self.stream_s)  # fmt: skip


OURS, UPSTREAM, KLEIN = "ours", "upstream", "klein"

# scenario: (transport, contestants, repetitions per plan repetition)
SCENARIOS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "idle": ("unix", (OURS, UPSTREAM, KLEIN), 1),
    "idle_tcp": ("tcp", (OURS, UPSTREAM, KLEIN), 1),
    "startup": ("unix", (OURS, UPSTREAM, KLEIN), 4),  # start-up is noisy: more samples, nothing else
    "discover": ("unix", (OURS, UPSTREAM, KLEIN), 1),
    "floor_command": ("unix", (KLEIN,), 1),
    "gpu_get_power": ("unix", (OURS, UPSTREAM), 1),
    "gpu_set_power_limit": ("unix", (OURS, UPSTREAM), 1),
    "stream": ("unix", (OURS, UPSTREAM), 1),
    "idle_after_stream": ("unix", (OURS, UPSTREAM), 1),
    "idle_after_stream_constant": ("unix", (OURS, UPSTREAM), 1),
}


def interleave(scenarios: dict[str, tuple[str, tuple[str, ...], int]], reps: int) -> Iterator[tuple[str, int, str]]:
    """(scenario, repetition, contestant): per scenario, the contestants' order rotates each repetition."""
    for name, (_, who, repeat) in scenarios.items():
        for rep in range(reps * repeat):
            k = rep % len(who)
            for contestant in (*who[k:], *who[:k]):
                yield name, rep, contestant


# --------------------------------------------------------------------------- scenarios


@dataclass
class Context:
    plan: ComparePlan
    fake: FakeNvml  # the shared state (no call log: each process gets its own)


def idle_after_stream(d: Daemon, ctx: Context, wobble_mw: int) -> dict[str, Any]:
    """One subscriber for a moment, then a quiet window: does the daemon stop reading the devices?"""
    p = ctx.plan
    ctx.fake.set_all_gpus(power_wobble_mw=wobble_mw)
    try:
        r = loadgen("sse", *d.target_args(), "--conns", "1", "--path", "/gpu/stream_power",
                    "--duration", str(p.after_stream_s), "--period-ms", str(1000 / POLL_HZ))  # fmt: skip
        time.sleep(p.settle_s)
        win = Window(d).start()
        time.sleep(p.after_idle_s)
        w = win.stop()
    finally:
        ctx.fake.set_all_gpus(power_wobble_mw=WOBBLE_MW)
    return {"stream_events": r["events"], "settle_s": p.settle_s, "window_s": w["window_s"],
            "device_power_reads": w["device_power_reads"], "daemon_cpu_per_s": w["daemon_cpu_per_s"]}  # fmt: skip


SCENARIO_RUN: dict[str, Callable[[Daemon, Context], dict[str, Any]]] = {
    "idle": lambda d, c: scenario_idle(d, c.plan.idle_s),
    "idle_tcp": lambda d, c: scenario_idle(d, c.plan.idle_s),
    "startup": lambda d, c: {"startup_s": d.startup_s},  # counted with every start, as for all scenarios
    "discover": lambda d, c: latency_one(d, "discover", c.plan.run_plan()),
    "gpu_get_power": lambda d, c: latency_one(d, "gpu_get_power", c.plan.run_plan(), c.plan.get_power_count),
    "gpu_set_power_limit": lambda d, c: latency_one(d, "gpu_set_power_limit", c.plan.run_plan()),
    "floor_command": lambda d, c: latency_one(d, "floor_command", c.plan.run_plan()),
    "stream": lambda d, c: scenario_stream(d, c.plan.stream_subs, c.plan.run_plan()),
    "idle_after_stream": lambda d, c: idle_after_stream(d, c, WOBBLE_MW),
    "idle_after_stream_constant": lambda d, c: idle_after_stream(d, c, 0),
}


@dataclass
class Contestants:
    """Makes a fresh, pinned process of each contestant, each with its own stand-in call log."""

    workdir: Path
    state: Path
    upstream: Path
    pinning: Pinning
    sandbox: bool
    rapl_tree: Path

    @property
    def enable(self) -> str:
        return ALL_GROUPS if self.sandbox else GPU_GROUPS

    def make(self, who: str, transport: str, name: str, **extra: Any) -> Pinned:
        fake = FakeNvml(self.state, self.workdir / f"{name}.calls")
        common: dict[str, Any] = {
            "name": name, "cpus": self.pinning.daemon, "enable": self.enable,
            "sandbox_rapl": self.rapl_tree if self.sandbox else None,
            "rapl_root": SYS_POWERCAP if self.sandbox else self.rapl_tree,
        }  # fmt: skip
        common.update(extra)
        if who == OURS:
            return Pinned(self.workdir, fake, transport=transport, **common)
        if who == UPSTREAM:
            flags = ["--enable", self.enable, "--gpu-power-poll-hz", str(POLL_HZ)]
            return Pinned(self.workdir, fake, transport=transport, program=[str(self.upstream), "serve"], extra_args=flags, **common)
        if who == KLEIN:
            return Pinned(self.workdir, fake, transport=transport, program=[sys.executable, str(FLOOR_KLEIN)], **common)
        raise ValueError(who)


# --------------------------------------------------------------------------- modules and the import floor

# What a daemon serving GPUs and RAPL over HTTP without TLS, metrics, auth or
# --simulate does not use: category -> (why, module name prefixes).
UNUSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "tls": ("no --tls-cert", ("ssl", "_ssl", "OpenSSL", "cryptography", "_cffi_backend", "_openssl", "service_identity",
                              "pyasn1", "pyasn1_modules", "twisted.internet.ssl", "twisted.internet._sslverify",
                              "twisted.internet._newtls", "twisted.protocols.tls", "twisted.protocols._tls_legacy",
                              "twisted.protocols._sni")),
    "metrics": ("metrics group not enabled", ("prometheus_client", "zeusd.metrics", "zeusd.web.metrics")),
    "auth": ("no --signing-key-path", ("jwt", "zeusd.auth")),
    "client": ("serving only (no client, watch or power command)",
               ("zeusd.client", "zeusd.watch", "treq", "twisted.web.client", "http.client", "http.cookiejar",
                "urllib.request", "requests", "httpx")),
    "amd": ("NVIDIA GPUs only", ("amdsmi", "pyrsmi", "zeusd.devices.gpu.amdsmi")),  # the AMD backend on main
    "simulate": ("no --simulate", ("zeusd.devices.gpu.simulated", "zeusd.devices.cpu.simulated")),
}  # fmt: skip


def unused_category(module: str) -> str | None:
    for category, (_, prefixes) in UNUSED.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return category
    return None


@dataclass(frozen=True)
class ImportEntry:
    """One line of ``python -X importtime``; ``parent`` is the index of the line of the module that imported it."""

    name: str
    depth: int
    self_us: int
    cumulative_us: int
    parent: int | None


@dataclass
class ImportTree:
    """``-X importtime`` output as a tree. A name can appear more than once (failed attempts); the last line wins."""

    entries: list[ImportEntry]
    by_name: dict[str, int]

    @classmethod
    def parse(cls, text: str) -> "ImportTree":
        rows: list[tuple[str, int, int, int]] = []
        for line in text.splitlines():
            if not line.startswith("import time:"):
                continue
            parts = line[len("import time:") :].split("|")
            if len(parts) != 3 or not parts[0].strip().isdigit():
                continue  # the header
            raw = parts[2][1:]
            name = raw.lstrip(" ")
            rows.append((name, (len(raw) - len(name)) // 2, int(parts[0]), int(parts[1])))
        # A module's line comes after its children's: its parent is the next line one level up.
        parents: list[int | None] = [None] * len(rows)
        last_at: dict[int, int] = {}
        for i in range(len(rows) - 1, -1, -1):
            depth = rows[i][1]
            parents[i] = last_at.get(depth - 1) if depth else None
            last_at[depth] = i
        entries = [ImportEntry(n, d, s, c, parents[i]) for i, (n, d, s, c) in enumerate(rows)]
        return cls(entries, {e.name: i for i, e in enumerate(entries)})

    def get(self, name: str) -> ImportEntry | None:
        i = self.by_name.get(name)
        return None if i is None else self.entries[i]

    def ancestors(self, name: str) -> Iterator[ImportEntry]:
        """The modules whose import imported ``name``, innermost first (parent indexes only grow: no cycles)."""
        entry = self.get(name)
        while entry is not None and entry.parent is not None:
            entry = self.entries[entry.parent]
            yield entry


def analyse_modules(loaded: Sequence[str], tree: ImportTree) -> dict[str, Any]:
    """Per unused category: what is loaded, what importing it cost, and who imported it; and the modules needed."""
    categories: dict[str, Any] = {}
    excluded: set[str] = set()
    for name in loaded:
        category = unused_category(name)
        outer = [a.name for a in tree.ancestors(name) if unused_category(a.name) is not None]
        if category is None:
            if outer:
                excluded.add(name)  # first imported on behalf of an unused module
            continue
        excluded.add(name)
        c = categories.setdefault(category, {"why": UNUSED[category][0], "modules": [], "import_ms": 0.0, "imported_by": []})
        c["modules"].append(name)
        entry = tree.get(name)
        if entry is not None and not any(unused_category(a) == category for a in outer):
            c["import_ms"] += entry.cumulative_us / 1000
            chain = [a.name for a in tree.ancestors(name)][:3] or ["top level"]
            c["imported_by"].append(" <- ".join([name, *chain]))
    for c in categories.values():
        c["loaded"] = len(c["modules"])
        c["import_ms"] = round(c["import_ms"], 3)
    by_package: dict[str, int] = {}
    for e in tree.entries:
        top = e.name.split(".")[0]
        by_package[top] = by_package.get(top, 0) + e.self_us
    top_packages = sorted(by_package.items(), key=lambda kv: -kv[1])[:15]
    needed = [n for n in loaded if n not in excluded and n not in ("__main__", "__mp_main__") and not n.endswith(".__main__")]
    return {
        "loaded": len(loaded),
        "unused": categories,
        "unused_total": sum(c["loaded"] for c in categories.values()),
        "unused_import_ms": round(sum(c["import_ms"] for c in categories.values()), 3),
        "importtime_total_ms": round(sum(e.self_us for e in tree.entries) / 1000, 3),
        "importtime_by_package_ms": {k: round(v / 1000, 3) for k, v in top_packages},
        "needed": needed,
        "needed_stack": [n for n in needed if n != "zeusd" and not n.startswith("zeusd.")],
    }


def loaded_shared_objects(pid: int) -> list[str]:
    """Basenames of the .so files mapped into a process (the C side of what it imported)."""
    names: set[str] = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
            if ".so" in path:
                names.add(os.path.basename(path))
    return sorted(names)


def probe_modules(c: Contestants) -> tuple[list[str], str, list[str]]:
    """Our daemon under bench/module_probe.py with -X importtime: loaded modules, importtime text, mapped .so files."""
    out = c.workdir / "modules.txt"
    d = c.make(OURS, "unix", "probe", main=("-X", "importtime", str(MODULE_PROBE)), env_extra={"ZEUSD_BENCH_MODULES_OUT": str(out)})
    with d.start():
        for path in ("/gpu/get_power", "/cpu/get_power" if c.sandbox else "/discover"):
            http_get(d.address, path)
        assert d.process is not None
        d.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        so = loaded_shared_objects(d.pid)
    return out.read_text().split(), d.log_text(), so


# Imports each named module (in the daemon's order), as if the packages named
# in argv[3] were not installed, and says "imported <failures>" before the
# interpreter tears down. __import__ needs no import of its own.
REPLAY = """import sys
hidden = tuple(p for p in sys.argv[3].split(",") if p)
class Hide:
    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in hidden):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
failed = 0
for name in open(sys.argv[1]).read().split():
    try:
        __import__(name)
    except Exception:
        failed += 1
open(sys.argv[2], "w").write("\\n".join(sys.modules))
print("imported", failed, flush=True)
"""


@dataclass(frozen=True)
class Replay:
    """One set of modules to import in a fresh interpreter, optionally with some packages hidden."""

    names: Sequence[str]
    hidden: Sequence[str] = ()


def time_imports(workdir: Path, replay: Replay, label: str, cpus: frozenset[int]) -> tuple[float, int, list[str]]:
    """Spawn to "imported" of a fresh interpreter importing the set; the names that failed; what it loaded."""
    src, loaded = workdir / f"import-{label}.txt", workdir / f"import-{label}.loaded"
    src.write_text("\n".join(replay.names) + "\n")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", REPLAY, str(src), str(loaded), ",".join(replay.hidden)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=pin_to(cpus), cwd=workdir)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    elapsed = time.monotonic() - t0
    proc.wait(30)
    if len(line) != 2 or line[0] != b"imported":
        raise RuntimeError(f"import replay {label} failed ({proc.returncode})")
    return elapsed, int(line[1]), loaded.read_text().split()


def import_floor(c: Contestants, analysis: dict[str, Any], runs: int) -> dict[str, Any]:
    """Interpreter start alone; the stack modules the daemon needs (also with the TLS packages hidden, as if
    not installed: Twisted imports them whenever they are); those plus zeusd's own. Alternated."""
    sets = {
        "interpreter": Replay([]),
        "stack": Replay(analysis["needed_stack"]),
        "stack_without_tls": Replay(analysis["needed_stack"], UNUSED["tls"][1]),
        "needed": Replay(analysis["needed"]),
    }
    times: dict[str, list[float]] = {k: [] for k in sets}
    failed: dict[str, int] = {}
    loaded: dict[str, list[str]] = {}
    for i in range(runs):
        for label in (list(sets) if i % 2 == 0 else list(reversed(sets))):
            t, failed[label], loaded[label] = time_imports(c.workdir, sets[label], label, c.pinning.daemon)
            times[label].append(t)
    out: dict[str, Any] = {}
    for label, replay in sets.items():
        dragged = sorted(n for n in loaded[label] if unused_category(n) is not None)
        out[label] = {"modules": len(replay.names), "hidden": list(replay.hidden), "failed": failed[label],
                      "samples_s": times[label], "median_s": statistics.median(times[label]),
                      "unused_loaded_anyway": dragged}  # fmt: skip
    return out


# --------------------------------------------------------------------------- figures


def median_of(samples: Sequence[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float | None:
    values = [get(s) for s in samples]
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    scenario: str
    get: Callable[[dict[str, Any]], float]
    target: str = ""  # the target for ours/upstream, as text
    max_ratio: float | None = None
    ratio: bool = True  # False for counts where a ratio means nothing (0 reads)


FIGURES = [
    Figure("get_power_p50", "one-shot GET /gpu/get_power p50 (UDS)", "ms", "gpu_get_power",
           lambda r: r["latency_us"]["p50"] / 1000, "<= 0.02 (>= 50x faster)", 0.02),
    Figure("set_power_limit_p50", "POST /gpu/set_power_limit block=true p50 (UDS)", "ms", "gpu_set_power_limit",
           lambda r: r["latency_us"]["p50"] / 1000, "<= 1.5", 1.5),
    Figure("discover_p50", "GET /discover p50 (UDS)", "ms", "discover", lambda r: r["latency_us"]["p50"] / 1000, "<= 2.5", 2.5),
    Figure("stream_cpu", "1,000 SSE subscribers at 20 Hz, daemon CPU", "% of a core", "stream",
           lambda r: r["daemon_cpu_per_s"] * 100, "<= 1.0", 1.0),
    Figure("stream_events", "1,000 SSE subscribers at 20 Hz, events delivered", "events/s", "stream", lambda r: r["events_per_s"]),
    Figure("idle_reads", "device reads in the quiet window after a stream ended (reading changes)", "reads", "idle_after_stream",
           lambda r: r["device_power_reads"], "ours 0", ratio=False),
    Figure("idle_reads_constant", "device reads in the quiet window after a stream ended (reading constant)", "reads",
           "idle_after_stream_constant", lambda r: r["device_power_reads"], "ours 0", ratio=False),
    Figure("rss_idle", "RSS idle (UDS)", "MB", "idle", lambda r: r["rss_mb"]),
    Figure("rss_stream", "RSS with 1,000 subscribers", "MB", "stream", lambda r: r["rss_mb"]),
    Figure("idle_cpu", "daemon CPU idle (fresh)", "% of a core", "idle", lambda r: r["daemon_cpu_per_s"] * 100),
]  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def figures(runs: dict[str, dict[str, list[dict[str, Any]]]], starts: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    out = []
    for f in FIGURES:
        ours = median_of(runs[OURS].get(f.scenario, []), f.get)
        up = median_of(runs[UPSTREAM].get(f.scenario, []), f.get)
        out.append({"key": f.key, "label": f.label, "unit": f.unit, "ours": ours, "upstream": up, "ratio": ratio(ours, up) if f.ratio else None,
                    "target": f.target, "max_ratio": f.max_ratio})  # fmt: skip
    s_ours, s_up = (statistics.median(starts[w]["unix"]) if starts[w]["unix"] else None for w in (OURS, UPSTREAM))
    out.append({"key": "startup", "label": "start to first answer (UDS), median of every start", "unit": "s", "ours": s_ours,
                "upstream": s_up, "ratio": ratio(s_ours, s_up), "target": "", "max_ratio": None})  # fmt: skip
    return out


def floor_figures(runs: dict[str, dict[str, list[dict[str, Any]]]], starts: dict[str, dict[str, list[float]]],
                  imports: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    def rss(who: str, scenario: str) -> float | None:
        return median_of(runs[who].get(scenario, []), lambda r: r["rss_mb"])

    def start(who: str, transport: str) -> float | None:
        return statistics.median(starts[who][transport]) if starts[who][transport] else None

    def p50(who: str, scenario: str) -> float | None:
        return median_of(runs[who].get(scenario, []), lambda r: r["latency_us"]["p50"] / 1000)

    rows = [
        ("discover_vs_klein", "GET /discover p50 vs bare Twisted + Klein's GET /discover", "ms", p50(OURS, "discover"),
         p50(KLEIN, "discover"), None),
        ("command_vs_klein", "set_power_limit block=true p50 vs Klein answering after a no-op on a thread", "ms",
         p50(OURS, "gpu_set_power_limit"), p50(KLEIN, "floor_command"), None),
        ("rss_idle_uds", "RSS idle (UDS) vs bare Twisted + Klein", "MB", rss(OURS, "idle"), rss(KLEIN, "idle"), 1.2),
        ("rss_idle_tcp", "RSS idle (TCP) vs bare Twisted + Klein", "MB", rss(OURS, "idle_tcp"), rss(KLEIN, "idle_tcp"), 1.2),
        ("startup_vs_imports", "start-up (UDS) vs importing the stack modules it needs", "s", start(OURS, "unix"),
         imports["stack"]["median_s"], 1.5),
        ("startup_vs_needed", "start-up (UDS) vs importing those plus zeusd's own", "s", start(OURS, "unix"),
         imports["needed"]["median_s"], None),
        ("startup_vs_imports_no_tls", "start-up (UDS) vs importing the stack modules, TLS packages hidden", "s",
         start(OURS, "unix"), imports["stack_without_tls"]["median_s"], None),
        ("startup_vs_klein", "start-up (UDS) vs bare Twisted + Klein start-up", "s", start(OURS, "unix"), start(KLEIN, "unix"), None),
        ("startup_tcp_vs_klein", "start-up (TCP) vs bare Twisted + Klein start-up", "s", start(OURS, "tcp"), start(KLEIN, "tcp"), None),
        ("interpreter", "interpreter start alone (python -c)", "s", None, imports["interpreter"]["median_s"], None),
    ]  # fmt: skip
    return [{"key": k, "label": label, "unit": unit, "ours": o, "floor": fl, "ratio": ratio(o, fl), "max_ratio": m}
            for k, label, unit, o, fl, m in rows]  # fmt: skip


# --------------------------------------------------------------------------- report


def _v(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    digits = 3 if abs(x) < 1 else 2 if abs(x) < 10 else 1
    return f"{x:.{digits}f}" + (f" {unit}" if unit else "")


def _ratio(r: float | None, max_ratio: float | None) -> str:
    if r is None:
        return "-"
    mark = "" if max_ratio is None else (" (meets)" if r <= max_ratio else " (misses)")
    return f"{r:.2f}x{mark}"


def by_category(modules: Sequence[str]) -> str:
    """'tls 74 (ssl, OpenSSL, ...)': unused modules counted per category, with their top-level packages."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        groups.setdefault(unused_category(m) or "?", []).append(m)
    parts = []
    for category, names in groups.items():
        tops = sorted({n.split(".")[0] for n in names})
        parts.append(f"{category} {len(names)} ({', '.join(tops)})")
    return "; ".join(parts)


def tables(result: dict[str, Any]) -> list[Section]:
    reps = result["meta"]["plan"]["reps"]
    out: list[Section] = []
    out.append((f"Ours vs upstream zeusd v{UPSTREAM_VERSION} (median of {reps} alternated runs each)",
                ["figure", "ours", f"upstream v{UPSTREAM_VERSION}", "ours/upstream", "issue 18 target"],
                [[f["label"], _v(f["ours"], f["unit"]), _v(f["upstream"], f["unit"]), _ratio(f["ratio"], f["max_ratio"]),
                  f["target"]] for f in result["figures"]]))  # fmt: skip
    out.append(("Floors", ["figure", "ours", "floor", "ours/floor", "target"],
                [[f["label"], _v(f["ours"], f["unit"]), _v(f["floor"], f["unit"]), _ratio(f["ratio"], f["max_ratio"]),
                  f"<= {f['max_ratio']}" if f["max_ratio"] else ""] for f in result["floors"]]))  # fmt: skip
    m = result["modules"]
    rows = [[cat, c["why"], str(c["loaded"]), _v(c["import_ms"]), "; ".join(c["imported_by"][:6])]
            for cat, c in m["unused"].items()]  # fmt: skip
    out.append((f"Modules a running daemon holds that its configuration does not use ({m['unused_total']} of {m['loaded']})",
                ["category", "why unused", "modules", "import ms (-X importtime)", "first imported as <- by"], rows))  # fmt: skip
    imp = result["imports"]
    out.append(("Import floor (fresh interpreter, pinned like the daemon)",
                ["set", "modules", "failed to import", "median", "unused loaded anyway"],
                [[k, str(v["modules"]), str(v["failed"]), _v(v["median_s"], "s"), by_category(v["unused_loaded_anyway"])]
                 for k, v in imp.items()]))  # fmt: skip
    out.append(("Import time by package (-X importtime, self time summed)", ["package", "ms"],
                [[k, _v(v)] for k, v in m["importtime_by_package_ms"].items()] + [["total", _v(m["importtime_total_ms"])]]))
    return out


def meta_line(meta: dict[str, Any]) -> str:
    return (f"{meta['timestamp']} ({'QUICK, numbers meaningless' if meta['quick'] else 'full'}), {meta['cpus']} CPUs "
            f"({meta['cpu_model']}), kernel {meta['kernel']}, Python {meta['python']}; daemons pinned to CPU "
            f"{meta['pinning']['daemon'] or '-'}, load on {meta['pinning']['load'] or '-'}; state on {meta['workdir_fs']}; "
            f"RAPL: {meta['rapl']}; enabled: {meta['enable']}; load average {meta['loadavg_start']:.2f} -> "
            f"{meta['loadavg_end']:.2f}; {meta['runtime_s']:.0f} s.")  # fmt: skip


def render_text(result: dict[str, Any]) -> str:
    return "\n".join(["zeusd compare " + meta_line(result["meta"]), *text_lines(tables(result))])


def render_markdown(result: dict[str, Any]) -> str:
    return "\n".join(["Run " + meta_line(result["meta"]), *markdown_lines(tables(result))])


# --------------------------------------------------------------------------- main


def shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_compare(plan: ComparePlan, upstream: Path, log: Callable[[str], None]) -> dict[str, Any]:
    started, loadavg_start = time.monotonic(), os.getloadavg()[0]
    pinning = Pinning.choose(os.sched_getaffinity(0))
    if pinning.load:
        os.sched_setaffinity(0, pinning.load)  # the driver, and loadgen after it
    build_loadgen()
    build_library()
    base = shm_dir()
    workdir = Path(tempfile.mkdtemp(prefix="zeusd-compare-", dir=base))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in (OURS, UPSTREAM, KLEIN)}
    starts: dict[str, dict[str, list[float]]] = {w: {"unix": [], "tcp": []} for w in (OURS, UPSTREAM, KLEIN)}
    try:
        fake = FakeNvml(workdir / "nvml.state")
        fake.create(NUM_GPUS, power_wobble_mw=WOBBLE_MW)
        rapl = RaplTree(workdir / "powercap")
        for i in range(NUM_CPUS):
            rapl.add_package(i, energy_uj=1_000_000 * (i + 1), dram_energy_uj=100_000)
        sandbox, rapl_note = sandbox_works(workdir, rapl.root)
        if not sandbox:
            rapl_note = f"none ({rapl_note}): both daemons run with --enable {GPU_GROUPS}"
        log(f"RAPL: {rapl_note}")
        c = Contestants(workdir, fake.state_path, upstream, pinning, sandbox, rapl.root)
        ctx = Context(plan, fake)
        for scenario, rep, who in interleave(SCENARIOS, plan.reps):
            transport = SCENARIOS[scenario][0]
            log(f"{scenario} #{rep + 1}: {who}")
            with c.make(who, transport, f"{who}-{scenario}-{rep}").start() as d:
                starts[who][transport].append(d.startup_s)
                runs[who].setdefault(scenario, []).append(SCENARIO_RUN[scenario](d, ctx))
        log("module probe (-X importtime)")
        loaded, probe_log, shared_objects = probe_modules(c)
        analysis = analyse_modules(loaded, ImportTree.parse(probe_log))
        log(f"import floor x{plan.import_runs}")
        imports = import_floor(c, analysis, plan.import_runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": plan.quick, "plan": plan.__dict__,
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "kernel": os.uname().release, "python": sys.version.split()[0],
        "upstream_binary": str(upstream), "upstream_version": UPSTREAM_VERSION,
        "pinning": {"daemon": sorted(pinning.daemon), "load": sorted(pinning.load)},
        "workdir_fs": f"tmpfs ({base})" if base else tempfile.gettempdir(), "rapl": rapl_note,
        "enable": ALL_GROUPS if sandbox else GPU_GROUPS, "power_wobble_mw": WOBBLE_MW, "gpus": NUM_GPUS,
        "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0], "runtime_s": time.monotonic() - started,
    }  # fmt: skip
    analysis_out = {k: v for k, v in analysis.items() if k not in ("needed", "needed_stack")}
    analysis_out["shared_objects"] = shared_objects
    return {"meta": meta, "runs": runs, "startups": starts, "figures": figures(runs, starts),
            "floors": floor_figures(runs, starts, imports), "modules": analysis_out, "imports": imports}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream-binary", type=Path, default=DEFAULT_UPSTREAM, help=f"upstream zeusd v{UPSTREAM_VERSION}")
    parser.add_argument("--quick", action="store_true", help="every scenario once with tiny windows (smoke test)")
    output_arguments(parser, PREFIX)
    args = parser.parse_args(argv)
    source = markdown_source(args, PREFIX)
    if source is not None:
        print(render_markdown(json.loads(source.read_text())))
        return 0
    if not os.access(args.upstream_binary, os.X_OK):
        print(f"compare: no upstream zeusd at {args.upstream_binary}; `make bench-compare` builds it with "
              f"cargo install zeusd --version {UPSTREAM_VERSION} --root bench/build/upstream", file=sys.stderr)  # fmt: skip
        return 2
    if os.geteuid() != 0:
        print("compare: must run as root: upstream zeusd refuses gpu-control without root, and the RAPL tree is "
              "mounted in a private mount namespace", file=sys.stderr)  # fmt: skip
        return 2

    def log(msg: str) -> None:
        print(f"[compare] {msg}", file=sys.stderr, flush=True)

    result = run_compare(ComparePlan.make(args.quick), args.upstream_binary.resolve(), log)
    path = save_result(result, args.out, PREFIX)
    print(render_text(result))
    print(f"\nwritten: {path} and {args.out / (PREFIX + 'latest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
