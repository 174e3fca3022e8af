"""Demand-driven power polling and fan-out of encoded samples to subscribers.

One :class:`StreamHub` per device kind owns one ``LoopingCall``. It starts
when the first subscriber arrives and stops when the last one leaves, so an
idle daemon reads no device and wakes no timer. Each tick reads the union of
the devices subscribers asked for, once, off the reactor thread, and
publishes within its period whatever answered in time: a slow or hung device
is left out of the ticks it misses and never holds up the others (see
:mod:`zeusd.devices.sampling`). Subscribers with the same filter and format
share one channel: a sample is encoded once per channel, into one
:class:`Frame` that every subscriber of the channel is given.

The hub knows nothing of HTTP: a subscriber writes frames to a
:class:`StreamSink` (the web layer's is an SSE response, :mod:`zeusd.web.streams`),
and is told by its transport when to pause and resume. While paused it keeps
only the newest frame, which it sends when resumed; one paused for longer
than the stall timeout is dropped. Memory per subscriber is therefore bounded
by its transport's buffers plus one frame.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.devices.readings import Sample
from zeusd.devices.sampling import TICK_DEADLINE_SHARE, Sampler
from zeusd.sse import KEEPALIVE, Encoder

log = Logger()


class UnknownStreamFormat(ValueError):
    """A stream format that is not one of the hub's encodings."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        super().__init__(f"Unknown stream format '{name[:40]}'. Available: {', '.join(available)}")
        self.name = name
        self.available = tuple(available)


class Frame:
    """One encoded sample (or keepalive) for every subscriber of a channel.

    A sink that sends it in another form (an HTTP chunk) derives that form
    once per frame with :meth:`encoded`, not once per subscriber.
    """

    __slots__ = ("payload", "_encode", "_form", "_forms")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self._encode: Callable[[bytes], bytes] | None = None
        self._form = b""
        self._forms: dict[Callable[[bytes], bytes], bytes] | None = None

    def encoded(self, encode: Callable[[bytes], bytes]) -> bytes:
        """``encode(payload)``, computed once per frame (and per encoding)."""
        if encode is self._encode:
            return self._form
        if self._encode is None:
            self._encode, self._form = encode, encode(self.payload)
            return self._form
        forms = self._forms = self._forms or {}
        if encode not in forms:
            forms[encode] = encode(self.payload)
        return forms[encode]


class StreamSink(Protocol):
    """Where one subscriber's frames go."""

    def write(self, frame: Frame) -> None:
        """Send now (the sink's transport may buffer what the peer has not taken yet)."""

    def abort(self) -> None:
        """Drop the connection (a stalled or failing reader)."""


class Subscriber:
    """One subscription: writes frames, or holds the newest while its reader lags.

    ``done`` fires when the subscription ends (the web layer finishes the
    response then).
    """

    __slots__ = ("hub", "channel", "sink", "done", "paused_since", "pending")

    def __init__(self, hub: "StreamHub", channel: "Channel", sink: StreamSink) -> None:
        self.hub = hub
        self.channel = channel
        self.sink = sink
        self.paused_since: float | None = None
        self.pending: Frame | None = None
        self.done: Deferred[None] = Deferred()

    def send(self, frame: Frame, now: float) -> None:
        if self.paused_since is None:
            self.sink.write(frame)
            return
        self.pending = frame
        if now - self.paused_since > self.hub.stall_timeout_s:
            log.info("Dropping a stream subscriber stalled for {s:.0f} s", s=now - self.paused_since)
            self.hub.drop(self)

    # Flow control: called by the transport as its buffer fills and drains.
    def pause(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.hub.now()

    def resume(self) -> None:
        self.paused_since = None
        if self.pending is not None:
            frame, self.pending = self.pending, None
            self.sink.write(frame)


class Channel:
    """Subscribers sharing a device filter and a format: one encoding per sample."""

    __slots__ = ("key", "ids", "encoder", "subscribers", "last_sent")

    def __init__(self, key: tuple[tuple[int, ...], str], encoder: Encoder, now: float) -> None:
        self.key = key
        self.ids = key[0]
        self.encoder = encoder
        self.subscribers: set[Subscriber] = set()
        self.last_sent = now

    def publish(self, payload: bytes, now: float) -> None:
        if not payload:
            return
        frame = Frame(payload)
        self.last_sent = now
        for subscriber in tuple(self.subscribers):
            try:
                subscriber.send(frame, now)
            except Exception:
                # One broken connection must never stop the stream for the others.
                log.failure("Dropping a stream subscriber that failed")
                subscriber.hub.drop(subscriber)


class StreamHub:
    """The poller and subscribers of one device kind."""

    def __init__(
        self,
        reactor: Any,
        kind: str,
        sampler: Sampler,
        poll_hz: int,
        encoders: Mapping[str, Encoder],
        default_format: str,
        keepalive_s: float = 15.0,
        stall_timeout_s: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self.keepalive_s = keepalive_s
        self.stall_timeout_s = stall_timeout_s
        self.kind = kind
        self.sampler = sampler
        self.period = 1.0 / poll_hz
        self._encoders = encoders
        self._default_format = default_format
        self._channels: dict[tuple[tuple[int, ...], str], Channel] = {}
        self._wanted: list[int] = []
        self._loop: LoopingCall | None = None
        self._latest: tuple[float, Sample] | None = None
        self.ticks = 0

    def now(self) -> float:
        """The hub's clock (the reactor's), for keepalives and stall timeouts."""
        return float(self._reactor.seconds())

    # Introspection -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._loop is not None

    @property
    def subscriber_count(self) -> int:
        return sum(len(c.subscribers) for c in self._channels.values())

    def fresh_sample(self, max_age_s: float) -> Sample | None:
        """The current session's newest sample, if it is at most ``max_age_s`` old."""
        if self._loop is None or self._latest is None:
            return None
        taken, sample = self._latest
        return sample if self.now() - taken <= max_age_s else None

    # Subscribing ---------------------------------------------------------------

    def format(self, name: str | None) -> str:
        """The format a subscription with ``name`` gets (the default for None); raises UnknownStreamFormat."""
        name = name or self._default_format
        if name not in self._encoders:
            raise UnknownStreamFormat(name, list(self._encoders))
        return name

    def subscribe(self, sink: StreamSink, ids: Sequence[int], format_name: str | None) -> Subscriber:
        """Start sending ``ids``' samples to ``sink``; the first frame is fresh data only."""
        name = self.format(format_name)
        key = (tuple(ids), name)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel(key, self._encoders[name], self.now())
        subscriber = Subscriber(self, channel, sink)
        channel.subscribers.add(subscriber)
        self._demand_changed()
        fresh = self.fresh_sample(self.period)
        if fresh is not None:
            payload = channel.encoder(fresh, channel.ids)
            if payload:
                subscriber.send(Frame(payload), self.now())
        return subscriber

    def remove(self, subscriber: Subscriber) -> None:
        """End a subscription (its reader went away, or the daemon stops)."""
        channel = subscriber.channel
        if subscriber not in channel.subscribers:
            return
        channel.subscribers.discard(subscriber)
        if not channel.subscribers:
            del self._channels[channel.key]
        self._demand_changed()
        if not subscriber.done.called:
            subscriber.done.callback(None)

    def drop(self, subscriber: Subscriber) -> None:
        """Disconnect a subscriber (stalled, or failing)."""
        self.remove(subscriber)
        subscriber.sink.abort()

    def close_all(self) -> int:
        """End every stream cleanly and stop polling; returns how many streams were ended."""
        ended = 0
        for channel in list(self._channels.values()):
            for subscriber in list(channel.subscribers):
                self.remove(subscriber)
                ended += 1
        self._stop()
        return ended

    # Polling -------------------------------------------------------------------

    def _demand_changed(self) -> None:
        self._wanted = sorted({i for key in self._channels for i in key[0]})
        if self._channels and self._loop is None:
            self._start()
        elif not self._channels and self._loop is not None:
            self._stop()

    def _start(self) -> None:
        log.info("{kind} power poller started at {hz:g} Hz", kind=self.kind, hz=1 / self.period)
        self.sampler.reset()
        self._latest = None
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self._reactor
        loop.start(self.period, now=True).addErrback(self._loop_failed)

    def _stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
            log.info("{kind} power poller stopped", kind=self.kind)

    def _loop_failed(self, failure: Failure) -> None:
        log.failure("{kind} power poller failed; restarting it in one period", failure, kind=self.kind)
        self._loop = None
        self._reactor.callLater(self.period, self._restart)

    def _restart(self) -> None:
        if self._channels and self._loop is None:
            self._start()

    def _tick(self) -> None:
        self.ticks += 1
        now = self.now()
        for channel in self._channels.values():
            if now - channel.last_sent >= self.keepalive_s:
                channel.publish(KEEPALIVE, now)
        if not self._wanted:
            return
        # Not returned to the LoopingCall: the next tick comes on time whatever the devices do.
        sampled = self.sampler.sample(self._wanted, self.period * TICK_DEADLINE_SHARE)
        sampled.addCallback(self._publish, self._loop).addErrback(
            lambda f: log.failure("{kind} power sample failed", f, kind=self.kind)
        )

    def _publish(self, sample: Sample | None, loop: LoopingCall | None) -> None:
        if sample is None or loop is not self._loop:
            return  # priming, or a tick from a session that has ended
        now = self.now()
        self._latest = (now, sample)
        for channel in tuple(self._channels.values()):
            channel.publish(channel.encoder(sample, channel.ids), now)
