"""HTTP errors: what the web layer answers, and how device failures become an answer.

Every error body is JSON: ``{"error": "..."}`` for one problem, or
``{"errors": {"<device id>": "..."}}`` for per-device failures. The layers
below raise their own domain errors (DeviceError, the auth errors, an unknown
stream format); this layer alone decides statuses and headers.
"""

from __future__ import annotations

import json
from typing import Mapping, TypeVar

from zeusd.devices.base import DeviceError

T = TypeVar("T")


class ApiError(Exception):
    """A request failed in a way the client should hear about."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: Mapping[str, str] = headers or {}

    def body(self) -> bytes:
        return json.dumps({"error": self.message}, separators=(",", ":")).encode()


class BadRequest(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class NotFound(ApiError):
    def __init__(self, message: str = "Not found.") -> None:
        super().__init__(404, message)


class DeviceErrors(ApiError):
    """One or more devices failed; the status is the worst per-device status."""

    def __init__(self, errors: Mapping[int, DeviceError]) -> None:
        worst = max(e.status for e in errors.values())
        super().__init__(worst, "; ".join(f"{i}: {e.message}" for i, e in sorted(errors.items())))
        self.errors = dict(errors)

    def body(self) -> bytes:
        payload = {str(i): e.message for i, e in sorted(self.errors.items())}
        return json.dumps({"errors": payload}, separators=(",", ":")).encode()


def all_or_errors(results: Mapping[int, T | DeviceError]) -> dict[int, T]:
    """Every device's result, or DeviceErrors naming each device that failed."""
    failed = {i: r for i, r in results.items() if isinstance(r, DeviceError)}
    if failed:
        raise DeviceErrors(failed)
    return {i: r for i, r in results.items() if not isinstance(r, DeviceError)}
