"""GPU command overrides: the operator's commands run in place of the GPU library.

``--gpu-command-overrides PATH`` names a TOML file with one optional table per
control operation (the names in :data:`zeusd.devices.gpu.control.OPERATIONS`)::

    [set_power_limit]
    commands = ["/usr/local/sbin/gpu-power {gpu_id} {power_limit_w}"]
    error_pattern = "(?i)error|not supported"   # optional: a match fails even on exit 0
    timeout_s = 20                               # optional, per command, default 60

Safety rests on three rules, all enforced at load time where they can be:

* The file, and every program given as a path, must be trusted (:mod:`zeusd.trust`).
* Commands are split into words once, here, and run without a shell. A
  placeholder is replaced inside its word, by the decimal digits of a typed
  request argument (integers, and booleans as ``1``/``0``), so a request can
  never add a word, an option or a shell construct. The program word itself
  holds no placeholder.
* Only the placeholders an operation's arguments define are accepted there:
  ``{gpu_id}`` everywhere, plus the fields of the operation's arguments
  dataclass and the values derived from them (``{power_limit_w}``).

An override runs where the operation's ``apply`` runs (the GPU manager's
command thread), so per-GPU order, ``block`` and logging are those of native
commands.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

from twisted.logger import Logger

from zeusd.devices.base import DeviceError
from zeusd.devices.commands import OUTPUT_GRACE_S, CommandOutcome, Captured, run_command
from zeusd.devices.gpu.base import GPU
from zeusd.devices.gpu.control import OPERATIONS, ControlOperation
from zeusd.errors import StartupError
from zeusd.lifecycle import OpenedAtStart
from zeusd.trust import Untrusted, check_trusted, check_trusted_program

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport (a dependency there)
    import tomli as tomllib

log = Logger()

FLAG = "--gpu-command-overrides"
DEFAULT_TIMEOUT_S = 60
MAX_TIMEOUT_S = 86400
KEYS = ("commands", "error_pattern", "timeout_s")
#: An override file is a few lines; anything this big is a mistake.
MAX_FILE_BYTES = 1024 * 1024
#: Characters of each output stream quoted in an error message.
MESSAGE_OUTPUT_CHARS = 1000

#: Placeholders computed from an argument field: name → (field, function).
DERIVED: dict[str, tuple[str, Callable[[int], int]]] = {
    "power_limit_w": ("power_limit_mw", lambda mw: mw // 1000),
}

_BY_NAME: dict[str, ControlOperation[Any]] = {op.name: op for op in OPERATIONS}
_PLACEHOLDER_SPLIT = re.compile(r"(\{[^{}]*\})")


class OverrideFileError(StartupError):
    """The override file cannot be used; the message names the file, the table and the key."""


# Placeholders -------------------------------------------------------------------------


def placeholders(operation: ControlOperation[Any]) -> tuple[str, ...]:
    """The placeholders an operation's commands may use: ``gpu_id``, its arguments, what derives from them."""
    names = ["gpu_id", *(f.name for f in fields(operation.arguments))]
    return (*names, *(name for name, (source, _) in DERIVED.items() if source in names))


def placeholder_values(gpu_id: int, arguments: Any) -> dict[str, str]:
    """Every placeholder's text for one run: decimal digits only, whatever the caller passed."""
    values = {"gpu_id": _digits(gpu_id)}
    for f in fields(arguments):
        value = getattr(arguments, f.name)
        values[f.name] = ("1" if value else "0") if type(value) is bool else _digits(value)
    for name, (source, derive) in DERIVED.items():
        if source in values:
            values[name] = _digits(derive(int(values[source])))
    return values


def _digits(value: object) -> str:
    if type(value) is not int or value < 0:
        # Unreachable through the API (arguments are parsed as u32); refuse rather than run.
        raise DeviceError(f"Override command refused: a placeholder value is not a non-negative integer ({type(value).__name__})", 500)
    return str(value)


def _substitute(word: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER_SPLIT.sub(lambda m: values[m.group(0)[1:-1]], word)


# One operation's override -------------------------------------------------------------


@dataclass(frozen=True)
class CommandOverride:
    """One table of the file: runs in place of the operation's ``apply``, on the GPU's command thread."""

    operation: str
    #: Each command as its words, placeholders still in place.
    commands: tuple[tuple[str, ...], ...]
    error_pattern: re.Pattern[str] | None
    timeout_s: int

    @property
    def longest_s(self) -> float:
        """The longest a run can take: every command up to its timeout, plus the output grace."""
        return len(self.commands) * (self.timeout_s + OUTPUT_GRACE_S)

    def __call__(self, gpu: GPU, arguments: Any) -> None:
        """Run the commands in order; the first failure raises DeviceError (500) and stops the rest."""
        values = placeholder_values(gpu.index, arguments)
        for words in self.commands:
            argv = [_substitute(word, values) for word in words]
            outcome = run_command(argv, self.timeout_s)
            reason = outcome.failure(self.timeout_s) or self._pattern_failure(outcome)
            if reason is not None:
                raise DeviceError(_failure_message(outcome, reason), 500)
            log.info(
                "GPU {gpu}: {operation} override command {command} succeeded ({seconds:.2f} s){note}",
                gpu=gpu.index,
                operation=self.operation,
                command=shlex.join(argv),
                seconds=outcome.seconds,
                note="; a leftover process still held its output" if outcome.output_abandoned else "",
            )

    def _pattern_failure(self, outcome: CommandOutcome) -> str | None:
        if self.error_pattern is None:
            return None
        if self.error_pattern.search(outcome.stdout.text() + "\n" + outcome.stderr.text()) is None:
            return None
        return f"succeeded but its output matched error_pattern '{self.error_pattern.pattern}'"


def _failure_message(outcome: CommandOutcome, reason: str) -> str:
    held = " (output cut: a leftover process still held it)" if outcome.output_abandoned else ""
    return (
        f"Override command failed: command '{shlex.join(outcome.argv)}' {reason}{held}; "
        f"stdout: {_quote_output(outcome.stdout)}; stderr: {_quote_output(outcome.stderr)}"
    )


def _quote_output(captured: Captured) -> str:
    text = captured.text().strip()
    more = captured.dropped
    if len(text) > MESSAGE_OUTPUT_CHARS:
        more += len(text[MESSAGE_OUTPUT_CHARS:].encode())
        text = text[:MESSAGE_OUTPUT_CHARS]
    return f"{text}… ({more} more bytes)" if more else text


# Loading ------------------------------------------------------------------------------


def load_overrides(path: str) -> dict[str, CommandOverride]:
    """Read, check and parse the file: operation name → override, in the operation table's order.

    Raises OverrideFileError naming the file, the table and the key.
    """
    try:
        # Non-blocking: a FIFO at the path is refused below instead of hanging startup.
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            # The checks and the read use the same open file: what is checked is what is read.
            check_trusted(os.fstat(f.fileno()), "the file")
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _error(path, f"cannot be read: {e.strerror}") from None
    except Untrusted as e:
        raise _error(path, str(e)) from None
    if len(data) > MAX_FILE_BYTES:
        raise _error(path, f"is over {MAX_FILE_BYTES} bytes; an override file is a few lines")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _error(path, "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise _error(path, f"is not valid TOML: {e}") from None
    for table in document:
        if table not in _BY_NAME:
            raise _error(path, f"[{table}]: unknown GPU control operation (known: {', '.join(_BY_NAME)})")
    overrides: dict[str, CommandOverride] = {}
    for name, operation in _BY_NAME.items():
        if name in document:
            try:
                overrides[name] = _parse_table(operation, document[name])
            except ValueError as e:
                raise _error(path, f"[{name}] {e}") from None
    return overrides


def _error(path: str, detail: str) -> OverrideFileError:
    return OverrideFileError(f"{FLAG} {path}: {detail}")


def _parse_table(operation: ControlOperation[Any], table: Any) -> CommandOverride:
    """One table; ValueError('<key>: <problem>') for the first problem found."""
    if not isinstance(table, dict):
        raise ValueError(f"must be a table with the keys {', '.join(KEYS)}")
    for key in table:
        if key not in KEYS:
            raise ValueError(f"{key}: unknown key (known: {', '.join(KEYS)})")
    if "commands" not in table:
        raise ValueError("commands: missing; give the command lines to run, in order")
    commands = table["commands"]
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise ValueError("commands: must be a list of command lines (strings)")
    if not commands:
        raise ValueError("commands: is empty; give at least one command line")
    allowed = placeholders(operation)
    parsed = tuple(_parse_command(f"commands[{i}]", line, allowed) for i, line in enumerate(commands))
    return CommandOverride(operation.name, parsed, _parse_pattern(table.get("error_pattern")), _parse_timeout(table))


def _parse_command(key: str, line: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(line))
    except ValueError as e:
        raise ValueError(f"{key}: cannot be split into words ({e}): {line!r}") from None
    if not words:
        raise ValueError(f"{key}: is empty")
    for word in words:
        _check_placeholders(key, word, allowed)
    program = words[0]
    if "{" in program:
        raise ValueError(f"{key}: the program {program!r} cannot hold a placeholder; put placeholders in its arguments")
    if "/" in program:
        if not os.path.isabs(program):
            raise ValueError(f"{key}: the program {program!r} must be an absolute path or a bare name found in PATH")
        try:
            check_trusted_program(program)
        except Untrusted as e:
            raise ValueError(f"{key}: program {e}") from None
    return words


def _check_placeholders(key: str, word: str, allowed: tuple[str, ...]) -> None:
    for i, part in enumerate(_PLACEHOLDER_SPLIT.split(word)):
        if i % 2 == 0:
            if "{" in part or "}" in part:
                raise ValueError(f"{key}: unmatched brace in {word!r} (placeholders are {{name}})")
            continue
        name = part[1:-1]
        if name not in allowed:
            raise ValueError(
                f"{key}: unknown placeholder {part} in {word!r}; this operation allows "
                + ", ".join("{" + a + "}" for a in allowed)
            )


def _parse_pattern(pattern: Any) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError("error_pattern: must be a string (a regular expression)")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"error_pattern: not a valid regular expression ({e}): {pattern!r}") from None


def _parse_timeout(table: dict[str, Any]) -> int:
    value = table.get("timeout_s", DEFAULT_TIMEOUT_S)
    if type(value) is not int or not 1 <= value <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s: must be a whole number of seconds from 1 to {MAX_TIMEOUT_S}, got {value!r}")
    return value


# The service --------------------------------------------------------------------------


class OverridesService(OpenedAtStart):
    """Loads the file at (privileged) start into the table the GPU manager reads.

    Started before the GPU service and the listeners, so no command is ever
    queued before the table is filled. Loading again here (``preflight``
    already checked the file) keeps the rule that building the tree does no I/O.
    """

    name = "gpu-command-overrides"

    def __init__(self, path: str, table: dict[str, CommandOverride]) -> None:
        self._path = path
        self.table = table

    def open(self) -> None:
        self.table.update(load_overrides(self._path))
        log.info(
            "GPU command overrides from {path}: {names}",
            path=self._path,
            names=", ".join(self.table) or "none (the file has no table)",
        )
