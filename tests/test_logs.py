"""zeusd serve's log observer writes exactly Twisted's classic text lines, for less work."""

from __future__ import annotations

import io
import re

from twisted.logger import LogPublisher, Logger, textFileLogObserver

from zeusd.logs import TextLineObserver


def test_lines_are_twisteds_own() -> None:
    theirs, ours = io.StringIO(), io.StringIO()
    log = Logger(namespace="zeusd.devices.gpu.manager", observer=LogPublisher(textFileLogObserver(theirs), TextLineObserver(ours)))
    log.info(
        "GPU {gpu}: {description} (queued {queued_ms:.1f} ms, device {device_ms:.1f} ms)",
        gpu=0, description="Power limit set to 300 W", queued_ms=0.123, device_ms=0.05,
    )
    log.warn("a line\nand another {value!r}", value="quoted")
    log.info("a call field {double(2)}", double=lambda n: n * 2)
    log.info("a field that is missing: {nowhere}")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("with a traceback {n}", n=1)
    log.info("plain braces {{}} and a level name")
    assert ours.getvalue() == theirs.getvalue()
    assert len(re.findall(r"^\S+ \[zeusd\.devices\.gpu\.manager#\w+\] ", ours.getvalue(), re.M)) == 6
