"""A serving daemon imports only what its configuration uses (issue 18).

The module list comes from the real entry point under ``python -X importtime``
(every first import of the process, written to stderr), read after the daemon
answered and stopped. What Twisted and Klein import themselves (the reactor and
Klein both pull in ``twisted.internet.ssl`` and pyOpenSSL) is the stack's floor
and not checked here; these are the parts that zeusd chooses to load.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.daemon import REPO, Client, Transport, wait_until, write_signing_key

#: Imported only when configured: part → modules, each listed under the configuration that needs it.
#: The TOML parser is not listed with the overrides: coverage.py (``make coverage``, CI) reads
#: pyproject.toml with it in every measured daemon, so it is no sign of what zeusd loaded.
OPTIONAL = {
    "overrides": {"zeusd.devices.gpu.overrides", "zeusd.devices.commands", "zeusd.trust"},
    "auth": {"zeusd.auth", "jwt"},
    "metrics": {"zeusd.metrics", "prometheus_client"},
    "client": {"zeusd.client", "treq", "zeusd.watch"},
    "amd": {"zeusd.devices.gpu.amdsmi", "amdsmi"},
    "nvml": {"zeusd.devices.gpu.nvml", "pynvml"},
}
LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def imported_by_serving_daemon(tmp_path: Path, *args: str, power_status: int = 200) -> set[str]:
    sock = tmp_path / "zeusd.sock"
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "zeusd", "serve", "--simulate", "--socket-path", str(sock), *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = Client(Transport("unix", str(sock)))
        wait_until(lambda: process.poll() is not None or _answers(client), "the daemon to answer", 30)
        assert process.poll() is None, "the daemon exited"
        assert client.get("/gpu/get_power").status == power_status  # the request's path ran: its modules are loaded
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    return {m.group(1) for line in stderr.splitlines() if (m := LINE.match(line))}


def _answers(client: Client) -> bool:
    try:
        return client.get("/discover").status == 200
    except OSError:
        return False


def loaded_parts(modules: set[str]) -> set[str]:
    return {part for part, names in OPTIONAL.items() if names & modules}


def test_the_default_simulated_daemon_loads_metrics_only(tmp_path: Path) -> None:
    modules = imported_by_serving_daemon(tmp_path)
    assert "zeusd.service" in modules and "klein" in modules  # the list is the daemon's
    assert loaded_parts(modules) == {"metrics"}


def test_without_the_metrics_group_prometheus_is_not_loaded(tmp_path: Path) -> None:
    modules = imported_by_serving_daemon(tmp_path, "--enable", "gpu-read,cpu-read")
    assert loaded_parts(modules) == set()


def test_a_signing_key_loads_auth(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    write_signing_key(key)
    modules = imported_by_serving_daemon(tmp_path, "--enable", "gpu-read", "--signing-key-path", str(key), power_status=401)
    assert loaded_parts(modules) == {"auth"}


def test_a_simulated_amd_node_does_not_load_amd_smi(tmp_path: Path) -> None:
    """The simulated vendor changes what /discover says, not which library is loaded."""
    modules = imported_by_serving_daemon(tmp_path, "--enable", "gpu-read", "--simulate-vendor", "amd")
    assert loaded_parts(modules) == set()
