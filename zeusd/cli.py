"""The ``zeusd`` command: ``serve``, ``token issue``, and the monitoring clients ``watch`` and ``power``.

Exit status: 0 on success, 1 when the daemon cannot start (``Error: ...`` on
stderr), 2 for usage errors.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from zeusd import __version__
from zeusd.errors import StartupError
from zeusd.options import ServeOptions, SingleValuedParameters, VersionOption
from zeusd.watch import PowerOptions, WatchOptions


class TokenIssueOptions(SingleValuedParameters, VersionOption, usage.Options):
    """zeusd token issue: print a signed bearer token."""

    synopsis = "--signing-key-path FILE --user NAME [--scope GROUPS] --expires DURATION"
    optParameters: list[list[Any]] = [
        ["signing-key-path", None, None, "The daemon's key file (required)."],
        ["user", None, None, "Who the token is for (the 'sub' claim, required)."],
        ["expires", None, None, "Lifetime such as 1h, 7d, 30d, or 'never'/'0' (required)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[str] = []

    def opt_scope(self, value: str) -> None:
        """API groups the token grants, comma-separated or repeated."""
        self.scopes.append(value)

    def postOptions(self) -> None:
        from zeusd.auth import parse_scopes

        for name in ("signing-key-path", "user", "expires"):
            if self[name] is None:
                raise usage.UsageError(f"--{name} is required")
        try:
            self.scopes = parse_scopes(self.scopes)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


class TokenOptions(VersionOption, usage.Options):
    """zeusd token: manage bearer tokens."""

    def getSynopsis(self) -> str:
        return "Usage: zeusd token" if self.subCommand else "Usage: zeusd token <subcommand>"
    subCommands = [["issue", None, TokenIssueOptions, "Issue a signed token."]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a subcommand is required: issue")


class ZeusdOptions(VersionOption, usage.Options):
    """zeusd: GPU and CPU power management and streaming daemon."""

    def getSynopsis(self) -> str:
        return "Usage: zeusd" if self.subCommand else "Usage: zeusd <command> [options]"
    subCommands = [
        ["serve", None, ServeOptions, "Run the daemon."],
        ["token", None, TokenOptions, "Manage bearer tokens."],
        ["watch", None, WatchOptions, "Live power of one or more daemons."],
        ["power", None, PowerOptions, "One power reading of one or more daemons."],
    ]

    opt_V = VersionOption.opt_version

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required: serve, token, watch or power")


def start_logging(level_name: str) -> None:
    """Structured log lines on stdout, at ``$ZEUSD_LOG_LEVEL`` (default info)."""
    try:
        level = LogLevel.levelWithName(level_name.lower())
    except Exception:
        level = LogLevel.info
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])], redirectStandardIO=False
    )


def serve(options: ServeOptions) -> int:
    from twisted.internet import reactor

    from zeusd.service import make_service

    start_logging(os.environ.get("ZEUSD_LOG_LEVEL", "info"))
    try:
        service = make_service(options.config(), reactor)
        service.privilegedStartService()
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def issue_token(options: TokenIssueOptions) -> int:
    from zeusd.auth import issue_token as sign, load_signing_key, parse_expires

    try:
        key = load_signing_key(options["signing-key-path"])
        exp = parse_expires(options["expires"], time.time())
    except (StartupError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(sign(key, options["user"], options.scopes, exp))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = ZeusdOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        command = options
        while getattr(command, "subOptions", None) is not None:
            command = command.subOptions
        print(f"{command}\nzeusd: error: {e}", file=sys.stderr)
        return 2
    if options.subCommand == "serve":
        return serve(options.subOptions)
    if options.subCommand == "watch":
        from zeusd.watch import run_watch

        return run_watch(options.subOptions)
    if options.subCommand == "power":
        from zeusd.watch import run_power

        return run_power(options.subOptions)
    return issue_token(options.subOptions.subOptions)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
