"""What the tests of zeusd.client (the treq client) share: a test daemon's address as the client takes it,
and a deadline for a coroutine run on the real reactor."""

from __future__ import annotations

from typing import Any, Coroutine, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from tests.daemon import Daemon
from zeusd.client import ServerAddress

T = TypeVar("T")

def within(seconds: float, coro: Coroutine[Any, Any, T]) -> "Deferred[T]":
    d: Deferred[T] = ensureDeferred(coro)
    d.addTimeout(seconds, reactor)
    return d


def address(daemon: Daemon) -> ServerAddress:
    t = daemon.transport
    if t.kind == "unix":
        return ServerAddress("unix", path=str(t.address))
    return ServerAddress("http", host="127.0.0.1", port=int(t.address))
