"""Override files and the scripts they name, written by the tests into temporary directories,
and what a process left behind after running them (read from /proc).

:func:`recorder` writes a shell script that appends one line per run to a record
file: its name, then every argument it received, separated by ``\\x1f``, so a
test sees exactly which words a command got. It also appends a line to the
stand-in NVML library's call log when ``FAKENVML_LOG`` is set (the daemon
passes its environment on), so native calls and override runs share one order.
"""

from __future__ import annotations

import json
import os
import select
from pathlib import Path
from typing import Any, Mapping

SEPARATOR = "\x1f"


def write_script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)
    return path


def recorder(directory: Path, record: Path, name: str = "record", body: str = "") -> Path:
    """A script that records its arguments (see the module docstring), then runs ``body``."""
    return write_script(
        directory,
        name,
        f"""line={name}
for a in "$@"; do line="$line$(printf '\\037')$a"; done
printf '%s\\n' "$line" >> '{record}'
if [ -n "$FAKENVML_LOG" ]; then printf 'override:{name} -1 %s\\n' "$*" >> "$FAKENVML_LOG"; fi
{body}""",
    )


def records(record: Path) -> list[list[str]]:
    """Every recorded run: ``[script name, arg1, arg2, ...]``."""
    if not record.exists():
        return []
    return [line.split(SEPARATOR) for line in record.read_text().splitlines()]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_overrides(path: Path, tables: Mapping[str, Mapping[str, Any]], mode: int = 0o644) -> Path:
    """A TOML file with one table per operation."""
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    os.chmod(path, mode)
    return path


# What a process left behind -----------------------------------------------------------------


def children_of(pid: int | str = "self") -> set[int]:
    """Every process whose parent is ``pid`` (zombies included)."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        found.update(int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def pipes_of(pid: int | str = "self") -> int:
    """How many pipe ends ``pid`` holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return count


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan may stay one under a non-reaping init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def gone_within(pid: int, timeout_s: float) -> bool:
    """The process has exited (or is a zombie) within ``timeout_s``: a SIGKILLed process of a killed
    group exits once it is scheduled, so right after the kill it may still be there. Waits on a pidfd
    (readable when the process exits), not by polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable) or not running(pid)
    finally:
        os.close(fd)
