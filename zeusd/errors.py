"""The process-level error: the daemon cannot start.

HTTP errors live in :mod:`zeusd.web.errors`; devices and auth raise their own.
"""

from __future__ import annotations


class StartupError(Exception):
    """The daemon cannot start; the message is printed as ``Error: <message>``."""
