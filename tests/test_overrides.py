"""GPU command overrides through real daemons: HTTP in, real scripts out, the stand-in NVML beside them.

The scripts are written by the tests into temporary directories; the
recorder (tests/override_files.py) logs every run's exact words, and also
into the stand-in NVML's call log, so native calls and overrides share one
order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import (
    REPO, Client, Daemon, Transport, euid_of, free_tcp_port, run_zeusd, unprivileged_command, unprivileged_user,
    wait_for_discover, wait_until,
)  # fmt: skip
from tests.fakenvml import FakeNvml, build_library
from tests.override_files import (
    children_of, gone_within, pipes_of, recorder, records, running, write_overrides, write_script,
)  # fmt: skip
from zeusd.devices.gpu.control import OPERATIONS

GROUPS = ("--enable", "gpu-control,gpu-read,metrics")
NVML_SETTERS = (
    "nvmlDeviceSetPersistenceMode", "nvmlDeviceSetPowerManagementLimit", "nvmlDeviceSetGpuLockedClocks",
    "nvmlDeviceResetGpuLockedClocks", "nvmlDeviceSetMemoryLockedClocks", "nvmlDeviceResetMemoryLockedClocks",
)  # fmt: skip


def start(start_daemon: DaemonFactory, fake: FakeNvml, overrides: Path, *args: str, transport: str = "unix") -> Daemon:
    return start_daemon(*GROUPS, "--gpu-command-overrides", str(overrides), *args, env=fake.env(), transport=transport)


def post(daemon: Daemon, path: str) -> Any:
    return daemon.client.post(path)


def override_samples(daemon: Daemon) -> list[str]:
    """The ``zeusd_gpu_command_override`` samples of a scrape."""
    body = daemon.client.get("/metrics").body.decode()
    return [line for line in body.splitlines() if line.startswith("zeusd_gpu_command_override{")]


# Every operation, every placeholder ------------------------------------------------------

#: Operation → (command line after the program, query, the words the program must get).
EVERY_OPERATION: dict[str, tuple[str, str, list[str]]] = {
    "set_persistence_mode": ("persist {gpu_id} --enabled={enabled}", "enabled=false", ["persist", "G", "--enabled=0"]),
    "set_power_limit": (
        "power {gpu_id} {power_limit_mw} '{power_limit_w} W'", "power_limit_mw=253999", ["power", "G", "253999", "253 W"]
    ),
    "set_gpu_locked_clocks": (
        "gpu-clocks {gpu_id} {min_clock_mhz}:{max_clock_mhz}", "min_clock_mhz=500&max_clock_mhz=1700",
        ["gpu-clocks", "G", "500:1700"],
    ),
    "reset_gpu_locked_clocks": ("gpu-clocks-reset {gpu_id}", "", ["gpu-clocks-reset", "G"]),
    "set_mem_locked_clocks": (
        "mem-clocks --gpu {gpu_id} --min {min_clock_mhz} --max {max_clock_mhz}", "min_clock_mhz=1593&max_clock_mhz=2619",
        ["mem-clocks", "--gpu", "G", "--min", "1593", "--max", "2619"],
    ),
    "reset_mem_locked_clocks": ("mem-clocks-reset {gpu_id}", "", ["mem-clocks-reset", "G"]),
    "reset_locked_clocks": ("all-clocks-reset 'gpu {gpu_id}'", "", ["all-clocks-reset", "gpu G"]),
}  # fmt: skip


def test_every_operation_runs_its_commands_with_its_placeholders(
    start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    program = recorder(tmp_path, rec)
    overrides = write_overrides(
        tmp_path / "o.toml", {op: {"commands": [f"{program} {line}"]} for op, (line, _, _) in EVERY_OPERATION.items()}
    )
    daemon = start(start_daemon, fake, overrides)
    assert daemon.client.get("/discover").json()["gpu_command_overrides"] == [op.name for op in OPERATIONS]
    for operation, (_, query, words) in EVERY_OPERATION.items():
        r = post(daemon, f"/gpu/{operation}?gpu_ids=3,1&block=true&{query}".replace("&&", "&"))
        assert (r.status, r.body) == (200, b""), (operation, r.body)
        expected = [["record", *(w.replace("G", str(gpu)) if "G" in w else w for w in words)] for gpu in (3, 1)]
        got = records(rec)[-2:]
        assert sorted(got) == sorted(expected), operation
    assert fake.calls(NVML_SETTERS) == []  # the GPU library was never asked to change anything
    assert fake.gpu(3).power_limit_mw == 700_000
    assert override_samples(daemon) == [f'zeusd_gpu_command_override{{operation="{op.name}"}} 1.0' for op in OPERATIONS]


def test_operations_without_an_override_still_use_the_gpu_library(
    start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    overrides = write_overrides(tmp_path / "o.toml", {"set_power_limit": {"commands": [f"{recorder(tmp_path, rec)} {{gpu_id}}"]}})
    daemon = start(start_daemon, fake, overrides, transport="tcp")
    assert daemon.client.get("/discover").json()["gpu_command_overrides"] == ["set_power_limit"]
    assert post(daemon, "/gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=600&max_clock_mhz=900&block=true").status == 200
    assert fake.gpu(0).gpu_locked_clocks == (600, 900)
    assert post(daemon, "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true").status == 200
    assert records(rec) == [["record", "0"]] and fake.gpu(0).power_limit_mw == 700_000
    assert override_samples(daemon) == ['zeusd_gpu_command_override{operation="set_power_limit"} 1.0']


def test_overrides_keep_the_per_gpu_order_of_native_commands(
    start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path
) -> None:
    """A slow override sits in the GPU's queue like a native command: what came after waits for it."""
    slow = recorder(tmp_path, tmp_path / "rec", "slow-power", body="sleep 0.3")
    overrides = write_overrides(tmp_path / "o.toml", {"set_power_limit": {"commands": [f"{slow} {{gpu_id}} {{power_limit_w}}"]}})
    daemon = start(start_daemon, fake, overrides)
    fake.clear_log()
    requests = [
        "/gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=600&max_clock_mhz=900&block=false",
        "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=false",
        "/gpu/reset_gpu_locked_clocks?gpu_ids=0&block=false",
        "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=310000&block=false",
        "/gpu/set_persistence_mode?gpu_ids=0&enabled=true&block=true",  # answers after all of the above ran
    ]
    for path in requests:
        assert post(daemon, path).status == 200
    order = [(c.name, c.args) for c in fake.calls() if c.name.startswith(("nvmlDeviceSet", "nvmlDeviceReset", "override:"))]
    assert order == [
        ("nvmlDeviceSetGpuLockedClocks", ("600", "900")),
        ("override:slow-power", ("0", "300")),
        ("nvmlDeviceResetGpuLockedClocks", ()),
        ("override:slow-power", ("0", "310")),
        ("nvmlDeviceSetPersistenceMode", ("1",)),
    ]


# Failures --------------------------------------------------------------------------------


def test_a_hung_command_is_killed_at_its_timeout_and_leaves_nothing(
    start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    hang = write_script(tmp_path, "hang", f"echo $$ > {pids}; sleep 30 & echo $! >> {pids}; wait")
    overrides = write_overrides(
        tmp_path / "o.toml", {"reset_gpu_locked_clocks": {"commands": [f"{hang} {{gpu_id}}"], "timeout_s": 1}}
    )
    daemon = start(start_daemon, fake, overrides)
    assert daemon.process is not None
    pid = daemon.process.pid
    pipes_before = pipes_of(pid)
    started = time.monotonic()
    r = post(daemon, "/gpu/reset_gpu_locked_clocks?gpu_ids=2&block=true")
    took = time.monotonic() - started
    assert r.status == 500 and 1.0 <= took < 3.0, (r.status, took)
    assert r.json() == {
        "errors": {"2": f"Override command failed: command '{hang} 2' timed out after 1 s and was killed; stdout: ; stderr: "}
    }
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert not running(shell) and gone_within(sleeper, 10)
    assert children_of(pid) == set()  # reaped: no zombie
    assert pipes_of(pid) == pipes_before
    # The GPU's queue goes on.
    assert post(daemon, "/gpu/set_power_limit?gpu_ids=2&power_limit_mw=300000&block=true").status == 200


def test_an_error_pattern_and_a_failing_command_in_the_middle(
    start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path
) -> None:
    rec = tmp_path / "rec"
    first, last = recorder(tmp_path, rec, "first"), recorder(tmp_path, rec, "last")
    refuses = write_script(tmp_path, "refuses", "echo 'clock 9999 MHz'; echo 'Error: not supported' >&2; exit 0")
    overrides = write_overrides(
        tmp_path / "o.toml",
        {
            "set_gpu_locked_clocks": {
                "commands": [f"{first} {{min_clock_mhz}}", f"{refuses} {{max_clock_mhz}}", f"{last}"],
                "error_pattern": "(?i)error|not supported",
            }
        },
    )
    daemon = start(start_daemon, fake, overrides)
    r = post(daemon, "/gpu/set_gpu_locked_clocks?gpu_ids=0&min_clock_mhz=500&max_clock_mhz=9999&block=true")
    message = (
        f"Override command failed: command '{refuses} 9999' succeeded but its output matched error_pattern "
        "'(?i)error|not supported'; stdout: clock 9999 MHz; stderr: Error: not supported"
    )
    assert (r.status, r.json()) == (500, {"errors": {"0": message}})
    assert records(rec) == [["first", "500"]]  # the third command never ran
    # Non-blocking: 200 at once; the failure is logged with the GPU and the parameters.
    assert post(daemon, "/gpu/set_gpu_locked_clocks?gpu_ids=1&min_clock_mhz=700&max_clock_mhz=800&block=false").status == 200
    wait_until(lambda: "GPU 1: GPU frequency set to [700, 800] MHz failed: Override command failed" in daemon.log(), "log")
    assert fake.calls("nvmlDeviceSetGpuLockedClocks") == []


HOSTILE_QUERIES = [
    "gpu_ids=0&power_limit_mw=300000;id&block=true",
    "gpu_ids=0&power_limit_mw=300000%20--force&block=true",
    "gpu_ids=0&power_limit_mw=300000%0Aid&block=true",
    "gpu_ids=0&power_limit_mw=$(id)&block=true",
    "gpu_ids=0&power_limit_mw=-300000&block=true",
    "gpu_ids=0&power_limit_mw=3e5&block=true",
    "gpu_ids=0&power_limit_mw=0x493e0&block=true",
    "gpu_ids=0&power_limit_mw=300000.0&block=true",
    "gpu_ids=0&power_limit_mw=99999999999&block=true",
    "gpu_ids=0&power_limit_mw=300000&power_limit_mw=1&block=true",
    "gpu_ids=0&power_limit_mw=300000&block=true&extra=--force",
    "gpu_ids=0;id&power_limit_mw=300000&block=true",
    "gpu_ids=0%20-rf&power_limit_mw=300000&block=true",
    "gpu_ids=9&power_limit_mw=300000&block=true",
    "gpu_ids=0&power_limit_mw=1&block=true",  # below the GPU's range: refused before anything is queued
]


def test_hostile_parameters_never_reach_a_command(start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    program = recorder(tmp_path, rec)
    overrides = write_overrides(
        tmp_path / "o.toml",
        {
            "set_power_limit": {"commands": [f"{program} --gpu={{gpu_id}} {{power_limit_mw}} {{power_limit_w}}"]},
            "set_persistence_mode": {"commands": [f"{program} {{enabled}}"]},
        },
    )
    daemon = start(start_daemon, fake, overrides)
    for query in HOSTILE_QUERIES:
        assert post(daemon, f"/gpu/set_power_limit?{query}").status == 400, query
    for value in ("yes", "True", "1;id", "true%20--x", "on"):
        assert post(daemon, f"/gpu/set_persistence_mode?gpu_ids=0&enabled={value}&block=true").status == 400, value
    assert records(rec) == []
    # What a valid request gives: the same number of words, each a number.
    assert post(daemon, "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=0300000&block=true").status == 200
    assert post(daemon, "/gpu/set_persistence_mode?gpu_ids=0&enabled=true&block=true").status == 200
    assert records(rec) == [["record", "--gpu=0", "300000", "300"], ["record", "1"]]


# Startup ---------------------------------------------------------------------------------


def startup_error(tmp_path: Path, *args: str) -> str:
    sock = tmp_path / "z.sock"
    r = run_zeusd(["serve", "--simulate", "--socket-path", str(sock), *args])
    assert r.returncode == 1, r.stdout
    assert not sock.exists()
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_bad_file_stops_startup_with_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "o.toml"
    write_overrides(path, {"set_power_limit": {"commands": ["true"], "timeout_s": 0}})
    assert startup_error(tmp_path, "--gpu-command-overrides", str(path)) == (
        f"Error: --gpu-command-overrides {path}: [set_power_limit] timeout_s: "
        "must be a whole number of seconds from 1 to 86400, got 0"
    )
    write_overrides(path, {"set_power_limit": {"commands": ["true {max_clock_mhz}"]}})
    assert startup_error(tmp_path, "--gpu-command-overrides", str(path)) == (
        f"Error: --gpu-command-overrides {path}: [set_power_limit] commands[0]: unknown placeholder {{max_clock_mhz}} "
        "in '{max_clock_mhz}'; this operation allows {gpu_id}, {power_limit_mw}, {power_limit_w}"
    )
    write_overrides(path, {"set_power_limit": {"commands": ["true"]}}, mode=0o646)
    assert startup_error(tmp_path, "--gpu-command-overrides", str(path)) == (
        f"Error: --gpu-command-overrides {path}: the file is writable by its group or by other users (mode 0646); "
        "remove their write permission (chmod go-w)"
    )


def test_a_program_someone_else_owns_stops_startup(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    program = write_script(tmp_path, "theirs", "exit 0")
    os.chown(program, 4321, -1)
    path = write_overrides(tmp_path / "o.toml", {"reset_locked_clocks": {"commands": [f"{program} {{gpu_id}}"]}})
    assert startup_error(tmp_path, "--gpu-command-overrides", str(path)) == (
        f"Error: --gpu-command-overrides {path}: [reset_locked_clocks] commands[0]: program {program} is owned by "
        "uid 4321; it must be owned by root or by the daemon's user (uid 0)"
    )


def test_overrides_are_ignored_without_gpu_control(start_daemon: DaemonFactory, fake: FakeNvml, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    overrides = write_overrides(tmp_path / "o.toml", {"set_power_limit": {"commands": [str(recorder(tmp_path, rec))]}})
    daemon = start_daemon("--enable", "gpu-read,metrics", "--gpu-command-overrides", str(overrides), env=fake.env())
    assert daemon.client.get("/discover").json()["gpu_command_overrides"] == []
    assert f"--gpu-command-overrides {overrides} is ignored: the gpu-control API group is not enabled" in daemon.log()
    assert post(daemon, "/gpu/set_power_limit?gpu_ids=0&power_limit_mw=300000&block=true").status == 404
    assert override_samples(daemon) == []
    assert records(rec) == []


# Without root ----------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can read (pytest's are root-only); the daemon's scripts live here."""
    with tempfile.TemporaryDirectory(prefix="zeusd-overrides-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_an_unprivileged_daemon_runs_gpu_control_through_its_overrides(
    open_dir: Path, processes: list[subprocess.Popen[Any]]
) -> None:
    """gpu-control without root: overridden operations run their commands; the rest are warned about."""
    # The stand-in's state and call log where nobody (the daemon and its commands) can reach them.
    fake = FakeNvml(open_dir / "nvml.state", open_dir / "nvml.log", build_library())
    fake.create(4)
    for path in (fake.state_path, open_dir / "nvml.log"):
        path.touch()
        os.chmod(path, 0o666)
    out = open_dir / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o1777)
    rec = out / "rec"
    overrides = write_overrides(
        open_dir / "o.toml", {"set_power_limit": {"commands": [f"{recorder(open_dir, rec)} {{gpu_id}} {{power_limit_w}}"]}}
    )
    port = free_tcp_port()
    argv, user = unprivileged_command(
        ["serve", "--enable", "gpu-control,gpu-read", "--gpu-command-overrides", str(overrides),
         "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{port}"]
    )  # fmt: skip
    log_path = open_dir / "log"
    with open(log_path, "wb") as log:
        p = subprocess.Popen(argv, user=user, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **fake.env()})
    processes.append(p)
    client = Client(Transport("tcp", port))
    discovery = wait_for_discover(client, p)
    if unprivileged_user() is not None:
        assert euid_of(p.pid) == unprivileged_user()
    assert discovery["gpu_command_overrides"] == ["set_power_limit"]
    assert client.post("/gpu/set_power_limit?gpu_ids=1&power_limit_mw=275000&block=true").status == 200
    assert records(rec) == [["record", "1", "275"]]
    assert fake.calls(NVML_SETTERS) == [] and fake.gpu(1).power_limit_mw != 275_000
    assert (
        "gpu-control runs without root for its overridden operations; set_persistence_mode, set_gpu_locked_clocks, "
        "reset_gpu_locked_clocks, set_mem_locked_clocks, reset_mem_locked_clocks, reset_locked_clocks still use the "
        "GPU library, which needs root"
    ) in log_path.read_text()
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0


def test_an_unprivileged_daemon_without_any_override_still_needs_root(open_dir: Path) -> None:
    overrides = open_dir / "o.toml"
    overrides.write_text("# no table\n")
    os.chmod(overrides, 0o644)
    argv, user = unprivileged_command(
        ["serve", "--enable", "gpu-control", "--gpu-command-overrides", str(overrides),
         "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}"]
    )  # fmt: skip
    r = subprocess.run(argv, user=user, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert [line for line in r.stderr.splitlines() if line.startswith("Error:")] == [
        "Error: API group 'gpu-control' requires root but zeusd is not running as root "
        "(run as root, drop the group with --enable, or use --simulate)"
    ]
