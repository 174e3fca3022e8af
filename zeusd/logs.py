"""The log observer of ``zeusd serve``: Twisted's classic text lines, formatted for less.

Every control command logs one line at info, so formatting a line is on the
hot path of a command. Twisted's own text observer formats each field through
``string.Formatter`` (to support ``{call()}`` fields) and the timestamp through
``datetime`` for every event; this observer writes the same lines
(``<RFC 3339 time> [<namespace>#<level>] <message>``) with ``str.format_map``
and a timestamp formatted once per second, and falls back to Twisted's
formatting for anything else (failures with tracebacks, call fields, events
whose format does not fit their fields).
"""

from __future__ import annotations

import re
from typing import IO, Any

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime
from zope.interface import implementer


#: A ``{name()}`` field: Twisted calls it, format_map cannot.
_CALL_FIELD = re.compile(r"\{[^{}]*\(")


@implementer(ILogObserver)
class TextLineObserver:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._line(event)
        if text:
            self._stream.write(text)
            self._stream.flush()

    def _line(self, event: dict[str, Any]) -> str | None:
        form = event.get("log_format")
        if form is None or "log_failure" in event or "log_system" in event or _CALL_FIELD.search(form):
            return formatEventAsClassicLogText(event, self._time)
        try:
            message = form.format_map(event)
        except Exception:  # a field missing or misformatted: Twisted says so in its own words
            return formatEventAsClassicLogText(event, self._time)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._time(event.get('log_time'))} [{system}] {message.replace(chr(10), chr(10) + chr(9))}\n"

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp
