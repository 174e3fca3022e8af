"""The ``zeusd`` console command, ``twist zeusd`` and ``twistd -y tac/zeusd.tac`` as real subprocesses.

Covers spec §12: usage errors (exit 2), startup errors (exit 1), ``token issue``
(§12.8), the per-group root requirement (§12.3 step 4) and orderly shutdown on
SIGTERM (§12.7) for every way of running the daemon.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jwt
import pytest

from tests.daemon import (
    REPO, Client, Transport, euid_of, free_tcp_port, unprivileged_command, unprivileged_user, wait_for_discover,
    write_signing_key,
)  # fmt: skip

BIN = Path(sys.executable).parent
ZEUSD = BIN / "zeusd"
TWIST = BIN / "twist"
TWISTD = BIN / "twistd"

SERVE_FLAGS = [
    "--mode", "--socket-path", "--socket-permissions", "--socket-uid", "--socket-gid", "--tcp-bind-address",
    "--num-workers", "--gpu-power-poll-hz", "--cpu-power-poll-hz", "--enable", "--signing-key-path",
    "--rapl-root", "--simulate",
]


def zeusd(*args: str, env: Mapping[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, the way an operator does."""
    if not ZEUSD.exists():
        pytest.skip(f"console script {ZEUSD} is not installed")
    return subprocess.run(
        [str(ZEUSD), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]



# --------------------------------------------------------------------------- help, version, usage errors


def test_help_and_version() -> None:
    r = zeusd("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "token" in r.stdout
    r = zeusd("serve", "--help")
    assert r.returncode == 0
    for flag in SERVE_FLAGS:
        assert flag in r.stdout, flag
    r = zeusd("token", "issue", "--help")
    assert r.returncode == 0
    for flag in ("--signing-key-path", "--user", "--scope", "--expires"):
        assert flag in r.stdout
    for args in (["--version"], ["-V"]):
        r = zeusd(*args)
        assert r.returncode == 0 and r.stdout.strip() == "zeusd 0.4.0"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "command"),
        (["token"], "issue"),
        (["bogus"], "bogus"),
        (["serve", "--bogus"], "--bogus"),
        (["--bogus"], "--bogus"),
        (["serve", "--mode", "foo"], "foo"),
        (["serve", "--gpu-power-poll-hz", "0"], "--gpu-power-poll-hz"),
        (["serve", "--gpu-power-poll-hz", "abc"], "abc"),
        (["serve", "--cpu-power-poll-hz", "-1"], "--cpu-power-poll-hz"),
        (["serve", "--enable", "bogus"], "bogus"),
        (["serve", "--enable", "gpu-read,"], "--enable"),
        (["serve", "--enable", "GPU-READ"], "GPU-READ"),
        (["serve", "--socket-permissions", "999"], "999"),
        (["serve", "--socket-permissions", "rw-"], "rw-"),
        (["serve", "--socket-uid", "root"], "--socket-uid"),
        (["serve", "--num-workers", "0"], "--num-workers"),
        (["serve", "--tcp-bind-address", "127.0.0.1"], "--tcp-bind-address"),
        (["serve", "--tcp-bind-address", "127.0.0.1:99999"], "--tcp-bind-address"),
        (["serve", "--mode"], "mode"),
        (["token", "issue", "--user", "a", "--expires", "1h"], "--signing-key-path"),
        (
            ["token", "issue", "--signing-key-path", "k", "--user", "a", "--expires", "1h"],
            "--scope is required (a token without scopes can do nothing): gpu-control, gpu-read, cpu-read, metrics",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_exit_2(args: list[str], needle: str) -> None:
    r = zeusd(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_log_level_stops_serve_naming_the_choices(tmp_path: Path) -> None:
    r = zeusd("serve", "--simulate", "--socket-path", str(tmp_path / "s.sock"), env={"ZEUSD_LOG_LEVEL": " Loud "})
    assert r.returncode == 1 and r.stdout == "" and not (tmp_path / "s.sock").exists()
    assert r.stderr.splitlines() == ["Error: ZEUSD_LOG_LEVEL='loud' is not one of: debug, info, warn, error, critical"]


@pytest.mark.parametrize("command", ["serve", "token issue"])
def test_single_valued_flags_may_not_be_repeated(tmp_path: Path, command: str) -> None:
    # Both variants fail fast on the missing key file if the repeat is not caught first.
    missing = str(tmp_path / "missing.key")
    if command == "serve":
        args = ["serve", "--simulate", "--socket-path", str(tmp_path / "s.sock"),
                "--mode", "uds", "--mode", "uds", "--signing-key-path", missing]
        repeated = "--mode"
    else:
        args = ["token", "issue", "--signing-key-path", missing, "--user", "a", "--user", "b", "--expires", "1h"]
        repeated = "--user"
    r = zeusd(*args, timeout=20)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"zeusd: error: {repeated} cannot be used multiple times", f"see: zeusd {command} --help"]


# --------------------------------------------------------------------------- token issue


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    write_signing_key(path)
    return path


def issue(key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``zeusd token issue`` with this key (and ``--scope gpu-read`` unless the test gives scopes)."""
    scope = () if "--scope" in args else ("--scope", "gpu-read")
    return zeusd("token", "issue", "--signing-key-path", str(key_file), *args, *scope)


def test_token_issue_prints_only_the_token(key_file: Path) -> None:
    before = time.time()
    r = issue(key_file, "--user", "alice", "--scope", "gpu-read,cpu-read", "--expires", "1h")
    after = time.time()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1
    token = r.stdout[:-1]
    assert token.count(".") == 2 and "=" not in token
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "HS256"}
    claims = jwt.decode(token, key_file.read_bytes(), algorithms=["HS256"])
    assert list(claims) == ["sub", "scopes", "exp"]
    assert claims["sub"] == "alice" and claims["scopes"] == ["gpu-read", "cpu-read"]
    assert int(before) + 3600 <= claims["exp"] <= int(after) + 3600


@pytest.mark.parametrize("expires", ["never", "0", "NEVER", " never "])
def test_token_issue_never_has_no_exp(key_file: Path, expires: str) -> None:
    r = issue(key_file, "--user", "bob", "--scope", "gpu-control", "--expires", expires)
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), key_file.read_bytes(), algorithms=["HS256"])
    assert claims == {"sub": "bob", "scopes": ["gpu-control"]}


@pytest.mark.parametrize(
    ("expires", "seconds"), [("1h30m", 5400), ("2 weeks", 14 * 86400), ("1M", 60), ("90s", 90), ("1.5h", 5400)]
)
def test_token_issue_durations(key_file: Path, expires: str, seconds: int) -> None:
    before = time.time()
    r = issue(key_file, "--user", "u", "--expires", expires)
    after = time.time()
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), key_file.read_bytes(), algorithms=["HS256"])
    assert claims["scopes"] == ["gpu-read"]
    assert int(before) + seconds <= claims["exp"] <= int(after) + seconds


def test_token_issue_scopes_repeated_and_ordered(key_file: Path) -> None:
    r = issue(key_file, "--user", "u", "--scope", "cpu-read", "--scope", "gpu-control,gpu-read", "--expires", "0")
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), key_file.read_bytes(), algorithms=["HS256"])
    assert claims["scopes"] == ["cpu-read", "gpu-control", "gpu-read"]


@pytest.mark.parametrize("expires", ["1x", "5", "-1h", "", "h", "soon", "1h junk"])
def test_token_issue_malformed_duration_exit_1(key_file: Path, expires: str) -> None:
    r = issue(key_file, "--user", "u", "--expires", expires)
    assert r.returncode == 1
    assert r.stdout == ""
    assert error_lines(r.stderr) == [f"Error: Invalid duration '{expires}'. Use e.g. '1h', '7d', '30d', or 'never'."]


@pytest.mark.parametrize(("scope", "bad"), [("root", "root"), ("gpu-read,admin", "admin"), ("GPU-READ", "GPU-READ"),
                                           ("gpu-read,", "")])
def test_token_issue_unknown_scope(key_file: Path, scope: str, bad: str) -> None:
    r = issue(key_file, "--user", "u", "--scope", scope, "--expires", "1h")
    assert r.returncode == 2  # a usage error, like every other bad flag value
    assert r.stdout == ""
    assert f"Invalid scope '{bad}'. Valid scopes: gpu-control, gpu-read, cpu-read, metrics" in r.stderr


def test_token_issue_key_problems(tmp_path: Path, key_file: Path) -> None:
    missing = tmp_path / "missing.key"
    r = zeusd("token", "issue", "--signing-key-path", str(missing), "--user", "u", "--expires", "1h", "--scope", "cpu-read")
    assert r.returncode == 1 and r.stdout == ""
    assert error_lines(r.stderr) == [
        f"Error: Failed to read signing key from '{missing}': No such file or directory (os error 2)"
    ]
    # The key is read before --expires is parsed (§12.8 order of work).
    r = zeusd("token", "issue", "--signing-key-path", str(missing), "--user", "u", "--expires", "1x", "--scope", "cpu-read")
    assert "Failed to read signing key" in r.stderr
    secret = key_file.read_text().strip()
    key_file.chmod(0o644)
    r = issue(key_file, "--user", "u", "--expires", "1h")
    assert r.returncode == 1 and r.stdout == "" and "chmod 600" in r.stderr
    assert secret not in r.stderr
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort\n")
    short.chmod(0o600)
    r = zeusd("token", "issue", "--signing-key-path", str(short), "--user", "u", "--expires", "1h", "--scope", "cpu-read")
    assert r.returncode == 1 and r.stdout == "" and "too short" in r.stderr and "tooshort" not in r.stderr


# --------------------------------------------------------------------------- root requirement


NOBODY = 65534


@pytest.fixture
def empty_lib_dir() -> Iterator[str]:
    """An LD_LIBRARY_PATH entry with no libnvidia-ml in it, readable by nobody."""
    with tempfile.TemporaryDirectory(prefix="zeusd-nolib-") as d:
        os.chmod(d, 0o755)
        yield d


@pytest.mark.parametrize(
    ("enable", "group"),
    [("gpu-control", "gpu-control"), ("cpu-read", "cpu-read"), ("gpu-read,gpu-control", "gpu-control")],
)
def test_privileged_groups_refused_without_root(empty_lib_dir: str, enable: str, group: str) -> None:
    port = free_tcp_port()
    argv, user = unprivileged_command(
        ["serve", "--enable", enable, "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{port}"]
    )
    r = subprocess.run(
        argv, user=user, cwd=REPO, capture_output=True, text=True, timeout=30,
        env={**os.environ, "LD_LIBRARY_PATH": empty_lib_dir},
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    refusal = (
        f"API group '{group}' requires root but zeusd is not running as root "
        "(run as root, drop the group with --enable, or use --simulate)"
    )
    assert error_lines(r.stderr) == [f"Error: {refusal}"]
    log = r.stdout.splitlines()  # the configuration, then the refusal, and nothing of a traceback
    assert log[-1].endswith(refusal) and "Traceback" not in r.stdout, r.stdout



def test_gpu_read_needs_no_root_but_needs_its_gpus(empty_lib_dir: str) -> None:
    """Unprivileged, gpu-read passes the root check; asked for explicitly, missing GPUs stop startup."""
    argv, user = unprivileged_command(["serve", "--enable", "gpu-read", "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{free_tcp_port()}"])
    r = subprocess.run(
        argv, user=user, cwd=REPO, capture_output=True, text=True, timeout=30,
        env={**os.environ, "LD_LIBRARY_PATH": empty_lib_dir},
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    [line] = error_lines(r.stderr)
    # The auto backend tried both vendors; the AMD part names where this machine's loader looked.
    assert line.startswith(
        "Error: --enable names a GPU API group, but there is no GPU: no NVIDIA GPU (the NVML library "
        "(libnvidia-ml.so.1) could not be loaded; is the NVIDIA driver installed?) and no AMD GPU ("
    ), line


@pytest.mark.parametrize(
    ("args", "gpus"),
    [(["--simulate", "--enable", "gpu-control,gpu-read,cpu-read"], [0, 1, 2, 3])],
    ids=["simulate-all-groups"],
)
def test_unprivileged_daemon_starts(
    empty_lib_dir: str, processes: list[subprocess.Popen[Any]], tmp_path: Path, args: list[str], gpus: list[int]
) -> None:
    """gpu-read alone needs no root, and a missing NVML means zero GPUs; --simulate never needs root."""
    port = free_tcp_port()
    argv, user = unprivileged_command(["serve", *args, "--mode", "tcp", "--tcp-bind-address", f"127.0.0.1:{port}"])
    with open(tmp_path / "log", "wb") as log:
        p = subprocess.Popen(
            argv, user=user, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "LD_LIBRARY_PATH": empty_lib_dir},
        )
    processes.append(p)
    client = Client(Transport("tcp", port))
    discovery = wait_for_discover(client, p)
    if unprivileged_user() is not None:
        assert euid_of(p.pid) == NOBODY
    assert discovery["gpu_ids"] == gpus
    if not gpus:
        assert discovery["enabled_api_groups"] == ["gpu-read"]
        assert client.get("/gpu/get_power").json()["power_mw"] == {}
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0


# --------------------------------------------------------------------------- the three ways to run the daemon


def _serve_and_stop(
    argv: list[str], sock: Path, processes: list[subprocess.Popen[Any]], cwd: Path, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], int]:
    with open(cwd / "daemon.log", "wb") as log:
        p = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    processes.append(p)
    discovery = wait_for_discover(Client(Transport("unix", str(sock))), p)
    assert sock.exists()
    p.send_signal(signal.SIGTERM)
    code = p.wait(30)
    assert not sock.exists(), "socket file left behind after SIGTERM"
    return discovery, code


def test_zeusd_serve_sigterm_exit_0(tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    sock = tmp_path / "zeusd.sock"
    discovery, code = _serve_and_stop(
        [str(ZEUSD), "serve", "--simulate", "--socket-path", str(sock), "--enable", "cpu-read"], sock, processes, tmp_path
    )
    assert discovery["enabled_api_groups"] == ["cpu-read"] and discovery["gpu_ids"] == []
    assert code == 0


# Twisted's runners re-raise the signal that stopped the reactor after an orderly
# shutdown (twisted.application.app._exitWithSignal), so they report "killed by
# SIGTERM" rather than 0; the shutdown itself (socket removed, log line) is checked.
TWISTED_SIGTERM_CODES = (0, -signal.SIGTERM)


def test_twist_plugin_serves(tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    if not TWIST.exists():
        pytest.skip("twist is not installed")
    sock = tmp_path / "zeusd.sock"
    discovery, code = _serve_and_stop(
        [str(TWIST), "zeusd", "--simulate", "--socket-path", str(sock), "--enable", "gpu-read,cpu-read"],
        sock, processes, tmp_path,
    )
    assert discovery["enabled_api_groups"] == ["gpu-read", "cpu-read"]
    assert code in TWISTED_SIGTERM_CODES
    assert "zeusd stopped" in (tmp_path / "daemon.log").read_text()


def test_twistd_tac_serves(tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    if not TWISTD.exists():
        pytest.skip("twistd is not installed")
    sock = tmp_path / "zeusd.sock"
    twistd_log = tmp_path / "twistd.log"
    discovery, code = _serve_and_stop(
        [str(TWISTD), "-n", "-y", str(REPO / "tac" / "zeusd.tac"), "--pidfile=", "--logfile", str(twistd_log)],
        sock, processes, tmp_path,
        env={"ZEUSD_ARGS": f"--simulate --socket-path {sock} --enable gpu-read --simulate-gpus 2"},
    )
    assert discovery["enabled_api_groups"] == ["gpu-read"] and discovery["gpu_ids"] == [0, 1]
    assert code in TWISTED_SIGTERM_CODES
    assert "zeusd stopped" in twistd_log.read_text()
    assert not (tmp_path / "twistd.pid").exists()


def test_the_deployment_options_table_lists_exactly_the_serve_flags() -> None:
    from zeusd.options import SERVE_FLAGS

    text = (REPO / "docs" / "deployment.md").read_text()
    table = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    documented = {name for row in rows for name in re.findall(r"`--([a-z0-9-]+)", row.split("|")[1])}
    assert documented == {flag.name for flag in SERVE_FLAGS}
    help_text = zeusd("serve", "--help").stdout
    assert all(f"--{flag.name}" in help_text for flag in SERVE_FLAGS)


def test_importing_the_daemon_warns_about_nothing() -> None:
    """NVIDIA's bindings by their own name (nvidia-ml-py), not the deprecated pynvml shim and its import hook."""
    from importlib.metadata import requires

    names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires("zeusd") or []}
    assert "nvidia-ml-py" in names and "pynvml" not in names
    r = subprocess.run([sys.executable, "-W", "error", "-c", "import zeusd.service, zeusd.cli"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_help_into_a_closed_pipe_is_quiet() -> None:
    if not ZEUSD.exists():
        pytest.skip(f"console script {ZEUSD} is not installed")
    r = subprocess.run(f"{ZEUSD} serve --help | head -1", shell=True, capture_output=True, text=True, timeout=30)
    assert r.stdout.startswith("Usage: zeusd serve") and r.stderr == ""
