"""Sysfs-like RAPL trees in temporary directories, laid out like /sys/class/powercap."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RANGE_UJ = 262_143_328_850


class RaplTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "intel-rapl"
        self.base.mkdir(parents=True, exist_ok=True)

    def package_dir(self, index: int) -> Path:
        return self.base / f"intel-rapl:{index}"

    def dram_dir(self, index: int) -> Path:
        return self.package_dir(index) / f"intel-rapl:{index}:2"

    def add_package(
        self,
        index: int,
        energy_uj: int = 1_000_000,
        max_range_uj: int = DEFAULT_RANGE_UJ,
        dram_energy_uj: int | None = None,
        name: str | None = None,
    ) -> "RaplTree":
        package = self.package_dir(index)
        self._zone(package, name or f"package-{index}", energy_uj, max_range_uj)
        # A core sub-zone that must be ignored, as on real machines.
        self._zone(package / f"intel-rapl:{index}:0", "core", 5, max_range_uj)
        if dram_energy_uj is not None:
            self._zone(self.dram_dir(index), "dram", dram_energy_uj, max_range_uj)
        return self

    def _zone(self, path: Path, name: str, energy_uj: int, max_range_uj: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "name").write_text(name + "\n")
        (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        self._write(path / "energy_uj", energy_uj)

    @staticmethod
    def _write(path: Path, value: int) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)

    def set_energy(self, index: int, energy_uj: int, dram: bool = False) -> None:
        self._write((self.dram_dir(index) if dram else self.package_dir(index)) / "energy_uj", energy_uj)

    def energy(self, index: int, dram: bool = False) -> int:
        return int(((self.dram_dir(index) if dram else self.package_dir(index)) / "energy_uj").read_text())
