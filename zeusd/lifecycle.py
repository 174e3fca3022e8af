"""The shape every part of the service tree shares: open once at start, close at stop."""

from __future__ import annotations

from twisted.application.service import Service


class OpenedAtStart(Service):
    """A service that opens what it holds (devices, files, sockets) when it starts.

    In ``privilegedStartService``, so that a daemon that sheds root later has
    opened everything as root and ``twistd`` has already forked; or in
    ``startService`` under runners that skip the privileged step (``twist``).
    Either way once: :meth:`open` runs at most once until :meth:`closed` says
    the service let go of it again.
    """

    opened = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._open_once()

    def startService(self) -> None:
        self._open_once()
        super().startService()

    def _open_once(self) -> None:
        if not self.opened:
            self.open()
            self.opened = True

    def open(self) -> None:
        """Open what the service holds; raise StartupError to stop startup."""
        raise NotImplementedError

    def closed(self) -> bool:
        """Call from ``stopService``: True (and now closed) if the service had opened anything."""
        was_open, self.opened = self.opened, False
        return was_open
