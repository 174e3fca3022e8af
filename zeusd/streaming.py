"""Demand-driven power polling and SSE fan-out.

One :class:`StreamHub` per device kind owns one ``LoopingCall``. It starts
when the first subscriber arrives and stops when the last one leaves, so an
idle daemon reads no device and wakes no timer. Each tick reads the union of
the devices subscribers asked for, once, off the reactor thread, and
publishes within its period whatever answered in time: a slow or hung device
is left out of the ticks it misses and never holds up the others (see
:mod:`zeusd.devices.sampling`). Subscribers with the same filter and format share one
channel: a sample is encoded (and chunk-framed) once per channel and the same
bytes are written to every subscriber in it.

Slow readers: each subscriber is a streaming producer registered with its
HTTP connection. While the connection's buffer is full the subscriber is
paused and keeps only the newest frame, which it sends when resumed; one
paused for longer than the stall timeout is disconnected. Stream sockets get
small send buffers (:func:`bound_send_buffers`), so a reader that stops
reading is noticed within seconds, not after the kernel has queued megabytes
for it. Memory per subscriber is therefore bounded by those buffers plus one
frame.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zeusd.devices.readings import Sample
from zeusd.devices.sampling import TICK_DEADLINE_SHARE, Sampler
from zeusd.errors import BadRequest
from zeusd.sse import KEEPALIVE, Encoder, chunked

log = Logger()



def _plain_socket(transport: Any) -> bool:
    """A transport that owns its socket: not a TLS wrapper, which forwards
    unknown attributes (``writeSomeData``, ``socket``) to the socket beneath it."""
    return isinstance(transport, FileDescriptor) and not getattr(transport, "TLS", False)


def direct_writer(request: Any) -> Callable[[bytes], None]:
    """A write function for one stream that sends right away when it can.

    ``transport.write`` only buffers: the bytes leave on the reactor's next
    pass, after two epoll registrations. For a fan-out of small frames to
    thousands of sockets that bookkeeping is most of the cost, so when the
    transport has nothing queued the frame goes straight to the socket, and
    only what the kernel did not take is left to the transport (whose buffer
    and producer pausing then work as usual). Other transports (TLS) always
    buffer: writing past a TLS layer would put plaintext on the wire.
    """
    channel = request.channel
    buffered: Callable[[bytes], None] = channel.write
    transport = channel.transport
    if not _plain_socket(transport):
        return buffered
    send = getattr(transport, "writeSomeData", None)
    if send is None or not hasattr(transport, "_tempDataLen"):
        return buffered

    def write(data: bytes) -> None:
        if not (transport.dataBuffer or transport._tempDataLen or transport.disconnecting) and transport.connected:
            sent = send(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        buffered(data)

    return write


#: Kernel send buffer of a stream socket (Linux doubles it): fixed instead of
#: TCP autotuning's up to 4 MiB, so at a few hundred bytes a second a stalled
#: reader fills it within seconds and the stall clock starts. A reader across a
#: 100 ms round trip still gets over 150 KB/s through it, far above a stream's rate.
STREAM_SNDBUF_BYTES = 8 * 1024

#: What the transport may hold beyond that before it pauses the subscriber.
STREAM_TRANSPORT_BUFFER_BYTES = 2 * 1024


def bound_send_buffers(transport: Any) -> None:
    """Shrink a plain socket transport's buffers for a long-lived stream."""
    if not _plain_socket(transport):
        return
    sock = getattr(transport, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
        except OSError:
            pass  # the default buffer still works, the stall is only noticed later
    transport.bufferSize = STREAM_TRANSPORT_BUFFER_BYTES


@implementer(IPushProducer)
class Subscriber:
    """One SSE response: writes frames, or holds the newest while its reader lags."""

    __slots__ = ("request", "channel", "done", "_write", "_chunked", "paused_since", "pending", "hub")

    def __init__(self, hub: "StreamHub", request: Any, channel: "Channel") -> None:
        self.hub = hub
        self.request = request
        self.channel = channel
        self.paused_since: float | None = None
        self.pending: bytes | None = None
        #: Fires when the stream ends; the web framework holds the response open until then.
        self.done: Deferred[None] = Deferred()
        self._chunked = bool(getattr(request, "chunked", False))
        self._write: Callable[[bytes], None] = direct_writer(request)

    def send(self, payload: bytes, framed: bytes, now: float) -> None:
        """Write a frame now, or keep it as the newest while paused (``now``: the hub's clock)."""
        data = framed if self._chunked else payload
        if self.paused_since is None:
            self._write(data)
            return
        self.pending = data
        if now - self.paused_since > self.hub.stall_timeout_s:
            log.info("Dropping a stream subscriber stalled for {s:.0f} s", s=now - self.paused_since)
            self.hub.drop(self)

    # IPushProducer: called by the connection as its buffer fills and drains.
    def pauseProducing(self) -> None:
        if self.paused_since is None:
            self.paused_since = self.hub.now()

    def resumeProducing(self) -> None:
        self.paused_since = None
        if self.pending is not None:
            data, self.pending = self.pending, None
            self._write(data)

    def stopProducing(self) -> None:
        self.hub.remove(self)


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
        framed = chunked(payload)
        self.last_sent = now
        for subscriber in tuple(self.subscribers):
            try:
                subscriber.send(payload, framed, now)
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

    def encoder(self, name: str | None) -> tuple[str, Encoder]:
        name = name or self._default_format
        encoder = self._encoders.get(name)
        if encoder is None:
            raise BadRequest(f"Unknown stream format '{name[:40]}'. Available: {', '.join(self._encoders)}")
        return name, encoder

    def subscribe(self, request: Any, ids: Sequence[int], format_name: str | None) -> "Deferred[None]":
        name, encoder = self.encoder(format_name)
        key = (tuple(ids), name)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel(key, encoder, self.now())
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"")  # headers now: the client knows it is subscribed
        bound_send_buffers(request.channel.transport)
        subscriber = Subscriber(self, request, channel)
        channel.subscribers.add(subscriber)
        request.registerProducer(subscriber, True)
        request.notifyFinish().addBoth(lambda _: self.remove(subscriber))
        self._demand_changed()
        fresh = self.fresh_sample(self.period)
        if fresh is not None:
            payload = encoder(fresh, channel.ids)
            if payload:
                subscriber.send(payload, chunked(payload), self.now())
        return subscriber.done

    def remove(self, subscriber: Subscriber) -> None:
        channel = subscriber.channel
        if subscriber not in channel.subscribers:
            return
        channel.subscribers.discard(subscriber)
        request = subscriber.request
        # After connectionLost the request has no channel left to unregister from.
        if getattr(request, "producer", None) is subscriber and getattr(request, "channel", None) is not None:
            request.unregisterProducer()
        if not channel.subscribers:
            del self._channels[channel.key]
        self._demand_changed()
        if not subscriber.done.called:
            subscriber.done.callback(None)

    def drop(self, subscriber: Subscriber) -> None:
        """Disconnect a subscriber (stalled, or failing)."""
        transport = getattr(getattr(subscriber.request, "channel", None), "transport", None)
        self.remove(subscriber)
        if transport is not None:
            transport.abortConnection()

    def close_all(self) -> int:
        """End every stream cleanly (the response finishes with its last chunk) and stop polling;
        returns how many streams were ended."""
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
