"""``zeusd watch`` and ``zeusd power``: the power of one or many nodes, from a terminal.

Both are thin users of :mod:`zeusd.client` drawn with ``rich``: ``watch``
shows a :class:`~zeusd.client.MultiPowerStream` in a ``rich.live.Live`` table
(terminal size, colour and redraw are rich's), or, when stdout is not a
terminal, prints plain lines once a second; ``power`` takes one ``get_power``
reading of every GPU and CPU package of each server and prints a table or
JSON. A server that cannot be read is shown as such, never as 0 W. The option
classes live here too, so the client (treq) is only imported when one of these
commands runs.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Mapping, Sequence

from twisted.python import usage

from zeusd.options import VersionOption

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

    from zeusd.client import CpuPower, DeviceKind, GpuPower, PowerReading, ServerAddress, ServerStatus, ZeusdClient

#: Exit status of an interrupted one-shot ``zeusd power`` (128 + SIGINT, as shells report it).
INTERRUPTED = 130
#: A terminal is redrawn at most this often (the GPU stream's default rate is 20 Hz) ...
MAX_REDRAW_HZ = 10.0
#: ... and at least this often, so ages and reconnect countdowns move; plain output comes at this rate.
TICK_S = 1.0
#: A reading older than this is marked with its age.
STALE_S = 5.0


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
    longdesc = (
        "Redraws as readings arrive until Ctrl-C, with totals per server and overall. "
        "When stdout is not a terminal, prints one line per server and a total line every second."
    )


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


def _console(out: IO[str], **kw: Any) -> Console:
    from rich.console import Console

    return Console(file=out, highlight=False, **kw)


def _w(watts: float | None) -> str:
    return "—" if watts is None else f"{watts:.1f}"


# --------------------------------------------------------------------------- zeusd power


async def read_server(client: ZeusdClient) -> dict[str, Any]:
    """One server's GPU and CPU power (whatever it serves), in the daemon's own JSON shapes.

    ``total_w`` is ``None`` (and ``error`` says why) when the server, or one
    of the device kinds it serves, could not be read: a missing reading is not 0 W.
    """
    from zeusd.client import ZeusdError, gather

    entry: dict[str, Any] = {"server": client.label, "error": None, "gpu": None, "cpu": None, "total_w": None}
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
    if entry["error"] is None:
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


def _total_w(entry: Mapping[str, Any]) -> float:
    total = 0.0
    if entry["gpu"]:
        total += sum(entry["gpu"]["power_mw"].values()) / 1000
    if entry["cpu"]:
        total += sum(v["cpu_mw"] + (v["dram_mw"] or 0) for v in entry["cpu"]["power_mw"].values()) / 1000
    return round(total, 3)


def power_report(servers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``--json``: every server's entry; the total covers the servers that could be read, the rest are named."""
    known = [e["total_w"] for e in servers if e["total_w"] is not None]
    return {
        "servers": list(servers),
        "total_w": round(sum(known), 3),
        "unreadable": [e["server"] for e in servers if e["total_w"] is None],
    }


def power_table(servers: Sequence[Mapping[str, Any]]) -> Table:
    """``zeusd power``'s table: one row per device, a total per server and overall."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("SERVER", overflow="fold")
    table.add_column("DEVICE")
    table.add_column("POWER_W", justify="right")
    table.add_column("DRAM_W", justify="right")
    table.add_column("NOTE", overflow="fold")
    for entry in servers:
        label = entry["server"]
        if entry["gpu"]:
            for index, mw in entry["gpu"]["power_mw"].items():
                table.add_row(label, f"gpu{index}", _w(mw / 1000), "", "")
            for index, message in entry["gpu"].get("errors", {}).items():
                table.add_row(label, f"gpu{index}", "[red]error[/]", "", message)
        if entry["cpu"]:
            for index, value in entry["cpu"]["power_mw"].items():
                dram = "" if value["dram_mw"] is None else _w(value["dram_mw"] / 1000)
                table.add_row(label, f"cpu{index}", _w(value["cpu_mw"] / 1000), dram, "")
        if entry["total_w"] is None:
            state = "unreachable" if entry["gpu"] is None and entry["cpu"] is None else "incomplete"
            table.add_row(label, "total", f"[bold red]{state}[/]", "", _unlabelled(label, entry["error"]) or "",
                          end_section=True)
        else:
            table.add_row(label, "total", f"[bold]{_w(entry['total_w'])}[/]", "", "", end_section=True)
    report = power_report(servers)
    missing = len(report["unreadable"])
    note = f"{missing} of {len(servers)} server(s) not read" if missing else ""
    table.add_row("[bold]TOTAL[/]", "", f"[bold]{_w(report['total_w'])}[/]", "", note)
    return table


def print_plain(out: IO[str], renderable: RenderableType) -> None:
    """A rich renderable as plain text for a pipe or file: no colour, no wrapping, no trailing blanks."""
    buffer = io.StringIO()
    _console(buffer, width=4096, no_color=True).print(renderable)
    out.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


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
            out.write(json.dumps(power_report(servers), indent=2) + "\n")
        elif out.isatty():
            _console(out).print(power_table(servers))
        else:
            print_plain(out, power_table(servers))
        out.flush()
        return 1 if any(e["error"] for e in servers) or len(servers) != len(results) else 0

    return _run(main, INTERRUPTED)


# --------------------------------------------------------------------------- zeusd watch


@dataclass
class ServerView:
    """One server as ``watch`` shows it: its state in words, its readings and their total."""

    label: str
    state: str  # one word: streaming, connecting, reconnecting, unreachable, failed, stopped
    healthy: bool
    detail: str | None
    readings: list[PowerReading] = field(default_factory=list)
    retry_in_s: float | None = None

    @property
    def state_text(self) -> str:
        return self.state if self.retry_in_s is None else f"{self.state}, retry in {self.retry_in_s:g} s"

    @property
    def total_w(self) -> float | None:
        """None without readings: a server that cannot be read has no power to show, not 0 W."""
        return sum(r.total_watts for r in self.readings) if self.readings else None


def server_views(
    status: Mapping[str, ServerStatus], latest: Mapping[tuple[str, DeviceKind, int], PowerReading]
) -> list[ServerView]:
    """What ``watch`` shows of each server, from a MultiPowerStream's ``status`` and ``latest``."""
    views = []
    for label, s in status.items():
        readings = sorted((r for (server, _, _), r in latest.items() if server == label),
                          key=lambda r: (r.kind != "gpu", r.index))
        if s.state == "streaming":
            state, healthy = "streaming", True
            detail = None if s.offset is None else f"clock offset {s.offset.offset_s * 1000:+.1f} ms"
        elif s.state == "backoff":
            state, healthy, detail = "unreachable", False, s.error
        elif s.state == "connecting" and s.error:
            state, healthy, detail = "reconnecting", False, s.error
        else:
            state, healthy, detail = s.state, s.state == "connecting", s.error
        retry = s.retry_in_s if s.state == "backoff" else None
        views.append(ServerView(label, state, healthy, _unlabelled(label, detail), readings, retry))
    return views


def _unlabelled(label: str, error: str | None) -> str | None:
    """A client error without the server name it starts with (the row already names the server)."""
    return None if error is None else error.removeprefix(f"{label}: ")


def _totals(views: Sequence[ServerView]) -> tuple[float | None, float | None, int]:
    """GPU and CPU watts over every reading shown (None: no server has readings), and how many servers have none."""
    readings = [r for v in views for r in v.readings]
    unread = sum(1 for v in views if v.total_w is None)
    if not readings:
        return None, None, unread
    gpu = sum(r.total_watts for r in readings if r.kind == "gpu")
    cpu = sum(r.total_watts for r in readings if r.kind == "cpu")
    return gpu, cpu, unread


def _sum(gpu: float | None, cpu: float | None) -> float | None:
    return None if gpu is None or cpu is None else gpu + cpu


def watch_view(views: Sequence[ServerView], now: float) -> RenderableType:
    """One frame of ``zeusd watch``: per server a title line, its devices and total; then the totals."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table() -> Table:  # the same columns everywhere, so that every server's rows line up
        t = Table(show_header=False, box=None, padding=(0, 2, 0, 2))
        t.add_column(min_width=10)
        t.add_column(justify="right", min_width=12)
        t.add_column(min_width=14)
        t.add_column(overflow="fold")
        return t

    def watts(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f} W"

    clock = time.strftime("%H:%M:%S", time.localtime(now))
    parts: list[RenderableType] = [Text(f"zeusd watch  {clock}  {len(views)} server(s)  Ctrl-C to quit", style="bold")]
    for view in views:
        colour = "green" if view.state == "streaming" else ("yellow" if view.healthy else "red")
        title = Text.assemble("\n", (view.label, "bold"), "  ", (view.state_text, colour))
        if view.detail:
            title.append(f"  {view.detail}")
        t = table()
        for r in view.readings:
            age = now - r.timestamp
            t.add_row(f"{r.kind.upper()} {r.index}", watts(r.watts),
                      "" if r.dram_watts is None else f"DRAM {watts(r.dram_watts)}",
                      f"[yellow]{age:.0f} s old[/]" if age > STALE_S else "")
        total = "[red]unreachable[/]" if view.total_w is None and not view.healthy else watts(view.total_w)
        t.add_row("[bold]total[/]", f"[bold]{total}[/]", "", "")
        parts += [title, t]
    gpu, cpu, unread = _totals(views)
    t = table()
    t.add_row("GPU total", watts(gpu), "", "")
    t.add_row("CPU total", watts(cpu), "", "")
    t.add_row("[bold]TOTAL[/]", f"[bold]{watts(_sum(gpu, cpu))}[/]", "",
              f"[red]{unread} of {len(views)} server(s) without readings[/]" if unread else "")
    parts += [Text("\nall servers", style="bold"), t]
    return Group(*parts)


def watch_lines(views: Sequence[ServerView], now: float) -> list[str]:
    """``watch`` without a terminal: one line per server and one total line, stamped with the time."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))

    def watts(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}W"

    lines = []
    for view in views:
        parts = [stamp, view.label, view.state]
        if view.retry_in_s is not None:
            parts.append(f"retry_in={view.retry_in_s:g}s")
        for r in view.readings:
            dram = "" if r.dram_watts is None else f" dram={watts(r.dram_watts)}"
            parts.append(f"{r.kind}{r.index}={watts(r.watts)}{dram}")
        parts.append(f"total={watts(view.total_w)}")
        if view.detail and not view.healthy:
            parts.append(f"error={json.dumps(view.detail)}")
        lines.append(" ".join(parts))
    gpu, cpu, unread = _totals(views)
    lines.append(f"{stamp} TOTAL gpu={watts(gpu)} cpu={watts(cpu)} total={watts(_sum(gpu, cpu))} "
                 f"unread={unread}/{len(views)}")
    return lines


class WatchScreen:
    """Where ``watch`` draws: a rich Live view on a terminal, plain lines elsewhere.

    ``changed()`` is called for every reading and state change: on a terminal
    it schedules a redraw (at most ``MAX_REDRAW_HZ``); plain output ignores it
    and is written by ``tick()``, which the caller runs every ``TICK_S``.
    """

    def __init__(self, out: IO[str], clock: Any, source: Callable[[], list[ServerView]]) -> None:
        self._out = out
        self._clock = clock
        self._source = source
        self._live: Any = None
        self._pending: Any = None
        self._last = float("-inf")
        self.terminal = out.isatty()
        self.frames = 0

    def open(self) -> None:
        if self.terminal and self._live is None:
            from rich.live import Live

            self._live = Live(console=_console(self._out), screen=True, auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self._draw()

    def changed(self, _: object = None) -> None:
        if not self.terminal or self._pending is not None:
            return
        wait = max(0.0, self._last + 1 / MAX_REDRAW_HZ - self._clock.seconds())
        self._pending = self._clock.callLater(wait, self._draw)

    def tick(self) -> None:
        if self.terminal:
            self.changed()
        else:
            self._out.write("".join(line + "\n" for line in watch_lines(self._source(), time.time())))
            self._out.flush()
            self.frames += 1

    def _draw(self) -> None:
        self._pending = None
        self._last = self._clock.seconds()
        if self._live is not None:
            self._live.update(watch_view(self._source(), time.time()), refresh=True)
            self.frames += 1

    def close(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._live is not None:
            self._live.stop()
            self._live = None


def run_watch(options: WatchOptions, stdout: IO[str] | None = None) -> int:
    """Draw until Ctrl-C (exit 0); the terminal is restored on any exit."""
    from zeusd.client import MultiPowerStream

    out = stdout or sys.stdout
    holder: dict[str, Any] = {}

    async def main(reactor: Any) -> int:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import LoopingCall

        stream: MultiPowerStream | None = None
        screen = WatchScreen(out, reactor, lambda: server_views(stream.status, stream.latest) if stream else [])
        stream = MultiPowerStream(
            options.servers,
            options["token"],
            reactor=reactor,
            timeout_s=options.timeout_s,
            ca_file=options["ca-file"],
            on_reading=screen.changed,
            on_status=screen.changed,
            max_buffered=1,  # nothing iterates: readings are drawn from ``latest``
        )
        holder.update(stream=stream, screen=screen)
        screen.open()
        stream.start()
        ticker = LoopingCall(screen.tick)
        ticker.clock = reactor
        ticker.start(TICK_S, now=False)
        forever: Deferred[int] = Deferred()
        return await forever  # ends only with the reactor (SIGINT / SIGTERM)

    def interrupted() -> Any:
        from twisted.internet.defer import ensureDeferred, succeed

        if "screen" in holder:
            holder["screen"].close()
        stream = holder.get("stream")
        return ensureDeferred(stream.stop()) if stream is not None else succeed(None)

    try:
        return _run(main, 0, interrupted)
    finally:
        if "screen" in holder:
            holder["screen"].close()


__all__ = [
    "PowerOptions",
    "ServerView",
    "WatchOptions",
    "WatchScreen",
    "power_report",
    "power_table",
    "read_server",
    "run_power",
    "run_watch",
    "server_views",
    "watch_lines",
    "watch_view",
]
