"""The two places zeusd relies on what Twisted does not promise, checked against the installed Twisted.

If an upgrade removes or renames them, these tests fail loudly (the daemon
itself degrades to the public path: the buffered write, Twisted's plain 400).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.http import HTTPChannel
from twisted.web.test.requesthelper import DummyChannel

from zeusd.streaming import Frame
from zeusd.web.fast_write import PRIVATE_ATTRIBUTES, fast_path_available, frame_writer
from zeusd.web.limits import DeadlineChannel


def test_twisted_still_answers_bad_requests_through_the_overridden_hook() -> None:
    assert callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None))
    assert "_respondToBadRequestAndDisconnect" in vars(DeadlineChannel)


@pytest_twisted.inlineCallbacks
def test_a_real_socket_transport_has_what_the_fast_path_uses() -> Any:
    """A real connection's server-side transport has every private attribute the fast path touches."""
    accepted: list[Any] = []

    class Keep(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self.transport)

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Keep))
    try:
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        while not accepted:
            yield deferLater(reactor, 0, lambda: None)
        transport = accepted[0]
        missing = [name for name in PRIVATE_ATTRIBUTES if not hasattr(transport, name)]
        assert missing == [], f"Twisted no longer has {missing} on socket transports: the stream fast path is off"
        assert fast_path_available(transport)
        assert isinstance(transport.dataBuffer, bytes) and isinstance(transport._tempDataLen, int)

        class Channel:
            buffered: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.buffered.append(data)

        channel = Channel()
        channel.transport = transport  # type: ignore[attr-defined]
        received: list[bytes] = []
        client.dataReceived = received.append
        frame_writer(channel, lambda payload: b"<" + payload + b">")(Frame(b"frame"))
        assert channel.buffered == [] and transport.dataBuffer == b""  # straight to the socket, not buffered
        while not received:
            yield deferLater(reactor, 0, lambda: None)
        assert b"".join(received) == b"<frame>"
        client.transport.loseConnection()
        transport.loseConnection()
    finally:
        yield port.stopListening()


def test_a_transport_without_them_gets_the_public_write() -> None:
    channel = DummyChannel()
    assert not fast_path_available(channel.transport)
    frame_writer(channel, None)(Frame(b"frame"))
    assert channel.transport.written.getvalue() == b"frame"
