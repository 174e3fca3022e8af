"""RAPL energy counters from the powercap sysfs tree.

Layout (as on Linux): ``<root>/intel-rapl/intel-rapl:N`` is package N and
``intel-rapl:N:M`` below it are its sub-zones, the one named ``dram`` being
DRAM. ``--rapl-root`` may point at a ``powercap`` directory (the default,
``/sys/class/powercap``) or directly at an ``intel-rapl`` directory, which is
how containers often mount it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from zeusd.devices.cpu.base import CpuPackage, io_error

log = Logger()

_PACKAGE = re.compile(r"intel-rapl:(\d+)")
_SUBZONE = re.compile(r"intel-rapl:(\d+):(\d+)")


@dataclass(frozen=True)
class SysfsZone:
    """One powercap zone directory; reads go to ``energy_uj`` every time."""

    path: Path
    name: str
    max_energy_range_uj: int

    def read_raw_uj(self) -> int:
        try:
            with open(self.path / "energy_uj", "rb", buffering=0) as f:
                return parse_u64(f.read(64))
        except (OSError, ValueError) as e:
            raise io_error(e) from None

    @classmethod
    def open(cls, path: Path) -> "SysfsZone":
        """Check the zone's files once; raises OSError/ValueError when unusable."""
        name = (path / "name").read_text().strip()
        max_range = _read_u64(path / "max_energy_range_uj")
        if max_range <= 0:
            raise ValueError(f"max_energy_range_uj is {max_range}")
        _read_u64(path / "energy_uj")
        return cls(path, name, max_range)


def _read_u64(path: Path) -> int:
    """A counter file at discovery; a parse error names the file (OSError already does)."""
    try:
        return parse_u64(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None


_U64_MAX = (1 << 64) - 1


def parse_u64(data: bytes) -> int:
    """A counter as upstream parses it (Rust ``str::parse::<u64>`` after trimming).

    Python's ``int`` would also take ``-5``, ``1_000`` or non-ASCII digits; a
    counter file holding any of those is broken and must fail, with Rust's words.
    """
    text = data.strip()
    if not text:
        raise ValueError("cannot parse integer from empty string")
    if text.startswith(b"+") and len(text) > 1:
        text = text[1:]
    if not text.isdigit():  # bytes.isdigit: ASCII digits only
        raise ValueError("invalid digit found in string")
    value = int(text)
    if value > _U64_MAX:
        raise ValueError("number too large to fit in target type")
    return value


def _zone_dir(root: Path) -> Path:
    nested = root / "intel-rapl"
    return nested if nested.is_dir() else root


def discover_packages(rapl_root: str) -> list[CpuPackage]:
    """Every usable package zone, sorted by index; problems are logged, not fatal."""
    base = _zone_dir(Path(rapl_root))
    try:
        entries = sorted(os.listdir(base))
    except OSError as e:
        log.error("No RAPL zones: cannot list {path}: {error}", path=str(base), error=str(e))
        return []
    packages: list[CpuPackage] = []
    for entry in entries:
        match = _PACKAGE.fullmatch(entry)
        if match is None or not (base / entry).is_dir():
            continue
        index = int(match.group(1))
        try:
            zone = SysfsZone.open(base / entry)
        except (OSError, ValueError) as e:
            log.error("Skipping RAPL package {entry}: {error}", entry=entry, error=str(e))
            continue
        if zone.name == "psys":
            log.info("Skipping RAPL zone {entry}: a platform (psys) zone, not a CPU package", entry=entry)
            continue
        packages.append(CpuPackage(index, zone, _find_dram(base / entry, index)))
    packages.sort(key=lambda p: p.index)
    return packages


def _find_dram(package_dir: Path, index: int) -> SysfsZone | None:
    for entry in sorted(os.listdir(package_dir)):
        match = _SUBZONE.fullmatch(entry)
        if match is None or int(match.group(1)) != index:
            continue
        try:
            zone = SysfsZone.open(package_dir / entry)
        except (OSError, ValueError) as e:
            log.warn("Ignoring RAPL sub-zone {entry}: {error}", entry=entry, error=str(e))
            continue
        if zone.name == "dram":
            return zone
    return None
