"""The ``zeusd`` command: ``serve``, ``token issue``, and the monitoring clients ``watch`` and ``power``.

Exit status: 0 on success, 1 when the daemon cannot start (``Error: ...`` on
stderr), 2 for usage errors.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Sequence

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)
from twisted.python import usage

from zeusd.errors import StartupError
from zeusd.groups import ApiGroup
from zeusd.options import Flag, FlagOptions, ServeOptions, VersionOption

SCOPE_NAMES_ORDERED = tuple(g.value for g in ApiGroup)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


TOKEN_ISSUE_FLAGS: tuple[Flag, ...] = (
    Flag("signing-key-path", "The daemon's key file (required)."),
    Flag("user", "Who the token is for (the 'sub' claim, required)."),
    Flag("expires", "Lifetime such as 1h, 7d, 30d, or 'never'/'0' (required)."),
    Flag("scope", f"API groups the token grants, comma-separated or repeated (required): {', '.join(SCOPE_NAMES_ORDERED)}.", repeatable=True),
)


class TokenIssueOptions(VersionOption, FlagOptions):
    """zeusd token issue: print a signed bearer token."""

    synopsis = "--signing-key-path FILE --user NAME --scope GROUPS --expires DURATION"
    flags = TOKEN_ISSUE_FLAGS

    def postOptions(self) -> None:
        from zeusd.auth import parse_scopes

        for name in ("signing-key-path", "user", "expires"):
            if self.value_of(name) is None:
                raise usage.UsageError(f"--{name} is required")
        if not self.values_of("scope"):
            raise usage.UsageError(
                f"--scope is required (a token without scopes can do nothing): {', '.join(SCOPE_NAMES_ORDERED)}"
            )
        try:
            self.scopes = parse_scopes(self.values_of("scope"))
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


def _client_options(command: str) -> usage.Options:
    """The options of ``watch`` or ``power``, imported only when one of them runs (a daemon never does)."""
    from zeusd.watch import PowerOptions, WatchOptions

    return WatchOptions() if command == "watch" else PowerOptions()


class ZeusdOptions(VersionOption, usage.Options):
    """zeusd: GPU and CPU power management and streaming daemon."""

    def getSynopsis(self) -> str:
        return "Usage: zeusd" if self.subCommand else "Usage: zeusd <command> [options]"
    subCommands = [
        ["serve", None, ServeOptions, "Run the daemon."],
        ["token", None, TokenOptions, "Manage bearer tokens."],
        ["watch", None, lambda: _client_options("watch"), "Live power of one or more daemons."],
        ["power", None, lambda: _client_options("power"), "One power reading of one or more daemons."],
    ]

    opt_V = VersionOption.opt_version

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required: serve, token, watch or power")


def start_logging(level_name: str) -> None:
    """Structured log lines on stdout, at ``$ZEUSD_LOG_LEVEL`` (default info)."""
    from zeusd.logs import TextLineObserver

    level = LogLevel.levelWithName(level_name)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(TextLineObserver(sys.stdout), [predicate])], redirectStandardIO=False
    )


def serve(options: ServeOptions) -> int:
    from twisted.internet import reactor

    from zeusd.service import make_daemon

    level = os.environ.get("ZEUSD_LOG_LEVEL", "info").strip().lower()
    if level not in LOG_LEVELS:
        print(f"Error: ZEUSD_LOG_LEVEL={level!r} is not one of: {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 1
    start_logging(level)
    service = make_daemon(options.config(), reactor)  # a startup error exits 1 with one Error: line
    service.site.log_requests = level == "debug"
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


def issue_token(options: TokenIssueOptions) -> int:
    from zeusd.auth import issue_token as sign, load_signing_key, parse_expires

    try:
        key = load_signing_key(str(options.value_of("signing-key-path")))
        exp = parse_expires(str(options.value_of("expires")), time.time())
    except (StartupError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(sign(key, str(options.value_of("user")), options.scopes, exp))
    return 0


def usage_error(options: usage.Options, error: usage.UsageError) -> int:
    """One line saying what is wrong and where the help is (exit status 2), not the whole help."""
    command = options
    names = ["zeusd"]
    while getattr(command, "subOptions", None) is not None:
        names.append(str(command.subCommand))
        command = command.subOptions
    print(f"zeusd: error: {error}\nsee: {' '.join(names)} --help", file=sys.stderr)
    return 2


def parse_serve_options(argv: Sequence[str]) -> ServeOptions:
    """ServeOptions from ``argv`` for the tac file; a usage error exits 2 like ``zeusd serve``."""
    options = ServeOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        print(f"zeusd: error: {e}\nsee: zeusd serve --help", file=sys.stderr)
        raise SystemExit(2) from None
    except StartupError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return options


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`zeusd serve --help | head`): nothing of ours failed.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    options = ZeusdOptions()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        return usage_error(options, e)
    except StartupError as e:  # e.g. systemd passed a descriptor that is not a socket
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if options.subCommand == "serve":
        return serve(options.subOptions)  # collects again once it serves (ZeusdService)
    gc.enable()
    if options.subCommand == "watch":
        from zeusd.watch import run_watch

        return run_watch(options.subOptions)
    if options.subCommand == "power":
        from zeusd.watch import run_power

        return run_power(options.subOptions)
    return issue_token(options.subOptions.subOptions)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
