"""The ``hqlabel show`` gallery in a real headless Chromium, driven over the DevTools protocol: the page
loads, every image decodes, and nothing is logged as an error (missing files, blocked resources, script
errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chromium_devtools import launch_chromium, open_page, page_errors
from reviewing import make_labels

from hqlabel.jobs.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def chromium(tmp_path):
    with launch_chromium(tmp_path) as endpoint:
        yield endpoint


def test_gallery_loads_in_chromium(ray_session, chromium, tmp_path):
    labels = make_labels(tmp_path)
    out = tmp_path / "show"
    assert main(["show", str(labels), "--out", str(out)]) == 0

    devtools = open_page(chromium, (out / "index.html").as_uri())
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
    assert page_errors(devtools) == []
    devtools.ws.close()


def test_error_capture_sees_a_missing_image(chromium, tmp_path):
    """The check above can fail: a page whose image is missing logs an error and reports it unloaded."""
    page = Path(tmp_path / "index.html")
    page.write_text('<!DOCTYPE html><html><body><img src="overlays/gone.png" alt="x"></body></html>')
    devtools = open_page(chromium, page.as_uri())
    loaded = devtools.call(
        "Runtime.evaluate",
        expression="[...document.images].every(i => i.complete && i.naturalWidth > 0)",
        returnByValue=True,
    )["result"]["value"]
    assert loaded is False
    assert any("gone.png" in error for error in page_errors(devtools))
    devtools.ws.close()
