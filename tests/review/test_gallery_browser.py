"""The ``hqlabel show`` gallery in a real headless Chromium, driven over the DevTools protocol: the page
loads, every image decodes, and nothing is logged as an error (missing files, blocked resources, script
errors)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from hqlabel.jobs.cli import main
from tests.review.test_gallery import make_labels

pytestmark = pytest.mark.timeout(120)

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


@pytest.fixture
def chromium(tmp_path):
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


def _open_page(endpoint: str, url: str) -> DevTools:
    targets = json.loads(urllib.request.urlopen(f"{endpoint}/json/list", timeout=10).read())
    page = next(t for t in targets if t["type"] == "page")
    devtools = DevTools(page["webSocketDebuggerUrl"])
    for domain in ("Page", "Runtime", "Log"):
        devtools.call(f"{domain}.enable")
    devtools.call("Page.navigate", url=url)
    devtools.wait_for("Page.loadEventFired")
    return devtools


def _errors(devtools: DevTools) -> list[str]:
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


def test_gallery_loads_in_chromium(ray_session, chromium, tmp_path):
    labels = make_labels(tmp_path)
    out = tmp_path / "show"
    assert main(["show", str(labels), "--out", str(out)]) == 0

    devtools = _open_page(chromium, (out / "index.html").as_uri())
    state = devtools.call(
        "Runtime.evaluate",
        expression="""JSON.stringify({
            title: document.title,
            banner: !!document.getElementById("random-weights"),
            images: [...document.images].map(i => ({
                src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
            })),
            links: [...document.links].map(a => a.getAttribute("href")),
        })""",
        returnByValue=True,
    )["result"]["value"]
    state = json.loads(state)
    assert state["title"].startswith("hqlabel gallery")
    assert state["banner"]
    assert len(state["images"]) == 4
    broken = [image for image in state["images"] if not image["ok"]]
    assert not broken, f"images that did not load: {broken}"
    overlays = {p.relative_to(out).as_posix() for p in (out / "overlays").iterdir()}
    assert {image["src"] for image in state["images"]} == overlays
    assert {"sheets/sheet-00000.png", "sheets/sheet-00001.png"} <= set(state["links"])
    assert all((out / link).is_file() for link in state["links"])  # relative links, all resolvable
    assert _errors(devtools) == []
    devtools.ws.close()


def test_error_capture_sees_a_missing_image(chromium, tmp_path):
    """The check above can fail: a page whose image is missing logs an error and reports it unloaded."""
    page = Path(tmp_path / "index.html")
    page.write_text('<!DOCTYPE html><html><body><img src="overlays/gone.png" alt="x"></body></html>')
    devtools = _open_page(chromium, page.as_uri())
    loaded = devtools.call(
        "Runtime.evaluate",
        expression="[...document.images].every(i => i.complete && i.naturalWidth > 0)",
        returnByValue=True,
    )["result"]["value"]
    assert loaded is False
    assert any("gone.png" in error for error in _errors(devtools))
    devtools.ws.close()
