"""The official Zeus clients' venvs (setup_venvs.sh makes them; driver.py runs inside them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

GENERATIONS = {"0.15": "0.15.1", "0.16": "0.16.0"}


def client_python(gen: str) -> Path:
    venv = REPO / f".venv-zeus-{gen}"
    python = venv / "bin" / "python"
    marker = venv / ".zeus-version"
    if python.exists() and marker.exists() and marker.read_text().strip() == GENERATIONS[gen]:
        return python
    why = f"{venv.name} with zeus=={GENERATIONS[gen]} is missing: run tests/zeus_clients/setup_venvs.sh"
    if os.environ.get("ZEUSD_REQUIRE_ZEUS_CLIENTS") == "1":
        pytest.fail(why)
    pytest.skip(why)
