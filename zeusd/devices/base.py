"""What every device backend shares: the error type that crosses into the web layer."""

from __future__ import annotations


class DeviceError(Exception):
    """A device operation failed.

    ``status`` is the HTTP status the failure maps to (400 bad argument or
    unsupported, 403 no permission, 500 anything else), decided by the backend
    that knows the error codes, so the web layer never needs to know NVML or
    sysfs.
    """

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message
