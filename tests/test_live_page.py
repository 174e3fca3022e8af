"""The live page (``/ui``): its HTTP contract, and a real headless Chromium drawing from real daemons.

The browser reaches each daemon over TCP on 127.0.0.1, as a person's would.
What the page shows is read through the DOM: ``body[data-state]`` (loading,
connecting, token, live, reconnecting, paused), counters the page keeps
(``data-connections``, ``data-drops``, each canvas's ``data-samples`` and
``data-drawn``), the legend's ``data-watts``/``data-limit-watts``, and the
canvas pixels themselves.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.browser import Chromium, Page, chromium_or_skip
from tests.conftest import DaemonFactory
from tests.daemon import REPO, Daemon, issue_token, wait_until, write_signing_key
from tests.fakenvml import FakeNvml, build_library
from zeusd.devices.gpu.simulated import IDLE_MW, MAX_LIMIT_MW

SCREENSHOT = REPO / "docs" / "img" / "live-page.png"
POWER_READS = ("nvmlDeviceGetFieldValues", "nvmlDeviceGetPowerUsage")


def csp_hash(block: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


# --------------------------------------------------------------------------- HTTP


def test_page_is_static_html_with_a_strict_policy(sim_daemon: Daemon) -> None:
    r = sim_daemon.client.get("/ui")
    assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.body.decode()
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "data:"
    # Only the page's own inline blocks may run: their hashes, nothing else.
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert len(scripts) == 1 and len(styles) == 1
    assert policy["script-src"] == csp_hash(scripts[0]) and policy["style-src"] == csp_hash(styles[0])
    # Self-contained: no external script, style, image or font, no inline handlers.
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=\"(?!data:)", html)
    assert not re.search(r"\son\w+=", html)
    assert "localStorage" not in html and "sessionStorage" not in html and "document.cookie" not in html
    assert sim_daemon.client.get("/").body == r.body


def test_page_follows_the_gpu_read_group_and_needs_no_token(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    without = start_daemon("--simulate", "--enable", "cpu-read,metrics")
    for path in ("/ui", "/"):
        r = without.client.get(path)
        assert r.status == 404 and "'gpu-read' is not enabled" in r.error

    key = tmp_path / "signing.key"
    write_signing_key(key)
    guarded = start_daemon("--simulate", "--signing-key-path", str(key))
    assert guarded.client.get("/ui").status == 200  # static: no data, no token
    assert guarded.client.get("/gpu/get_power").status == 401  # the data still needs one
    assert guarded.client.get("/gpu/stream_power").status == 401
    assert guarded.client.get("/ui", token="not-a-token").status == 200  # a bad token does not matter either


def test_serving_the_page_reads_no_device(start_daemon: DaemonFactory, tmp_path: Path) -> None:
    fake = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log", build_library())
    fake.create(2)
    daemon = start_daemon("--enable", "gpu-read", env=fake.env())
    fake.clear_log()
    for _ in range(3):
        assert daemon.client.get("/ui").status == 200
    assert fake.count(POWER_READS) == 0 and "poller started" not in daemon.log()


# --------------------------------------------------------------------------- browser


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    chromium = Chromium(chromium_or_skip(), tmp_path / "profile", tmp_path / "chromium.log")
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser: Chromium) -> Iterator[Page]:
    tab = browser.page()
    yield tab
    assert tab.exceptions() == []
    assert not [e for e in tab.console_errors() if "Content Security Policy" in e]
    tab.close()


def url(daemon: Daemon) -> str:
    assert daemon.transport.kind == "tcp"
    return f"http://127.0.0.1:{daemon.transport.address}/ui"


def live_with_samples(page: Page, chart: str, samples: int, timeout: float = 10.0) -> None:
    page.wait_for(
        f"document.body.dataset.state === 'live' && Number(document.getElementById('{chart}').dataset.samples) >= {samples}",
        f"{samples} samples in #{chart}",
        timeout,
    )


def legend(page: Page, chart: str) -> dict[str, dict[str, str]]:
    """Legend entries of a chart: device key → its data attributes."""
    value: dict[str, dict[str, str]] = page.evaluate(
        f"Object.fromEntries([...document.querySelectorAll('#{chart.split('-')[0]}-legend li')]"
        ".map((li) => [li.dataset.device, {...li.dataset}]))"
    )
    return value


def drawn_pixels(page: Page, chart: str) -> dict[str, int]:
    """For each series, how many canvas pixels have its legend colour: the lines really drawn."""
    counts: dict[str, int] = page.evaluate(
        f"""(() => {{
          const canvas = document.getElementById('{chart}');
          const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
          const out = {{}};
          for (const li of document.querySelectorAll('#{chart.split('-')[0]}-legend li')) {{
            const [r, g, b] = getComputedStyle(li.querySelector('.swatch')).backgroundColor.match(/\\d+/g).map(Number);
            let n = 0;
            for (let i = 0; i < data.length; i += 4) {{
              if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 30 && data[i + 3] > 200) n++;
            }}
            out[li.dataset.device] = n;
          }}
          return out;
        }})()"""
    )
    return counts


@pytest.mark.parametrize("stream_format", ["v0.4", "v0.5"])
def test_page_draws_a_simulated_node(start_daemon: DaemonFactory, page: Page, tmp_path: Path, stream_format: str) -> None:
    daemon = start_daemon("--simulate", "--stream-format", stream_format, transport="tcp")
    page.navigate(url(daemon))
    live_with_samples(page, "gpu-chart", 40)
    live_with_samples(page, "cpu-chart", 10)
    assert page.evaluate("document.getElementById('gpu-chart').dataset.series") == "gpu:0,gpu:1,gpu:2,gpu:3"
    assert page.evaluate("document.getElementById('cpu-chart').dataset.series") == "cpu:0,dram:0,cpu:1"
    gpus = legend(page, "gpu-chart")
    assert all(IDLE_MW / 1000 <= float(g["watts"]) <= MAX_LIMIT_MW / 1000 for g in gpus.values()), gpus
    assert all(float(c["watts"]) > 0 for c in legend(page, "cpu-chart").values())
    # The power limits the daemon reports are the page's dashed lines.
    page.wait_for("document.querySelectorAll('#gpu-legend li[data-limit-watts]').length === 4", "the power limits")
    limits = daemon.client.get("/gpu/get_power_limit").json()
    assert {k: float(v["limitWatts"]) for k, v in legend(page, "gpu-chart").items()} == {
        f"gpu:{i}": v["power_limit_mw"] / 1000 for i, v in limits.items()
    }
    # Lines on the canvases, in every series' colour.
    page.wait_for(
        "Number(document.getElementById('gpu-chart').dataset.drawn) > 5 && Number(document.getElementById('cpu-chart').dataset.drawn) > 5",
        "frames drawn",
    )
    for chart in ("gpu-chart", "cpu-chart"):
        def lines_drawn(chart: str = chart) -> dict[str, int] | None:
            pixels = drawn_pixels(page, chart)
            return pixels if pixels and min(pixels.values()) >= 20 else None

        pixels = wait_until(lines_drawn, f"lines in {chart}")
        assert len(pixels) >= 3
    if stream_format == "v0.4":
        shot = page.screenshot(tmp_path / "live-page.png")
        assert shot.startswith(b"\x89PNG") and len(shot) > 20_000
        if os.environ.get("ZEUSD_UPDATE_SCREENSHOTS") == "1":
            page.wait_for("Number(document.getElementById('gpu-chart').dataset.samples) > 2400", "30 s of plot", 45)
            page.screenshot(SCREENSHOT)


def test_page_shows_the_devices_exact_power(start_daemon: DaemonFactory, page: Page, tmp_path: Path) -> None:
    """On the stand-in NVML library the page's numbers are the devices' own, and no CPU chart without cpu-read."""
    fake = FakeNvml(tmp_path / "nvml.state", tmp_path / "nvml.log", build_library())
    fake.create(2)
    fake.set_gpu(0, power_mw=123_456, power_limit_mw=275_000)
    fake.set_gpu(1, power_mw=77_000, power_limit_mw=301_000)
    daemon = start_daemon("--enable", "gpu-read", "--stream-format", "v0.5", transport="tcp", env=fake.env())
    page.navigate(url(daemon))
    live_with_samples(page, "gpu-chart", 10)
    page.wait_for("document.querySelectorAll('#gpu-legend li[data-limit-watts]').length === 2", "the power limits")
    assert {k: (float(v["watts"]), float(v["limitWatts"])) for k, v in legend(page, "gpu-chart").items()} == {
        "gpu:0": (123.456, 275.0),
        "gpu:1": (77.0, 301.0),
    }
    assert page.evaluate("document.getElementById('cpu-section').hidden") is True
    fake.set_gpu(1, power_mw=88_000)
    page.wait_for("document.querySelector('#gpu-legend li[data-device=\"gpu:1\"]').dataset.watts === '88.000'", "the new power")


def test_page_reconnects_after_the_daemon_restarts(start_daemon: DaemonFactory, page: Page) -> None:
    daemon = start_daemon("--simulate", transport="tcp")
    page.navigate(url(daemon))
    live_with_samples(page, "gpu-chart", 10)
    for sig, connections in ((signal.SIGTERM, 2), (signal.SIGKILL, 3)):
        daemon.stop(sig)
        page.wait_for("document.body.dataset.state === 'reconnecting'", "the drop to show")
        assert "retrying" in page.evaluate("document.getElementById('status').textContent")
        before = int(page.evaluate("document.getElementById('gpu-chart').dataset.samples"))
        daemon.start()
        page.wait_for(f"Number(document.body.dataset.connections) === {connections}", "a new connection", 30)
        live_with_samples(page, "gpu-chart", before + 10)


def test_token_prompt_then_data(start_daemon: DaemonFactory, page: Page, tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    write_signing_key(key)
    daemon = start_daemon("--simulate", "--signing-key-path", str(key), transport="tcp")
    page.send("Network.enable")
    page.navigate(url(daemon))
    page.wait_for("document.body.dataset.state === 'token' && !document.getElementById('token-form').hidden", "the token prompt")

    def submit(token: str) -> None:
        page.evaluate("document.getElementById('token').focus()")
        page.type_text(token)

    submit("not-a-real-token")
    page.wait_for("document.getElementById('token-error').textContent !== ''", "the rejection")
    assert page.evaluate("document.body.dataset.state") == "token"
    submit(issue_token(key, "metrics"))  # a valid token without the scope
    page.wait_for("/gpu-read/.test(document.getElementById('token-error').textContent)", "the missing scope")

    token = issue_token(key, "gpu-read,cpu-read", user="viewer")
    submit(token)
    live_with_samples(page, "gpu-chart", 20)
    live_with_samples(page, "cpu-chart", 5)
    assert page.evaluate("document.getElementById('token-form').hidden") is True
    assert page.evaluate("document.getElementById('token').value") == ""
    # Never in a URL, never stored: every request the tab made, and the tab's storage.
    requests = [e["params"]["request"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
    assert requests and not [r["url"] for r in requests if token in r["url"]]
    streams = [r for r in requests if "/stream_power" in r["url"]]
    assert streams and all(r["headers"].get("Authorization") == f"Bearer {token}" for r in streams)
    assert page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    assert page.send("Network.getCookies")["cookies"] == []


def test_a_hidden_page_stops_the_streams(start_daemon: DaemonFactory, browser: Chromium, page: Page) -> None:
    """Nobody looking, nothing polled: behind another tab the page closes its streams and the daemon's pollers stop."""
    daemon = start_daemon("--simulate", transport="tcp")
    page.navigate(url(daemon))
    live_with_samples(page, "gpu-chart", 10)
    wait_until(lambda: subscribers(daemon) == {"gpu": 1, "cpu": 1}, "the page's two streams")

    other = page.send("Target.createTarget", url="about:blank")["targetId"]  # the page's tab goes to the background
    page.wait_for("document.body.dataset.state === 'paused'", "the page to pause")
    wait_until(lambda: subscribers(daemon) == {"gpu": 0, "cpu": 0}, "the streams to close")
    wait_until(lambda: daemon.log().count("power poller stopped") == 2, "both pollers to stop")

    page.send("Target.activateTarget", targetId=page.target_id)
    page.send("Target.closeTarget", targetId=other)
    page.wait_for("document.body.dataset.state === 'live'", "the page to resume")
    wait_until(lambda: subscribers(daemon) == {"gpu": 1, "cpu": 1}, "the streams to reopen")


def subscribers(daemon: Daemon) -> dict[str, int]:
    text = daemon.client.get("/metrics").body.decode()
    return {m[0]: int(float(m[1])) for m in re.findall(r'^zeusd_stream_subscribers\{kind="(\w+)"\} (\S+)$', text, re.M)}
