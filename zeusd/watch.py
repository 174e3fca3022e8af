"""``zeusd watch`` and ``zeusd power``: the power of one or many nodes, from a terminal.

Both are thin users of :mod:`zeusd.client`: ``watch`` renders a
:class:`~zeusd.client.MultiPowerStream` (redrawn with ANSI escapes, no curses),
``power`` takes one ``get_power`` reading of every GPU and CPU package of each
server and prints a table or JSON. The option classes live here too, so the
client (treq) is only imported when one of these commands runs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Sequence

from twisted.python import usage

from zeusd.options import VersionOption

if TYPE_CHECKING:
    from zeusd.client import CpuPower, GpuPower, MultiPowerStream, ServerAddress, ZeusdClient

#: Exit status of an interrupted one-shot ``zeusd power`` (128 + SIGINT, as shells report it).
INTERRUPTED = 130
#: Redraw at most this often (the GPU stream's default rate is 20 Hz).
MAX_REDRAW_HZ = 20.0

CLEAR = "\x1b[H\x1b[2J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"


class _ClientOptions(VersionOption, usage.Options):
    """Which daemons to talk to, and how."""

    optParameters: list[list[Any]] = [
        ["token", None, None, "Bearer token for every server (default: $ZEUSD_TOKEN)."],
        ["ca-file", None, None, "PEM CA certificate(s) to verify https:// servers with."],
        ["timeout", None, "5", "Seconds to wait for each answer."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.servers: list[ServerAddress] = []

    def opt_server(self, value: str) -> None:
        """A daemon: unix:PATH, HOST:PORT or https://HOST:PORT; repeat for several (default: $ZEUSD_SOCK_PATH, $ZEUSD_HOST_PORT, or unix:/var/run/zeusd.sock)."""
        from zeusd.client import ServerAddress

        try:
            address = ServerAddress.parse(value)
        except ValueError as e:
            raise usage.UsageError(f"--server: {e}") from None
        if address in self.servers:
            raise usage.UsageError(f"--server: {address.label} is given twice")
        self.servers.append(address)

    opt_s = opt_server

    def postOptions(self) -> None:
        from zeusd.client import default_server

        if not self.servers:
            self.servers.append(default_server())
        try:
            self.timeout_s = float(self["timeout"])
        except ValueError:
            raise usage.UsageError(f"--timeout: {self['timeout']!r} is not a number") from None
        if not 0 < self.timeout_s <= 3600:
            raise usage.UsageError("--timeout: must be between 0 and 3600 seconds")


class WatchOptions(_ClientOptions):
    """zeusd watch: live power of every GPU and CPU package of one or more daemons."""

    synopsis = "[--server unix:PATH | HOST:PORT | https://HOST:PORT ...] [--token T]"
    longdesc = "Redraws at the stream rate until Ctrl-C. Totals per server and overall."


class PowerOptions(_ClientOptions):
    """zeusd power: one reading of every GPU and CPU package, as a table or JSON."""

    synopsis = "[--server unix:PATH | HOST:PORT | https://HOST:PORT ...] [--token T] [--json]"
    optFlags: list[list[Any]] = [["json", None, "Print JSON (for scripts) instead of a table."]]


# --------------------------------------------------------------------------- running


def _run(
    main: Callable[[Any], Coroutine[Any, Any, int]], interrupted_code: int, on_interrupt: Callable[[], Any] | None = None
) -> int:
    """Run ``main(reactor)`` to completion; SIGINT (Ctrl-C) stops it with ``interrupted_code``."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.python.failure import Failure

    outcome: list[int] = []

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            print(f"zeusd: {result.getErrorMessage()}", file=sys.stderr)
            outcome.append(1)
        else:
            outcome.append(int(result))  # type: ignore[call-overload]
        if reactor.running:
            reactor.stop()

    def start() -> None:
        ensureDeferred(main(reactor)).addBoth(finished)

    def shutting_down() -> Any:
        if not outcome and on_interrupt is not None:
            return on_interrupt()  # a Deferred here delays shutdown until it fires
        return None

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
    reactor.run()
    return outcome[0] if outcome else interrupted_code


def _clients(options: _ClientOptions, reactor: Any) -> list[ZeusdClient]:
    from zeusd.client import ZeusdClient

    return [
        ZeusdClient(s, options["token"], reactor=reactor, timeout_s=options.timeout_s, ca_file=options["ca-file"])
        for s in options.servers
    ]


# --------------------------------------------------------------------------- zeusd power


async def read_server(client: ZeusdClient) -> dict[str, Any]:
    """One server's GPU and CPU power (whatever it serves), in the daemon's own JSON shapes."""
    from zeusd.client import ZeusdError, gather

    entry: dict[str, Any] = {"server": client.label, "error": None, "gpu": None, "cpu": None, "total_w": 0.0}
    try:
        discovery = await client.discover()
        reads: list[Awaitable[Any]] = []
        kinds: list[str] = []
        if discovery.enabled("gpu-read") and discovery.gpus:
            kinds.append("gpu")
            reads.append(client.get_gpu_power())
        if discovery.enabled("cpu-read") and discovery.cpus:
            kinds.append("cpu")
            reads.append(client.get_cpu_power())
        errors = []
        for kind, result in zip(kinds, await gather(reads)):
            if isinstance(result, BaseException):
                errors.append(f"{kind}: {result}")
            else:
                entry[kind] = _power_json(result)
        if errors:
            entry["error"] = "; ".join(errors)
    except ZeusdError as e:
        entry["error"] = str(e)
    entry["total_w"] = _total_w(entry)
    return entry


def _power_json(power: GpuPower | CpuPower) -> dict[str, Any]:
    from zeusd.client import CpuPackagePower

    body: dict[str, Any] = {"timestamp_ms": power.timestamp_ms, "power_mw": {}}
    for index, value in sorted(power.power_mw.items()):
        if isinstance(value, CpuPackagePower):
            body["power_mw"][str(index)] = {"cpu_mw": value.cpu_mw, "dram_mw": value.dram_mw}
        else:
            body["power_mw"][str(index)] = value
    if power.errors:
        body["errors"] = {str(i): m for i, m in sorted(power.errors.items())}
    return body


def _total_w(entry: dict[str, Any]) -> float:
    total = 0.0
    if entry["gpu"]:
        total += sum(entry["gpu"]["power_mw"].values()) / 1000
    if entry["cpu"]:
        total += sum(v["cpu_mw"] + (v["dram_mw"] or 0) for v in entry["cpu"]["power_mw"].values()) / 1000
    return round(total, 3)


def power_table(servers: Sequence[dict[str, Any]]) -> str:
    """``zeusd power``'s table: one row per device, a total per server and overall."""
    rows: list[tuple[str, str, str, str]] = [("SERVER", "DEVICE", "POWER_W", "DRAM_W")]
    for entry in servers:
        label = entry["server"]
        if entry["gpu"]:
            for index, mw in entry["gpu"]["power_mw"].items():
                rows.append((label, f"gpu{index}", f"{mw / 1000:.1f}", ""))
            for index, message in entry["gpu"].get("errors", {}).items():
                rows.append((label, f"gpu{index}", "error", message))
        if entry["cpu"]:
            for index, value in entry["cpu"]["power_mw"].items():
                dram = "" if value["dram_mw"] is None else f"{value['dram_mw'] / 1000:.1f}"
                rows.append((label, f"cpu{index}", f"{value['cpu_mw'] / 1000:.1f}", dram))
        if entry["error"]:
            rows.append((label, "error", "-", entry["error"]))
        rows.append((label, "total", f"{entry['total_w']:.1f}", ""))
    rows.append(("TOTAL", "", f"{sum(e['total_w'] for e in servers):.1f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows
    ]
    return "\n".join(lines)


def run_power(options: PowerOptions, stdout: IO[str] | None = None) -> int:
    """Exit 0 when every server answered, 1 when any did not (its error is in the output)."""
    out = stdout or sys.stdout

    async def main(reactor: Any) -> int:
        from zeusd.client import gather

        clients = _clients(options, reactor)
        try:
            results = await gather(read_server(c) for c in clients)
        finally:
            for client in clients:
                await client.close()
        servers = [r for r in results if isinstance(r, dict)]
        if options["json"]:
            total = round(sum(e["total_w"] for e in servers), 3)
            out.write(json.dumps({"servers": servers, "total_w": total}, indent=2) + "\n")
        else:
            out.write(power_table(servers) + "\n")
        out.flush()
        return 1 if any(e["error"] for e in servers) or len(servers) != len(results) else 0

    return _run(main, INTERRUPTED)


# --------------------------------------------------------------------------- zeusd watch


def _w(watts: float) -> str:
    return f"{watts:8.1f} W"


def render_watch(stream: MultiPowerStream, now: float | None = None) -> str:
    """One frame of ``zeusd watch``: per-device rows, per-server totals and the grand total."""
    now = time.time() if now is None else now
    lines = [f"zeusd watch   {time.strftime('%H:%M:%S', time.localtime(now))}   "
             f"{len(stream.status)} server(s)   Ctrl-C to quit", ""]
    grand = {"gpu": 0.0, "cpu": 0.0}
    for label, status in stream.status.items():
        state: str = status.state
        if status.state == "backoff":
            state = f"reconnecting in {status.retry_in_s:g} s"
        header = f"{label}   [{state}]"
        if status.offset is not None and status.state == "streaming":
            header += f"   clock offset {status.offset.offset_s * 1000:+.1f} ms"
        lines.append(header)
        if status.error and status.state != "streaming":
            lines.append(f"  ! {status.error}")
        readings = sorted(
            (r for (server, _, _), r in stream.latest.items() if server == label),
            key=lambda r: (r.kind != "gpu", r.index),
        )
        totals = {"gpu": 0.0, "cpu": 0.0}
        for r in readings:
            age = now - r.timestamp
            stale = f"   ({age:.0f} s old)" if age > 5 else ""
            if r.kind == "gpu":
                lines.append(f"  GPU {r.index:<3}      {_w(r.watts)}{stale}")
            else:
                dram = "" if r.dram_watts is None else f"   DRAM {r.dram_watts:.1f} W"
                lines.append(f"  CPU {r.index:<3}      {_w(r.watts)}{dram}{stale}")
            totals[r.kind] += r.total_watts
        if readings:
            lines.append(f"  GPU total    {_w(totals['gpu'])}")
            lines.append(f"  CPU total    {_w(totals['cpu'])}")
            lines.append(f"  total        {_w(totals['gpu'] + totals['cpu'])}")
        elif status.state == "streaming":
            lines.append("  (waiting for readings)")
        grand["gpu"] += totals["gpu"]
        grand["cpu"] += totals["cpu"]
        lines.append("")
    lines.append(f"GPU total      {_w(grand['gpu'])}")
    lines.append(f"CPU total      {_w(grand['cpu'])}")
    lines.append(f"TOTAL          {_w(grand['gpu'] + grand['cpu'])}")
    return "\n".join(lines)


class _Screen:
    """Writes frames to the terminal; restores it (cursor, main screen) on exit."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._tty = out.isatty()
        self._open = False

    def open(self) -> None:
        if self._tty and not self._open:
            self._out.write(ALT_SCREEN_ON + HIDE_CURSOR)
        self._open = True

    def draw(self, frame: str) -> None:
        if self._tty:
            # Clear to the end of each line so shrinking numbers leave no residue.
            self._out.write(CLEAR + frame.replace("\n", "\x1b[K\n") + "\x1b[K\n")
        else:
            self._out.write(CLEAR + frame + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._open and self._tty:
            self._out.write(SHOW_CURSOR + ALT_SCREEN_OFF)
            self._out.flush()
        self._open = False


def run_watch(options: WatchOptions, stdout: IO[str] | None = None) -> int:
    """Redraw until Ctrl-C (exit 0); the terminal is restored on any exit."""
    from zeusd.client import MultiPowerStream

    out = stdout or sys.stdout
    screen = _Screen(out)
    holder: dict[str, MultiPowerStream] = {}

    async def main(reactor: Any) -> int:
        from twisted.internet.defer import Deferred

        pending: list[Any] = []
        last = [0.0]

        def redraw() -> None:
            pending.clear()
            last[0] = time.monotonic()
            screen.draw(render_watch(stream))

        def schedule(_: object = None) -> None:
            if pending:
                return
            wait = max(0.0, last[0] + 1 / MAX_REDRAW_HZ - time.monotonic())
            pending.append(reactor.callLater(wait, redraw))

        stream = MultiPowerStream(
            options.servers,
            options["token"],
            reactor=reactor,
            timeout_s=options.timeout_s,
            ca_file=options["ca-file"],
            on_reading=schedule,
            on_status=schedule,
            max_buffered=1,  # nothing iterates: readings are drawn from ``latest``
        )
        holder["stream"] = stream
        screen.open()
        stream.start()
        redraw()
        # A clock tick so ages and reconnect countdowns move even when nothing streams.
        from twisted.internet.task import LoopingCall

        ticker = LoopingCall(schedule)
        ticker.clock = reactor
        ticker.start(1.0, now=False)
        forever: Deferred[int] = Deferred()
        return await forever  # ends only with the reactor (SIGINT / SIGTERM)

    def interrupted() -> Any:
        from twisted.internet.defer import ensureDeferred, succeed

        screen.close()
        stream = holder.get("stream")
        return ensureDeferred(stream.stop()) if stream is not None else succeed(None)

    try:
        return _run(main, 0, interrupted)
    finally:
        screen.close()


__all__ = ["PowerOptions", "WatchOptions", "power_table", "read_server", "render_watch", "run_power", "run_watch"]
