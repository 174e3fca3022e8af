"""The root resource: the request pipeline in front of the group apps.

Every request passes, in this order (spec §3, with the W1 fix: the group is
classified on the decoded path the router matches, never the raw one):

1. method and path sanity (only GET/POST; no encoded slashes; valid UTF-8);
2. group of the path disabled → 404 JSON, before any auth;
3. auth off and ``/auth/...`` → 404 JSON;
4. ``/discover``, ``/time`` and the live page (static) → served, no token needed;
5. auth on → bearer token (401) and the group's scope (403);
6. the group's Klein resource routes the request (no route → 404 JSON).

With the ``metrics`` group on, every request that reaches the root is also
counted, under its known route or ``other``, when its response ends.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Protocol
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

from zeusd.errors import AuthenticationError, ScopeError
from zeusd.web.errors import ApiError, NotFound
from zeusd.groups import LIVE_PAGE_PATHS, ApiGroup, group_for_path
from zeusd.web.limits import BoundedBodyRequest, DeadlineChannel
from zeusd.web.responses import install_error_handlers, json_body, json_response, no_such_route, render_error, to_json

log = Logger()

_EXEMPT = frozenset(("/discover", "/time")) | LIVE_PAGE_PATHS
#: On every 401 (spec §3, E10-E12).
WWW_AUTHENTICATE = 'Bearer realm="zeusd"'
_METHODS = frozenset((b"GET", b"POST"))


class Authenticator(Protocol):
    """What the root needs from auth: claims for a header (or AuthenticationError),
    and a scope check (or ScopeError)."""

    def verify_authorization(self, header: bytes | None) -> Any: ...

    def check_scope(self, claims: Any, group: str) -> None: ...


class RequestObserver(Protocol):
    """Request metrics: a bounded route label for a path, and one call per finished request."""

    def route_label(self, path: str | None) -> str: ...

    def observe_request(self, route: str, method: bytes, code: int, seconds: float) -> None: ...


def route_paths(apps: Iterable[Klein]) -> set[str]:
    """The static paths the apps route: the known endpoints (metrics route labels)."""
    return {str(rule.rule) for app in apps for rule in app.url_map.iter_rules()}


class ZeusdRequest(BoundedBodyRequest):
    """A request that remembers when it started and who made it (for the access log),
    and says once when its response ended, finished or cut off (for request metrics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_at = time.monotonic()
        self.zeusd_user: str | None = None
        #: Called once with the request when its response has ended.
        self.on_end: Callable[["ZeusdRequest"], None] | None = None

    def finish(self) -> None:
        super().finish()
        self._ended()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._ended()

    def _ended(self) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(self)


class ZeusdSite(Site):
    """A Site whose access log is one structured debug line per request."""

    requestFactory = ZeusdRequest
    protocol = DeadlineChannel  # type: ignore[assignment]  # plain HTTP/1.1, no HTTP/2 negotiation
    #: The per-request debug line; off where the log level would drop it anyway (a hot-path cost).
    log_requests = True

    def startFactory(self) -> None:
        """Skip HTTPFactory's access-log file and its once-a-second date timer:
        requests are logged through twisted.logger, and an idle daemon wakes no timer."""

    def log(self, request: Any) -> None:
        if not self.log_requests:
            return
        started = getattr(request, "started_at", None)
        log.debug(
            "{method} {path} -> {code} ({ms:.2f} ms){user}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace")[:200],
            code=request.code,
            ms=0.0 if started is None else (time.monotonic() - started) * 1000,
            user="" if getattr(request, "zeusd_user", None) is None else f" user={request.zeusd_user}",
        )


def server_app(discovery: Callable[[], Mapping[str, Any]], authenticator: Authenticator | None) -> Klein:
    """``/discover``, ``/time`` and ``/auth/whoami``: present whatever is enabled.

    ``discovery`` is called once, at the first ``/discover``: devices are only
    known once the daemon has started, and do not change after that.
    """
    app = Klein()
    install_error_handlers(app)
    discovery_body: list[bytes] = []

    @app.route("/discover", methods=["GET"])
    def discover(request: IRequest) -> bytes:
        if not discovery_body:
            discovery_body.append(to_json(discovery()))
        return json_body(request, discovery_body[0])

    @app.route("/time", methods=["GET"])
    def now(request: IRequest) -> bytes:
        return json_response(request, {"timestamp_ms": time.time_ns() // 1_000_000})

    @app.route("/auth/whoami", methods=["GET"])
    def whoami(request: IRequest) -> bytes:
        claims = getattr(request, "claims", None)
        if claims is None:
            raise ApiError(500, "Claims not found in request extensions.")
        return json_response(request, claims.whoami_body())

    return app


class ZeusdRoot(Resource):
    isLeaf = True

    def __init__(
        self,
        server: IResource,
        groups: Mapping[ApiGroup, IResource],
        authenticator: Authenticator | None,
        observer: RequestObserver | None = None,
    ) -> None:
        super().__init__()
        self._server = server
        self._groups = dict(groups)
        self._auth = authenticator
        self._observer = observer

    def render(self, request: IRequest) -> bytes | int:
        if self._observer is not None:
            self._observe(request, self._observer)
        try:
            target = self._route(request)
        except ApiError as error:
            return render_error(request, error)
        except AuthenticationError as error:
            return render_error(request, ApiError(401, error.message, {"WWW-Authenticate": WWW_AUTHENTICATE}))
        except ScopeError as error:
            return render_error(request, ApiError(403, error.message))
        rendered: bytes | int = target.render(request)
        return rendered

    def _observe(self, request: Any, observer: RequestObserver) -> None:
        """Count the request when its response ends (finished, or the client went away)."""
        route = observer.route_label(_decoded_path(request))
        started: float = getattr(request, "started_at", None) or time.monotonic()

        def done(ended: Any) -> None:
            observer.observe_request(route, ended.method, ended.code, time.monotonic() - started)

        if isinstance(request, ZeusdRequest):
            request.on_end = done
        else:
            request.notifyFinish().addBoth(lambda _: done(request))

    def _route(self, request: IRequest) -> IResource:
        path = _decoded_path(request)
        if path is None or request.method not in _METHODS:
            raise no_such_route(request)
        group = group_for_path(path)
        if group is not None and group not in self._groups:
            raise NotFound(f"API group '{group.value}' is not enabled on this server.")
        if path.startswith("/auth/") and self._auth is None:
            raise NotFound("Authentication is not enabled on this server.")
        if self._auth is not None and path not in _EXEMPT:
            claims = self._auth.verify_authorization(request.getHeader(b"authorization"))
            request.claims = claims  # type: ignore[attr-defined]
            request.zeusd_user = claims.sub  # type: ignore[attr-defined]
            if group is not None:
                self._auth.check_scope(claims, group.value)
        # Hand the group app the decoded path the checks above were made on.
        request.prepath = []
        request.postpath = path[1:].encode().split(b"/")
        return self._groups[group] if group is not None else self._server


def _decoded_path(request: IRequest) -> str | None:
    raw: bytes = request.path
    if b"%2f" in raw.lower() or not raw.startswith(b"/"):
        return None
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


__all__ = ["WWW_AUTHENTICATE", "RequestObserver", "ZeusdRoot", "ZeusdSite", "route_paths", "server_app", "NOT_DONE_YET"]
