"""One open power stream: the response body parsed into samples, read with ``async for``."""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from zeusd.client.errors import ZeusdConnectionError, ZeusdProtocolError
from zeusd.client.sse import SSEParser, parse_power_event
from zeusd.client.types import DeviceKind, DevicePower

log = Logger()
T = TypeVar("T")


class Channel(Generic[T]):
    """A queue with one asynchronous reader and an end (clean or failed).

    ``high``/``low`` watermarks call ``pause``/``resume`` so a slow reader
    throttles the socket instead of growing memory; with ``drop_oldest`` a
    full channel forgets its oldest items instead (for lossy monitoring).
    """

    def __init__(
        self,
        high: int = 10_000,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        drop_oldest: bool = False,
    ) -> None:
        self._items: deque[T] = deque()
        self._high = high
        self._pause, self._resume = pause, resume
        self._paused = False
        self._drop_oldest = drop_oldest
        self._waiter: Deferred[None] | None = None
        self._ended = False
        self._error: BaseException | None = None
        self.dropped = 0

    @property
    def ended(self) -> bool:
        return self._ended

    def put(self, item: T) -> None:
        if self._ended:
            return
        if self._drop_oldest and len(self._items) >= self._high:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        if not self._drop_oldest and not self._paused and len(self._items) >= self._high and self._pause:
            self._paused = True
            self._pause()
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if not self._ended:
            self._ended, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def get(self) -> T:
        """The next item; StopAsyncIteration after a clean end, the error after a failed one."""
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            waiter: Deferred[None] = Deferred(lambda d: setattr(self, "_waiter", None))
            self._waiter = waiter
            await waiter
        item = self._items.popleft()
        if self._paused and len(self._items) <= self._high // 2 and self._resume:
            self._paused = False
            self._resume()
        return item


class _SSEProtocol(Protocol):
    """Receives the response body of a stream and feeds the parser."""

    def __init__(self, stream: "PowerStream") -> None:
        self._stream = stream

    def dataReceived(self, data: bytes) -> None:
        self._stream._data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._stream._lost(reason)


class PowerStream:
    """An open power stream of one daemon: ``async for sample in stream`` or ``await stream.run(cb)``.

    Yields :class:`DevicePower` samples in arrival order (one per device per
    event). Ends cleanly after :meth:`close` or when the daemon ends the
    response; raises :class:`ZeusdConnectionError` when the connection is lost
    or nothing (not even a keepalive comment) arrives for ``idle_timeout_s``.
    """

    def __init__(self, kind: DeviceKind, response: Any, reactor: Any, idle_timeout_s: float | None = None) -> None:
        self.kind = kind
        self.events = 0
        self.malformed = 0
        self._reactor = reactor
        self._parser = SSEParser()
        self._protocol = _SSEProtocol(self)
        self._channel: Channel[DevicePower] = Channel(pause=self._pause, resume=self._resume)
        self._idle_timeout_s = idle_timeout_s
        self._idle_call: IDelayedCall | None = None
        self._closing = False
        #: Called once when the stream ends (the client forgets it then).
        self.on_end: Callable[[], Any] | None = None
        self._arm_idle_timer()
        response.deliverBody(self._protocol)

    @property
    def ended(self) -> bool:
        """The stream is over (closed, finished by the daemon, or failed)."""
        return self._channel.ended

    def _transport(self) -> Any:
        return getattr(self._protocol, "transport", None)

    def _pause(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()

    def _resume(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resumeProducing()

    def _arm_idle_timer(self) -> None:
        if self._idle_timeout_s is None or self._channel.ended:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout_s)
        else:
            self._idle_call = self._reactor.callLater(self._idle_timeout_s, self._idle)

    def _idle(self) -> None:
        self._finish(ZeusdConnectionError(f"{self.kind} stream silent for {self._idle_timeout_s:g} s"))

    def _data(self, data: bytes) -> None:
        self._arm_idle_timer()
        try:
            payloads = self._parser.feed(data)
        except ZeusdProtocolError as e:
            self._finish(e)
            return
        for payload in payloads:
            try:
                samples = parse_power_event(self.kind, json.loads(payload))
            except (ValueError, TypeError, KeyError) as e:
                self.malformed += 1
                log.warn("Skipping a malformed {kind} SSE event ({error}): {payload!r}", kind=self.kind, error=e, payload=payload[:200])
                continue
            self.events += 1
            for sample in samples:
                self._channel.put(sample)

    def _lost(self, reason: Failure) -> None:
        if self._closing or reason.check(ResponseDone):
            self._finish(None)
        else:
            self._finish(ZeusdConnectionError(f"{self.kind} stream lost: {reason.getErrorMessage()}"))

    def _finish(self, error: BaseException | None) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        if self._channel.ended:
            return
        self._channel.end(error)
        if error is not None:
            self._abort()
        if self.on_end is not None:
            self.on_end()

    def _abort(self) -> None:
        transport = self._transport()
        if transport is not None:
            try:
                transport.stopProducing()
            except Exception:  # already gone
                pass

    def close(self) -> None:
        """Stop reading and drop the connection; the iteration ends cleanly."""
        self._closing = True
        self._finish(None)
        self._abort()

    def __aiter__(self) -> "PowerStream":
        return self

    async def __anext__(self) -> DevicePower:
        return await self._channel.get()

    async def run(self, callback: Callable[[DevicePower], Any]) -> None:
        """Call ``callback`` for every sample until the stream ends (or raise its error)."""
        async for sample in self:
            callback(sample)


__all__ = ["Channel", "PowerStream"]
