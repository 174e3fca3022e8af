"""RAPL energy stays exact under concurrent readers (MonotonicEnergy).

A zone's raw read and its wraparound bookkeeping are one step: a reader that
read an older raw value can never book it after a newer one, which would look
like a small step backwards and be added to the offset for good (over-counting).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent

from zeusd.devices.cpu.base import MonotonicEnergy

RANGE_UJ = 1_000_000


class ScriptedZone:
    """A counter that advances by the next increment at every raw read, wrapping at RANGE_UJ.

    ``hold_first``: the first read blocks until the test releases it. ``inside``
    counts raw reads in progress; ``max_inside`` above 1 means two overlapped.
    """

    name = "package-0"
    max_energy_range_uj = RANGE_UJ

    def __init__(self, start_uj: int, increments: Iterator[int], hold_first: bool = False) -> None:
        self.true_uj = start_uj
        self._increments = increments
        self._guard = threading.Lock()
        self.changed = threading.Condition()
        self.inside = 0
        self.max_inside = 0
        self.reads = 0
        self.first_inside = threading.Event()
        self.release_first = threading.Event()
        self._hold_first = hold_first

    def read_raw_uj(self) -> int:
        with self.changed:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.reads += 1
            first = self.reads == 1
            self.changed.notify_all()
        with self._guard:
            self.true_uj += next(self._increments, 0)
            raw = self.true_uj % RANGE_UJ
        if first and self._hold_first:
            self.first_inside.set()
            assert self.release_first.wait(10)
        else:
            time.sleep(0)  # let another thread run between the read and its booking
        with self.changed:
            self.inside -= 1
        return raw


class WatchedLock:
    """A lock that says when someone has to wait for it."""

    def __init__(self, zone: ScriptedZone) -> None:
        self._lock = threading.Lock()
        self._zone = zone
        self.contended = False

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            with self._zone.changed:
                self.contended = True
                self._zone.changed.notify_all()
            self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def in_thread(fn: Callable[[], int]) -> tuple[threading.Thread, list[int]]:
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_a_reader_holding_an_older_raw_value_cannot_book_it_after_a_newer_one() -> None:
    zone = ScriptedZone(0, iter([100, 100, 100]), hold_first=True)  # raw values 100, 200, 300
    energy = MonotonicEnergy(zone)
    lock = WatchedLock(zone)
    energy._lock = lock  # type: ignore[assignment]
    first, first_out = in_thread(energy.read_uj)
    assert zone.first_inside.wait(10)
    second, second_out = in_thread(energy.read_uj)
    with zone.changed:  # the second reader either waits for the lock, or (the bug) reads alongside
        assert zone.changed.wait_for(lambda: lock.contended or zone.inside == 2, timeout=10)
    zone.release_first.set()
    first.join(10)
    second.join(10)
    assert (first_out, second_out) == ([100], [200])
    assert energy.read_uj() == 300  # the true counter: nothing was added to the offset
    assert zone.max_inside == 1


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, RANGE_UJ - 1),
    increments=st.lists(st.integers(0, RANGE_UJ // 2 - 1), min_size=1, max_size=60),
    readers=st.integers(1, 4),
)
def test_reported_energy_is_monotonic_and_exact_under_concurrency(start: int, increments: list[int], readers: int) -> None:
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the reader threads as much as possible
    try:
        zone = ScriptedZone(start, iter(increments))
        energy = MonotonicEnergy(zone)
        first = energy.read_uj()
        seen: list[list[int]] = [[] for _ in range(readers)]
        per_reader = -(-len(increments) // readers)

        def read(mine: list[int]) -> None:
            for _ in range(per_reader):
                mine.append(energy.read_uj())

        threads = [threading.Thread(target=read, args=(seen[i],)) for i in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        last = energy.read_uj()
    finally:
        sys.setswitchinterval(switch)
    assert all(a <= b for values in seen for a, b in zip(values, values[1:]))
    assert all(first <= v <= last for values in seen for v in values)
    assert last - first == zone.true_uj - start - increments[0]  # every µJ after the first read, once
    assert zone.max_inside == 1


# One reader, raw values chosen by the test: the wraparound rule at its boundary ------------------------------


class ListedZone:
    """Raw counter values in the order the test lists them (range 1_000_001 uJ: an odd range has an exact half)."""

    name = "package-1"
    max_energy_range_uj = 1_000_001

    def __init__(self, *raws: int) -> None:
        self.raws = list(raws)

    def read_raw_uj(self) -> int:
        return self.raws.pop(0)


def booked(*raws: int) -> list[int]:
    energy = MonotonicEnergy(ListedZone(*raws))
    return [energy.read_uj() for _ in raws]


def test_a_drop_of_more_than_half_the_range_is_a_wrap_and_counts_the_energy_across_it() -> None:
    half = 1_000_001 // 2  # 500_000
    # From 900_000 to 399_999 is a drop of 500_001 > half: the counter passed its range, 500_000 uJ later.
    assert booked(900_000, 399_999, 400_010) == [900_000, 1_400_000, 1_400_011]
    assert booked(900_000, 900_000 - half - 1)[1] == 900_000 - half - 1 + 1_000_001
    # Two wraps add two ranges.
    assert booked(990_000, 10, 990_000, 20) == [990_000, 1_000_011, 1_990_001, 2_000_022]


def test_a_drop_of_at_most_half_the_range_is_a_faulty_reading_absorbed_for_good() -> None:
    events: list[str] = []
    with capturedLogs() as logged:
        # A drop of exactly half is no wrap: the value holds, and the next steps count from there.
        values = booked(900_000, 400_000, 400_005, 400_105)
        events = [formatEvent(e) for e in logged]
    assert values == [900_000, 900_000, 900_005, 900_105]
    assert events == ["RAPL zone package-1 went backwards from 900000 to 400000 uJ; ignoring the step"]
    assert booked(5_000, 4_990, 4_990, 5_000) == [5_000, 5_000, 5_000, 5_010]  # a small step, then a repeat
    assert booked(1_000, 2_000, 1_500, 1_000, 1_200) == [1_000, 2_000, 2_000, 2_000, 2_200]  # offsets add up


def test_each_read_notes_when_it_happened_for_the_wraparound_guard() -> None:
    energy = MonotonicEnergy(ListedZone(1, 2))
    assert energy.last_read_at == float("-inf")  # never read: stale for any guard interval
    before = time.monotonic()
    energy.read_uj()
    assert before <= energy.last_read_at <= time.monotonic()
