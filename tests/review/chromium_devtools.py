"""A headless Chromium driven over the DevTools protocol, for the browser tests of tests/review/:
``launch_chromium`` (a remote-debugging Chromium), ``open_page``, ``DevTools`` (commands in order, events
collected) and ``page_errors`` (console errors, exceptions, failed loads)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools protocol client of one page (commands in order, events collected)."""

    def __init__(self, url: str):
        websocket = pytest.importorskip("websocket", reason="needs websocket-client (the dev extra)")
        self.ws = websocket.create_connection(url, timeout=20)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} within {timeout} s")


@contextlib.contextmanager
def launch_chromium(tmp_path: Path, window: str = "1200,800") -> Iterator[str]:
    """A headless Chromium with remote debugging; yields its DevTools HTTP endpoint."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--window-size={window}",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail(f"chromium did not start (exit code {process.poll()})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def open_page(endpoint: str, url: str) -> DevTools:
    targets = json.loads(urllib.request.urlopen(f"{endpoint}/json/list", timeout=10).read())
    page = next(t for t in targets if t["type"] == "page")
    devtools = DevTools(page["webSocketDebuggerUrl"])
    for domain in ("Page", "Runtime", "Log"):
        devtools.call(f"{domain}.enable")
    devtools.call("Page.navigate", url=url)
    devtools.wait_for("Page.loadEventFired")
    return devtools


def page_errors(devtools: DevTools) -> list[str]:
    found = []
    for event in devtools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            found.append(f"console.{params['type']}: {params['args']}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails']}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return found
