"""Open a local HTML page in real headless Chromium over the Chrome DevTools Protocol (CDP).

    with Chromium(tmp_path) as browser:
        page = browser.open(Path("report/index.html"))
    page.console_errors      # console.error calls, uncaught exceptions, failed loads
    page.images              # [{"alt", "src", "complete", "naturalWidth", "naturalHeight"}] per <img>
    page.screenshot          # PNG bytes of the whole page

Chromium is started with ``--remote-debugging-port=0`` and a throw-away ``--user-data-dir``; the port it
picked is read from the ``DevToolsActivePort`` file it writes there, and the page's websocket is found
through ``/json/list``. The browser runs in its own process group, which is killed on exit.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL = "sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium"

# Runs in the page after load: every <img>, once each has decoded (or failed to).
_IMAGES_JS = """
Promise.all([...document.images].map(img => img.decode().catch(() => null))).then(() =>
  [...document.images].map(img => ({alt: img.alt, src: img.src.slice(0, 40), complete: img.complete,
                                     naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight})))
"""


@dataclass
class PageResult:
    """What a page did when loaded: its console errors, its images, a screenshot."""

    console_errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    screenshot: bytes = b""

    def broken_images(self) -> list[dict[str, Any]]:
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] <= 0]


def chromium_binary() -> str | None:
    return shutil.which("chromium")


class _Session:
    """One CDP websocket: commands answered by id, events collected on the way."""

    def __init__(self, url: str, timeout: float):
        import websocket  # websocket-client (the dev extra)

        # No Origin header: Chromium refuses websocket clients whose Origin it was not told to allow.
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(f"CDP {method}: no answer within {self.timeout:.0f} s")

    def wait_for(self, event: str) -> dict[str, Any]:
        seen = next((e for e in self.events if e.get("method") == event), None)
        deadline = time.monotonic() + self.timeout
        while seen is None and time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self.events.append(message)
            seen = message if message.get("method") == event else None
        if seen is None:
            raise TimeoutError(f"CDP: no {event} within {self.timeout:.0f} s")
        return seen

    def close(self) -> None:
        self.ws.close()


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Errors among the collected CDP events: console.error/assert, uncaught exceptions, failed loads."""
    out = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console." + params["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
    return out


class Chromium:
    """Headless Chromium for the length of a ``with`` block (killed, with its process group, on exit)."""

    def __init__(self, workdir: Path, *, timeout: float = 60.0, width: int = 1400, height: int = 1000):
        self.binary = chromium_binary()
        if self.binary is None:
            raise FileNotFoundError(f"chromium not found on PATH; install it with:  {INSTALL}")
        self.workdir, self.timeout, self.size = Path(workdir), timeout, (width, height)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Chromium:
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "chromium.log", "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox",  # no sandbox: tests run as root in containers
             "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.port = self._read_port(profile / "DevToolsActivePort")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}): "
                                   f"{(self.workdir / 'chromium.log').read_text()[-2000:]}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2 and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no {port_file} within {self.timeout:.0f} s")

    def _page_websocket(self) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as resp:
                pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise TimeoutError("chromium has no page target")

    def open(self, page: Path) -> PageResult:
        """Load ``page`` (a local file), wait for its load event and images; collect errors, take a screenshot."""
        session = _Session(self._page_websocket(), self.timeout)
        try:
            for domain in ("Runtime", "Log", "Page"):
                session.call(f"{domain}.enable")
            width, height = self.size
            session.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                         mobile=False)
            session.call("Page.navigate", url=Path(page).resolve().as_uri())
            session.wait_for("Page.loadEventFired")
            images = session.call("Runtime.evaluate", expression=_IMAGES_JS, awaitPromise=True,
                                  returnByValue=True)["result"]["value"]
            content = session.call("Page.getLayoutMetrics")["cssContentSize"]
            shot = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                clip={"x": 0, "y": 0, "width": content["width"], "height": content["height"],
                                      "scale": 1})
            return PageResult(console_errors=_console_errors(session.events), images=images,
                              screenshot=base64.b64decode(shot["data"]))
        finally:
            session.close()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:  # the whole group: chromium's renderer, GPU and zygote processes too
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()
