"""The one place zeusd reaches below Twisted's public API: writing a stream frame straight to its socket.

``transport.write`` only buffers: the bytes leave on the reactor's next pass,
after two epoll registrations. For a fan-out of small frames to thousands of
sockets that bookkeeping is most of the cost (docs/performance.md), so when a
plain socket transport has nothing queued, a frame goes straight to the
socket with ``writeSomeData``, and only what the kernel did not take is left to
the transport, whose buffer and producer pausing then work as usual.

That needs exactly :data:`PRIVATE_ATTRIBUTES` of ``twisted.internet.abstract``'s
FileDescriptor. :func:`direct_writer` checks for them on every transport and
falls back to the public ``write`` when any is missing, and
``tests/test_fast_write.py`` fails loudly against an installed Twisted that
no longer has them. TLS never reaches this path: writing past a TLS layer
would put plaintext on the wire.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor

#: What the fast path reads or calls on a transport: the queued-output buffers and the raw send.
PRIVATE_ATTRIBUTES = ("dataBuffer", "_tempDataLen", "writeSomeData")


def fast_path_available(transport: Any) -> bool:
    """A transport that owns its socket (not a TLS wrapper) and still has the attributes used here."""
    return (
        isinstance(transport, FileDescriptor)
        and not getattr(transport, "TLS", False)
        and all(hasattr(transport, name) for name in PRIVATE_ATTRIBUTES)
    )


def direct_writer(channel: Any) -> Callable[[bytes], None]:
    """A write function for one stream's HTTP channel: straight to the socket when it can,
    else the channel's own buffered write."""
    buffered: Callable[[bytes], None] = channel.write
    transport: Any = getattr(channel, "transport", None)
    if not fast_path_available(transport):
        return buffered
    send = transport.writeSomeData

    def write(data: bytes) -> None:
        if not (transport.dataBuffer or transport._tempDataLen or transport.disconnecting) and transport.connected:
            sent = send(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        buffered(data)

    return write
