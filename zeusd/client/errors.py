"""What can go wrong talking to a daemon, as exceptions that say what to do about it."""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet import error as net
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from zeusd.client.addresses import ServerAddress


class ZeusdError(Exception):
    """Anything that went wrong talking to a daemon.

    ``status`` is the HTTP status (``None`` when no response arrived) and
    ``message`` the daemon's JSON ``error`` text (or the joined ``errors`` map).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message = message
        self.status = status


class ZeusdConnectionError(ZeusdError):
    """No answer: the daemon is down, unreachable, too slow, or dropped the connection."""


class ZeusdHTTPError(ZeusdError):
    """The daemon answered with an error status.

    ``errors`` holds per-device failures (``{"errors": {"0": "..."}}``) keyed by
    device id; ``body`` is the raw response body.
    """

    def __init__(self, status: int, message: str, errors: Mapping[int, str] | None = None, body: bytes = b"") -> None:
        super().__init__(message, status)
        self.status: int = status
        self.errors: dict[int, str] = dict(errors or {})
        self.body = body


class ZeusdAuthError(ZeusdHTTPError):
    """401 (no or bad token) or 403 (token lacks the scope): retrying will not help."""


class ZeusdProtocolError(ZeusdError):
    """The daemon's answer is not what the API says it should be."""


def error_from_response(status: int, body: bytes) -> ZeusdHTTPError:
    """The exception for an error response, carrying the daemon's own message."""
    message = body.decode("utf-8", "replace").strip()
    errors: dict[int, str] = {}
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        if isinstance(payload.get("error"), str):
            message = payload["error"]
        elif isinstance(payload.get("errors"), dict):
            errors = {int(k): str(v) for k, v in payload["errors"].items() if str(k).isdigit()}
            message = "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    if not message:
        message = f"HTTP {status} with an empty body"
    cls = ZeusdAuthError if status in (401, 403) else ZeusdHTTPError
    return cls(status, message, errors, body)


# --------------------------------------------------------------------------- connection failures


def connection_error(server: ServerAddress, exc: BaseException) -> ZeusdConnectionError:
    """A failed connection or exchange as one line that names the server and the likely fix.

    Twisted nests the cause (``ResponseNeverReceived([Failure(SSL.Error([...]))])``);
    the innermost reasons decide the advice, and raw OpenSSL tuples never reach the user.
    """
    causes = list(_causes(exc))
    return ZeusdConnectionError(f"{server.label}: {_advice(server, causes)}")


def was_cancelled(exc: BaseException) -> bool:
    """True when the failure is our own cancellation (a timeout), however deeply Twisted wrapped it."""
    return any(isinstance(c, CancelledError) for c in _causes(exc))


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and whatever it wraps (``reasons`` lists of Failures, ``__cause__``)."""
    out: list[BaseException] = []
    pending: list[Any] = [exc]
    while pending and len(out) < 16:
        item = pending.pop(0)
        if isinstance(item, Failure):
            item = item.value
        if not isinstance(item, BaseException) or item in out:
            continue
        out.append(item)
        pending.extend(getattr(item, "reasons", None) or [])
        if item.__cause__ is not None:
            pending.append(item.__cause__)
    return out


def _tls_reasons(causes: list[BaseException]) -> list[str]:
    """The reason strings of OpenSSL errors (``[('SSL routines', '', 'certificate verify failed')]``)."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - twisted[tls] installs it
        return []
    reasons: list[str] = []
    for cause in causes:
        if isinstance(cause, SSL.Error):
            for entry in cause.args[0] if cause.args and isinstance(cause.args[0], list) else []:
                if isinstance(entry, tuple) and entry:
                    reasons.append(str(entry[-1]))
            if not reasons:
                reasons.append(type(cause).__name__)
    return reasons


def _advice(server: ServerAddress, causes: list[BaseException]) -> str:
    tls = _tls_reasons(causes)
    if tls:
        what = ", ".join(dict.fromkeys(tls))
        if any("certificate verify failed" in r for r in tls):
            return (f"TLS: the server's certificate is not trusted ({what}); pass the CA that signed it "
                    f"with --ca-file (ca_file= in the library)")
        if any("wrong version number" in r or "packet length too long" in r or "record layer failure" in r for r in tls):
            return (f"TLS handshake failed ({what}): the daemon does not seem to serve HTTPS; "
                    f"use {server.netloc} instead of https://{server.netloc}")
        return f"TLS handshake failed ({what})"
    for cause in causes:
        if isinstance(cause, net.ConnectionRefusedError) or _errno(cause) == errno.ECONNREFUSED:
            if server.scheme == "unix":
                return f"connection refused on {server.path}: a socket is there but nothing listens (is zeusd running?)"
            return "connection refused: is zeusd running and listening on that address?"
        if _errno(cause) == errno.ENOENT or "No such file" in str(cause):
            return f"no socket at {server.path}: is zeusd running? (pick another with --server or $ZEUSD_SOCK_PATH)"
        if _errno(cause) == errno.EACCES or "Permission denied" in str(cause):
            return (f"permission denied on {server.path}: run as a member of the socket's group "
                    f"(see zeusd serve --socket-gid / --socket-permissions)")
        if isinstance(cause, net.DNSLookupError):
            return f"cannot resolve host {server.host!r}"
        if isinstance(cause, (net.TimeoutError, net.TCPTimedOutError)):
            return "connection timed out: is the host reachable and the port open?"
    last = causes[-1] if causes else None
    if server.scheme == "http" and _closed_before_answer(causes):
        return "the connection closed before any answer; if the daemon serves HTTPS, use https://" + server.netloc
    text = (str(last) or type(last).__name__) if last is not None else "unknown error"
    return text


def _errno(exc: BaseException) -> int | None:
    """The OS error number, wherever Twisted put it (``osError`` on ConnectError, ``errno`` on OSError)."""
    if isinstance(exc, OSError):
        return exc.errno
    code = getattr(exc, "osError", None)
    return code if isinstance(code, int) else None


def _closed_before_answer(causes: list[BaseException]) -> bool:
    return any(isinstance(c, (net.ConnectionDone, net.ConnectionLost)) for c in causes)


__all__ = [
    "ZeusdAuthError",
    "ZeusdConnectionError",
    "ZeusdError",
    "ZeusdHTTPError",
    "ZeusdProtocolError",
    "connection_error",
    "error_from_response",
    "was_cancelled",
]
