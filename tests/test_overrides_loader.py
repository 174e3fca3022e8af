"""The override file loader: what it accepts, and the exact message for what it refuses.

Every file here is a real file in a temporary directory, read by the real
loader with its trust checks (the tests run as root: other owners come from
``os.chown``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.override_files import write_overrides, write_script
from zeusd.devices.base import DeviceError
from zeusd.devices.gpu.control import OPERATIONS, ClockRange, NoArguments, Persistence, PowerLimit
from zeusd.devices.gpu.overrides import (
    DEFAULT_TIMEOUT_S,
    OverrideFileError,
    load_overrides,
    placeholder_values,
    placeholders,
)

OTHER_UID = 4321


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    return d


@pytest.fixture
def tool(bin_dir: Path) -> Path:
    return write_script(bin_dir, "tool", "exit 0")


def load(path: Path) -> dict[str, Any]:
    return load_overrides(str(path))


def refusal(path: Path) -> str:
    with pytest.raises(OverrideFileError) as info:
        load_overrides(str(path))
    return str(info.value)


def test_every_operation_loads_in_table_order_with_its_defaults(tmp_path: Path, tool: Path) -> None:
    names = [op.name for op in OPERATIONS]
    tables: dict[str, dict[str, Any]] = {name: {"commands": [f"{tool} {{gpu_id}}"]} for name in reversed(names)}
    tables["reset_locked_clocks"] = {"commands": [f"{tool} a", "true"], "timeout_s": 7, "error_pattern": "(?i)fail"}
    overrides = load(write_overrides(tmp_path / "o.toml", tables))
    assert list(overrides) == names
    assert overrides["set_power_limit"].timeout_s == DEFAULT_TIMEOUT_S == 60
    assert overrides["set_power_limit"].error_pattern is None
    reset = overrides["reset_locked_clocks"]
    assert reset.commands == ((str(tool), "a"), ("true",))
    assert reset.timeout_s == 7 and reset.error_pattern is not None and reset.error_pattern.pattern == "(?i)fail"


def test_a_file_without_tables_overrides_nothing(tmp_path: Path) -> None:
    path = tmp_path / "o.toml"
    path.write_text("# nothing yet\n")
    os.chmod(path, 0o644)
    assert load(path) == {}


def test_commands_are_split_into_words_once_like_a_shell_would(tmp_path: Path, tool: Path) -> None:
    line = f"""{tool} --gpu={{gpu_id}} 'two words' "w={{power_limit_w}} W" a\\ b ';' '$(id)' '>' x"""
    overrides = load(write_overrides(tmp_path / "o.toml", {"set_power_limit": {"commands": [line]}}))
    assert overrides["set_power_limit"].commands == (
        (str(tool), "--gpu={gpu_id}", "two words", "w={power_limit_w} W", "a b", ";", "$(id)", ">", "x"),
    )


def test_each_operation_allows_its_own_placeholders() -> None:
    assert {op.name: placeholders(op) for op in OPERATIONS} == {
        "set_persistence_mode": ("gpu_id", "enabled"),
        "set_power_limit": ("gpu_id", "power_limit_mw", "power_limit_w"),
        "set_gpu_locked_clocks": ("gpu_id", "min_clock_mhz", "max_clock_mhz"),
        "reset_gpu_locked_clocks": ("gpu_id",),
        "set_mem_locked_clocks": ("gpu_id", "min_clock_mhz", "max_clock_mhz"),
        "reset_mem_locked_clocks": ("gpu_id",),
        "reset_locked_clocks": ("gpu_id",),
    }


def test_placeholder_values_are_digits_from_typed_arguments() -> None:
    assert placeholder_values(3, PowerLimit(253_999)) == {"gpu_id": "3", "power_limit_mw": "253999", "power_limit_w": "253"}
    assert placeholder_values(0, Persistence(True)) == {"gpu_id": "0", "enabled": "1"}
    assert placeholder_values(0, Persistence(False))["enabled"] == "0"
    assert placeholder_values(7, ClockRange(500, 1700)) == {"gpu_id": "7", "min_clock_mhz": "500", "max_clock_mhz": "1700"}
    assert placeholder_values(1, NoArguments()) == {"gpu_id": "1"}


@pytest.mark.parametrize("value", ["250000; id", "-1", -1, 2.5, None, b"1"])
def test_anything_but_a_non_negative_integer_is_refused_before_running(value: Any) -> None:
    """The API only ever passes parsed u32 values; anything else is refused, and never echoed."""
    with pytest.raises(DeviceError) as info:
        placeholder_values(0, PowerLimit(value))
    assert info.value.status == 500
    assert info.value.message == (
        "Override command refused: a placeholder value is not a non-negative integer "
        f"({type(value).__name__})"
    )


# The messages: file, table, key, problem -------------------------------------------------

TOOL = "@TOOL@"  # replaced by the trusted test program's path

BAD_FILES: list[tuple[str, str, str]] = [
    ("unknown table", "[set_fan_speed]\ncommands = ['@TOOL@']\n",
     "[set_fan_speed]: unknown GPU control operation (known: set_persistence_mode, set_power_limit, "
     "set_gpu_locked_clocks, reset_gpu_locked_clocks, set_mem_locked_clocks, reset_mem_locked_clocks, reset_locked_clocks)"),
    ("top-level key", "commands = ['@TOOL@']\n", "[commands]: unknown GPU control operation (known: "),
    ("table is a value", "set_power_limit = 3\n", "[set_power_limit] must be a table with the keys commands, error_pattern, timeout_s"),
    ("unknown key", "[set_power_limit]\ncommands = ['@TOOL@']\nworking_dir = '/tmp'\n",
     "[set_power_limit] working_dir: unknown key (known: commands, error_pattern, timeout_s)"),
    ("no commands", "[set_power_limit]\ntimeout_s = 5\n", "[set_power_limit] commands: missing; give the command lines to run, in order"),
    ("empty commands", "[set_power_limit]\ncommands = []\n", "[set_power_limit] commands: is empty; give at least one command line"),
    ("commands a string", "[set_power_limit]\ncommands = '@TOOL@'\n", "[set_power_limit] commands: must be a list of command lines (strings)"),
    ("command a number", "[set_power_limit]\ncommands = ['@TOOL@', 5]\n", "[set_power_limit] commands: must be a list of command lines (strings)"),
    ("blank command", "[reset_locked_clocks]\ncommands = ['@TOOL@', '  ']\n", "[reset_locked_clocks] commands[1]: is empty"),
    ("unsplittable", "[reset_locked_clocks]\ncommands = [\"@TOOL@ 'open\"]\n",
     "[reset_locked_clocks] commands[0]: cannot be split into words (No closing quotation): \"@TOOL@ 'open\""),
    ("foreign placeholder", "[set_power_limit]\ncommands = ['@TOOL@ --value={max_clock_mhz}']\n",
     "[set_power_limit] commands[0]: unknown placeholder {max_clock_mhz} in '--value={max_clock_mhz}'; "
     "this operation allows {gpu_id}, {power_limit_mw}, {power_limit_w}"),
    ("enabled on a reset", "[reset_gpu_locked_clocks]\ncommands = ['@TOOL@ {enabled}']\n",
     "[reset_gpu_locked_clocks] commands[0]: unknown placeholder {enabled} in '{enabled}'; this operation allows {gpu_id}"),
    ("power in clocks", "[set_mem_locked_clocks]\ncommands = ['@TOOL@ {power_limit_w}']\n",
     "[set_mem_locked_clocks] commands[0]: unknown placeholder {power_limit_w} in '{power_limit_w}'; "
     "this operation allows {gpu_id}, {min_clock_mhz}, {max_clock_mhz}"),
    ("empty placeholder", "[reset_locked_clocks]\ncommands = ['@TOOL@ {}']\n",
     "[reset_locked_clocks] commands[0]: unknown placeholder {} in '{}'; this operation allows {gpu_id}"),
    ("stray close", "[reset_locked_clocks]\ncommands = ['@TOOL@ value}']\n",
     "[reset_locked_clocks] commands[0]: unmatched brace in 'value}' (placeholders are {name})"),
    ("unclosed", "[reset_locked_clocks]\ncommands = ['@TOOL@ {gpu_id']\n",
     "[reset_locked_clocks] commands[0]: unmatched brace in '{gpu_id' (placeholders are {name})"),
    ("doubled", "[reset_locked_clocks]\ncommands = ['@TOOL@ {{gpu_id}']\n",
     "[reset_locked_clocks] commands[0]: unmatched brace in '{{gpu_id}' (placeholders are {name})"),
    ("placeholder program", "[reset_locked_clocks]\ncommands = ['/usr/local/bin/gpu{gpu_id}.sh']\n",
     "[reset_locked_clocks] commands[0]: the program '/usr/local/bin/gpu{gpu_id}.sh' cannot hold a placeholder; "
     "put placeholders in its arguments"),
    ("relative program", "[reset_locked_clocks]\ncommands = ['bin/tool']\n",
     "[reset_locked_clocks] commands[0]: the program 'bin/tool' must be an absolute path or a bare name found in PATH"),
    ("timeout zero", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = 0\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got 0"),
    ("timeout negative", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = -5\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got -5"),
    ("timeout float", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = 1.5\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got 1.5"),
    ("timeout bool", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = true\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got True"),
    ("timeout string", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = '10'\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got '10'"),
    ("timeout huge", "[set_power_limit]\ncommands = ['@TOOL@']\ntimeout_s = 86401\n",
     "[set_power_limit] timeout_s: must be a whole number of seconds from 1 to 86400, got 86401"),
    ("bad regex", "[set_power_limit]\ncommands = ['@TOOL@']\nerror_pattern = '(unclosed'\n",
     "[set_power_limit] error_pattern: not a valid regular expression (missing ), unterminated subpattern at position 0): "
     "'(unclosed'"),
    ("regex not a string", "[set_power_limit]\ncommands = ['@TOOL@']\nerror_pattern = 1\n",
     "[set_power_limit] error_pattern: must be a string (a regular expression)"),
    ("not TOML", "[set_power_limit\ncommands = ['@TOOL@']\n", "is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 17)"),
    ("duplicate table", "[reset_locked_clocks]\ncommands = ['@TOOL@']\n[reset_locked_clocks]\ncommands = ['@TOOL@']\n",
     "is not valid TOML: Cannot declare ('reset_locked_clocks',) twice (at line 3, column 21)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [(t, m) for _, t, m in BAD_FILES], ids=[i for i, _, _ in BAD_FILES])
def test_a_bad_file_is_refused_naming_the_file_table_and_key(tmp_path: Path, tool: Path, text: str, message: str) -> None:
    path = tmp_path / "o.toml"
    path.write_text(text.replace(TOOL, str(tool)))
    os.chmod(path, 0o644)
    got = refusal(path)
    assert got.startswith(f"--gpu-command-overrides {path}: "), got
    assert message.replace(TOOL, str(tool)) in got


def test_a_missing_binary_or_special_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert refusal(missing) == f"--gpu-command-overrides {missing}: cannot be read: No such file or directory"
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[set_power_limit]\n")
    os.chmod(binary, 0o644)
    assert refusal(binary) == f"--gpu-command-overrides {binary}: is not UTF-8 text"
    assert refusal(tmp_path) == f"--gpu-command-overrides {tmp_path}: cannot be read: Is a directory"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)  # no writer: opening it must not hang
    assert refusal(fifo) == f"--gpu-command-overrides {fifo}: the file is not a regular file"


# Trust --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o444])
def test_a_file_only_its_owner_can_write_is_trusted(tmp_path: Path, tool: Path, mode: int) -> None:
    path = write_overrides(tmp_path / "o.toml", {"reset_locked_clocks": {"commands": [str(tool)]}}, mode=mode)
    assert list(load(path)) == ["reset_locked_clocks"]


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620, 0o602])
def test_a_file_others_can_write_is_refused(tmp_path: Path, tool: Path, mode: int) -> None:
    path = write_overrides(tmp_path / "o.toml", {"reset_locked_clocks": {"commands": [str(tool)]}}, mode=mode)
    assert refusal(path) == (
        f"--gpu-command-overrides {path}: the file is writable by its group or by other users "
        f"(mode {mode:04o}); remove their write permission (chmod go-w)"
    )


def test_a_file_owned_by_another_user_is_refused(tmp_path: Path, tool: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = write_overrides(tmp_path / "o.toml", {"reset_locked_clocks": {"commands": [str(tool)]}})
    os.chown(path, OTHER_UID, -1)
    assert refusal(path) == (
        f"--gpu-command-overrides {path}: the file is owned by uid {OTHER_UID}; "
        "it must be owned by root or by the daemon's user (uid 0)"
    )
    os.chown(path, 0, OTHER_UID)  # another group owning it is fine while it cannot write
    assert list(load(path)) == ["reset_locked_clocks"]


def program_refusal(tmp_path: Path, program: Path | str) -> str:
    path = write_overrides(tmp_path / "o.toml", {"set_power_limit": {"commands": ["true", f"{program} {{power_limit_w}}"]}})
    message = refusal(path)
    prefix = f"--gpu-command-overrides {path}: [set_power_limit] commands[1]: program "
    assert message.startswith(prefix), message
    return message[len(prefix) :]


def test_a_program_others_can_write_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    program = write_script(bin_dir, "writable", "exit 0", mode=0o775)
    assert program_refusal(tmp_path, program) == (
        f"{program} is writable by its group or by other users (mode 0775); remove their write permission (chmod go-w)"
    )


def test_a_program_owned_by_another_user_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    program = write_script(bin_dir, "theirs", "exit 0")
    os.chown(program, OTHER_UID, -1)
    assert program_refusal(tmp_path, program) == (
        f"{program} is owned by uid {OTHER_UID}; it must be owned by root or by the daemon's user (uid 0)"
    )


def test_a_program_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    program = write_script(shared, "tool", "exit 0")
    os.chmod(shared, 0o777)
    assert program_refusal(tmp_path, program) == (
        f"{program}: its directory {shared} is writable by other users (mode 0777), so they could replace the program"
    )
    os.chmod(shared, 0o1777)  # sticky, like /tmp: others cannot replace our file
    assert list(load(tmp_path / "o.toml")) == ["set_power_limit"]


def test_a_program_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    program = write_script(theirs, "tool", "exit 0")
    os.chown(theirs, OTHER_UID, -1)
    assert program_refusal(tmp_path, program) == (
        f"{program}: its directory {theirs} is owned by uid {OTHER_UID}; "
        "it must be owned by root or by the daemon's user (uid 0)"
    )


def test_a_link_is_judged_by_what_it_points_to(tmp_path: Path, bin_dir: Path) -> None:
    target = write_script(bin_dir, "target", "exit 0", mode=0o777)
    link = bin_dir / "link"
    link.symlink_to(target)
    assert program_refusal(tmp_path, link) == (
        f"{link} (-> {target}) is writable by its group or by other users (mode 0777); "
        "remove their write permission (chmod go-w)"
    )


def test_a_missing_directory_or_plain_file_program_is_refused(tmp_path: Path, bin_dir: Path) -> None:
    assert program_refusal(tmp_path, bin_dir / "missing") == f"{bin_dir / 'missing'}: No such file or directory"
    assert program_refusal(tmp_path, bin_dir) == f"{bin_dir} is not a regular file"
    data = write_script(bin_dir, "data", "exit 0", mode=0o644)
    assert program_refusal(tmp_path, data) == f"{data} is not executable (mode 0644)"


def test_a_bare_program_name_is_found_in_path_when_it_runs(tmp_path: Path) -> None:
    assert shutil.which("true") is not None
    path = write_overrides(tmp_path / "o.toml", {"reset_locked_clocks": {"commands": ["true"]}})
    assert load(path)["reset_locked_clocks"].commands == (("true",),)
