"""Real servers and a real browser for the viewer tests.

`AppThread` runs a `create_app` application on a free loopback port in a background thread (its
own event loop), with a middleware that records every (method, path, status) it answered.
`Chromium` is a headless Chromium (Debian package `chromium`) driven over the DevTools protocol
with aiohttp's websocket client: navigate, evaluate JavaScript, take screenshots, collect console
messages. A missing browser is an error, never a skip: CI installs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web
from PIL import Image

from server.runner import ServiceRunner

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-crash-reporter",
    "--disable-breakpad",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)
START_TIMEOUT_S = 30.0


def chromium_path() -> str:
    """The Chromium binary ($CHROMIUM, or the first of BROWSERS on PATH); fails loudly if none."""
    explicit = os.environ.get("CHROMIUM")
    found = explicit or next((p for b in BROWSERS if (p := shutil.which(b))), None)
    assert found, (
        "headless Chromium is required for the viewer tests: apt-get install -y chromium "
        "(./dev setup installs it), or set CHROMIUM=/path/to/chrome"
    )
    return found


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AppThread:
    """An aiohttp application served on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every answered request, in order."""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner = ServiceRunner(app, access_log=None)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            response = await handler(request)
            self.requests.append((request.method, request.path, response.status))
            return response

        # Around every route's front (`server.front`): it sees the status the client gets.
        app.middlewares.insert(0, record)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_TIMEOUT_S)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol (async context)."""

    def __init__(self, width: int = 1024, height: int = 768) -> None:
        self.width, self.height = width, height
        self.console: list[str] = []
        """Console messages, uncaught exceptions and browser log entries (CSP violations...)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="wsi-chromium-", ignore_cleanup_errors=True)
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Chromium:
        profile = Path(self._tmp.name) / "profile"
        # stderr goes to a file: a pipe nobody reads would block a chatty browser.
        self._log = (Path(self._tmp.name) / "chromium.log").open("w+b")
        self._proc = subprocess.Popen(
            [
                chromium_path(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,  # its own process group: helpers are stopped with it
        )
        port = await self._devtools_port(profile / "DevToolsActivePort")
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    async def _devtools_port(self, path: Path) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (Path(self._tmp.name) / "chromium.log").read_text(errors="replace")
                raise AssertionError(f"chromium exited with {self._proc.returncode}: {err[-2000:]}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise AssertionError("chromium did not open its DevTools port")

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):  # a browser that is gone is closed enough
                await asyncio.wait_for(self.send("Browser.close"), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            # Renderer, GPU and crash-handler processes can outlive the browser for a moment and
            # still write to the profile; they are in the process group it was started in.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
        for _ in range(50):  # a killed helper may still be exiting
            try:
                shutil.rmtree(self._tmp.name)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        self._tmp.cleanup()

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            doc = json.loads(message.data)
            if "id" in doc:
                future = self._pending.pop(doc["id"], None)
                if future is not None and not future.done():
                    future.set_result(doc)
            else:
                self._event(doc.get("method", ""), doc.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description", details.get("text", ""))
            self.console.append(f"exception: {text}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.console.append(f"log.{entry['level']}: {entry['text']} {entry.get('url', '')}")

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its result, or AssertionError with the protocol's error."""
        assert self._ws is not None
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(
            json.dumps({"id": self._next_id, "method": method, "params": params or {}})
        )
        doc = await asyncio.wait_for(future, START_TIMEOUT_S)
        assert "error" not in doc, f"{method}: {doc['error']}"
        result: dict[str, Any] = doc["result"]
        return result

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        assert not result.get("errorText"), f"cannot open {url}: {result.get('errorText')}"

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Polls until `expression` is truthy; its value, or AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        value: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):  # the page may be between documents
                value = await self.evaluate(expression)
                if value:
                    return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression} (last value {value!r})")

    async def screenshot(self) -> Image.Image:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return Image.open(io.BytesIO(base64.b64decode(result["data"]))).convert("RGB")

    # Input as a person gives it: real mouse and key events through the browser's input
    # pipeline (pointer events, focus, default actions such as submitting a form on Enter).

    async def mouse(self, kind: str, x: float, y: float, pressed: bool = False) -> None:
        """One left-button mouse event (`mousePressed`, `mouseMoved`, `mouseReleased`) at
        (x, y) CSS pixels of the page; `pressed`: the button is held (for moves)."""
        held = kind == "mousePressed" or pressed
        await self.send(
            "Input.dispatchMouseEvent",
            {
                "type": kind,
                "x": x,
                "y": y,
                "button": "left" if held or kind == "mouseReleased" else "none",
                "buttons": 1 if held else 0,
                "clickCount": 1 if kind != "mouseMoved" else 0,
            },
        )

    async def drag(
        self, start: tuple[float, float], end: tuple[float, float], steps: int = 8
    ) -> None:
        """Press at `start`, move in `steps` straight steps to `end`, release there."""
        await self.mouse("mouseMoved", *start)
        await self.mouse("mousePressed", *start)
        for i in range(1, steps + 1):
            x = start[0] + (end[0] - start[0]) * i / steps
            y = start[1] + (end[1] - start[1]) * i / steps
            await self.mouse("mouseMoved", x, y, pressed=True)
        await self.mouse("mouseReleased", *end)

    async def click(self, selector: str) -> None:
        """A mouse click in the middle of the first element matching `selector`."""
        box = await self.evaluate(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: 'center'}});
                const r = el.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2];
            }})()"""
        )
        assert box, f"no element {selector}"
        await self.mouse("mousePressed", *box)
        await self.mouse("mouseReleased", *box)

    async def type_text(self, text: str) -> None:
        """Text typed into the focused element (fires `input` events)."""
        await self.send("Input.insertText", {"text": text})

    KEY_CODES = (
        ("Enter", 13),
        ("Escape", 27),
        ("ArrowLeft", 37),
        ("ArrowUp", 38),
        ("ArrowRight", 39),
    )

    async def press(self, key: str) -> None:
        """One key pressed and released: a character (`r`, `R`, `?`) or a named key of
        KEY_CODES."""
        down: dict[str, Any] = {"type": "keyDown", "key": key}
        codes = dict(self.KEY_CODES)
        if key in codes:
            down |= {"code": key, "windowsVirtualKeyCode": codes[key]}
            if key == "Enter":
                down["text"] = "\r"
        else:
            down["text"] = key
        await self.send("Input.dispatchKeyEvent", down)
        await self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key})

    async def emulate_phone(self, width: int, height: int) -> None:
        """A phone's screen from now on: `width` x `height` CSS pixels, mobile, touch."""
        self.width, self.height = width, height
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True},
        )
        await self.send("Emulation.setTouchEmulationEnabled", {"enabled": True})
