"""systemd integration, stdlib only: readiness notification (sd_notify) and inherited sockets (sd_listen_fds)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from twisted.logger import Logger

log = Logger()


class Notifier:
    """Sends state lines to systemd's ``$NOTIFY_SOCKET`` (nothing outside systemd).

    The address is taken from the environment once and removed from it, so
    that programs the daemon runs (override commands) cannot speak for it.
    """

    def __init__(self, address: str | None) -> None:
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self._address = address or None

    @classmethod
    def from_environment(cls) -> "Notifier":
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *states: str) -> None:
        """``notify("READY=1", "STATUS=...")``; a failure is logged, never raised."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall("\n".join(states).encode())
        except OSError as e:
            log.warn("Cannot notify systemd ({states}): {error}", states=", ".join(states), error=e.strerror or str(e))


@dataclass(frozen=True)
class InheritedSocket:
    fd: int
    name: str


#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def inherited_sockets() -> list[InheritedSocket]:
    """The sockets systemd passed to this process (``sd_listen_fds(3)``); none outside socket activation.

    Read from the environment the process was started with: Twisted's own
    reader (``twisted.python.systemd``) removes ``LISTEN_PID``/``LISTEN_FDS``
    from ``os.environ`` as soon as ``twisted.internet.endpoints`` is imported,
    which ``twist``/``twistd`` do while scanning plugins, and it ignores every
    socket when ``LISTEN_FDNAMES`` is absent (``systemd-socket-activate``,
    systemd before 227).
    """
    environ = _initial_environment()
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    return [
        InheritedSocket(LISTEN_FDS_START + i, names[i] if i < len(names) else "unknown") for i in range(max(count, 0))
    ]


def _initial_environment() -> dict[str, str]:
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return dict(os.environ)
    pairs = (entry.split(b"=", 1) for entry in block.split(b"\0") if b"=" in entry)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}
