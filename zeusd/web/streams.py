"""SSE responses: the HTTP side of a power stream.

A stream is an HTTP/1.1 response with ``Content-Type: text/event-stream`` and
no length, so Twisted sends it chunked. :func:`stream_response` validates the
request, sends the headers at once (the client knows it is subscribed even
before the first event, or with an empty device list), subscribes a
:class:`ResponseSink` to the hub and returns the Deferred that finishes the
response when the subscription ends. The transport's flow control reaches the
subscriber through :class:`TransportFlow`.

Stream sockets get small send buffers (:func:`bound_send_buffers`), so a
reader that stops reading is noticed within seconds, not after the kernel has
queued megabytes for it.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from zeusd.streaming import Frame, StreamHub, Subscriber, UnknownStreamFormat
from zeusd.web.errors import BadRequest
from zeusd.web.fast_write import frame_writer

#: Kernel send buffer of a stream socket (Linux doubles it): fixed instead of
#: TCP autotuning's up to 4 MiB, so at a few hundred bytes a second a stalled
#: reader fills it within seconds and the stall clock starts. A reader across a
#: 100 ms round trip still gets over 150 KB/s through it, far above a stream's rate.
STREAM_SNDBUF_BYTES = 8 * 1024

#: What the transport may hold beyond that before it pauses the subscriber.
STREAM_TRANSPORT_BUFFER_BYTES = 2 * 1024

_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk, framed once per frame and written to every chunked subscriber as is."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class ResponseSink:
    """A subscriber's frames, written to its HTTP response (chunked when the response is)."""

    __slots__ = ("_transport", "write")

    def __init__(self, request: Any) -> None:
        # Kept from the start: a finished request lets go of its channel.
        self._transport = getattr(request.channel, "transport", None)
        # Frames are chunk-framed here, once per frame, and written below the
        # request (which would frame each write again, once per subscriber).
        # ``write`` is the writer itself: one call per frame and subscriber.
        self.write: Callable[[Frame], None] = frame_writer(
            request.channel, chunk if getattr(request, "chunked", False) else None
        )

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abortConnection()


@implementer(IPushProducer)
class TransportFlow:
    """The transport's producer callbacks, handed to the subscriber."""

    __slots__ = ("_subscriber",)

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def pauseProducing(self) -> None:
        self._subscriber.pause()

    def resumeProducing(self) -> None:
        self._subscriber.resume()

    def stopProducing(self) -> None:
        self._subscriber.hub.remove(self._subscriber)


def stream_response(hub: StreamHub, request: Any, ids: Sequence[int], format_name: str | None) -> "Deferred[None]":
    """Answer ``request`` (a ``twisted.web.server.Request``) with a stream of ``ids``' power;
    the Deferred fires, and the response finishes, when the stream ends."""
    try:
        hub.format(format_name)
    except UnknownStreamFormat as e:
        raise BadRequest(str(e)) from None
    for name, value in _HEADERS:
        request.setHeader(name, value)
    request.write(b"")  # the headers, now
    bound_send_buffers(getattr(request.channel, "transport", None))
    subscriber = hub.subscribe(ResponseSink(request), ids, format_name)
    flow = TransportFlow(subscriber)
    request.registerProducer(flow, True)

    request.notifyFinish().addBoth(lambda _: hub.remove(subscriber))  # the reader went away
    subscriber.done.addCallback(_unregister, request, flow)
    return subscriber.done


def _unregister(_: None, request: Any, flow: TransportFlow) -> None:
    # After connectionLost the request has no channel left to unregister from.
    if getattr(request, "producer", None) is flow and getattr(request, "channel", None) is not None:
        request.unregisterProducer()


def bound_send_buffers(transport: Any) -> None:
    """Shrink a socket transport's buffers for a long-lived stream (TLS transports are left alone)."""
    handle = getattr(transport, "getHandle", None)
    if handle is None or getattr(transport, "TLS", False):
        return
    sock = handle()
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF_BYTES)
        except OSError:
            pass  # the default buffer still works, the stall is only noticed later
        transport.bufferSize = STREAM_TRANSPORT_BUFFER_BYTES
