"""Errors that are not HTTP's: the daemon cannot start, and the two ways a token is refused.

The auth errors live here rather than in :mod:`zeusd.auth` so that the web
layer can tell them apart without importing the token machinery (PyJWT and
cryptography) into a daemon that has no signing key. HTTP errors live in
:mod:`zeusd.web.errors`; devices raise DeviceError.
"""

from __future__ import annotations

from typing import Literal, Sequence


class StartupError(Exception):
    """The daemon cannot start; the message is printed as ``Error: <message>``."""


AuthFailure = Literal["missing", "invalid", "expired"]


class AuthenticationError(Exception):
    """No usable credentials: the header is missing or malformed, or the token does not verify.

    ``reason`` is for logs and tests; ``message`` is what the client is told
    (never the token itself).
    """

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason: AuthFailure = reason
        self.message = message


class ScopeError(Exception):
    """A valid token that lacks the scope of the requested API group (E13)."""

    def __init__(self, sub: str, group: str, scopes: Sequence[str]) -> None:
        listed = ", ".join(f"'{s}'" for s in scopes)
        self.message = f"Token for user '{sub}' lacks required scope '{group}'. Token scopes: [{listed}]"
        super().__init__(self.message)
        self.sub = sub
        self.group = group
        self.scopes = tuple(scopes)
