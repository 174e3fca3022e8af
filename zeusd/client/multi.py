"""Many daemons as one stream of readings: clock offsets, reconnection, merging."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from zeusd.client.addresses import ServerAddress, as_address
from zeusd.client.client import DEFAULT_TIMEOUT_S, HTTPRequester, ZeusdClient
from zeusd.client.errors import ZeusdAuthError, ZeusdError
from zeusd.client.streams import Channel, PowerStream
from zeusd.client.types import KINDS, DeviceKind, DevicePower, Discovery, PowerReading, ServerStatus

log = Logger()


class MultiPowerStream:
    """Power of every GPU and CPU package of many daemons, as one stream.

    For each daemon: ``/discover``, the clock offset (median of five ``/time``
    round trips), then one stream per device kind that the daemon serves. When
    a stream ends or fails (daemon restarted, network gone, nothing heard for
    ``idle_timeout_s``), the daemon is retried after ``backoff_initial_s``,
    doubling up to ``backoff_max_s``, reset once readings flow again; the offset
    is measured anew on every connection. 401/403 stop that daemon for good.

    Readings are delivered in arrival order through ``async for``, the
    ``on_reading`` callback, and ``latest`` (newest per device; a daemon's
    entries are removed while it is disconnected). The iteration buffer keeps
    at most ``max_buffered`` readings (oldest dropped), so a consumer that only
    uses the callback or ``latest`` costs no memory. ``http`` gives each
    server's client its HTTP client (see :class:`~zeusd.client.HTTPRequester`).
    """

    def __init__(
        self,
        servers: Sequence[ServerAddress | str],
        token: str | None = None,
        *,
        reactor: Any = None,
        kinds: Sequence[DeviceKind] = KINDS,
        format: str | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        idle_timeout_s: float | None = 45.0,
        clock_samples: int = 5,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ca_file: str | None = None,
        on_reading: Callable[[PowerReading], Any] | None = None,
        on_status: Callable[[ServerStatus], Any] | None = None,
        max_buffered: int = 100_000,
        http: Callable[[ServerAddress], HTTPRequester] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if not servers:
            raise ValueError("at least one server is needed")
        self._reactor = reactor
        addresses = [as_address(s) for s in servers]
        self._clients = [
            ZeusdClient(a, token, reactor=reactor, timeout_s=timeout_s, ca_file=ca_file, http=None if http is None else http(a))
            for a in addresses
        ]
        labels = [c.label for c in self._clients]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a server is listed twice: {labels}")
        self.kinds = tuple(kinds)
        self.format = format
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.idle_timeout_s = idle_timeout_s
        self.clock_samples = clock_samples
        self.on_reading = on_reading
        self.on_status = on_status
        self.status: dict[str, ServerStatus] = {label: ServerStatus(label) for label in labels}
        self.latest: dict[tuple[str, DeviceKind, int], PowerReading] = {}
        self._channel: Channel[PowerReading] = Channel(high=max_buffered, drop_oldest=True)
        self._workers: list[Deferred[None]] = []
        self._running = False

    @property
    def servers(self) -> list[str]:
        return list(self.status)

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for client in self._clients:
            d = ensureDeferred(self._run_server(client))
            d.addErrback(self._worker_died, client.label)
            self._workers.append(d)

    @staticmethod
    def _worker_died(failure: Failure, label: str) -> None:
        if not failure.check(CancelledError):
            log.failure("Power stream worker for {server} died", failure, server=label)

    async def stop(self) -> None:
        """Stop every worker and close every connection; the iteration ends."""
        self._running = False
        for d in self._workers:
            d.cancel()
        self._workers.clear()
        for client in self._clients:
            await client.close()
        for status in self.status.values():
            status.state = "stopped"
        self._channel.end()

    async def __aenter__(self) -> "MultiPowerStream":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> "MultiPowerStream":
        return self

    async def __anext__(self) -> PowerReading:
        return await self._channel.get()

    @property
    def dropped(self) -> int:
        """Readings the iteration buffer discarded because nobody iterated."""
        return self._channel.dropped

    def _update(self, label: str, **changes: Any) -> None:
        status = self.status[label]
        for name, value in changes.items():
            setattr(status, name, value)
        if self.on_status is not None:
            self.on_status(status)

    def _forget(self, label: str) -> None:
        for key in [k for k in self.latest if k[0] == label]:
            del self.latest[key]

    def _emit(self, label: str, sample: DevicePower, offset_s: float) -> None:
        reading = PowerReading(
            label,
            sample.kind,
            sample.index,
            sample.power_mw / 1000,
            sample.timestamp_ms / 1000 + offset_s,
            None if sample.dram_mw is None else sample.dram_mw / 1000,
            sample.timestamp_ms,
        )
        self.latest[(label, reading.kind, reading.index)] = reading
        self._channel.put(reading)
        if self.on_reading is not None:
            self.on_reading(reading)

    async def _run_server(self, client: ZeusdClient) -> None:
        label = client.label
        delay = self.backoff_initial_s
        while self._running:
            streams: list[PowerStream] = []
            flowing = [False]
            try:
                self._update(label, state="connecting", retry_in_s=None)
                discovery = await client.discover()
                offset = await client.clock_offset(self.clock_samples)
                kinds = tuple(k for k in self.kinds if _serves(discovery, k))
                if discovery.auth_required:
                    if not client.token:
                        raise ZeusdAuthError(401, "the daemon requires a token (--token or $ZEUSD_TOKEN)")
                    scopes = (await client.whoami()).scopes
                    kinds = tuple(k for k in kinds if f"{k}-read" in scopes)
                self._update(label, discovery=discovery, offset=offset, kinds=kinds)
                if not kinds:
                    self._update(label, state="failed", error="nothing to stream: no devices, or groups/scopes missing")
                    return
                for kind in kinds:
                    streams.append(
                        await client.stream_power(kind, format=self.format, idle_timeout_s=self.idle_timeout_s)
                    )
                self._update(label, state="streaming", error=None, connects=self.status[label].connects + 1)
                log.info("Streaming {kinds} power from {server} (clock offset {offset:+.4f} s)",
                         kinds="+".join(kinds), server=label, offset=offset.offset_s)

                def on_sample(sample: DevicePower, offset_s: float = offset.offset_s) -> None:
                    flowing[0] = True
                    self._emit(label, sample, offset_s)

                runs = [ensureDeferred(s.run(on_sample)) for s in streams]
                try:
                    await DeferredList(runs, fireOnOneCallback=True, fireOnOneErrback=True, consumeErrors=True)
                except FirstError as e:
                    sub = e.subFailure.value
                    raise sub if isinstance(sub, BaseException) else ZeusdError(str(sub)) from None
                error = "stream ended"
            except CancelledError:
                raise
            except ZeusdAuthError as e:
                self._forget(label)
                self._update(label, state="failed", error=str(e))
                log.warn("{server}: {error}; not retrying", server=label, error=str(e))
                return
            except Exception as e:
                error = str(e) or type(e).__name__
            finally:
                for stream in streams:
                    stream.close()
            self._forget(label)
            if not self._running:
                return
            if flowing[0]:
                delay = self.backoff_initial_s
            self._update(label, state="backoff", error=error, retry_in_s=delay)
            log.info("{server}: {error}; reconnecting in {delay:g} s", server=label, error=error, delay=delay)
            await deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, self.backoff_max_s)


def _serves(discovery: Discovery, kind: DeviceKind) -> bool:
    if kind == "gpu":
        return discovery.enabled("gpu-read") and bool(discovery.gpus)
    return discovery.enabled("cpu-read") and bool(discovery.cpus)


__all__ = ["MultiPowerStream"]
