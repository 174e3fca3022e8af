"""``GET /ui`` (and ``/``): the live power page, one static HTML file shipped with the package.

The page holds no data: its script fetches ``/discover`` and the power
streams with the viewer's token, so the page itself is served without one
(the root exempts these paths from auth, not from the ``gpu-read`` group:
a node without GPU reads has no page). Its inline script and style are
allowed by their hashes, computed once from the shipped file, and nothing
else may load, run or connect anywhere but this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from klein import Klein
from twisted.web.iweb import IRequest

from zeusd.groups import LIVE_PAGE_PATHS

PAGE_RESOURCE = "live.html"


@dataclass(frozen=True)
class LivePage:
    body: bytes
    content_security_policy: str


def inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions (``'sha256-…'``) for every inline ``<tag>`` block, as the browser hashes it."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


def content_security_policy(html: str) -> str:
    """Only this page's own script and style run; data comes from this origin; nothing else loads."""
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {' '.join(inline_hashes(html, 'script'))}",
            f"style-src {' '.join(inline_hashes(html, 'style'))}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        )
    )


@lru_cache(maxsize=1)
def load_live_page() -> LivePage:
    html = files("zeusd.web").joinpath("static").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
    return LivePage(html.encode("utf-8"), content_security_policy(html))


def serve_live_page(request: IRequest) -> bytes:
    page = load_live_page()
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(page.body))
    request.setHeader(b"content-security-policy", page.content_security_policy.encode("ascii"))
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cross-origin-opener-policy", b"same-origin")
    request.setHeader(b"cross-origin-resource-policy", b"same-origin")
    request.setHeader(b"cache-control", b"no-cache")  # a daemon upgrade shows its own page
    return page.body


def add_live_page(app: Klein) -> None:
    """Mount the page on a group app at every path of :data:`LIVE_PAGE_PATHS`."""
    for path in sorted(LIVE_PAGE_PATHS):
        app.route(path, methods=["GET"], endpoint=f"live_page:{path}")(serve_live_page)
