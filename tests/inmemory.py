"""The daemon's real resource tree in memory, for driving zeusd.client with ``treq.testing.StubTreq``.

The tree is the daemon's own (``make_service``) over a simulated node, started
as a runner starts it; only the socket is replaced (StubTreq's in-memory
connections) and the reactor is a ``MemoryReactorClock``. Device
calls still run on the managers' threads: their results come back through
``callFromThread``, which here queues them for the test thread, so a test runs
them in order and advances time only by ``node.reactor.advance(seconds)``.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, TypeVar, cast

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from zeusd.client import ZeusdClient
from zeusd.client.client import HTTPRequester
from zeusd.devices.executor import thread_executors
from zeusd.devices.gpu.manager import GpuManager
from zeusd.groups import ApiGroup
from zeusd.listeners import ListenerSpec
from zeusd.options import ServeConfig
from zeusd.service import ZeusdService, make_service
from zeusd.streaming import StreamHub

T = TypeVar("T")

#: The longest chain of requests one step runs without device work (a connect is about ten).
MAX_REQUEST_CHAIN = 64


@implementer(IReactorFromThreads)
class InMemoryReactor(MemoryReactorClock):
    """A clock and fake network whose ``callFromThread`` hands calls to the test thread."""

    def __init__(self) -> None:
        super().__init__()
        self._from_threads: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._pool = ThreadPool(1, 4, "inmemory-reactor")
        self._pool.start()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self._from_threads.put(lambda: callable(*args, **kwargs))

    def getThreadPool(self) -> ThreadPool:
        return self._pool

    def suggestThreadPoolSize(self, size: int) -> None:
        pass

    def run_from_thread(self, timeout: float) -> bool:
        """Run the next call a device thread handed back (waiting up to ``timeout``); False if none came."""
        try:
            call = self._from_threads.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return False
        call()
        return True

    def stop_threads(self) -> None:
        self._pool.stop()


class Gate(Resource):
    """The tree, or while ``down`` names a reason, a 503 with it: a daemon restarting or unwell."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner
        self.down: str | None = None

    def render(self, request: Any) -> Any:
        if self.down is None:
            return self.inner.render(request)
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": self.down}).encode()


@dataclass
class Node:
    """One simulated daemon reachable through ``stub``; ``client()`` talks to it."""

    reactor: InMemoryReactor
    service: ZeusdService
    gate: Gate
    stub: StubTreq
    key_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def gpus(self) -> GpuManager:
        manager: GpuManager = self.service.getServiceNamed("gpus").manager
        return manager

    @property
    def hubs(self) -> list[StreamHub]:
        hubs: list[StreamHub] = self.service.getServiceNamed("streams").hubs
        return hubs

    @property
    def http(self) -> HTTPRequester:
        """The stub as the client's HTTP client (StubTreq builds its request methods at run time)."""
        return cast(HTTPRequester, self.stub)

    def client(self, token: str | None = "", label: str = "node.test:4938", **kw: Any) -> ZeusdClient:
        return ZeusdClient(label, token, reactor=self.reactor, http=self.http, **kw)

    def resolve(self, d: "Deferred[T] | Coroutine[Any, Any, T]", timeout: float = 10.0) -> T:
        """Drive ``d`` to its result (see :meth:`run_until`)."""
        outcome: list[Any] = []
        ensureDeferred(d).addBoth(outcome.append)
        self.run_until(lambda: bool(outcome), timeout)
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        value: T = result
        return value

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """Run what is due now, pass bytes both ways and run device results until ``done()``.

        Fails (instead of hanging) when nothing is left to run: the test must
        then advance the clock for whatever it waits on.
        """
        deadline = time.monotonic() + timeout
        while True:
            # A flush passes what the connections hold; a request made in a callback during it
            # opens a connection the next flush serves, so chains of requests take several.
            for _ in range(MAX_REQUEST_CHAIN):
                self.reactor.advance(0)  # what is due now runs, as in one reactor iteration
                self.stub.flush()
                if done():
                    return
            if not self.reactor.run_from_thread(deadline - time.monotonic()):
                raise AssertionError("nothing left to run and not done yet: advance the clock?")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, then pass every byte that is ready."""
        self.reactor.advance(seconds)
        self.stub.flush()

    def settle(self) -> None:
        """Pass every byte that is ready, and run device results already handed back."""
        self.stub.flush()
        while self.reactor.run_from_thread(0):
            self.stub.flush()

    def close(self) -> None:
        stopped = self.service.stopService()
        self.settle()
        self.reactor.advance(1)  # the stream linger
        self.settle()
        assert stopped.called
        self.reactor.stop_threads()
        if self.key_dir is not None:
            self.key_dir.cleanup()


def simulated_node(
    gpus: int = 4, cpus: int = 2, *, signing_key: bytes | None = None, stream_format: str = "v0.4"
) -> Node:
    """The daemon's own service tree (``make_service``) over a simulated node, started in memory."""
    key_dir = None
    key_path = None
    if signing_key is not None:
        key_dir = tempfile.TemporaryDirectory(prefix="zeusd-inmemory-")
        key_path = os.path.join(key_dir.name, "signing.key")
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(signing_key)
    config = ServeConfig(
        listeners=(ListenerSpec("unix", path="/nonexistent/in-memory.sock"),),
        simulate=True, simulate_gpus=gpus, simulate_cpus=cpus, stream_format=stream_format,
        enabled_groups=(ApiGroup.GPU_CONTROL, ApiGroup.GPU_READ, ApiGroup.CPU_READ),
        signing_key_path=key_path,
    )
    reactor = InMemoryReactor()
    service = make_service(config, reactor, thread_executors(reactor), exit_on_startup_error=False)
    service.privilegedStartService()
    service.startService()
    gate = Gate(service.site.resource)
    return Node(reactor, service, gate, StubTreq(gate), key_dir)
