"""Running override commands: real processes, in this process (no daemon).

What a run leaves behind is checked through /proc: no child of ours (no
zombie) and no pipe left open.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.task import Clock

from tests.manual import ManualExecutors, outcome
from tests.override_files import (
    children_of, gone_within, pipes_of, recorder, records, running, write_overrides, write_script,
)  # fmt: skip
from zeusd.devices.base import DeviceError
from zeusd.devices.commands import CAPTURE_BYTES, OUTPUT_GRACE_S, run_command
from zeusd.devices.gpu.control import RESET_GPU_LOCKED_CLOCKS, SET_POWER_LIMIT, ClockRange, NoArguments, PowerLimit
from zeusd.devices.gpu.manager import DEVICE_TIMEOUT_S, GpuManager
from zeusd.devices.gpu.overrides import MESSAGE_OUTPUT_CHARS, CommandOverride, load_overrides
from zeusd.devices.gpu.simulated import SimulatedGPUBackend


@dataclass
class Gpu:
    """What an override reads of its GPU: the index (``{gpu_id}``)."""

    index: int


@contextmanager
def leaves_nothing() -> Iterator[None]:
    """What runs inside leaves no child process (no zombie) and no open pipe behind.

    Used inside the test body: pytest-twisted starts the reactor, with its
    waker pipe, when the first test is called, after the fixtures ran.
    """
    before_children, before_pipes = children_of(), pipes_of()
    yield
    assert children_of() - before_children == set()
    assert pipes_of() == before_pipes


def override(tmp_path: Path, operation: str, commands: list[str], **keys: object) -> CommandOverride:
    path = write_overrides(tmp_path / "o.toml", {operation: {"commands": commands, **keys}})
    return load_overrides(str(path))[operation]


def failure(run: CommandOverride, gpu: int, arguments: object) -> str:
    with pytest.raises(DeviceError) as info:
        run(Gpu(gpu), arguments)  # type: ignore[arg-type]
    assert info.value.status == 500
    return info.value.message


# run_command ------------------------------------------------------------------------------


def test_exit_status_and_output_are_reported(tmp_path: Path) -> None:
    script = write_script(tmp_path, "fail", "echo to-stdout; echo to-stderr >&2; exit 7")
    with leaves_nothing():
        outcome = run_command([str(script)], 5)
    assert (outcome.returncode, outcome.timed_out, outcome.spawn_error, outcome.output_abandoned) == (7, False, None, False)
    assert (outcome.stdout.text(), outcome.stderr.text()) == ("to-stdout\n", "to-stderr\n")
    assert outcome.failure(5) == "exited with code 7"


def test_stdin_is_empty_and_only_the_standard_descriptors_are_inherited(tmp_path: Path) -> None:
    script = write_script(tmp_path, "fds", "cat; ls /proc/$$/fd")
    r, w = os.pipe()
    os.set_inheritable(r, True)  # even a descriptor marked inheritable stays out of the command
    try:
        with leaves_nothing():
            outcome = run_command([str(script)], 5)
    finally:
        os.close(r)
        os.close(w)
    assert outcome.succeeded
    # cat read EOF at once; besides 0, 1 and 2 the shell holds only the script it reads (one more).
    fds = outcome.stdout.text().split()
    assert str(r) not in fds and str(w) not in fds
    assert {"0", "1", "2"} <= set(fds) and len(fds) <= 4, fds


def test_output_is_read_while_it_runs_and_kept_bounded(tmp_path: Path) -> None:
    script = write_script(tmp_path, "chatty", "head -c 1000000 /dev/zero | tr '\\0' x; echo oops >&2; exit 1")
    with leaves_nothing():
        outcome = run_command([str(script)], 10)
    assert outcome.returncode == 1
    assert len(outcome.stdout.data) == CAPTURE_BYTES and outcome.stdout.dropped == 1_000_000 - CAPTURE_BYTES
    assert outcome.stderr.text() == "oops\n"


def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = write_script(tmp_path, "hang", f"echo $$ > {pids}; sleep 30 & echo $! >> {pids}; echo started; wait")
    with leaves_nothing():
        started = time.monotonic()
        outcome = run_command([str(script)], 1)
        took = time.monotonic() - started
    assert outcome.timed_out and outcome.failure(1) == "timed out after 1 s and was killed"
    assert 1.0 <= took < 1.0 + OUTPUT_GRACE_S, took
    assert outcome.stdout.text() == "started\n"
    shell, sleeper = (int(p) for p in pids.read_text().split())
    assert not running(shell) and gone_within(sleeper, 10)


def test_a_leftover_holding_the_output_is_abandoned_after_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = write_script(tmp_path, "leaves", f"sleep 30 & echo $! > {pid_file}; echo done")
    try:
        with leaves_nothing():
            started = time.monotonic()
            outcome = run_command([str(script)], 10)
            took = time.monotonic() - started
        assert outcome.succeeded and outcome.output_abandoned
        assert outcome.stdout.text() == "done\n"
        assert OUTPUT_GRACE_S <= took < OUTPUT_GRACE_S + 1, took
    finally:
        os.kill(int(pid_file.read_text()), 9)


def test_a_signal_and_a_missing_program_are_reported(tmp_path: Path) -> None:
    script = write_script(tmp_path, "suicide", "kill -TERM $$")
    with leaves_nothing():
        assert run_command([str(script)], 5).failure(5) == "was killed by SIGTERM"
        missing = run_command([str(tmp_path / "missing")], 5)
        assert missing.failure(5) == "could not be started: No such file or directory"
        assert run_command(["no-such-program-zeusd"], 5).failure(5) == "could not be started: No such file or directory"


# CommandOverride ---------------------------------------------------------------------------


def test_placeholders_fill_their_words_and_nothing_else(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    script = recorder(tmp_path, rec)
    run = override(
        tmp_path, "set_power_limit",
        [f"{script} {{gpu_id}} --mw={{power_limit_mw}} '{{power_limit_w}} W' '$(id) ; {{gpu_id}}'"],
    )  # fmt: skip
    with leaves_nothing():
        run(Gpu(2), PowerLimit(253_999))  # type: ignore[arg-type]
    assert records(rec) == [["record", "2", "--mw=253999", "253 W", "$(id) ; 2"]]


def test_commands_run_in_order_and_the_first_failure_stops_the_rest(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    first, third = recorder(tmp_path, rec, "first"), recorder(tmp_path, rec, "third")
    middle = write_script(tmp_path, "middle", "echo applying; echo 'no such clock' >&2; exit 3")
    run = override(tmp_path, "set_gpu_locked_clocks", [f"{first} {{min_clock_mhz}}", f"{middle} {{max_clock_mhz}}", f"{third}"])
    with leaves_nothing():
        message = failure(run, 0, ClockRange(500, 1500))
    assert message == (
        f"Override command failed: command '{middle} 1500' exited with code 3; stdout: applying; stderr: no such clock"
    )
    assert records(rec) == [["first", "500"]]


def test_an_error_pattern_fails_a_command_that_exited_0(tmp_path: Path) -> None:
    quiet = write_script(tmp_path, "quiet", "echo ok")
    noisy = write_script(tmp_path, "noisy", "echo 'Setting clocks...'; echo 'ERROR: not supported' >&2")
    pattern = "(?i)error|not supported"
    override(tmp_path, "reset_locked_clocks", [str(quiet)], error_pattern=pattern)(Gpu(0), NoArguments())  # type: ignore[arg-type]
    message = failure(override(tmp_path, "reset_locked_clocks", [str(quiet), str(noisy)], error_pattern=pattern), 0, NoArguments())
    assert message == (
        f"Override command failed: command '{noisy}' succeeded but its output matched error_pattern '{pattern}'; "
        "stdout: Setting clocks...; stderr: ERROR: not supported"
    )


def test_the_failure_message_is_bounded(tmp_path: Path) -> None:
    chatty = write_script(tmp_path, "chatty", "head -c 200000 /dev/zero | tr '\\0' e; exit 1")
    message = failure(override(tmp_path, "reset_locked_clocks", [str(chatty)]), 0, NoArguments())
    assert len(message) < MESSAGE_OUTPUT_CHARS + 300
    assert message.endswith(f"… ({200000 - MESSAGE_OUTPUT_CHARS} more bytes); stderr: ")


def test_a_timeout_names_the_command(tmp_path: Path) -> None:
    with leaves_nothing():
        message = failure(override(tmp_path, "reset_gpu_locked_clocks", ["sleep 30 {gpu_id}"], timeout_s=1), 3, NoArguments())
    assert message == "Override command failed: command 'sleep 30 3' timed out after 1 s and was killed; stdout: ; stderr: "


# In the GPU manager (task.Clock, manual executors) ---------------------------------------


def test_the_manager_runs_an_override_on_the_gpus_queue_and_waits_as_long_as_it_may_take(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    path = write_overrides(
        tmp_path / "o.toml", {"set_power_limit": {"commands": [f"{recorder(tmp_path, rec)} {{gpu_id}} {{power_limit_w}}"], "timeout_s": 10}}
    )
    clock, executors = Clock(), ManualExecutors()
    manager = GpuManager(clock, executors, load_overrides(str(path)))
    manager.open(SimulatedGPUBackend(2).gpus)
    assert manager.overridden == ["set_power_limit"]

    override_d = manager.wait(1, manager.submit(1, SET_POWER_LIMIT, PowerLimit(300_000)), SET_POWER_LIMIT)
    native_d = manager.wait(1, manager.submit(1, RESET_GPU_LOCKED_CLOCKS, NoArguments()), RESET_GPU_LOCKED_CLOCKS)
    assert records(rec) == [] and manager.pending(1) == 2  # queued, in order, on GPU 1's command executor

    clock.advance(DEVICE_TIMEOUT_S)  # a native command's bound is the device timeout ...
    native = outcome(native_d)
    assert isinstance(native, DeviceError)
    assert native.message == "GPU 1 did not finish the command within 5 s; it stays queued and will still be applied."
    clock.advance(10 + OUTPUT_GRACE_S - 0.01)  # ... an override's adds its commands' timeouts and the output grace
    assert not override_d.called
    clock.advance(0.02)
    assert outcome(override_d).message == "GPU 1 did not finish the command within 16 s; it stays queued and will still be applied."

    executors["zeusd-gpu-1"].run_next()  # the override's turn on the GPU's own thread
    assert records(rec) == [["record", "1", "300"]]
    assert manager.gpus[1].get_power_limit_mw() != 300_000  # the GPU library was not asked

