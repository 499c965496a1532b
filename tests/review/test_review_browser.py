"""The review page in a real headless Chromium, driven over the DevTools protocol: keys a / r / l decide,
clicks re-run HQ-SAM, and what the page did is read back from the Parquet files of LABELS/review."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from chromium_devtools import DevTools, launch_chromium, open_page, page_errors
from reviewing import api, copy_labels, make_labels, running

from hqlabel.platform.rle import decode_mask
from hqlabel.review.server import ReviewApp
from hqlabel.review.store import read_review

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def labels(ray_session, tmp_path_factory) -> Path:
    return make_labels(tmp_path_factory.mktemp("review-browser"), classes=("cat", "dog"))


def _value(devtools: DevTools, expression: str):
    result = devtools.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in result:
        raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")


def _until(devtools: DevTools, expression: str, timeout: float = 60) -> None:
    """Poll the page until ``expression`` is true (the page works asynchronously: fetches, model calls)."""
    deadline = time.monotonic() + timeout
    while not _value(devtools, expression):
        if time.monotonic() > deadline:
            state = _value(
                devtools, "JSON.stringify({done: review.done, fixes: review.fixes, errors: review.errors})"
            )
            raise TimeoutError(f"{expression} not true within {timeout} s; page state {state}")
        time.sleep(0.05)


def _key(devtools: DevTools, key: str) -> None:
    devtools.call("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
    devtools.call("Input.dispatchKeyEvent", type="keyUp", key=key)


def _click(devtools: DevTools, fx: float, fy: float, button: str = "left", modifiers: int = 0) -> None:
    """Click at (fx, fy), fractions of the overlay image's width and height."""
    rect = json.loads(
        _value(devtools, "JSON.stringify(document.getElementById('overlay').getBoundingClientRect())")
    )
    x, y = rect["left"] + fx * rect["width"], rect["top"] + fy * rect["height"]
    for kind in ("mousePressed", "mouseReleased"):
        devtools.call(
            "Input.dispatchMouseEvent", type=kind, x=x, y=y, button=button, clickCount=1, modifiers=modifiers
        )


def test_keys_and_clicks_on_the_review_page_land_in_parquet(labels, tmp_path):
    folder = copy_labels(labels, tmp_path / "labels")
    app = ReviewApp(str(folder), reviewer="cdp", device="cpu")
    with running(app) as base, launch_chromium(tmp_path) as endpoint:
        ranked = api(base, "/api/items?pending=1&limit=5")[1]["items"]
        keys = [f"{i['image_id']}\u0000{i['instance_id']}" for i in ranked]
        devtools = open_page(endpoint, base + "/")
        _until(devtools, "window.review && review.ready === true")
        assert _value(devtools, "!document.getElementById('random-weights').hidden")
        assert "RANDOM WEIGHTS" in _value(devtools, "document.getElementById('random-weights').textContent")
        assert _value(devtools, "review.shown") == keys[0]  # least trustworthy first
        # the next item's overlay is fetched while this one is shown
        _until(devtools, f"[...review.prefetched.keys()].some(k => k.startsWith({json.dumps(keys[1])}))")

        _key(devtools, "a")
        _until(devtools, f"review.done === 1 && review.shown === {json.dumps(keys[1])}")
        _key(devtools, "r")
        _until(devtools, f"review.done === 2 && review.shown === {json.dumps(keys[2])}")
        _key(devtools, "l")
        _until(devtools, "review.relabeling === true")
        _key(devtools, "2")  # the second class: dog
        _until(devtools, f"review.done === 3 && review.shown === {json.dumps(keys[3])}")

        _click(devtools, 0.5, 0.5)  # positive
        _until(devtools, "review.fixes === 1 && review.pending === 0")
        _click(devtools, 0.1, 0.1, modifiers=8)  # shift-click: negative
        _until(devtools, "review.fixes === 2 && review.pending === 0")
        _click(devtools, 0.9, 0.9, button="right")  # right click: negative
        _until(devtools, "review.fixes === 3 && review.pending === 0")
        shown = json.loads(_value(devtools, "JSON.stringify([overlay.naturalWidth, overlay.naturalHeight])"))
        assert shown[0] * ranked[3]["height"] == shown[1] * ranked[3]["width"]  # the image, aspect kept
        assert _value(devtools, "review.errors.length") == 0
        assert page_errors(devtools) == []
        devtools.ws.close()

    states = read_review(str(folder / "review"))
    decided = {k: (s.decision, s.label, s.reviewer) for k, s in states.items() if s.decision}
    key = [(i["image_id"], i["instance_id"]) for i in ranked]
    assert decided == {
        key[0]: ("accept", None, "cdp"),
        key[1]: ("reject", None, "cdp"),
        key[2]: ("relabel", "dog", "cdp"),
    }
    fixed = states[key[3]]
    assert fixed.decision is None and fixed.corrected and fixed.fixed_by == "cdp"
    assert [p[2] for p in fixed.points] == [1, 0, 0]
    width, height = ranked[3]["width"], ranked[3]["height"]
    for (x, y, _), (fx, fy) in zip(fixed.points, [(0.5, 0.5), (0.1, 0.1), (0.9, 0.9)], strict=True):
        assert x == pytest.approx(fx * width, abs=1) and y == pytest.approx(fy * height, abs=1)
    mask = decode_mask(fixed.mask)
    assert mask.shape == (height, width) and int(mask.sum()) == fixed.area
    image = app.items.image(key[3][0])
    rle, _, _ = app.fixer.fix(key[3][0], image, ranked[3]["box"], [tuple(p) for p in fixed.points])
    assert (decode_mask(rle) == mask).all()  # the saved mask is HQ-SAM's answer to those three clicks
