"""The RAPL (CPU) backend through a real daemon reading a real sysfs-like tree.

Every test starts ``zeusd serve --enable cpu-read --rapl-root <tmp tree>`` (no
simulation: the daemon reads the files the test writes) and talks HTTP to it.
Tests run as root, which ``cpu-read`` requires without ``--simulate``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.daemon import Daemon, run_zeusd
from tests.rapl_tree import RaplTree
from zeusd.options import DEFAULT_RAPL_ROOTS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cpu-read without --simulate needs root")

#: A small counter range (1 kJ) so wraps are quick to provoke; the daemon's
#: wraparound guard then reads idle counters about once a second.
SMALL_RANGE_UJ = 1_000_000_000


def start_rapl(start_daemon: DaemonFactory, root: Path, *extra: str, transport: str = "unix") -> Daemon:
    return start_daemon("--enable", "cpu-read", "--rapl-root", str(root), *extra, transport=transport)


def energy(daemon: Daemon, query: str) -> Any:
    r = daemon.client.get(f"/cpu/get_cumulative_energy?{query}")
    assert r.status == 200, (r.status, r.body)
    return r.json()


def cpu_uj(daemon: Daemon, index: int) -> int:
    value = energy(daemon, f"cpu_ids={index}&cpu=true&dram=false")[str(index)]["cpu_energy_uj"]
    assert isinstance(value, int)
    return value


def wait_for_log(daemon: Daemon, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.05)


class EnergyRamp:
    """Writes counters that grow at a constant power in real time (and wrap like RAPL).

    ``zones`` maps (package, is_dram) to watts. The value written is a pure
    function of the monotonic clock, so a late write only delays a value, it
    never changes the average power seen over a long enough window.
    """

    def __init__(self, tree: RaplTree, zones: dict[tuple[int, bool], float], start_uj: int = 0, range_uj: int | None = None) -> None:
        self.tree = tree
        self.zones = zones
        self.start_uj = start_uj
        self.range_uj = range_uj
        self.wraps = 0
        self.wrapped_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def value(self, watts: float, now: float) -> int:
        total = self.start_uj + int(watts * 1e6 * (now - self._t0))
        return total % self.range_uj if self.range_uj else total

    def _run(self) -> None:
        last: dict[tuple[int, bool], int] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for (index, dram), watts in self.zones.items():
                value = self.value(watts, now)
                if (index, dram) in last and value < last[(index, dram)]:
                    self.wraps += 1
                    self.wrapped_at = now
                last[(index, dram)] = value
                self.tree.set_energy(index, value, dram=dram)
            self._stop.wait(0.005)

    def __enter__(self) -> "EnergyRamp":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def break_zone(tree: RaplTree, index: int, how: str) -> Path:
    """Make a package's ``energy_uj`` unreadable even for root."""
    path = tree.package_dir(index) / "energy_uj"
    path.unlink()
    if how == "directory":
        path.mkdir()
    return path


def restore_zone(tree: RaplTree, index: int, value: int) -> None:
    path = tree.package_dir(index) / "energy_uj"
    if path.is_dir():
        shutil.rmtree(path)
    tree.set_energy(index, value)


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("layout", ["powercap", "intel-rapl", "sysfs-symlinks", "flat-symlinks"])
def test_discovery_finds_packages_and_dram_and_ignores_other_zones(
    start_daemon: DaemonFactory, rapl_tree: RaplTree, layout: str
) -> None:
    rapl_tree.add_package(0, energy_uj=1000, dram_energy_uj=2000)  # with DRAM (and a core sub-zone)
    rapl_tree.add_package(1, energy_uj=3000)  # core only, no DRAM
    rapl_tree.add_package(2, energy_uj=4000, name="psys")  # a platform zone, not a CPU
    # An uncore sub-zone and a stray file are not DRAM either.
    (rapl_tree.package_dir(1) / "intel-rapl:1:1").mkdir()
    for name, text in (("name", "uncore"), ("energy_uj", "7"), ("max_energy_range_uj", "1000")):
        (rapl_tree.package_dir(1) / "intel-rapl:1:1" / name).write_text(text + "\n")
    (rapl_tree.base / "intel-rapl-notes.txt").write_text("not a zone\n")
    root = rapl_tree.root if layout == "powercap" else rapl_tree.base
    if layout.endswith("symlinks"):
        # As in /sys/class/powercap: every zone is a symlink into the device tree
        # (flat: without the intel-rapl control-type entry).
        root = rapl_tree.root.parent / "class-powercap"
        root.mkdir()
        if layout == "sysfs-symlinks":
            (root / "intel-rapl").symlink_to(rapl_tree.base)
        for zone in rapl_tree.base.glob("intel-rapl:*"):
            (root / zone.name).symlink_to(zone)
            for sub in zone.glob("intel-rapl:*"):
                (root / sub.name).symlink_to(sub)

    daemon = start_rapl(start_daemon, root)
    d = daemon.client.get("/discover").json()
    assert d["cpu_ids"] == [0, 1]
    assert d["dram_available"] == [True, False]
    assert d["cpus"] == [{"id": 0, "dram_available": True}, {"id": 1, "dram_available": False}]
    assert d["gpu_ids"] == [] and d["enabled_api_groups"] == ["cpu-read"]
    body = energy(daemon, "cpu=true&dram=true")  # cpu_ids absent: every package
    assert body == {
        "0": {"cpu_energy_uj": 1000, "dram_energy_uj": 2000},
        "1": {"cpu_energy_uj": 3000, "dram_energy_uj": None},
    }
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=2&cpu=true&dram=true")
    assert (r.status, r.error) == (400, "CPU index 2 does not exist.")  # the psys zone is not a CPU


@pytest.mark.parametrize(
    ("tree_kind", "message"),
    [
        ("empty", "no usable RAPL package (intel-rapl:N with a readable energy_uj)"),
        ("missing", "no such directory"),
    ],
)
def test_an_explicit_rapl_root_without_packages_stops_startup(tmp_path: Path, tree_kind: str, message: str) -> None:
    root = tmp_path / "powercap"
    if tree_kind == "empty":
        (root / "intel-rapl").mkdir(parents=True)
    r = run_zeusd(["serve", "--socket-path", str(tmp_path / "z.sock"), "--enable", "cpu-read", "--rapl-root", str(root)])
    assert r.returncode == 1, r.stdout
    assert r.stderr.splitlines() == [f"Error: --rapl-root {root}: {message}"]
    assert not (tmp_path / "z.sock").exists()


def test_default_groups_without_rapl_mean_zero_cpus_not_a_crash(start_daemon: DaemonFactory) -> None:
    if any(os.path.isdir(f"{root}/intel-rapl") for root in DEFAULT_RAPL_ROOTS):
        pytest.skip("this machine has RAPL zones at a default root")
    daemon = start_daemon()  # default groups, default RAPL roots
    d = daemon.client.get("/discover").json()
    assert (d["cpu_ids"], d["dram_available"], d["cpus"]) == ([], [], [])
    assert energy(daemon, "cpu=true&dram=true") == {}
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=true")
    assert (r.status, r.error) == (400, "CPU index 0 does not exist.")
    power = daemon.client.get("/cpu/get_power")
    assert power.status == 200 and power.json()["power_mw"] == {}
    assert "No RAPL package found: the cpu-read API group answers with no devices." in daemon.log()


def test_a_broken_package_is_skipped_at_startup(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    rapl_tree.add_package(0, energy_uj=10)
    rapl_tree.add_package(1, energy_uj=20)
    rapl_tree.add_package(2, energy_uj=30, dram_energy_uj=40)
    (rapl_tree.package_dir(0) / "max_energy_range_uj").write_text("garbage\n")
    (rapl_tree.dram_dir(2) / "max_energy_range_uj").unlink()  # a broken DRAM zone is no DRAM
    daemon = start_rapl(start_daemon, rapl_tree.root)
    d = daemon.client.get("/discover").json()
    assert (d["cpu_ids"], d["dram_available"]) == ([1, 2], [False, False])
    assert "Skipping RAPL package intel-rapl:0: max_energy_range_uj: invalid digit found in string" in daemon.log()
    assert "Ignoring RAPL sub-zone intel-rapl:2:2" in daemon.log()
    assert energy(daemon, "cpu=true&dram=true") == {
        "1": {"cpu_energy_uj": 20, "dram_energy_uj": None},
        "2": {"cpu_energy_uj": 30, "dram_energy_uj": None},
    }


# --------------------------------------------------------------------------- cumulative energy


def test_energy_values_filters_and_flags(start_daemon: DaemonFactory, rapl_tree: RaplTree, transport_kind: str) -> None:
    rapl_tree.add_package(0, energy_uj=123_456, dram_energy_uj=78_901)
    rapl_tree.add_package(1, energy_uj=234_567)
    daemon = start_rapl(start_daemon, rapl_tree.root, transport=transport_kind)

    assert energy(daemon, "cpu_ids=0,1&cpu=true&dram=true") == {
        "0": {"cpu_energy_uj": 123_456, "dram_energy_uj": 78_901},
        "1": {"cpu_energy_uj": 234_567, "dram_energy_uj": None},
    }
    assert energy(daemon, "cpu_ids=1&cpu=true&dram=true") == {"1": {"cpu_energy_uj": 234_567, "dram_energy_uj": None}}
    assert energy(daemon, "cpu_ids=0&cpu=false&dram=true") == {"0": {"cpu_energy_uj": None, "dram_energy_uj": 78_901}}
    assert energy(daemon, "cpu_ids=0&cpu=true&dram=false") == {"0": {"cpu_energy_uj": 123_456, "dram_energy_uj": None}}
    assert energy(daemon, "cpu_ids=0&cpu=false&dram=false") == {"0": {"cpu_energy_uj": None, "dram_energy_uj": None}}

    # The files are read at every request (µJ in, µJ out).
    rapl_tree.set_energy(0, 223_456)
    rapl_tree.set_energy(0, 88_901, dram=True)
    rapl_tree.set_energy(1, 234_568)
    assert energy(daemon, "cpu_ids=1,0&cpu=true&dram=true") == {
        "0": {"cpu_energy_uj": 223_456, "dram_energy_uj": 88_901},
        "1": {"cpu_energy_uj": 234_568, "dram_energy_uj": None},
    }


def test_unknown_id_is_rejected_before_any_package_is_read(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    rapl_tree.add_package(0, energy_uj=5)
    rapl_tree.add_package(1, energy_uj=6)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    # Package 0 now fails when read: a 500 would mean the request read it.
    break_zone(rapl_tree, 0, "directory")
    for ids in ("0,5", "5,0", "0,1,2"):
        r = daemon.client.get(f"/cpu/get_cumulative_energy?cpu_ids={ids}&cpu=true&dram=true")
        assert r.status == 400, (ids, r.body)
        assert r.error == f"CPU index {5 if '5' in ids else 2} does not exist."
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=true")
    assert r.status == 500  # ...while reading it really does fail
    r = daemon.client.get("/cpu/get_power?cpu_ids=0,7")
    assert (r.status, r.error) == (400, "Unknown CPU indices: [7]. Available: {0, 1}")


# --------------------------------------------------------------------------- wraparound


def test_wraparound_is_compensated(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    R = SMALL_RANGE_UJ
    rapl_tree.add_package(0, energy_uj=R - 1000, max_range_uj=R, dram_energy_uj=R - 10)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    first = energy(daemon, "cpu_ids=0&cpu=true&dram=true")["0"]
    assert first == {"cpu_energy_uj": R - 1000, "dram_energy_uj": R - 10}  # the first read is the raw value

    rapl_tree.set_energy(0, 500)  # wrapped: 1000 to the top, then 500 more
    rapl_tree.set_energy(0, 40, dram=True)  # 10 + 40
    second = energy(daemon, "cpu_ids=0&cpu=true&dram=true")["0"]
    assert second["cpu_energy_uj"] - first["cpu_energy_uj"] == 1500
    assert second["dram_energy_uj"] - first["dram_energy_uj"] == 50

    # Many more wraps, each seen by a read (steps below half the range, the most
    # MonotonicEnergy can tell from a glitch): the total is the true total.
    total = second["cpu_energy_uj"]
    raw = 500
    steps = [R // 2 - 7, R // 3, R // 2 - 11, R // 4, R * 2 // 5, 1, R // 2 - 1] * 3
    wraps = 0
    for step in steps:
        wraps += raw + step >= R
        raw = (raw + step) % R
        rapl_tree.set_energy(0, raw)
        now = cpu_uj(daemon, 0)
        assert now - total == step
        total = now
    assert wraps >= 6
    assert total == first["cpu_energy_uj"] + 1500 + sum(steps)


def test_a_small_step_backwards_is_absorbed_not_counted_as_a_wrap(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    """MonotonicEnergy: a backwards step of less than half the range is a glitch;
    the reported value holds still and later increments count from the new raw value."""
    R = SMALL_RANGE_UJ
    rapl_tree.add_package(0, energy_uj=500_000, max_range_uj=R)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    before = cpu_uj(daemon, 0)
    assert before == 500_000
    rapl_tree.set_energy(0, 400_000)  # 100 mJ backwards: a glitch, not a wrap
    assert cpu_uj(daemon, 0) == before
    rapl_tree.set_energy(0, 400_250)
    assert cpu_uj(daemon, 0) == before + 250
    rapl_tree.set_energy(0, 400_250 + R // 2 + 1)  # far forwards is just energy
    assert cpu_uj(daemon, 0) == before + 250 + R // 2 + 1
    wait_for_log(daemon, "went backwards from 500000 to 400000 uJ")


def test_idle_counter_wrap_is_caught_by_the_guard(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    """Nobody reads the package while its counter passes the top: the daemon's own
    periodic guard read must see the high value, or the wrap would look like a glitch."""
    R = SMALL_RANGE_UJ  # at 1 kW this range wraps in 1 s, so the guard runs about every second
    rapl_tree.add_package(0, energy_uj=1000, max_range_uj=R)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    first = cpu_uj(daemon, 0)
    rapl_tree.set_energy(0, R - 100)
    time.sleep(4.0)  # several guard periods, no request
    rapl_tree.set_energy(0, 50)
    assert cpu_uj(daemon, 0) - first == (R - 100 - 1000) + 100 + 50
    assert "went backwards" not in daemon.log()


# --------------------------------------------------------------------------- power


def test_get_power_is_the_energy_delta_over_the_measured_window(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    rapl_tree.add_package(0, energy_uj=0, dram_energy_uj=0)
    rapl_tree.add_package(1, energy_uj=0)
    # 1 Hz: the one-shot request measures over a 1 s window.
    daemon = start_rapl(start_daemon, rapl_tree.root, "--cpu-power-poll-hz", "1")
    with EnergyRamp(rapl_tree, {(0, False): 40.0, (0, True): 6.0, (1, False): 90.0}):
        time.sleep(0.1)
        started = time.monotonic()
        r = daemon.client.get("/cpu/get_power")
        took = time.monotonic() - started
    assert r.status == 200, r.body
    body = r.json()
    assert took >= 0.9  # it really measured over the window
    assert abs(body["timestamp_ms"] - time.time() * 1000) < 5000
    power = body["power_mw"]
    assert set(power) == {"0", "1"} and "errors" not in body
    assert power["0"]["cpu_mw"] == pytest.approx(40_000, rel=0.2)
    assert power["0"]["dram_mw"] == pytest.approx(6_000, rel=0.2)
    assert power["1"]["cpu_mw"] == pytest.approx(90_000, rel=0.2)
    assert power["1"]["dram_mw"] is None

    # A counter that stands still draws nothing.
    still = daemon.client.get("/cpu/get_power?cpu_ids=1").json()
    assert still["power_mw"] == {"1": {"cpu_mw": 0, "dram_mw": None}}


def test_stream_and_get_power_during_a_stream(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    rapl_tree.add_package(0, energy_uj=0, dram_energy_uj=0)
    daemon = start_rapl(start_daemon, rapl_tree.root, "--cpu-power-poll-hz", "5")
    with EnergyRamp(rapl_tree, {(0, False): 25.0, (0, True): 3.0}):
        with daemon.client.stream("/cpu/stream_power?cpu_ids=0") as stream:
            events = stream.events(12)
            one_shot = daemon.client.get("/cpu/get_power?cpu_ids=0").json()
    cpu = [e["power_mw"]["0"]["cpu_mw"] for e in events]
    dram = [e["power_mw"]["0"]["dram_mw"] for e in events]
    assert statistics.median(cpu) == pytest.approx(25_000, rel=0.15)
    assert statistics.median(dram) == pytest.approx(3_000, rel=0.15)
    assert all(5_000 <= mw <= 75_000 for mw in cpu), cpu
    assert one_shot["power_mw"]["0"]["cpu_mw"] == pytest.approx(25_000, rel=0.5)


def test_stream_power_stays_plausible_across_a_counter_wrap(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    R = SMALL_RANGE_UJ
    watts = 500.0  # 1 kJ range: wraps every 2 s
    start = R - int(watts * 1e6 * 0.6)  # first wrap 0.6 s in
    rapl_tree.add_package(0, energy_uj=start, max_range_uj=R)
    daemon = start_rapl(start_daemon, rapl_tree.root, "--cpu-power-poll-hz", "5")
    events: list[dict[str, Any]] = []
    with EnergyRamp(rapl_tree, {(0, False): watts}, start_uj=start, range_uj=R) as ramp:
        with daemon.client.stream("/cpu/stream_power?cpu_ids=0&format=v0.5") as stream:
            deadline = time.monotonic() + 30
            while ramp.wraps < 2 or time.monotonic() - (ramp.wrapped_at or 0) < 0.8:
                events += stream.events(1)
                assert time.monotonic() < deadline
    cpu = [e["cpu_mw"] for e in events]
    assert len(cpu) >= 10
    # An uncompensated wrap would show as a 0 (or absurd) sample.
    assert all(0.3 * watts * 1000 <= mw <= 3 * watts * 1000 for mw in cpu), cpu
    assert statistics.median(cpu) == pytest.approx(watts * 1000, rel=0.15)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("delete", "IOError: No such file or directory (os error 2)"),
        ("directory", "IOError: Is a directory (os error 21)"),
    ],
)
def test_unreadable_package_fails_alone_and_recovers(
    start_daemon: DaemonFactory, rapl_tree: RaplTree, how: str, message: str
) -> None:
    rapl_tree.add_package(0, energy_uj=0, dram_energy_uj=0)
    rapl_tree.add_package(1, energy_uj=0)
    daemon = start_rapl(start_daemon, rapl_tree.root, "--cpu-power-poll-hz", "5")
    with EnergyRamp(rapl_tree, {(0, False): 30.0, (0, True): 2.0}), daemon.client.stream(
        "/cpu/stream_power?cpu_ids=0,1"
    ) as stream:
        assert set(stream.events(2)[-1]["power_mw"]) == {"0", "1"}
        break_zone(rapl_tree, 1, how)

        r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0,1&cpu=true&dram=true")
        assert r.status == 500
        assert r.json() == {"errors": {"1": message}}
        assert daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=true").status == 200
        # DRAM of package 0 is independent of package 1's file; package 1 with cpu=false reads nothing.
        assert energy(daemon, "cpu_ids=1&cpu=false&dram=true") == {"1": {"cpu_energy_uj": None, "dram_energy_uj": None}}

        # The stream keeps flowing for the healthy package.
        wait_for_log(daemon, f"CPU 1 power read failed: {message}")
        later = stream.events(6)
        assert all(set(e["power_mw"]) == {"0"} for e in later[1:]), later
        assert all(e["power_mw"]["0"]["cpu_mw"] > 0 for e in later[1:])

        # One-shot power: the healthy package's reading plus the failed one's error.
        power = daemon.client.get("/cpu/get_power?cpu_ids=0,1")
        assert power.status == 200
        body = power.json()
        assert set(body["power_mw"]) == {"0"} and body["errors"] == {"1": message}
        assert body["power_mw"]["0"]["cpu_mw"] > 0
        alone = daemon.client.get("/cpu/get_power?cpu_ids=1")
        assert alone.status == 500 and alone.json() == {"errors": {"1": message}}

        restore_zone(rapl_tree, 1, 1_000_000)
        wait_for_log(daemon, "CPU 1 power reads recovered")
        assert set(stream.events(2)[-1]["power_mw"]) == {"0", "1"}
    assert energy(daemon, "cpu_ids=0,1&cpu=true&dram=false")["1"]["cpu_energy_uj"] == 1_000_000


def test_broken_dram_zone_fails_only_dram_reads(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    rapl_tree.add_package(0, energy_uj=111, dram_energy_uj=222)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    dram_file = rapl_tree.dram_dir(0) / "energy_uj"
    dram_file.unlink()
    assert energy(daemon, "cpu_ids=0&cpu=true&dram=false") == {"0": {"cpu_energy_uj": 111, "dram_energy_uj": None}}
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=true")
    assert r.status == 500 and r.json() == {"errors": {"0": "IOError: No such file or directory (os error 2)"}}
    # Power needs both counters of a package (as upstream v0.5.0): the package reports the error.
    r = daemon.client.get("/cpu/get_power?cpu_ids=0")
    assert r.status == 500 and r.json() == {"errors": {"0": "IOError: No such file or directory (os error 2)"}}
    rapl_tree.set_energy(0, 333, dram=True)
    assert energy(daemon, "cpu_ids=0&cpu=true&dram=true") == {"0": {"cpu_energy_uj": 111, "dram_energy_uj": 333}}
    assert daemon.client.get("/cpu/get_power?cpu_ids=0").json()["power_mw"] == {"0": {"cpu_mw": 0, "dram_mw": 0}}


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("12ab\n", "invalid digit found in string"),
        ("-5\n", "invalid digit found in string"),  # Python's int() would take these three
        ("1_000\n", "invalid digit found in string"),
        (" \u0661\u0662\n", "invalid digit found in string"),
        ("\n", "cannot parse integer from empty string"),
        ("18446744073709551616\n", "number too large to fit in target type"),
    ],
)
def test_garbage_in_energy_file_is_a_clear_error(
    start_daemon: DaemonFactory, rapl_tree: RaplTree, content: str, detail: str
) -> None:
    rapl_tree.add_package(0, energy_uj=10)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    (rapl_tree.package_dir(0) / "energy_uj").write_text(content)
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=false")
    assert (r.status, r.json()) == (500, {"errors": {"0": f"IOError: {detail}"}})
    rapl_tree.set_energy(0, 20)
    assert cpu_uj(daemon, 0) == 20
    rapl_tree.set_energy(0, 18446744073709551615)  # u64::MAX is a valid (if odd) counter
    assert cpu_uj(daemon, 0) == 18446744073709551615


def test_a_hanging_energy_file_times_out_alone_and_recovers(start_daemon: DaemonFactory, rapl_tree: RaplTree) -> None:
    """A read that never returns (a FIFO blocks open until a writer comes) fails after the 5 s bound."""
    rapl_tree.add_package(0, energy_uj=1_000)
    rapl_tree.add_package(1, energy_uj=2_000)
    daemon = start_rapl(start_daemon, rapl_tree.root)
    fifo = rapl_tree.package_dir(0) / "energy_uj"
    fifo.unlink()
    os.mkfifo(fifo)
    started = time.monotonic()
    r = daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0,1&cpu=true&dram=false")
    assert r.status == 500, r.body
    assert r.json() == {"errors": {"0": "CPU 0 did not answer within 5 s."}}
    assert 4 <= time.monotonic() - started < 15
    # The healthy package answers at once meanwhile.
    assert cpu_uj(daemon, 1) == 2_000
    # Release the stuck read (a writer completes its open), then put a real file back.
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"1500\n")
    os.close(writer)
    fifo.unlink()
    rapl_tree.set_energy(0, 3_000)
    deadline = time.monotonic() + 10
    while daemon.client.get("/cpu/get_cumulative_energy?cpu_ids=0&cpu=true&dram=false").status != 200:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert cpu_uj(daemon, 0) >= 3_000


def test_the_container_mount_is_preferred_unless_a_root_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 5: ``/zeus_sys/class/powercap`` (a bind mount of the host's tree) before ``/sys``."""
    from zeusd.options import ServeConfig
    from zeusd.service import discover_cpu_packages

    container, host = tmp_path / "zeus_sys" / "class" / "powercap", tmp_path / "sys" / "class" / "powercap"
    RaplTree(container).add_package(0, energy_uj=10).add_package(1, energy_uj=20)
    RaplTree(host).add_package(0, energy_uj=30)
    monkeypatch.setattr("zeusd.service.DEFAULT_RAPL_ROOTS", (str(container), str(host)))
    assert [p.index for p in discover_cpu_packages(ServeConfig())] == [0, 1]
    assert [p.index for p in discover_cpu_packages(ServeConfig(rapl_root=str(host)))] == [0]
    shutil.rmtree(tmp_path / "zeus_sys")
    assert [p.index for p in discover_cpu_packages(ServeConfig())] == [0]
