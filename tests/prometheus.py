"""A real Prometheus server (Debian's ``prometheus``) for tests: start it, ask its HTTP API.

It listens on a free loopback port with its data in a temporary folder, and
is killed by :meth:`Prometheus.stop`. Waiting for a series is polling the
server's API until a deadline: an event wait on an external process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.daemon import free_tcp_port, wait_until

Vector = list[dict[str, Any]]


def prometheus_or_skip() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("Debian's prometheus is not installed (tests/setup_system_packages.sh installs it as root)")
    return path


class Prometheus:
    def __init__(self, executable: str, directory: Path, config: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(config)
        self.log_path = directory / "prometheus.log"
        self.port = free_tcp_port()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                executable,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, "Prometheus to be ready", timeout=60)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{url}: {e.code} {e.read()[:500]!r}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> Vector:
        """An instant query at the newest data; each result has ``metric`` and ``value`` (a float here)."""
        data = self.api("query", query=expr)
        results: Vector = data["result"]
        if data["resultType"] == "vector":
            for r in results:
                r["value"] = float(r["value"][1])
        return results

    def wait_for(self, expr: str, check: Callable[[Vector], Any] = bool, timeout: float = 30.0) -> Vector:
        """Query ``expr`` until ``check`` accepts the result; the result."""
        last: list[Vector] = []

        def ready() -> bool:
            last[:] = [self.query(expr)]
            return bool(check(last[0]))

        try:
            wait_until(ready, expr, timeout)
        except AssertionError:
            raise AssertionError(f"timed out waiting for {expr}; last result {last}\n{self.log()[-2000:]}") from None
        return last[0]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def by_label(results: Vector, label: str) -> dict[str, float]:
    """``{label value: sample value}`` of an instant vector."""
    return {r["metric"][label]: r["value"] for r in results}
