"""The one place zeusd reaches below Twisted's public API: writing a stream frame straight to its socket.

``transport.write`` only buffers: the bytes leave on the reactor's next pass,
after two epoll registrations. For a fan-out of small frames to thousands of
sockets that bookkeeping is most of the cost (docs/performance.md), so when a
plain socket transport has nothing queued, a frame goes straight to its
socket (``transport.getHandle().send``), and only what the kernel did not take
is left to the transport, whose buffer and producer pausing then work as
usual. A send that fails for any other reason than a full buffer is left to
the transport too, which meets the same error on its own write and closes the
connection as it always does.

"Nothing queued" needs exactly :data:`PRIVATE_ATTRIBUTES` of
``twisted.internet.abstract``'s FileDescriptor. :func:`frame_writer` checks for them on every transport and
falls back to the public ``write`` when any is missing, and
``tests/test_fast_write.py`` fails loudly against an installed Twisted that
no longer has them. TLS never reaches this path: writing past a TLS layer
would put plaintext on the wire.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.abstract import FileDescriptor

from zeusd.streaming import Frame

#: What the fast path reads on a transport: its queued-output buffers.
PRIVATE_ATTRIBUTES = ("dataBuffer", "_tempDataLen")


def fast_path_available(transport: Any) -> bool:
    """A transport that owns its socket (not a TLS wrapper) and still has the attributes used here."""
    return (
        isinstance(transport, FileDescriptor)
        and not getattr(transport, "TLS", False)
        and hasattr(transport, "getHandle")
        and all(hasattr(transport, name) for name in PRIVATE_ATTRIBUTES)
    )


def frame_writer(channel: Any, encode: Callable[[bytes], bytes] | None) -> Callable[[Frame], None]:
    """A write function for one stream's frames: each frame's payload, in the form ``encode``
    makes of it once per frame (None: as it is), sent straight to the socket when it can,
    else through the channel's own buffered write."""
    buffered: Callable[[bytes], None] = channel.write
    transport: Any = getattr(channel, "transport", None)

    def data_of(frame: Frame) -> bytes:
        return frame.payload if encode is None else frame.encoded(encode)

    if not fast_path_available(transport):
        return lambda frame: buffered(data_of(frame))
    send = transport.getHandle().send

    def write(frame: Frame) -> None:
        data = frame.payload if encode is None else frame.encoded(encode)
        if not (transport.dataBuffer or transport._tempDataLen or transport.disconnecting) and transport.connected:
            try:
                sent = send(data)
            except OSError:  # a full buffer, or a broken connection the transport will find itself
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    return write
