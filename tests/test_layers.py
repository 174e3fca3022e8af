"""The layers, from the imports: web knows HTTP, devices know hardware, and no import runs upward.

Every ``import`` and ``from ... import`` in a module counts, those inside
functions too (a lazy import is still a dependency). See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zeusd"
HTTP = ("twisted.web", "klein", "werkzeug", "zeusd.web")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def importing(prefix: str) -> dict[str, set[str]]:
    return {name: deps for name, deps in MODULES.items() if name == prefix or name.startswith(prefix + ".")}


def test_the_module_table_is_not_empty() -> None:
    assert "zeusd.devices.gpu.manager" in MODULES and "zeusd.web.app" in MODULES and len(MODULES) > 30


@pytest.mark.parametrize("layer", ["zeusd.devices", "zeusd.auth", "zeusd.streaming", "zeusd.sse", "zeusd.errors"])
def test_no_http_below_the_web_layer(layer: str) -> None:
    offenders = {m: sorted(d for d in deps if d.startswith(HTTP)) for m, deps in importing(layer).items()}
    assert {m: d for m, d in offenders.items() if d} == {}


# What each layer may not import (its upper layers).
UPWARD = {
    "zeusd.devices": ("zeusd.web", "zeusd.service", "zeusd.streaming", "zeusd.metrics", "zeusd.auth", "zeusd.options",
                      "zeusd.listeners", "zeusd.startup", "zeusd.cli", "zeusd.client"),
    "zeusd.streaming": ("zeusd.web", "zeusd.service", "zeusd.metrics", "zeusd.options", "zeusd.cli"),
    "zeusd.web": ("zeusd.service", "zeusd.options", "zeusd.cli", "zeusd.startup", "zeusd.listeners"),
    "zeusd.client": ("zeusd.web", "zeusd.service", "zeusd.devices", "zeusd.options", "zeusd.streaming", "zeusd.metrics"),
}


@pytest.mark.parametrize("layer", list(UPWARD))
def test_no_import_runs_upward(layer: str) -> None:
    offenders = {m: sorted(d for d in deps if d.startswith(UPWARD[layer])) for m, deps in importing(layer).items()}
    assert {m: d for m, d in offenders.items() if d} == {}
