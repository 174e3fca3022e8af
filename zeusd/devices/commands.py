"""Run one external command the way a root daemon must: bounded in time and output, and cleaned up.

Used by the GPU command overrides (:mod:`zeusd.devices.gpu.overrides`). Blocks,
so it runs on a device's command thread, never on the reactor thread.

* No shell: ``argv`` goes to ``execve`` as given (a bare name is looked up in ``PATH``).
* Its own session and process group, stdin from ``/dev/null``, no inherited descriptors
  besides the three standard ones.
* A timeout kills the whole process group (``SIGKILL``), so helpers it started die with it.
* Output is read while it runs (a chatty command never blocks on a full pipe), and
  only the first :data:`CAPTURE_BYTES` of each stream are kept.
* The child is always reaped, and both pipes are always closed: a leftover process that
  still holds them after the command ended gets :data:`OUTPUT_GRACE_S`, then is left
  talking to a closed pipe.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Sequence

#: Bytes kept of each of stdout and stderr (the rest is read and dropped).
CAPTURE_BYTES = 64 * 1024
#: How long the pipes may stay open after the command exited or was killed.
OUTPUT_GRACE_S = 1.0
#: How often the loop checks whether the command exited while its pipes are quiet.
_TICK_S = 0.02
_READ_SIZE = 65536


@dataclass
class Captured:
    """The first :data:`CAPTURE_BYTES` of one output stream, and how much more there was."""

    data: bytearray
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = CAPTURE_BYTES - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class CommandOutcome:
    """How a command ended. Exactly one of ``spawn_error``, ``timed_out`` and an exit status holds."""

    argv: tuple[str, ...]
    #: The exit code, or ``-N`` when signal N ended it (as ``subprocess`` reports it).
    returncode: int | None
    timed_out: bool
    spawn_error: str | None
    stdout: Captured
    stderr: Captured
    #: The output was still open after the command ended (a leftover process holds it).
    output_abandoned: bool
    seconds: float

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.spawn_error is None

    def failure(self, timeout_s: float) -> str | None:
        """Why the command failed, as a phrase after ``command '<cmd>'``; None when it exited 0."""
        if self.spawn_error is not None:
            return f"could not be started: {self.spawn_error}"
        if self.timed_out:
            return f"timed out after {timeout_s:g} s and was killed"
        assert self.returncode is not None
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was killed by {name}"
        if self.returncode != 0:
            return f"exited with code {self.returncode}"
        return None


def run_command(argv: Sequence[str], timeout_s: float) -> CommandOutcome:
    """Run ``argv`` to its end or its timeout; never raises for anything the command does."""
    started = time.monotonic()
    out, err = Captured(bytearray()), Captured(bytearray())
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as e:
        reason = e.strerror or str(e)
        return CommandOutcome(tuple(argv), None, False, reason, out, err, False, time.monotonic() - started)
    assert process.stdout is not None and process.stderr is not None
    timed_out = abandoned = False
    try:
        timed_out, abandoned = _follow(process, {process.stdout: out, process.stderr: err}, started + timeout_s)
    finally:
        process.stdout.close()
        process.stderr.close()
        if process.returncode is None and _running(process.pid):
            _kill_group(process.pid)  # only when following it failed unexpectedly
        process.wait()
    return CommandOutcome(
        tuple(argv), process.returncode, timed_out, None, out, err, abandoned, time.monotonic() - started
    )


def _follow(process: subprocess.Popen[bytes], pipes: dict[IO[bytes], Captured], deadline: float) -> tuple[bool, bool]:
    """Read both pipes until they close, then wait for the exit: ``(timed out, output abandoned)``."""
    timed_out = False
    ended_at: float | None = None
    with selectors.DefaultSelector() as selector:
        for pipe, captured in pipes.items():
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe, selectors.EVENT_READ, captured)
        while selector.get_map():
            now = time.monotonic()
            if ended_at is None and not _running(process.pid):
                ended_at = now
            elif ended_at is None and now >= deadline:
                _kill_group(process.pid)
                timed_out, ended_at = True, now
            if ended_at is not None and now - ended_at >= OUTPUT_GRACE_S:
                return timed_out, True
            for key, _ in selector.select(_TICK_S):
                chunk = os.read(key.fd, _READ_SIZE)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fileobj)
    if ended_at is None:  # the pipes closed first: wait for the exit, up to the deadline
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            timed_out = True
    return timed_out, False


def _running(pid: int) -> bool:
    """Whether the child still runs; a child that exited is left unreaped (its pid stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # already reaped
        return False


def _kill_group(pid: int) -> None:
    """``SIGKILL`` the command's process group (its pid: it leads its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
