"""Response helpers shared by the route modules: JSON bodies and error rendering."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from zeusd.web.errors import ApiError

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def to_json(value: Any) -> bytes:
    """Compact JSON, as upstream writes it."""
    return _encoder.encode(value).encode()


def json_body(request: IRequest, body: bytes, status: int = 200) -> bytes:
    """A complete JSON response with a Content-Length (no chunked framing)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def json_response(request: IRequest, value: Any, status: int = 200) -> bytes:
    return json_body(request, to_json(value), status)


def render_error(request: IRequest, error: ApiError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    return json_body(request, error.body(), error.status)


def empty_ok(request: IRequest) -> bytes:
    """A successful command: 200 with an empty body and no content type."""
    request.setResponseCode(200)
    request.setHeader(b"content-length", b"0")
    return b""


def install_error_handlers(app: Klein) -> None:
    """Every group app renders ApiError as JSON and 'no such route' as a JSON 404."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound
    from werkzeug.routing import RequestRedirect

    @app.handle_errors(ApiError)
    def api_error(request: IRequest, failure: Failure) -> bytes:
        assert isinstance(failure.value, ApiError)
        return render_error(request, failure.value)

    @app.handle_errors(NotFound, MethodNotAllowed, RequestRedirect)
    def no_route(request: IRequest, failure: Failure) -> bytes:
        return render_error(request, no_such_route(request))


def no_such_route(request: IRequest) -> ApiError:
    method = request.method.decode("ascii", "replace")
    return ApiError(404, f"No such endpoint: {method} {request.path.decode('utf-8', 'replace')[:200]}")
