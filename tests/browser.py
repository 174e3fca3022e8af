"""A real headless Chromium (Debian's ``chromium``) driven through the DevTools protocol.

Only what the live-page tests need: open a page, evaluate JavaScript, type
into the focused element, take a screenshot, and collect the console and
exception events (Content-Security-Policy violations land there). The
protocol runs over the page target's websocket (``websocket-client``).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import wait_until

#: The flags of an isolated, quiet browser: nothing leaves the machine but the page's own requests.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1200,900",
)


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (tests/setup_system_packages.sh installs it as root)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("websocket-client is not installed (pip install -e '.[test]')")
    return path


class Chromium:
    """One browser process with a fresh profile; killed by :meth:`close`."""

    def __init__(self, executable: str, profile: Path, log_path: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its helper processes go with it in close()
        )
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: self._alive() and port_file.exists() and port_file.read_text().count("\n") >= 1,
                   "Chromium's DevTools port", timeout=30)
        self.port = int(port_file.read_text().split("\n")[0])

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"chromium exited with {self.process.returncode}")
        return True

    def page(self) -> "Page":
        """The first page target (the ``about:blank`` tab the browser opened)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            targets = json.load(r)
        first = next(t for t in targets if t["type"] == "page")
        return Page(first["webSocketDebuggerUrl"], first["id"])

    def close(self) -> None:
        if self.process.poll() is None:
            import os

            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


class Page:
    """One tab over its DevTools websocket."""

    def __init__(self, ws_url: str, target_id: str) -> None:
        import websocket

        self.target_id = target_id
        self._ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a protocol method; events that arrive meanwhile are kept in :attr:`events`."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        wait_until(lambda: self.evaluate("document.readyState") == "complete", f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 10.0) -> Any:
        """Poll a JavaScript expression until it is truthy (the page is the event source)."""
        try:
            return wait_until(lambda: self.evaluate(expression), what, timeout)
        except AssertionError:
            state = self.evaluate("document.body && [document.body.dataset.state, document.getElementById('status').textContent]")
            raise AssertionError(f"timed out waiting for {what}; page state {state}") from None

    def type_text(self, text: str) -> None:
        """Type into the focused element the way a keyboard does, then press Enter."""
        self.send("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png

    def exceptions(self) -> list[str]:
        """Uncaught exceptions in the page so far."""
        self.evaluate("0")  # collect events that arrived since the last call
        return [json.dumps(e["params"]["exceptionDetails"])[:500] for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    def console_errors(self) -> list[str]:
        """Console errors so far: Content-Security-Policy violations, failed loads."""
        self.evaluate("0")
        return [
            e["params"]["entry"]["text"]
            for e in self.events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]

    def close(self) -> None:
        self._ws.close()
