"""HTTP-level bounds that Twisted does not enforce by itself.

Twisted already bounds the request line and headers (16 KiB, 500 headers).
What it does not bound, and a root daemon must:

* request bodies: Twisted buffers any body, spilling large ones to a
  temporary file. No zeusd endpoint reads a body, so bodies are discarded
  as they arrive and one over ``MAX_BODY_BYTES`` is refused with a 413;
* slow headers: Twisted's idle timeout restarts with every byte, so a client
  trickling a header byte at a time (slowloris) would hold its connection
  forever. A request's headers must be complete ``HEADER_DEADLINE_S`` after
  its first byte arrived;
* bare-LF line endings: Twisted only ends a line at CRLF, so a request written
  with LF alone would wait for the deadline. It gets a 400 at once instead.

The request target is normalised too: an absolute-form target
(``GET http://host/discover``, RFC 9112 §3.2.2) is served as its path.

One hook here is Twisted's private ``_respondToBadRequestAndDisconnect`` (its
answer to unparseable requests, given a JSON body like every other error);
``tests/test_twisted_private.py`` fails loudly if the installed Twisted no
longer calls it.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

MAX_BODY_BYTES = 64 * 1024
HEADER_DEADLINE_S = 10.0
#: How long an answered, refused connection is drained before it is closed.
LINGER_S = 2.0



def raw_error(status: bytes, message: str) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body, for errors below the resource layer."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    return (
        b"HTTP/1.1 %b\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
        % (status, len(body), body)
    )


_TOO_LARGE = raw_error(b"413 Payload Too Large", "Request body too large: zeusd reads no request bodies.")
_TOO_SLOW = raw_error(b"408 Request Timeout", f"Request headers not complete within {HEADER_DEADLINE_S:g} s.")
_TOO_LONG = raw_error(b"431 Request Header Fields Too Large", "Request line or header too long.")
_MALFORMED = raw_error(b"400 Bad Request", "Malformed HTTP request.")
_BARE_LF = raw_error(b"400 Bad Request", "Malformed HTTP request: lines must end with CRLF.")


class BoundedBodyRequest(Request):
    """A request that keeps no body and refuses large ones."""

    _body_bytes = 0
    _refused = False

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        super().requestReceived(command, origin_form(path), version)

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # never a temporary file
        if length is not None and length > MAX_BODY_BYTES:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        if self._refused:
            return
        self._refused = True
        channel = self.channel
        if isinstance(channel, DeadlineChannel):
            channel._reply_and_close(_TOO_LARGE)
        elif channel is not None and channel.transport is not None:
            channel.transport.write(_TOO_LARGE)
            channel.transport.loseConnection()


def origin_form(target: bytes) -> bytes:
    """``http://host:port/p?q`` → ``/p?q``: an absolute-form request target is served like its path."""
    for scheme in (b"http://", b"https://"):
        if target[: len(scheme)].lower() == scheme:
            rest = target[len(scheme):]
            start = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            path = rest[start:]
            return path if path.startswith(b"/") else b"/" + path
    return target


class DeadlineChannel(HTTPChannel):
    """An HTTP channel that drops clients whose headers take too long."""

    _header_deadline: IDelayedCall | None = None

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return  # already answered and closing; the rest of the buffer is ignored
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        deadline, self._header_deadline = self._header_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header over 16 KiB: say so instead of just hanging up."""
        self._reply_and_close(_TOO_LONG)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer to unparseable requests, with a JSON body like every other error.
        self._reply_and_close(_MALFORMED)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self._reply_and_close(_TOO_SLOW)

    _discarding = False
    _last_byte = b""

    def dataReceived(self, data: bytes) -> None:
        if self._discarding or not data:
            return
        if self.line_mode:  # the request line and headers (raw mode reads a body)
            if self._header_deadline is None:
                self._header_deadline = self.callLater(HEADER_DEADLINE_S, self._headers_too_slow)
            if _has_bare_lf(self._last_byte, data):
                self._reply_and_close(_BARE_LF)
                return
        self._last_byte = data[-1:]
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            super().rawDataReceived(data)

    def _reply_and_close(self, response: bytes) -> None:
        """Answer, then close gracefully: stop sending, and drain what the client
        is still sending for a moment, so that the answer is not destroyed by a
        TCP reset (closing with unread input resets the connection)."""
        transport = self.transport
        if transport is None or self._discarding:
            return
        self._discarding = True
        transport.write(response)
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
            return
        half_close()
        self.callLater(LINGER_S, transport.loseConnection)


def _has_bare_lf(previous: bytes, data: bytes) -> bool:
    """Whether ``data`` (following the byte ``previous``) has an LF not preceded by CR."""
    i = data.find(b"\n")
    while i != -1:
        if (data[i - 1 : i] if i else previous) != b"\r":
            return True
        i = data.find(b"\n", i + 1)
    return False
