"""The floor under the daemon's RSS and start-up: bare Twisted + Klein serving one route.

    python bench/floor_klein.py --mode uds --socket-path PATH
    python bench/floor_klein.py --mode tcp --tcp-bind-address 127.0.0.1:PORT

Same listener flags as ``zeusd serve`` so that bench/compare.py starts it the
way it starts the daemon. ``GET /discover`` answers ``{}``, and ``POST
/command`` answers an empty 200 after a no-op ran on a thread (the floor under a
blocking control command); nothing else is imported or set up: what the
daemon costs beyond this is the daemon's own.
Stops on SIGTERM (the reactor's default handler).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from klein import Klein
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.web.server import Site

app = Klein()


@app.route("/discover", methods=["GET"])
def discover(request: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return b"{}"


@app.route("/command", methods=["POST"])
def command(request: Any) -> Any:
    """The floor under a control command: an empty 200 once a call ran on another thread."""
    from twisted.internet.threads import deferToThread

    return deferToThread(lambda: None).addCallback(lambda _: b"")


def main(argv: Sequence[str]) -> None:
    # No argparse: the floor imports nothing it does not need.
    flags = dict(zip(argv[::2], argv[1::2]))
    if len(argv) != 4 or flags.get("--mode") not in ("uds", "tcp"):
        raise SystemExit(__doc__)
    if flags["--mode"] == "uds":
        endpoint: Any = UNIXServerEndpoint(reactor, flags["--socket-path"])
    else:
        host, _, port = flags["--tcp-bind-address"].rpartition(":")
        endpoint = TCP4ServerEndpoint(reactor, int(port), interface=host)
    endpoint.listen(Site(app.resource()))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
