"""Stream responses (a hub and its web side) under faults, deterministically (``task.Clock``, no
sockets): a paused reader that resumes, one that stalls for good, a connection whose write raises, a
poller whose tick fails. The same over real sockets is tested in test_streaming.py."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.manual import ScriptedSampler, StreamRequest
from zeusd.devices.readings import Sample
from zeusd.sse import GPU_ENCODERS
from zeusd.streaming import StreamHub
from zeusd.web.streams import stream_response

HZ = 20
STALL_S = 30.0


def gpu_hub(clock: Clock, sampler: Any = None) -> StreamHub:
    """A 20 Hz GPU hub in the v0.5 format whose device 1 never answers (devices 0 and 2 do at once)."""
    return StreamHub(clock, "GPU", sampler or ScriptedSampler(clock, None), HZ, GPU_ENCODERS, "v0.5", 15.0, STALL_S)


def subscribe(hub: StreamHub, ids: list[int], request: StreamRequest | None = None) -> StreamRequest:
    """A stream response to ``request`` (a fresh one by default); its Deferred is ``request.done``."""
    request = request or StreamRequest()
    request.done = stream_response(hub, request, ids, None)  # type: ignore[attr-defined]
    return request


def stamps(request: StreamRequest) -> list[int]:
    """The timestamps of the events a request was sent, in order."""
    return [json.loads(e[len(b"data: "):])["timestamp_ms"] for e in request.events()]


def tick(clock: Clock, count: int = 1) -> None:
    for _ in range(count):
        clock.advance(1 / HZ)


def test_a_paused_reader_gets_only_the_newest_frame_when_it_resumes() -> None:
    clock = Clock()
    hub = gpu_hub(clock)
    request = subscribe(hub, [0])
    tick(clock, 3)
    before = len(request.events())
    assert before >= 3
    request.producer.pauseProducing()  # the connection's buffer is full
    tick(clock, 10)
    assert len(request.events()) == before  # nothing written while paused
    newest = int(clock.seconds() * 1000)
    request.producer.resumeProducing()
    assert len(request.events()) == before + 1 and stamps(request)[-1] == newest  # the 9 older frames are gone
    tick(clock)
    assert len(request.events()) == before + 2 and stamps(request)[-1] == newest + 1000 // HZ  # and it flows on
    assert hub.subscriber_count == 1


def test_a_reader_paused_past_the_stall_timeout_is_dropped_and_its_stream_ends() -> None:
    clock = Clock()
    hub = gpu_hub(clock)
    stalled, healthy = subscribe(hub, [0]), subscribe(hub, [0])
    ended: list[Any] = []
    stalled.producer.pauseProducing()
    stalled.done.addBoth(ended.append)  # type: ignore[attr-defined]
    tick(clock, int(STALL_S * HZ) - 1)  # just under the timeout: still kept
    assert hub.subscriber_count == 2 and not ended
    tick(clock, 2)
    assert hub.subscriber_count == 1 and ended == [None]
    assert stalled.producer is None  # unregistered from its connection
    sent = len(healthy.events())
    tick(clock)
    assert len(healthy.events()) == sent + 1


class FailingRequest(StreamRequest):
    """A connection whose write raises once the stream is under way (a broken socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken and data:
            raise OSError("Broken pipe")
        super().write(data)


def test_a_subscriber_whose_write_raises_is_dropped_and_the_others_keep_receiving() -> None:
    clock = Clock()
    hub = gpu_hub(clock)
    healthy = subscribe(hub, [0])
    failing = FailingRequest()
    subscribe(hub, [0], failing)  # the same channel: one loop writes to both
    tick(clock)
    assert failing.events() and hub.subscriber_count == 2
    failing.broken = True
    sent = len(healthy.events())
    tick(clock)
    assert hub.subscriber_count == 1 and failing.producer is None
    assert len(healthy.events()) == sent + 1
    tick(clock, 5)
    assert len(healthy.events()) == sent + 6


class FailingOnceSampler(ScriptedSampler):
    """Raises from one ``sample`` call (a bug in a tick), then samples as before."""

    def __init__(self, clock: Clock, fail_at: int) -> None:
        super().__init__(clock, None)
        self.calls = 0
        self.fail_at = fail_at

    def sample(self, ids: Any, within_s: float) -> Deferred[Sample | None]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a bug in a tick")
        return super().sample(ids, within_s)


def test_a_poller_whose_tick_raises_restarts_one_period_later() -> None:
    clock = Clock()
    sampler = FailingOnceSampler(clock, fail_at=3)
    hub = gpu_hub(clock, sampler)
    request = subscribe(hub, [0])  # tick 1 runs now
    tick(clock)  # tick 2
    sent = len(request.events())
    assert hub.running and sent >= 2
    tick(clock)  # tick 3 raises: the loop stops
    assert not hub.running and len(request.events()) == sent
    tick(clock)  # one period later it starts again (and ticks at once)
    assert hub.running and len(request.events()) == sent + 1
    tick(clock, 4)
    assert len(request.events()) == sent + 5 and hub.subscriber_count == 1


def test_a_failed_poller_does_not_restart_once_its_subscribers_left() -> None:
    clock = Clock()
    hub = gpu_hub(clock, FailingOnceSampler(clock, fail_at=2))
    request = subscribe(hub, [0])
    tick(clock)  # tick 2 raises
    assert not hub.running
    request.finished.callback(None)  # the reader goes away before the restart
    tick(clock, 3)
    assert not hub.running and hub.subscriber_count == 0
