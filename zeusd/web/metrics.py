"""The ``metrics`` group: ``GET /metrics`` in the Prometheus exposition format."""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from zeusd.metrics import Scraper
from zeusd.web.responses import install_error_handlers

METRICS_PATH = "/metrics"


def metrics_app(scraper: Scraper) -> Klein:
    """Device readings are taken at scrape time, off the reactor thread.

    The query string is ignored (Prometheus scrape configs may add ``params``).
    A failing device leaves its samples out and counts an error; the scrape
    itself still answers 200.
    """
    app = Klein()
    install_error_handlers(app)

    @app.route(METRICS_PATH, methods=["GET"])
    def metrics(request: IRequest) -> Any:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        gzip_ok = b"gzip" in (request.getHeader(b"accept-encoding") or b"").lower()

        def respond(rendered: tuple[bytes, str, bool]) -> bytes:
            body, content_type, gzipped = rendered
            request.setResponseCode(200)
            request.setHeader(b"content-type", content_type.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % len(body))
            request.setHeader(b"cache-control", b"no-store")
            if gzipped:
                request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"vary", b"Accept, Accept-Encoding")
            return body

        return scraper.render(accept, gzip_ok).addCallback(respond)

    return app
